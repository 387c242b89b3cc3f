"""``spectra demo`` leaves the committed example in reports/demo whole: --quick runs go to a scratch
folder unless --out says otherwise, and refuse to overwrite a full demo there."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

import spectra.demo
from spectra_cli.main import main


def _fake_demo(seen: list):
    def run_demo(config, log, on_train):  # records where the demo would write, writes its summary
        seen.append(Path(config.out))
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "summary.md").write_text("quick demo\n", encoding="utf-8")
    return run_demo


def test_quick_demo_defaults_to_a_scratch_folder(monkeypatch, tmp_path):
    seen: list[Path] = []
    monkeypatch.setattr(spectra.demo, "run_demo", _fake_demo(seen))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["demo", "--quick"])
    assert res.exit_code == 0, res.output
    (out,) = seen
    assert out.name.startswith("spectra-demo-") and not (tmp_path / "reports").exists()


def test_quick_demo_refuses_to_overwrite_the_full_example(monkeypatch, tmp_path):
    seen: list[Path] = []
    monkeypatch.setattr(spectra.demo, "run_demo", _fake_demo(seen))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "demo").mkdir(parents=True)
    (tmp_path / "reports" / "demo" / "summary.json").write_text(json.dumps({"full": True}), encoding="utf-8")
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", "reports/demo"])
    assert res.exit_code == 2 and "would overwrite the full example" in res.output and seen == []
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", "elsewhere"])
    assert res.exit_code == 0 and seen == [Path("elsewhere")]
