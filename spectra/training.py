"""Reference training runs: LoRA (through PEFT) and full fine-tuning of one base on one dataset.

The runs exist to be analysed: a LoRA run writes a standard PEFT adapter, a full run a safetensors
model folder transformers loads, and both log, as they go, the target-domain training loss, the
held-out target loss and the source-domain loss (the forgetting measure of Biderman et al. 2024) to
``train_log.jsonl``, with the config and seed beside it. Defaults follow Biderman et al.'s advice:
LoRA on all linear modules, ``alpha = 2r``, a LoRA learning rate about 10× the full fine-tuning one.

Needs the ``train`` extra (transformers, peft). Data: a text file, a folder of text/code files, or
JSONL with a ``text`` field or ``prompt``/``response`` pairs (loss on the response only).
Tokenisation: the model folder's tokenizer when it has one, else UTF-8 bytes (ids 0–255), which is
what the built-in demo's byte-level models use.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from spectra.callbacks import SpectraTracker
from spectra.comparison import compare
from spectra.errors import ConfigError, SpectraError
from spectra.io.files import atomic_write_text
from spectra.io.jsonfile import load_json, load_jsonl
from spectra.pipeline import diff

TARGET_SETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
TARGET_SETS["all"] = TARGET_SETS["attn"] + TARGET_SETS["mlp"]
HOLDOUT_SEED = 1234  # fixed: every run on the same data holds out the same blocks
_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml"}


@dataclass(frozen=True)
class TrainConfig:
    """One reference run; saved as ``train_config.json`` beside its outputs.

    Attributes:
        base: local Hugging Face causal-LM folder (transformers); never downloaded.
        data: target data (text file, folder of text/code, or JSONL).
        out: output folder (the adapter or model, ``train_log.jsonl``, ``train_config.json``).
        method: ``"lora"`` (PEFT adapter) or ``"full"`` (every weight).
        rank: LoRA rank r.
        alpha: LoRA alpha; default ``2 * rank`` (Biderman et al.).
        rslora: scale by ``alpha / sqrt(r)``.
        targets: ``"all"`` (default, Biderman et al.), ``"attn"``, ``"mlp"`` or comma-separated module names.
        lr: learning rate; default 2e-4 for LoRA and 2e-5 for full fine-tuning (≈ 10×, Biderman et al.).
        steps: optimiser steps; batch: sequences per step; seq_len: tokens per sequence.
        seed: seeds data order, initialisation and dropout; same seed, same run on the CPU.
        eval_source: source-domain data for the forgetting measure (optional).
        eval_every: steps between evaluations (also at the start and the end).
        eval_batches: batches per evaluation.
        holdout: fraction of the target data held out for the held-out target loss.
        device: ``auto`` (CUDA with bf16 autocast when present), ``cpu`` or ``cuda``.
        trace_every: every this many steps, measure ΔW's spectrum and subspaces in the training
            process (:class:`spectra.callbacks.SpectraTracker`, ``trace.jsonl`` in ``out``; 0: off).
            50 costs about 0.3% (LoRA) and 1.2% (full) of the demo's training time
            (``bench/results/callback-overhead-cpu.md``).
    """

    base: str
    data: str
    out: str
    method: Literal["lora", "full"] = "lora"
    rank: int = 16
    alpha: float | None = None
    rslora: bool = False
    targets: str = "all"
    lr: float | None = None
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    seed: int = 0
    eval_source: str | None = None
    eval_every: int = 50
    eval_batches: int = 4
    holdout: float = 0.1
    device: str = "auto"
    tokenizer: str = field(default="auto")
    trace_every: int = 50

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method must be lora or full. Got {self.method!r} instead")
        for name in ("rank", "steps", "batch", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Got {getattr(self, name)} instead")
        if self.trace_every < 0:
            raise ConfigError(f"trace_every must be >= 0. Got {self.trace_every} instead")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1). Got {self.holdout} instead")

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else (2e-4 if self.method == "lora" else 2e-5)

    def target_modules(self) -> list[str]:
        return TARGET_SETS.get(self.targets) or [t.strip() for t in self.targets.split(",") if t.strip()]


# ---- data -------------------------------------------------------------------------------------------
def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, text)`` pairs: prompt is "" for plain text (loss on everything).

    Raises:
        SpectraError: no such path, no text in it, or JSONL lines without ``text`` or ``prompt``/``response``.
    """
    p = Path(path)
    if not p.exists():
        raise SpectraError("no such file or folder", path=p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        out = [("", f.read_text(encoding="utf-8", errors="replace")) for f in files]
    elif p.suffix == ".jsonl":
        out = []
        # bounded size and nesting, one-line errors naming the line (spectra.io.jsonfile)
        for i, rec in enumerate(load_jsonl(p, what=p.name, error=ConfigError), start=1):
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                out.append(("", rec["text"]))
            elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
                out.append((rec["prompt"], rec["response"]))
            else:
                raise SpectraError(f"line {i} has neither a text field nor prompt/response fields", path=p)
    else:
        out = [("", p.read_text(encoding="utf-8", errors="replace"))]
    out = [(a, b) for a, b in out if b.strip()]
    if not out:
        raise SpectraError("no text found", path=p, hint="pass a text file, a folder of text/code files or JSONL")
    return out


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255 (the demo's models have a 256-token vocabulary)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


#: The files that make a model folder's tokenizer (without any of them, text is read as UTF-8 bytes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(base: str | Path, kind: str = "auto"):
    """The model folder's tokenizer (``kind="auto"`` and tokenizer files present), else bytes."""
    folder = Path(base)
    has_files = any((folder / n).exists() for n in TOKENIZER_FILES)
    if kind == "bytes" or (kind == "auto" and not has_files):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def check_vocabulary(base: str | Path, tok, ids: torch.Tensor) -> None:
    """Refuse token ids the model cannot embed: ``ids`` ``(n, seq_len)`` int64 against ``config.json``'s
    ``vocab_size`` (or its ``text_config``'s). The byte fallback (no tokenizer files in the folder)
    needs a vocabulary of at least 256.

    Raises:
        SpectraError: a token id at or above the vocabulary size.
    """
    try:  # the bounded reader every untrusted config goes through (size, nesting, not a FIFO)
        cfg = load_json(Path(base) / "config.json", what="config.json")
    except SpectraError:
        return  # transformers reports an unreadable config when it loads the model
    vocab = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if vocab is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        vocab = cfg["text_config"].get("vocab_size")
    top = int(ids.max()) if ids.numel() else -1
    if isinstance(vocab, int) and top >= vocab:
        how = (f"the folder has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so the text is read "
               "as UTF-8 bytes, ids 0-255" if isinstance(tok, ByteTokenizer) else f"its tokenizer ({type(tok).__name__})")
        raise SpectraError(f"token id {top} is outside the model's vocabulary of {vocab} (config.json vocab_size): {how}",
                           path=base, hint="put the model's tokenizer files in its folder, or use a model whose vocabulary "
                                           "holds the tokens")


def _encode(tok, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def token_blocks(examples: list[tuple[str, str]], tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples and cut ``(n, seq_len)`` blocks of ids and of labels (-100 on prompts)."""
    ids: list[int] = []
    labels: list[int] = []
    for prompt, text in examples:
        p = _encode(tok, prompt) if prompt else []
        t = _encode(tok, text + "\n")
        ids += p + t
        labels += [-100] * len(p) + t
    n = len(ids) // seq_len
    if n < 2:
        raise SpectraError(f"the data holds {len(ids)} tokens, fewer than two blocks of {seq_len}",
                           hint="give more data or a smaller --seq-len")
    return (torch.tensor(ids[: n * seq_len]).view(n, seq_len), torch.tensor(labels[: n * seq_len]).view(n, seq_len))


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class TrainSummary:
    """Final numbers of a run (also the last line of ``train_log.jsonl``)."""

    out: str
    method: str
    steps: int
    seconds: float
    first_train_loss: float
    target_loss: float
    source_loss: float | None
    trainable_params: int


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, device: torch.device, autocast: bool) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=ids.to(device), labels=labels.to(device)).loss


@torch.no_grad()
def _evaluate(model, blocks: tuple[torch.Tensor, torch.Tensor], batches: int, batch: int, device, autocast) -> float:
    model.eval()
    ids, labels = blocks
    n = min(len(ids), batches * batch)
    losses = [float(_loss(model, ids[i : i + batch], labels[i : i + batch], device, autocast)) for i in range(0, n, batch)]
    model.train()
    return sum(losses) / len(losses)


def train(config: TrainConfig, *, callback: Callable[[dict], None] | None = None) -> TrainSummary:
    """Run one reference fine-tune and write its outputs into ``config.out``.

    Args:
        config: the run.
        callback: called with each log record (a dict) as it is written.

    Returns:
        The :class:`TrainSummary` of the run.
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SpectraError("training needs the train extra", hint="pip install 'spectra[train]'") from exc
    base = Path(config.base)
    if not (base / "config.json").is_file():
        raise SpectraError("not a Hugging Face model folder (no config.json)", path=base,
                           hint="pass a local causal-LM folder; spectra never downloads models")
    out = Path(config.out)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device))
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    tok = load_tokenizer(base, config.tokenizer)
    target = token_blocks(read_examples(config.data), tok, config.seq_len)
    check_vocabulary(base, tok, target[0])  # before anything is written: an embedding lookup would fail mid-run
    # The held-out split does not depend on the run's seed, so runs with different seeds are
    # evaluated on the same held-out blocks.
    perm = torch.randperm(len(target[0]), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    g = torch.Generator().manual_seed(config.seed)
    n_hold = max(1, int(len(perm) * config.holdout))
    held = (target[0][perm[:n_hold]], target[1][perm[:n_hold]])
    train_ids, train_labels = target[0][perm[n_hold:]], target[1][perm[n_hold:]]
    source = token_blocks(read_examples(config.eval_source), tok, config.seq_len) if config.eval_source else None
    if source is not None:
        check_vocabulary(base, tok, source[0])
    out.mkdir(parents=True, exist_ok=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=False, local_files_only=True)
    if config.method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=config.rank, lora_alpha=config.resolved_alpha, use_rslora=config.rslora,
            target_modules=config.target_modules(), lora_dropout=0.0))
    model.to(device).train()
    # started before the first step: a full fine-tune's ΔW is measured from these weights
    tracker = SpectraTracker(model, every=config.trace_every, out_dir=out) if config.trace_every else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.resolved_lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    cfg_doc = {**asdict(config), "resolved_alpha": config.resolved_alpha, "resolved_lr": config.resolved_lr,
               "target_modules": config.target_modules(), "tokenizer_used": type(tok).__name__,
               "trainable_params": sum(p.numel() for p in params)}
    atomic_write_text(out / "train_config.json", json.dumps(cfg_doc, indent=2, sort_keys=True) + "\n")
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (appended to through the loop, closed in finally)
    t0 = time.perf_counter()
    first = None
    tokens = 0

    def record(step: int, train_loss: float | None) -> dict:
        rec = {"step": step, "train_loss": train_loss,
               "target_loss": _evaluate(model, held, config.eval_batches, config.batch, device, autocast),
               "source_loss": _evaluate(model, source, config.eval_batches, config.batch, device, autocast) if source else None,
               "lr": sched.get_last_lr()[0], "tokens": tokens, "seconds": time.perf_counter() - t0}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if callback:
            callback(rec)
        return rec

    try:
        last = record(0, None)
        for step in range(1, config.steps + 1):
            idx = torch.randint(0, len(train_ids), (config.batch,), generator=g)
            loss = _loss(model, train_ids[idx], train_labels[idx], device, autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SpectraError(f"the loss became {value} at step {step}", path=out, hint="lower --lr")
            first = value if first is None else first
            tokens += int(train_ids[idx].numel())
            if tracker is not None:
                tracker.log_loss(step, loss=value)
                tracker.step(model, step, loss=value)
            if step % config.eval_every == 0 or step == config.steps:
                last = record(step, value)
    finally:
        log.close()
        if tracker is not None:
            tracker.close()
    if config.method == "lora":
        model.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out))
    summary = TrainSummary(str(out), config.method, config.steps, time.perf_counter() - t0, first or float("nan"),
                           last["target_loss"], last["source_loss"], cfg_doc["trainable_params"])
    atomic_write_text(out / "train_summary.json", json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n")
    return summary


def sweep(base: str, data: str, out: str, *, methods: list[str], ranks: list[int], seeds: list[int] | None = None,
          eval_source: str | None = None, callback: Callable[[str, dict], None] | None = None, **train_kwargs) -> dict:
    """Several reference runs on one base and dataset, then ``spectra diff`` of each and ``compare``
    of every LoRA run with the full run (if any) and of consecutive LoRA ranks.

    Args:
        base, data, out, eval_source: as :class:`TrainConfig`; runs go to ``out/<name>``.
        methods: ``["lora", "full"]`` or a subset; ranks: LoRA ranks; seeds: one run per seed (default [0]).
        callback: ``callback(run_name, log_record)`` as runs progress.
        train_kwargs: any other :class:`TrainConfig` field (steps, lr, batch, seq_len…), for every run.

    Returns:
        ``{"runs": {name: TrainSummary dict}, "diffs": {name: folder}, "compares": {name: folder}}``;
        also written to ``out/sweep.json``.
    """
    root = Path(out)
    seeds = seeds or [0]
    runs: dict[str, dict] = {}
    names: list[tuple[str, str, int]] = []
    for seed in seeds:
        suffix = f"_seed{seed}" if len(seeds) > 1 else ""
        this_seed = ([(f"full{suffix}", "full", 0)] if "full" in methods else []) + \
            ([(f"lora{r}{suffix}", "lora", r) for r in ranks] if "lora" in methods else [])
        for name, method, rank in this_seed:
            summary = train(TrainConfig(base=base, data=data, out=str(root / name), method=method, rank=max(rank, 1),
                                        seed=seed, eval_source=eval_source, **train_kwargs),
                            callback=(lambda r, n=name: callback(n, r)) if callback else None)
            runs[name] = asdict(summary)
        names += this_seed
    diffs = {}
    for name in runs:
        diff(base, str(root / name), out_dir=root / "analysis" / f"diff_{name}")
        diffs[name] = str(root / "analysis" / f"diff_{name}")
    compares = {}
    loras = [n for n, m, _ in names if m == "lora"]
    fulls = [n for n, m, _ in names if m == "full"]
    pairs = [(l, fulls[0]) for l in loras[:1]] if fulls else []
    pairs += list(zip(loras, loras[1:]))
    for a, b in pairs:
        folder = root / "analysis" / f"compare_{a}_vs_{b}"
        compare(str(root / a), str(root / b), base=base, out_dir=folder)
        compares[f"{a}_vs_{b}"] = str(folder)
    doc = {"runs": runs, "diffs": diffs, "compares": compares}
    atomic_write_text(root / "sweep.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc
