"""spectra: weight-space spectral analysis of fine-tuned models.

The main entry points are :func:`diff`, the spectrum of ΔW = W_tuned − W_base for every paired
matrix of two checkpoints (or of a PEFT LoRA adapter's updates) with the metrics of
``docs/definitions.md`` (energy ranks, norms, stable and effective rank, random-matrix baselines),
and :func:`compare`, the subspace measures between two updates of one base (φ, principal angles,
captured energy, amplification, intruder dimensions).

The functions live in modules whose names differ from theirs (:mod:`spectra.pipeline` holds
``diff``, :mod:`spectra.comparison` holds ``compare``), so ``spectra.diff`` is always the function.

>>> import spectra
>>> res = spectra.diff("base.safetensors", "tuned.safetensors", out_dir="out")   # doctest: +SKIP
"""

from spectra._version import __version__
from spectra.comparison import CompareResult, compare
from spectra.config import CompareConfig, DiffConfig
from spectra.errors import SpectraError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.pipeline import diff
from spectra.pipeline import plan_run as diff_plan
from spectra.records import DiffEvent
from spectra.results import DiffResult, ModuleResult

__all__ = ["diff", "diff_plan", "DiffConfig", "DiffEvent", "DiffResult", "ModuleResult", "compare", "CompareConfig", "CompareResult",
           "Checkpoint", "open_checkpoint", "SpectraError", "__version__"]
