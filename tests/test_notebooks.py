"""The notebooks run top to bottom offline (on the quick demo's runs, trained once here)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("peft")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from spectra.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("nbdemo") / "demo"
    run_demo(DemoConfig.make(str(out), quick=True), log=lambda m: None)
    return out


def test_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_hu_et_al_section7.ipynb", "03_biderman_et_al_spectra.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, demo_dir, monkeypatch):
    monkeypatch.setenv("SPECTRA_DEMO_DIR", str(demo_dir))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # it drew a figure
