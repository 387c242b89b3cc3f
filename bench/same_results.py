"""Are two ``results.json`` the same numbers? Every field of every module, matched by tensor name.

Used to check that a refactor left results unchanged (issue 12: the code before, ``aad8413``, against
the working tree, on bench/speed_135m.py's pair). Timing fields (``seconds``, ``elapsed_s``) and the
``method`` label are ignored. Prints the worst relative difference of each numeric field, every
differing non-numeric field, and exits 1 when a key set, a list length, a non-numeric value or an
integer differs, or a float differs by more than ``--rtol`` (default 1e-10: effective rank, exp of an entropy, moves ~1e-12 between summation orders).

Run: ``python bench/same_results.py A/results.json B/results.json [--rtol 1e-10]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IGNORED = {"seconds", "elapsed_s", "method"}


def compare(x, y, path: str, worst: dict, errors: list) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            errors.append(f"{path}: keys differ {sorted(set(x) ^ set(y))}")
        for k in sorted(set(x) & set(y) - IGNORED):
            compare(x[k], y[k], f"{path}.{k}", worst, errors)
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            errors.append(f"{path}: lengths {len(x)} vs {len(y)}")
        for u, v in zip(x, y):
            compare(u, v, f"{path}[]", worst, errors)
    elif isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool):
        if x != y:
            errors.append(f"{path}: {x} vs {y}")
    elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        d = 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else abs(x - y) / max(abs(x), abs(y), 1e-300)
        worst[path] = max(worst.get(path, 0.0), d)
    elif x != y:
        errors.append(f"{path}: {str(x)[:60]!r} vs {str(y)[:60]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-10)
    args = ap.parse_args()
    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (args.a, args.b))
    ma, mb = ({m["name"]: m for m in d["modules"]} for d in (a, b))
    worst: dict[str, float] = {}
    errors: list[str] = []
    if set(ma) != set(mb):
        errors.append(f"modules differ: {sorted(set(ma) ^ set(mb))[:5]}")
    for name in sorted(set(ma) & set(mb)):
        compare(ma[name], mb[name], "module", worst, errors)
    print(f"{len(ma)} and {len(mb)} modules; worst relative difference per float field:")
    for path, d in sorted(worst.items(), key=lambda kv: -kv[1]):
        print(f"  {path}: {d:.2e}")
    errors += [f"{p}: relative difference {d:.2e} > {args.rtol:g}" for p, d in worst.items() if d > args.rtol]
    for e in errors[:20]:
        print("DIFFERS", e)
    print("same" if not errors else f"{len(errors)} differences")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
