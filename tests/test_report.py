"""``spectra report``: self-contained HTML with every section its inputs allow, escaped names, and a
real render in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import spectra
from spectra.errors import SpectraError
from spectra.report import build_report
from spectra_cli.main import main

DEMO = Path(__file__).resolve().parents[1] / "reports" / "demo"  # shipped: outputs of `make demo`
EVIL = "model.layers.0.<script>alert(1)</script>.q_proj.weight"


@pytest.fixture(scope="module")
def evil_diff(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("evil")
    g = torch.Generator().manual_seed(0)
    base = {EVIL: torch.randn(16, 16, generator=g), "model.layers.1.mlp.$x$_proj.weight": torch.randn(16, 24, generator=g)}
    save_file(base, str(d / "a.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(d / "b.safetensors"))
    spectra.diff(d / "a.safetensors", d / "b.safetensors", out_dir=d / "out", config=spectra.DiffConfig(weight_spectra=True))
    return d / "out" / "results.json"


def _no_external_urls(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "external resource referenced"
    assert "@import" not in text and "url(http" not in text


def test_diff_only_report_escapes_names(evil_diff):
    text = build_report([evil_diff])
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for section in ("Overview", "ΔW spectra", "Every matrix", "Spectra of ΔW", "Spectra of W_base, W_tuned and ΔW", "What this means"):
        assert section in text, section
    assert "Subspaces:" not in text and "Learning vs forgetting" not in text
    _no_external_urls(text)
    assert text.count("<script>") == 1  # only the report's own inline table sorter


def test_compare_only_and_full_demo_reports():
    compare_json = DEMO / "compare_lora8_vs_full" / "compare.json"
    text = build_report([compare_json])
    for section in ("Subspaces:", "Amplification", "Intruder dimensions", "φ"):
        assert section in text, section
    assert "ΔW spectra:" not in text
    full = build_report([DEMO])
    for section in ("Overview", "ΔW spectra:", "Subspaces:", "Amplification", "Intruder dimensions"):
        assert section in full, section
    _no_external_urls(full)


def test_learning_vs_forgetting_section(tmp_path):
    for name, end in (("lora", 1.2), ("full", 1.5)):
        (tmp_path / name).mkdir()
        recs = [{"step": 0, "target_loss": 2.0, "source_loss": 1.0}, {"step": 10, "target_loss": end, "source_loss": 1.1}]
        (tmp_path / name / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    text = build_report([tmp_path])
    assert "Learning vs forgetting" in text and "data:image/svg+xml;base64," in text


def test_bad_inputs(tmp_path):
    with pytest.raises(SpectraError, match="no such file or folder"):
        build_report([tmp_path / "missing.json"])
    (tmp_path / "x.json").write_text('{"schema": "other/1"}')
    with pytest.raises(SpectraError, match="not a spectra result"):
        build_report([tmp_path / "x.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectraError, match="no spectra results found"):
        build_report([tmp_path / "empty"])


def test_cli_report_and_flag(evil_diff, tmp_path):
    res = CliRunner().invoke(main, ["report", str(evil_diff), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and (tmp_path / "r.html").is_file()
    base, tuned = evil_diff.parent.parent / "a.safetensors", evil_diff.parent.parent / "b.safetensors"
    res = CliRunner().invoke(main, ["diff", str(base), str(tuned), "--out", str(tmp_path / "o"), "--report"])
    assert res.exit_code == 0 and (tmp_path / "o" / "report.html").is_file()
    res = CliRunner().invoke(main, ["diff", str(base), str(tuned), "--report"])
    assert res.exit_code == 2 and "give --out DIR" in res.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_renders_in_headless_chromium_without_console_errors(tmp_path, evil_diff):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: `make test` installs Debian's chromium when apt-get can; it could not here")
    report = tmp_path / "report.html"
    report.write_text(build_report([DEMO, evil_diff]), encoding="utf-8")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
             "--v=0", "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()]
    proc = subprocess.run([exe, *flags], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [l for l in proc.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not console, console
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[0] >= 1000 and float(np.std(img[..., :3])) > 0.05  # not a blank page
