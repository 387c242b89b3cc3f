"""Notes on what pairing two checkpoints by name could not see: layouts, heads, counts and spellings that differ.

Each function returns a warning (beginning :data:`PAIRING_NOTE_PREFIX`) or None; none reads tensor data.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from spectra.io.checkpoint import Checkpoint
from spectra.io.training_folders import lone_shard
from spectra.naming import ENCODER_PREFIXES, MatrixSpec, pairing_key

if TYPE_CHECKING:
    from spectra.pairing import Pairing

#: The start of a warning about how the two checkpoints paired (printed by the CLI beside the read notes).
PAIRING_NOTE_PREFIX = "pairing: "


#: Begins the note of a table whose two sides have different row counts (a resized vocabulary), which
#: :meth:`spectra.results.DiffResult.not_compared` reads.
RESIZED_NOTE = "rows differ (base "

#: Begins the note of a matrix an adapter saved whole (PEFT's ``modules_to_save``), which ``spectra recommend`` reads.
SAVED_WHOLE = "trained whole (modules_to_save)"

#: How the pairing note on experts stored per matrix against 3-D stacks begins (:func:`spectra.trace_checks` reads it).
EXPERT_LAYOUT_NOTE = "the experts are stored one matrix per expert"


def expert_layouts_differ(base_only: list[str], tuned_only: list[str], bspecs: dict[str, MatrixSpec],
                          tspecs: dict[str, MatrixSpec], base: Checkpoint, tuned: Checkpoint) -> str | None:
    """A warning when one side stores its experts one matrix per expert (``experts.N.w1``) and the
    other as 3-D stacks (``experts.gate_up_proj``, transformers ≥ 5): the two layouts share no name, so
    every expert is unpaired; said once, with what to do, instead of leaving them in the unmatched lists."""
    def kinds(names: list[str], specs: dict[str, MatrixSpec], ckpt: Checkpoint) -> tuple[int, int]:
        per = sum(1 for n in names if n in specs and specs[n].expert is not None and len(ckpt.tensors[n].shape) == 2)
        stacked = sum(1 for n in names if n in specs and len(ckpt.tensors[n].shape) == 3)
        return per, stacked

    (bp, bs), (tp, ts) = kinds(base_only, bspecs, base), kinds(tuned_only, tspecs, tuned)
    if (bp and ts) or (bs and tp):
        per_side, stack_side = ("base", "tuned") if bp else ("tuned", "base")
        return (f"{PAIRING_NOTE_PREFIX}{EXPERT_LAYOUT_NOTE} in {per_side} ({bp or tp} matrices) but as 3-D stacks in "
                f"{stack_side} ({bs or ts} tensors): they pair with nothing and are not compared. Save both with the same "
                "transformers version (load and save_pretrained the older one) to compare them")
    return None


def head_tied_in_tuned_only(base_only: list[str], bspecs: dict[str, MatrixSpec], tspecs: dict[str, MatrixSpec],
                            tuned: Checkpoint, base: Checkpoint) -> str | None:
    """A warning when the base stores an output head that the tuned checkpoint does not (it ties the head
    to its embedding): the head's update, tuned embedding minus base head, is not measured, and an
    otherwise unchanged pair would read "identical"."""
    heads = [n for n in base_only if n in bspecs and bspecs[n].role == "head"]
    if len(heads) != 1 or any(sp.role == "head" for sp in tspecs.values()) or (tuned.config or {}).get("tie_word_embeddings") is False:
        return None
    if (base.config or {}).get("tie_word_embeddings") is True:
        return None  # the base's stored head is its embedding when loaded: the head's update is the embedding's, measured
    embeds = [sp.name for sp in tspecs.values() if sp.role == "embed" and sp.layer is None]
    tied_to = f"tied to {embeds[0]}" if len(embeds) == 1 else "tied to its embedding"
    return (f"{PAIRING_NOTE_PREFIX}the base stores an output head, {heads[0]}, the tuned checkpoint none (a head {tied_to}, "
            "or a model saved without its head): the head's update is not measured. Save the tuned model untied "
            "(tie_word_embeddings: false) to compare its head")


#: config.json keys of a model's layer count, and of its experts per MoE layer (Mixtral, Qwen2-MoE, DeepSeek)
_COUNT_KEYS = {"layer": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
               "expert": ("num_local_experts", "num_experts", "n_routed_experts")}
EXPERT_COUNT_KEYS = _COUNT_KEYS["expert"]


def _numbered(specs: dict[str, MatrixSpec], what: str) -> dict[str, set[int]]:
    """The layer (or expert) numbers each stack holds, by the pairing key before the number: ``model.layers`` and
    ``model.decoder.layers`` are two stacks, each layer's ``…experts`` list one (a number that is no component of
    the key, as in a fused name, counts in stack "the model"). An encoder prefix is not part of the stack's name
    (``vit.encoder.layer`` is ``encoder.layer``, as pairing drops it)."""
    stacks: dict[str, set[int]] = {}
    for sp in specs.values():
        if (n := getattr(sp, what)) is None:
            continue
        parts = sp.key.split(".")
        after = next((i for i, c in enumerate(parts) if c == str(sp.layer)), -1) if what == "expert" else -1
        at = next((i for i, c in enumerate(parts) if c == str(n) and i > after), None)
        first = 1 if parts[0] in ENCODER_PREFIXES and at is not None and at > 1 else 0
        stacks.setdefault("the model" if at is None else ".".join(parts[first:at]), set()).add(n)
    return stacks


def _shard_file(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint is one shard of a sharded model read alone (given as a file, or the one file of a folder;
    one rank of a model-parallel ``consolidated.NN.pth`` checkpoint is refused on opening)."""
    files = {info.file for info in ckpt.tensors.values()}
    return len(files) == 1 and lone_shard(next(iter(files))) is not None


def _span(what: str, numbers: set[int]) -> str:
    """``layers 0–3``, ``layer 3``, ``5 layers (0–7, with gaps)``."""
    x = sorted(numbers)
    if len(x) == 1:
        return f"{what} {x[0]}"
    return f"{what}s {x[0]}–{x[-1]}" if x[-1] - x[0] + 1 == len(x) else f"{len(x)} {what}s ({x[0]}–{x[-1]}, with gaps)"


def _stacks_differ(stacks: list[dict[str, set[int]]], counts: list[int | None], shard: tuple[bool, bool]) -> list[str]:
    """The stacks both sides hold whose numbers differ in a way pairing by number cannot absorb (:func:`counts_differ`)."""
    common = [g for g in stacks[0] if g in stacks[1]]
    # each side's largest stack among those the two hold alike: a side that holds fewer numbers than that in another
    # stack lost some there (one pass over the stacks: a hostile header of 10⁵ expert lists took minutes pairwise)
    alike = [max((len(stacks[s][g]) for g in common if stacks[0][g] == stacks[1][g]), default=0) for s in (0, 1)]
    differ = []
    for g in (g for g in common if stacks[0][g] != stacks[1][g]):
        sets = (stacks[0][g], stacks[1][g])
        fewer = 0 if len(sets[0]) < len(sets[1]) else 1
        pruned = alike[fewer] > len(sets[fewer]) and not shard[fewer]
        if (None not in counts and counts[0] != counts[1]) or not (sets[0] <= sets[1] or sets[1] <= sets[0]) or pruned:
            differ.append(g)
    return differ


def counts_differ(bspecs: dict[str, MatrixSpec], tspecs: dict[str, MatrixSpec], base: Checkpoint,
                  tuned: Checkpoint) -> list[str]:
    """Notes where a stack of layers (or a layer's MoE experts) holds other numbers on the two sides: both pair by
    number, so after a layer or expert removed or inserted (pruning, depth up-scaling) each one is measured against
    another one, which no shape check sees. Said when the config.json files give other counts, when neither side's
    numbers are a subset of the other's, or when the side holding fewer in one stack holds more in another that the
    two hold alike (a decoder pruned beside a whole encoder, experts pruned in one layer); not for a checkpoint
    holding some of its model's layers under their numbers (one shard read alone)."""
    notes = []
    shard = (_shard_file(base), _shard_file(tuned))
    for what, keys in _COUNT_KEYS.items():
        stacks = [_numbered(specs, what) for specs in (bspecs, tspecs)]
        counts = [next((c[k] for c in (cfg, (cfg or {}).get("text_config")) if isinstance(c, dict)  # a VLM's in text_config
                        for k in keys if isinstance(c.get(k), int)), None) for cfg in (base.config, tuned.config)]
        if not (differ := _stacks_differ(stacks, counts, shard)):
            continue
        # where some stacks are alike, the one that differs is named
        common = sum(1 for g in stacks[0] if g in stacks[1])
        where = f"in {differ[0]}{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''} " if len(differ) < common else ""
        how = "pruning, depth up-scaling" if what == "layer" else "expert pruning or merging"
        notes.append(f"{PAIRING_NOTE_PREFIX}{where}the base holds {_span(what, stacks[0][differ[0]])}, tuned "
                     f"{_span(what, stacks[1][differ[0]])}: {what}s pair by their number, so if {what}s were removed or "
                     f"inserted ({how}) every {what} after that point is measured against another one (a "
                     "‖ΔW‖_F / ‖W_base‖_F near √2 ≈ 1.4 shows unrelated weights)")
    return notes


def prefix_dropped(matches: list[tuple[str, str]]) -> str | None:
    """A note naming the encoder prefix (:data:`~spectra.naming.ENCODER_PREFIXES`) that pairing dropped from one
    side's names to pair ``(base name, tuned name)`` matches (a task model against its headless encoder), or None."""
    dropped: Counter[tuple[str, str]] = Counter()
    for b, t in (m for m in matches if m[0] != m[1]):
        for side, long, short in (("base", b, t), ("tuned", t, b)):
            head, _, tail = pairing_key(long).partition(".")
            if head in ENCODER_PREFIXES and tail and pairing_key(tail) == pairing_key(short):
                dropped[(side, head)] += 1
    if not dropped:
        return None
    (side, head), n = dropped.most_common(1)[0]
    return (f"{PAIRING_NOTE_PREFIX}{n} matri{'ces' if n != 1 else 'x'} paired after dropping {head!r} from the front of the {side}'s names (a "
            "model against its headless encoder); if the two sides are different models, they are not comparable")


def tie_unknown(base: Checkpoint, tuned: Checkpoint) -> bool:
    """Whether a base storing no head has no config.json at all (one that leaves ``tie_word_embeddings`` out
    means its model type's default, True for GPT-2's) while the tuned config says its own head is untied:
    the base may as well be a backbone without a head (a ``LlamaModel`` saved as one file), and the tuned
    head minus the base embedding would be no update at all."""
    return not base.config and (tuned.config or {}).get("tie_word_embeddings") is False


def head_tie_unknown_note(base_only: list[str], tuned_only: list[str], tspecs: dict[str, MatrixSpec], base: Checkpoint,
                           tuned: Checkpoint) -> str | None:
    """The note for a tuned head left unpaired by :func:`tie_unknown`."""
    heads = [n for n in tuned_only if n in tspecs and tspecs[n].role == "head" and tspecs[n].layer is None]
    if len(heads) != 1 or not tie_unknown(base, tuned) or any(sp.role == "head" for sp in base.specs.values()):
        return None
    return (f"{PAIRING_NOTE_PREFIX}the base stores no output head and has no config.json to say whether it ties the head to its embedding "
            f"(the tuned config says tie_word_embeddings: false): {heads[0]} is not compared; if the base ties them, "
            "give the base's folder with its config.json")


def spelling_key(name: str) -> str:
    """``name`` with its spelling normalised: Unicode NFC, case folded, ``/`` read as ``.``, spaces around
    each dotted part and repeated or outer dots removed (two names with one key differ only in how they
    are written)."""
    text = unicodedata.normalize("NFC", name).casefold().replace("/", ".")
    return ".".join(part.strip() for part in text.split(".") if part.strip())


def spelling_differs(base_only: list[str], tuned_only: list[str], base: Checkpoint, tuned: Checkpoint) -> str | None:
    """A warning when tensors on one side only have a counterpart of the same shape on the other whose
    name differs only in spelling (:func:`spelling_key`: case, Unicode form, spaces, separators): they are
    not paired, as a model loading one side by the other's names would not find them either; or None."""
    if not base_only or not tuned_only:
        return None
    keys: dict[str, str] = {}
    for n in base_only:
        keys.setdefault(spelling_key(n), n)
    near = [(keys[k], n) for n in tuned_only if (k := spelling_key(n)) in keys
            and tuple(base.tensors[keys[k]].shape) == tuple(tuned.tensors[n].shape)]
    if not near:
        return None
    b, t = near[0]
    return (f"{PAIRING_NOTE_PREFIX}{len(near)} tensor(s) of tuned have a name that differs from a base tensor's only in its "
            f"spelling (e.g. base {b!r}, tuned {t!r}: case, Unicode form, spaces or separators), with the same shape: not "
            "paired (names are matched exactly, as a model loads them); rename them on one side to compare them")


def unpaired_matrices(pairing: Pairing, ckpt: Checkpoint, keep: Callable[[str, int | None], bool] | None = None, *,
                      shapes: bool = True) -> tuple[str, bool]:
    """What of a full checkpoint's matrices does not pair with the base, in words, and whether that is most of them
    (more than half: a checkpoint of another model, which the trace marks failed rather than tracing its few
    matrices of matching shape against an unrelated base). ``("", False)`` when every matrix pairs.

    Counted: matrices whose shape differs from the base's (``shape mismatch`` skips of the pairing) and 2-D or larger
    weights the base lacks (``tuned_only``; not experts whose layout differs from the base's, which the pairing notes);
    a tensor the base has and the checkpoint lacks is a point skipped as
    "not in this checkpoint" by trace, and a head tied to the base's embedding has its own pairing note. ``keep(name,
    layer)``: the matrices the run's filters select (all: None); ``shapes``: count the shape mismatches (False where the
    caller lists them as skipped already)."""
    def kept(name: str) -> bool:
        spec = ckpt.specs.get(name)
        return keep is None or spec is None or keep(name, spec.layer)

    mismatched = [s for s in pairing.skipped if shapes and s.reason.startswith("shape mismatch") and kept(s.name)]
    # experts stored per matrix on one side and as 3-D stacks on the other pair with nothing, which the pairing's own
    # note says: the same model saved by another transformers version, not another model (they outnumber the rest)
    relayout = any(EXPERT_LAYOUT_NOTE in n for n in pairing.notes)
    extra = [n for n in pairing.tuned_only if n in ckpt.specs and len(ckpt.tensors[n].shape) >= 2 and kept(n)
             and not (relayout and (ckpt.specs[n].expert is not None or len(ckpt.tensors[n].shape) == 3))]
    if not mismatched and not extra:
        return "", False
    bad = len(mismatched) + len(extra)
    total = bad + sum(kept(p.tuned.name) for p in pairing.pairs)
    what = []
    if mismatched:  # the first one's two shapes, as the pairing gives them ("base (64, 32) vs tuned (48, 32)")
        what.append(f"{len(mismatched)} differ{'s' * (len(mismatched) == 1)} in shape from the base's (e.g. {mismatched[0].name}: "
                    f"{mismatched[0].reason.removeprefix('shape mismatch: ').split(' (only ')[0]})")  # (its resize hint is not ours)
    if extra:
        shown = ", ".join(extra[:3]) + (" …" if len(extra) > 3 else "")
        what.append(f"{len(extra)} {'is' if len(extra) == 1 else 'are'} not in the base ({shown})")
    return f"{bad} of its {total} matrices cannot be paired: {'; '.join(what)}", 2 * bad > total
