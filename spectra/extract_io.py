"""The files around an extraction (``spectra extract``): the run's state (:class:`ExtractRun`: the journaled
spectra and the factors in the scratch shard, with what the adapter's dtype does to them), the output
folder (refused when it is an input's, prepared for a run), the adapter's storage dtype, and norms read
from the inputs, among them those of the matrices left out, computed beside the pass."""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from spectra.allocation import allocate_budget, reach_above
from spectra.errors import ConfigError
from spectra.extract_plan import ExtractConfig, RankPlan, Target, common_exp, energies
from spectra.extract_results import compared_rows, left_out_record, reads_pair_by_rows
from spectra.io.adapter import Adapter
from spectra.io.checkpoint import Checkpoint, tensor_infos
from spectra.io.files import LOCK_NAME, file_digest, refuse_if_held
from spectra.io.peft_writer import write_safetensors
from spectra.journal import RecordJournal
from spectra.lowrank import energy_rank_top, factored_triplets, round_up
from spectra.selection import Task
from spectra.threads import one_openmp_thread

JOURNAL = "extract.jsonl"
SCRATCH = ".extract-scratch"
#: Files a run writes; a folder holding anything else (or a finished run) is refused without ``force``.
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "extract.json", "extract.csv", "extract.png",
                "extract_ranks.png", JOURNAL, SCRATCH)


@dataclass(frozen=True)
class ExtractEvent:
    """Reported to the callback after each module of a stage.

    Attributes:
        stage: ``"spectra"`` (decomposition; one-pass also keeps the vectors), ``"vectors"`` (the
            second pass), ``"eval"``.
        done, total: modules of this stage finished and planned.
        name: the module just finished.
    """

    stage: str
    done: int
    total: int
    name: str


def rounding_error(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """For each r = 1 … k, a bound of ``‖B̃Ã − BA‖_F / ‖BA‖_F``, where B̃, Ã are the top-r factors
    (:func:`spectra.lowrank.split_factors`: orthogonal columns of B and rows of A, ``‖Bᵢ‖ = ‖Aᵢ‖ = √σᵢ``)
    rounded to ``dtype``. As ``AAᵀ`` and ``BᵀB`` are diagonal, ``‖δB·A‖² = Σ σᵢ‖δBᵢ‖²`` exactly, likewise
    ``‖B·δA‖``; the rest by the triangle inequality over the rank-one terms, the smallest of
    ``‖δB·A‖ + ‖B·δA‖ + Σ‖δBᵢ‖‖δAᵢ‖``, ``‖δB·A‖ + Σ‖B̃ᵢ‖‖δAᵢ‖`` and ``‖B·δA‖ + Σ‖δBᵢ‖‖Ãᵢ‖``: O(k·(out + in)).
    Ordinary rounding gives ~1e-3 (bf16 ~5e-3, float32 ~1e-7); factors flushed to zero or to subnormals by
    a narrow dtype, up to 1 (or a little more). Returns ``(k,)`` float64 (``B (out, k)``, ``A (k, in)``)."""
    def norms(X: torch.Tensor) -> torch.Tensor:  # column norms, scaled by each column's max (no underflow)
        m = X.abs().amax(dim=0)
        m = torch.where(m > 0, m, 1.0)
        return torch.linalg.vector_norm(X / m, dim=0) * m

    Bd, Ad = B.double(), A.double().mT
    Bt, At = B.to(dtype).double(), A.to(dtype).double().mT
    nb, na = norms(Bd), norms(Ad)
    nb, na = torch.where(nb > 0, nb, 1.0), torch.where(na > 0, na, 1.0)
    rb, ra = norms(Bt - Bd) / nb, norms(At - Ad) / na  # ‖δBᵢ‖/‖Bᵢ‖, ‖δAᵢ‖/‖Aᵢ‖
    tb, ta = norms(Bt) / nb, norms(At) / na  # ‖B̃ᵢ‖/‖Bᵢ‖, ‖Ãᵢ‖/‖Aᵢ‖
    s = (nb / nb[0]) * (na / na[0])  # σᵢ/σ₁
    db, da = torch.cumsum(s * s * rb * rb, 0).sqrt(), torch.cumsum(s * s * ra * ra, 0).sqrt()  # ‖δB·A‖, ‖B·δA‖ (/σ₁)
    err = torch.minimum(db + da + torch.cumsum(s * rb * ra, 0),
                        torch.minimum(db + torch.cumsum(s * tb * ra, 0), da + torch.cumsum(s * rb * ta, 0)))
    return (err / torch.cumsum(s * s, 0).sqrt()).numpy()


# ---- the run state: spectra, factors on disk, the journal -------------------------------------------
class ExtractRun:
    """Records of one run: per target its spectrum and the factors kept in the scratch shard.

    A spectrum record holds ``S`` and ``total`` of ``ΔW·2**-exp`` (``"exp"``, written only when nonzero:
    a float64 ΔW beyond the squaring range, :mod:`spectra.lowrank`); energies, ratios, are read from it
    as they are, absolute values (norms, σ, a budget's gains across modules) through the exponent."""

    def __init__(self, targets: list[Target], plan: RankPlan, config: ExtractConfig, out: Path, journal: RecordJournal,
                 callback: Callable[[ExtractEvent], None] | None, scratch_dtype: torch.dtype = torch.float32) -> None:
        self.targets, self.plan, self.config, self.out, self.journal = targets, plan, config, out, journal
        # factors are kept in the adapter's dtype (the same bytes the adapter gets), written by the compute
        # threads, with how much that rounding moves their product (rounding_error)
        self.scratch_dtype = scratch_dtype
        self.callback = callback
        self.index = {t.order: i for i, t in enumerate(targets)}
        self.spectra: dict[int, dict] = {}
        self.factors: dict[int, dict] = {}
        self.scratch = out / SCRATCH
        self.done = 0
        self._rounding: dict[int, list[float]] = {}  # store_factors (any thread) -> add_factors
        self._cut, self._cut_at, self._cut_exp = 0.0, 0, 0  # the last budget cut-off, modules it saw, its unit 4**e

    def absorb(self, records: list[dict]) -> None:
        """Records of an interrupted run (their seals checked by the journal); factors only where their scratch file
        is there, is the one its module writes, and holds the bytes it was written with (else computed again)."""
        for rec in records:
            if "spectrum" in rec and rec["spectrum"]["order"] in self.index:
                self.spectra[self.index[rec["spectrum"]["order"]]] = rec["spectrum"]
            elif "factors" in rec and rec["factors"]["order"] in self.index and self._intact(rec["factors"]):
                self.factors[self.index[rec["factors"]["order"]]] = rec["factors"]

    def _intact(self, rec: dict) -> bool:
        if not rec.get("k"):
            return True
        path = self.scratch / f"{rec['order']}.safetensors"  # never a path the journal names
        return rec.get("file") == path.name and path.is_file() and rec.get("sha256") == file_digest(path)

    def n_values(self, i: int) -> int:
        """Singular values journaled for target i: enough for every rank it may take, the uniform
        comparison and ``top_values`` (all of them under ``energy``, whose rank is the spectrum's)."""
        t = self.targets[i]
        if self.config.mode == "energy":
            return t.p
        return min(t.p, max(self.plan.caps[i], self.plan.uniform_bound, self.config.top_values) + 1)

    def add_spectrum(self, i: int, S: np.ndarray, total: float, method: str, *, residual: float | None = None,
                     base_fro: float | None = None, note: str = "", stage: str = "spectra", exp: int = 0,
                     floor: float = 0.0) -> None:
        """Journal target i's top values ``S`` and ``total`` = ‖ΔW‖²_F, both of ``ΔW·2**-exp``, and ``floor``, the
        storage rounding floor of ΔW's singular values (:func:`spectra.delta.pair_floor`, in ΔW's units; 0: none known).
        Where ``S`` is the whole spectrum (``p`` values) and more than are journaled, ``rest`` is the energy of the
        others, Σσᵢ² summed from them: a rank's tail energy without ``total − Σ_{i≤r}σᵢ²``, which cancels to noise near
        exact (``rel_fro_error``); a top-k ``S`` leaves it out (its unlisted values are not all of the tail)."""
        t = self.targets[i]
        n, S = self.n_values(i), np.asarray(S, dtype=np.float64)
        rec = {"order": t.order, "S": [float(x) for x in S[:n]], "total": float(total),
               "method": method, "residual": residual, "base_fro": base_fro, "note": note}
        if S.size > n and S.size == t.p:
            rec["rest"] = float(np.sum(S[n:] ** 2))
        if exp:
            rec["exp"] = int(exp)
        if floor > 0:
            rec["floor"] = math.ldexp(floor, -int(exp))
        self.spectra[i] = rec
        self.journal.add({"spectrum": rec})
        self._emit(stage, t.name)

    def skip(self, i: int, reason: str) -> None:
        t = self.targets[i]
        rec = {"order": t.order, "S": [], "total": 0.0, "method": "skipped", "residual": None, "base_fro": None,
               "note": reason, "skipped": True}
        self.spectra[i] = rec
        self.journal.add({"spectrum": rec})
        self._emit("spectra", t.name)

    def store_factors(self, i: int, B: torch.Tensor | None, A: torch.Tensor | None) -> None:
        """Write target i's factors to its scratch file (none when k = 0); safe from any thread. Where the
        adapter's dtype is narrower than the factors', what its rounding does to each rank's product too."""
        if A is not None and A.shape[0]:
            if torch.finfo(self.scratch_dtype).bits < torch.finfo(B.dtype).bits:
                self._rounding[i] = [float(x) for x in rounding_error(B, A, self.scratch_dtype)]
            write_safetensors(self.scratch / f"{self.targets[i].order}.safetensors", [("B", tuple(B.shape)), ("A", tuple(A.shape))],
                              [B, A], self.scratch_dtype)

    def add_factors(self, i: int, B: torch.Tensor | None, A: torch.Tensor | None, *, stage: str | None = None,
                    stored: bool = False) -> None:
        """Keep target i's factors (written here unless ``stored``: :meth:`store_factors` did) and journal them."""
        t = self.targets[i]
        k = 0 if A is None else int(A.shape[0])
        name = f"{t.order}.safetensors"
        if not stored:
            self.store_factors(i, B, A)
        rec = {"order": t.order, "k": k, "file": name if k else ""}
        if k:  # a resumed run uses the file only if it still holds these bytes
            rec["sha256"] = file_digest(self.scratch / name)
        if i in self._rounding:
            rec["rounding"] = self._rounding.pop(i)
        self.factors[i] = rec
        self.journal.add({"factors": rec})
        if stage:
            self._emit(stage, t.name)

    def has_factors(self, i: int, k: int) -> bool:
        f = self.factors.get(i)
        return f is not None and f["k"] >= k and (k == 0 or (self.scratch / f["file"]).is_file())

    def storage_error(self, i: int, r: int) -> float | None:
        """:func:`rounding_error` of target i's rank-r factors as stored; None where nothing was rounded
        (or a run journaled before it was measured)."""
        rounding = (self.factors.get(i) or {}).get("rounding")
        return float(rounding[r - 1]) if rounding and 0 < r <= len(rounding) else None

    def load(self, i: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored top-r factors of target i, ``B (out, r)``, ``A (r, in)``, in the scratch dtype. A target
        that stored fewer than r (an expert whose update is zero, or an adapter's expert of a lower LoRA rank, given
        its stack's shared rank: PEFT loads an MoE adapter only when every expert has one r) gets zero components
        to make up r."""
        rec = self.factors.get(i) or {"k": 0, "file": ""}
        out_dim, in_dim = self.targets[i].shape
        if rec["k"]:
            f = load_file(str(self.scratch / rec["file"]))
            B, A = f["B"][:, :r], f["A"][:r]
        else:
            B, A = torch.zeros(out_dim, 0), torch.zeros(0, in_dim)
        if B.shape[1] < r:
            # a changed module must have its components, up to the most its update holds (an adapter's: its r)
            if B.shape[1] < min(r, self.targets[i].cap) and float((self.spectra.get(i) or {}).get("total") or 0) > 0:
                raise RuntimeError(f"{self.targets[i].name}: {B.shape[1]} components stored, rank {r} asked")
            B = torch.cat([B, B.new_zeros(out_dim, r - B.shape[1])], 1)
            A = torch.cat([A, A.new_zeros(r - A.shape[0], in_dim)], 0)
        return B, A

    def _emit(self, stage: str, name: str) -> None:
        self.done += 1
        if self.callback:
            self.callback(ExtractEvent(stage, self.done, len(self.targets), name))

    # ---- how many components a module keeps now (one pass) ----------------------------------------
    def cutoff(self) -> float:
        """Under ``budget``: the critical value per parameter of the greedy over untied modules seen
        so far, in units of ``4**self._cut_exp`` (:func:`~spectra.extract_plan.common_exp`); a component
        below it is not in the greedy's prefix (0 while they all fit in the budget). The fill step after
        the prefix may still give a module such components: :func:`spectra.extract.extract` factors
        those modules again.

        Any subset of the modules gives a valid cut-off (more modules only raise it), so it is
        recomputed only when the modules seen have grown by a tenth since the last time: O(log n)
        sorts instead of one per matrix, at the price of keeping a few more components in between.
        """
        if self.config.mode != "budget":
            return 0.0
        idx = [i for i, rec in self.spectra.items() if not self.targets[i].group and not rec.get("skipped")]
        if len(idx) < 1.1 * self._cut_at + 1:
            return self._cut
        need = sum(self.plan.caps[i] * self.targets[i].cost for i in idx)
        if need > self.plan.budget:  # before that every seen component fits: the cut-off is 0
            ref = common_exp(self.spectra[i] for i in idx)
            gains = [energies(self.spectra[i], ref, self.plan.caps[i], self.targets[i].p) for i in idx]
            self._cut = allocate_budget(gains, [self.targets[i].cost for i in idx], self.plan.budget,
                                        levels=[self.plan.levels[i] for i in idx], fill=False).ratio
            self._cut_at, self._cut_exp = len(idx), ref
        return self._cut

    def keep_now(self, i: int, S: np.ndarray, total: float, cutoff: float, exp: int = 0) -> int:
        """Components of target i to keep in the first pass: every one it may still be given (``S``,
        ``total`` of ``ΔW·2**-exp``; ``cutoff`` from :meth:`cutoff`)."""
        t, cap, levels = self.targets[i], self.plan.caps[i], self.plan.levels[i]
        if total <= 0 or cap == 0:
            k = 0
        elif self.config.mode == "rank" or t.group:
            k = cap
        elif self.config.mode == "energy":
            r = energy_rank_top(S, total, self.config.energy, t.p)
            k = cap if r is None else min(cap, round_up(r, levels))
        else:
            try:  # the cut-off in this module's units (0 when it underflows: keep all; inf: none can be chosen)
                cut = math.ldexp(cutoff, 2 * (self._cut_exp - exp)) if cutoff else 0.0
            except OverflowError:
                cut = math.inf
            k = reach_above(np.asarray(S[:cap]) ** 2, t.cost, cut, levels)
        return min(t.p, max(k, min(t.p, self.plan.uniform_bound)))


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse a folder that holds anything unless resuming or forced; with ``force`` remove what a
    previous run wrote (only spectra's own files). A resume with no journal is refused before anything is
    created. The lock file of a run that has ended (its process exited, however) is not content: a live
    run's lock is refused when the journal takes it (:class:`spectra.io.files.OutputLock`)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path exists and is not a folder", path=out, hint="choose a folder for --out")
    try:  # safetensors (the factors' scratch files) takes UTF-8 paths only: refused before anything is written
        os.fsencode(out.absolute()).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the output folder's path is not valid UTF-8, and safetensors writes only to UTF-8 paths",
                          path=out, hint="choose an --out whose path is UTF-8") from None
    if resume and not (out / JOURNAL).is_file():
        raise ConfigError(f"nothing to resume: no {JOURNAL}", path=out, hint="run without --resume first")
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if present:
        refuse_if_held(out)  # a live run's folder: not "pass --force", which would delete its files
    if present and not resume and not force:
        raise ConfigError(f"the output folder is not empty ({', '.join(present[:3])}{'…' if len(present) > 3 else ''})",
                          path=out, hint="choose an empty or new folder, pass --force to overwrite, or --resume to finish an interrupted run")
    if force and not resume:
        for name in [*OUTPUT_FILES, *(p.name for p in (out.iterdir() if out.is_dir() else ()) if uniform_folder(p))]:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


#: The folder ``--eval`` writes the uniform-rank adapter to (``uniform_r<rank>``), beside the extracted one.
UNIFORM_DIR = re.compile(r"uniform_r\d+")


def uniform_folder(path: Path) -> bool:
    """Whether ``path`` is a uniform-rank adapter an earlier ``--eval`` wrote: a folder named
    ``uniform_r<rank>`` holding only the files of a PEFT adapter (a user's ``uniform_runs/`` or a folder
    with other files is not spectra's, and ``--force`` leaves it)."""
    try:
        return (UNIFORM_DIR.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()
                and {p.name for p in path.iterdir()} <= {"adapter_config.json", "adapter_model.safetensors"})
    except OSError:
        return False


def refuse_unwritten_layouts(adapter: Adapter) -> None:
    """Refuse an adapter holding a layout extract does not write back: PEFT's LoRA of an ``nn.MultiheadAttention``
    (its ``in_proj_weight`` LoRA on the module, its ``out_proj`` one under ``base_layer`` at the module's rank)."""
    if mha := [m.module for m in adapter.modules.values() if m.weight_name.endswith(".in_proj_weight")]:
        raise ConfigError(f"{mha[0]} is an nn.MultiheadAttention with PEFT's LoRA, a layout extract does not write", path=adapter.path,
                          hint="merge the adapter (merge_and_unload) and extract from the merged model against the base")


def refuse_an_input_folder(out: Path, *inputs: str | Checkpoint) -> None:
    """An output folder that is an input's folder would be overwritten (``--force`` first deletes the
    adapter files a run writes, which are an adapter input's own), and so would an input inside the
    ``uniform_r<rank>`` folder ``--eval`` writes and ``--force`` deletes: refused before anything is touched."""
    target = out.resolve()
    for x in inputs:
        where = Path(getattr(x, "root", None) or x.label) if isinstance(x, Checkpoint) else Path(x)
        try:
            where = where.resolve()
        except OSError:
            continue
        inside = where.relative_to(target).parts if where.is_relative_to(target) else ()
        if inside and UNIFORM_DIR.fullmatch(inside[0]):
            raise ConfigError(f"the input {x.label if isinstance(x, Checkpoint) else x} lies in {target / inside[0]}, the "
                              "folder where --eval writes its uniform-rank adapter (and --force deletes it)", path=out,
                              hint="choose another folder for --out, or move the input out of it")
        # a folder input (a model, an adapter) holds files the run writes; a lone file only if it has such a name
        folder = where if where.is_dir() else where.parent
        if target == folder and (where.is_dir() or where.name in OUTPUT_FILES):
            raise ConfigError(f"--out is the folder of the input {x.label if isinstance(x, Checkpoint) else x}: the run "
                              "would overwrite (with --force: delete) its files", path=out,
                              hint="choose another folder for --out: a resized adapter is written beside the one it comes from")


def out_dtype(config: ExtractConfig, stored: list[str]) -> torch.dtype:
    """The adapter's storage dtype: ``--dtype``, or the tuned tensors' most common one (bfloat16 for fp8/int8)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    common = max(set(stored), key=stored.count) if stored else "float32"
    return getattr(torch, common) if common in ("float64", "float32", "float16", "bfloat16") else torch.bfloat16


def adapter_dtype(adapter: Adapter) -> str:
    """The dtype most of an adapter's stored tensors have (``"float32"`` when it holds none)."""
    f = next(adapter.path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter.path / n).is_file())
    dtypes = [i.dtype for i in tensor_infos(f).values()]
    return max(set(dtypes), key=dtypes.count) if dtypes else "float32"


def lora_fro(mod: Any) -> float:
    """‖s·B·A‖_F from the factors (QR and an r × r SVD; the product is never formed)."""
    Bf, Af = mod.factors()
    return factored_triplets(Bf, Af, mod.scale, 0).total ** 0.5


def tensor_fro(ckpt: Checkpoint, name: str | None) -> float | None:
    """‖W‖_F of a stored tensor in float64, or None when there is no such tensor."""
    if name is None or name not in ckpt.tensors:
        return None
    return float(torch.linalg.vector_norm(ckpt.load(name).double()).item())


#: Left-out matrices (embeddings, the head) have their norms computed on a thread beside the pass, a
#: block of rows at a time; one that can only be read whole (a ``.bin`` file, a quantised tensor) and
#: whose pair is above this many stored bytes goes first and alone instead, so that the run's peak
#: memory is the larger of the two, not their sum.
LEFT_OUT_BESIDE_BYTES = 256 << 20


def left_out_records(base: Checkpoint, tuned: Checkpoint | None, left_out: list[tuple[Any, str]]) -> Callable[[], list[dict]]:
    """Start the records of the matrices not extracted (:func:`~spectra.extract_results.left_out_record`;
    ``left_out``: ``(Task or (name, shape, fro, base_fro), reason)`` pairs); the function returned
    gives them, re-raising a read error. They are computed on a thread while the pass runs, reading
    blocks of rows (on the 135M-layout pair, the 113 MB embedding pair: 0.1-0.25 s that had kept a core
    idle); a large one that can only be read whole goes first, alone (:data:`LEFT_OUT_BESIDE_BYTES`)."""
    def records() -> list[dict]:
        return [left_out_record(base, tuned, what, why) for what, why in left_out]

    size = sum(what.pair.stored_bytes for what, _ in left_out if isinstance(what, Task)
               and not reads_pair_by_rows(base, what.pair.base.name, tuned, what.pair.tuned.name, compared_rows(what)))
    if not left_out or size > LEFT_OUT_BESIDE_BYTES:
        done = records()
        return lambda: done
    box: dict[str, Any] = {}

    def run() -> None:
        one_openmp_thread()  # beside the compute threads, not over them
        try:
            box["records"] = records()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="spectra-left-out", daemon=True)
    thread.start()

    def result() -> list[dict]:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["records"]

    return result


__all__ = ["JOURNAL", "LEFT_OUT_BESIDE_BYTES", "OUTPUT_FILES", "SCRATCH", "ExtractEvent", "ExtractRun", "adapter_dtype",
           "left_out_records", "lora_fro", "out_dtype", "prepare_out", "refuse_an_input_folder", "refuse_unwritten_layouts",
           "rounding_error", "tensor_fro"]
