"""Tensor names -> (layer, expert, module, role), orientation, and which fused split applies.

Checkpoints of different architectures name the same logical matrix differently
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.3.attn.c_attn.weight`` rows 0..d,
``gpt_neox.layers.3.attention.query_key_value.weight`` every third head block). This module turns a
name and a shape, plus what ``config.json`` says about heads, into a :class:`MatrixSpec`: where the
matrix sits (layer, expert), what it is (module label and a cross-architecture role), how to orient it
``(out, in)`` and how to split a fused matrix into its logical parts (the definitions document, "Conventions").

Everything here is pure: no file I/O, no torch kernels beyond building index tensors.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field, replace

from spectra.layouts import CONV1D_LEAVES, ArchInfo, Part, split_fused
from spectra.roles import ATTN_PARENTS, CROSS_PARENTS, role_of, role_sort_key

#: Leading name components that only wrap a model (``model.``, ``transformer.``, ``bert.``...): two
#: checkpoints of one model saved through different heads differ by these, and pairing ignores them.
WRAPPER_PREFIXES = frozenset({
    "model", "transformer", "bert", "roberta", "gpt_neox", "base_model", "module", "_orig_mod",
    "language_model", "decoder_model",
})

#: transformers' ``base_model_prefix`` of the encoders whose task heads wrap them (a sentence-transformers fine-tune
#: saves the headless model; the base's checkpoint carries the prefix). Not wrapper prefixes: pairing drops one only
#: where no other tensor of that checkpoint would then share the name (:func:`spectra.pairing`'s last pass), since a
#: two-tower checkpoint holds ``vit.encoder…`` beside ``text_model.encoder…``.
ENCODER_PREFIXES = frozenset({
    "albert", "beit", "biogpt", "canine", "convbert", "data2vec_audio", "data2vec_text", "data2vec_vision", "deberta",
    "deit", "dinov2", "distilbert", "electra", "ernie", "esm", "fnet", "funnel", "gpt_neox_japanese", "gte", "hubert",
    "ibert", "layoutlm", "longformer", "luke", "mobilebert", "mpnet", "mra", "nomic_bert", "nystromformer", "rembert",
    "roberta_prelayernorm", "roc_bert", "roformer", "sew", "sew_d", "splinter", "swin", "swinv2", "tapas", "unispeech",
    "unispeech_sat", "videomae", "vit", "wav2vec2", "wav2vec2_bert", "wav2vec2_conformer", "wavlm", "yoso",
    "audio_spectrogram_transformer", "bit", "bros", "convnext", "convnextv2", "cvt", "dinov2_with_registers", "donut",
    "efficientnet", "esmc", "hiera", "ijepa", "layoutlmv2", "layoutlmv3", "levit", "lilt", "markuplm", "mobilevit",
    "mobilevitv2", "perceiver", "pvt", "pvt_v2", "reformer", "regnet", "resnet", "segformer",
    "backbone", "cpmant", "git",  # Mamba, Mamba-2, FalconMamba (``backbone.``), CPM-Ant and GIT's causal LMs
})

#: A component followed by an integer that counts the layer stack (``layers.3``, ``h.3``, ``block.3``).
LAYER_CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "block", "attentions", "ffns"})

_WEIGHT_SUFFIXES = ("weight",)

#: Last name components of quantisation parameters stored beside a quantised weight ``X.weight``:
#: compressed-tensors / FBGEMM ``weight_scale`` (per tensor, per output channel, per group or per
#: block), DeepSeek-V3 ``weight_scale_inv`` (128×128 block scales; multiplied despite the name),
#: zero points, and activation / KV-cache scales (``input_scale``, ``k_scale``...), which are not
#: weights at all. None of them is a weight matrix, whatever its rank.
QUANT_PARAM_LEAVES = frozenset({
    "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_global_scale",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "k_scale", "v_scale",
})

#: Tensors of quantisation formats whose packed weights spectra does not dequantise, by the last name
#: component(s): GPTQ/AWQ (``X.qweight`` int32 with ``X.qzeros``, ``X.scales``, ``X.g_idx``), MLX
#: (``X.weight`` packed uint32 with ``X.scales`` and ``X.biases``; transformers' metal format ``X.qbiases``), bitsandbytes 4-bit
#: (``X.weight.absmax``, ``X.weight.quant_map``, ``X.weight.nested_*``, ``X.weight.quant_state.*``) and
#: int8 (``X.SCB``, ``X.weight_format``). ``scales``/``biases`` count only beside a weight of their
#: module: a float ``scales`` matrix alone would be analysed.
FOREIGN_QUANT_LEAVES = frozenset({"qzeros", "g_idx", "SCB", "weight_format", "absmax", "quant_map", "nested_absmax",
                                  "nested_quant_map", "weight_packed", "weight_shape"})

#: The quantisation parameters that dequantise the weight beside them (``X.<leaf>`` -> ``X.weight``).
WEIGHT_QUANT_LEAVES = ("weight_scale", "weight_scale_inv", "weight_zero_point")

#: ``config.json`` model types whose stacked expert tensors are stored ``(experts, in, out)`` and
#: applied as ``x @ W[e]`` (``torch.bmm``), not ``F.linear``: ``experts.gate_up_proj``
#: ``(E, hidden, 2·I)`` and ``experts.down_proj`` ``(E, I, hidden)`` must be transposed to the definitions document's
#: ``(out, in)``. The value is how gate and up share the fused output dimension. Checked against
#: transformers' modeling code (v5):
#:   Llama-4 ``Llama4TextExperts``: ``gate, up = torch.bmm(x, gate_up_proj).chunk(2, dim=-1)``;
#:   gpt-oss ``GptOssExperts._apply_gate``: ``gate, up = gate_up[..., ::2], gate_up[..., 1::2]``;
#:   OpenAI privacy filter (same layout as gpt-oss, but ``chunk(2, dim=-1)``);
#:   Aria ``AriaTextExperts`` (stored as ``experts.fc1.weight`` / ``experts.fc2.weight``, ``chunk``);
#:   Qwen3-VL-MoE: stored ``(E, hidden, 2·I)``, transformers transposes on load (``Transpose(1, 2)``
#:   in ``conversion_mapping.py``), then ``chunk``.
#: Every other MoE family of transformers stores ``(E, 2·I, hidden)`` / ``(E, hidden, I)`` and calls
#: ``F.linear`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...), as per-expert 2-D ``nn.Linear``
#: weights on disk or as 3-D tensors: those are ``(out, in)`` already (:data:`EXPERTS_OUT_IN`).
EXPERTS_IN_OUT: Mapping[str, str] = {
    "llama4": "halves", "llama4_text": "halves",
    "gpt_oss": "interleaved",
    "openai_privacy_filter": "halves",
    "aria": "halves", "aria_text": "halves",
    "qwen3_vl_moe": "halves", "qwen3_vl_moe_text": "halves",
}

#: Model types whose stacked experts (when stored 3-D) are ``(E, out, in)`` with ``F.linear`` and gate
#: rows before up rows (``nn.functional.linear(x, gate_up_proj[e]).chunk(2, dim=-1)``), as checked in
#: transformers' modeling code. For a model type in neither table the orientation is judged from
#: shapes (:func:`_stacked_in_out`).
EXPERTS_OUT_IN = frozenset({
    "mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_omni_moe", "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "glm4_moe", "glm4v_moe", "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "phimoe", "jamba", "granitemoe",
    "granitemoeshared", "granitemoehybrid", "exaone_moe", "longcat_flash", "lfm2_moe", "afmoe", "jetmoe",
})

#: Stored leaf names of the two stacked expert matrices, by model type where they differ.
_STACKED_LEAVES: Mapping[str, Mapping[str, str]] = {
    "aria": {"fc1": "gate_up", "fc2": "down"}, "aria_text": {"fc1": "gate_up", "fc2": "down"},
}

#: ``(parent, leaf)`` of 3-D expert stacks stored outside an ``experts`` module, and their role.
#: Granite-MoE (``granitemoe``, ``granitemoeshared``, ``granitemoehybrid``) checkpoints store
#: ``block_sparse_moe.input_linear.weight`` ``(E, 2·I, hidden)`` and ``output_linear.weight``
#: ``(E, hidden, I)``; transformers renames them to ``experts.gate_up_proj`` / ``experts.down_proj``
#: on load (``conversion_mapping.py``) and runs
#: ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)``: ``(out, in)``, gate rows first.
#: JetMoE (``jetmoe``) stores its MLP experts as ``mlp.input_linear.weight`` ``(E, 2·I, hidden)`` and
#: ``mlp.output_linear.weight`` ``(E, hidden, I)`` (``JetMoeParallelExperts``: ``F.linear(x, weight[e])``,
#: then ``chunk(2, dim=-1)``, gate first): the same layout; only 3-D tensors of these names are stacks.
_STACKED_MODULES: Mapping[tuple[str, str], str] = {
    ("block_sparse_moe", "input_linear"): "gate_up", ("block_sparse_moe", "output_linear"): "down",
    ("mlp", "input_linear"): "gate_up", ("mlp", "output_linear"): "down",
}

#: 2-D parameters applied as ``x @ W`` (stored ``(in, out)``) by their models: Gemma 3's (and PaliGemma 2's,
#: Gemma 3n's) ``multi_modal_projector.mm_input_projection_weight``, used as
#: ``torch.matmul(normed_vision_outputs, self.mm_input_projection_weight)``.
IN_OUT_PARAMETERS = frozenset({"mm_input_projection_weight"})

#: ``config.json`` model types whose stored router is ``(in, out)``: transformers transposes it on
#: load. ERNIE-4.5-VL (``ernie4_5_vl_moe``): ``mlp.gate.weight`` (text experts) and
#: ``mlp.gate.weight_1`` (vision experts) are stored ``(hidden, experts)`` and loaded as
#: ``text_moe.gate.weight`` / ``vision_moe.gate.weight`` through ``Transpose(0, 1)``, then used by
#: ``F.linear``. The value: the ``(parent, leaf)`` of those routers as stored. (ERNIE-4.5 MoE,
#: ``ernie4_5_moe``, stores its ``mlp.gate.weight`` ``(experts, hidden)`` and does not transpose.)
ROUTERS_IN_OUT: Mapping[str, frozenset[tuple[str, str]]] = {
    "ernie4_5_vl_moe": frozenset({("mlp", "gate"), ("gate", "weight_1")}),
}


@dataclass(frozen=True)
class MatrixSpec:
    """Where a stored 2-D (or 3-D expert-stacked) tensor sits and how to read it.

    Attributes:
        name: the tensor name as stored.
        key: the pairing key: name without wrapper prefixes (``model.``, ``bert.``...).
        layer: index in the layer stack, or None (embeddings, head, final projections).
        expert: expert index for MoE expert matrices, else None.
        module: the module label, unique within the checkpoint (``"q_proj"``, ``"attn.c_proj"``).
        role: cross-architecture role (``"q"``, ``"down"``, ``"embed"``...), or None if unknown.
        transpose: stored ``(in, out)``; transpose to get the definitions document's ``(out, in)``.
        parts: the logical parts to analyse (one unsplit part, or the split of a fused matrix).
        note: why a fused matrix was left unsplit, or another caveat; empty when none.
    """

    name: str
    key: str
    layer: int | None
    expert: int | None
    module: str
    role: str | None
    transpose: bool = False
    parts: tuple[Part, ...] = (Part(""),)
    note: str = ""
    rel_path: str = field(default="", repr=False)


@dataclass(frozen=True)
class _Parsed:
    key: str
    layer: int | None
    expert: int | None
    rel_path: str  # module path with wrappers, layer and expert numbers removed
    leaf: str
    parent: str


#: Characters that must not reach a terminal, a log or a UTF-8 file as they are: C0 and C1 control characters (ESC
#: starts ANSI sequences that recolour, retitle or rewrite a terminal; U+009B is a one-character CSI), line and paragraph
#: separators, bidirectional overrides and isolates (which reorder what is displayed, "Trojan Source"), and lone UTF-16
#: surrogates (which cannot be encoded as UTF-8 at all: writing one raises UnicodeEncodeError).
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    code = ord(ch)
    return _SHORT_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def display_name(name: str, *, max_chars: int | None = None) -> str:
    r"""``name`` safe to print, log, plot or write as UTF-8: unsafe characters escaped as Python
    writes them (``\x1b``, ``\n``, ``\u202e``, ``\ud800``), everything else unchanged.

    Tensor and module names come from the files and are untrusted: an ANSI sequence in a name
    would otherwise drive the terminal, and a lone surrogate would crash a UTF-8 write.

    Args:
        name: any string.
        max_chars: when given and the escaped name is longer, keep its start and end around ``…``
            and say how long the name was (plots, tables); None keeps it whole.

    Returns:
        A string with no control characters, bidirectional controls or surrogates.

    >>> display_name("model.layers.0.q_proj\x1b[2J")
    'model.layers.0.q_proj\\x1b[2J'
    >>> display_name("x" * 50, max_chars=12)
    'xxxxxxx…xxxx (50 characters)'
    """
    text = _UNSAFE_CHARS.sub(_escape_char, name) if _UNSAFE_CHARS.search(name) else name
    if max_chars is not None and len(text) > max_chars:
        keep = max(max_chars - 1, 2)
        head = keep * 2 // 3
        text = f"{text[:head]}…{text[len(text) - (keep - head):]} ({len(name)} characters)"
    return text


#: Name components that PyTorch's wrappers insert anywhere in a parameter's path and strip from a
#: state dict by their own hooks (activation checkpointing, FSDP, per-block ``torch.compile``): a
#: checkpoint saved from ``named_parameters()`` keeps them, and pairing ignores them.
INNER_WRAPPERS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def pairing_key(name: str) -> str:
    """The name without wrapper components (leading ones, and :data:`INNER_WRAPPERS` anywhere) and
    without a trailing ``.weight``.

    >>> pairing_key("model.layers.0.self_attn.q_proj.weight")
    'layers.0.self_attn.q_proj'
    >>> pairing_key("bert.encoder.layer.0.attention.self.query.weight")
    'encoder.layer.0.attention.self.query'
    >>> pairing_key("model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight")
    'layers.0.self_attn.q_proj'
    """
    comps = name.split(".")
    if comps and comps[-1] in _WEIGHT_SUFFIXES and len(comps) > 1:
        comps = comps[:-1]
    if len(comps) > 1 and INNER_WRAPPERS.intersection(comps[:-1]):
        comps = [c for c in comps[:-1] if c not in INNER_WRAPPERS] + comps[-1:]
    while len(comps) > 1 and comps[0] in WRAPPER_PREFIXES:
        comps = comps[1:]
    return ".".join(comps)


def quant_param_of(name: str) -> tuple[str, str] | None:
    """``(weight name, kind)`` when ``name`` is a quantisation parameter, else None.

    ``kind`` is the last component (``"weight_scale"``, ``"input_scale"``...). The weight name is
    ``X.weight`` for every kind, including activation scales (whose ``X`` holds that weight).

    >>> quant_param_of("model.layers.0.mlp.down_proj.weight_scale_inv")
    ('model.layers.0.mlp.down_proj.weight', 'weight_scale_inv')
    >>> quant_param_of("model.layers.0.mlp.down_proj.weight") is None
    True
    """
    prefix, _, leaf = name.rpartition(".")
    if leaf not in QUANT_PARAM_LEAVES:
        return None
    return (f"{prefix}.weight" if prefix else "weight"), leaf


def foreign_quant_of(name: str, names: Container[str]) -> str | None:
    """The module ``X`` when ``name`` is a parameter of a quantisation format spectra does not read
    (:data:`FOREIGN_QUANT_LEAVES`; ``X.scales`` beside ``X.qweight`` or ``X.weight``, ``X.biases`` beside
    ``X.scales``, ``X.qbiases``, and MXFP4's ``X_blocks`` with ``X_scales``), looking at the other tensor ``names`` of its checkpoint; else None.

    >>> foreign_quant_of("l.0.q_proj.scales", {"l.0.q_proj.qweight", "l.0.q_proj.scales"})
    'l.0.q_proj'
    >>> foreign_quant_of("l.0.q_proj.weight.quant_state.bitsandbytes__nf4", ())
    'l.0.q_proj'
    >>> foreign_quant_of("l.0.norm.scales", {"l.0.norm.scales"}) is None
    True
    >>> foreign_quant_of("l.0.mlp.experts.down_proj_blocks", {"l.0.mlp.experts.down_proj_blocks": (32, 2880, 90, 16),
    ...                                                       "l.0.mlp.experts.down_proj_scales": (32, 2880, 90)})
    'l.0.mlp.experts.down_proj'
    """
    comps = name.split(".")
    if "quant_state" in comps[:-1] and comps.index("quant_state") >= 1:  # X.weight.quant_state.<format>
        i = comps.index("quant_state")
        return ".".join(comps[: i - 1] if comps[i - 1] == "weight" else comps[:i]) or None
    prefix, _, leaf = name.rpartition(".")
    if leaf in FOREIGN_QUANT_LEAVES:
        module, _, parent = prefix.rpartition(".")
        return (module if parent == "weight" else prefix) or None
    if leaf.startswith("weight_") and prefix and f"{prefix}.weight_packed" in names:  # compressed-tensors' packed ints
        return prefix
    if leaf == "scales" and prefix and (f"{prefix}.qweight" in names or f"{prefix}.weight" in names):
        return prefix
    if leaf in ("biases", "qbiases") and prefix and f"{prefix}.scales" in names:  # MLX; transformers' metal format
        return prefix
    # MXFP4 (gpt-oss's release): a 3-D expert parameter X stored as uint8 X_blocks (E, out, in/32, 16) and X_scales
    stem, _, kind = name.rpartition("_")
    if kind in ("blocks", "scales") and stem and _mxfp4(stem, names):
        return stem
    return None


def _mxfp4(stem: str, names: Container[str]) -> bool:
    """Whether ``names`` (a mapping to shapes or :class:`~spectra.io.checkpoint.TensorInfo`) holds ``stem`` as MXFP4 stores
    it: ``stem_blocks`` ``(…, groups, 16)`` of packed 4-bit codes and ``stem_scales`` ``(…, groups)``, uint8 where the dtype
    is known (a float matrix named ``conv_blocks`` is none)."""
    if not isinstance(names, Mapping) or f"{stem}_blocks" not in names or f"{stem}_scales" not in names:
        return False
    blocks, scales = names[f"{stem}_blocks"], names[f"{stem}_scales"]
    shape_b, shape_s = (tuple(getattr(x, "shape", x)) for x in (blocks, scales))
    return (all(getattr(x, "dtype", "uint8") == "uint8" for x in (blocks, scales)) and len(shape_b) >= 3 and shape_b[-1] == 16
            and shape_s == shape_b[:-1])


def layer_of(name: str) -> int | None:
    """The layer number in a tensor's name (``model.layers.3.input_layernorm.weight`` → 3); None outside the stack.

    >>> layer_of("model.layers.3.input_layernorm.weight"), layer_of("model.norm.weight")
    (3, None)
    """
    return _parse(name).layer


def module_path(name: str) -> str:
    """A tensor's module path without wrappers, layer and expert numbers (``model.layers.3.mlp.experts.7.w1.weight`` → ``mlp.experts.w1``)."""
    return _parse(name).rel_path


def in_attention(name: str) -> bool:
    """Whether a tensor's path runs through a self- or cross-attention block (a component named as one, any case)."""
    return any(c.lower() in ATTN_PARENTS | CROSS_PARENTS for c in pairing_key(name).split("."))


def unique_pairing_keys(names: Sequence[str]) -> dict[str, str]:
    """Pairing key -> name, for the keys exactly one of ``names`` has (a shared key pairs nothing)."""
    seen: dict[str, list[str]] = {}
    for n in names:
        seen.setdefault(pairing_key(n), []).append(n)
    return {k: v[0] for k, v in seen.items() if len(v) == 1}


#: An expert module named by its index (``experts.expert_3``: Switch Transformers, NLLB-MoE).
_NAMED_EXPERT = re.compile(r"expert_([0-9]{1,18})")


def _index(comp: str | None) -> bool:
    """Whether a name component is a layer or expert index: ASCII digits only (``str.isdigit`` also
    accepts ``"²"``, which ``int`` refuses), and short enough to be one (``int`` refuses > 4300 digits)."""
    return comp is not None and comp.isascii() and comp.isdigit() and len(comp) <= 18


def _parse(name: str, keep_indices: bool = False) -> _Parsed:
    """Layer, expert and module path of ``name``. Other indices are dropped from the path (a module's
    identity across layers), or kept with ``keep_indices`` when two matrices of one layer would
    otherwise share a path (CTRL's ``ffn.0``/``ffn.2``, Swin's blocks inside a stage)."""
    key = pairing_key(name)
    comps = key.split(".")
    layer = expert = None
    rel: list[str] = []
    i = 0
    while i < len(comps):
        c = comps[i]
        nxt = comps[i + 1] if i + 1 < len(comps) else None
        if _index(nxt):
            if layer is None and c in LAYER_CONTAINERS:
                layer = int(nxt)
                i += 2
                continue
            if c == "experts" and expert is None:
                expert = int(nxt)
                rel.append(c)
                i += 2
                continue
            if c in LAYER_CONTAINERS and not keep_indices:  # T5's sub-layer index inside a block
                i += 2
                continue
        if c == "experts" and expert is None and nxt is not None and (m := _NAMED_EXPERT.fullmatch(nxt)):
            expert = int(m.group(1))  # Switch Transformers' and NLLB-MoE's experts.expert_N: expert N
            rel.append(c)
            i += 2
            continue
        if keep_indices or not _index(c):
            rel.append(c)
        i += 1
    if not rel:  # a container's own weights ("layers.2.weight", an nn.Sequential's "2.weight"): it names the module
        rel = [c for c in comps if not _index(c)] or comps
    words = [c for c in rel if not _index(c)]  # leaf and parent name a module, never an index
    leaf = words[-1] if words else key
    parent = words[-2] if len(words) > 1 else ""
    return _Parsed(key, layer, expert, ".".join(rel), leaf, parent)


def _parse_all(names: Sequence[str]) -> dict[str, _Parsed]:
    """:func:`_parse` of each name, with indices kept for the names whose (layer, expert, path) would
    otherwise be another matrix's: two matrices under one label would be pooled into one heatmap cell."""
    parsed = {n: _parse(n) for n in names}
    seen: dict[tuple[int | None, int | None, str], list[str]] = {}
    for n, p in parsed.items():
        seen.setdefault((p.layer, p.expert, p.rel_path), []).append(n)
    for group in seen.values():
        if len(group) > 1:
            parsed.update({n: _parse(n, keep_indices=True) for n in group})
            again: dict[tuple[int | None, int | None, str], list[str]] = {}
            for n in group:
                again.setdefault((parsed[n].layer, parsed[n].expert, parsed[n].rel_path), []).append(n)
            for same in again.values():  # one stack under two wrapper prefixes (model.layers.0.… beside layers.0.…)
                if len(same) > 1:
                    parsed.update({n: _with_prefix(n, parsed[n]) for n in same})
    return parsed


def _with_prefix(name: str, p: _Parsed) -> _Parsed:
    """``p`` with the leading wrapper components :func:`pairing_key` dropped from ``name`` put back in
    its path, so that two copies of one matrix under different wrappers keep two labels."""
    comps, key_comps = name.split("."), p.key.split(".")
    lead = next((i for i in range(len(comps)) if comps[i:i + len(key_comps)] == key_comps), 0)
    prefix = ".".join(comps[:lead])
    return _Parsed(p.key, p.layer, p.expert, f"{prefix}.{p.rel_path}" if prefix else p.rel_path, p.leaf, p.parent)


#: Leaf names too generic to label a module alone (:func:`module_labels`).
_VAGUE_LEAVES = frozenset({"layer", "weight_1"})


def module_labels(rel_paths: Sequence[str]) -> dict[str, str]:
    """Shortest suffix of each module path that no other path in the set shares.

    Llama's ``self_attn.q_proj`` becomes ``q_proj``; GPT-2's two ``c_proj`` become ``attn.c_proj``
    and ``mlp.c_proj``; BERT's ``output.dense`` stays whole beside ``attention.output.dense``.

    >>> module_labels(["attn.c_proj", "mlp.c_proj", "attn.c_attn"])
    {'attn.c_attn': 'c_attn', 'attn.c_proj': 'attn.c_proj', 'mlp.c_proj': 'mlp.c_proj'}
    """
    paths = sorted(set(rel_paths))
    split = {p: p.split(".") for p in paths}
    # how many paths end in each suffix: one count per (path, length), so the labels of 10k module
    # paths take linear time (a scan of every other path per suffix took minutes)
    ends = Counter(tuple(c[-n:]) for c in split.values() for n in range(1, len(c) + 1))
    out: dict[str, str] = {}
    for p in paths:
        comps = split[p]
        # a leaf that says nothing alone keeps its parent: Granite-MoE's ``router.layer``
        first = 2 if comps[-1] in _VAGUE_LEAVES and len(comps) > 1 else 1
        for n in range(first, len(comps) + 1):
            suffix = comps[-n:]
            if not _index(suffix[0]) and ends[tuple(suffix)] == 1:
                break  # (a label starting with an index, "2.weight_x", names nothing: one more component)
        # an empty tensor name (legal in safetensors) labelled nothing: a blank table cell, "largest in  (0.10)"
        out[p] = ".".join(comps[-n:]) or '""'
    return out


def describe_checkpoint(
    shapes: Mapping[str, Sequence[int]], arch: ArchInfo | None = None
) -> dict[str, MatrixSpec]:
    """Describe every 2-D tensor of a checkpoint, and 3-D expert stacks (under ``experts``, or
    Granite-MoE's ``block_sparse_moe.input_linear`` / ``output_linear``).

    Args:
        shapes: tensor name -> stored shape, for the whole checkpoint.
        arch: head counts and storage layout from ``config.json``; inferred from shapes when None.

    Returns:
        name -> :class:`MatrixSpec` for every matrix; tensors of other ranks and quantisation
        parameters (:func:`quant_param_of`, even 2-D block scales) are left out (the caller reports
        them as skipped).
    """
    arch = arch or ArchInfo.from_config(None, shapes)
    parsed = _parse_all([n for n, s in shapes.items() if _is_matrix(n, s, shapes)])
    labels = module_labels([p.rel_path for p in parsed.values()])
    roles = {n: role_of(p.leaf, p.parent, p.layer, p.rel_path, arch.model_type) for n, p in parsed.items()}
    stacked_roles = _STACKED_LEAVES.get(arch.model_type or "", {})
    for n, p in parsed.items():
        if len(shapes[n]) == 3 and p.leaf.lower() in stacked_roles:
            roles[n] = stacked_roles[p.leaf.lower()]
        elif len(shapes[n]) == 3 and (p.parent.lower(), p.leaf.lower()) in _STACKED_MODULES:
            roles[n] = _STACKED_MODULES[(p.parent.lower(), p.leaf.lower())]
    # (layer, module path without the leaf) -> role -> stored shape, of 3-D expert stacks: a
    # gate_up stack is oriented by its down_proj sibling when config.json gives no hidden size.
    siblings: dict[tuple[int | None, str], dict[str | None, tuple[int, ...]]] = {}
    for n, p in parsed.items():
        if len(shapes[n]) == 3:
            siblings.setdefault((p.layer, p.rel_path.rpartition(".")[0]), {})[roles[n]] = tuple(shapes[n])
    hidden = arch.hidden_size or (_hidden_from_shapes(shapes, parsed, roles) if siblings else None)
    # gpt-oss stores gate_up_proj_bias beside a gate_up stack whose gate and up columns alternate; a
    # model with the same names (OpenAI's privacy filter) halves them: only config.json tells which
    unknown_fused = arch.model_type is None and any(n.rpartition(".")[2] == "gate_up_proj_bias" for n in shapes)
    specs: dict[str, MatrixSpec] = {}
    for name, p in parsed.items():
        shape = tuple(shapes[name])
        role = roles[name]
        interleaved, orient_note = False, ""
        if len(shape) == 3:
            transpose, orient_note = _stacked_in_out(
                p, role, shape, arch, hidden, siblings[(p.layer, p.rel_path.rpartition(".")[0])])
            # gpt-oss interleaves gate and up along the fused 2·I axis, however the stack is stored
            interleaved = EXPERTS_IN_OUT.get(arch.model_type or "") == "interleaved"
        else:
            transpose = (arch.conv1d and p.leaf in CONV1D_LEAVES) or p.leaf in IN_OUT_PARAMETERS
            if role == "router" and (p.parent, p.leaf) in ROUTERS_IN_OUT.get(arch.model_type or "", ()):
                transpose = True
        out_dim = shape[-1] if transpose else shape[-2]
        in_dim = shape[-2] if transpose else shape[-1]
        parts, note = split_fused(p.leaf, p.rel_path, role, out_dim, in_dim, arch, interleaved=interleaved)
        if arch.model_type == "dbrx" and len(shape) == 2 and p.parent == "mlp" and p.leaf in ("w1", "v1", "w2"):
            # DBRX stores its experts' matrices stacked along the rows of one 2-D tensor per kind
            role, note = None, ("DBRX's experts stacked along the rows ((experts x ffn, d)): analysed as one matrix, "
                                "not per expert")
        if len(shape) == 3 and role == "gate_up" and len(parts) > 1 and unknown_fused:
            parts, note = (Part(""),), ("gate and up left unsplit: without config.json the layout of a stack with "
                                        "gate_up_proj_bias is unknown (gpt-oss interleaves them, others halve)")
        specs[name] = MatrixSpec(
            name=name, key=p.key, layer=p.layer, expert=p.expert, module=labels[p.rel_path], role=role,
            transpose=transpose, parts=parts, note="; ".join(x for x in (orient_note, note) if x),
            rel_path=p.rel_path,
        )
    return specs


def describe_updates(shapes: Mapping[str, Sequence[int]], *, fan_in_fan_out: bool = False) -> dict[str, MatrixSpec]:
    """:func:`describe_checkpoint` of updates already oriented ``(out, in)`` with no base (a PEFT LoRA's
    ``B·A``). ``fan_in_fan_out`` (the adapter's base is GPT-2's ``Conv1D``) splits a fused ``c_attn`` in
    GPT-2's layout, as the base's stored ``(in, out)`` shape does with a base; nothing is transposed."""
    specs = describe_checkpoint(shapes)
    if fan_in_fan_out:
        as_stored = {n: (tuple(s)[::-1] if len(s) == 2 else tuple(s)) for n, s in shapes.items()}
        conv = describe_checkpoint(as_stored, ArchInfo(conv1d=True))
        specs.update({n: replace(s, transpose=False) for n, s in conv.items() if s.transpose and len(shapes[n]) == 2})
    return specs


_EXPERT_ROLES = frozenset({"gate_up", "gate", "up", "down"})


def _stacked_in_out(
    p: _Parsed, role: str | None, shape: tuple[int, ...], arch: ArchInfo, hidden: int | None,
    siblings: Mapping[str | None, tuple[int, ...]],
) -> tuple[bool, str]:
    """Whether a 3-D expert stack is stored ``(experts, in, out)`` (transpose it), and a note when
    that was judged from shapes or could not be judged.

    Shapes first: a ``gate_up`` stack beside its ``down`` is ``(2I, H)``/``(H, I)`` as (out, in), else the model
    width (``hidden``) is the input of gate/up and the output of down. A model type's known
    layout (:data:`EXPERTS_IN_OUT`, :data:`EXPERTS_OUT_IN`) gives way only to the module's own pair:
    Qwen3-VL-MoE ships ``(E, H, 2I)`` but transformers 5 saves ``(E, 2I, H)``. Then Llama-4's names;
    else ``(out, in)``, as ``nn.Linear`` stores it. Square stacks (gpt-oss) need the model type.
    """
    mt = arch.model_type
    if role not in _EXPERT_ROLES:
        return False, ""
    a, b = shape[-2], shape[-1]
    in_out: bool | None = None
    how = ""
    if hidden:
        if role == "down":  # hidden is the output
            in_out = True if (b == hidden and a != hidden) else False if (a == hidden and b != hidden) else None
        else:  # hidden is the input
            in_out = True if (a == hidden and b != hidden) else False if (b == hidden and a != hidden) else None
        how = f"shapes: model width {hidden}"
    down = siblings.get("down")
    by_pair = None  # the gate_up stack beside its down_proj: a layout of this very module, not of the model
    if role in ("gate_up", "down") and "gate_up" in siblings and down is not None:
        gu, dn = siblings["gate_up"], down
        as_out_in = gu[-1] == dn[-2] and gu[-2] == 2 * dn[-1]
        as_in_out = gu[-2] == dn[-1] and gu[-1] == 2 * dn[-2]
        if as_out_in != as_in_out:
            by_pair = as_in_out
    if by_pair is not None and by_pair != in_out:  # the module's own pair outranks the model width, which can be another
        # block's (muse_spark's experts run at moe_hidden_size, 2·I of them equal to hidden_size: gate and up were mixed)
        in_out, how = by_pair, "shapes: gate_up beside down_proj"
    known = True if mt in EXPERTS_IN_OUT else False if mt in EXPERTS_OUT_IN else None
    if in_out is not None and known is not None:
        # one model width for the whole checkpoint can be another sub-model's (Qwen3-Omni's thinker and
        # talker): the known layout gives way only when this module's own pair of stacks agrees
        if in_out == known or by_pair != in_out:
            return known, ""
        stored = "(experts, in, out)" if in_out else "(experts, out, in)"
        usual = "(experts, in, out)" if known else "(experts, out, in)"
        return in_out, (f"stacked experts stored {stored}, judged from {how}, where model_type {mt!r} is usually "
                        f"stored {usual}" + ("; transposed" if in_out else ""))
    if in_out is None and known is not None:
        return known, ""
    if in_out is None and p.rel_path.endswith(("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")):
        in_out, how = True, "Llama-4's names (feed_forward.experts)"
    kind = f"config.json model_type {mt!r} has no known expert layout" if mt else "no config.json model_type"
    if in_out is None:
        return False, f"stacked experts assumed stored (experts, out, in) as nn.Linear stores them: {kind}, and shapes {tuple(shape)} do not tell"
    if in_out:
        return True, f"stacked experts stored (experts, in, out), judged from {how} ({kind}); transposed"
    return False, ""


def _hidden_from_shapes(shapes: Mapping[str, Sequence[int]], parsed: Mapping[str, _Parsed],
                        roles: Mapping[str, str | None]) -> int | None:
    """The model width, read off the router ``(experts, hidden)`` of an expert stack, or off the
    token embedding ``(vocab, hidden)``; None when the checkpoint has neither."""
    n_experts = {int(shapes[n][0]) for n in parsed if len(shapes[n]) == 3}
    for want in ("router", "embed"):
        for n in parsed:
            s = tuple(shapes[n])
            if roles[n] != want or len(s) != 2:
                continue
            if want == "embed":
                return int(s[1])
            if s[0] in n_experts and s[1] not in n_experts:
                return int(s[1])
            if s[1] in n_experts and s[0] not in n_experts:  # a router stored (hidden, experts)
                return int(s[0])
    return None


def is_bias(name: str) -> bool:
    """Whether ``name`` is a bias (``X.bias``, or gpt-oss's per-expert ``experts.down_proj_bias``),
    whatever its rank: never a weight matrix, even 2-D ``(experts, out)``."""
    leaf = name.rpartition(".")[2]
    return leaf in ("bias", "biases") or leaf.endswith("_bias")


def _is_matrix(name: str, shape: Sequence[int], names: Container[str] = ()) -> bool:
    if quant_param_of(name) is not None:  # a 2-D block scale is not a weight matrix
        return False
    if foreign_quant_of(name, names) is not None:  # GPTQ's or MLX's 2-D scales are no weight either
        return False
    if is_bias(name):
        return False
    if len(shape) == 2:
        return True
    if len(shape) != 3:
        return False
    comps = pairing_key(name).split(".")
    return "experts" in comps or tuple(comps[-2:]) in _STACKED_MODULES


def spec_order(spec: MatrixSpec) -> tuple:
    """Sort key of results: embeddings first, then layers in numeric order (layer 2 before 10),
    experts, module roles (:data:`ROLE_ORDER`), then matrices outside the stack (the head)."""
    band = 0 if spec.role in ("embed", "pos_embed") else (1 if spec.layer is not None else 2)
    return (band, spec.layer if spec.layer is not None else -1, spec.expert if spec.expert is not None else -1,
            role_sort_key(spec.role, spec.module), spec.name)


__all__ = [
    "ArchInfo", "EXPERTS_IN_OUT", "EXPERTS_OUT_IN", "MatrixSpec", "Part", "QUANT_PARAM_LEAVES", "ROUTERS_IN_OUT",
    "FOREIGN_QUANT_LEAVES", "describe_checkpoint", "describe_updates", "display_name", "foreign_quant_of", "in_attention",
    "is_bias", "module_labels", "module_path", "pairing_key", "quant_param_of", "spec_order",
]
