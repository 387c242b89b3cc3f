"""Writing a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads with
no missing or unexpected keys: ``adapter_config.json`` and ``adapter_model.safetensors``.

PEFT's on-disk names (the definitions document, "LoRA adapters"; ``peft.utils.save_and_load``):

- a linear (or GPT-2 ``Conv1D``) module ``M``: ``base_model.model.M.lora_A.weight`` ``(r, in)`` and
  ``base_model.model.M.lora_B.weight`` ``(out, r)``, with ``ΔW = s·B·A`` in ``(out, in)``
  orientation. A ``Conv1D`` stores its weight ``(in, out)``; PEFT's layer for it (``fan_in_fan_out``)
  keeps A and B as above and transposes the product, so the factors are the same;
- an embedding ``M``: ``base_model.model.M.lora_embedding_A`` ``(r, vocab)`` and
  ``…lora_embedding_B`` ``(dim, r)`` (no ``.weight``), with ``ΔW = s·(B·A)ᵀ`` ``(vocab, dim)``;
- ``lora_bias``: ``base_model.model.M.lora_B.bias`` ``(out,)``, added to the bias times s on merge;
- ``modules_to_save`` entry ``M``: each of its tensors whole, ``base_model.model.M.weight`` / ``.bias``;
- a parameter ``M.p`` of ``E`` experts (``target_parameters``, PEFT >= 0.17): ``base_model.model.M.lora_A.weight``
  ``(r·E, in)`` and ``…lora_B.weight`` ``(out, r·E)``, expert e's update ``s·B[:, e::E]·A[e·r:(e+1)·r]`` (PEFT's
  ``ParamWrapper``: A reshaped to ``(E, r, in)``, B to ``(out, r, E)``), in the stored matrix's orientation or its
  transpose where the experts module says ``is_transposed``. Several parameters of one module nest: the keys of a
  parameter carry one ``.base_layer`` per parameter of that module wrapped after it (:func:`param_depths`).

Ranks and alphas: ``r`` and ``lora_alpha`` are the most common rank (or the rank every tied module
must share, see :func:`adapter_config`), and every other module gets its own through
``rank_pattern``/``alpha_pattern`` keyed by its full module path (PEFT matches a key k against a
module name with ``(.*\\.)?(k)$``; a full path matches only itself). ``alpha = r`` per module gives
``s = 1`` (rsLoRA: ``alpha = √r``, since s = alpha/√r).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError
from spectra.io.files import atomic_file, atomic_write_text
from spectra.peft_moe import PeftMoeRules

_PREFIX = "base_model.model."
#: ``config.json`` architecture suffix -> PEFT ``task_type`` (the PeftModel subclass it loads with).
TASK_TYPES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("WithLMHeadModel", "SEQ_2_SEQ_LM"), ("LMHeadModel", "CAUSAL_LM"), ("Model", "FEATURE_EXTRACTION"),
)

#: Every ``task_type`` PEFT's ``LoraConfig`` takes (its ``TaskType`` enum).
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def check_task_type(task_type: str | None, option: str = "task_type", *, also: tuple[str, ...] = ()) -> None:
    """Refuse a ``task_type`` PEFT would not load (``LoraConfig`` raises on it): None, one of
    :data:`PEFT_TASK_TYPES`, or one of ``also`` (e.g. ``"auto"``).

    Raises:
        ConfigError: any other value.
    """
    if task_type is not None and task_type not in (*also, *PEFT_TASK_TYPES):
        raise ConfigError(f"{option} must be none or one of {', '.join(PEFT_TASK_TYPES)}"
                          f"{' (or ' + ' or '.join(also) + ')' if also else ''}. Got {task_type!r} instead")


@dataclass
class LoraFactors:
    """One adapted module, as :func:`adapter_tensors` writes it.

    Attributes:
        module: the module path (the base tensor name without ``.weight``).
        B: ``(out, r)`` and A: ``(r, in)``, with ``ΔW ≈ B·A`` in ``(out, in)`` orientation at scale 1
            (embeddings: ``(vocab, r)`` and ``(r, dim)``, ΔW in its stored ``(vocab, dim)`` layout).
        embedding: an ``nn.Embedding`` (written as ``lora_embedding_A/B``).
        bias: ``lora_B.bias`` ``(out,)`` (the bias update at scale 1), or None.
    """

    module: str
    B: torch.Tensor
    A: torch.Tensor
    embedding: bool = False
    bias: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


def lora_tensors(m: LoraFactors) -> list[tuple[str, torch.Tensor]]:
    """The ``adapter_model.safetensors`` entries of one module, in PEFT's names and layouts (module
    docstring), in the order :func:`lora_layout` gives."""
    if m.embedding:  # ΔW (vocab, dim) = B·A  =  (B_p·A_p)ᵀ  with  A_p = Bᵀ (r, vocab), B_p = Aᵀ (dim, r)
        return [(f"{_PREFIX}{m.module}.lora_embedding_A", m.B.mT), (f"{_PREFIX}{m.module}.lora_embedding_B", m.A.mT)]
    out = [(f"{_PREFIX}{m.module}.lora_A.weight", m.A), (f"{_PREFIX}{m.module}.lora_B.weight", m.B)]
    if m.bias is not None:
        out.append((f"{_PREFIX}{m.module}.lora_B.bias", m.bias))
    return out


def lora_layout(module: str, r: int, shape: tuple[int, int], *, embedding: bool = False, bias: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of :func:`lora_tensors` for a module of ``(out, in)`` ``shape`` at rank r,
    known before any factor is loaded (the file's header is written first).

    >>> lora_layout("m", 2, (5, 3), bias=True)
    [('base_model.model.m.lora_A.weight', (2, 3)), ('base_model.model.m.lora_B.weight', (5, 2)), ('base_model.model.m.lora_B.bias', (5,))]
    """
    out_dim, in_dim = shape
    if embedding:
        return [(f"{_PREFIX}{module}.lora_embedding_A", (r, out_dim)), (f"{_PREFIX}{module}.lora_embedding_B", (in_dim, r))]
    return [(f"{_PREFIX}{module}.lora_A.weight", (r, in_dim)), (f"{_PREFIX}{module}.lora_B.weight", (out_dim, r))] + (
        [(f"{_PREFIX}{module}.lora_B.bias", (out_dim,))] if bias else [])


def param_depths(params: Iterable[str]) -> dict[str, int]:
    """``{parameter path: its keys' base_layer depth}`` for the ``target_parameters`` LoRAs of ``params``: PEFT wraps a
    module's parameters in their registration order, each wrapper around the last, so the first wrapped is the deepest.
    Every experts module of transformers >= 5 (Mixtral, gpt-oss, Llama-4, Qwen2/3-MoE, OLMoE, PhiMoE, GraniteMoE, MiniMax,
    Qwen3-Next) registers ``gate_up_proj`` before ``down_proj``: a ``down`` parameter is taken as registered last.

    >>> param_depths(["m.experts.down_proj", "m.experts.gate_up_proj", "n.experts.gate_up_proj"])
    {'m.experts.down_proj': 0, 'm.experts.gate_up_proj': 1, 'n.experts.gate_up_proj': 0}
    """
    by_module: dict[str, list[str]] = {}
    for p in params:
        by_module.setdefault(p.rpartition(".")[0], []).append(p)
    depths = {}
    for group in by_module.values():
        ordered = sorted(group, key=lambda q: ("down" in q.rpartition(".")[2], q))
        depths.update({q: len(ordered) - 1 - i for i, q in enumerate(ordered)})
    return {p: depths[p] for p in params}


def param_lora_layout(param: str, r: int, experts: int, shape: tuple[int, int], depth: int, *,
                      bias: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the ``target_parameters`` LoRA of parameter ``param`` (``module.name``) of ``experts``
    experts, each ``shape`` ``(out, in)`` in PEFT's orientation, at rank r (module docstring).

    >>> param_lora_layout("m.experts.gate_up_proj", 2, 3, (8, 4), 1)
    [('base_model.model.m.experts.base_layer.lora_A.weight', (6, 4)), ('base_model.model.m.experts.base_layer.lora_B.weight', (8, 6))]
    """
    stem = f"{_PREFIX}{param.rpartition('.')[0]}{'.base_layer' * depth}"
    return [(f"{stem}.lora_A.weight", (r * experts, shape[1])), (f"{stem}.lora_B.weight", (shape[0], r * experts))] + (
        [(f"{stem}.lora_B.bias", (shape[0],))] if bias else [])


def param_lora_tensors(factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None], r: int, shape: tuple[int, int],
                       *, bias: bool = False) -> list[torch.Tensor]:
    """The tensors of :func:`param_lora_layout`: ``factors[e]`` is expert e's ``(B (out, r), A (r, in))`` in PEFT's
    orientation, or None for an expert left at zero (B = 0: no update). A is ``(r·E, in)`` with expert e's rows
    ``e·r…(e+1)·r``; B ``(out, r·E)`` with its columns ``e, e + E, …`` (PEFT's interleave); a bias is zero."""
    experts = len(factors)
    first = next((f for f in factors if f is not None), None)
    dtype = first[0].dtype if first is not None else torch.float32
    A = torch.zeros(r * experts, shape[1], dtype=dtype)
    B = torch.zeros(shape[0], r * experts, dtype=dtype)
    for e, f in enumerate(factors):
        if f is not None:
            B[:, e::experts], A[e * r:(e + 1) * r] = f[0], f[1]
    return [A, B] + ([torch.zeros(shape[0], dtype=dtype)] if bias else [])


def saved_name(name: str) -> str:
    """The key of a ``modules_to_save`` tensor (its name in the base model) in the adapter file."""
    return _PREFIX + name


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: str | Path, layout: Sequence[tuple[str, tuple[int, ...]]], tensors: Iterable[torch.Tensor],
                      dtype: torch.dtype, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a ``.safetensors`` file one tensor at a time: the header from ``layout`` (names and
    shapes, every tensor in ``dtype``), then each tensor of ``tensors`` in that order, cast to
    ``dtype``. Memory stays at one tensor, whatever the file's size. Atomic: a temporary file in the
    same folder, fsync, rename.

    Raises:
        ValueError: a tensor's shape differs from its layout entry, or the counts differ.
        OutputError: the file cannot be written; ``path`` is unchanged.
    """
    import struct

    item = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape in layout:
        n = math.prod(shape) * item
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format recommends
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape), t in zip(layout, tensors, strict=True):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor {name} must have shape {tuple(shape)}. Got {tuple(t.shape)} instead.")
            f.write(t.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
    return Path(path)


def _module_tree(modules: Iterable[str]) -> set[str]:
    """Every module path of a model given the paths of its matrix-holding modules: those and their
    ancestors (``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``), which PEFT's name matching meets too."""
    tree: set[str] = set()
    for m in modules:
        parts = m.split(".")
        tree.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return tree


def target_modules(adapted: Sequence[str], all_modules: Iterable[str], experts: PeftMoeRules | None = None) -> list[str]:
    """``target_modules`` for PEFT: for each adapted module its last name (``q_proj``; for an
    ``nn.Sequential`` child such as ``ffn.0`` the shortest ending that starts with a name) when that
    names only adapted modules, else its full path; a per-expert module PEFT converts to its LoRA on
    transformers ≥ 5's fused experts (``experts``: the model's rules) is named ``…experts.<name>``
    instead of its full path (:meth:`spectra.peft_moe.PeftMoeRules.expert_target`).

    PEFT adapts a module whose name equals an entry or ends with ``"." + entry``, containers included:
    a short entry that also named a module left out (a layer excluded with ``--layers``) would give PEFT
    a LoRA layer with no weights in the file, and CTRL's ``ffn.0`` written as ``0`` named every decoder
    layer ``h.0`` (PEFT refuses to wrap a container). A full path that still ends another module's path
    is fenced off by :func:`exclude_modules`.

    >>> target_modules(["a.0.q", "a.1.q", "a.0.k"], ["a.0.q", "a.1.q", "a.0.k", "a.1.k"])
    ['a.0.k', 'q']
    >>> target_modules(["h.0.ffn.0", "h.1.ffn.0"], ["h.0.ffn.0", "h.1.ffn.0", "h.0.ffn.2", "h.1.ffn.2"])
    ['ffn.0']
    >>> target_modules(["l.1.experts.0.up", "l.1.experts.1.up"], ["l.0.up", "l.1.experts.0.up", "l.1.experts.1.up"],
    ...                PeftMoeRules("olmoe", converted=frozenset({"up"})))
    ['l.1.experts.up']
    """
    adapted_set = set(adapted)
    # an entry is safe when it ends no module left out (containers included): one pass, linear in the modules
    taken = {e for m in _module_tree([*all_modules, *adapted_set]) - adapted_set for e in _endings(m)}
    out: set[str] = set()
    for m in adapted_set:
        parts = m.split(".")
        # the last name (``q_proj``); for an ``nn.Sequential`` child (``ffn.0``) the shortest ending that
        # starts with a name; else the full path, as people and serving engines expect
        endings = ([".".join(parts[-k:]) for k in range(2, len(parts)) if not parts[-k].isdigit()][:1]
                   if parts[-1].isdigit() else parts[-1:])
        out.add(next((e for e in endings if e not in taken), experts.expert_target(m) if experts else m))
    return sorted(out)


def exclude_modules(adapted: Sequence[str], all_modules: Iterable[str], targets: Sequence[str]) -> list[str]:
    """The modules (containers included) a ``targets`` entry names that are not adapted: only a full
    path that ends another module's path (``layers.0.fc`` and ``vision.layers.0.fc``) does; PEFT's
    ``exclude_modules`` (exact names or endings, like ``target_modules``) keeps them out.

    >>> exclude_modules(["layers.0.fc"], ["layers.0.fc", "vision.layers.0.fc"], ["layers.0.fc"])
    ['vision.layers.0.fc']
    """
    adapted_set, wanted = set(adapted), set(targets)
    # each module's endings looked up in the targets: linear in the modules (45k on DeepSeek-V3), not modules × targets
    return sorted(m for m in _module_tree([*all_modules, *adapted_set]) - adapted_set if wanted.intersection(_endings(m)))


def _endings(path: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "b.c", "c"]``: the entries PEFT's suffix matching would name ``path`` by."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def rank_pattern_keys(ranks: Mapping[str, int], shared_rank: int) -> list[str]:
    r"""The modules ``rank_pattern`` / ``alpha_pattern`` must name, in the order to write them.

    PEFT gives a module the rank of the *first* key ``k`` with ``re.match(rf"(.*\.)?({k})$", module)``:
    so a module whose path ends with another key (``vision.layers.0.fc`` after ``layers.0.fc``) gets its
    own key even at the shared rank, keys with more path components come first, and a key's regular-
    expression characters other than ``.`` are escaped (:func:`pattern_key`).

    >>> rank_pattern_keys({"layers.0.fc": 1, "vision.layers.0.fc": 2, "x.fc": 2}, 2)
    ['vision.layers.0.fc', 'layers.0.fc']
    """
    keys = {m for m, r in ranks.items() if r != shared_rank}
    keys |= {m for m in ranks if keys.intersection(_endings(m)[1:])}  # another key ends it (linear, as exclude_modules)
    return sorted(keys, key=lambda m: (-m.count("."), m))


def pattern_key(module: str) -> str:
    r"""``module`` as a ``rank_pattern`` key: PEFT reads keys as regular expressions, so every
    metacharacter but ``.`` (which then matches itself among others) is escaped.

    >>> pattern_key("layers.0.a+b")
    'layers.0.a\\+b'
    """
    return "".join("\\" + c if c in "^$*+?{}[]\\|()" else c for c in module)


def task_type_for(config: Mapping[str, Any] | None) -> str | None:
    """PEFT's ``task_type`` for a base model's ``config.json`` (its first ``architectures`` entry):
    ``…ForCausalLM`` → ``CAUSAL_LM`` etc.; ``…ForConditionalGeneration`` is ``SEQ_2_SEQ_LM`` where the config says
    ``is_encoder_decoder: true`` (T5, BART, Whisper save it), else ``CAUSAL_LM`` (a vision-language decoder: LLaVA,
    Qwen2-VL, Gemma 3); None when unknown (PEFT then loads a plain ``PeftModel``).

    >>> task_type_for({"architectures": ["LlamaForCausalLM"]}), task_type_for({"architectures": ["BertForMaskedLM"]})
    ('CAUSAL_LM', None)
    """
    archs = (config or {}).get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    for suffix, task in TASK_TYPES:
        if arch.endswith(suffix):
            # LLaVA, Qwen2-VL, Gemma 3 are …ForConditionalGeneration decoders: PEFT's seq2seq class feeds decoder inputs
            decoder = suffix == "ForConditionalGeneration" and (config or {}).get("is_encoder_decoder") is not True
            return "CAUSAL_LM" if decoder else task
    return None


def adapter_config(ranks: Mapping[str, int], *, all_modules: Iterable[str], base_model: str | None,
                   task_type: str | None, rslora: bool = False, fan_in_fan_out: bool = False,
                   modules_to_save: Sequence[str] = (), lora_bias: bool = False, shared_rank: int | None = None,
                   params: Sequence[str] = (), experts: PeftMoeRules | None = None) -> dict[str, Any]:
    """``adapter_config.json`` for modules adapted at ``ranks`` (module path -> r > 0), each at scale 1.

    Args:
        ranks: the adapted modules and their ranks.
        all_modules: every module path of the base model that holds a matrix (for :func:`target_modules`).
        base_model: ``base_model_name_or_path``.
        task_type: PEFT task type (:func:`task_type_for`), or None.
        rslora: write ``use_rslora`` with ``alpha = √r`` (scale alpha/√r = 1), else ``alpha = r``.
        fan_in_fan_out: the targets include GPT-2 ``Conv1D`` layers (PEFT sets it per layer type
            itself when it is wrong for a layer, with a warning).
        modules_to_save: module paths stored whole.
        lora_bias: every target has a ``lora_B.bias``.
        shared_rank: the global ``r`` when some modules must take it (per-expert MoE matrices that
            transformers ≥ 5 fuses on load: PEFT converts such adapters at the global r only);
            default the most common rank (ties: the larger).
        params: parameter paths adapted through ``target_parameters`` (3-D expert stacks), each at ``shared_rank``.
        experts: the model's :class:`~spectra.peft_moe.PeftMoeRules`, for how its experts are named (:func:`target_modules`).
    """
    if not ranks and not (params and shared_rank):
        raise ValueError("ranks must name at least one adapted module. Got none instead.")
    if shared_rank is None:
        counts = Counter(ranks.values())
        shared_rank = max(counts, key=lambda r: (counts[r], r))

    def alpha(r: int) -> float | int:
        return math.sqrt(r) if rslora else r

    pattern = {pattern_key(m): ranks[m] for m in rank_pattern_keys(ranks, shared_rank)}
    all_modules = list(all_modules)
    targets = target_modules(list(ranks), all_modules, experts)
    excluded = exclude_modules(list(ranks), all_modules, targets)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(shared_rank),
        "lora_alpha": alpha(shared_rank),
        "use_rslora": bool(rslora),
        "target_modules": targets,
        **({"exclude_modules": excluded} if excluded else {}),  # only when needed: PEFT < 0.14 has no such field
        **({"target_parameters": sorted(params)} if params else {}),  # PEFT >= 0.17 only: written when there are some
        "rank_pattern": pattern,
        "alpha_pattern": {m: alpha(r) for m, r in pattern.items()},
        "fan_in_fan_out": bool(fan_in_fan_out),
        "modules_to_save": list(modules_to_save) or None,
        "lora_bias": bool(lora_bias),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(out_dir: str | Path, layout: Sequence[tuple[str, tuple[int, ...]]], tensors: Iterable[torch.Tensor],
                  config: Mapping[str, Any], dtype: torch.dtype) -> list[Path]:
    """Write ``adapter_model.safetensors`` (streamed, :func:`write_safetensors`) then
    ``adapter_config.json`` into ``out_dir``, each atomically, so a folder never holds a config
    without its weights.

    Raises:
        OutputError: a file cannot be written; files written before are intact.
    """
    folder = Path(out_dir)
    weights = write_safetensors(folder / "adapter_model.safetensors", layout, tensors, dtype)
    cfg = atomic_write_text(folder / "adapter_config.json", json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    return [weights, cfg]


__all__ = ["PEFT_TASK_TYPES", "TASK_TYPES", "LoraFactors", "adapter_config", "check_task_type", "lora_layout", "lora_tensors",
           "param_depths", "param_lora_layout", "param_lora_tensors", "saved_name", "target_modules", "exclude_modules",
           "rank_pattern_keys", "pattern_key", "task_type_for", "write_adapter", "write_safetensors"]
