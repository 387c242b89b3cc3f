"""``spectra compare A B [--base BASE]``: how two updates of the same base relate (SPEC.md, "Subspaces").

A and B are each a PEFT LoRA adapter (ΔW = s·B·A, decomposed from its factors) or a full fine-tuned
checkpoint (ΔW = W_tuned − W_base, which needs ``base``). For every module both update, the paper
measures are computed on the top singular subspaces: Hu et al.'s φ grid with its random baseline,
principal angles and the Grassmann distance, the energy of each update captured by the other's
subspaces next to the best any subspace of that rank can capture, and, with the base, Hu et al.'s
amplification factor and Shuttleworth et al.'s intruder dimensions for each side.

Matrices are compared whole: fused matrices (``qkv_proj``, ``c_attn``) are not split here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from spectra import __version__
from spectra.adapter_diff import adapter_updates
from spectra.diff import _delta, _oriented, check_device_available, parse_layers, selector, validate_device, validate_filters
from spectra.engine import randomized_svd
from spectra.errors import ConfigError, PairingError
from spectra.io.adapter import Adapter, is_adapter, open_adapter
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.linalg import resolve_device
from spectra.naming import describe_checkpoint, pairing_key, role_sort_key, unique_pairing_keys
from spectra.pairing import pair_checkpoints
from spectra.results import atomic_write_text, rows_to_csv
from spectra.subspaces import (
    DEFAULT_EPSILONS, Factored, amplification, captured_energy, grassmann_distance, intruder_dimensions, phi_grid,
    phi_random_baseline, principal_angles, top_subspace,
)

SCHEMA = "spectra.compare/1"
#: Above this p a full update's top-k comes from the randomized SVD instead of a dense float64 SVD.
EXACT_SVD_MAX_P = 2048


@dataclass(frozen=True)
class CompareConfig:
    """Options of a compare run; saved with the results.

    Attributes:
        side: singular vectors compared: ``"right"`` (input space; Hu et al. used the right singular
            vectors of the LoRA ``A`` matrices), ``"left"`` or ``"both"``.
        top_k: rank of the subspace taken from a full (non-LoRA) update.
        intruder_k: top singular vectors of the tuned weight checked for intruders (default 10).
        epsilon: intruder threshold; ``epsilons`` the sweep.
        include, exclude, layers: as for ``spectra diff``, on the base tensor names.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seed of random references (random projections of the amplification table).
    """

    side: Literal["left", "right", "both"] = "right"
    top_k: int = 64
    intruder_k: int = 10
    epsilon: float = 0.5
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    include: str | None = None
    exclude: str | None = None
    layers: str | None = None
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.side not in ("left", "right", "both"):
            raise ConfigError(f"side must be left, right or both. Got {self.side!r} instead")
        if self.top_k < 1 or self.intruder_k < 1:
            raise ConfigError(f"top_k and intruder_k must be >= 1. Got {self.top_k}, {self.intruder_k} instead")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1). Got {self.epsilon} instead")
        if self.layers is not None:
            parse_layers(self.layers)
        validate_filters(self.include, self.exclude)
        validate_device(self.device)


class _Updates:
    """One side of a comparison: per base tensor (pairing key), its update as a thin SVD."""

    def __init__(self, label: str, base: Checkpoint | None, config: CompareConfig, device: torch.device):
        self.label = label
        self.base = base
        self.config = config
        self.device = device
        self.adapter: Adapter | None = None
        self.tuned: Checkpoint | None = None
        if is_adapter(label):
            self.adapter = open_adapter(label)
            self.kind = "lora"
            if base is not None:
                adapter_updates(self.adapter, base)  # every adapted module exists in the base, same shape
            self.names = {pairing_key(m.weight_name): m.weight_name for m in self.adapter.modules.values()}
            self._mods = {pairing_key(m.weight_name): m for m in self.adapter.modules.values()}
        else:
            if base is None:
                raise ConfigError(f"{label} is a full checkpoint: its update needs the base model",
                                  hint="pass --base BASE")
            self.tuned = open_checkpoint(label)
            self.kind = "full"
            # the same pairing as `spectra diff`: wrapper prefixes, skipped non-float or mismatched
            # matrices, shared rows of a resized vocabulary
            pairing = pair_checkpoints(base, self.tuned)
            self._pairs = {pairing_key(p.base.name): p for p in pairing.pairs if len(p.tuned_info.shape) == 2}
            self.names = {k: p.tuned.name for k, p in self._pairs.items()}

    def rank(self, key: str) -> int:
        return self._mods[key].r if self.kind == "lora" else self.config.top_k

    def update(self, key: str, base_name: str | None, transpose: bool) -> tuple[Factored, torch.Tensor | None, float]:
        """``(thin SVD, dense ΔW or None, ‖ΔW‖_F²)``; the dense form only for full updates."""
        if self.kind == "lora":
            mod = self._mods[key]
            Bf, Af = mod.factors()
            if mod.magnitude is not None:  # DoRA: dense, needs the base
                if self.base is None or base_name is None:
                    raise ConfigError("a DoRA adapter's update depends on the base weights", hint="pass --base BASE")
                W = self.base.load(base_name).to(torch.float32)
                dense = mod.dora_delta(W.mT if transpose else W).to(self.device)
                return self._thin(dense), dense, float((dense.double() ** 2).sum())
            f = Factored.from_lora(Bf.to(self.device), Af.to(self.device), mod.scale)
            return f, None, float((f.S.double() ** 2).sum())
        pair = self._pairs[key]
        wb = _oriented(self.base.load(pair.base.name), pair.base.transpose, pair.rows)
        wt = _oriented(self.tuned.load(pair.tuned.name), pair.tuned.transpose, pair.rows)
        dense, _, bad = _delta(wb, wt, self.device)
        if bad:
            raise ConfigError(f"{' and '.join(bad)} weights of {pair.tuned.name} contain NaN or Inf", path=self.label,
                              hint="leave the module out with --exclude")
        return self._thin(dense), dense, float((dense.double() ** 2).sum())

    def _thin(self, dense: torch.Tensor) -> Factored:
        p = min(dense.shape)
        k = min(self.config.top_k, p)
        if p <= EXACT_SVD_MAX_P:
            U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
            return Factored(U[:, :k], S[:k], Vh[:k])
        t = randomized_svd(dense, k, tol=1e-3, generator=torch.Generator().manual_seed(self.config.seed))
        return Factored(t.U.double(), torch.as_tensor(t.S, device=dense.device), t.Vh.double())


@dataclass
class CompareResult:
    """What ``spectra compare`` computed; ``compare.json`` holds :meth:`to_dict`.

    Attributes:
        a, b, base: the inputs as given (base may be None).
        kinds: ``{"a": "lora"|"full", "b": ...}``.
        config: the options.
        modules: one record per module both update (see ``docs`` in README: keys ``phi``,
            ``angles``, ``captured``, ``amplification``, ``intruders``).
        a_only, b_only: modules only one side updates.
        phi_grids: module name -> side -> φ grid (rows i = 1..r_A, columns j = 1..r_B).
    """

    a: str
    b: str
    base: str | None
    kinds: dict[str, str]
    config: dict[str, Any]
    modules: list[dict[str, Any]] = field(default_factory=list)
    a_only: list[str] = field(default_factory=list)
    b_only: list[str] = field(default_factory=list)
    phi_grids: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def rows(self) -> list[dict[str, Any]]:
        """Flat per-module records for CSV/DataFrames."""
        out = []
        for m in self.modules:
            row = {k: m[k] for k in ("name", "layer", "module", "role", "out", "in", "rank_a", "rank_b")}
            for side, ph in m["phi"].items():
                row[f"phi_{side}"] = ph["phi_full"]
                row[f"phi_{side}_random"] = ph["random"]
                row[f"grassmann_{side}"] = m["angles"][side]["grassmann"]
            for who, ce in m["captured"].items():
                for k in ("two_sided", "left", "right", "best_rank_r"):
                    row[f"captured_{who}_{k}"] = ce[k]
            for who, amp in (m.get("amplification") or {}).items():
                row[f"amplification_{who}"] = amp["factor"]
            for who, intr in (m.get("intruders") or {}).items():
                row[f"intruders_{who}"] = intr["count"]
            out.append(row)
        return out

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "json": atomic_write_text(out / "compare.json", json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"),
            "csv": atomic_write_text(out / "compare.csv", rows_to_csv(self.rows())),
        }
        if plots and self.modules:
            from spectra import plots as _plots

            files.update(_plots.compare_plots(self, out))
        return files


def compare(
    a: str,
    b: str,
    *,
    base: str | None = None,
    config: CompareConfig | None = None,
    out_dir: str | Path | None = None,
    callback: Callable[[int, int, str], None] | None = None,
    plots: bool = True,
) -> CompareResult:
    """Compare the updates of ``a`` and ``b`` (each a LoRA adapter or, with ``base``, a full checkpoint).

    Args:
        a, b: adapter folders or checkpoints (anything :func:`spectra.open_checkpoint` accepts).
        base: the base both were fine-tuned from; needed for full checkpoints, DoRA, amplification
            and intruder dimensions.
        config: options (:class:`CompareConfig`).
        out_dir: where ``compare.json``, ``compare.csv`` and the plots go.
        callback: ``callback(done, total, name)`` after each module.

    Example:
        >>> res = compare("lora-r8/", "lora-r64/", base="base/")   # doctest: +SKIP
    """
    config = config or CompareConfig()
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    check_device_available(device)
    base_ckpt = open_checkpoint(base) if base is not None else None
    A = _Updates(str(a), base_ckpt, config, device)
    B = _Updates(str(b), base_ckpt, config, device)
    result = CompareResult(str(a), str(b), None if base is None else str(base), {"a": A.kind, "b": B.kind}, asdict(config))
    shared = [k for k in A.names if k in B.names]
    result.a_only = sorted(A.names[k] for k in A.names if k not in B.names)
    result.b_only = sorted(B.names[k] for k in B.names if k not in A.names)
    if not shared:
        raise PairingError("the two inputs update no module in common", path=f"{a} vs {b}",
                           hint="are they fine-tunes of the same base model?")
    base_specs = describe_checkpoint({n: t.shape for n, t in base_ckpt.tensors.items()}, base_ckpt.arch) if base_ckpt else {}
    base_keys = unique_pairing_keys(list(base_specs))
    names_for_specs = {k: (base_keys.get(k) or A.names[k]) for k in shared}
    if not base_ckpt:
        shapes = {}
        for k in shared:
            mod = A._mods.get(k) if A.kind == "lora" else None
            shapes[A.names[k]] = mod.shape if mod else A.tuned.tensors[A.names[k]].shape
        base_specs = describe_checkpoint(shapes)
    keep = selector(config.include, config.exclude, config.layers)
    todo = []
    for k in shared:
        spec = base_specs.get(names_for_specs[k])
        if spec is None:
            raise PairingError(f"the base checkpoint has no matrix {names_for_specs[k]}", path=str(base), tensor=names_for_specs[k])
        if keep(spec.name, spec.layer):
            todo.append((k, spec))
    todo.sort(key=lambda t: (t[1].layer if t[1].layer is not None else -1, role_sort_key(t[1].role, t[1].module)))
    sides = ("left", "right") if config.side == "both" else (config.side,)
    gen = torch.Generator().manual_seed(config.seed)
    for done, (k, spec) in enumerate(todo, start=1):
        base_name = base_keys.get(k)
        fa, dense_a, ea = A.update(k, base_name, spec.transpose)
        fb, dense_b, eb = B.update(k, base_name, spec.transpose)
        ra, rb = min(A.rank(k), fa.S.numel()), min(B.rank(k), fb.S.numel())
        out_dim, in_dim = fa.shape
        rec: dict[str, Any] = {"name": spec.name, "layer": spec.layer, "module": spec.module, "role": spec.role,
                               "out": out_dim, "in": in_dim, "rank_a": ra, "rank_b": rb,
                               "fro_a": ea ** 0.5, "fro_b": eb ** 0.5, "phi": {}, "angles": {}, "captured": {}}
        grids = {}
        for side in sides:
            QA, QB = top_subspace(fa, ra, side), top_subspace(fb, rb, side)
            d = QA.shape[0]
            grid = phi_grid(QA, QB)
            grids[side] = grid.round(6).tolist()
            rec["phi"][side] = {"phi_full": float(grid[-1, -1]), "phi_11": float(grid[0, 0]), "mean": float(grid.mean()),
                                "random": phi_random_baseline(ra, rb, d), "d": d}
            ang = principal_angles(QA, QB)
            rec["angles"][side] = {"cosines": np.cos(ang).round(8).tolist(), "grassmann": grassmann_distance(QA, QB)}
        result.phi_grids[spec.name] = grids
        UA, VA = top_subspace(fa, ra, "left"), top_subspace(fa, ra, "right")
        UB, VB = top_subspace(fb, rb, "left"), top_subspace(fb, rb, "right")
        rec["captured"]["b_in_a"] = asdict(captured_energy(dense_b if dense_b is not None else fb, UA, VA))
        rec["captured"]["a_in_b"] = asdict(captured_energy(dense_a if dense_a is not None else fa, UB, VB))
        if base_ckpt is not None and base_name is not None:
            W = base_ckpt.load(base_name).to(torch.float32)
            W = (W.mT if spec.transpose else W)[:out_dim].contiguous().to(device)  # shared rows of a resized vocabulary
            rec["amplification"] = {
                who: asdict(amplification(f if dn is None else dn, W, r, generator=gen))
                for who, f, dn, r in (("a", fa, dense_a, ra), ("b", fb, dense_b, rb))
            }
            rec["intruders"] = {}
            for who, f, dn in (("a", fa, dense_a), ("b", fb, dense_b)):
                intr = intruder_dimensions(W, f if dn is None else dn, k=min(config.intruder_k, min(W.shape)),
                                           epsilons=config.epsilons, epsilon=config.epsilon)
                rec["intruders"][who] = {"count": intr.count, "epsilon": intr.epsilon,
                                         "counts": {str(float(e)): c for e, c in intr.counts.items()},
                                         "max_cos": np.asarray(intr.max_cos).round(6).tolist()}
        result.modules.append(_jsonable(rec))
        if callback:
            callback(done, len(todo), spec.name)
    result.elapsed_s = time.perf_counter() - t0
    if out_dir is not None:
        result.save(out_dir, plots=plots)
    return result


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and float keys -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, float) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
