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


# ---- issue 18: findings and warnings first, legends, definitions; issue 13: validated inputs -------

def _bf16_rounding_results(d: Path) -> Path:
    """results.json of a bf16 pair whose update is at the rounding level (a 3e-3 relative jitter)."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": (torch.randn(64, 1024, generator=g) * 0.02).bfloat16()
            for i in range(2) for m in ("q_proj", "v_proj")}
    tuned = {k: (v.float() * (1 + 3e-3 * torch.randn(v.shape, generator=g))).bfloat16() for k, v in base.items()}
    save_file(base, str(d / "b.safetensors"))
    save_file(tuned, str(d / "t.safetensors"))
    spectra.diff(d / "b.safetensors", d / "t.safetensors", out_dir=d / "out", plots=False)
    return d / "out" / "results.json"


def test_findings_and_warnings_open_the_report_and_tables_have_legends(tmp_path, evil_diff):
    text = build_report([_bf16_rounding_results(tmp_path), evil_diff])
    order = [text.index(s) for s in ('id="warnings"', 'id="findings"', "<h2>Overview</h2>", "ΔW spectra:")]
    assert order == sorted(order)
    assert "rounding level of its storage dtype in 4 of 4 matrices" in text
    assert "No statement on rank" in text and "The update is" in text  # the bf16 pair, then the evil one
    assert "docs/definitions.md" in text and "Columns of this table" in text
    assert "min(out, in)" in text and "Per module kind (the table spectra diff prints)" in text
    elapsed = json.loads(evil_diff.read_text(encoding="utf-8"))["elapsed_s"]
    assert f"<td>{elapsed:.1f}</td><td>cpu</td>" in text  # the seconds spectra diff printed


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(modules="oops"), "modules must be an array of objects. Got string instead"),
    (lambda d: d.update(thresholds=[]), "thresholds must be a non-empty array of numbers in (0, 1]"),
    (lambda d: d.pop("modules"), "missing key 'modules'"),
    (lambda d: d["modules"][0].update(energy_rank="9"), "modules[0].energy_rank must be an object"),
    (lambda d: d["modules"][0].pop("layer"), "modules[0]: missing key 'layer'"),
    (lambda d: d.update(schema=["spectra.diff/1"]), "not a spectra result (schema ['spectra.diff/1'])"),
])
def test_report_refuses_malformed_results_with_one_line(evil_diff, tmp_path, edit, message):
    doc = json.loads(evil_diff.read_text(encoding="utf-8"))
    edit(doc)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    res = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and str(bad) in lines[0], res.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("line,message", [
    ('{"step": "3", "target_loss": 1.0}', "line 1: step must be an integer"),
    ('{"step": 3, "target_loss": 1.0, "source_loss": "high"}', "line 1: source_loss must be a number from 0 to 1e300 or null"),
    ('{"step": 3, "text": "hello"}', "line 1 is no training-log record"),
    ("[1, 2]", "line 1 must be a JSON object"),
])
def test_report_refuses_malformed_training_logs(tmp_path, line, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_log.jsonl").write_text(line + "\n")
    with pytest.raises(SpectraError, match=re.escape(message)):
        build_report([tmp_path])


def test_a_200000_character_name_does_not_slow_the_figures_or_the_report(tmp_path):
    import time

    g = torch.Generator().manual_seed(0)
    long = "model.layers.0." + "x" * 200_000 + ".q_proj.weight"
    base = {long: torch.randn(8, 16, generator=g), "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 16, generator=g)}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / "b.safetensors"))
    start = time.process_time()  # CPU time: other work on a shared machine does not count
    spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out_dir=tmp_path / "out")
    text = build_report([tmp_path / "out"])
    assert time.process_time() - start < 30  # was minutes: matplotlib laid out the whole name
    assert "x" * 200_000 not in text and "…" in text


def _first_screen(html_text: str, tmp_path: Path) -> dict:
    """Where the findings block and each warning sit in a 1280×800 Chromium window (CSS pixels):
    a probe script appended to a copy of the report writes their positions into the DOM."""
    probe = ("<script>var o={vh: window.innerHeight, findings: null, warnings: []};"
             "var f=document.getElementById('findings'); if(f){var r=f.getBoundingClientRect(); o.findings={top:r.top};}"
             "document.querySelectorAll('#warnings li').forEach(function(li){var r=li.getBoundingClientRect();"
             "o.warnings.push({top:r.top, bottom:r.bottom});});"
             "var p=document.createElement('pre'); p.id='probe'; p.textContent=JSON.stringify(o); document.body.appendChild(p);"
             "</script>")
    page = tmp_path / "probe.html"
    page.write_text(html_text.replace("</body>", probe + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "--virtual-time-budget=5000", "--dump-dom",
             page.as_uri()]
    proc = subprocess.run([_chromium(), *flags], capture_output=True, text=True, timeout=180, check=False)
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", proc.stdout, re.DOTALL)
    assert found, proc.stderr[-2000:]
    return json.loads(found.group(1))


@pytest.mark.parametrize("case", ["demo", "bf16_rounding"])
def test_findings_and_warnings_are_on_the_first_screen_in_chromium(tmp_path, case):
    if _chromium() is None:
        pytest.skip("no Chromium: `make test` installs Debian's chromium when apt-get can; it could not here")
    inputs = [DEMO] if case == "demo" else [_bf16_rounding_results(tmp_path)]
    screen = _first_screen(build_report(inputs), tmp_path)
    assert screen["vh"] > 400
    assert screen["findings"] is not None and 0 <= screen["findings"]["top"] < screen["vh"]
    if case == "bf16_rounding":
        assert screen["warnings"], "the rounding-level warning is missing"
    assert all(w["top"] >= 0 and w["bottom"] <= screen["vh"] for w in screen["warnings"])


def test_a_second_commands_report_in_the_same_folder_shows_both_runs(evil_diff, tmp_path):
    """compare --report into a diff's --out folder replaced the diff's report.html with its own."""
    out = tmp_path / "o"
    shutil.copytree(evil_diff.parent, out)
    base, tuned = evil_diff.parent.parent / "a.safetensors", evil_diff.parent.parent / "b.safetensors"
    res = CliRunner().invoke(main, ["compare", str(tuned), str(tuned), "--base", str(base), "--out", str(out), "--report", "--no-plots"])
    assert res.exit_code == 0, res.output
    text = (out / "report.html").read_text()
    assert "Subspaces:" in text and "ΔW spectra:" in text


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["modules"][0].update(name=None), "modules[0].name must be a string"),
    (lambda d: d["modules"][0].pop("layer"), "modules[0]: missing key 'layer'"),
    (lambda d: d["modules"][0].update(shape=[4]), "modules[0].shape must be an array of two non-negative integers"),
    (lambda d: d.update(config=[]), "config must be an object"),
    (lambda d: d.pop("base"), "missing key 'base'"),
])
def test_recommend_refuses_an_edited_results_file_with_one_line(evil_diff, tmp_path, edit, message):
    """It read the document unchecked: AttributeError/TypeError tracebacks on hand-edited files."""
    doc = json.loads(evil_diff.read_text(encoding="utf-8"))
    edit(doc)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    res = CliRunner().invoke(main, ["recommend", str(bad), "--energy", "0.9"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert message in res.stderr and str(bad) in res.stderr, res.stderr


def test_report_of_a_diff_of_float64_weights_near_1e200(tmp_path):
    """The energy curve squared σ ~1e200: an OverflowError for results spectra diff itself wrote."""
    g = torch.Generator().manual_seed(2)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 24, generator=g, dtype=torch.float64) * 1e200}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file({k: v * 1.01 + 1e198 * torch.randn(16, 24, generator=g, dtype=torch.float64) for k, v in base.items()},
              str(tmp_path / "b.safetensors"))
    spectra.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["modules"][0]["fro_norm"] > 1e199
    text = build_report([tmp_path / "out" / "results.json"])
    assert "ΔW spectra:" in text
