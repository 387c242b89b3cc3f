"""What ``spectra extract`` reports: ``extract.json`` (schema ``spectra.extract/1``), ``extract.csv`` and
the figures; and the part of an update a LoRA cannot hold (changed norms and biases, matrices left out).

Per module: the rank kept, its parameters ``r·(out + in)``, the energy kept ``E = Σ_{i≤r} σᵢ² / ‖ΔW‖²_F``,
the relative Frobenius error of the truncation ``‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − E)`` (Eckart–Young; summed from the
tail's σᵢ², :func:`tail_share`), the spectral error ``σ_{r+1} / σ₁`` (``‖ΔW − B·A‖₂ / ‖ΔW‖₂``), and beside them what a
uniform rank with the same total parameter count would keep, computed from the same spectra at no extra cost. ``storage_error``
bounds what storing the factors in the adapter's dtype does to their product (:func:`note_storage`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.allocation import Allocation
from spectra.delta import fro_blocks, norms_of_blocks
from spectra.display import matrices
from spectra.errors import ConfigError, IdenticalCheckpointsError, SpectraError
from spectra.extract_plan import (
    SPENT,
    ExtractConfig,
    RankPlan,
    Target,
    all_held_text,
    common_exp,
    energies,
    extractable,
    noise_level,
    resolved_count,
    unspent_text,
)
from spectra.io.checkpoint import Checkpoint
from spectra.io.files import atomic_write_text
from spectra.io.jsonfile import finite_or_null, result_json
from spectra.lowrank import (
    VLLM_RANKS,
    energy_kept,
    energy_rank_top,
    rank_levels,
    round_up,
)
from spectra.metrics import factored_rank
from spectra.pairing import PAIRING_NOTE_PREFIX
from spectra.results import CAVEAT_PREFIX, note_caveat_warnings, rows_to_csv
from spectra.selection import Task
from spectra.ties import TIE_REL, cut_in_tie

SCHEMA = "spectra.extract/1"
#: ``kind`` of a task head's tensor in ``not_lora``, stored whole (:mod:`spectra.extract_heads`).
HEAD_KIND = "task head (modules_to_save)"
#: Architecture-name endings of transformers classes with an output head over the vocabulary, which a config may
#: tie to the input embedding (when the class itself cannot be asked).
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForPreTraining", "ForConditionalGeneration", "WithLMHead",
             "DoubleHeadsModel", "Seq2SeqLM")


#: Why an adapter's trainable token rows (PEFT's ``trainable_token_indices``) are not kept by extract.
TOKENS_NOT_HELD = ("trainable token rows (trainable_token_indices): PEFT loads them only as its own token adapter, which "
                   "neither a LoRA nor modules_to_save holds (to keep them, merge the adapter, save the model, and extract "
                   "BASE MERGED with --embeddings)")
#: ``not_lora`` kinds of the norms and biases a fine-tune changed (LayerNorm tuning, BitFit), which no LoRA holds.
ONE_D_KINDS = ("bias", "1-D (norm or scale)")

@dataclass
class ExtractResult:
    """Everything ``spectra extract`` computed; ``extract.json`` holds :meth:`to_dict`.

    Attributes:
        base, tuned: the inputs as given; ``kind``: ``"full"``, ``"lora"`` or ``"dora"`` (the tuned side).
        mode: ``"rank"``, ``"energy"`` or ``"budget"``; ``selection`` the rule's parameters.
        dtype: the adapter's storage dtype; ``strategy``: ``"one-pass"`` or ``"two-pass"``.
        config: the options (:class:`ExtractConfig` as a dict).
        modules: one record per chosen matrix, in layer order (see the module docstring and README).
        totals: sums over the modules (parameters; ``energy_kept``: the share of the extracted
            matrices' ‖ΔW‖²_F the adapter keeps; ``energy_kept_all``: the same over every matrix,
            those in ``not_extracted`` and an adapter's ``modules_to_save`` matrices included (kept whole
            with ``--save-modules``), the share not held being ``not_extracted_energy_share``; of the selected ones when
            ``outside_selection`` (paired matrices ``--include``/``--exclude``/``--layers`` left out, unread) is not 0; ``unmeasured``: the
            matrices not extracted whose ΔW is not finite (NaN/Inf), which neither share counts; 1-D tensors such as
            norms and biases are not counted in either; …).
        uniform: the uniform-rank adapter of the same parameter count, from the same spectra.
        allocation: the budget's allocation (:func:`spectra.allocation.allocate`): budget, parameters used
            (``filled_params`` of them outside the greedy's prefix), ``optimal`` (no allocation of whole components
            keeps more: proved by the exact search), the fractional bound and the gap to it (as shares of the
            extracted matrices' energy), the first component that did not fit the greedy's prefix.
        serving: vLLM's cost: ``max_lora_rank`` (the largest rank rounded up to an accepted one) × the
            adapted modules' ``out + in``.
        adapter: what was written (path, r, lora_alpha, target_modules, bytes...).
        not_extracted: matrices the adapter does not adapt, with the reason and their relative norm.
        not_lora: changed 1-D tensors (norms, biases), their relative norm and how they are kept, if.
        eval: held-out losses (``eval_text``), else None.
    """

    base: str
    tuned: str
    kind: str
    mode: str
    selection: dict[str, Any]
    dtype: str
    strategy: str
    config: dict[str, Any]
    modules: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    uniform: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    serving: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
    not_extracted: list[dict[str, Any]] = field(default_factory=list)
    not_lora: list[dict[str, Any]] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    complete: bool = False
    elapsed_s: float = 0.0
    device: str = ""
    version: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per module (``extract.csv``)."""
        keys = ("name", "module", "layer", "role", "expert", "out", "in", "rank", "params", "energy_kept", "rel_fro_error",
                "spectral_error", "fro_norm", "rel_norm", "uniform_rank", "uniform_energy_kept", "method", "storage_error")
        return [{k: (m["shape"][0] if k == "out" else m["shape"][1] if k == "in" else m.get(k)) for k in keys} for m in self.modules]

    def nothing_written(self) -> list[str]:
        """Mend a run that writes no adapter (no chosen matrix holds an update a LoRA can hold): nothing in ``not_lora``
        is "kept", no budget was spent; the names of the norms and biases that changed (LayerNorm tuning, BitFit: what
        the fine-tune moved, which no LoRA adapter holds)."""
        for r in self.not_lora:
            if r.get("held"):
                r.update(held=None, reason="not written: no adapter (no chosen matrix has an update a LoRA can hold)")
        self.warnings = [w for w in self.warnings if SPENT not in w]
        return [r["name"] for r in self.not_lora if r.get("rel_norm") and r.get("kind") in ONE_D_KINDS]

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``extract.json``, ``extract.csv`` and (``plots``) the figures, each atomically."""
        out = Path(out_dir)
        doc = self.to_dict()
        try:
            text = result_json(doc)
        except ValueError:  # an undefined number (a base norm of a weight holding Inf): null, said once
            doc = finite_or_null(doc)
            doc["warnings"].append("some numbers were not finite (NaN or Inf in an input) and are written as null")
            text = result_json(doc)
        files = {"json": atomic_write_text(out / "extract.json", text + "\n"),
                 "csv": atomic_write_text(out / "extract.csv", rows_to_csv(self.rows()))}
        if plots and self.modules:
            from spectra.plots.extract import save_extract_plots

            files.update(save_extract_plots(self.to_dict(), out))
        return files


#: The reason of a left-out matrix equal in base and tuned, whole: nothing of the update is left behind.
UNCHANGED = "unchanged (ΔW = 0): nothing to extract"


def compared_rows(task: Task) -> int | None:
    """The rows :func:`left_out_record` compares of a left-out pair: the shared ones of a resized
    vocabulary, or None for all (and for a transposed layout, whose rows are not the vocabulary)."""
    return None if task.pair.rows is None or task.pair.tuned.transpose else task.pair.rows


def reads_pair_by_rows(base: Checkpoint, base_name: str, tuned: Checkpoint, tuned_name: str, rows: int | None) -> bool:
    """Whether :func:`pair_norms` reads this pair a block of rows at a time (2-D safetensors tensors with
    as many columns, both holding the rows compared), or must load both whole."""
    bi, ti = base.tensors[base_name], tuned.tensors[tuned_name]
    if not len(bi.shape) == len(ti.shape) == 2:  # a 0-D or 4-D tensor (listed as not extracted) is read whole
        return False
    n = ti.shape[0] if rows is None else rows
    return (bi.shape[1] == ti.shape[1] and n <= min(bi.shape[0], ti.shape[0])
            and base.reads_rows(base_name) and tuned.reads_rows(tuned_name))


def pair_norms(base: Checkpoint, base_name: str, tuned: Checkpoint, tuned_name: str, rows: int | None,
               block: int = 1 << 20) -> tuple[float, float]:
    """``(‖W_tuned − W_base‖_F, ‖W_base‖_F)`` of two stored tensors (their first ``rows`` rows when given),
    float32 differences with norms accumulated in float64, read a block of ``block`` elements at a time where both
    files allow it (2-D safetensors tensors with as many columns): an embedding left out of the
    extraction is never held whole (which kept up to both sides of it in memory beside the pass)."""
    if not reads_pair_by_rows(base, base_name, tuned, tuned_name, rows):
        return fro_blocks(base.load(base_name), tuned.load(tuned_name), rows, block)
    n = tuned.tensors[tuned_name].shape[0] if rows is None else rows
    step = max(1, block // max(1, tuned.tensors[tuned_name].shape[1]))
    return norms_of_blocks((tuned.load_rows(tuned_name, r, min(n, r + step)), base.load_rows(base_name, r, min(n, r + step)))
                            for r in range(0, n, step))


def rel_or_none(fro: float | None, base_fro: float | None) -> float | None:
    """``fro / base_fro``; 0 for an unchanged tensor of a zero base, None where undefined."""
    if fro is None or base_fro is None or (isinstance(fro, float) and math.isnan(fro)):
        return None
    return fro / base_fro if base_fro > 0 else (0.0 if fro == 0 else None)


def left_out_record(base: Checkpoint, tuned: Checkpoint | None, what: Any, reason: str) -> dict[str, Any]:
    """A matrix not extracted: its name, shape, reason and how much fine-tuning changed it
    (``‖ΔW‖_F`` and ``‖ΔW‖_F / ‖W_base‖_F``, read and summed block by block)."""
    whole = True  # the norms cover the whole tensor (not the rows a resized vocabulary shares)
    if isinstance(what, Task):
        pair = what.pair
        rows = compared_rows(what)
        whole = rows is None and tuple(pair.base_info.shape) == tuple(pair.tuned_info.shape)
        fro, base_fro = pair_norms(base, pair.base.name, tuned, pair.tuned.name, rows)
        name, shape = pair.tuned.name, list(pair.tuned_info.shape)
    else:
        name, shape, fro, base_fro = what
        shape = list(shape)
    if fro == 0 and whole:  # nothing of the update is left behind: not the rule's advice ("pass --embeddings")
        reason = UNCHANGED
    return {"name": name, "shape": shape, "reason": reason, "fro_norm": fro, "base_fro_norm": base_fro, "rel_norm": rel_or_none(fro, base_fro)}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def tail_share(spec: dict, r: int, p: int) -> float:
    """``Σ_{i>r} σᵢ² / ‖ΔW‖²_F`` of a journaled spectrum (``rel_fro_error`` is its root: Eckart–Young), summed from
    the values beyond r (and ``rest``, the energy of those not journaled, :meth:`spectra.extract_io.ExtractRun.add_spectrum`)
    where the whole spectrum is known; else ``1 − E``, which cancels near an exact reconstruction (a flat rank-64 update
    with a tail of 1e-6: ``rel_fro_error`` 3e-4 below the Eckart–Young minimum; rank 32 with 1e-8: 0). The values are the
    float64 Gram's (exact to ≈1e-7·σ₁, :func:`spectra.lowrank.gram_eig`), so a tail below that is not resolved. 0 for no update."""
    S, total = np.asarray(spec.get("S") or [], dtype=np.float64), float(spec["total"])
    if total <= 0:
        return 0.0
    if S.size >= p or "rest" in spec:
        return min(1.0, (float(np.sum(S[r:] ** 2)) + float(spec.get("rest", 0.0))) / total)
    return max(0.0, 1.0 - energy_kept(S, total, r))


def module_record(t: Target, spec: dict, r: int, uniform: int, config: ExtractConfig) -> dict[str, Any]:
    """One module's line of ``extract.json`` from its journaled spectrum and rank (S and total of
    ``ΔW·2**-exp``: the ratios as they are, ‖ΔW‖_F and the σᵢ scaled back)."""
    S = np.asarray(spec["S"], dtype=np.float64)
    total = float(spec["total"])
    e = int(spec.get("exp", 0))
    fro = math.ldexp(math.sqrt(total), e)
    E = energy_kept(S, total, r)
    noise = total > 0 and not extractable(spec)
    # the uniform baseline spends nothing on no update, but an unchanged expert of a stack keeps its rank
    ur = min(uniform, t.cap) if extractable(spec) or r else 0
    spectral = None
    if total <= 0 or r >= t.p:
        spectral = 0.0
    elif r < S.size and S[0] > 0:
        spectral = float(S[r] / S[0])
    base_fro = spec.get("base_fro")
    rec = {
        "name": t.name, "module": t.module, "label": t.label, "layer": t.layer, "role": t.role, "expert": t.expert,
        "shape": list(t.shape), "embedding": t.embedding, "group": t.group, "changed": extractable(spec), "rank": r,
        "params": r * t.cost, "params_per_rank": t.cost,
        "energy_kept": E, "rel_fro_error": math.sqrt(tail_share(spec, r, t.p)), "spectral_error": spectral,
        "fro_norm": fro, "base_fro_norm": base_fro, "rel_norm": rel_or_none(fro, base_fro),
        "uniform_rank": ur, "uniform_energy_kept": energy_kept(S, total, ur) if ur <= S.size or total <= 0 else None,
        "method": spec["method"], "residual": spec.get("residual"),
        "singular_values": [float(x) for x in np.ldexp(S[: config.top_values], e)],
        "note": "; ".join(x for x in (t.note, spec.get("note") or "", _tie_note(S, r, t.p), floor_note(spec, r, config, t.p),
                                      deficient_note(spec, r, config),
                                      ("rank 0: rounding noise is not extracted" if not r else "rounding noise, held at its expert "
                                       "stack's rank (one rank per stack)") if noise else "") if x),
    }
    if config.mode == "energy":
        rec["energy_rank"] = energy_rank_top(S, total, config.energy, t.p)
    return rec


def deficient_note(spec: dict, r: int, config: ExtractConfig) -> str:
    """What the note of an adapter's module says when ``--rank`` asks for more components than its update ``s·B·A``
    has (:func:`spectra.metrics.factored_rank` of its exact factored spectrum): the rest are written as zeros; "" else."""
    if spec.get("method") != "factored" or config.mode != "rank" or r <= (k := factored_rank(np.asarray(spec["S"], dtype=np.float64))):
        return ""
    return (f"{f'only {k}' if k else 'none'} of its {r} components are nonzero: the adapter's update s·B·A has rank {k}, so "
            f"the other {r - k} {'is' if r - k == 1 else 'are'} written as zeros (kept: --rank asks for {r})")


def floor_note(spec: dict, r: int, config: ExtractConfig, p: int) -> str:
    """What a changed module's note says of its directions at or below the rounding floor of its stored weights
    (:func:`spectra.extract_plan.resolved_count`; "" for none): under ``--energy`` a rank the floor capped (the
    energy rank counted rounding noise), under ``--rank`` a rank above the resolved directions (kept, as asked
    for). A budget never buys such components; its warning says when that left some unspent (:func:`_floored`)."""
    res = resolved_count(spec)
    if res is None or not extractable(spec):
        return ""
    if config.mode == "energy":
        er = energy_rank_top(np.asarray(spec["S"], dtype=np.float64), float(spec["total"]), config.energy, p)
        if r != res or (er is not None and er <= res):
            return ""
        if not res:
            return ("every singular value is at or below the rounding floor of its stored weights (rounding noise, not "
                    "the update): rank 0")
        counted = f"energy rank {er} at τ = {config.energy:g} counts {er - res}" if er else f"the energy rank at τ = {config.energy:g} counts"
        return (f"{counted} directions at or below the rounding floor of its stored weights (rounding noise, not the "
                f"update): rank capped at the {res} resolved")
    if config.mode == "rank" and r > res:
        return (f"{f'only {res}' if res else 'none'} of its {r} directions stand above the rounding floor of its stored "
                f"weights: the other {r - res} are rounding noise, not the update (kept: --rank asks for {r})")
    return ""


def _tie_note(S: np.ndarray, r: int, p: int) -> str:
    """What a module's note says when its rank cuts between tied singular values (:func:`spectra.ties.cut_in_tie`)."""
    # values within the tie resolution of 0 are no directions (an update of rank 2 asked for rank 4: its 3rd and
    # 4th values are rounding noise, "tied" at ~1e-9·σ₁): nothing of the update is chosen among them
    if not cut_in_tie(S, r, S.size, 0.0, p) or not (r <= S.size and S[r - 1] > TIE_REL * S[0]):
        return ""
    return (f"rank {r} cuts through tied singular values (σ_{r} = σ_{r + 1} within 1e-6·σ₁): the adapter holds one of the "
            f"equally good choices of {r} directions within the tie, with the same energy kept")


def root_sigma1(spec: dict) -> float:
    """``√σ₁`` of a journaled spectrum (of ΔW, not ΔW·2**-exp): the largest |entry| its LoRA factors reach.
    0 for none; inf where float64 cannot hold it."""
    S, e = spec.get("S") or [0.0], int(spec.get("exp", 0))
    try:
        return math.ldexp(math.sqrt(math.ldexp(float(S[0]), e % 2)), e // 2)
    except OverflowError:
        return math.inf


#: :func:`note_storage` warns about a module whose stored factors' product is further than this (relative)
#: from the rank-r truncation they hold: rounding alone gives ~1e-3 (bf16 ~5e-3, float32 ~1e-7); factors
#: flushed to zero or to subnormals (a --dtype float16 adapter of an update near 1e-12) give 0.1 to 1.
STORAGE_WARN = 0.01


def note_storage(result: ExtractResult, errors: dict[str, float | None], dtype: torch.dtype) -> None:
    """Each module's ``storage_error`` (:func:`spectra.extract_io.rounding_error` of its rank-r factors as
    stored in ``dtype``; None where the dtype holds them unrounded), and a warning naming the worst module
    above :data:`STORAGE_WARN`: ``energy_kept`` and ``rel_fro_error`` describe the exact factors, not those."""
    bad = []
    for m in result.modules:
        err = errors.get(m["name"])
        m["storage_error"] = err if err is None or math.isfinite(err) else None
        if m["storage_error"] is not None and err > STORAGE_WARN:
            bad.append((err, m["name"]))
    if not bad:
        return
    err, name = max(bad)
    d = str(dtype).removeprefix("torch.")
    tiny32 = torch.finfo(torch.float32).tiny
    fix = (f"float32 (or bfloat16, whose range is float32's; float64 where the factors are below {tiny32:.2g} too)"
           if dtype in (torch.float16, torch.bfloat16) else "float64")
    lost = "loses most of its product" if err >= 0.5 else f"may lose more than {STORAGE_WARN:.0%} of its product"
    result.warnings.append(
        f"{len(bad)} modules' LoRA factors are rounded in {d} by more than {STORAGE_WARN:.0%} of their product; the worst, "
        f"{name}, {lost} (storage_error up to {err:.1%}: entries below {d}'s smallest normal {torch.finfo(dtype).tiny:.3g} "
        f"flush towards zero), so the adapter is further from ΔW than energy_kept says; rerun with --dtype {fix} --force")


def has_output_head(config: dict | None, *checkpoints: Checkpoint | None) -> bool:
    """Whether the model has an output head over the vocabulary: a checkpoint stores one, or the config's
    architecture is a class transformers ties one to the embedding (``_tied_weights_keys`` naming a module that is
    not an embedding; by its name's ending when transformers cannot say). Unknown (no architecture): True.

    >>> has_output_head({"architectures": ["BertForSequenceClassification"]}), has_output_head({"architectures": ["GPT2LMHeadModel"]})
    (False, True)
    """
    if any(c is not None and any(sp.role == "head" for sp in c.specs.values()) for c in checkpoints):
        return True
    archs = (config or {}).get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        return True
    if any(arch.endswith(_LM_HEADS) for arch in archs):  # the name says (GPT-NeoX-Japanese's head is `embed_out`)
        return True
    for arch in archs:
        try:
            import transformers

            keys = getattr(getattr(transformers, arch), "_tied_weights_keys", None) or {}
        except Exception:  # noqa: BLE001 - no transformers, or a class it does not have
            continue
        # a dict maps either way (head -> embedding, or back): any side that is not an embedding is a head
        names = [*keys, *keys.values()] if isinstance(keys, dict) else list(keys)
        if any(isinstance(k, str) and "emb" not in k.rpartition(".")[0].rpartition(".")[2].lower() for k in names):
            return True
    return False


def tied_embedding_warning(base: Checkpoint, targets: list[Target], ranks: list[int], tuned: Checkpoint | None = None) -> list[str]:
    """A warning for an adapted embedding of a base that ties its output head to it (it stores no head, its config
    does not say ``tie_word_embeddings: false``, and the model has a head, :func:`has_output_head`: BERT's configs say
    ``true`` by default, a sequence classifier has none): PEFT's embedding LoRA acts on the input lookup only, so the
    adapter reproduces the update only once merged (the merged weight is the head's too)."""
    cfg = base.config or {}
    # the token embedding (a position embedding is not tied): the one with vocab_size rows where the config says
    emb = [t for t, r in zip(targets, ranks) if r and t.embedding and cfg.get("vocab_size") in (None, t.shape[0])]
    if not emb or cfg.get("tie_word_embeddings") is False or any(sp.role == "head" for sp in base.specs.values()):
        return []
    if not has_output_head(cfg, tuned):
        return []
    return [f"{emb[0].name} is tied to the output head (tie_word_embeddings): PEFT's embedding LoRA changes the input "
            "embedding only, so served unmerged the adapter leaves the tied lm_head as the base's and does not reproduce "
            "the update; merge it first (merge_and_unload), which changes the shared weight and so both"]


def _floored(spectra: dict[int, dict], targets: list, ranks: list[int], left: int) -> list[str]:
    """Modules whose next component would fit in the ``left`` parameters of a budget but is at or below its
    spectrum's rounding floor (``floor``, :func:`spectra.extract_plan.energies`), by name."""
    out = []
    for i, t in enumerate(targets):
        S, floor = spectra[i].get("S") or [], float(spectra[i].get("floor", 0.0))
        if floor > 0 and t.cost <= left and ranks[i] < len(S) and 0 < S[ranks[i]] <= floor:
            out.append(t.name)
    return out


def _more_to_buy(spec: dict, t: Target, r: int, top: int) -> bool:
    """Whether a module at rank ``r`` may gain from one more component: below ``top`` and its cap (:attr:`Target.cap`)
    and, where the journal holds its next singular value, that value above zero and its :func:`noise_level`."""
    if spec.get("skipped") or not extractable(spec) or r >= min(t.cap, top):
        return False
    S = spec.get("S") or []
    return r >= len(S) or S[r] > noise_level(spec, t.p)


def _waiting(spectra: dict[int, dict], targets: list[Target], ranks: list[int], items: list[list[int]],
             config: ExtractConfig, left: int, energy: float) -> tuple[str, int, float, int] | None:
    """The budget's knapsack items (a module; an expert stack, one rank for all) whose next component stands above
    the rounding floor but costs more than the ``left`` parameters: ``(name, cost, its share of ``energy`` (ΔW's, in
    units of 4**common_exp), how many wait so)`` for the one whose next component holds the most; None for none.
    ``items`` index ``targets``."""
    ref = common_exp(spectra.values())
    found = []
    for item in items:
        # the ranks a member may take are 1 … cap (--max-rank, --serving; not the budget's cut, which drops a costly one)
        r, cap = ranks[item[0]], min(len(rank_levels(targets[i].p, config.max_rank, config.serving)) for i in item)
        # the next component's energy, above the floor (energies: 0 at or below it), summed over an expert stack
        gain = sum(float(energies(spectra[i], ref, r + 1, targets[i].p)[r:].sum()) for i in item if extractable(spectra[i]))
        cost = sum(targets[i].cost for i in item)
        if r < cap and gain > 0 and cost > left:
            name = targets[item[0]].name + (f" (+{len(item) - 1} tied)" if len(item) > 1 else "")
            found.append((gain, name, cost))
    if not found or energy <= 0:
        return None
    gain, name, cost = max(found)
    return name, cost, gain / energy, len(found)


def no_target_error(notes: list[str], left_out: list[tuple[Any, str]], where: str) -> ConfigError:
    """The error of a run with no matrix to extract: the pairing's reason (a layout that left every layer matrix out,
    in ``notes``), else the selected matrices none of which can be a LoRA module (``left_out``: a router, an embedding
    without ``--embeddings``; once "the selection is empty"), else an empty selection."""
    why = next((n.removeprefix(PAIRING_NOTE_PREFIX) for n in notes if n.startswith(PAIRING_NOTE_PREFIX)), None)
    if why is not None:
        return ConfigError(f"no matrix to extract: {why}", path=where, hint="give a tuned checkpoint stored as its base is")
    if left_out:
        what, reason = left_out[0]
        return ConfigError(f"no matrix to extract: none of the {matrices(len(left_out))} selected can be a LoRA module (e.g. "
                           f"{what.pair.tuned.name if isinstance(what, Task) else what[0]}: {reason})", path=where,
                           hint="act on the reason, or select other matrices with --include/--exclude/--layers")
    return ConfigError("no matrix to extract: the selection is empty", path=where,
                       hint="check --include/--exclude/--layers (embeddings and the head need --embeddings)")


def nothing_extracted_error(result: ExtractResult, totals: list[float], extractable: bool, moved: list[str], where: str,
                            out: Path) -> SpectraError:
    """The error of a run with nothing to write (``extract.json`` written to ``out``): every chosen matrix's ΔW
    (``totals``: their ‖ΔW‖²_F) zero, at its rounding level, or (``extractable``) with every component a budget could buy
    at its rounding floor. Exit 3 (:class:`IdenticalCheckpointsError`) only where nothing changed at all: norm or bias
    tensors that changed (``moved``) and changed matrices not extracted (an embedding without ``--embeddings``, once
    called "the same weights") are named."""
    zero = all(t == 0.0 for t in totals)
    what = "has ΔW = 0" if zero else "has ΔW = 0 or one at the rounding level of its stored weights (rounding noise)"
    if extractable:  # a budget's components, all at or below the rounding floor
        what = "has every component at or below the rounding floor of its stored weights (rounding noise)"
    only = (f"; only {len(moved)} norm/bias tensor{'s' if len(moved) > 1 else ''} changed (e.g. {moved[0]}), which "
            "a LoRA adapter cannot hold (PEFT's modules_to_save rides on a LoRA target)") if zero and moved else ""
    if left := [r for r in result.not_extracted if isinstance(r.get("fro_norm"), (int, float)) and r["fro_norm"] > 0]:
        only += f"; {matrices(len(left))} that changed not extracted (e.g. {left[0]['name']}: {left[0]['reason']})"
    hint = ("act on its reason" if left else "use the tuned checkpoint itself (spectra diff lists what changed)") if only else (
        "check that you passed the fine-tuned checkpoint")
    return (IdenticalCheckpointsError if zero and not moved and not left else ConfigError)(
        f"every one of the {len(totals)} chosen matrices {what}: there is nothing to extract{only}", path=where,
        hint=f"{hint}; extract.json was written to {out}")


def build_result(src: Any, spectra: dict[int, dict], ranks: list[int], alloc: tuple[Allocation, list[list[int]]] | None,
                 plan: RankPlan, config: ExtractConfig, dtype: torch.dtype, device: torch.device, uniform: int,
                 not_extracted: list[dict], not_lora: list[dict]) -> ExtractResult:
    """The :class:`ExtractResult` of a run (before the adapter is written and evaluated). Matrices the
    run skipped (NaN/Inf, an overflowing ΔW: no spectrum) are listed in ``not_extracted`` with the
    reason, not among the modules, whose counts, medians and energy shares they would distort."""
    skipped = [i for i in range(len(src.targets)) if spectra[i].get("skipped")]
    left = [{"name": src.targets[i].name, "shape": list(src.targets[i].shape), "reason": spectra[i]["note"],
             "fro_norm": None, "base_fro_norm": None, "rel_norm": None} for i in skipped]
    not_extracted = not_extracted + left
    keep = [i for i in range(len(src.targets)) if not spectra[i].get("skipped")]
    # a stack is written whole (one target_parameters LoRA): an expert skipped here (NaN/Inf) is stored at its rank, as zeros
    zeros = sum(ranks[i] * src.targets[i].cost for i in skipped if src.targets[i].stack)
    targets, ranks = [src.targets[i] for i in keep], [ranks[i] for i in keep]
    spectra = dict(enumerate(spectra[i] for i in keep))
    bytes_per = torch.empty(0, dtype=dtype).element_size()
    mods = [module_record(t, spectra[i], ranks[i], uniform, config) for i, t in enumerate(targets)]
    # ‖ΔW‖²_F of each module in one unit, 4**ref, the allocation's too (final_ranks): most modules' exp is 0
    ref = common_exp(spectra.values())
    totals_e = [math.ldexp(float(spectra[i]["total"]), 2 * (int(spectra[i].get("exp", 0)) - ref)) for i in range(len(targets))]
    energy = sum(totals_e)

    def share(key: str) -> float | None:
        vals = [m[key] for m in mods]
        if any(v is None for v in vals):
            return None
        return sum(v * e for v, e in zip(vals, totals_e)) / energy if energy > 0 else 1.0

    def error(rs: list[int]) -> float:  # ‖ΔW − B·A‖_F / ‖ΔW‖_F over the modules, from their tails (no 1 − E)
        tail = sum(tail_share(spectra[i], r, t.p) * e for i, (t, r, e) in enumerate(zip(targets, rs, totals_e)))
        return math.sqrt(min(1.0, tail / energy)) if energy > 0 else 0.0

    params = sum(m["params"] for m in mods) + zeros
    # the counts, medians and the dense update's size are of the updates there are: an unchanged matrix
    # (energy kept 1.0 at rank 0) or one at the rounding level would pass for a module the adapter holds
    live = [m["changed"] for m in mods]
    changed = [m for m, ok in zip(mods, live) if ok] or mods
    # the dense update's size: the matrices the adapter carries factors for (an unchanged expert of a stack too)
    full = sum(t.shape[0] * t.shape[1] for t, m in zip(targets, mods) if m["changed"] or m["rank"])
    kept = share("energy_kept")
    # the matrices not extracted (3-D stacks, routers, embeddings, modules PEFT would drop) hold energy
    # too: energy_kept is of the extracted matrices, energy_kept_all of every matrix listed
    def sq(records: list[dict]) -> float:
        return sum(math.ldexp(float(r["fro_norm"]), -ref) ** 2 for r in records
                   if isinstance(r.get("fro_norm"), (int, float)) and math.isfinite(r["fro_norm"]))

    # an adapter's matrices stored whole (modules_to_save: an embedding, a head) are part of its update
    # too: kept exactly with --save-modules, else not extracted
    saved = [r for r in not_lora if r.get("kind") in ("modules_to_save of the adapter", HEAD_KIND) and len(r.get("shape") or ()) == 2]
    held = sq([r for r in saved if r.get("held")])
    outside = sq(not_extracted) + sq([r for r in saved if not r.get("held")])
    # a matrix left out for NaN/Inf has no ΔW energy to count: "all" is then of the matrices with one, and said so
    unmeasured = [r for r in not_extracted if len(r.get("shape") or ()) == 2 and "NaN or Inf" in str(r.get("reason"))
                  and not (isinstance(r.get("fro_norm"), (int, float)) and math.isfinite(r["fro_norm"]))]
    whole = energy + outside + held
    outside_share = outside / whole if whole > 0 else 0.0
    adapted = [m for m in mods if m["rank"]]
    totals = {
        "modules": len(mods), "adapted": len(adapted), "params": params, "full_params": full,
        "param_fraction": params / full if full else 0.0, "bytes": params * bytes_per, "energy_kept": kept,
        "not_extracted_energy_share": outside_share,
        "energy_kept_all": (kept * energy + held) / whole if kept is not None and whole > 0 else kept,
        "unmeasured": len(unmeasured), "outside_selection": int(getattr(src, "outside_selection", 0)),
        "rel_fro_error": error(ranks) if kept is not None else None,
        "changed": sum(live), "median_energy_kept": _median([m["energy_kept"] for m in changed]),
        "min_energy_kept": min(m["energy_kept"] for m in changed), "modules_at_90": sum(m["energy_kept"] >= 0.9 for m in changed),
        "max_rank": max(m["rank"] for m in changed), "min_rank": min(m["rank"] for m in changed),
        "median_rank": _median([float(m["rank"]) for m in changed]),
    }
    u_kept = share("uniform_energy_kept")
    u_params = sum(m["uniform_rank"] * t.cost for m, t in zip(mods, targets))
    uni = {"rank": uniform, "params": u_params, "energy_kept": u_kept,
           "rel_fro_error": error([m["uniform_rank"] for m in mods]) if u_kept is not None else None,
           "median_energy_kept": _median([m["uniform_energy_kept"] for m in changed if m["uniform_energy_kept"] is not None]),
           "modules_at_90": sum((m["uniform_energy_kept"] or 0) >= 0.9 for m in changed)}
    allocation = None
    if alloc is not None:
        a, items = alloc
        crit = None
        if a.critical is not None:  # items index every target, skipped ones too: named through src.targets
            members = items[a.critical[0]]
            crit = {"module": src.targets[members[0]].name + (f" (+{len(members) - 1} tied)" if len(members) > 1 else ""),
                    "rank": a.critical[1]}
        method = ("greedy on σ²/(out+in): every component fitted" if a.critical is None else
                  "greedy on σ²/(out+in), the rest filled, then the exact optimum" if a.optimal else
                  "greedy on σ²/(out+in), then the rest filled (the exact search gave up)")
        allocation = {"method": method, "optimal": a.optimal,
                      "budget": config.budget, "budget_params": plan.budget,
                      "used_params": a.params, "filled_params": a.filled, "kept": a.kept / energy if energy > 0 else 1.0,
                      "fractional_bound": a.bound / energy if energy > 0 else 1.0,
                      "gap": a.gap / energy if energy > 0 else 0.0, "critical": crit}
    top = max(ranks)
    lora_rank = round_up(top, VLLM_RANKS) if 0 < top <= VLLM_RANKS[-1] else None
    cost = sum(t.cost for t, r in zip(targets, ranks) if r)
    serving = {"engine": "vllm", "max_lora_rank": lora_rank, "modules": len(adapted),
               "params": lora_rank * cost if lora_rank else None,
               "bytes": lora_rank * cost * bytes_per if lora_rank else None,
               "note": None if lora_rank or not top else f"largest rank {top} is above vLLM's 512"}
    selection = {"rank": config.rank, "energy": config.energy, "budget": config.budget, "budget_params": plan.budget,
                 "max_rank": config.max_rank, "serving": config.serving}
    cfg = {k: v for k, v in asdict(config).items() if k != "parsed_budget"}
    if config.eval_text is None:  # nothing was scored: a block size and count beside eval_text null read as used
        cfg.update(eval_seq_len=None, eval_blocks=None)
    warnings = []
    if left:
        warnings.append(f"{matrices(len(left))} could not be extracted (e.g. {left[0]['name']}: {left[0]['reason']}); "
                        "see not_extracted in extract.json")
    if unmeasured:
        warnings.append(f"{matrices(len(unmeasured))} not extracted {'has' if len(unmeasured) == 1 else 'have'} no finite ΔW "
                        f"(e.g. {unmeasured[0]['name']}: {unmeasured[0]['reason']}): energy_kept_all and "
                        "not_extracted_energy_share are over the matrices with one")
    if outside_share >= 0.01 and kept is not None:
        warnings.append(f"the matrices not extracted hold {outside_share:.1%} of the weight matrices' ΔW energy: the adapter "
                        f"keeps {totals['energy_kept_all']:.3f} of all of it (energy_kept, {kept:.3f}, is of the extracted "
                        "matrices; see not_extracted and not_lora in extract.json)")
    if totals["outside_selection"] and kept is not None:  # not read: their share of the update is unknown
        warnings.append(f"--include/--exclude/--layers left {matrices(totals['outside_selection'])} out, unread: energy_kept_all "
                        f"({totals['energy_kept_all']:.3f}) is of the selected matrices' ΔW energy, not of the whole update's")
    if tokens := [r for r in not_lora if r.get("reason") == TOKENS_NOT_HELD]:  # an update the written adapter does not make
        warnings.append(f"{tokens[0]['name']} is not kept: {TOKENS_NOT_HELD}; the extracted adapter leaves those embedding rows "
                        "as the base has them, and energy_kept_all does not count them")
    # the caveats of the notes (precision mismatch…) as diff warns them; rounding_level's is said just below
    warnings += [w for w in note_caveat_warnings([(m["name"], m["note"]) for m in mods], len(mods))
                 if not w.startswith(f"{CAVEAT_PREFIX}(rounding_level)")]
    noise = [m for m, ok in zip(mods, live) if not ok and m["fro_norm"]]
    if noise:
        held = sum(1 for m in noise if m["rank"])
        warnings.append(f"{len(noise)} of the {len(mods)} modules changed only at the rounding level of their stored weights "
                        f"(e.g. {noise[0]['name']}): {len(noise) - held} get rank 0 (spectra diff gives such matrices no rank)"
                        f"{f', {held} keep their expert stack rank (one rank per stack)' if held else ''}; the counts and "
                        "medians of the totals are over the other changed modules")
    unspent = plan.budget - allocation["used_params"] if allocation is not None else 0
    at = {orig: i for i, orig in enumerate(keep)}  # the knapsack's items index every target, skipped ones too
    knap = [it for item in (alloc[1] if alloc is not None else []) if (it := [at[j] for j in item if j in at])]
    # the components waiting for more than is left (a module's next one above the floor)
    wait = _waiting(spectra, targets, ranks, knap, config, unspent, energy) if allocation is not None else None
    if allocation is not None and (floored := _floored(spectra, targets, ranks, unspent)):
        # the rounding floor explains what is left only where no component above it waits for more than that
        capped = [(t.name, r) for i, (t, r) in enumerate(zip(targets, ranks)) if _more_to_buy(spectra[i], t, r, t.cap)
                  and not _more_to_buy(spectra[i], t, r, max(plan.levels[i], default=0))]
        warnings.append(unspent_text(allocation["used_params"], plan.budget, waiting=wait, floored=(len(floored), floored[0]),
                                     of="ΔW's energy", capped=(len(capped), f"{capped[0][0]} at r = {capped[0][1]}",
                                                               "--max-rank / --serving") if capped else None))
    elif allocation is not None and unspent > 0 and wait is not None:  # (the budget's cut, not --max-rank, stops them)
        warnings.append(unspent_text(allocation["used_params"], plan.budget, waiting=wait, floored=(0, ""), of="ΔW's energy"))
    elif allocation is not None and unspent > 0 and not any(
            _more_to_buy(spectra[i], t, r, max(plan.levels[i], default=0)) for i, (t, r) in enumerate(zip(targets, ranks))):
        # nothing left to buy: every module holds all of its directions, or sits at the largest rank allowed
        capped = [(t.name, r) for i, (t, r) in enumerate(zip(targets, ranks)) if _more_to_buy(spectra[i], t, r, t.cap)]
        dearer = [t.name for t, r in zip(targets, ranks) if r * t.cost > t.shape[0] * t.shape[1]]
        warnings.append(all_held_text(allocation["used_params"], plan.budget, (len(dearer), dearer[0]) if dearer else None,
                                      (len(capped), f"{capped[0][0]} at r = {capped[0][1]}", "--max-rank / --serving")
                                      if capped else None))
    # directions at the rounding floor: an energy rank stops before them, a --rank above them keeps them (as asked)
    at_floor = [(m["name"], resolved_count(spectra[i])) for i, (t, m) in enumerate(zip(targets, mods))
               if floor_note(spectra[i], ranks[i], config, t.p)]
    if at_floor and config.mode == "energy":
        warnings.append(f"{len(at_floor)} modules' energy rank at τ = {config.energy:g} counts directions at or below the rounding "
                        f"floor of their stored weights (e.g. {at_floor[0][0]}): --energy keeps only the {at_floor[0][1]} resolved "
                        "ones there, as a budget does (rounding noise is not the update); energy_kept is what that rank holds")
    elif at_floor:
        warnings.append(f"--rank {config.rank} is above the directions standing above the rounding floor of the stored "
                        f"weights in {len(at_floor)} modules (e.g. {at_floor[0][0]}, {at_floor[0][1]} resolved): the rest of "
                        "their rank holds rounding noise, not the update (--energy 1.0 keeps only the resolved directions)")
    if hollow := [m["name"] for i, m in enumerate(mods) if deficient_note(spectra[i], ranks[i], config)]:
        warnings.append(f"--rank {config.rank} is above the rank of the adapter's update s·B·A in {len(hollow)} modules (e.g. "
                        f"{hollow[0]}): their other components are zeros, parameters that hold nothing (--energy 1.0 keeps "
                        "only the nonzero ones)")
    if config.mode == "energy":
        capped = {n for n, _ in at_floor}  # below τ by the rounding noise left out, said just above
        short = [m["name"] for m, ok in zip(mods, live) if ok and m["energy_kept"] < config.energy - 1e-12 and m["name"] not in capped]
        if short:
            warnings.append(f"{len(short)} modules keep less than τ = {config.energy:g} of their energy because "
                            f"--max-rank or --serving caps their rank (e.g. {short[0]})")
    return ExtractResult(
        base=src.base.label, tuned=src.label, kind=src.kind, mode=config.mode, selection=selection,
        dtype=str(dtype).removeprefix("torch."), strategy=config.resolved_strategy if src.kind == "full" else "factored",
        config=cfg, modules=mods, totals=totals, uniform=uni, allocation=allocation, serving=serving,
        not_extracted=not_extracted, not_lora=[{k: v for k, v in r.items() if k not in ("delta", "tensors")} for r in not_lora],
        unmatched=src.unmatched or {}, warnings=warnings, device=str(device),
    )



__all__ = [
    "SCHEMA",
    "STORAGE_WARN",
    "ExtractResult",
    "build_result",
    "compared_rows",
    "left_out_record",
    "no_target_error",
    "nothing_extracted_error",
    "module_record",
    "note_storage",
    "pair_norms",
    "reads_pair_by_rows",
    "root_sigma1",
    "tail_share",
    "tied_embedding_warning",
    "has_output_head",
    "HEAD_KIND",
]
