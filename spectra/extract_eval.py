"""``spectra extract --eval TEXT``: how much of the fine-tune's effect an extracted adapter keeps, as
held-out loss (mean token cross-entropy, nats per token) of the base, the tuned model, base + the
extracted adapter and base + a uniform-rank adapter of the same parameter count.

Needs the ``train`` extra (transformers, peft); models load offline (``local_files_only``) in float32.
Every input is checked by :func:`prepare_eval` before anything is extracted: the models (decoder-only
causal LMs whose config.json matches their weights, positions for ``seq_len``), the tokenizer and the
text. Text is tokenised as ``spectra train`` does (the base folder's tokenizer; when the base folder
has none, the tuned folder's, with a note; else UTF-8 bytes), and only the prefix of a text file that
the scored blocks need is read. The text is cut into blocks of ``seq_len`` tokens; the first
``blocks`` blocks are scored. The loss is the mean over every predicted token (each block's first
token has no prediction), summed in float64. Adapters are scored merged into the base weights
(``merge_and_unload``, as deployed merged): unmerged, a tied output head would keep the base's
weights while an embedding LoRA changes the input side only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError, SpectraError
from spectra.io.adapter import ADAPTER_CONFIG, AdapterConfig, is_adapter

#: Blocks scored per forward pass.
EVAL_BATCH = 8

#: Tokens read beyond the blocks scored: a tokenizer merges across the cut of a text's prefix, so the
#: tokens near the cut may differ from the whole file's; these are never scored.
_MARGIN_TOKENS = 64

#: transformers' ways of saying a folder cannot be loaded (unknown architecture, shapes, corrupt files).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError)


@dataclass
class EvalData:
    """The checked inputs of an evaluation: the token blocks and how they were made.

    Attributes:
        text: the text file (or folder / JSONL) given.
        seq_len: tokens per block.
        ids, labels: ``(blocks, seq_len)`` token ids and labels (-100: not scored).
        tokenizer: ``{"source": "base" | "tuned" | "bytes", "path": folder or None, "class": name}``.
        notes: warnings about the inputs (a tokenizer taken from the tuned folder, bytes for a model
            with a larger vocabulary).
    """

    text: str
    seq_len: int
    ids: torch.Tensor
    labels: torch.Tensor
    tokenizer: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _transformers() -> None:
    try:
        import peft  # noqa: F401 - the extra's presence, checked first
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("--eval needs transformers and peft", hint="pip install 'spectra[train]'") from None


def check_model_folder(folder: str | Path, seq_len: int) -> dict[str, Any]:
    """Check that a model folder loads as a decoder-only causal LM for blocks of ``seq_len`` tokens:
    config.json and weights present, a causal LM (not an encoder, not T5), positions for ``seq_len``,
    and every weight of the shape config.json gives it (a vocab_size that disagrees with the embedding
    rows fails only when transformers loads it). Returns config.json.

    Raises:
        SpectraError: any of these, one line naming the folder (or tensor) and what to do.
    """
    from spectra.training_inputs import check_causal_lm, check_positions, model_config

    if not (Path(folder) / "config.json").is_file():
        raise ConfigError("--eval loads the models with transformers: this is not a model folder with config.json",
                          path=folder, hint="pass model folders as BASE and TUNED, or drop --eval")
    cfg = model_config(folder)
    check_causal_lm(folder, cfg, "--eval")
    check_positions(folder, cfg, seq_len, "--eval-seq-len")
    _check_shapes(Path(folder), cfg)
    return cfg


def _check_shapes(folder: Path, cfg: dict[str, Any]) -> None:
    """Refuse a folder whose weights do not have the shapes its config.json describes: the model is
    built on the meta device (no memory) and its parameters compared with the checkpoint's header."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spectra.io.checkpoint import open_checkpoint
    from spectra.training_inputs import first_line

    try:
        conf = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(conf)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"transformers cannot build a causal LM from this config.json: {first_line(exc)}",
                          path=folder / "config.json", hint="pass a causal-LM folder written by save_pretrained") from None
    if cfg.get("quantization_config"):  # packed quantised weights have other shapes by design
        return
    try:
        have = open_checkpoint(str(folder)).tensors
    except SpectraError:
        return  # an unreadable checkpoint is reported, in its own words, when the model is loaded
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    for name, p in skeleton.named_parameters():
        stored = next((have[n] for n in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if n in have), None)
        if stored is not None and tuple(stored.shape) != tuple(p.shape):
            raise ConfigError(f"the weights hold it as {list(stored.shape)} but config.json describes {list(p.shape)} "
                              "(vocab_size, hidden_size…): transformers cannot load this folder", path=folder,
                              tensor=stored.name, hint="put back the config.json the weights were saved with")


def _tokenizer(base: str | Path, tuned: str | Path, vocab: int | None) -> tuple[Any, dict[str, Any], list[str]]:
    """The tokenizer the text is read with: the base folder's, else the tuned folder's (with a note),
    else UTF-8 bytes (with a note when the model's vocabulary is not bytes)."""
    from spectra.training_inputs import TOKENIZER_FILES, ByteTokenizer, load_tokenizer

    for source, folder in (("base", base), ("tuned", tuned)):
        if any((Path(folder) / n).exists() for n in TOKENIZER_FILES):
            tok = load_tokenizer(folder)
            notes = [] if source == "base" else [
                f"--eval: the base folder {base} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so the text was "
                f"tokenised with the tuned folder's tokenizer ({folder})"]
            return tok, {"source": source, "path": str(folder), "class": type(tok).__name__}, notes
    tok = ByteTokenizer()
    notes = [] if vocab in (None, 256) else [
        f"--eval: neither {base} nor {tuned} has tokenizer files ({', '.join(TOKENIZER_FILES)}), so the text was read as "
        f"UTF-8 bytes (ids 0-255), not as the model's own {vocab}-token vocabulary: the losses are not those of its "
        "usual inputs (put its tokenizer files in the base folder)"]
    return tok, {"source": "bytes", "path": None, "class": "ByteTokenizer"}, notes


def _blocks(text: str | Path, tok: Any, tok_info: dict[str, Any], seq_len: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``blocks`` blocks of ``seq_len`` tokens of the text. A text file is read only as far
    as they need (a bounded prefix, grown while the tokenizer needs more); a folder or JSONL whole."""
    from spectra.training_inputs import encode_text, is_jsonl, read_examples, read_text_prefix, token_blocks

    p = Path(text)
    how = "UTF-8 bytes" if tok_info["source"] == "bytes" else f"the {tok_info['source']} folder's tokenizer"
    short_hint = (f"give a longer text, or a smaller --eval-seq-len (--eval needs 2 blocks of it at least, and scores up "
                  f"to --eval-blocks {blocks})")
    if p.is_dir() or is_jsonl(p):
        try:  # a file's own error (a bad line of a.jsonl in a folder) keeps its path and hint
            examples = read_examples(p)
        except SpectraError as exc:
            raise type(exc)(f"--eval: {exc.message}", path=exc.path or p, tensor=exc.tensor, hint=exc.hint) from None
        try:
            ids, labels = token_blocks(examples, tok, seq_len)
        except SpectraError as exc:  # too little text for the blocks
            raise SpectraError(f"--eval: {exc.message} (--eval-seq-len, read with {how})", path=p, hint=short_hint) from None
        return ids[:blocks], labels[:blocks]
    need = seq_len * blocks + _MARGIN_TOKENS
    size = max(1 << 16, 8 * need)
    while True:
        body, whole = read_text_prefix(p, size)
        ids_list = encode_text(tok, body + "\n" if whole else body)  # as token_blocks reads a whole file
        if whole or len(ids_list) >= need:
            break
        size *= 4  # a tokenizer with long tokens (or text of many bytes per token) needs more
    if not body.strip():
        raise SpectraError("no text found", path=p, hint="--eval needs a text file to score the models on")
    n = min(len(ids_list) // seq_len, blocks)
    if n < 2:
        most = len(ids_list) // 2
        raise SpectraError(f"--eval needs at least 2 blocks of --eval-seq-len {seq_len} tokens ({2 * seq_len}); the text "
                           f"holds {len(ids_list)} tokens read with {how}", path=p,
                           hint=f"give a longer text{f', or pass --eval-seq-len {most} or less' if most >= 2 else ''}")
    ids = torch.tensor(ids_list[: n * seq_len]).view(n, seq_len)
    return ids, ids.clone()


def prepare_eval(base: str | Path, tuned: str | Path, text: str | Path, *, seq_len: int = 128, blocks: int = 32) -> EvalData:
    """Check every input of an evaluation and make its token blocks, before anything is computed:
    the models (:func:`check_model_folder`; ``tuned`` may be an adapter of ``base``), the tokenizer,
    and the text (readable UTF-8, at least two blocks, ids inside the vocabulary).

    Raises:
        ConfigError, SpectraError: one line naming the file and what to do.
    """
    from spectra.training_inputs import check_vocabulary, config_int

    _transformers()
    cfg = check_model_folder(base, seq_len)
    if not is_adapter(tuned):
        check_model_folder(tuned, seq_len)
    tok, info, notes = _tokenizer(base, tuned, config_int(cfg, "vocab_size"))
    ids, labels = _blocks(text, tok, info, seq_len, blocks)
    check_vocabulary(base, tok, ids)
    return EvalData(str(text), seq_len, ids, labels, info, notes)


@torch.no_grad()
def mean_token_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Mean next-token cross-entropy of a causal LM over ``ids`` ``(n, seq_len)`` (labels -100 are
    not scored), in nats per token, accumulated in float64 over batches of :data:`EVAL_BATCH`."""
    model.to(device).eval()
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], EVAL_BATCH):
        x = ids[i : i + EVAL_BATCH].to(device)
        y = labels[i : i + EVAL_BATCH, 1:].to(device)
        logits = model(input_ids=x).logits[:, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def check_causal(model: Any, ids: torch.Tensor, device: torch.device, path: str | Path) -> None:
    """Refuse a model whose predictions at a position change with a later token (bidirectional
    attention): its next-token loss would see the answer. One short forward pass, two inputs that
    differ in their last token only.

    Raises:
        ConfigError: the logits before the last position move.
    """
    model.to(device).eval()
    x = ids[:1, : min(ids.shape[1], 16)].to(device)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % model.get_input_embeddings().num_embeddings
    a, b = (model(input_ids=z).logits[0, :-1].double() for z in (x, y))
    if float((a - b).abs().max()) > 1e-4 * (1.0 + float(a.abs().max())):
        raise ConfigError("the model's predictions for earlier tokens change with a later token: it attends both ways "
                          "(an encoder), so its next-token loss would see the answer", path=path,
                          hint="--eval scores decoder-only causal LMs; drop --eval for this model")


def held_out_losses(base: str, tuned: str, adapters: Mapping[str, str | Path], text: str, *, seq_len: int = 128,
                    blocks: int = 32, device: torch.device | str = "cpu", data: EvalData | None = None) -> dict[str, Any]:
    """Held-out losses of ``base``, ``tuned`` (a model folder or an adapter of ``base``) and ``base`` plus
    each adapter of ``adapters`` (name -> folder) on the text file ``text``.

    Args:
        data: the inputs :func:`prepare_eval` checked already (else checked here).

    Returns:
        ``{"text", "seq_len", "blocks", "tokens", "tokenizer", "scored", "notes", "loss": {"base", "tuned",
        <adapter names>…}, "recovered": {name: (loss_base − loss_name) / (loss_base − loss_tuned)}}``: the
        share of the fine-tune's loss change each adapter reproduces on this text (None when the
        fine-tune did not change the loss); ``scored``: per model, ``"merged"`` (adapter merged into the
        weights), ``"model"`` (a model folder) or why an adapter was scored unmerged.

    Raises:
        ConfigError: transformers or peft missing, a model folder transformers cannot load offline,
            not a causal LM, or an input refused by :func:`prepare_eval`.
    """
    if data is None:
        data = prepare_eval(base, tuned, text, seq_len=seq_len, blocks=blocks)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spectra.load_names import refuse_partial_load
    from spectra.training_inputs import first_line

    device = torch.device(device)
    ids, labels = data.ids, data.labels

    def load(folder: str | Path) -> Any:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                               trust_remote_code=False, output_loading_info=True)
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"--eval: transformers cannot load the model: {first_line(exc)}", path=folder,
                              hint="pass a local causal-LM folder written by save_pretrained, or drop --eval") from None
        refuse_partial_load(folder, info)  # (weights initialised at random would be scored as the model's)
        return model

    def with_adapter(folder: str | Path) -> tuple[Any, str]:
        try:
            model = PeftModel.from_pretrained(load(base), str(folder))
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"--eval: PEFT cannot load the adapter on the base: {first_line(exc)}", path=folder,
                              hint="pass an adapter of BASE, or drop --eval") from None
        if AdapterConfig.from_file(Path(folder) / ADAPTER_CONFIG).ensure_weight_tying:  # peft 0.21 merges it twice
            return model, "unmerged (ensure_weight_tying: PEFT's merge adds a tied embedding's update twice)"
        try:  # merged, as deployed merged: a tied head then follows an embedding LoRA, as it does in the tuned model
            return model.merge_and_unload(), "merged"
        except _LOAD_ERRORS as exc:  # RuntimeError covers PEFT's NotImplemented merges
            return model, f"unmerged (PEFT cannot merge it: {first_line(exc)})"

    model = load(base)
    check_causal(model, ids, device, base)
    losses: dict[str, float] = {"base": mean_token_loss(model, ids, labels, device)}
    scored = {"base": "model"}
    model, scored["tuned"] = with_adapter(tuned) if is_adapter(tuned) else (load(tuned), "model")
    losses["tuned"] = mean_token_loss(model, ids, labels, device)
    del model
    for name, folder in adapters.items():
        model, scored[name] = with_adapter(folder)
        losses[name] = mean_token_loss(model, ids, labels, device)
        del model
    change = losses["base"] - losses["tuned"]
    recovered = {n: ((losses["base"] - v) / change if change != 0 and math.isfinite(change) else None) for n, v in losses.items()
                 if n not in ("base", "tuned")}
    return {"text": str(data.text), "seq_len": data.seq_len, "blocks": int(ids.shape[0]),
            "tokens": int((labels[:, 1:] != -100).sum()), "tokenizer": data.tokenizer, "scored": scored,
            "notes": list(data.notes), "loss": losses, "recovered": recovered}


__all__ = ["EVAL_BATCH", "EvalData", "check_causal", "check_model_folder", "held_out_losses", "mean_token_loss", "prepare_eval"]
