"""What a reference training run (:mod:`spectra.training`) reads and where it writes, checked before
anything is written: the data (regular UTF-8 text files, JSONL), the tokenizer, the model folder
(``config.json``, weights, vocabulary, positions), the device, the seed, the LoRA target modules and
the output folder (never the base, never a previous run's folder without ``--force``).

Every refusal is a one-line :class:`spectra.errors.SpectraError` naming the file or option and what
to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError, SpectraError, output_error
from spectra.io.checkpoint import WEIGHT_FILE_SUFFIXES
from spectra.io.files import LOCK_NAME, refuse_if_held, same_file
from spectra.io.jsonfile import load_json, load_jsonl
from spectra.io.paths import file_kind, open_regular, refuse_empty_path
from spectra.io.text_data import TEXT_SUFFIXES, text_files
from spectra.linalg import validate_device
from spectra.load_names import refuse_partial_load
from spectra.plan import free_memory

#: Largest share of a data file's characters that may be undecodable UTF-8 (read as U+FFFD): above
#: it the file is binary or in another encoding, and training on it would learn replacement marks.
MAX_UNDECODABLE = 0.01
#: Share of NUL characters above which a file is refused: UTF-16/32 text is ~50-75% NUL; a stray NUL in prose is not.
MAX_NUL = 0.1

#: The files that make a model folder's tokenizer (without any of them, text is read as UTF-8 bytes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

#: Weight files transformers loads a model folder from (one of them must be there).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

#: Every file a training run writes into its folder (the adapter or model, its tokenizer, the logs,
#: the in-training trace): what ``--force`` removes before a new run, and what makes a folder "used".
RUN_FILES = ("train_config.json", "train_log.jsonl", "train_summary.json", "trace.jsonl", "trace_first.npz",
             "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
             "config.json", "generation_config.json", *WEIGHT_FILES,
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
             "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: ... and the shards of a large full fine-tune.
RUN_GLOBS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")

#: Seeds run from 0 to this (torch seeds are 64-bit; larger Python ints overflow deep inside torch).
MAX_SEED = 2**63 - 1


# ---- data -------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """The UTF-8 text of a regular file; up to :data:`MAX_UNDECODABLE` of it may be undecodable
    (read as U+FFFD).

    Raises:
        SpectraError: not a regular file (a FIFO would block the read forever), unreadable, or
            binary / not UTF-8.
    """
    return read_text_prefix(path, None)[0]


def is_jsonl(path: Path) -> bool:
    """Whether a data file is read as JSON lines (``.jsonl`` in any case: ``d.JSONL`` too)."""
    return path.suffix.lower() == ".jsonl"


def read_text_prefix(path: str | Path, max_bytes: int | None) -> tuple[str, bool]:
    """``(text, whole)``: the UTF-8 text of the first ``max_bytes`` bytes of a regular file (all of
    it when None) and whether that is the whole file. A character cut by the limit is left out, not
    read as U+FFFD; the undecodable share is checked as :func:`read_text` does.

    Raises:
        SpectraError: as :func:`read_text`.
    """
    import codecs

    try:
        fd = open_regular(path)  # O_NONBLOCK + fstat: a FIFO or device is refused, never waited on
    except SpectraError as exc:
        raise SpectraError(exc.message, path=path, hint="--data, --eval-source and --eval read regular text files, "
                                                        "folders of them, or JSONL") from None
    if max_bytes is not None:  # a limit from huge options (--eval-blocks 1e20): no more than the file holds
        max_bytes = min(max_bytes, os.fstat(fd).st_size + 1)
    with os.fdopen(fd, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
        whole = max_bytes is None or len(data) < max_bytes or not f.read(1)
    for bom, enc in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
                     (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):  # every other byte NUL: its few undecodable bytes passed the share below
            raise SpectraError(f"is {enc} text (byte order mark {bom.hex(' ').upper()}), not UTF-8", path=path,
                               hint=f"convert it to UTF-8 (e.g. iconv -f {enc.lower()} -t utf-8)")
    # an incremental decoder keeps a multi-byte character cut at the limit pending instead of marking it
    text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace").decode(data, final=whole)
    if text and text.count("\0") / len(text) > MAX_NUL:  # UTF-16/32 without a mark (~50-75% NUL), or binary
        raise SpectraError(f"is not UTF-8 text: {text.count(chr(0)) / len(text):.0%} of its characters are NUL (a binary "
                           "file, or UTF-16/32 text)", path=path, hint="convert it to UTF-8 or leave it out")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())  # replacement marks the file did not hold itself
    if text and bad / len(text) > MAX_UNDECODABLE:
        raise SpectraError(f"is not UTF-8 text: {bad / len(text):.0%} of its characters do not decode (a binary "
                           "file, or text in another encoding)", path=path,
                           hint=f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out; up to "
                                f"{MAX_UNDECODABLE:.0%} undecodable bytes are read as U+FFFD")
    return text, whole


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, text)`` pairs: prompt is "" for plain text (loss on everything). A folder gives its
    text/code files (by suffix) and its JSONL files, read as a JSONL file is.

    Raises:
        SpectraError: no such path, not a regular file or folder, a model folder (its config and
            tokenizer JSON are not data), not UTF-8 text, no text in it, or JSONL lines without
            ``text`` or ``prompt``/``response``.
    """
    refuse_empty_path(path, "--data is an empty path")
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise SpectraError("no such file or folder", path=p) from None
    except OSError as exc:
        raise SpectraError(f"cannot read it ({exc.strerror or type(exc).__name__})", path=p) from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise SpectraError(f"is {file_kind(st.st_mode)}, not a regular file or folder", path=p,
                           hint="pass a text file, a folder of text/code files or JSONL")
    if stat.S_ISDIR(st.st_mode):
        weights = _model_weights(p)
        if weights:  # its config and tokenizer JSON would be read as text
            raise SpectraError(f"is a model folder ({', '.join(sorted(weights))}), not data", path=p,
                               hint="pass a text file, a folder of text/code files or JSONL")
        found, files = text_files(p)
        # a model folder under it too (a folder of models passed as data): its JSON files are no text to train on
        if nested := sorted({f.parent for f in files if f.name == "config.json" and _model_weights(f.parent)}):
            raise SpectraError(f"holds a model folder ({nested[0]}{f' and {len(nested) - 1} more' if len(nested) > 1 else ''}), "
                               "whose config and tokenizer JSON would be read as text", path=p,
                               hint="pass the text alone: a file, or a folder of text/code files or JSONL without models in it")
        out = [pair for f in files for pair in (_jsonl_examples(f) if is_jsonl(f) else [("", read_text(f))])]
        if not any(b.strip() for _, b in out):
            others = [f.name for f in found if f not in files]
            raise SpectraError("no text found" + (f": {len(others)} file(s) of other suffixes left out (e.g. {', '.join(others[:3])})"
                                                   if others else ""), path=p,
                               hint=f"a folder's text is read from {', '.join(sorted(TEXT_SUFFIXES))} and .jsonl files")
    elif is_jsonl(p):
        out = _jsonl_examples(p)
    else:
        out = [("", read_text(p))]
    out = [(a, b) for a, b in out if b.strip()]
    if not out:
        raise SpectraError("no text found", path=p, hint="pass a text file, a folder of text/code files or JSONL")
    return out


def _model_weights(folder: Path) -> list[str]:
    """Up to three weight files of ``folder`` when it holds a ``config.json`` too (a model folder), else none."""
    try:
        if not (folder / "config.json").is_file():
            return []
        return sorted(f.name for f in folder.iterdir() if f.suffix in (*WEIGHT_FILE_SUFFIXES, ".gguf"))[:3]
    except OSError:  # unreadable: not known to be a model folder (reading its text says what is wrong)
        return []


def _jsonl_examples(p: Path) -> list[tuple[str, str]]:
    """``(prompt, text)`` of each line of a JSONL file: ``text``, or ``prompt`` and ``response``."""
    out = []
    # bounded size and nesting, one-line errors naming the line (spectra.io.jsonfile)
    for i, rec in enumerate(load_jsonl(p, what=p.name, error=ConfigError), start=1):
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            out.append(("", rec["text"]))
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            out.append((rec["prompt"], rec["response"]))
        else:
            raise SpectraError(f"line {i} has neither a text field nor prompt/response fields", path=p)
    return out


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255 (the demo's models have a 256-token vocabulary)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(base: str | Path, kind: str = "auto"):
    """The model folder's tokenizer (``kind="auto"`` and tokenizer files present), else bytes.

    Raises:
        SpectraError: the folder's tokenizer files cannot be loaded.
    """
    folder = Path(base)
    has_files = any((folder / n).exists() for n in TOKENIZER_FILES)
    if kind == "bytes" or (kind == "auto" and not has_files):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception on a corrupt file; any failure here is the files'
        raise SpectraError(f"cannot load the tokenizer: {first_line(exc)}", path=folder,
                           hint=f"fix or remove its tokenizer files ({', '.join(TOKENIZER_FILES)}); without them "
                                "the text is read as UTF-8 bytes") from None


def encode_text(tok, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added), by a transformers tokenizer or :class:`ByteTokenizer`."""
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def token_blocks(examples: list[tuple[str, str]], tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples and cut ``(n, seq_len)`` blocks of ids and of labels (-100 on prompts).

    Blocks without a single target token (all prompt: the causal loss, which never predicts a block's
    first token, would be 0/0 = NaN on them) are left out.

    Raises:
        SpectraError: fewer than two blocks with target tokens.
    """
    ids: list[int] = []
    labels: list[int] = []
    for prompt, text in examples:
        p = encode_text(tok, prompt) if prompt else []
        t = encode_text(tok, text + "\n")
        ids += p + t
        labels += [-100] * len(p) + t
    n = len(ids) // seq_len
    if n < 2:
        raise SpectraError(f"the data holds {len(ids)} tokens, fewer than two blocks of {seq_len}",
                           hint="give more data or a smaller --seq-len")
    id_blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    label_blocks = torch.tensor(labels[: n * seq_len]).view(n, seq_len)
    keep = (label_blocks[:, 1:] != -100).any(dim=1)
    if int(keep.sum()) < 2:
        raise SpectraError(f"only {int(keep.sum())} of the data's {n} blocks of {seq_len} tokens hold a response token: "
                           "the rest are all prompt, which is not trained on", hint="give longer responses or shorter "
                           "prompts, or a larger --seq-len")
    return id_blocks[keep], label_blocks[keep]


def leading_blocks(path: str | Path, tok, seq_len: int, blocks: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The first ``blocks`` blocks of :func:`token_blocks` of a text file at ``path`` (None: all of them),
    and whether the whole data was read. The file is read only as far as they need (a prefix grown while
    the tokenizer needs more, one block past them so that a token merged across the cut is not among
    them): the blocks are those of the whole file. A folder or JSONL is read whole, and all its blocks
    are returned.

    Raises:
        SpectraError: as :func:`read_examples` and :func:`token_blocks`, naming ``path`` (``--data`` and
            ``--eval-source`` would otherwise read alike).
    """
    try:
        return _leading_blocks(Path(path), tok, seq_len, blocks)
    except SpectraError as exc:
        if exc.path is not None:
            raise
        raise type(exc)(exc.message, path=path, tensor=exc.tensor, hint=exc.hint) from None


def _leading_blocks(p: Path, tok, seq_len: int, blocks: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if blocks is None or p.is_dir() or is_jsonl(p):  # read whole: every block is kept (nothing to save)
        ids, labels = token_blocks(read_examples(p), tok, seq_len)
        return ids, labels, True
    size = max(1 << 16, 8 * seq_len * (blocks + 1))
    while True:
        body, whole = read_text_prefix(p, size)
        if whole:  # as read_examples reads a whole file
            ids, labels = token_blocks(read_examples(p) if not body.strip() else [("", body)], tok, seq_len)
            return ids[:blocks], labels[:blocks], len(ids) <= blocks
        with contextlib.suppress(SpectraError):  # too few blocks in this prefix: read more
            ids, labels = token_blocks([("", body)], tok, seq_len)
            if len(ids) > blocks:
                return ids[:blocks], labels[:blocks], False
        size *= 4


# ---- the model folder ----------------------------------------------------------------------------------
def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (third-party messages run over many lines)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_config(base: str | Path) -> dict[str, Any]:
    """``config.json`` of a local causal-LM folder, checked as transformers needs it: a JSON object
    naming its ``model_type``, beside a weights file (:data:`WEIGHT_FILES`).

    Raises:
        SpectraError: not a folder with config.json, config.json unreadable or without model_type,
            or no weights file.
    """
    folder = Path(base)
    if not (folder / "config.json").is_file():
        raise SpectraError("not a Hugging Face model folder (no config.json)", path=folder,
                           hint="pass a local causal-LM folder; spectra never downloads models")
    cfg = load_json(folder / "config.json", what="config.json", error=ConfigError)  # bounded, one-line errors
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ConfigError("config.json names no model_type, so transformers cannot tell the architecture",
                          path=folder / "config.json", hint='add the model\'s "model_type" (e.g. "llama"), as '
                                                            "save_pretrained writes it")
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        raise ConfigError(f"no weights file ({', '.join(WEIGHT_FILES)})", path=folder,
                          hint="pass a model folder written by save_pretrained, weights included")
    return cfg


def _setting(cfg: dict[str, Any], *keys: str) -> tuple[str, int] | None:
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict):
            for k in keys:
                if isinstance(c.get(k), int) and not isinstance(c.get(k), bool):
                    return k, int(c[k])
    return None


def config_int(cfg: dict[str, Any], key: str) -> int | None:
    """An integer setting of config.json (``vocab_size``…), or of its ``text_config``; None when absent."""
    found = _setting(cfg, key)
    return None if found is None else found[1]


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
    found = _setting(cfg, "vocab_size") if isinstance(cfg, dict) else None
    top = int(ids.max()) if ids.numel() else -1
    if found is not None and top >= found[1]:
        vocab = found[1]
        how = (f"the folder has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so the text is read "
               "as UTF-8 bytes, ids 0-255" if isinstance(tok, ByteTokenizer) else f"its tokenizer ({type(tok).__name__})")
        raise SpectraError(f"token id {top} is outside the model's vocabulary of {vocab} (config.json vocab_size): {how}",
                           path=base, hint="put the model's tokenizer files in its folder, or use a model whose vocabulary "
                                           "holds the tokens")


#: Most tokens one optimiser step may take (batch × seq_len): below int32/64 overflow, whatever the memory.
MAX_STEP_TOKENS = 2**31


def check_step_memory(batch: int, seq_len: int, cfg: dict[str, Any], device: torch.device) -> None:
    """Refuse a step whose float32 logits alone (with their log-softmax and gradient: 3 × batch × seq_len × vocab × 4
    bytes, a lower bound of what the step holds) exceed the memory left: ``--batch 100000`` grew to 23 GB and the
    kernel killed the run with no message.

    Raises:
        ConfigError: naming both options and the sizes.
    """
    if batch * seq_len > MAX_STEP_TOKENS:  # 1e20 overflowed torch.randint (the data's size has no part: blocks are drawn)
        raise ConfigError(f"--batch {batch} × --seq-len {seq_len} is more tokens per step than {MAX_STEP_TOKENS:,}",
                          hint="use a smaller --batch or --seq-len")
    vocab, free = config_int(cfg, "vocab_size"), free_memory(device)  # a vision-language model's in text_config
    if vocab is None or free is None:
        return
    need = 3 * 4 * batch * seq_len * vocab
    if need > free:
        raise ConfigError(f"--batch {batch} × --seq-len {seq_len} needs at least {need / 2**30:.1f} GiB for the logits of one step "
                          f"(vocabulary {vocab:,}), more than the {free / 2**30:.1f} GiB free on {device}",
                          hint="use a smaller --batch or --seq-len")


def check_positions(base: str | Path, cfg: dict[str, Any], seq_len: int, option: str = "--seq-len") -> None:
    """Refuse sequences longer than a learned position table (GPT-2's ``n_positions``, or
    ``max_position_embeddings`` of a model without rotary/ALiBi positions, e.g. OPT, BERT): it has no
    row for them (an IndexError mid-run). Rotary models (Llama, Mistral, Qwen2…) run longer sequences.

    Raises:
        SpectraError: ``seq_len`` above the model's positions.
    """
    # rotary or ALiBi positions have no table: a longer --seq-len runs (a context-extension fine-tune)
    relative = any(k in cfg for k in ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct",
                                      "rotary_emb_base", "alibi")) or cfg.get("position_embedding_type") == "rotary"
    found = _setting(cfg, "n_positions", "n_ctx") or (None if relative else _setting(cfg, "max_position_embeddings"))
    if found is not None and seq_len > found[1]:
        raise SpectraError(f"{option} {seq_len} is longer than the model's {found[1]} positions (config.json {found[0]})",
                           path=base, hint=f"pass {option} {found[1]} or less")


def check_causal_lm(base: str | Path, cfg: dict[str, Any], use: str = "spectra train") -> None:
    """Refuse a model that is not a decoder-only causal LM, whose next-token loss would mean nothing:
    an encoder-decoder (T5, BART) or a type transformers has no causal-LM class for, and an encoder
    (BERT, RoBERTa… without ``is_decoder``), whose bidirectional attention sees the very token it is
    asked to predict (its causal-LM class loads, but the loss "peeks").

    Raises:
        ConfigError: any of these (one line naming config.json and the model type).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = cfg.get("model_type")
    where = Path(base) / "config.json"
    if cfg.get("is_encoder_decoder") or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = "an encoder-decoder model" if cfg.get("is_encoder_decoder") else "not a causal LM transformers knows"
        raise ConfigError(f"{use} needs a decoder-only causal LM; this {kind} model is {what}", path=where,
                          hint="pass a causal-LM folder (Llama, GPT-2, Qwen…)")
    # an encoder with a causal-LM class (BertLMHeadModel…) is causal only when built as a decoder
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not cfg.get("is_decoder"):
        raise ConfigError(f"{use} needs a causal LM; this {kind} model is an encoder (config.json is_decoder is not true): "
                          "its bidirectional attention sees the next token, so its next-token loss would be meaningless",
                          path=where, hint="pass a decoder-only causal LM (Llama, GPT-2, Qwen…)")


def load_model(base: str | Path):
    """``AutoModelForCausalLM`` of a checked folder (:func:`model_config`), offline, no remote code.

    Raises:
        SpectraError: transformers cannot load it (unknown architecture, corrupt weights...).
    """
    import transformers

    def load(**kw: Any) -> tuple[Any, dict]:
        return transformers.AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=False, local_files_only=True,
                                                                 output_loading_info=True, **kw)

    try:
        try:
            model, info = load()
        except RuntimeError as exc:  # shapes config.json builds that the stored tensors do not have: named, not "see the report"
            if "ignore_mismatched_sizes" not in str(exc):
                raise
            refuse_partial_load(base, load(ignore_mismatched_sizes=True)[1])
            raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # transformers' ways of saying "not loadable"
        raise SpectraError(f"transformers cannot load the model: {first_line(exc)}", path=base,
                           hint="pass a local causal-LM folder written by save_pretrained") from None
    refuse_partial_load(base, info)
    return model


# ---- options --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked
    against what this torch can use.

    Raises:
        ConfigError: not a device name, or a device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "mps":  # the same names as every other command (torch read "cuda:128" as cuda:-128)
        validate_device(name)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available to this torch ({torch.__version__})",
                              hint="use --device auto or cpu, or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                              hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ConfigError(f"--device {name}: spectra train runs on cpu or cuda (or mps where available)",
                      hint="use auto, cpu, cuda or cuda:N")


def check_seed(seed: object, option: str = "seed") -> None:
    """Refuse a seed outside 0 … :data:`MAX_SEED` (torch cannot take it).

    Raises:
        ConfigError: not an integer in range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{option} must be an integer from 0 to 2**63-1. Got {seed!r} instead")


def check_positive(value: object, name: str) -> None:
    """Refuse a number that is not finite and > 0 (a learning rate, a LoRA alpha).

    Raises:
        ConfigError: NaN, infinite, zero or negative.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0. Got {value!r} instead")


def check_lr(lr: float) -> None:
    """Refuse a learning rate (finite, > 0, as :func:`check_positive` checked) that is no normal float32 number:
    AdamW steps float32 weights by lr × m/√v, so below ~1.18e-38 (0 or subnormal in float32) no weight moves
    and the run saves its start (exit 0, no sign), above ~3.4e38 the first step is inf.

    Raises:
        ConfigError: ``lr`` outside [1.18e-38, 3.4e38].
    """
    from spectra.metrics import normal_float32

    if not normal_float32(lr):
        f32 = torch.finfo(torch.float32)
        what = ("0 or subnormal in float32: no weight would move (the run would save its start)" if lr < f32.tiny
                else "infinite in float32: the first step would make the weights inf or NaN")
        raise ConfigError(f"--lr {lr:.4g} is {what}", hint=f"use an --lr from {f32.tiny:.3g} to {f32.max:.3g}")


# ---- resuming a sweep ----------------------------------------------------------------------------------
#: A sweep records its options here at its start; ``spectra sweep --resume`` finishes it only with the same ones.
SWEEP_OPTIONS = "sweep_options.json"


def run_fields(doc: dict) -> dict:
    """A run's TrainConfig fields (``asdict`` or its ``train_config.json``) as a sweep compares them: without
    ``out`` (one folder has many spellings), the input paths (base, data, eval_source) resolved."""
    found = {k: v for k, v in doc.items() if k != "out"}
    for k in ("base", "data", "eval_source"):
        if isinstance(found.get(k), str):
            found[k] = os.path.realpath(found[k])
    return found


def _json_or_none(path: Path) -> Any:
    """``path`` parsed, or None when it is missing or unreadable (a run or analysis cut off while writing it)."""
    try:
        return load_json(path, what=path.name, error=ConfigError)
    except (SpectraError, OSError):
        return None


def finished_run(folder: Path, expected: dict) -> dict | None:
    """The ``train_summary.json`` (a :class:`spectra.training.TrainSummary` dict, written after the adapter or
    model) of a finished run in ``folder`` whose ``train_config.json`` holds ``expected`` (:func:`run_fields`);
    None when the run did not finish or ran with other options."""
    summary, config = _json_or_none(folder / "train_summary.json"), _json_or_none(folder / "train_config.json")
    if not (isinstance(summary, dict) and isinstance(config, dict)):
        return None
    have, want = run_fields(config), json.loads(json.dumps(expected))  # as JSON holds them (a tuple is a list there)
    return summary if all(have.get(k) == v for k, v in want.items()) else None


def analysis_written(path: Path) -> bool:
    """Whether a diff's ``results.json`` or a compare's ``compare.json`` is a finished one (a diff rewrites
    its file as it goes, ``complete`` false until the end; a compare writes its own at the end), by a run that
    ended: a lock file left in the folder is a run stopped after its JSON and before its figures (killed)."""
    doc = _json_or_none(path)
    return isinstance(doc, dict) and doc.get("complete", True) is True and not (path.parent / LOCK_NAME).exists()


def check_sweep_options(root: Path, options: dict) -> None:
    """Refuse ``--resume`` of the sweep in ``root`` with other options than it recorded (:data:`SWEEP_OPTIONS`).

    Raises:
        ConfigError: no record, or one whose options differ (the first differing one named).
    """
    recorded = _json_or_none(root / SWEEP_OPTIONS)
    if not isinstance(recorded, dict):
        raise ConfigError(f"--resume: {root} holds no readable {SWEEP_OPTIONS}, so no sweep of this version to finish",
                          path=root, hint="pass --force to delete what an earlier sweep wrote and start again")
    options = json.loads(json.dumps(options))  # as the record holds them (a tuple is a list in JSON)
    for key in sorted(options.keys() | recorded.keys()):
        if options.get(key) != recorded.get(key):
            what = " (a fingerprint of the base's weights, the --data and --eval-source text and spectra's version)" if key == "inputs" else ""
            raise ConfigError(f"--resume: the sweep in {root} was started with {key} {recorded.get(key)!r}, this one "
                              f"has {options.get(key)!r}{what}", path=root,
                              hint=f"rerun with the options in {root / SWEEP_OPTIONS}, or pass --force to start again")


# ---- the output folder ---------------------------------------------------------------------------------
#: Marks a folder as ``spectra demo``'s own: its reruns replace the checkpoints, data and results there.
DEMO_MARK = ".spectra-demo"


def claim_demo_folder(out: str | Path, kind: str = "training") -> None:
    """Make ``out`` the demo's folder, refusing one that holds files the demo did not write: the demo
    replaces its own checkpoints and results in place (a user's model copied to ``out/checkpoints/full`` was overwritten
    without a word). A folder with the mark, or with the training text every full demo writes first (a demo made before
    the mark existed), is the demo's. ``kind`` (``"training"``, ``"synthetic"``) is in the mark: the two write other files.

    Raises:
        ConfigError: ``out`` is a non-empty folder that is not the demo's, or another kind of demo's.
        OutputError: the folder or its mark cannot be written.
    """
    p = Path(out)
    refuse_file_in_path(p)
    ours = (p / DEMO_MARK).is_file() or (p / "checkpoints" / "data" / "source_train.txt").is_file()
    if p.is_dir() and any(p.iterdir()) and not ours:
        raise ConfigError("the folder holds files that spectra demo did not write, and the demo replaces what it "
                          "writes there", path=p, hint="pass a new or empty folder to --out")
    if ours and (was := _demo_kind(p)) not in (None, kind):
        raise ConfigError(f"the folder holds a {was} demo's results; this {kind} demo writes other files, which would sit "
                          "beside them", path=p, hint="pass a new or empty folder to --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        (p / DEMO_MARK).write_text(f"made by spectra demo ({kind}): its reruns replace the files in this folder\n", encoding="utf-8")
    except OSError as exc:
        raise output_error(p, exc) from exc


def _demo_kind(p: Path) -> str | None:
    """The kind of demo in ``p``: as its mark says, or (an older mark) by what lies there; None when nothing tells."""
    try:
        said = (p / DEMO_MARK).read_text(encoding="utf-8", errors="replace")
    except OSError:
        said = ""
    if kind := next((k for k in ("synthetic", "training") if f"({k})" in said), None):
        return kind
    if (p / "summary.json").is_file() or (p / "checkpoints" / "data" / "source_train.txt").is_file():
        return "training"
    return "synthetic" if (p / "results.json").is_file() else None


def refuse_file_in_path(out: str | Path, option: str = "--out") -> None:
    """Refuse an output folder that is a file, or lies inside one (creating it would fail).

    Raises:
        ConfigError: ``out`` or one of its parents is not a folder.
    """
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = f"{q} is not a folder" if q != p else "it exists and is not a folder"
                raise ConfigError(f"{option} cannot be made a folder: {what}", path=p, hint=f"choose a folder for {option}")
            return


def run_outputs(out: Path) -> list[Path]:
    """The files of :data:`RUN_FILES` / :data:`RUN_GLOBS` present in ``out``."""
    if not out.is_dir():
        return []
    found = [out / n for n in RUN_FILES if (out / n).is_file() or (out / n).is_symlink()]
    return found + sorted(p for g in RUN_GLOBS for p in out.glob(g))


def check_out(out: str | Path, *, base: str | Path, inputs: list[str | Path], force: bool) -> None:
    """Refuse an output folder a run must not write: inside a file, the base model's folder (its
    weights would be replaced), the folder of ``inputs`` (the data), an input among the files a run
    writes, or a folder that is not empty unless ``force`` (a new run beside an old one's files
    would mix them: an old adapter beside a new full model is what ``spectra diff`` would read).

    Raises:
        ConfigError: any of these.
    """
    p = Path(out)
    refuse_file_in_path(p)
    if same_file(p, Path(base)):
        raise ConfigError("--out is the base model's folder: the run would overwrite the model it starts from",
                          path=p, hint="choose another folder for --out")
    for src in map(Path, inputs):
        if src.is_dir() and same_file(p, src):  # the run's .json files would be read as data by the next run
            raise ConfigError(f"--out is the data folder {src}: the run's files would mix with the data", path=p,
                              hint="choose another folder for --out")
    written = [Path(base) / n for n in RUN_FILES] + [Path(i) for i in inputs]
    clash = [f for f in run_outputs(p) if any(same_file(f, w) for w in written)]
    if clash:  # a link or a hard link to an input (another spelling of the base folder)
        raise ConfigError(f"--out holds {clash[0].name}, which is the input {next(w for w in written if same_file(clash[0], w))}",
                          path=p, hint="choose another folder for --out")
    present = sorted(q.name for q in p.iterdir() if q.name != LOCK_NAME) if p.is_dir() else []
    if present:
        refuse_if_held(p)  # a live run's folder: not "pass --force", which would delete its files
    if force and (foreign := foreign_outputs(p)):
        raise ConfigError(f"--out holds {foreign[0].name}, which no spectra train run wrote (no train_config.json): "
                          "--force deletes only an earlier run's files", path=p, hint="choose another folder for --out")
    if present and not force:
        listed = ", ".join(present[:3]) + ("…" if len(present) > 3 else "")
        raise ConfigError(f"the output folder is not empty ({listed})", path=p,
                          hint="choose an empty or new folder, or pass --force to delete the files an earlier run wrote there")


def foreign_outputs(out: Path) -> list[Path]:
    """Files of :func:`run_outputs` in a folder no spectra train run wrote (no ``train_config.json``, which
    a run writes before its first step): a downloaded model's ``model.safetensors`` or an adapter, which
    ``--force`` must not delete as if an earlier run's."""
    found = run_outputs(out)
    return [] if not found or (out / "train_config.json").is_file() else found


def clear_run_outputs(out: Path) -> list[str]:
    """Delete the files an earlier run wrote in ``out`` (:func:`run_outputs`; nothing else); returns their names."""
    gone = []
    for f in run_outputs(out):
        f.unlink()
        gone.append(f.name)
    return gone


__all__ = ["MAX_SEED", "MAX_UNDECODABLE", "RUN_FILES", "RUN_GLOBS", "TOKENIZER_FILES", "WEIGHT_FILES", "ByteTokenizer",
           "check_causal_lm", "check_out", "check_positions", "check_positive", "check_seed",
           "check_vocabulary", "clear_run_outputs", "foreign_outputs", "config_int", "first_line", "load_model", "load_tokenizer", "model_config",
           "encode_text", "read_examples", "read_text", "read_text_prefix", "refuse_file_in_path", "resolve_device", "run_outputs", "token_blocks"]
