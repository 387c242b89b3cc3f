"""spectra: weight-space spectral analysis of fine-tuned models.

The main entry points are :func:`diff`, the spectrum of ΔW = W_tuned − W_base for every paired
matrix of two checkpoints (or of a PEFT LoRA adapter's updates) with the metrics defined in SPEC.md
(energy ranks, norms, stable and effective rank, random-matrix baselines), and :func:`compare`, the
subspace measures between two updates of one base (φ, principal angles, captured energy,
amplification, intruder dimensions).

>>> import spectra
>>> res = spectra.diff("base.safetensors", "tuned.safetensors", out_dir="out")   # doctest: +SKIP
"""

__version__ = "0.1.0"

from spectra.errors import SpectraError  # noqa: E402
from spectra.diff import DiffConfig, DiffEvent, diff, plan_run as diff_plan  # noqa: E402
from spectra.io.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from spectra.results import DiffResult, ModuleResult  # noqa: E402
from spectra.compare import CompareConfig, CompareResult, compare  # noqa: E402

__all__ = ["diff", "diff_plan", "DiffConfig", "DiffEvent", "DiffResult", "ModuleResult", "compare", "CompareConfig", "CompareResult",
           "Checkpoint", "open_checkpoint", "SpectraError", "__version__"]
