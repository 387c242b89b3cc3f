"""Whole-command speed of ``spectra diff`` on a real-layout ~135M pair, before and after, in one run.

1. Writes a SmolLM2-135M-shaped float32 pair (``bench/smollm.py``: 211 matrices, 1.08 GB) in a temp
   folder, in a child process, and warms the page cache.
2. Extracts the code of ``--before`` (default ``aad8413``: the engine before issue 14) with ``git archive`` into
   the temp folder, to run it beside the working tree's.
3. Times whole commands, each a fresh process, interleaved (each repeat runs every variant once, so
   load from other processes hits them alike), medians of ``--repeats`` (3); peak RSS of each child
   from ``os.wait4`` (``ru_maxrss``; this parent does not import torch, so the exec-time carry-over
   of the parent's RSS stays below its ~20 MiB):
   - before: ``spectra diff B T --out D`` and ``--no-plots`` (the ``--before`` code, its defaults);
   - naive: a loop of ``torch.linalg.svd(ΔW, full_matrices=False)`` per matrix (the thin SVD: the
     full one would build a 49152² U for the embedding) and float64 cumulative energies;
   - after: the working tree, ``--precision float64`` and ``certified``, each with ``--out D`` and
     ``--no-plots``. Where the pipeline does not offer ``certified`` yet, it is emulated: the CLI runs
     with the pipeline's ``batch_singular_values`` replaced by ``spectra.engine.exact_spectra(...,
     precision="certified").S`` (what the pipeline change does), and the table says so.
4. Checks that every variant's energy ranks (results.json) equal the float64 ones, matrix by matrix.
5. Profiles each variant in one process: imports (``import spectra_cli.main``), reading both
   checkpoints and forming ΔW (float32, one thread, as the floor), the engine's Gram products and
   eigensolves (thread-seconds summed over worker threads, and the count of float32 spectra certified
   or recomputed), and the heatmaps (``diff(..., plots=True)`` minus ``plots=False``).

Run: ``python bench/speed_135m.py [--repeats 3] [--before REF] [--layers 30] [--save NAME]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THRESHOLDS = (0.5, 0.9, 0.99)

# Runs the CLI with the certified engine path when the pipeline does not offer it: every loaded
# spectra module that imported batch_singular_values gets exact_spectra(precision="certified").S.
_CERTIFIED_SHIM = """
import runpy, sys
import spectra_cli.main
import spectra.engine as E
def certified(mats, *, device="auto", method="gram", dtype=None, max_batch_bytes=None, **_):
    return E.exact_spectra(mats, precision="certified", thresholds=(0.5, 0.9, 0.99), top_k=64, device=device,
                           method=method, max_batch_bytes=max_batch_bytes).S
for name, mod in list(sys.modules.items()):
    if name.startswith("spectra.") and name != "spectra.engine" and hasattr(mod, "batch_singular_values"):
        mod.batch_singular_values = certified
sys.argv = ["spectra"] + sys.argv[1:]
runpy.run_module("spectra", run_name="__main__")
"""


# ---- children ------------------------------------------------------------------------------------------
def supports_certified(config_cls) -> bool:
    """Whether the pipeline's config accepts ``precision="certified"`` (the integration of this engine path)."""
    try:
        config_cls(precision="certified")
    except Exception:  # noqa: BLE001 - a ConfigError of either version
        return False
    return True


def child_probe() -> None:
    import spectra

    print(supports_certified(spectra.DiffConfig))


def child_generate(out: str, layers: int) -> None:
    sys.path.insert(0, str(HERE))
    from smollm import write_pair

    t0 = time.perf_counter()
    base, tuned = write_pair(Path(out), layers=layers)
    print(json.dumps({"seconds": time.perf_counter() - t0, "base": str(base), "tuned": str(tuned)}))


def child_naive(base: str, tuned: str) -> None:
    """The loop spectra replaces: thin SVD of every ΔW, energy ranks from float64 cumulative sums."""
    import numpy as np
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    ranks = {}
    with safe_open(f"{base}/model.safetensors", "pt") as fb, safe_open(f"{tuned}/model.safetensors", "pt") as ft:
        base_names = set(fb.keys())
        for name in list(ft.keys()):
            t = ft.get_tensor(name)
            if t.ndim != 2 or name not in base_names:
                continue
            delta = t.float() - fb.get_tensor(name).float()
            S = torch.linalg.svd(delta, full_matrices=False).S.double().numpy()
            e = np.cumsum(S**2)
            ranks[name] = {str(tau): int(np.searchsorted(e, tau * e[-1], side="left")) + 1 if e[-1] > 0 else 0 for tau in THRESHOLDS}
    print(json.dumps({"seconds": time.perf_counter() - t0, "ranks": ranks}))


def child_profile(base: str, tuned: str, out: str, precision: str) -> None:
    """One variant in one process: imports, read + ΔW, engine Gram/eigensolve, heatmaps."""
    import threading
    from collections import Counter

    t0 = time.perf_counter()
    import spectra_cli.main  # noqa: F401 - what the command imports before it starts

    imports = time.perf_counter() - t0
    import torch

    import spectra
    import spectra.engine as E
    import spectra.linalg as L
    from spectra.io.checkpoint import open_checkpoint

    b, t = open_checkpoint(base), open_checkpoint(tuned)
    names = [n for n, i in t.tensors.items() if len(i.shape) == 2]
    t1 = time.perf_counter()
    for n in names:
        _ = t.load(n).float() - b.load(n).float()
    read_delta = time.perf_counter() - t1

    acc: dict[str, float] = Counter()
    failed: Counter = Counter()
    lock = threading.Lock()

    def timed(kind, fn):
        def wrapper(*args, **kwargs):
            s = time.perf_counter()
            res = fn(*args, **kwargs)
            with lock:
                acc[kind] += time.perf_counter() - s
                acc[kind + "_calls"] += 1
                if kind == "certify":
                    acc["certified" if res.ok else "recomputed"] += 1
                    failed.update(res.failed)
            return res
        return wrapper

    # the working tree's engine (LAPACK backend) and the torch route of either version
    for mod, attr, kind in ((E, "gram_upper", "gram"), (E, "eigvalsh_upper", "eig"), (E, "certify_float32", "certify"),
                            (E, "gram", "gram"), (L, "gram", "gram"), (torch.linalg, "eigvalsh", "eig")):
        if hasattr(mod, attr):
            setattr(mod, attr, timed(kind, getattr(mod, attr)))
    native = precision == "certified" and supports_certified(spectra.DiffConfig)
    config = spectra.DiffConfig(precision=precision if precision != "certified" or native else "float64")
    if precision == "certified" and not native:  # emulate the pipeline change, as the shim does
        def certified(mats, *, device="auto", method="gram", dtype=None, max_batch_bytes=None, **_):
            return E.exact_spectra(mats, precision="certified", thresholds=THRESHOLDS, top_k=64, device=device,
                                   method=method, max_batch_bytes=max_batch_bytes).S
        for name, mod in list(sys.modules.items()):
            if name.startswith("spectra.") and name != "spectra.engine" and hasattr(mod, "batch_singular_values"):
                mod.batch_singular_values = certified
    t2 = time.perf_counter()
    res = spectra.diff(base, tuned, config=config, out_dir=f"{out}/noplots", plots=False)
    no_plots = time.perf_counter() - t2
    engine_wall = sum(m.seconds for m in res.modules)
    snapshot = dict(acc)
    t3 = time.perf_counter()
    spectra.diff(base, tuned, config=config, out_dir=f"{out}/plots", plots=True)
    with_plots = time.perf_counter() - t3
    print(json.dumps({
        "imports_s": imports, "read_delta_s": read_delta, "diff_no_plots_s": no_plots, "diff_plots_s": with_plots,
        "plots_s": with_plots - no_plots, "engine_wall_s": engine_wall, "gram_thread_s": snapshot.get("gram", 0.0),
        "eig_thread_s": snapshot.get("eig", 0.0), "certify_thread_s": snapshot.get("certify", 0.0),
        "certified": int(snapshot.get("certified", 0)), "recomputed": int(snapshot.get("recomputed", 0)),
        "failed_checks": dict(failed), "matrices": len(res.modules), "threads": torch.get_num_threads(),
        "native_certified": native,
    }))


# ---- the parent: no torch here -----------------------------------------------------------------------------
def run_measured(cmd: list[str], *, cwd: Path, env: dict) -> tuple[float, int, str, str]:
    """Wall seconds, peak RSS bytes (the child's ``ru_maxrss`` from ``os.wait4``), stdout and stderr of a
    child process; exits with its stderr if it fails."""
    with tempfile.TemporaryFile(mode="w+") as out_f, tempfile.TemporaryFile(mode="w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out_f, stderr=err_f, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM (as an exit, below): the child is not left running
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, out, err


def extract_before(ref: str, dest: Path) -> str:
    """``spectra/`` and ``cli/`` (as ``spectra_cli``) of ``ref`` into ``dest``; returns the commit id."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True, text=True)
    if found.returncode != 0:  # a copied bench/, a shallow clone, a source tarball
        sys.exit(f"error: the git ref {ref!r} (--before) is not a commit of {REPO}: run in a full clone, pass another "
                 "--before, or --only after")
    commit = found.stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit, "spectra", "cli"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "cli").rename(dest / "spectra_cli")
    return commit


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """As ``common.markdown_table``; repeated here because common imports torch, which this parent avoids."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def energy_ranks(results: Path) -> dict[str, dict[str, int]]:
    doc = json.loads(results.read_text())
    return {m["name"]: m["energy_rank"] for m in doc["modules"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default="aad8413", help="git ref of the code to compare against (default: aad8413, the engine before issue 14)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--workdir", default=None, help="keep the pair and outputs here (default: a temp folder, removed)")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--only", default=None, help="run only the variants whose name contains this text (e.g. 'after')")
    ap.add_argument("--save", default=None, help="write bench/results/SAVE.md and .json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        {"generate": lambda: child_generate(rest[0], int(rest[1])), "naive": lambda: child_naive(*rest),
         "profile": lambda: child_profile(*rest), "probe": child_probe}[kind]()
        return

    # a SIGTERM (timeout, a scheduler) as an exit: run_measured then stops the child it waits on
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-135m-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    # this checkout's working tree, whatever spectra is installed (its cli/ is the spectra_cli package)
    after_dir = work / "after-code"
    shutil.rmtree(after_dir, ignore_errors=True)
    shutil.copytree(REPO / "spectra", after_dir / "spectra", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "cli", after_dir / "spectra_cli", ignore=shutil.ignore_patterns("__pycache__"))
    env_after = {**os.environ, "PYTHONPATH": str(after_dir)}
    before_dir = work / "before-code"
    if before_dir.exists():
        shutil.rmtree(before_dir)
    env_before = {**os.environ, "PYTHONPATH": str(before_dir)}
    load_start = os.getloadavg()

    if not (work / "tuned" / "model.safetensors").exists():
        _, _, out, _ = run_measured([py, str(Path(__file__).resolve()), "--child", "generate", str(work), str(args.layers)], cwd=work, env=env_after)
        print(f"generated the pair in {json.loads(out)['seconds']:.1f} s", flush=True)
    base, tuned = work / "base", work / "tuned"
    files = [base / "model.safetensors", tuned / "model.safetensors"]
    gbytes = sum(f.stat().st_size for f in files) / 1e9
    for f in files:  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    probe = subprocess.run([py, str(Path(__file__).resolve()), "--child", "probe"], cwd=work, env=env_after, capture_output=True, text=True)
    native = probe.stdout.strip() == "True"

    def cli(env, *extra, shim=False):
        head = [py, "-c", _CERTIFIED_SHIM] if shim else [py, "-m", "spectra"]
        return lambda out: (head + ["diff", str(base), str(tuned), "--out", str(out), *extra], env)

    cert = ("--precision", "certified") if native else ("--precision", "float64")
    label = "certified" if native else "certified (pipeline change emulated)"
    variants = {
        "before: spectra diff --out D": cli(env_before),
        "before: spectra diff --out D --no-plots": cli(env_before, "--no-plots"),
        "naive loop: torch.linalg.svd per matrix": lambda out: ([py, str(Path(__file__).resolve()), "--child", "naive", str(base), str(tuned)], env_after),
        "after: --precision float64 --out D": cli(env_after, "--precision", "float64"),
        "after: --precision float64 --no-plots": cli(env_after, "--precision", "float64", "--no-plots"),
        f"after: {label} --out D": cli(env_after, *cert, shim=not native),
        f"after: {label} --no-plots": cli(env_after, *cert, "--no-plots", shim=not native),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if args.only in k}
    commit = extract_before(args.before, before_dir) if any(k.startswith("before") for k in variants) else "(not run)"
    print(f"# 135M whole-command benchmark in {work}; before = {args.before} ({commit[:10]}); load average {load_start}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    rss: dict[str, list[int]] = {k: [] for k in variants}
    ranks: dict[str, dict] = {}
    for rep in range(args.repeats):
        for i, (name, make) in enumerate(variants.items()):
            out = work / f"out-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd, env = make(out)
            sec, peak, stdout, _ = run_measured(cmd, cwd=work, env=env)
            times[name].append(sec)
            rss[name].append(peak)
            if rep == 0:
                ranks[name] = json.loads(stdout)["ranks"] if name.startswith("naive") else energy_ranks(out / "results.json")
            print(f"  [{rep + 1}/{args.repeats}] {name}: {sec:.2f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    reference = next(iter(ranks.values())) if "after: --precision float64 --out D" not in ranks else ranks["after: --precision float64 --out D"]
    checks = {}
    for name, r in ranks.items():
        same = sum(r.get(n) == want for n, want in reference.items())
        checks[name] = f"{same} / {len(reference)}"

    naive = med.get("naive loop: torch.linalg.svd per matrix", math.nan)
    before = med.get("before: spectra diff --out D", math.nan)
    rows = [[name, f"{med[name]:.2f}", f"{max(rss[name]) / 2**20:.0f}", f"{naive / med[name]:.2f}×", f"{before / med[name]:.2f}×", checks[name],
             " ".join(f"{t:.1f}" for t in times[name])] for name in variants]
    table = markdown_table(["command", "median s", "peak RSS MiB", "naive / this", "before / this", "energy ranks = float64", "all runs (s)"], rows)
    print("\n" + table, flush=True)

    profiles = {}
    if not args.skip_profile:
        for name, env, precision in (("before (float64)", env_before, "float64"), ("after float64", env_after, "float64"),
                                     ("after certified", env_after, "certified")):
            pout = work / f"profile-{precision}-{'b' if env is env_before else 'a'}"
            shutil.rmtree(pout, ignore_errors=True)
            _, _, out, _ = run_measured([py, str(Path(__file__).resolve()), "--child", "profile", str(base), str(tuned), str(pout), precision],
                                        cwd=work, env=env)
            profiles[name] = json.loads(out)
            print(f"profile {name}: {profiles[name]}", flush=True)
        prow = []
        for name, p in profiles.items():
            prow.append([name, f"{p['imports_s']:.2f}", f"{p['read_delta_s']:.2f}", f"{p['gram_thread_s']:.2f}", f"{p['eig_thread_s']:.2f}",
                         f"{p['certify_thread_s']:.2f}", f"{p['engine_wall_s']:.2f}", f"{p['diff_no_plots_s']:.2f}", f"{p['plots_s']:.2f}",
                         f"{p['certified']} / {p['recomputed']}" if p["certified"] + p["recomputed"] else "–"])
        ptable = markdown_table(["variant (in one process)", "imports", "read + ΔW (1 thread)", "Gram (thread-s)", "eigensolve (thread-s)",
                                 "certificate (thread-s)", "engine wall", "diff, no plots", "heatmaps", "certified / recomputed"], prow)
        print("\n" + ptable, flush=True)
    else:
        ptable = ""

    if args.save:
        sys.path.insert(0, str(HERE))
        from common import save  # imports torch: only now, after every child has been measured

        text = (f"# spectra diff on a SmolLM2-135M-layout pair, whole commands\n\n"
                f"Pair: {args.layers} layers, {sum(1 for _ in reference)} matrices, {gbytes:.2f} GB of float32 (bench/smollm.py). "
                f"Before = `{args.before}` ({commit[:10]}); after = the working tree. Medians of {args.repeats}, interleaved. "
                f"Load average (1, 5, 15 min) {load_start} at the start and {os.getloadavg()} at the end: this 2-core machine "
                f"was shared with other jobs.\n\n"
                f"Command: `python bench/speed_135m.py {' '.join(sys.argv[1:])}`\n\n{table}\n\n"
                + (f"## In-process profile (seconds)\n\n{ptable}\n" if ptable else ""))
        data = {"before": commit, "layers": args.layers, "load_average_start": load_start, "load_average_end": os.getloadavg(), "gbytes": gbytes, "native_certified": native,
                "median_s": med, "times_s": times, "peak_rss_bytes": {k: max(v) for k, v in rss.items()}, "ranks_equal": checks,
                "profiles": profiles}
        print(f"saved {save(args.save, text, data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
