"""What ``config.json`` says about a model's attention, and how fused matrices split into parts.

Fused projections store several logical matrices in one tensor, in layouts that differ by model:
GPT-2's ``c_attn`` holds q, k, v as three row blocks, GPT-NeoX's ``query_key_value`` per head,
Falcon's grouped per kv head, CodeGen's ``qkv_proj`` as four blocks of (q, v, k). A wrong split gives
plausible numbers for the wrong rows, so each layout here follows the model's own attention code,
and a matrix whose layout is unknown or does not fit is left whole with a note saying why.

Everything here is pure: no file I/O, no torch kernels beyond building index tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Module names (last part) that GPT-2-style ``Conv1D`` layers carry, stored ``(in, out)`` when
#: :attr:`ArchInfo.conv1d`; PEFT adapts them with ``fan_in_fan_out``.
CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")


@dataclass(frozen=True)
class ArchInfo:
    """What a checkpoint's ``config.json`` says that naming needs. Every field may be unknown.

    Attributes:
        model_type: ``config.json``'s ``model_type`` (``"llama"``, ``"gpt2"``, ...), or None.
        num_heads: attention heads (``num_attention_heads`` / ``n_head``).
        num_kv_heads: key/value heads (GQA/MQA); equals ``num_heads`` when the config has none.
        head_dim: per-head width; ``hidden_size // num_heads`` when the config has none.
        hidden_size: model width.
        conv1d: matrices are stored ``(in, out)`` (GPT-2's ``Conv1D``) and must be transposed.
        falcon_layout: for Falcon's ``query_key_value``: ``"new"`` (grouped per kv head),
            ``"multi_query"`` (q rows, then one k and one v head) or ``"interleaved"`` (per head).
        qk_nope_head_dim, v_head_dim: DeepSeek-V2/V3's multi-head latent attention: per head, the rows of
            ``kv_b_proj`` holding the key's part without rotary embedding, then the value's.
        vision_heads, vision_kv_heads: a multimodal model's ``vision_config`` head counts, where it gives
            key/value heads (grouped-query vision attention, EXAONE 4.5: ``attn.qkv`` is q, k, v blocks of
            ``heads``, ``kv``, ``kv`` head widths, not three equal blocks).
    """

    model_type: str | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    conv1d: bool = False
    falcon_layout: str | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    vision_heads: int | None = None
    vision_kv_heads: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]] | None = None) -> ArchInfo:
        """Build from a parsed ``config.json`` (may be None) and the checkpoint's tensor shapes.

        Without a config, GPT-2's ``(in, out)`` storage is recognised from its ``c_attn`` shape
        ``(d, 3d)``, since GPT-BigCode uses the same names with ``nn.Linear`` ``(out, in)`` storage.
        """
        config = dict(config or {})
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
        if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
            config = {**config["text_config"], "model_type": config.get("model_type")}
        model_type = config.get("model_type")
        heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
        kv = _first_int(config, "num_key_value_heads", "num_kv_heads", "multi_query_group_num")
        hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
        head_dim = _first_int(config, "head_dim", "d_kv")
        if head_dim is None and heads and hidden:
            head_dim = hidden // heads
        falcon_layout = None
        if model_type in ("falcon", "RefinedWeb", "RefinedWebModel"):
            # Falcon-40B's own RefinedWeb code reads n_head_kv and groups q heads per kv head
            # ("new" layout) without a new_decoder_architecture flag, which transformers' config adds
            rw_kv = _first_int(config, "n_head_kv") if model_type == "RefinedWeb" else None
            if config.get("new_decoder_architecture") or rw_kv:
                falcon_layout = "new"
                kv = kv or rw_kv or _first_int(config, "num_kv_heads")
            elif config.get("multi_query", True):
                falcon_layout, kv = "multi_query", 1
            else:
                falcon_layout = "interleaved"
        if kv is None and model_type == "gpt_bigcode":  # configs older than num_key_value_heads: MQA by default
            kv = 1 if config.get("multi_query", True) else heads
        if kv is None:
            kv = heads
        if model_type is not None:
            conv1d = model_type in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
        else:
            conv1d = False
            for name, shape in (shapes or {}).items():
                comps = name.split(".")
                if "c_attn" in comps and len(shape) == 2 and shape[1] == 3 * shape[0]:
                    conv1d = True
                    break
        return cls(model_type, heads, kv, head_dim, hidden, conv1d, falcon_layout,
                   _first_int(config, "qk_nope_head_dim"), _first_int(config, "v_head_dim"),
                   _first_int(vision, "num_heads", "num_attention_heads"), _first_int(vision, "num_key_value_heads", "num_kv_heads"))


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class Part:
    """One logical part of a (possibly fused) matrix.

    Attributes:
        suffix: ``""`` for an unsplit matrix, else ``"q"``, ``"k"``, ``"v"``, ``"gate"``, ``"up"``.
        rows: row indices into the ``(out, in)``-oriented matrix, or None for all rows.
    """

    suffix: str
    rows: torch.Tensor | None = None


#: Model types whose fused ``query_key_value`` has one k and one v head per q head whatever
#: ``num_key_value_heads`` config.json holds (their attention never reads it).
_NO_GQA = frozenset({"gpt_neox", "gpt_neox_japanese", "bloom"})


def split_fused(leaf: str, rel_path: str, role: str | None, out_dim: int, in_dim: int, arch: ArchInfo, *,
                interleaved: bool = False) -> tuple[tuple[Part, ...], str]:
    """Row indices of each logical part of a fused matrix, oriented ``(out, in)``.

    Args:
        leaf: the module's own name as stored (``"qkv_proj"``, ``"c_attn"``...).
        rel_path: the module path without wrappers, layer and expert numbers (``"attn.c_attn"``).
        role: ``"qkv"``, ``"gate_up"``, ``"kv"`` or another role (anything else is returned unsplit).
        out_dim, in_dim: the ``(out, in)``-oriented shape.
        arch: what ``config.json`` says about heads and the model type.
        interleaved: gate and up alternate along the fused output (gpt-oss: ``gate_up[..., ::2]``,
            ``gate_up[..., 1::2]``) instead of being two halves.

    Returns:
        The parts (one unsplit ``Part("")`` when the layout is unknown or does not fit) and a note
        saying why a matrix was left unsplit or what was assumed; empty when nothing needs saying.
    """
    stored, leaf = leaf, leaf.lower()
    if role == "gate_up":
        if out_dim % 2:
            return (Part(""),), f"{stored} has an odd number of rows ({out_dim}); left unsplit"
        if interleaved:
            return (Part("gate", torch.arange(0, out_dim, 2)), Part("up", torch.arange(1, out_dim, 2))), ""
        half = out_dim // 2  # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1); Llama-4, Mixtral (3-D) alike
        first, second = ("up", "gate") if set(rel_path.split(".")) & _UP_FIRST.get(arch.model_type or "", set()) else ("gate", "up")
        return (Part(first, torch.arange(0, half)), Part(second, torch.arange(half, out_dim))), ""
    if role == "kv":
        return _latent_kv(stored, out_dim, arch)
    if role != "qkv":
        return (Part(""),), ""
    hd, heads, kv = arch.head_dim, arch.num_heads, arch.num_kv_heads
    if leaf == "c_attn":
        cross = "crossattention" in rel_path.lower().split(".")
        if arch.conv1d:
            if cross:  # GPT-2 cross-attention: q from q_attn, c_attn(enc).split(d, dim=2) -> k, v
                if out_dim != 2 * in_dim:
                    return (Part(""),), f"cross-attention c_attn has {out_dim} rows, not 2x{in_dim} (k, v); left unsplit"
                return blocks(("k", "v"), (in_dim, in_dim))
            if out_dim != 3 * in_dim:  # GPT-2: c_attn(x).split(d, dim=2) -> q, k, v, equal blocks of d rows
                return (Part(""),), f"c_attn has {out_dim} rows, not 3x{in_dim} (q, k, v); left unsplit"
            return blocks(("q", "k", "v"), (in_dim,) * 3)
        if cross:
            return (Part(""),), "cross-attention c_attn (k, v of the encoder states) is left unsplit"
        if arch.model_type == "gpt_bigcode" and hd and heads and kv == heads and out_dim == 3 * heads * hd:
            # GPT-BigCode without multi-query: c_attn(x).view(heads, 3·head_dim): q, k, v per head
            idx = torch.arange(out_dim).view(heads, 3, hd)
            return tuple(Part(s, idx[:, i].reshape(-1)) for i, s in enumerate("qkv")), ""
        if hd and heads and kv:  # GPT-BigCode multi-query, Qwen-1: q rows, then k and v blocks
            return blocks(("q", "k", "v"), (heads * hd, kv * hd, kv * hd), out_dim)
        return (Part(""),), ("c_attn is split with config.json (GPT-2's Conv1D layout, or head counts); "
                             "none was read; left unsplit")
    if leaf == "query_key_value":
        layout = arch.falcon_layout or "interleaved"
        if layout == "multi_query" and hd:
            nq = out_dim - 2 * hd
            return blocks(("q", "k", "v"), (nq, hd, hd), out_dim)
        if layout == "new" and hd and heads and kv:
            group = heads // kv + 2  # per kv head: its q heads, then k, then v
            idx = torch.arange(out_dim).view(-1, group, hd) if out_dim == kv * group * hd else None
            if idx is None:
                return (Part(""),), f"query_key_value has {out_dim} rows, not {kv}x{group}x{hd}; left unsplit"
            return (Part("q", idx[:, :-2].reshape(-1)), Part("k", idx[:, -2].reshape(-1)), Part("v", idx[:, -1].reshape(-1))), ""
        no_gqa = arch.model_type in _NO_GQA  # their attention reads no kv head count, whatever config.json holds
        if heads and (kv is None or kv == heads or no_gqa) and out_dim % (3 * heads) == 0:
            # GPT-NeoX / Bloom / Falcon-RW (no GQA): rows are view(heads, 3, head_dim, hidden)
            idx = torch.arange(out_dim).view(heads, 3, out_dim // (3 * heads))
            return tuple(Part(s, idx[:, i].reshape(-1)) for i, s in enumerate("qkv")), ""
        if heads and kv and hd and kv != heads and out_dim == (heads + 2 * kv) * hd:
            # grouped-query models with this name (ChatGLM2/3) store q, k, v as row blocks
            return blocks(("q", "k", "v"), (heads * hd, kv * hd, kv * hd), out_dim)
        return (Part(""),), "query_key_value layout needs config.json head counts (num_attention_heads, kv heads) to split; left unsplit"
    if leaf == "qkv":  # ViT-style attn.qkv: qkv(x).reshape(…, 3, heads, head_dim), three equal row blocks
        vh, vkv = arch.vision_heads, arch.vision_kv_heads
        vision = any(c.startswith("vis") for c in rel_path.lower().split("."))  # visual., vision_tower., vision_model.
        if vision and vh and vkv and vkv != vh:  # grouped-query vision attention: qkv(x).split([q_dim, kv_dim, kv_dim])
            if out_dim % (vh + 2 * vkv):
                return (Part(""),), (f"{stored} has {out_dim} rows, not (heads {vh} + 2 × kv heads {vkv}) × head_dim "
                                     "(q, k, v: vision_config in config.json); left unsplit")
            d = out_dim // (vh + 2 * vkv)
            return blocks(("q", "k", "v"), (vh * d, vkv * d, vkv * d), out_dim)
        if out_dim % 3:
            return (Part(""),), f"{stored} has {out_dim} rows, not three equal blocks (q, k, v); left unsplit"
        parts, _ = blocks(("q", "k", "v"), (out_dim // 3,) * 3, out_dim)
        # no config.json (an adapter alone), or grouped-query vision heads on a path not named as the vision tower's:
        # its rows may not be thirds, which nothing here shows
        if vision and vh is None and arch.model_type is None:
            return parts, ("split in three equal blocks (q, k, v) as a ViT's; no config.json gives the vision tower's head "
                           "counts (a grouped-query one, EXAONE 4.5's, splits otherwise): pass the base")
        if vh and vkv and vkv != vh:
            return parts, (f"split in three equal blocks (q, k, v) as a ViT's: config.json's vision_config has {vh} heads and "
                           f"{vkv} kv heads, but this path is not named as its vision tower's (visual., vision_…)")
        return parts, ""
    if leaf == "in_proj_weight":  # torch.nn.MultiheadAttention: F._in_projection_packed's w.chunk(3): q, k, v
        if out_dim != 3 * in_dim:
            return (Part(""),), f"in_proj_weight has {out_dim} rows, not 3x{in_dim} (q, k, v); left unsplit"
        return blocks(("q", "k", "v"), (in_dim,) * 3)
    # qkv_proj (Phi-3), W_pack (Baichuan), wqkv: MPT and ModernBERT chunk it into q, k, v row blocks; InternLM2
    # uses a grouped layout we do not guess (DBRX's GQA blocks need attn_config's kv heads, which are not read)
    if leaf == "wqkv" and arch.model_type in _WQKV_BLOCKS:
        return blocks(("q", "k", "v"), (in_dim,) * 3, out_dim)
    if leaf == "wqkv" and arch.model_type is None:  # an adapter diffed alone, a file without its config.json
        return (Part(""),), ("wqkv left unsplit: its layout is the model type's (MPT and ModernBERT chunk it into q, k, v; "
                             "InternLM2 groups it by kv head), and no config.json says which")
    if leaf == "wqkv":
        return (Part(""),), "wqkv uses a grouped layout; left unsplit"
    if leaf == "qkv_proj" and arch.model_type in _QKV_PROJ_LAYOUTS:
        return _known_qkv_proj(_QKV_PROJ_LAYOUTS[arch.model_type], out_dim, arch)
    if hd and heads and kv and out_dim == (heads + 2 * kv) * hd:
        parts, note = blocks(("q", "k", "v"), (heads * hd, kv * hd, kv * hd), out_dim)
        if leaf == "qkv_proj" and arch.model_type is not None and arch.model_type not in _QKV_PROJ_BLOCKS and not note:
            # other models with a qkv_proj interleave it (CodeGen, MiniMax): say what was assumed
            note = (f"qkv_proj split as q, k, v row blocks (Phi-3's layout); spectra does not know model type "
                    f"{arch.model_type!r}'s layout: check its attention code if q, k, v are interleaved")
        return parts, note
    if (out_dim - in_dim) > 0 and (out_dim - in_dim) % 2 == 0:
        kvd = (out_dim - in_dim) // 2
        parts, note = blocks(("q", "k", "v"), (in_dim, kvd, kvd), out_dim)
        return parts, "split assuming q has `in` rows (no config.json head counts)"
    return (Part(""),), f"{stored} has {out_dim} rows that do not split into q, k, v; left unsplit"


def _latent_kv(stored: str, out_dim: int, arch: ArchInfo) -> tuple[tuple[Part, ...], str]:
    """k and v of DeepSeek-V2/V3's ``kv_b_proj``: ``kv_b_proj(c).view(…, heads, nope + v_dim)`` split into
    ``[qk_nope_head_dim, v_head_dim]`` per head."""
    heads, nope, vd = arch.num_heads, arch.qk_nope_head_dim, arch.v_head_dim
    if not heads or not nope or not vd:
        return (Part(""),), (f"{stored} (k and v per head) is split with config.json's num_attention_heads, "
                             "qk_nope_head_dim and v_head_dim; none was read; left unsplit")
    if out_dim != heads * (nope + vd):
        return (Part(""),), f"{stored} has {out_dim} rows, not {heads} heads x ({nope} + {vd}); left unsplit"
    idx = torch.arange(out_dim).view(heads, nope + vd)
    return (Part("k", idx[:, :nope].reshape(-1)), Part("v", idx[:, nope:].reshape(-1))), ""


def blocks(names: Sequence[str], sizes: Sequence[int], total: int | None = None) -> tuple[tuple[Part, ...], str]:
    if total is not None and (sum(sizes) != total or min(sizes) <= 0):
        return (Part(""),), f"fused rows ({total}) do not match the config's q/k/v sizes {tuple(sizes)}; left unsplit"
    parts, start = [], 0
    for n, s in zip(names, sizes, strict=True):
        parts.append(Part(n, torch.arange(start, start + s)))
        start += s
    return tuple(parts), ""


#: ``config.json`` model types with modules whose ``gate_up_proj`` holds up first: Phi-4-multimodal's
#: audio conformer (``up_states, gate = gate_up_proj(x).chunk(2)``; its language model is gate first).
_UP_FIRST: Mapping[str, frozenset[str]] = {"phi4_multimodal": frozenset({"feed_forward_in", "feed_forward_out"})}

#: ``config.json`` model types whose ``qkv_proj`` is three row blocks q, k, v (Phi-3's
#: ``qkv[..., :q_pos]``, ``qkv[..., q_pos:q_pos + kv]``, ``qkv[..., q_pos + kv:]``).
_QKV_PROJ_BLOCKS = frozenset({"phi3", "phi4_multimodal", "phi4mm"})

#: ``config.json`` model types whose ``Wqkv`` is q, k, v row blocks of equal size (``chunk(3)``, ``view(…, 3, -1, head_dim)``)
_WQKV_BLOCKS = frozenset({"mpt", "modernbert"})

#: ``config.json`` model types whose ``qkv_proj`` rows interleave q, k, v. The value says how:
#: ``("blocks", n, order)``: n equal blocks of rows, each holding its share of the parts in ``order``
#: (CodeGen: ``qkv.view(..., 4, 3 * local).split(local)`` gives query, value, key per block);
#: ``("heads", order)``: per attention head, ``head_dim`` rows of each part in ``order`` (MiniMax's
#: linear attention: ``reshape(..., heads, 3 * head_dim)`` then ``split(head_dim)``).
_QKV_PROJ_LAYOUTS: Mapping[str, tuple[Any, ...]] = {
    "codegen": ("blocks", 4, ("q", "v", "k")),
    "minimax": ("heads", ("q", "k", "v")),
}


def _known_qkv_proj(layout: tuple[Any, ...], out_dim: int, arch: ArchInfo) -> tuple[tuple[Part, ...], str]:
    """Parts of a ``qkv_proj`` whose model type interleaves q, k, v (see ``_QKV_PROJ_LAYOUTS``)."""
    if layout[0] == "blocks":
        _, n_blocks, order = layout
        if out_dim % (3 * n_blocks):
            return (Part(""),), f"qkv_proj has {out_dim} rows, not {n_blocks} blocks of q, v, k; left unsplit"
        idx = torch.arange(out_dim).view(n_blocks, 3, out_dim // (3 * n_blocks))
    else:
        _, order = layout
        heads, hd = arch.num_heads, arch.head_dim
        if not heads or not hd or out_dim != 3 * heads * hd:
            return (Part(""),), (f"qkv_proj has {out_dim} rows, not 3 x heads x head_dim from config.json; "
                                 "left unsplit")
        idx = torch.arange(out_dim).view(heads, 3, hd)
    by_name = {name: Part(name, idx[:, i].reshape(-1)) for i, name in enumerate(order)}
    return (by_name["q"], by_name["k"], by_name["v"]), ""


__all__ = ["ArchInfo", "Part", "blocks", "split_fused"]
