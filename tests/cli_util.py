"""Running the command line as a user does, in a subprocess, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], cwd: Path | str = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``spectra ARGS`` in a fresh interpreter (this checkout's package first on the path, a wide terminal so that
    tables do not wrap), its output captured as text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)
