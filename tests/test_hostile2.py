"""Hostile and odd inputs (issue 13), the causes tests/test_hostile.py does not hold: NaN/Inf in a LoRA
factor, float64 weights whose Gram matrix overflows or underflows, an overflowing ``lora_alpha``,
``--resume`` fingerprints, two runs into one ``--out``, stop signals that cannot wait, and wrong-type
edits of the files spectra reads back.

Each test reproduces what the outside probe found and checks the fix against an independent
reference (float64 numpy SVD, exact powers of two) or the one-line error / documented skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import spectra
from spectra.config import DiffConfig
from spectra.engine import exact_spectra
from spectra.errors import ConfigError, OutputError, ResultsFormatError, SpectraError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.files import LOCK_NAME, OutputLock
from spectra.journal import Journal, run_fingerprint
from spectra.linalg import GRAM_SCALE_LIMIT, gram_scale_exponent
from spectra.metrics import energy_rank, fro_norm_of, spectrum_metrics, stable_rank
from spectra.pipeline import all_zero
from spectra.report import collect
from spectra.results import DiffResult
from spectra.sketch import approx_energy_ranks
from spectra_cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


def _strict_json(text: str):
    """Parse as the JSON standard says: NaN/Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _adapter(folder: Path, A: torch.Tensor, B: torch.Tensor, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": A.contiguous(),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": B.contiguous()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": A.shape[0], "lora_alpha": 4,
                                                            "target_modules": ["q_proj"], **config}))
    return folder


def _factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)


def _base(path: Path) -> Path:
    save_file({"layers.0.self_attn.q_proj.weight": torch.randn(6, 8, generator=torch.Generator().manual_seed(5))}, str(path))
    return path


# ---- cause 6: NaN/Inf in a LoRA factor through `diff ADAPTER` and `diff BASE ADAPTER` ------------
@pytest.mark.parametrize("which, value", [("lora_A", float("nan")), ("lora_B", float("inf")), ("lora_B", float("-inf"))])
@pytest.mark.parametrize("with_base", [False, True])
def test_non_finite_lora_factor_is_a_skip_naming_it(tmp_path, which, value, with_base):
    A, B = _factors()
    (A if which == "lora_A" else B)[1, 1] = value
    ad = _adapter(tmp_path / "ad", A, B)
    args = ["diff", *([str(_base(tmp_path / "base.safetensors"))] if with_base else []), str(ad), "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)
    # nothing could be analysed: exit 1 (as compare, interfere, extract), the results still written
    assert res.exit_code == 1 and "no matrix could be analysed" in res.output, res.output
    assert "Traceback" not in res.output
    doc = _strict_json((tmp_path / "out" / "results.json").read_text())
    assert doc["modules"] == []
    assert doc["skipped"] == [{"name": "layers.0.self_attn.q_proj.weight",
                               "reason": f"{which} of layers.0.self_attn.q_proj contains NaN or Inf; ΔW is undefined"}]
    assert f"{which} of layers.0.self_attn.q_proj contains NaN or Inf" in res.stderr


def test_non_finite_factor_skips_only_its_module(tmp_path):
    """The finite module next to it is analysed and equals the float64 SVD of s·B·A."""
    A, B = _factors()
    A2, B2 = _factors(1)
    B2[0, 0] = float("nan")
    folder = tmp_path / "ad"
    folder.mkdir()
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": A, "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": B,
               "base_model.model.layers.0.self_attn.v_proj.lora_A.weight": A2, "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": B2},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    res = spectra.diff(str(folder))
    assert [m.name for m in res.modules] == ["layers.0.self_attn.q_proj.weight"]
    ref = np.linalg.svd(2.0 * (B.double() @ A.double()).numpy(), compute_uv=False)
    np.testing.assert_allclose(res.modules[0].singular_values[:2], ref[:2], rtol=1e-6)
    assert [s["name"] for s in res.skipped] == ["layers.0.self_attn.v_proj.weight"]


# ---- cause 7: lora_alpha = 1e308 ----------------------------------------------------------------
def test_overflowing_lora_alpha_is_a_skip_and_every_file_stays_json(tmp_path):
    A, B = _factors()
    ad = _adapter(tmp_path / "ad", A, B, lora_alpha=1e308)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["diff", str(ad), "--out", str(out)])
    assert res.exit_code == 1 and "no matrix could be analysed" in res.output, res.output  # results still written
    doc = _strict_json((out / "results.json").read_text())
    (skip,) = doc["skipped"]
    assert skip["reason"].startswith("the update s·B·A of layers.0.self_attn.q_proj overflows float64 (scale 5e+307")
    for line in (out / "results.jsonl").read_text().splitlines():
        _strict_json(line)
    res = CliRunner().invoke(main, ["diff", str(ad), "--json"])
    assert res.exit_code == 1
    assert _strict_json(res.stdout)["skipped"][0]["reason"] == skip["reason"]


def test_journal_writes_non_finite_numbers_as_null(tmp_path):
    from spectra.journal import append_record
    append_record(tmp_path / "j.jsonl", {"module": {"name": "w", "fro_norm": float("inf"), "s": [1.0, float("nan")]}})
    assert _strict_json((tmp_path / "j.jsonl").read_text()) == {"module": {"name": "w", "fro_norm": None, "s": [1.0, None]}}


# ---- causes 7 and 12: scale before squaring --------------------------------------------------------
def _planted(seed: int = 0, shape: tuple[int, int] = (40, 24)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) + 5 * rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))


@pytest.mark.parametrize("backend", ["lapack", "torch"])
@pytest.mark.parametrize("precision", ["float64", "certified", "float32"])
@pytest.mark.parametrize("k", [700, 520, -520, -700, -1000])
def test_extreme_float64_scales_give_exactly_scaled_spectra(backend, precision, k):
    """A power of two scales every floating-point step exactly, so the spectrum of 2^k·M must be 2^k
    times that of M bit for bit; before the fix, 2^700 overflowed the Gram (LinAlgError or inf) and
    2^-520 underflowed it (all zeros)."""
    M = _planted()
    big = np.ldexp(M, k)
    assert np.isfinite(big).all() and (big != 0).all()
    if precision == "float32":  # float32 storage cannot hold 2^±520; these still overflow / underflow a float32 Gram
        k = {700: 90, 520: 70, -520: -70, -700: -90, -1000: -100}[k]
        M = M.astype(np.float32).astype(np.float64)
        big = np.ldexp(M, k)
    mats = [torch.from_numpy(M), torch.from_numpy(big)]
    if precision == "float32":
        mats = [m.float() for m in mats]
    res = exact_spectra(mats, precision=precision, backend=backend, device="cpu")
    np.testing.assert_array_equal(res.S[1], np.ldexp(res.S[0], k))
    np.testing.assert_allclose(res.S[0], np.linalg.svd(M, compute_uv=False), rtol=1e-4 if precision != "float64" else 1e-10)


@pytest.mark.parametrize("k", [700, -600])
def test_approximate_ranks_of_extreme_float64_matrices(k):
    """The approximate mode sketches in float32, where 2^700 is inf and 2^-600 is 0: it scales first."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 200, generator=g, dtype=torch.float64)
    ref = approx_energy_ranks(M, (0.5, 0.9, 0.99), start=16, generator=torch.Generator().manual_seed(1))
    res = approx_energy_ranks(torch.ldexp(M, torch.tensor(k)), (0.5, 0.9, 0.99), start=16, generator=torch.Generator().manual_seed(1))
    assert res.ranks == ref.ranks
    np.testing.assert_allclose(np.ldexp(res.top, -k), ref.top, rtol=1e-12)
    assert np.ldexp(res.fro_norm, -k) == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-6)


def test_ordinary_matrices_are_not_scaled():
    """Inside the limits nothing is scaled: ordinary inputs take exactly the old path."""
    for dt, limit in GRAM_SCALE_LIMIT.items():
        assert gram_scale_exponent(2.0**limit * 0.99, dt.type) == 0
        assert gram_scale_exponent(2.0**-limit, dt.type) == 0
        assert gram_scale_exponent(2.0 ** (limit + 1), dt.type) == limit + 2
    for v in (0.0, float("nan"), float("inf")):
        assert gram_scale_exponent(v, np.float64) == 0
    # float32 weights never reach the float64 Gram's limit
    assert gram_scale_exponent(float(np.finfo(np.float32).max), np.float64) == 0


@pytest.mark.parametrize("k", [800, -600, -1000])
def test_metrics_of_extreme_spectra_are_the_scaled_ones(k):
    S = np.sort(np.abs(np.random.default_rng(1).standard_normal(12)))[::-1] * 3
    big = np.ldexp(S, k)
    assert fro_norm_of(big) == np.ldexp(np.sqrt(np.sum(S**2)), k)
    assert stable_rank(big) == stable_rank(S)
    for tau in (0.5, 0.9, 0.99):
        assert energy_rank(big, tau) == energy_rank(S, tau)
    m, ref = spectrum_metrics(big, (12, 30)), spectrum_metrics(S, (12, 30))
    assert (m.energy_rank, m.signal_rank, m.stable_rank) == (ref.energy_rank, ref.signal_rank, ref.stable_rank)
    assert m.effective_rank == pytest.approx(ref.effective_rank, rel=1e-12)


def _float64_pair(tmp_path: Path, scale: float, base_scale: float) -> tuple[Path, Path, np.ndarray]:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    U = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    save_file({"layers.0.self_attn.q_proj.weight": W * base_scale}, str(tmp_path / "b.safetensors"))
    save_file({"layers.0.self_attn.q_proj.weight": W * base_scale + U * scale}, str(tmp_path / "t.safetensors"))
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors", np.linalg.svd(U.numpy(), compute_uv=False)


def test_update_at_1e_minus_160_is_not_reported_as_zero(tmp_path):
    b, t, ref = _float64_pair(tmp_path, 1e-160, 1e-160)
    res = spectra.diff(str(b), str(t), allow_identical=False)  # raised IdenticalCheckpointsError before
    (m,) = res.modules
    np.testing.assert_allclose(np.array(m.singular_values[:3]) / 1e-160, ref[:3], rtol=1e-9)
    assert m.fro_norm == pytest.approx(1e-160 * np.sqrt(np.sum(ref**2)), rel=1e-9)
    assert m.energy_rank["0.99"] == 3
    # every value is the float64 SVD of the same subtraction done in numpy, to the Gram route's floor √ε·σ₁
    from safetensors.numpy import load_file
    delta = load_file(str(t))["layers.0.self_attn.q_proj.weight"] - load_file(str(b))["layers.0.self_attn.q_proj.weight"]
    S = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(m.singular_values, S, rtol=0, atol=4 * np.sqrt(np.finfo(float).eps) * S[0])
    assert not all_zero(res)
    cli = CliRunner().invoke(main, ["diff", str(b), str(t)])
    assert cli.exit_code == 0, cli.output  # exit 3 ("same weights") before


def test_weights_near_1e200_give_the_scaled_spectrum(tmp_path):
    b, t, ref = _float64_pair(tmp_path, 1e200, 1e200)
    (m,) = spectra.diff(str(b), str(t)).modules  # LinAlgError from the overflowing Gram before
    np.testing.assert_allclose(np.array(m.singular_values[:3]) / 1e200, ref[:3], rtol=1e-9)
    assert m.fro_norm == pytest.approx(1e200 * np.sqrt(np.sum(ref**2)), rel=1e-9)
    assert m.energy_rank["0.99"] == 3
    # ‖W_base‖² overflows float64: the reader scales before squaring, so the relative norm is exact
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    assert m.rel_norm == pytest.approx(np.sqrt(np.sum(ref**2)) / np.linalg.norm(W), rel=1e-9)


def test_relative_norm_at_1e_minus_160_is_exact(tmp_path):
    b, t, ref = _float64_pair(tmp_path, 1e-160, 1e-160)
    (m,) = spectra.diff(str(b), str(t)).modules
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    assert m.rel_norm == pytest.approx(np.sqrt(np.sum(ref**2)) / np.linalg.norm(W), rel=1e-9)


# ---- cause 17: everything that decides a result is in the --resume fingerprint ----------------------
def _model(folder: Path, heads: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "num_attention_heads": heads,
                                                    "num_key_value_heads": heads, "num_hidden_layers": 1}))
    return folder


def test_fingerprint_covers_config_json_and_the_index(tmp_path):
    base, tuned = _model(tmp_path / "b", 4), _model(tmp_path / "t", 4)
    cfg = DiffConfig()
    first = run_fingerprint(open_checkpoint(str(base)), open_checkpoint(str(tuned)), cfg)
    assert run_fingerprint(open_checkpoint(str(base)), open_checkpoint(str(tuned)), cfg) == first
    _model(tmp_path / "t", 2)  # head counts change; the weights do not (same bytes, same mtime kept below)
    st = os.stat(tuned / "model.safetensors")
    os.utime(tuned / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = run_fingerprint(open_checkpoint(str(base)), open_checkpoint(str(tuned)), cfg)
    assert changed != first
    index = {"metadata": {}, "weight_map": {"model.layers.0.self_attn.q_proj.weight": "model.safetensors"}}
    (tuned / "model.safetensors.index.json").write_text(json.dumps(index))
    with_index = run_fingerprint(open_checkpoint(str(base)), open_checkpoint(str(tuned)), cfg)
    index["metadata"] = {"total_size": 1024}
    (tuned / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run_fingerprint(open_checkpoint(str(base)), open_checkpoint(str(tuned)), cfg) != with_index


def test_resume_after_a_config_change_is_refused(tmp_path):
    base, tuned = _model(tmp_path / "b", 4), _model(tmp_path / "t", 4)
    out = tmp_path / "out"
    spectra.diff(str(base), str(tuned), out_dir=out, plots=False)
    spectra.diff(str(base), str(tuned), out_dir=out, plots=False, resume=True)  # same inputs: accepted
    _model(tmp_path / "t", 2)
    with pytest.raises(ConfigError, match="the journal here comes from different inputs or options") as info:
        spectra.diff(str(base), str(tuned), out_dir=out, plots=False, resume=True)
    _one_line(info.value)


# ---- cause 18: two runs into one --out ----------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from spectra.io.files import OutputLock
    lock = OutputLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    b, t, _ = _float64_pair(tmp_path, 1.0, 1.0)
    out = tmp_path / "out"
    out.mkdir()
    proc = _hold(out)
    try:
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and holder["host"] and holder["started"]
        with pytest.raises(OutputError, match=rf"another spectra run is writing into this folder \(pid {proc.pid} on ") as info:
            spectra.diff(str(b), str(t), out_dir=out)
        _one_line(info.value)
        assert not (out / "results.jsonl").exists()  # nothing of the second run was written
        res = CliRunner().invoke(main, ["diff", str(b), str(t), "--out", str(out)])
        assert res.exit_code == 1
        assert res.stderr.strip().splitlines()[-1].startswith(f"error: {out}: another spectra run is writing into this folder (pid {proc.pid}")
    finally:
        proc.kill()  # SIGKILL: the lock file stays behind, with the dead pid in it
        proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    res = spectra.diff(str(b), str(t), out_dir=out, plots=False)  # a dead process's lock is taken over
    assert len(res.modules) == 1 and not (out / LOCK_NAME).exists()  # and released at the end


def test_lock_is_released_on_finish_and_not_held_against_this_process(tmp_path):
    lock = OutputLock.acquire(tmp_path)
    again = OutputLock.acquire(tmp_path)  # this process's own (an abandoned earlier run): not blocking
    again.release()
    assert (tmp_path / LOCK_NAME).exists()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    proc = _hold(tmp_path)
    try:
        with pytest.raises(OutputError, match="another spectra run"):
            Journal(tmp_path).start(DiffResult(base="b", tuned="t", thresholds=[0.9]))
    finally:
        proc.kill()
        proc.wait()


# ---- stop signals that cannot wait ------------------------------------------------------------------
_BLOCKED = textwrap.dedent("""
    import sys
    import spectra.stream
    import spectra_cli.main as cli
    cli.STOP_GRACE_S = float(sys.argv[2])
    real = spectra.stream.prepare

    def blocked(*args, **kwargs):  # the reader thread opens a FIFO nobody writes: open() blocks
        print("blocking", file=sys.stderr, flush=True)
        open(sys.argv[1], "rb").read()
        return real(*args, **kwargs)

    spectra.stream.prepare = blocked
    cli.main(sys.argv[3:])
""")


@contextlib.contextmanager
def _blocked_run(tmp_path: Path, grace: float, out: Path) -> Iterator[subprocess.Popen]:
    """A diff whose reader is blocked in open() of a FIFO; killed on the way out if a test left it running."""
    b, t, _ = _float64_pair(tmp_path, 1.0, 1.0)
    fifo = tmp_path / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED, str(fifo), str(grace), "diff", str(b), str(t), "--out", str(out),
                             "--prefetch", "2"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == "blocking"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_sigterm_ends_a_run_blocked_on_a_fifo(tmp_path):
    out = tmp_path / "out"
    with _blocked_run(tmp_path, 600.0, out) as proc:
        # meanwhile a second run into the same folder is refused at once
        res = subprocess.run([sys.executable, "-m", "spectra", "diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and f"another spectra run is writing into this folder (pid {proc.pid}" in res.stderr
        assert "Traceback" not in res.stderr
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert time.monotonic() - start < 10
    assert "stopped at once (a second stop signal)" in err and "Traceback" not in err


def test_one_sigterm_ends_a_blocked_run_after_the_grace_period(tmp_path):
    with _blocked_run(tmp_path, 1.0, tmp_path / "out") as proc:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert 0.9 <= time.monotonic() - start < 15
    assert "ended by force (it did not stop within 1 s of the signal)" in err


# ---- wrong-type and malformed edits of the files spectra reads back ------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("written")
    b, t, _ = _float64_pair(tmp, 1.0, 1.0)
    spectra.diff(str(b), str(t), out_dir=tmp / "out", plots=False)
    return tmp / "out"


@pytest.mark.parametrize("text, match", [
    ("[" * 200 + "]" * 200, "nested deeper than"),
    ('{"schema": "spectra.diff/1", "schema": "x"}', "appears twice"),
    ('{"modules": NaN}', "NaN"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_malformed_results_json_is_one_line(written, tmp_path, text, match):
    path = tmp_path / "results.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for read in (DiffResult.load, lambda p: collect([p])):
        with pytest.raises(ResultsFormatError, match=match) as info:
            read(path)
        _one_line(info.value)


def test_results_with_a_lone_surrogate_name_read_back(written, tmp_path):
    doc = json.loads((written / "results.json").read_text())
    doc["modules"][0]["name"] = "\ud800odd"
    (tmp_path / "results.json").write_text(json.dumps(doc))  # ensure_ascii escapes it as \\ud800
    assert DiffResult.load(tmp_path / "results.json").modules[0].name == "\ud800odd"


def test_fifo_as_results_json_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "results.json")
    start = time.monotonic()
    with pytest.raises(SpectraError, match="FIFO"):
        DiffResult.load(tmp_path / "results.json")
    assert time.monotonic() - start < 5


def test_edited_journal_record_is_one_line_on_resume(written, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in ("results.json", "results.jsonl"):
        (out / f).write_bytes((written / f).read_bytes())
    with open(out / "results.jsonl", "a") as f:
        f.write('["not", "a", "record"]\n')
    doc = json.loads((written / "results.json").read_text())
    b, t = doc["base"], doc["tuned"]
    with pytest.raises(ResultsFormatError, match=r"results.jsonl: record 2 must be \{\"module\"") as info:
        spectra.diff(b, t, out_dir=out, resume=True, plots=False)
    _one_line(info.value)


def test_journal_torn_tail_is_dropped_and_resume_completes(written, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in ("results.json", "results.jsonl"):
        (out / f).write_bytes((written / f).read_bytes())
    with open(out / "results.jsonl", "a") as f:
        f.write('{"module": {"name": "cut sh')  # a kill mid-line
    doc = json.loads((written / "results.json").read_text())
    res = spectra.diff(doc["base"], doc["tuned"], out_dir=out, resume=True, plots=False)
    assert len(res.modules) == 1
    assert all(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())


@pytest.mark.parametrize("name, text, match", [
    ("compare.json", "[" * 300 + "]" * 300, "nested deeper than"),
    ("esd.json", '{"schema": "spectra.esd/1", "matrices": [], "matrices": []}', "appears twice"),
    ("train_log.jsonl", '{"step": 1, "loss": 2.0}\n{"step": [[[', None),
    ("train_log.jsonl", '{"step": 1}\n[1\n{"step": 2}\n', "line 2 is not valid JSON"),
])
def test_other_result_files_are_read_with_bounded_one_line_errors(tmp_path, name, text, match):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / name).write_text(text)
    if match is None:  # a torn last line of a training log (a run killed mid-write) is dropped
        assert collect([folder]).train_logs == {"run": [{"step": 1, "loss": 2.0}]}
        return
    with pytest.raises(ResultsFormatError, match=match) as info:
        collect([folder])
    _one_line(info.value)


@pytest.mark.parametrize("scale", [1e200, 1e-160])
def test_compare_refuses_float64_updates_beyond_squaring_range_in_one_line(tmp_path, scale):
    """compare's Gram-based measures cannot square these: a skip naming the module and the way out, not a
    LinAlgError traceback (1e200) or a wrong rank (1e-160)."""
    b, t, _ = _float64_pair(tmp_path, scale, scale)
    res = spectra.compare(str(t), str(t), base=str(b))
    assert not res.modules
    (skip,) = res.skipped
    assert "leave float64's range" in skip["reason"] and "spectra diff can" in skip["reason"]


@pytest.mark.parametrize("owns_process, code", [(False, 0), (True, 130)])
def test_grace_timer_outlives_the_command_only_when_the_process_is_the_command(owns_process, code):
    """A Ctrl-C that stopped a command run inside another program (a notebook calling ``main``) must not
    end that program when the grace period runs out; the ``spectra`` process itself keeps the bound on
    its own exit. Run in a child process: the timer calls ``os._exit``."""
    script = textwrap.dedent(f"""
        import signal, time
        from spectra_cli.main import _StopSignals
        stop = _StopSignals(0.3)
        stop._seen(signal.SIGINT)          # what the watcher does when Ctrl-C arrives
        stop.close(owns_process={owns_process})
        time.sleep(1.5)
        print("still running")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr
    assert ("still running" in res.stdout) == (not owns_process)


def test_the_command_line_owns_its_process():
    """The console script and ``python -m spectra`` count as the command; a program importing it does not."""
    for argv0, expected in (("/venv/bin/spectra", True), (sys.argv[0], False)):
        script = f"import sys; sys.argv[0] = {argv0!r}; from spectra_cli.main import _owns_process; print(_owns_process())"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout.strip()
        assert out == str(expected)
