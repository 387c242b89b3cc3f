"""Fifteenth round of the outside probe (docs/bad_inputs.md, "fifteenth round")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.errors import ConfigError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.interfere import interfere
from spectra.trace import TraceConfig, trace
from tests.pair_util import small_pair


def _run(*args: str, env: dict[str, str] | None = None):
    from click.testing import CliRunner

    from spectra_cli.main import main

    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_malformed_world_size_is_an_error_not_a_single_process_run(tmp_path, value):
    """WORLD_SIZE=abc (or 0, -3: a launcher never sets those) ran the whole diff as one process: beside a
    broken launcher's other processes, each would have run it all into the same folder."""
    base, tuned = small_pair(tmp_path)
    res = _run("diff", base, tuned, "--out", str(tmp_path / "out"), "--no-plots", env={"WORLD_SIZE": value})
    assert res.exit_code == 1, res.output
    assert f"WORLD_SIZE={value!r}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


# ---- ties: measures that read single directions inside a tie ----------------------------------------
_Q = "model.layers.0.self_attn.q_proj.weight"


def _planted(rng: np.random.Generator, m: int, n: int, sig: list[float]) -> np.ndarray:
    U, _ = np.linalg.qr(rng.standard_normal((m, len(sig))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(sig))))
    return (U * np.array(sig)) @ V.T


def _save(path: Path, W: np.ndarray) -> str:
    path.mkdir(parents=True, exist_ok=True)
    save_file({_Q: torch.from_numpy(np.ascontiguousarray(W))}, str(path / "model.safetensors"))
    return str(path)


def _tied_trio(root: Path, transform) -> tuple[str, str, str]:
    """base, A, B of one 24×24 float64 matrix: ΔA's σ = 1 (×6), 0.5, 0.4; ΔB generic plus half of ΔA;
    ``transform`` applied to all three (a change of coordinates, which no subspace measure may see)."""
    rng = np.random.default_rng(11)
    W = rng.standard_normal((24, 24))
    dA = _planted(rng, 24, 24, [1.0] * 6 + [0.5, 0.4])
    dB = _planted(rng, 24, 24, [0.9, 0.7, 0.5, 0.3, 0.2]) + 0.5 * dA
    return tuple(_save(root / n, transform(M)) for n, M in (("base", W), ("a", W + dA), ("b", W + dB)))


def test_phi_grid_entries_inside_a_tie_are_null_not_a_solver_choice(tmp_path):
    """φ(i, j) at a cut i inside A's six tied values compares an arbitrary part of the tie: phi_11, the grid and
    its mean changed (0.10 against 0.20) when the same matrices were given in permuted coordinates."""
    perm_r, perm_c = np.random.default_rng(1).permutation(24), np.random.default_rng(2).permutation(24)
    cfg = spectra.CompareConfig(top_k=3, side="both")
    runs = []
    for tag, f in (("id", lambda M: M), ("perm", lambda M: M[perm_r][:, perm_c])):
        base, a, b = _tied_trio(tmp_path / tag, f)
        runs.append(spectra.compare(a, b, base=base, config=cfg, plots=False))
    recs = [next(m for m in r.modules if m.name == _Q) for r in runs]
    for rec, res in zip(recs, runs):
        assert rec.rank_a == 6 and "φ grid entries are null" in rec.note
        grid = np.array(res.phi_grids[_Q]["right"], dtype=float)
        assert grid.shape == (6, 3) and np.isnan(grid[:5]).all() and np.isfinite(grid[5]).all()
        assert rec.phi["right"].phi_11 is None
    # the determined entries (row 6: A's whole tie) against float64 numpy, and equal in both coordinates
    from safetensors.numpy import load_file

    base, a, b = (load_file(str(tmp_path / "id" / n / "model.safetensors"))[_Q] for n in ("base", "a", "b"))
    VA = np.linalg.svd(a - base)[2][:6].T
    VB = np.linalg.svd(b - base)[2][:3].T
    ref = [np.sum((VA.T @ VB[:, :j]) ** 2) / min(6, j) for j in (1, 2, 3)]
    for res, rec in zip(runs, recs):
        assert np.allclose(np.array(res.phi_grids[_Q]["right"], dtype=float)[5], ref, atol=2e-6)
        assert np.isclose(rec.phi["right"].mean, np.mean(ref), atol=2e-6)
    for side in ("left", "right"):
        (x, y) = (r.phi[side] for r in recs)
        assert x.phi_11 is y.phi_11 is None and np.allclose([x.phi_full, x.mean], [y.phi_full, y.mean], atol=1e-12)


def test_intruders_treat_a_tie_of_the_base_as_one_direction(tmp_path):
    """An orthogonal base (every σ tied) has no preferred vectors: intruders A were 8, 5 or 7 depending on the
    coordinates the same matrices were given in; the projection on the tie's span (1 here) is the basis-free max."""
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    R, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    W = 0.2 * Q
    dA = _planted(rng, 24, 24, [0.3, 0.25, 0.1])
    counts = []
    for tag, f in (("id", lambda M: M), ("rot", lambda M: R @ M)):
        base, a = _save(tmp_path / tag / "base", f(W)), _save(tmp_path / tag / "a", f(W + dA))
        res = spectra.compare(a, a, base=base, config=spectra.CompareConfig(top_k=3), plots=False)
        rec = next(m for m in res.modules if m.name == _Q)
        assert np.allclose(rec.intruders["a"].max_cos, 1.0, atol=1e-12)
        assert "tied singular values among its top 10" in rec.note  # W + ΔW keeps 21 of Q's tied values
        counts.append(rec.intruders["a"].count)
    assert counts == [0, 0]


def test_intruder_cosines_with_a_partly_tied_base_match_the_span_projection():
    """A base with σ = 5, 3, 3, 3, 1, … : the tuned vectors' largest cosine with the tied three is the norm of
    their projection on the tie's span (float64 numpy reference), whatever vectors the solver returned."""
    from spectra.subspaces import intruder_dimensions

    rng = np.random.default_rng(8)
    sig = [5.0, 3.0, 3.0, 3.0] + list(np.linspace(1.0, 0.1, 16))
    W = _planted(rng, 20, 20, sig)
    dW = _planted(rng, 20, 20, [4.0, 2.0])
    res = intruder_dimensions(torch.from_numpy(W), torch.from_numpy(dW), k=4)
    Ub = np.linalg.svd(W)[0]
    Ut = np.linalg.svd(W + dW)[0][:, :4]
    C2 = (Ut.T @ Ub) ** 2
    runs = [C2[:, :1], C2[:, 1:4].sum(axis=1, keepdims=True), C2[:, 4:]]
    ref = np.sqrt(np.concatenate(runs, axis=1).max(axis=1))
    assert np.allclose(res.max_cos, ref, atol=1e-9)


def test_interfere_says_when_tsv_reads_directions_inside_a_tie(tmp_path):
    base, a, b = _tied_trio(tmp_path, lambda M: M)
    from spectra.interfere import InterfereConfig

    res = interfere(base, [a, b], config=InterfereConfig(top_k=3), plots=False)
    (m,) = [m for m in res.modules if m["name"] == _Q]
    assert m["ranks"] == [6, 3]
    assert "TSV score of single triplets depends on the solver's choice within the tie" in m["note"]
    assert m["note"].count("tied singular values") == 1  # A only: B's values are distinct


def test_trace_turn_of_a_rescaled_update_is_zero_not_arccos_rounding(tmp_path):
    """A checkpoint whose update is 3× the previous one's has not turned: the turn read 1.49e-8 rad (arccos of a
    cosine one ulp below 1), which plots and findings took for a turn; the sines give ~1e-15."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 24))
    dW = _planted(rng, 24, 24, [1.0, 0.7, 0.4, 0.2])
    base = _save(tmp_path / "base", W)
    paths = [_save(tmp_path / f"c{i}", W + f * dW) for i, f in enumerate((1.0, 3.0))]
    tr = trace(base, paths, config=TraceConfig(top_k=3), plots=False)
    (m,) = [m for m in tr.matrices if m["name"] == _Q]
    turn = m["points"][1]["turn_prev"]
    for side in ("left", "right"):
        assert turn[side]["grassmann"] < 1e-12 and turn[side]["max_angle_deg"] < 1e-10
        assert turn[side]["phi"] == pytest.approx(1.0, abs=1e-12)


def test_extract_says_when_its_rank_cuts_a_tie(tmp_path):
    """--rank 3 of an update whose σ are six equal values kept an arbitrary 3 of the 6 without a word."""
    base, a, _ = _tied_trio(tmp_path / "m", lambda M: M)
    res = extract(base, a, tmp_path / "out", config=ExtractConfig(rank=3), plots=False)
    (m,) = [m for m in res.modules if m["name"] == _Q]
    assert m["rank"] == 3 and m["energy_kept"] == pytest.approx(3.0 / (6 + 0.25 + 0.16), rel=1e-9)
    assert "rank 3 cuts through tied singular values" in m["note"]
    assert any("have a rank that cuts through tied singular values" in w for w in res.warnings)  # printed, not only in the JSON
    res6 = extract(base, a, tmp_path / "out6", config=ExtractConfig(rank=6), plots=False)
    assert not [m for m in res6.modules if "tied" in (m["note"] or "")]


# ---- many modules, many results, odd links ------------------------------------------------------------
def test_compare_of_many_modules_prints_medians_per_kind_not_a_row_each(tmp_path):
    """A row per module (50 000 of them took over a minute to print, and 560 for a 70B model bury the findings):
    above 64 modules the table gives each kind's medians; every module stays in compare.csv."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.{m}.weight" for i in range(40) for m in ("up_proj", "down_proj")]
    base = {n: torch.randn(6, 6, generator=g) for n in names}
    for who, scale in (("base", 0.0), ("a", 0.1), ("b", 0.2)):
        save_file({n: v + scale * torch.randn(6, 6, generator=g) for n, v in base.items()}, str(tmp_path / f"{who}.safetensors"))
    res = _run("compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--base",
               str(tmp_path / "base.safetensors"), "--top-k", "2", "--out", str(tmp_path / "out"), "--no-plots",
               env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "median per module kind over 80 modules" in " ".join(res.output.split())
    rows = [line for line in res.output.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and all(" 40 " in r for r in rows)
    assert len((tmp_path / "out" / "compare.csv").read_text().splitlines()) == 81
    # the medians are the medians of the per-module values (φ: compare.json)
    import json
    import statistics

    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    phi_up = statistics.median(m["phi"]["right"]["phi_full"] for m in doc["modules"] if m["module"] == "up_proj")
    (up,) = [r for r in rows if "up_proj" in r]
    assert f"{phi_up:.3f}" in up


def test_report_of_two_results_of_the_same_inputs_tells_their_sections_apart(tmp_path):
    """Two diffs of one pair (--layers 0 and 1) gave two sections headed "ΔW spectra: tuned" and two findings
    blocks "diff: tuned vs base": only the overview said which was which."""
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    save_file(W, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in W.items()}, str(tmp_path / "tuned.safetensors"))
    for layer in ("0", "1"):
        res = _run("diff", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--layers", layer,
                   "--out", str(tmp_path / "runs" / f"layer{layer}"), "--no-plots")
        assert res.exit_code == 0, res.output
    res = _run("report", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html"))
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    for layer in ("0", "1"):
        assert f"ΔW spectra: {tmp_path / 'tuned.safetensors'} (layer{layer})</h2>" in html
        assert f"diff: tuned.safetensors vs base.safetensors (layer{layer})" in html


def test_a_checkpoint_link_to_itself_is_called_a_loop(tmp_path):
    """trace left out run/checkpoint-3 -> checkpoint-3 as "a link to 'checkpoint-3', which does not exist"."""
    from spectra.io.paths import missing_text

    (tmp_path / "checkpoint-3").symlink_to("checkpoint-3")
    (tmp_path / "dangling").symlink_to("nowhere")
    assert "a loop of symbolic links" in missing_text(tmp_path / "checkpoint-3")
    assert missing_text(tmp_path / "dangling") == "is a symbolic link to 'nowhere', which does not exist"


def test_a_stopped_run_leaves_no_lock_file_behind(tmp_path, monkeypatch):
    """esd, trace and extract stopped by Ctrl-C (or failing) kept their .spectra.lock in the folder beside the
    journal: released by the process's exit, but a file a user sees and wonders about. The command line now
    removes the locks its run took as it ends; the journal stays for --resume."""
    import spectra.esd_run as esd_run

    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(3)},
              str(tmp_path / "m.safetensors"))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(esd_run, "_decompose", stop)
    res = _run("esd", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "out"), "--no-plots")
    assert res.exit_code == 130, res.output
    assert (tmp_path / "out" / "esd.jsonl").is_file() and not (tmp_path / "out" / ".spectra.lock").exists()


def test_release_locks_keeps_the_locks_held_before_and_other_threads():
    import tempfile
    import threading

    from spectra.io.files import LOCK_NAME, OutputLock, held_locks, release_locks

    a, b, c = (Path(tempfile.mkdtemp()) for _ in range(3))
    first = OutputLock.acquire(a)
    before = held_locks()
    OutputLock.acquire(b)
    taken, done = threading.Event(), threading.Event()
    other = []

    def run() -> None:  # another thread's run, still going while this one ends
        other.append(OutputLock.acquire(c))
        taken.set()
        done.wait(10)

    t = threading.Thread(target=run)
    t.start()
    taken.wait(10)
    release_locks(keep=before)
    assert (a / LOCK_NAME).exists() and not (b / LOCK_NAME).exists() and (c / LOCK_NAME).exists()
    done.set()
    t.join()
    other[0].release()
    first.release()
    assert not (a / LOCK_NAME).exists() and first not in held_locks()


# ---- compare resumes --------------------------------------------------------------------------------
def _compare_trio(root: Path) -> tuple[str, str, str]:
    g = torch.Generator().manual_seed(4)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(3) for m in ("q_proj", "v_proj")]
    W = {n: torch.randn(10, 10, generator=g) for n in names}
    paths = []
    for who, scale in (("base", 0.0), ("a", 0.1), ("b", 0.2)):
        save_file({n: v + scale * torch.randn(10, 10, generator=g) for n, v in W.items()}, str(root / f"{who}.safetensors"))
        paths.append(str(root / f"{who}.safetensors"))
    return tuple(paths)


def test_a_stopped_compare_resumes_from_its_journal_to_the_same_numbers(tmp_path):
    """compare kept nothing when stopped ("writes OUT when it finishes: nothing was kept"): on a 50 000-module
    model minutes of work were lost. Each module is journaled now, and --resume finishes the run."""
    import json

    base, a, b = _compare_trio(tmp_path)
    cfg = spectra.CompareConfig(top_k=3, side="both")
    spectra.compare(a, b, base=base, config=cfg, out_dir=tmp_path / "whole", plots=False)

    def stop_at_4(done, total, name):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        spectra.compare(a, b, base=base, config=cfg, out_dir=tmp_path / "cut", plots=False, callback=stop_at_4)
    assert len((tmp_path / "cut" / "compare.jsonl").read_text().splitlines()) == 1 + 4  # fingerprint + 4 modules
    assert not (tmp_path / "cut" / "compare.json").exists()
    assert not (tmp_path / "cut" / ".spectra.lock").exists()  # the library call let its lock go (no command line here)
    seen = []
    resumed = spectra.compare(a, b, base=base, config=cfg, out_dir=tmp_path / "cut", plots=False, resume=True,
                              callback=lambda done, total, name: seen.append(done))
    assert seen == [1, 2, 3, 4, 5, 6] and len(resumed.modules) == 6
    one, two = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("whole", "cut"))
    for doc in (one, two):
        doc.pop("elapsed_s")
    assert one == two
    # other options: refused, nothing lost
    with pytest.raises(ConfigError, match="different inputs or options"):
        spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=2, side="both"), out_dir=tmp_path / "cut",
                        plots=False, resume=True)
    assert (tmp_path / "cut" / "compare.json").is_file()


def test_compare_resume_refusals(tmp_path):
    base, a, b = _compare_trio(tmp_path)
    res = _run("compare", a, b, "--base", base, "--resume")
    assert res.exit_code == 2 and "give --out DIR as well" in res.output
    res = _run("compare", a, b, "--base", base, "--out", str(tmp_path / "none"), "--resume")
    assert res.exit_code == 1 and "nothing to resume" in res.output, res.output
    (tmp_path / "edited").mkdir()
    spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=3), out_dir=tmp_path / "edited", plots=False)
    journal = tmp_path / "edited" / "compare.jsonl"
    lines = journal.read_text().splitlines()
    assert lines[1].startswith('{"i": 0,')
    journal.write_text("\n".join([lines[0], lines[1].replace('{"i": 0,', '{"i": 1,', 1), *lines[2:]]) + "\n")  # another index
    res = _run("compare", a, b, "--base", base, "--top-k", "3", "--out", str(tmp_path / "edited"), "--resume", "--no-plots")
    assert res.exit_code == 1 and "record 2 was changed after it was written" in res.output, res.output
    # a value changed (a φ of 5, which every type check passes) is refused the same way: records are sealed
    journal.write_text("\n".join([lines[0], lines[1].replace('"phi_full": ', '"phi_full": 5.0, "x": ', 1), *lines[2:]]) + "\n")
    res = _run("compare", a, b, "--base", base, "--top-k", "3", "--out", str(tmp_path / "edited"), "--resume", "--no-plots")
    assert res.exit_code == 1 and "record 2 was changed" in res.output, res.output
    # a first line that is no fingerprint: one line, not a traceback
    journal.write_text("[1, 2]\n" + "\n".join(lines[1:]) + "\n")
    res = _run("compare", a, b, "--base", base, "--top-k", "3", "--out", str(tmp_path / "edited"), "--resume", "--no-plots")
    assert res.exit_code == 1 and "does not open with its run's fingerprint" in res.output, res.output



def test_a_stopped_interfere_resumes_from_its_journal_to_the_same_numbers(tmp_path):
    """interfere kept nothing when stopped, like compare: now each matrix is journaled and --resume finishes."""
    import json

    from spectra.interfere import InterfereConfig

    base, a, b = _compare_trio(tmp_path)
    cfg = InterfereConfig(top_k=3)
    interfere(base, [a, b], config=cfg, out_dir=tmp_path / "whole", plots=False)

    def stop_at_2(done, total, name):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interfere(base, [a, b], config=cfg, out_dir=tmp_path / "cut", plots=False, callback=stop_at_2)
    assert len((tmp_path / "cut" / "interfere.jsonl").read_text().splitlines()) == 1 + 2
    assert not (tmp_path / "cut" / ".spectra.lock").exists()
    interfere(base, [a, b], config=cfg, out_dir=tmp_path / "cut", plots=False, resume=True)
    one, two = (json.loads((tmp_path / d / "interfere.json").read_text()) for d in ("whole", "cut"))
    for doc in (one, two):
        doc.pop("elapsed_s")
    assert one == two
    with pytest.raises(ConfigError, match="different inputs or options"):  # the tasks in another order
        interfere(base, [b, a], config=cfg, out_dir=tmp_path / "cut", plots=False, resume=True)
    # a task spelled another way: its records' notes name it as first spelled, so not resumed into one result
    respelled = f"{Path(b).parent}/./{Path(b).name}"
    with pytest.raises(ConfigError, match="different inputs or options"):
        interfere(base, [a, respelled], config=cfg, out_dir=tmp_path / "cut", plots=False, resume=True)
    journal = tmp_path / "cut" / "interfere.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], lines[1].replace('"cosine"', '"cosin"', 1), *lines[2:]]) + "\n")
    res = _run("interfere", "--base", base, a, b, "--top-k", "3", "--out", str(tmp_path / "cut"), "--resume", "--no-plots")
    assert res.exit_code == 1 and "record 2 was changed after it was written" in res.output, res.output


# ---- the Python API: inputs a notebook passes -------------------------------------------------------------
def test_half_precision_bases_are_checked_for_orthonormality_too():
    """bf16's 100·eps·√d tolerance (12.5 at d = 256) let 3·Q pass as a basis: φ 0.280 where the truth is 0.031."""
    from spectra.subspaces import phi, principal_angles

    g = torch.Generator().manual_seed(0)
    QA = torch.linalg.qr(torch.randn(256, 8, generator=g, dtype=torch.float64)).Q
    QB = torch.linalg.qr(torch.randn(256, 5, generator=g, dtype=torch.float64)).Q
    with pytest.raises(ValueError, match="orthonormal columns"):
        phi((3 * QA).bfloat16(), QB.bfloat16(), 8, 5)
    with pytest.raises(ValueError, match="orthonormal columns"):
        principal_angles(torch.randn(256, 4, generator=g).half(), QB.half())
    # a bf16 rounding of an orthonormal basis still passes, and its φ is the float64 one to bf16's precision
    assert phi(QA.bfloat16(), QB.bfloat16(), 8, 5) == pytest.approx(phi(QA, QB, 8, 5), abs=2e-3)


def test_singular_values_in_float32_of_tiny_and_huge_matrices():
    """dtype=float32 squared 1e-30 entries to 0 (every σ read 0) and 1e30 ones to inf; NaN gave an eigh error."""
    from spectra.linalg import singular_values

    M = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = np.linalg.svd(M.numpy(), compute_uv=False)
    for scale in (1e-30, 1e30):
        for dtype in (torch.float32, torch.float64):
            got = singular_values(M * scale, dtype=dtype)
            assert np.allclose(got / scale, ref, rtol=1e-5), (scale, dtype)
    bad = M.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        singular_values(bad)


def test_spectrum_metrics_take_any_order_and_refuse_what_no_spectrum_is():
    """sqrt(eigvalsh(G)) ascends: spectral_norm read 1 (not 3) and stable_rank 14 (not 1.56); NaN gave ranks."""
    from spectra.lowrank import energy_rank_top
    from spectra.metrics import energy_rank, spectrum_metrics, stable_rank

    up, down = spectrum_metrics(np.array([1.0, 2.0, 3.0]), (3, 3)), spectrum_metrics(np.array([3.0, 2.0, 1.0]), (3, 3))
    assert up == down and up.spectral_norm == 3.0 and up.stable_rank == pytest.approx(14 / 9)
    assert energy_rank_top(np.array([1.0, 3.0]), 10.0, 0.9) == energy_rank_top(np.array([3.0, 1.0]), 10.0, 0.9) == 1
    for S in (np.array([3.0, np.nan, 1.0]), np.array([3.0, -1.0]), np.array([3 + 4j, 1.0]), np.ones((2, 2))):
        with pytest.raises(ValueError, match="singular values"):
            energy_rank(S, 0.9)
        with pytest.raises(ValueError, match="singular values"):
            stable_rank(S)


def test_overlapping_calls_restore_the_blas_thread_count():
    """Two overlapping calls each saved and restored the process's BLAS thread count: the second saved the
    first's 1 and restored it after the first had restored 2, leaving every later numpy call on one thread."""
    from threadpoolctl import threadpool_info

    from spectra.threads import imap_one_blas_thread

    def blas() -> list[int]:
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = blas()
    if max(before, default=1) < 2:
        pytest.skip("BLAS already runs on one thread here: the leak would not show")
    a, b = imap_one_blas_thread(abs, [-1, -2], 1), imap_one_blas_thread(abs, [-3, -4], 1)
    assert next(a) == 1 and next(b) == 3  # a holds the limit, then b
    assert set(blas()) == {1}
    a.close()  # a leaves first: b still holds it
    assert set(blas()) == {1}
    b.close()
    assert blas() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
def test_the_engine_entry_points_refuse_a_missing_cuda_device():
    from spectra.engine import exact_spectra
    from spectra.sketch import randomized_svd

    M = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="0 CUDA device"):
        exact_spectra([M], device="cuda")
    with pytest.raises(ConfigError, match="0 CUDA device"):
        randomized_svd(M, 2, device="cuda")


# ---- interfere and diff --esd: numbers and what is said of them --------------------------------------------
def test_knots_rank_does_not_count_float32_rounding_as_shared_directions(tmp_path):
    """The same rank-3 update stored twice in float32 (once ×2.5): knots.rank read 6 while ranks, φ and cosine
    all said one 3-dimensional update."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 24)).astype(np.float32)
    dW = _planted(rng, 24, 24, [1.0, 0.7, 0.4])
    paths = [_save(tmp_path / n, (W + f * dW).astype(np.float32)) for n, f in (("base", 0.0), ("t1", 1.0), ("t2", 2.5))]
    from spectra.interfere import InterfereConfig

    res = interfere(paths[0], paths[1:], config=InterfereConfig(top_k=4), plots=False)
    (m,) = [m for m in res.modules if m["name"] == _Q]
    assert m["ranks"] == [3, 3] and m["knots"]["rank"] == 3
    assert m["cosine"][0][1] == pytest.approx(1.0, abs=1e-6)


def test_the_summed_updates_nuclear_ratio_is_not_above_one(tmp_path):
    """One task non-zero, the other zero: the sum's Gram-route values below its resolution (~1e-8·σ₁ each) made
    the nuclear ratio 1.00000004, outside its documented [0, 1]."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((40, 40))
    paths = [_save(tmp_path / "base", W), _save(tmp_path / "a", W + _planted(rng, 40, 40, [2.0, 1.0])), _save(tmp_path / "b", W)]
    res = interfere(paths[0], paths[1:], plots=False)
    (m,) = [m for m in res.modules if m["name"] == _Q]
    assert m["sum"]["nuclear_ratio"] == pytest.approx(1.0, abs=1e-12) and m["sum"]["nuclear_ratio"] <= 1.0
    assert m["sum"]["effective_rank"] == pytest.approx(m["sum"]["task_effective_rank"][0], rel=1e-9)


def test_the_alpha_finding_of_a_diff_speaks_of_the_changed_matrices(tmp_path):
    """Through diff's own findings (the report's and the command's): three matrices, one changed."""
    from spectra.findings import diff_findings

    rng = np.random.default_rng(6)
    W = {f"model.layers.0.self_attn.{m}.weight": rng.standard_normal((48, 48)) for m in ("q_proj", "k_proj", "v_proj")}
    tuned = dict(W)
    tuned["model.layers.0.self_attn.q_proj.weight"] = W["model.layers.0.self_attn.q_proj.weight"] + rng.standard_normal((48, 48))
    for name, sd in (("base", W), ("tuned", tuned)):
        save_file({k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    res = spectra.diff(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), config=spectra.DiffConfig(esd=True))
    (f,) = [f for f in diff_findings(res) if f.topic == "alpha"]
    assert f.numbers["matrices"] == 1 and "of 1 changed matrices" in f.text


def test_the_alpha_finding_speaks_of_the_changed_matrices():
    """13 of 16 matrices unchanged (Δα 0 by construction) pulled the median Δα to +0.000 beside a warning that
    said those matrices were left out; every changed one had lost 0.2-1.7."""
    from spectra.findings import alpha_findings

    def mod(name, fro, change, z):
        return {"name": name, "module": "q_proj", "fro_norm": fro,
                "esd": {"base": {"alpha": 3.0}, "tuned": {"alpha": 3.0 + change}, "alpha_change": change, "alpha_change_z": z}}

    mods = [mod(f"m{i}", 0.0, 0.0, 0.0) for i in range(13)] + [mod("a", 1.0, -0.85, -2.0), mod("b", 1.0, -0.22, -1.0),
                                                              mod("c", 1.0, -1.69, -2.9)]
    (f,) = alpha_findings(mods)
    assert "in 1 of 3 changed matrices (median Δα -0.850)" in f.text
    assert f.numbers["matrices"] == 3 and f.numbers["median_change"] == pytest.approx(-0.85)


# ---- reports of the new outputs ------------------------------------------------------------------------------
def test_report_refuses_a_journal_and_names_a_stopped_run(tmp_path):
    """`report compare.jsonl` drew the journal as a training run ("7 log records"); a folder holding only a stopped
    run's journal vanished from a report without a word."""
    base, a, b = _compare_trio(tmp_path)
    spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=3), out_dir=tmp_path / "runs" / "done", plots=False)

    def stop(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        spectra.compare(a, b, base=base, config=spectra.CompareConfig(top_k=3), out_dir=tmp_path / "runs" / "stopped",
                        plots=False, callback=stop)
    res = _run("report", str(tmp_path / "runs" / "done" / "compare.jsonl"), "-o", str(tmp_path / "j.html"))
    assert res.exit_code == 1 and "a run's journal, not a result" in res.output
    res = _run("report", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html"))
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    assert "an unfinished compare (its journal compare.jsonl, no compare.json)" in html and "--resume" in html
    res = _run("report", str(tmp_path / "runs" / "stopped"), "-o", str(tmp_path / "s.html"))
    assert res.exit_code == 1 and "an unfinished compare" in res.output


def test_compare_table_medians_of_counts_are_not_rounded_to_even(tmp_path):
    """Ranks 0 ×5 and 5 ×5 printed a median of 2 (2.5 rounded half to even by .0f); here 0 ×35 and 1 ×35."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(70)]
    W = {n: torch.randn(8, 8, generator=g, dtype=torch.float64) for n in names}
    lo = {n: _planted(np.random.default_rng(i), 8, 8, [1.0, 0.5]) for i, n in enumerate(names)}
    save_file(W, str(tmp_path / "base.safetensors"))
    save_file({n: v + torch.from_numpy(lo[n]) for n, v in W.items()}, str(tmp_path / "a.safetensors"))
    # B: half the modules unchanged (rank 0), half updated along one direction (rank 1): the median rank is 0.5
    one = {n: _planted(np.random.default_rng(100 + i), 8, 8, [1.0]) for i, n in enumerate(names)}
    save_file({n: v + (torch.from_numpy(one[n]) if i % 2 else 0) for i, (n, v) in enumerate(W.items())}, str(tmp_path / "b.safetensors"))
    res = _run("compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--base", str(tmp_path / "base.safetensors"),
               "--top-k", "2", "--no-plots")
    assert res.exit_code == 0, res.output
    (row,) = [line for line in res.output.splitlines() if "up_proj" in line and line.startswith("│")]
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[1] == "70" and cells[3] == "0.5"  # r_B: 35 zeros and 35 ones (was printed 0)
