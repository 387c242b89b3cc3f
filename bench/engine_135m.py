"""The exact engine alone on the ΔW of a SmolLM2-135M-layout pair: the path before issue 14 (torch
Gram + ``torch.linalg.eigvalsh`` in float64, one matrix at a time on the main thread) against
``spectra.engine.exact_spectra`` (float64 and certified; batches of up to 32 equally shaped matrices,
as the pipeline batches them), alternated in one run, with the load average after each.

Run: ``python bench/engine_135m.py PAIR_DIR`` where PAIR_DIR holds ``base/`` and ``tuned/``
(``bench/speed_135m.py --workdir DIR`` writes one).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import torch

from spectra.engine import exact_spectra
from spectra.io.checkpoint import open_checkpoint
from spectra.linalg import gram


def main() -> None:
    pair = sys.argv[1]
    b, t = open_checkpoint(f"{pair}/base"), open_checkpoint(f"{pair}/tuned")
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    t0 = time.perf_counter()
    for name, info in t.tensors.items():
        if len(info.shape) == 2:
            delta = t.load(name).float() - b.load(name).float()
            groups[tuple(delta.shape)].append(delta)
    print(f"read + ΔW {time.perf_counter() - t0:.2f} s; matrices per shape {dict((k, len(v)) for k, v in groups.items())}")

    def before() -> None:
        for mats in groups.values():
            for m in mats:
                torch.linalg.eigvalsh(gram(m, dtype=torch.float64))

    def after(precision: str) -> None:
        for mats in groups.values():
            for i in range(0, len(mats), 32):
                exact_spectra(mats[i : i + 32], device="cpu", precision=precision)

    for name, fn in (("before: torch Gram + eigvalsh, float64, main thread", before), ("after: exact_spectra float64", lambda: after("float64")),
                     ("after: exact_spectra certified", lambda: after("certified")), ("before, again", before),
                     ("after float64, again", lambda: after("float64"))):
        t0 = time.perf_counter()
        fn()
        print(f"{name}: {time.perf_counter() - t0:.2f} s (load average {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
