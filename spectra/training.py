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

Every input is checked before the output folder is made (:mod:`spectra.training_inputs`); the folder
must be new or empty (``force`` deletes an earlier run's files first, nothing else), is never the
base model's, and is locked while a run writes it, so two runs never mix their files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from spectra.callbacks import SpectraTracker
from spectra.comparison import compare
from spectra.errors import ConfigError, SpectraError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.files import LOCK_NAME, atomic_write_text, folder_lock, refuse_if_held
from spectra.io.jsonfile import finite_or_null
from spectra.io.paths import refuse_empty_path
from spectra.io.text_data import data_fingerprint, overlapping
from spectra.journal import inputs_fingerprint
from spectra.linalg import all_finite
from spectra.lora_targets import ALL_LINEAR, TARGET_SETS, check_lora_rank, resolve_targets, untargeted
from spectra.metrics import normal_float32
from spectra.pipeline import diff
from spectra.training_inputs import (
    SWEEP_OPTIONS,
    TOKENIZER_FILES,
    ByteTokenizer,
    analysis_written,
    check_causal_lm,
    check_lr,
    check_out,
    check_positions,
    check_positive,
    check_seed,
    check_step_memory,
    check_sweep_options,
    check_vocabulary,
    clear_run_outputs,
    finished_run,
    first_line,
    foreign_outputs,
    leading_blocks,
    load_model,
    load_tokenizer,
    model_config,
    read_examples,
    refuse_file_in_path,
    resolve_device,
    run_fields,
    token_blocks,
)

#: The TrainConfig fields only LoRA uses; a full fine-tune trains every weight whatever they say, so its
#: train_config.json records them (and resolved_alpha, target_modules) as null, not values that did nothing.
LORA_ONLY = ("rank", "alpha", "rslora", "targets")
HOLDOUT_SEED = 1234  # fixed: every run on the same data holds out the same blocks
#: Fewest tokens per sequence (``--seq-len``'s minimum): a block of 1 token has no next token to predict.
MIN_SEQ_LEN = 8


@dataclass(frozen=True)
class TrainConfig:
    """One reference run; saved as ``train_config.json`` beside its outputs.

    Attributes:
        base: local Hugging Face causal-LM folder (transformers); never downloaded.
        data: target data (text file, folder of text/code, or JSONL).
        out: output folder (the adapter or model, ``train_log.jsonl``, ``train_config.json``).
        method: ``"lora"`` (PEFT adapter) or ``"full"`` (every weight).
        rank: LoRA rank r. ``rank``, ``alpha``, ``rslora`` and ``targets`` apply to LoRA only (:data:`LORA_ONLY`:
            null in a full run's ``train_config.json``).
        alpha: LoRA alpha (finite, > 0, its scale alpha/r, or alpha/√r, a normal float32 number); default
            ``2 * rank`` (Biderman et al.).
        rslora: scale by ``alpha / sqrt(r)``.
        targets: ``"all"`` (default, Biderman et al.), ``"attn"``, ``"mlp"`` (those of them the model has),
            ``"all-linear"`` (PEFT: every linear layer but the output head) or comma-separated module
            names (each must name a module of the model).
        lr: learning rate (finite, > 0); default 2e-4 for LoRA and 2e-5 for full fine-tuning (≈ 10×, Biderman et al.).
        steps: optimiser steps; batch: sequences per step; seq_len: tokens per sequence.
        seed: seeds data order, initialisation and dropout (0 to 2**63-1); same seed, same run on the CPU.
        eval_source: source-domain data for the forgetting measure (optional).
        eval_every: steps between evaluations (also at the start and the end).
        eval_batches: batches per evaluation.
        holdout: fraction of the target data held out for the held-out target loss.
        device: ``auto`` (CUDA with bf16 autocast when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
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
        for name in ("base", "data", "out"):
            refuse_empty_path(getattr(self, name), f"--{name} is an empty path")
        for name in ("rank", "steps", "batch", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Got {getattr(self, name)} instead")
        if self.seq_len < MIN_SEQ_LEN:  # as --seq-len: 1 token predicts nothing, and was blamed on the data
            raise ConfigError(f"seq_len must be >= {MIN_SEQ_LEN} tokens. Got {self.seq_len} instead")
        if self.trace_every < 0:
            raise ConfigError(f"trace_every must be >= 0. Got {self.trace_every} instead")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1). Got {self.holdout} instead")
        check_seed(self.seed)
        for name in ("lr", "alpha"):  # NaN, inf or 0 would train nothing or diverge with a misleading message
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        if self.lr is not None:
            check_lr(self.lr)
        if not self.target_modules():
            raise ConfigError(f"targets names no module. Got {self.targets!r} instead",
                              hint="all, attn, mlp, all-linear or comma-separated module names")
        if self.method == "lora":
            self._check_scale()

    def _check_scale(self) -> None:
        """PEFT multiplies the adapter's float32 output by alpha/r (alpha/√r with rslora): a scale float32
        holds only as 0 or a subnormal trains an adapter that adds nothing (exit 0, no sign), one above its
        largest value an infinite one."""
        root = math.sqrt(self.rank) if self.rslora else float(self.rank)
        scale = self.resolved_alpha / root
        f32 = torch.finfo(torch.float32)
        if not normal_float32(scale):
            what = "0 or subnormal" if scale < f32.tiny else "infinite"
            raise ConfigError(f"--alpha {self.resolved_alpha:.4g} gives the LoRA scale alpha/{'√' if self.rslora else ''}r = "
                              f"{scale:.3g}, which is {what} in float32: the adapter would add "
                              f"{'nothing' if scale < f32.tiny else 'inf or NaN'}",
                              hint=(f"raise --alpha to at least {f32.tiny * root * 1.001:.3g}" if scale < f32.tiny else
                                    f"lower --alpha to at most {f32.max * root * 0.999:.3g}")
                                   + f" for --rank {self.rank}{' with --rslora' if self.rslora else ''}")

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else (2e-4 if self.method == "lora" else 2e-5)

    def target_modules(self) -> list[str]:
        """The module names ``targets`` stands for (``["all-linear"]`` for PEFT's own choice)."""
        return TARGET_SETS.get(self.targets) or [t.strip() for t in self.targets.split(",") if t.strip()]


# ---- the run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSetup:
    """What PEFT adapted by name and what a preset left out, as train_config.json records them.

    Attributes:
        target_parameters: the tensors PEFT adapts as ``target_parameters`` (an MoE's stacked experts under all-linear).
        not_adapted: the weights a preset left out, as paths within a layer (:func:`~spectra.lora_targets.untargeted`).
        not_adapted_share: their share of the layer stack's matrix entries, in [0, 1].
    """

    target_parameters: list[str] = field(default_factory=list)
    not_adapted: list[str] = field(default_factory=list)
    not_adapted_share: float = 0.0


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


#: What to do when the loss diverged: the folder holds this run's log, so a rerun into it needs --force.
RERUN_LOWER = "lower --lr and rerun with --force (the folder keeps this run's log)"


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, device: torch.device, autocast: bool) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=ids.to(device), labels=labels.to(device)).loss


@torch.no_grad()
def held_out_loss(model, blocks: tuple[torch.Tensor, torch.Tensor], batches: int, batch: int, device: torch.device,
                  autocast: bool) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over the first ``batches × batch``
    blocks: ``blocks`` is ``(ids, labels)``, each ``(n, seq_len)`` int64 (labels -100 where not scored);
    the mean over every scored token, so a last, partial batch weighs as its tokens do. NaN when no
    token is scored. The model is left in training mode."""
    model.eval()
    ids, labels = blocks
    n = min(len(ids), batches * batch)
    total = count = 0.0
    for i in range(0, n, batch):
        # a batch's loss is the mean over its predicted tokens (labels shifted by one, -100 left out): weighted by
        # their count, so that a last, partial batch weighs as its tokens do (the mean over every held-out token)
        tokens = float((labels[i : i + batch, 1:] != -100).sum())
        if tokens:
            total += float(_loss(model, ids[i : i + batch], labels[i : i + batch], device, autocast)) * tokens
            count += tokens
    model.train()
    return total / count if count else math.nan


#: A --data text file is read as far as a pool of this many times the blocks a run draws (steps × batch),
#: plus its held-out share: a sample of the corpus large enough that draws with replacement rarely repeat.
DATA_POOL_FACTOR = 64


#: The held-out blocks are drawn from the first this many blocks of the data (all of them when it holds
#: fewer), whatever a run's --steps and --batch: runs of other lengths on one file hold out the same
#: blocks, and none trains on another's held-out ones.
HOLDOUT_POOL = 2048


def data_blocks(config: TrainConfig) -> int:
    """Blocks of ``config.seq_len`` tokens a run reads from a large ``--data`` text file: enough for
    :data:`DATA_POOL_FACTOR` × the blocks it draws in its training share, for ``eval_batches``
    batches in its held-out share (:func:`holdout_split`), and at least :data:`HOLDOUT_POOL`."""
    return max(_pool_terms(config).values())


def _pool_terms(config: TrainConfig) -> dict[str, int]:
    """:func:`data_blocks`'s terms (blocks), keyed by what each says in ``train_config.json``'s ``data_read`` note."""
    draws = config.steps * config.batch
    return {f"{DATA_POOL_FACTOR}× the blocks the run draws": math.ceil(DATA_POOL_FACTOR * draws / (1 - config.holdout)),
            f"enough that its held-out share ({config.holdout:g}) holds the {config.eval_batches * config.batch} blocks an "
            "evaluation scores": math.ceil(config.eval_batches * config.batch / config.holdout),
            f"the {HOLDOUT_POOL} blocks the held-out split is drawn from, whatever the run's length": max(HOLDOUT_POOL, 2)}


def holdout_split(n: int, holdout: float, scored: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(held, train)`` block indices of ``n`` blocks: the held-out share drawn (:data:`HOLDOUT_SEED`) from
    the first ``min(n, HOLDOUT_POOL)``, the rest of those and every later block for training. Independent
    of the run's seed and steps, so that runs on the same data hold out the same blocks; the pool grows
    only where its share would hold fewer than the ``scored`` blocks an evaluation reads (``eval_batches ×
    batch``: above ~200 with the defaults)."""
    pool = min(n, max(HOLDOUT_POOL, math.ceil(scored / holdout)))
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    n_hold = max(1, int(pool * holdout))
    return perm[:n_hold], torch.cat([perm[n_hold:], torch.arange(pool, n)])


def held_out_digest(blocks: tuple[torch.Tensor, torch.Tensor]) -> str:
    """A short hash of the token ids and labels a held-out loss scores (:func:`held_out_loss`'s blocks): two
    runs' losses are comparable only where it is the same (``spectra report`` checks it)."""
    import hashlib

    h = hashlib.sha256()
    for t in blocks:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(config: TrainConfig, *, callback: Callable[[dict], None] | None = None, force: bool = False) -> TrainSummary:
    """Run one reference fine-tune and write its outputs into ``config.out``.

    Everything is checked before the folder is created or touched: the model folder, tokenizer,
    data, device, sequence length and LoRA targets, and the folder itself (not the base model's, not
    holding an earlier run's files unless ``force``). The folder is locked while the run writes it
    (:func:`spectra.io.files.folder_lock`).

    Args:
        config: the run.
        callback: called with each log record (a dict) as it is written.
        force: write into a folder that is not empty, first deleting the files an earlier run wrote
            there (:data:`spectra.training_inputs.RUN_FILES`; nothing else).

    Returns:
        The :class:`TrainSummary` of the run.

    Raises:
        SpectraError: bad input (one line naming the file or option), or the run diverged.
        OutputError: another run is writing into ``config.out``.
    """
    try:
        import transformers  # noqa: F401 - the extra's presence, checked first
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SpectraError("training needs the train extra", hint="pip install 'spectra[train]'") from exc
    base, out = Path(config.base), Path(config.out)
    if (base / "adapter_config.json").is_file():  # transformers loads it onto the model: a full run then trains nothing
        raise ConfigError("the base folder holds a PEFT adapter (adapter_config.json) beside the model: transformers would load "
                          "it onto the base", path=base, hint="pass a folder with the base model alone: move the adapter out")
    model_cfg = model_config(base)
    check_causal_lm(base, model_cfg)  # an encoder's loss would peek at the token it predicts
    device = resolve_device(config.device)
    check_positions(base, model_cfg, config.seq_len)
    check_step_memory(config.batch, config.seq_len, model_cfg, device)  # before --out is made
    inputs = [config.data, *([config.eval_source] if config.eval_source else [])]
    if config.eval_source and overlapping(config.eval_source, config.data):  # a "forgetting" score of the training text
        raise ConfigError("--eval-source is --data, or inside it or holds it, or a copy of a file it reads: the forgetting "
                          "measure would score the text the run trains on",
                          hint="give --eval-source text of the base model's own domain (e.g. general prose), or leave it out")
    check_out(out, base=base, inputs=inputs, force=force)  # early: a refused folder costs no data reading
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    tok = load_tokenizer(base, config.tokenizer)
    # a text file larger than the run can use is read only as far as a pool of blocks many times what
    # the run draws (a 1 GB corpus held as token lists took ~50 GB); a smaller one, or a folder, whole
    pool = data_blocks(config)
    ids, labels, whole = leading_blocks(config.data, tok, config.seq_len, pool)
    target = (ids, labels)
    check_vocabulary(base, tok, target[0])  # before anything is written: an embedding lookup would fail mid-run
    # the held-out split depends on neither the run's seed nor its length (holdout_split)
    hold_idx, train_idx = holdout_split(len(target[0]), config.holdout, config.eval_batches * config.batch)
    held = (target[0][hold_idx], target[1][hold_idx])
    blocks = (target[0][train_idx], target[1][train_idx])
    # only the first eval_batches × batch blocks of the source are ever scored (held_out_loss): read as far as they need
    source = (leading_blocks(config.eval_source, tok, config.seq_len, config.eval_batches * config.batch)[:2]
              if config.eval_source else None)
    if source is not None:
        check_vocabulary(base, tok, source[0])
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = load_model(base)
    # transformers loads a checkpoint in its config's dtype (bf16 for most published models): AdamW stepping
    # bf16 weights loses every step below half a bf16 step (a 4-step full run changed 6% of q_proj's entries),
    # while PEFT keeps LoRA factors in float32. Both methods train float32 weights; the full model is saved so.
    base_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model = model.float()
    targets = None
    lora = LoraSetup()
    if config.method == "lora":
        model, targets, lora = _add_lora(model, config)
    model.to(device).train()
    # the folder is made only now, every input checked; a second run into it is refused, not interleaved
    with folder_lock(out):
        check_out(out, base=base, inputs=inputs, force=force)  # again under the lock: another run may have written
        if force:
            clear_run_outputs(out)
        terms = _pool_terms(config)  # the note names the term that set the count
        read = None if whole else {"blocks": len(ids), "tokens": len(ids) * config.seq_len,
                                   "note": f"{config.data} holds more than the run can use: its first {len(ids)} blocks of "
                                           f"{config.seq_len} tokens are used ({max(terms, key=terms.__getitem__)}; "
                                           "a text file is read no further)"}
        return _fit(config, model, tok, held, blocks, source, device, autocast, targets, callback, read, base_dtype, lora)


def _add_lora(model, config: TrainConfig) -> tuple[torch.nn.Module, list[str], LoraSetup]:
    """``(PEFT model, the module names adapted, what it adapts by name and a preset left out)``: ``--targets``
    checked against the model first."""
    import peft

    modules = resolve_targets(model, config.targets, config.target_modules())
    # "all" of a model with fused experts or a router adapts far less than all of it
    left, share = untargeted(model, list(modules), config.targets) if config.targets in TARGET_SETS else ([], 0.0)
    check_lora_rank(model, modules, config.rank)
    # GPT-2's Conv1D layers store (in, out): said in the config, else PEFT warns and sets it itself, module by module
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    try:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=config.rank, lora_alpha=config.resolved_alpha, use_rslora=config.rslora, target_modules=modules, lora_dropout=0.0,
            fan_in_fan_out=conv1d))
    except (ValueError, TypeError, KeyError) as exc:  # PEFT refuses a module kind it cannot adapt
        raise ConfigError(f"PEFT cannot adapt --targets {config.targets}: {first_line(exc)}",
                          hint="name linear layers (see the model's module names), or pass --targets all-linear") from None
    adapted = model.peft_config["default"].target_modules
    params = sorted(getattr(model.peft_config["default"], "target_parameters", None) or [])  # an MoE's experts under all-linear
    # all-linear: PEFT resolves full module names; the short names, as the presets record them
    return (model, sorted({n.rsplit(".", 1)[-1] for n in adapted}) if modules == ALL_LINEAR else list(modules),
            LoraSetup(params, left, share))


def _check_rank_early(config: TrainConfig, option: str = "--rank") -> None:
    """:func:`~spectra.lora_targets.check_lora_rank` on the model built without weights (meta device: no memory, no reading);
    a model this cannot build is left to :func:`train`, which says why."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(config.base), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - any failure here is train()'s to report, with its own message
        return
    check_lora_rank(model, resolve_targets(model, config.targets, config.target_modules()), config.rank, option)


def _fit(config: TrainConfig, model, tok, held, blocks, source, device: torch.device, autocast: bool,
         targets: list[str] | None, callback: Callable[[dict], None] | None, read: dict | None = None,
         base_dtype: str = "float32", lora: LoraSetup | None = None) -> TrainSummary:
    """The optimisation loop and the outputs, in the locked, checked ``config.out`` (``base_dtype``: the base's
    stored dtype, recorded beside the float32 the run trains and saves; ``lora``: PEFT's target_parameters and what a
    preset left out, :func:`_add_lora`; None for a full fine-tune)."""
    lora = lora or LoraSetup()
    out = Path(config.out)
    train_ids, train_labels = blocks
    g = torch.Generator().manual_seed(config.seed)
    # started before the first step: a full fine-tune's ΔW is measured from these weights
    tracker = SpectraTracker(model, every=config.trace_every, out_dir=out) if config.trace_every else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.resolved_lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    cfg_doc = {**asdict(config), "resolved_alpha": config.resolved_alpha, "resolved_lr": config.resolved_lr,
               "target_modules": targets if targets is not None else config.target_modules(),
               "target_parameters": lora.target_parameters or None,  # PEFT's LoRAs on tensors by name (an MoE's experts, all-linear)
               "not_adapted": {"weights": lora.not_adapted, "share": lora.not_adapted_share} if lora.not_adapted else None,
               "tokenizer_used": type(tok).__name__, "trainable_params": sum(p.numel() for p in params),
               "data_read": read or "whole", "base_dtype": base_dtype, "trained_dtype": "float32",
               # what the held-out losses score: runs whose digests differ are scored on other blocks
               "held_out_digest": held_out_digest(tuple(t[: config.eval_batches * config.batch] for t in held)),
               "source_digest": held_out_digest(tuple(t[: config.eval_batches * config.batch] for t in source))
               if source else None}
    if config.method == "full":  # every weight trained: LoRA's options (given or default) did not apply
        cfg_doc.update(dict.fromkeys((*LORA_ONLY, "resolved_alpha", "target_modules", "target_parameters", "not_adapted")))
    atomic_write_text(out / "train_config.json", json.dumps(cfg_doc, indent=2, sort_keys=True) + "\n")
    log = open(out / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (appended to through the loop, closed in finally)
    t0, first, tokens = time.perf_counter(), None, 0

    def diverged(step: int, what: str, hint: str = RERUN_LOWER) -> SpectraError:  # in the log too: a report reads it
        log.write(json.dumps({"step": step, "train_loss": None, "target_loss": None, "source_loss": None, "error": what}) + "\n")
        return SpectraError(f"{what} at step {step}", path=out, hint=hint)

    def record(step: int, train_loss: float | None) -> dict:
        rec = {"step": step, "train_loss": train_loss,
               "target_loss": held_out_loss(model, held, config.eval_batches, config.batch, device, autocast),
               "source_loss": held_out_loss(model, source, config.eval_batches, config.batch, device, autocast) if source else None,
               "lr": lr_used, "tokens": tokens, "seconds": time.perf_counter() - t0}
        log.write(json.dumps(finite_or_null(rec)) + "\n")  # JSON has no NaN: an undefined loss is null
        log.flush()
        bad = next((k for k in ("target_loss", "source_loss") if rec[k] is not None and not math.isfinite(rec[k])), None)
        if bad is not None:  # weights too large to evaluate: no model is saved with a loss nobody can read
            hint = RERUN_LOWER if step else "the base model's loss is not finite on this data"
            if not step and targets is not None:  # B = 0: the adapter adds nothing unless its scale overflows
                with model.disable_adapter():
                    if math.isfinite(held_out_loss(model, held if bad == "target_loss" else source, config.eval_batches, config.batch,
                                               device, autocast)):
                        hint = (f"the LoRA scale ({config.resolved_alpha:g} / {'√' if config.rslora else ''}r) overflows "
                                "in the adapter's forward pass; the base model's loss is finite: lower --alpha")
            raise diverged(step, f"the held-out {bad.replace('_', ' ')} became {rec[bad]}", hint)
        if callback:
            callback(rec)
        return rec

    lr_used = sched.get_last_lr()[0]  # the rate of the step a record is written after (the scheduler moves on first)
    try:
        last = record(0, None)
        for step in range(1, config.steps + 1):
            lr_used = sched.get_last_lr()[0]
            idx = torch.randint(0, len(train_ids), (config.batch,), generator=g)
            loss = _loss(model, train_ids[idx], train_labels[idx], device, autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise diverged(step, f"the loss became {value}")
            first = value if first is None else first
            tokens += int(train_ids[idx].numel())
            if tracker is not None:
                tracker.log_loss(step, loss=value)
                if tracker.step(model, step, loss=value) is None and step == config.steps:
                    tracker.measure(step, loss=value)  # the saved model is the last step's: the trace ends there too
            if step % config.eval_every == 0 or step == config.steps:
                last = record(step, value)
        if not all(all_finite(p) for p in params):  # the last step can diverge after its loss was taken
            raise diverged(config.steps, "the weights became infinite or NaN")
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
    summary = TrainSummary(str(out), config.method, config.steps, time.perf_counter() - t0,
                           first if first is not None else float("nan"), last["target_loss"], last["source_loss"],
                           cfg_doc["trainable_params"])
    atomic_write_text(out / "train_summary.json", json.dumps(finite_or_null(asdict(summary)), indent=2, sort_keys=True) + "\n")
    return summary


#: The run folders a sweep makes: ``full``, ``lora<r>``, with ``_seed<s>`` when it has several seeds.
RUN_NAME = re.compile(r"(full|lora\d+)(_seed\d+)?")


def check_sweep(methods: list[str], ranks: list[int], seeds: list[int]) -> None:
    """Refuse a sweep that would train nothing, train one run twice into one folder, or name a run
    for a rank it does not train.

    Raises:
        ConfigError: methods other than lora/full or repeated; with lora, no rank, a rank < 1 or a
            repeated one; no seed, a repeated seed or one out of range.
    """
    if not methods or any(m not in ("lora", "full") for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods must list lora and/or full, once each. Got {','.join(map(str, methods))!r} instead")
    if "lora" in methods:
        if not ranks:
            raise ConfigError("--ranks lists no rank", hint="give comma-separated LoRA ranks, e.g. 8,64")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ConfigError(f"--ranks must be integers >= 1. Got {','.join(map(str, ranks))} instead")
        if len(set(ranks)) != len(ranks):
            raise ConfigError(f"--ranks repeats a rank ({','.join(map(str, ranks))}): both runs would go to one folder",
                              hint="list each rank once")
    if not seeds:
        raise ConfigError("--seeds lists no seed", hint="give comma-separated seeds, e.g. 0,1")
    for seed in seeds:
        check_seed(seed, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed ({','.join(map(str, seeds))}): both runs would go to one folder",
                          hint="list each seed once")


def clear_sweep_outputs(root: Path) -> None:
    """Delete what an earlier sweep wrote in ``root``: ``sweep.json``, the ``analysis/diff_*`` and
    ``analysis/compare_*`` folders and the run files of its run folders (``full``, ``lora<r>``...);
    nothing else (a folder left empty goes too)."""
    for name in ("sweep.json", SWEEP_OPTIONS):
        (root / name).unlink(missing_ok=True)
    analysis = root / "analysis"
    folders = [d for d in sorted(root.iterdir()) if RUN_NAME.fullmatch(d.name) and d.is_dir() and not d.is_symlink()]
    for d in sorted(analysis.iterdir()) if analysis.is_dir() and not analysis.is_symlink() else []:
        if (d.is_dir() and not d.is_symlink() and d.name.startswith(("diff_", "compare_"))
                and any((d / n).is_file() for n in ("results.json", "compare.json", "results.jsonl", "compare.jsonl"))):
            shutil.rmtree(d)  # spectra diff / compare output folders, named by the sweep
    for d in folders:
        clear_run_outputs(d)
    for d in [*folders, analysis]:
        with contextlib.suppress(OSError):
            d.rmdir()  # only when nothing else is in it


def _refuse_inputs_in_sweep_folders(root: Path, inputs: dict[str, str | None]) -> None:
    """Refuse ``--force`` when an input lies in a folder of ``root`` that :func:`clear_sweep_outputs`
    clears or a run writes (``full``, ``lora<r>``…, ``analysis``): re-sweeping from an earlier sweep's
    full run (``--base runs/full --out runs``) deleted that model before any run could refuse it."""
    folders = [d for d in root.iterdir() if (RUN_NAME.fullmatch(d.name) or d.name == "analysis") and d.is_dir()]
    for option, src in inputs.items():
        if src is None:
            continue
        where = Path(os.path.realpath(src))
        for d in folders:
            real = Path(os.path.realpath(d))
            if where == real or real in where.parents:
                raise ConfigError(f"{option} {src} lies in {d}, a folder of an earlier sweep that --force would clear",
                                  path=root, hint=f"move {src} out of {root}, or choose another --out")
    for d in folders:  # a run folder no sweep wrote (a model or adapter copied there): not cleared as a run's
        if d.name != "analysis" and (foreign := foreign_outputs(d)):
            raise ConfigError(f"{d} holds {foreign[0].name}, which no spectra train run wrote (no train_config.json): "
                              "--force deletes only an earlier sweep's files", path=root,
                              hint=f"move {d.name} out of {root}, or choose another --out")


def sweep(base: str, data: str, out: str, *, methods: list[str], ranks: list[int], seeds: list[int] | None = None,
          eval_source: str | None = None, callback: Callable[[str, dict], None] | None = None, force: bool = False,
          resume: bool = False, **train_kwargs) -> dict:
    """Several reference runs on one base and dataset, then ``spectra diff`` of each and, within each
    seed, ``compare`` of every LoRA run with the full run (if any) and of consecutive LoRA ranks
    (ascending).

    Args:
        base, data, out, eval_source: as :class:`TrainConfig`; runs go to ``out/<name>``.
        methods: ``["lora", "full"]`` or a subset; ranks: LoRA ranks (>= 1, each once); seeds: one
            run per method and rank per seed (default [0]; each once).
        callback: ``callback(run_name, log_record)`` as runs progress.
        force: write into a folder that is not empty, first deleting what an earlier sweep wrote
            (:func:`clear_sweep_outputs`).
        resume: finish an interrupted sweep in ``out`` started with the same options (recorded in
            :data:`~spectra.training_inputs.SWEEP_OPTIONS`): keep its finished runs and analyses, train its
            unfinished runs afresh (clearing only their folders), then the missing analyses and ``sweep.json``.
        train_kwargs: any other :class:`TrainConfig` field (steps, lr, batch, seq_len…), for every run.

    Returns:
        ``{"runs": {name: TrainSummary dict}, "diffs": {name: folder}, "compares": {name: folder}}``;
        also written to ``out/sweep.json``.

    Raises:
        ConfigError: as :func:`check_sweep`, ``out`` not empty without ``force`` or ``resume``, both given, or
            ``resume`` of a sweep started with other options.
    """
    root = Path(out)
    seeds = [0] if seeds is None else seeds
    check_sweep(methods, ranks if "lora" in methods else [], seeds)
    if force and resume:
        raise ConfigError("--force deletes the finished runs that --resume keeps", hint="pass one of them")
    refuse_file_in_path(root)
    used = root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir())
    if used:
        refuse_if_held(root)  # a live sweep's folder: not "pass --force", which would delete its files
    if used and not (force or resume):
        raise ConfigError("the output folder is not empty", path=root, hint="choose an empty or new folder, pass --resume "
                          "to finish an interrupted sweep there, or --force to delete what an earlier sweep wrote")
    # what every run shares (defaults filled in, paths resolved): --resume finishes only a sweep started so
    shared = run_fields(asdict(TrainConfig(base=base, data=data, out=str(root), method="full", eval_source=eval_source,
                                           **train_kwargs)))
    options = {"methods": sorted(methods), "ranks": sorted(ranks) if "lora" in methods else [], "seeds": sorted(seeds),
               **{k: v for k, v in shared.items() if k not in ("method", "rank", "seed")}}
    texts = {str(p): data_fingerprint(p) for p in (data, eval_source) if p}  # a folder: each file it reads
    inputs = lambda: {"inputs": inputs_fingerprint([open_checkpoint(base)], texts)}  # the same paths, other weights or text
    if resume and used:
        check_sweep_options(root, options | inputs())
    if "lora" in methods and ranks:  # before the first run: a rank no matrix can hold fails now, not runs later
        _check_rank_early(TrainConfig(base=base, data=data, out=str(root / "lora"), method="lora", rank=max(ranks),
                                      **train_kwargs), "--ranks")
    runs: dict[str, dict] = {}
    pairs: list[tuple[str, str]] = []
    with folder_lock(root):
        if force:
            _refuse_inputs_in_sweep_folders(root, {"--base": base, "--data": data, "--eval-source": eval_source})
            clear_sweep_outputs(root)
        if not (resume and used):
            atomic_write_text(root / SWEEP_OPTIONS, json.dumps(options | inputs(), indent=2, sort_keys=True) + "\n")
        fresh: set[str] = set()  # the runs trained now: their analyses are redone
        for seed in seeds:
            suffix = f"_seed{seed}" if len(seeds) > 1 else ""
            full = [(f"full{suffix}", "full", 1)] if "full" in methods else []
            loras = [(f"lora{r}{suffix}", "lora", r) for r in sorted(ranks)] if "lora" in methods else []
            for name, method, rank in full + loras:
                config = TrainConfig(base=base, data=data, out=str(root / name), method=method, rank=rank, seed=seed,
                                     eval_source=eval_source, **train_kwargs)
                expected = {**run_fields(asdict(config)), **(dict.fromkeys(LORA_ONLY) if method == "full" else {})}
                kept = finished_run(root / name, expected) if resume else None
                if kept is None:  # an unfinished run starts again from its first step, in a cleared folder
                    fresh.add(name)
                    kept = asdict(train(config, callback=(lambda r, n=name: callback(n, r)) if callback else None,
                                        force=force or resume))
                runs[name] = {**kept, "out": str(root / name)}
            # within one seed: every LoRA run against the full run, then consecutive ranks
            pairs += [(a, full[0][0]) for a, _, _ in loras] if full else []
            pairs += [(a[0], b[0]) for a, b in zip(loras, loras[1:])]
        diffs = {}
        for name in runs:
            if not (resume and name not in fresh and analysis_written(root / "analysis" / f"diff_{name}" / "results.json")):
                diff(base, str(root / name), out_dir=root / "analysis" / f"diff_{name}")
            diffs[name] = str(root / "analysis" / f"diff_{name}")
        compares = {}
        for a, b in pairs:
            folder = root / "analysis" / f"compare_{a}_vs_{b}"
            if not (resume and not {a, b} & fresh and analysis_written(folder / "compare.json")):
                compare(str(root / a), str(root / b), base=base, out_dir=folder)
            compares[f"{a}_vs_{b}"] = str(folder)
        doc = {"runs": runs, "diffs": diffs, "compares": compares}
        atomic_write_text(root / "sweep.json", json.dumps(finite_or_null(doc), indent=2, sort_keys=True) + "\n")
    return doc


__all__ = ["HOLDOUT_POOL", "HOLDOUT_SEED", "LORA_ONLY", "RUN_NAME", "TOKENIZER_FILES", "ByteTokenizer",
           "LoraSetup", "TrainConfig", "TrainSummary", "check_sweep", "check_vocabulary", "clear_sweep_outputs", "held_out_digest",
           "held_out_loss", "holdout_split", "load_tokenizer", "read_examples", "sweep", "token_blocks", "train"]
