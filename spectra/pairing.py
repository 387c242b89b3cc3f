"""Pair the matrices of a base and a tuned checkpoint by layer and module.

Names are matched exactly first, then by :func:`spectra.naming.pairing_key` (wrapper prefixes such as
``model.``, ``transformer.`` or ``bert.`` dropped), so a ``LlamaForCausalLM`` checkpoint pairs with a
``LlamaModel`` one. Everything that does not become a pair is accounted for: tensors found on one
side only, and tensors found on both sides that are not analysable matrices (1-D norms and biases,
integer tensors, quantisation scales, empty tensors, shape mismatches), each with a reason. A
quantised weight with a companion scale is analysed dequantised
(:meth:`spectra.io.checkpoint.Checkpoint.load`), and its pair says so in its note.

Each side is oriented by its own ``config.json`` (GPT-2's Conv1D stores ``(in, out)``). When the two
sides disagree on a tensor's layout (``gpt2`` against ``gpt_bigcode`` over the same names), the pair
is formed only if each side's shapes confirm its own layout (:func:`layout_confirmed`), and the note
says so; otherwise it is an error, never ``W_t − W_bᵀ`` in silence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spectra.adapter_files import AdapterFile, adapter_file, factor_of
from spectra.errors import CheckpointFormatError, PairingError
from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, read_notes
from spectra.name_match import match_names
from spectra.naming import MatrixSpec, Part, foreign_quant_of, is_bias, pairing_key, quant_param_of, spec_order
from spectra.pairing_notes import (
    PAIRING_NOTE_PREFIX,
    RESIZED_NOTE,
    counts_differ,
    expert_layouts_differ,
    head_tie_unknown_note,
    head_tied_in_tuned_only,
    prefix_dropped,
    spelling_differs,
    tie_unknown,
)
from spectra.stored_bytes import stored_copies

#: Dtypes of buffers that are no weights when both sides hold them under a name other than ``….weight`` (int64
#: position ids, a bool mask); packed quantised weights are int8, uint8 or int32 (GPTQ's ``qweight``), which stay
#: "not a float weight".
BUFFER_DTYPES = frozenset({"bool", "int64"})
#: Last name components of tensors of a weight's shape that are no linear map, and why: an optimizer's state saved with the
#: weights (``optim.state.<param>.exp_avg``: Adam's moments, SGD's momentum), a Mamba mixer's ``A_log`` (A = −exp(A_log)).
NOT_WEIGHTS = {**dict.fromkeys(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"), "optimizer state ({leaf} of a parameter), no weight"),
               "A_log": "an SSM's state parameter (A_log: A = −exp(A_log), diagonal per channel), not a linear map"}


@dataclass(frozen=True)
class Skipped:
    """A tensor (or matrix part) present in the inputs but not analysed, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class MatrixPair:
    """A base matrix and its tuned counterpart.

    Attributes:
        base: the base side's spec; ``base_info`` its stored tensor.
        tuned: the tuned side's spec (its name is the one results report); ``tuned_info`` likewise.
        rows: when the two sides have different numbers of rows (a resized vocabulary), the number of
            leading rows they share and that are analysed; else None.
        note: a caveat to report with every result of this pair; empty when none.
    """

    base: MatrixSpec
    tuned: MatrixSpec
    base_info: TensorInfo
    tuned_info: TensorInfo
    rows: int | None = None
    note: str = ""

    @property
    def stored_bytes(self) -> int:
        """Bytes read for this pair: both tensors as stored."""
        return self.base_info.nbytes + self.tuned_info.nbytes

    @property
    def out_in(self) -> tuple[int, int]:
        """``(out, in)`` of each analysed matrix of this pair (one expert's, for a stacked tensor):
        the tuned side's stored shape oriented by its layout, cut to the shared ``rows``."""
        out_dim, in_dim = oriented_shape(self.tuned, tuple(self.tuned_info.shape))[-2:]
        return (self.rows if self.rows is not None else out_dim), in_dim

    @property
    def sort_key(self) -> tuple:
        """Embeddings first, then layers in order, then matrices outside the stack (head): :func:`spec_order`."""
        return spec_order(self.tuned)


@dataclass
class Pairing:
    """The result of :func:`pair_checkpoints`."""

    pairs: list[MatrixPair] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)
    #: how the checkpoints were read (:attr:`spectra.io.checkpoint.Checkpoint.notes`), for the result's warnings
    notes: list[str] = field(default_factory=list)


def oriented_shape(spec: MatrixSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored ``shape`` in ``(…, out, in)`` orientation (``spec.transpose`` swaps the last two)."""
    return shape[:-2] + (shape[-1], shape[-2]) if spec.transpose else shape


#: How the skip reason of a tensor that is no weight matrix ends ("4-D tensor, " + it): esd --ww-compatible matches it.
NOT_MATRIX = "not a weight matrix"

#: Roles of tables indexed by token (or position): when the two sides' row counts differ (a resized
#: vocabulary) the leading rows both have are the same tokens and are paired.
VOCAB_ROLES = frozenset({"embed", "pos_embed", "head"})
EMBED_ROLES = VOCAB_ROLES - {"head"}

#: Roles whose matrix reads the model width (input = hidden size) or writes it (output = hidden size).
_READS_HIDDEN = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up", "q_a", "kv_a"})
_WRITES_HIDDEN = frozenset({"o", "down"})
#: Modules of a role in :data:`_READS_HIDDEN` that read a low-rank latent instead (DeepSeek's query up-projection,
#: role "q", reads q_lora_rank): their input width says nothing of the layout.
_READS_LATENT = frozenset({"q_b_proj"})


def layout_confirmed(ckpt: Checkpoint, specs: dict[str, MatrixSpec], *, transpose: bool, ndim: int) -> bool:
    """Whether ``ckpt``'s shapes confirm its layout for matrices of rank ``ndim`` stored with this
    ``transpose``: its ``config.json`` gives the model width, at least one such non-square matrix
    reads or writes it (q/k/v/gate/up read it, o/down write it), and every one has the width on that
    axis once oriented. Square matrices say nothing either way.
    """
    hidden = ckpt.arch.hidden_size
    if not hidden:
        return False
    confirmed = False
    for name, spec in specs.items():
        shape = tuple(ckpt.tensors[name].shape)
        if spec.transpose != transpose or len(shape) != ndim or shape[-1] == shape[-2]:
            continue
        out_dim, in_dim = oriented_shape(spec, shape)[-2:]
        if spec.role in _READS_HIDDEN and spec.rel_path.rpartition(".")[2].lower() not in _READS_LATENT:
            ok = in_dim == hidden
        elif spec.role in _WRITES_HIDDEN:
            ok = out_dim == hidden
        else:
            continue
        if not ok:
            return False
        confirmed = True
    return confirmed


def _layout(ckpt: Checkpoint, spec: MatrixSpec) -> str:
    mt = ckpt.arch.model_type
    return f"{'(in, out)' if spec.transpose else '(out, in)'} ({f'config.json model_type {mt!r}' if mt else 'no config.json model_type'})"


def _tensor_kind(shape: tuple[int, ...], spec: MatrixSpec | None) -> str:
    if spec is not None:
        return "a matrix" if len(shape) == 2 else f"a stack of {shape[0]} matrices"
    return "a scalar" if not shape else f"a {len(shape)}-D tensor"


#: What to do with a checkpoint of a quantisation format spectra does not dequantise.
DEQUANTISE_HINT = ("dequantise it first (load it with transformers, call model.dequantize() where the format has it, and "
                   "save_pretrained), or compare the float checkpoint it was quantised from")


def foreign_format(module: str, ckpt: Checkpoint) -> str | None:
    """The quantisation format (``"GPTQ/AWQ"``, ``"bitsandbytes 4-bit"``, ``"bitsandbytes int8"``, ``"MLX"``, ``"metal"``, ``"MXFP4"``)
    of module ``module`` in ``ckpt``, from the parameters stored beside its weight, or None."""
    names = ckpt.tensors
    if f"{module}.qweight" in names:
        return "GPTQ/AWQ"
    # exact names, no scan of every tensor name per module (quadratic: 100 s at 16,000 int8 matrices)
    if any(f"{module}.weight.{x}" in names for x in ("absmax", "quant_map", "quant_state.bitsandbytes__nf4",
                                                      "quant_state.bitsandbytes__fp4")):
        return "bitsandbytes 4-bit"
    if f"{module}.weight_packed" in names:
        return "compressed-tensors pack-quantized"
    if f"{module}.SCB" in names:
        return "bitsandbytes int8"
    if f"{module}.scales" in names and f"{module}.biases" in names:
        return "MLX"
    if f"{module}.scales" in names and f"{module}.qbiases" in names:
        return "metal"
    if foreign_quant_of(f"{module}_blocks", names) == module:
        return "MXFP4"
    return None  # (scales beside a packed weight alone: HIGGS, others; said "packed")


def _quant_param_reason(name: str, ckpt: Checkpoint) -> str | None:
    """Why a quantisation parameter is not analysed, or None when ``name`` is not one."""
    module = foreign_quant_of(name, ckpt.tensors)
    if module is not None:
        fmt = foreign_format(module, ckpt) or "packed"
        return (f"quantisation parameter ({name[len(module) + 1:]}) of {module}'s {fmt} weight, which spectra does not "
                f"dequantise: {DEQUANTISE_HINT}")
    found = quant_param_of(name)
    if found is None:
        return None
    weight, kind = found
    if not kind.startswith("weight_"):
        return f"activation/cache quantisation scale ({kind}), not a weight"
    ws = ckpt.scales.get(weight)
    if ws is not None and name in (ws.scale, ws.zero_point):
        return f"quantisation {'scale' if name == ws.scale else 'zero point'} of {weight}; applied to it"
    if weight in ckpt.tensors:
        return f"quantisation parameter ({kind}) of {weight}, which is stored as {ckpt.tensors[weight].dtype}, not fp8/int8; not applied"
    return f"quantisation parameter ({kind}) of {weight}, which this checkpoint does not hold"


def _packed_on_one_side(result: Pairing, base: Checkpoint, tuned: Checkpoint) -> None:
    """A module quantised by a format spectra does not read (GPTQ's ``X.qweight``…) on one side against the other's
    ``X.weight``: one skipped entry naming the format and the way out, its tensors taken off the one-sided lists (they
    were left there, "not paired", with no word of the quantisation)."""
    for side, ckpt, own, other in (("tuned", tuned, result.tuned_only, result.base_only),
                                   ("base", base, result.base_only, result.tuned_only)):
        # (an MXFP4 stack X_blocks pairs with the other side's parameter X itself: no ``.weight``)
        weights = {pairing_key(n): n for n in other if n.endswith(".weight") or f"{n}_blocks" in ckpt.tensors}
        modules = {n: foreign_quant_of(n, ckpt.tensors) or (n.rpartition(".")[0] if n.endswith(".qweight") else None)
                   for n in own}
        found: dict[str, str] = {}  # the other side's weight -> this side's quantised module
        for module in modules.values():
            if module and foreign_format(module, ckpt) and (w := weights.get(pairing_key(f"{module}.weight")) or weights.get(pairing_key(module))):
                found.setdefault(w, module)
        for w, module in found.items():
            result.skipped.append(Skipped(w, f"{side} stores this matrix packed by {foreign_format(module, ckpt)} quantisation, "
                                          f"which spectra does not dequantise: {DEQUANTISE_HINT}"))
        gone = set(found) | {n for n, module in modules.items() if module in set(found.values())}
        own[:] = [n for n in own if n not in gone]
        other[:] = [n for n in other if n not in gone]


def _tied_head(base: Checkpoint, tuned: Checkpoint, bspecs: dict[str, MatrixSpec], tspecs: dict[str, MatrixSpec], matched_b: set[str],
               matched_t: set[str]) -> tuple[MatrixSpec, MatrixSpec] | None:
    """A base that ties its output head to the input embedding stores no head, while a tuned copy saved
    untied (``tie_word_embeddings: false``) stores both: the base's head *is* its embedding, so the tuned
    head pairs with it. ``(base embedding spec, tuned head spec)``, or None when that is not the case
    (the base stores a head, says it is untied, or has no single embedding of the head's shape)."""
    heads = [tspecs[n] for n in tspecs if n not in matched_t and tspecs[n].role == "head"]
    if len(heads) != 1 or any(sp.role == "head" for sp in bspecs.values()):
        return None
    if (base.config or {}).get("tie_word_embeddings") is False or tie_unknown(base, tuned):
        return None
    embeds = [sp for sp in bspecs.values() if sp.role == "embed" and sp.layer is None]
    if len(embeds) != 1 or embeds[0].name not in matched_b:  # the tuned side has the embedding too
        return None
    bi, ti = base.tensors[embeds[0].name], tuned.tensors[heads[0].name]
    if oriented_shape(embeds[0], bi.shape) != oriented_shape(heads[0], ti.shape) or bi.dtype not in FLOAT_DTYPES \
            or ti.dtype not in FLOAT_DTYPES:
        return None
    return embeds[0], heads[0]


def _square_beside_transposes(result: Pairing, flipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """Where layer matrices of tuned are stored as exact transposes of the base's (``flipped``: name, base
    and tuned shapes; (32, 96) against (96, 32)) and no non-square layer matrix pairs as stored, tuned was
    saved in the other layout (GPT-2's Conv1D weights re-saved as nn.Linear by a conversion script, its
    config unchanged): its square layer matrices cannot show it, and paired as stored they would give
    Wᵀ − W. They move to ``skipped`` with why. In place."""
    layer = [p for p in result.pairs if p.tuned.layer is not None and len(p.base_info.shape) == 2]
    if not flipped or any(p.base_info.shape[0] != p.base_info.shape[1] for p in layer):
        return
    square = [p for p in layer if p.base_info.shape[0] == p.base_info.shape[1]]
    name, b, t = flipped[0]
    why = (f"square, while the other layer matrices of tuned are stored transposed against the base (e.g. {name}: base "
           f"{b} vs tuned {t}): tuned was saved in another layout, which a square matrix cannot show, so its rows "
           "cannot be lined up with the base's")
    result.skipped += [Skipped(p.tuned.name, why) for p in square]
    result.pairs[:] = [p for p in result.pairs if p not in square]
    result.notes.append(f"{PAIRING_NOTE_PREFIX}tuned stores its layer matrices transposed against the base ({len(flipped)} "
                        f"of them, e.g. {name}: base {b} vs tuned {t}), as a re-save in another layout with the config "
                        f"unchanged would; none of its {len(flipped) + len(square)} layer matrices is compared")


#: How :func:`_drop_aliases` begins its skip reasons (the stored tensor's kept name follows).
ALIAS_REASON = "the same stored tensor as"


def _drop_aliases(result: Pairing, base: Checkpoint, tuned: Checkpoint) -> None:
    """A pair whose base tensor and tuned tensor are both the same stored tensors as another pair's (tied weights saved
    whole by ``torch.save``: :attr:`spectra.io.checkpoint.TensorInfo.alias_of`; or embeddings saved as copies, the same
    bytes in both checkpoints: :func:`spectra.stored_bytes.stored_copies`) is that pair's update again: it moves to
    ``skipped`` with why. T5's one embedding was measured four times (``shared``, both stacks' ``embed_tokens``,
    ``lm_head``), and extract wrote a LoRA on each, which PEFT's merge added three times. The first pair stays. In place."""
    # embedding tables outside the stack (a stack the names do not show would be all-pairs reads); not heads: a head the
    # config ties goes by drop_tied_heads, and an untied head equal to its embedding is a separate weight all the same
    outside = [p for p in result.pairs if p.base.role in EMBED_ROLES and p.tuned.role in EMBED_ROLES and p.tuned.layer is None]
    cb, ct = (stored_copies(c, {getattr(p, side).name for p in outside}) for c, side in ((base, "base_info"), (tuned, "tuned_info")))

    def key(p: MatrixPair) -> tuple[str, str, str]:
        part = p.tuned.name[len(p.tuned_info.name):] if p.tuned.name.startswith(p.tuned_info.name) else p.tuned.name
        b, t = p.base_info, p.tuned_info
        return b.alias_of or cb.get(b.name) or b.name, t.alias_of or ct.get(t.name) or t.name, part

    first: dict[tuple[str, str, str], MatrixPair] = {}
    for p in sorted(result.pairs, key=lambda p: (key(p)[0] != p.base_info.name) + (key(p)[1] != p.tuned_info.name)):
        first.setdefault(key(p), p)
    if len(first) == len(result.pairs):
        return
    for p in result.pairs:
        kept = first[key(p)]
        if kept is not p:
            how = "" if p.base_info.alias_of or p.tuned_info.alias_of else ", the same bytes in both checkpoints"  # or copies
            result.skipped.append(Skipped(p.tuned.name, f"{ALIAS_REASON} {kept.tuned.name} (tied weights saved under several "
                                                        f"names{how}): measured there"))
    result.pairs[:] = [p for p in result.pairs if first[key(p)] is p]


def pair_by_base_names(base: Checkpoint, tuned: Checkpoint, *, aliases: bool = True) -> Pairing:
    """:func:`pair_checkpoints` for callers that key each pair by the base's tensor name (``trace``,
    ``interfere``): a tuned output head that a tied base can only pair with its embedding would be keyed as
    that embedding, so it is left out, as without ``tied_head``, but said (a pairing note, and ``skipped``):
    unpaired, it had gone unmentioned while the head changed. ``aliases``: as :func:`pair_checkpoints`."""
    pairing = pair_checkpoints(base, tuned, tied_head=True, aliases=aliases)
    tied = [p for p in pairing.pairs if p.base.role != p.tuned.role and p.tuned.role == "head"]
    for p in tied:
        why = (f"an output head the base ties to its embedding {p.base.name} (the base stores no head): not followed "
               "here, where matrices are the base's; spectra diff BASE TUNED measures it against that embedding")
        pairing.skipped.append(Skipped(p.tuned.name, why))
        pairing.notes.append(f"{PAIRING_NOTE_PREFIX}{p.tuned.name} is {why}")
    pairing.pairs[:] = [p for p in pairing.pairs if p not in tied]
    return pairing


def drop_tied_heads(pairing: Pairing, base: Checkpoint, tuned: Checkpoint) -> None:
    """For a diff: the pair of an output head that the models tie to their embedding (the tuned config says
    ``tie_word_embeddings: true``, and the base's does too or the base stores no head) is the embedding's
    update a second time, as transformers loads the embedding as the head, whatever head is stored: it
    moves to ``skipped`` with why, instead of a second row of the same numbers that ``recommend`` then
    budgeted twice. Only where one embedding of the head's shape pairs. In place."""
    if base is tuned or (tuned.config or {}).get("tie_word_embeddings") is not True:
        return
    if any(sp.role == "head" for sp in base.specs.values()) and (base.config or {}).get("tie_word_embeddings") is not True:
        return  # an untied base stores its own head: tuned embedding minus that head is a real update
    embeds = [p for p in pairing.pairs if p.tuned.role == "embed" and p.tuned.layer is None]
    if len(embeds) != 1:
        return
    kept = []
    for p in pairing.pairs:
        if p.tuned.role == "head" and p.tuned.layer is None and p.out_in == embeds[0].out_in:
            pairing.skipped.append(Skipped(p.tuned.name, f"tied to {embeds[0].tuned.name} (tie_word_embeddings: true): "
                                                         "the model's head is that embedding, whose update is measured there"))
        else:
            kept.append(p)
    pairing.pairs[:] = kept


def pair_tied_heads(heads: dict[str, tuple[MatrixSpec, str]], pairs: dict[str, MatrixPair], names: dict[str, str],
                    tuned: Checkpoint | None) -> dict[str, str]:
    """For ``compare``: a full fine-tune's pair for each output head that the other input, an adapter, updates
    by a LoRA on a tied base (``heads``: pairing key -> (the head's spec, the base embedding it is measured
    against), as :func:`spectra.adapter_diff.adapter_updates` pairs it). A tuned model that ties its head too
    (it stores no head, and its config does not say untied) computes its head with its embedding, so its head's
    update is that embedding's: the embedding's pair (ΔW = tuned − base embedding, vocab × hidden as the head's
    LoRA is) is added to ``pairs`` under the head's key, the tuned name to ``names``; else the head stayed
    unpaired and was called one-sided, though the full side changed it. A tuned model that stores its own
    head (untied) keeps its own pairing. In place; returns the head's name -> the tuned embedding's, per pair added."""
    if tuned is None or (tuned.config or {}).get("tie_word_embeddings") is False \
            or any(sp.role == "head" for sp in tuned.specs.values()):
        return {}
    by_base = {p.base.name: p for p in pairs.values() if p.base.role == p.tuned.role}
    added = {k: (spec.name, by_base[embed]) for k, (spec, embed) in heads.items() if k not in pairs and embed in by_base}
    pairs.update({k: pair for k, (_, pair) in added.items()})
    names.update({k: pair.tuned.name for k, (_, pair) in added.items()})
    return {head: pair.tuned.name for head, pair in added.values()}


def _refuse_unmerged_peft(ckpt: Checkpoint, alone: list[str], other_alone: list[str], side: str) -> None:
    """Refuse a checkpoint that holds a module as an unmerged PEFT layer (``X.base_layer.weight``
    beside ``X.lora_A.<adapter>.weight``) where the other input holds it as a plain ``X.weight``: that
    side's weights are the base's and its update sits in factors a full diff does not read, so the
    matrix would read as unchanged. (A model that ships such layers on both sides, as Phi-4-multimodal
    does, pairs them tensor by tensor.)"""
    plain = {pairing_key(n) for n in other_alone}
    kinds = {f[1]: f[0] for n in alone if (f := factor_of(n)) is not None}  # the modules that hold factors: their kind
    for n in alone:
        module = pairing_key(n).removesuffix(".base_layer") if n.endswith(".base_layer.weight") else None
        if module is not None and module in plain and (kind := kinds.get(n.removesuffix(".base_layer.weight"))):
            fix = ("pass the adapter folder (PeftModel.save_pretrained) as TUNED, or merge it (merge_and_unload()) and save the model"
                   if side == "tuned" else "merge it (merge_and_unload()) and save the model, or pass the model it was made from as BASE")
            raise CheckpointFormatError(
                f"{side} is the state dict of an unmerged PEFT model ({n} beside its {kind} factors, where the other "
                f"input stores the plain weight): its {kind} updates are not in its weights", path=ckpt.label, hint=fix)


def _vocabulary_rows(ckpt: Checkpoint, specs: dict[str, MatrixSpec]) -> int | None:
    """Rows of the checkpoint's one input embedding (role ``embed`` outside the layers): its vocabulary
    size; None when it has no single such matrix."""
    embeds = [sp for sp in specs.values() if sp.role == "embed" and sp.layer is None and len(ckpt.tensors[sp.name].shape) == 2]
    if len(embeds) != 1:
        return None
    return int(oriented_shape(embeds[0], tuple(ckpt.tensors[embeds[0].name].shape))[-2])


def _same_parts(a: tuple[Part, ...], b: tuple[Part, ...]) -> bool:
    """Whether two splits of a fused matrix take the same rows for the same parts."""
    return len(a) == len(b) and all(x.suffix == y.suffix and (x.rows is None) == (y.rows is None)
                                    and (x.rows is None or torch.equal(x.rows, y.rows)) for x, y in zip(a, b))


def _parts_text(parts: tuple[Part, ...]) -> str:
    """``"q (rows 0-15), k (rows 16-31, …)"``: each part and where its rows start, in words."""
    def rows(p: Part) -> str:
        if p.rows is None or p.rows.numel() == 0:
            return "all rows"
        r = p.rows.tolist()
        contiguous = r == list(range(r[0], r[0] + len(r)))
        return f"rows {r[0]}-{r[-1]}" if contiguous else f"rows {', '.join(map(str, r[:3]))}, … ({len(r)} rows)"
    return ", ".join(f"{p.suffix} ({rows(p)})" for p in parts)


def skip_summary(skipped: list[Skipped], *, limit: int = 3) -> str:
    """Why tensors were skipped, one phrase: the reasons grouped by their text before any ``:`` (which
    drops per-tensor details such as two shapes), most frequent first, each with a count and an example,
    e.g. ``"12 × dtype int8 is not a float weight (…) (e.g. l.0.q_proj.weight); 3 × shape mismatch (e.g. l.1.o.weight:
    base (4, 8) vs tuned (8, 4))"``.

    >>> skip_summary([Skipped("a", "shape mismatch: base (2, 3) vs tuned (3, 2)"), Skipped("b", "empty")])
    '1 × empty (e.g. b); 1 × shape mismatch (e.g. a: base (2, 3) vs tuned (3, 2))'
    """
    groups: dict[str, list[Skipped]] = {}
    for s in skipped:
        groups.setdefault(s.reason.split(":")[0].strip() or "no reason given", []).append(s)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = [f"{len(v)} × {reason} (e.g. {v[0].name}" + (f": {v[0].reason.split(':', 1)[1].strip()})" if ":" in v[0].reason
                                                         else ")") for reason, v in ranked[:limit]]
    return "; ".join(parts) + ("; …" if len(ranked) > limit else "")


def refuse_lora_file(ckpt: Checkpoint) -> AdapterFile | None:
    """Raise PairingError when ``ckpt`` is an adapter's weights file given as a model
    (:func:`spectra.adapter_files.adapter_file`): it pairs with nothing, or only its saved copies, and "same
    architecture?" would send its user looking for the wrong mistake. Returns the factors found beside their modules'
    weights (a model, which :func:`pair_checkpoints` says), else None."""
    found = adapter_file(ckpt.tensors)
    if found and not found.unmerged:
        raise PairingError(found.message, path=ckpt.label, hint=found.hint)
    return found


def _raise_nothing_paired(base: Checkpoint, tuned: Checkpoint, skipped: list[Skipped]) -> None:
    """The one-line error when no matrix pairs: every one skipped (with why), or nothing to pair."""
    single = base is tuned
    path = base.label if single else f"{base.label} vs {tuned.label}"
    if skipped:
        what = "tensor" if single else "tensor pair"
        raise PairingError(
            f"every {what} was skipped, none is analysed: {skip_summary(skipped)}", path=path,
            hint="only float weight matrices (2-D, or 3-D expert stacks) are analysed; `spectra inspect` shows how each "
                 "tensor is understood" + ("" if single else "; are both checkpoints of the same architecture?"))

    def sample(names: list[str]) -> str:
        return ", ".join(names[:2]) or "no tensors"
    if single:
        raise PairingError(f"no weight matrix found (it holds e.g. {sample(list(base.tensors))})", path=path,
                           hint="`spectra inspect` shows how each tensor is understood")
    for side, ckpt, other in (("tuned", tuned, base), ("base", base, tuned)):
        if found := _models_under_prefixes(ckpt, other):  # a DPO file (policy., ref_model.), a teacher and a student
            raise PairingError(
                f"no weight matrix of the base pairs with the tuned checkpoint: {side} holds "
                + (f"{len(found)} models, under {' and '.join(repr(f + '.') for f in found)}" if len(found) > 1 else
                   f"its model under {found[0] + '.'!r}") + ", which pair with the other checkpoint once that prefix is dropped",
                path=path, hint=f"save the one you mean alone, its names without the prefix: {{k[len('{found[0]}.'):]: v for k, v in "
                                f"state_dict.items() if k.startswith('{found[0]}.')}}")
    raise PairingError(
        f"no weight matrix of the base pairs with the tuned checkpoint (base has e.g. {sample(list(base.tensors))}; "
        f"tuned has e.g. {sample(list(tuned.tensors))})", path=path,
        hint="are both checkpoints of the same architecture? `spectra inspect` shows how each is understood",
    )


def _models_under_prefixes(ckpt: Checkpoint, other: Checkpoint) -> list[str]:
    """The first name components of ``ckpt`` under which it holds tensors that ``other`` stores without that component
    (``policy.model.layers.0…`` against ``model.layers.0…``), in order; empty when there is none."""
    names = set(other.tensors)
    return sorted({n.split(".", 1)[0] for n in ckpt.tensors if "." in n and n.split(".", 1)[1] in names})


def pair_checkpoints(base: Checkpoint, tuned: Checkpoint, *, tied_head: bool = False, aliases: bool = True) -> Pairing:
    """Pair every matrix of ``tuned`` with its ``base`` counterpart.

    With ``aliases``, a pair whose two tensors are the same stored tensors as another pair's (tied weights a ``.bin``
    saved under several names) is skipped (:func:`_drop_aliases`); without, it is kept, for callers that match pairs
    by name against another input (``compare``, ``interfere``: an adapter's LoRA on ``lm_head`` or ``shared`` finds the
    full fine-tune's update of that stored tensor under its own name).

    With ``tied_head``, a tuned output head that a tied base does not store pairs with the base's
    embedding (:func:`_tied_head`); only for callers that key their pairs by the tuned name (diff,
    extract): that pair's base name is the embedding's, which the embedding's own pair also has.

    ``pair_checkpoints(ckpt, ckpt)`` (the same object twice) pairs one checkpoint with itself, as
    ``spectra esd`` does: skip reasons and errors then name no base or tuned side.

    Raises:
        PairingError: not a single matrix pairs (different architectures, or unrelated files), or every
            matrix was skipped (the message counts the reasons, :func:`skip_summary`).
    """
    single = base is tuned
    # refused before pairing, even where its saved copies (modules_to_save) would pair; factors beside weights: said
    beside = [f"{PAIRING_NOTE_PREFIX}{ckpt.label} {found.message}; {found.hint}" for ckpt in ((base,) if single else (base, tuned))
              if (found := refuse_lora_file(ckpt))]

    bspecs = base.specs
    tspecs = tuned.specs
    vocab_rows = (_vocabulary_rows(base, bspecs), _vocabulary_rows(tuned, tspecs))
    confirmed: dict[tuple[str, bool, int], bool] = {}  # (side, transpose, ndim) -> layout_confirmed

    def confirms(side: str, transpose: bool, ndim: int) -> bool:
        if (side, transpose, ndim) not in confirmed:
            ckpt, specs = (base, bspecs) if side == "base" else (tuned, tspecs)
            confirmed[(side, transpose, ndim)] = layout_confirmed(ckpt, specs, transpose=transpose, ndim=ndim)
        return confirmed[(side, transpose, ndim)]

    result = Pairing(notes=read_notes((base, None if single else tuned)))
    matched_b: set[str] = set()
    matched_t: set[str] = set()
    flipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # layer matrices stored transposed on one side
    matches = match_names(base.tensors, tuned.tensors)
    for bn, tn in matches:
        matched_b.add(bn)
        matched_t.add(tn)
        bi, ti = base.tensors[bn], tuned.tensors[tn]
        bs, ts = bspecs.get(bn), tspecs.get(tn)
        if why := NOT_WEIGHTS.get(leaf := tn.rpartition(".")[2]):  # a flat dump of the optimizer beside the weights…
            result.skipped.append(Skipped(tn, why.format(leaf=leaf)))
            continue
        if bs is None or ts is None:
            quant = _quant_param_reason(tn, tuned) or _quant_param_reason(bn, base)
            if quant is None and (bs is None) != (ts is None) and not (is_bias(tn) or is_bias(bn)):
                result.skipped.append(Skipped(tn, f"shape mismatch: base {tuple(bi.shape)} is {_tensor_kind(tuple(bi.shape), bs)}, "
                                                  f"tuned {tuple(ti.shape)} is {_tensor_kind(tuple(ti.shape), ts)}"))
                continue
            ndim = len(ti.shape) if ts is None else len(bi.shape)
            what = "1-D tensor (norm or bias)" if ndim == 1 else f"{ndim}-D tensor"
            if ndim > 1 and is_bias(tn):  # gpt-oss's experts.gate_up_proj_bias (experts, out)
                what = "per-expert bias" if ndim == 2 and "experts" in tn.split(".") else f"{ndim}-D bias"
            result.skipped.append(Skipped(tn, quant or f"{what}, {NOT_MATRIX}"))
            continue
        bad = [f"{side} dtype {i.dtype}" for side, i, n, c in (("base", bi, bn, base), ("tuned", ti, tn, tuned))
               if i.dtype not in FLOAT_DTYPES and n not in c.scales]
        if single and bad:  # one checkpoint analysed alone (esd): it has no base and tuned side
            bad = [f"dtype {ti.dtype}"]
        if bad:
            fmt = next((f"{side} packed by {f} quantisation" for side, n, c in (("base", bn, base), ("tuned", tn, tuned))
                        if (f := foreign_format(n.removesuffix(".qweight").removesuffix(".weight"), c))), None)
            # a complex (or bool) tensor is no quantised weight either: say what it is instead
            odd = all(b.rpartition(" ")[2].startswith(("complex", "bool")) for b in bad)
            if (not fmt and len(bad) == (1 if single else 2) and all(b.rpartition(" ")[2] in BUFFER_DTYPES for b in bad)
                    and not tn.endswith(".weight")):
                # int64 position ids, a bool mask on both sides: no weight was left out (not counted as one); a
                # tensor named as a weight stays one left out, whatever it holds
                result.skipped.append(Skipped(tn, f"{', '.join(bad)}: an integer or boolean buffer (indices, a mask, a counter), "
                                                  "not a weight matrix"))
                continue
            result.skipped.append(Skipped(tn, f"{', '.join(bad)} is not a float weight" + (
                f" ({fmt}, which spectra does not dequantise: {DEQUANTISE_HINT})" if fmt
                else " (not a real-valued weight matrix)" if odd
                else " (quantised checkpoints are not supported)")))
            continue
        empty = next((tuple(i.shape) for i in (ti, bi) if 0 in i.shape), None)
        if empty is not None:  # before any loop over its axes: a (2**30, 0) tensor must cost nothing
            result.skipped.append(Skipped(tn, f"empty tensor (shape {empty}): nothing to analyse"))
            continue
        rows, note = None, ""
        if bs.transpose != ts.transpose:
            if not (confirms("base", bs.transpose, len(bi.shape)) and confirms("tuned", ts.transpose, len(ti.shape))):
                raise PairingError(
                    f"base stores {bn} as {_layout(base, bs)} but tuned as {_layout(tuned, ts)}, and the shapes do not "
                    "confirm both layouts: comparing them would subtract a transposed matrix",
                    path=f"{base.label} vs {tuned.label}", tensor=tn,
                    hint="the two config.json files describe different architectures; give both sides the config of the "
                         "architecture their weights were saved from")
            note = (f"base stored {_layout(base, bs)}, tuned {_layout(tuned, ts)}: each oriented by its own config.json, "
                    f"as its shapes confirm, and compared as (out, in)")
        bshape, tshape = oriented_shape(bs, bi.shape), oriented_shape(ts, ti.shape)
        if bshape != tshape:
            # only a vocabulary (or position) table keeps its leading rows' meaning when resized; a
            # fused or resized projection's leading rows are other rows (a kv-head count, an MLP width)
            # by role, or by rows: a matrix with as many rows as its side's embedding is indexed by token
            # too (BERT's cls.predictions.decoder, RoBERTa's lm_head.decoder, ELECTRA's generator head)
            vocab = len(bs.parts) == len(ts.parts) == 1 and ({bs.role, ts.role} <= VOCAB_ROLES or (
                None not in vocab_rows and (bshape[-2], tshape[-2]) == vocab_rows))
            if vocab and bshape[:-2] == tshape[:-2] and bshape[-1] == tshape[-1] and len(bshape) == 2:
                rows = min(bshape[-2], tshape[-2])
                rows_note = (f"{RESIZED_NOTE}{bshape[-2]}, tuned {tshape[-2]}, e.g. a resized vocabulary): "
                             f"the {rows} leading rows both have are analysed")
                note = "; ".join(x for x in (note, rows_note) if x)
            else:
                if len(bshape) == 2 and bshape == tshape[::-1] and ts.layer is not None:
                    flipped.append((tn, tuple(bi.shape), tuple(ti.shape)))
                result.skipped.append(Skipped(tn, f"shape mismatch: base {tuple(bi.shape)} vs tuned {tuple(ti.shape)}"
                                              + ("" if vocab or len(bshape) != 2 or bshape[-1] != tshape[-1] else
                                                 " (only embedding and output-head rows are paired across a resize)")))
                continue
        if len(bs.parts) > 1 and len(ts.parts) > 1 and not _same_parts(bs.parts, ts.parts):
            # each side's config splits it differently (GPT-2's q, k, v blocks against GPT-BigCode's per-head
            # interleave): row i is not the same row on both sides, so neither the whole nor a part pairs
            result.skipped.append(Skipped(tn, "fused rows laid out differently: base splits them as "
                                          f"{_parts_text(bs.parts)} but tuned as {_parts_text(ts.parts)}"))
            continue
        # one checkpoint analysed alone (esd) has no base and tuned side: its one phrase, unprefixed
        deq = ([base.scales[bn].describe(bi.dtype)] if single and bn in base.scales else
               [f"{side} {c.scales[n].describe(i.dtype)}" for side, i, n, c in
                (("base", bi, bn, base), ("tuned", ti, tn, tuned)) if n in c.scales and not single])
        note = "; ".join(x for x in (note, *deq) if x)
        result.pairs.append(MatrixPair(bs, ts, bi, ti, rows, note))
    tied = _tied_head(base, tuned, bspecs, tspecs, matched_b, matched_t) if tied_head else None
    if tied is not None:
        bs, ts = tied
        matched_b.add(bs.name)
        matched_t.add(ts.name)
        said = (base.config or {}).get("tie_word_embeddings") is True
        # without a config.json saying so, a base storing no head may be a bare backbone: the tie is assumed, as said
        tie = (f"the base ties its output head to {bs.name} (it stores no {ts.name})" if said else
               f"the base stores no {ts.name} and no config.json says it ties its head: taken as tied to {bs.name}, "
               "transformers' default")
        result.pairs.append(MatrixPair(bs, ts, base.tensors[bs.name], tuned.tensors[ts.name], None,
                                       f"{tie}: the tuned head is compared with that embedding"))
    if aliases:
        _drop_aliases(result, base, tuned)
    if not single:
        _square_beside_transposes(result, flipped)
    result.base_only = [n for n in base.tensors if n not in matched_b]
    result.tuned_only = [n for n in tuned.tensors if n not in matched_t]
    if not single:
        _packed_on_one_side(result, base, tuned)
        _refuse_unmerged_peft(tuned, result.tuned_only, result.base_only, "tuned")
        _refuse_unmerged_peft(base, result.base_only, result.tuned_only, "base")
    for note in (expert_layouts_differ(result.base_only, result.tuned_only, bspecs, tspecs, base, tuned),
                 head_tied_in_tuned_only(result.base_only, bspecs, tspecs, tuned, base),
                 head_tie_unknown_note(result.base_only, result.tuned_only, tspecs, base, tuned) if tied_head else None,
                 spelling_differs(result.base_only, result.tuned_only, base, tuned),
                 prefix_dropped([(b, t) for b, t in matches if t in tspecs]),
                 *([] if single else counts_differ(bspecs, tspecs, base, tuned)), *beside):
        if note:
            result.notes.append(note)
    if not result.pairs:
        _raise_nothing_paired(base, tuned, result.skipped)
    result.pairs.sort(key=lambda p: p.sort_key)
    return result
