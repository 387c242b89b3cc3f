"""spectra: weight-space spectral analysis of fine-tuned models.

The main entry point is :func:`diff`: the spectrum of ΔW = W_tuned − W_base for every paired matrix
of two checkpoints, with the metrics defined in SPEC.md (energy ranks, norms, stable and effective
rank, random-matrix baselines).

>>> import spectra
>>> res = spectra.diff("base.safetensors", "tuned.safetensors", out_dir="out")   # doctest: +SKIP
"""

__version__ = "0.1.0"

from spectra.errors import SpectraError  # noqa: E402
from spectra.diff import DiffConfig, DiffEvent, diff  # noqa: E402
from spectra.io.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from spectra.results import DiffResult, ModuleResult  # noqa: E402

__all__ = ["diff", "DiffConfig", "DiffEvent", "DiffResult", "ModuleResult", "Checkpoint", "open_checkpoint", "SpectraError", "__version__"]
