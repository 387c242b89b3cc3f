"""Thirty-fourth round: reports of unfinished or edited results, and esd's bulk of storage rounding
(docs/bad_inputs.md, "thirty-fourth round")."""

from __future__ import annotations

import json

import pytest
import torch
from cli_util import cli
from safetensors.torch import save_file

from spectra.errors import ResultsFormatError
from spectra.esd_results import check_record
from spectra.report_extract import findings

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def extracted(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    save_file({Q: w}, tmp_path / "base.safetensors")
    save_file({Q: w + 0.1 * torch.randn(32, 32, generator=g)}, tmp_path / "tuned.safetensors")
    same = cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "base.safetensors"), "-r", "2",
                "--out", str(tmp_path / "same"), "--no-plots"])
    assert same.returncode == 3, same.stderr
    ok = cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-r", "2",
              "--out", str(tmp_path / "ok"), "--no-plots"])
    assert ok.returncode == 0, ok.stderr
    return tmp_path


def test_the_report_of_nothing_extracted_says_so(extracted):
    """extract of identical checkpoints writes extract.json (complete: false, no adapter); its report said "The adapter
    keeps 100.0% … with 0 LoRA parameters" and "13 of the 0 changed modules keep at least 90%"."""
    path = extracted / "same" / "extract.json"
    text = " ".join(f.text for f in findings(path, json.loads(path.read_text())))
    assert "No adapter was written (complete: false)" in text and "None of the 1 modules changed" in text, text
    assert "keeps 100.0%" not in text and "of the 0 changed" not in text, text


def test_edited_extract_records_are_refused_by_name(extracted):
    """A number as text was shown raw (unrounded) where every other result file refuses it; a missing key gave the
    generic "cannot build the report … (KeyError: 'energy_kept')"."""
    path = extracted / "ok" / "extract.json"
    doc = json.loads(path.read_text())
    doc["modules"][0]["energy_kept"] = str(doc["modules"][0]["energy_kept"])
    with pytest.raises(ResultsFormatError, match=r"modules\[0\] \(.*q_proj.weight\)\.energy_kept must be a number or null"):
        findings(path, doc)
    del doc["modules"][0]["energy_kept"]
    with pytest.raises(ResultsFormatError, match=r"modules\[0\] \(.*q_proj.weight\): missing key 'energy_kept'"):
        findings(path, doc)


def test_an_esd_record_of_a_successful_fit_needs_its_alpha():
    """A record whose alpha was deleted (status still success) was counted as a failed fit and moved the median α."""
    rec = {"name": Q, "module": "q_proj", "shape": [32, 32], "status": "success", "alpha": 3.5, "warning": ""}
    check_record(rec, "matrices[0]", "esd.json")
    del rec["alpha"]
    with pytest.raises(ResultsFormatError, match=r"matrices\[0\]\.alpha must be a number where the fit succeeded"):
        check_record(rec, "matrices[0]", "esd.json")


def test_no_marchenko_pastur_bulk_of_storage_rounding():
    """A rank-5 weight stored in bfloat16: its other eigenvalues are rounding, and the MP fit of them counted 21 spikes
    (WeightWatcher: 5). A bulk at the storage rounding is no bulk now (mp_* null); a full-rank one keeps its fit, and so
    does a Gaussian weight with two ×3000 columns (their rounding sits in two eigenvalues, not in the bulk: a bound from
    the mean square dropped its fit)."""
    import numpy as np

    from spectra.esd import esd_metrics
    from spectra.numerics import unit_roundoff
    from spectra.rounding_bulk import rounding_bulk

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 5, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(150, 5, generator=g, dtype=torch.float64))
    low = (U * torch.tensor([3.0, 2.1, 1.7, 1.5, 1.3], dtype=torch.float64)) @ V.T
    full = torch.randn(200, 150, generator=g, dtype=torch.float64) / 15
    outliers = torch.randn(512, 512, generator=g, dtype=torch.float64) * 0.02
    outliers[:, :2] *= 3000
    u = unit_roundoff("bfloat16")
    for W, fitted in ((low, False), (full, True), (outliers, True)):
        stored = W.to(torch.bfloat16)
        lam = np.sort(torch.linalg.svdvals(stored.double()).numpy() ** 2)
        m = esd_metrics(lam, tuple(stored.shape), rounding=rounding_bulk(stored, u))
        assert (m.mp_num_spikes is not None) == fitted, (fitted, m.mp_num_spikes)
        assert esd_metrics(lam, tuple(stored.shape)).mp_num_spikes is not None  # without the level: fitted, as before
