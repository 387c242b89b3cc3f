"""Thirty-first probe round: what users read (docs/bad_inputs.md, "thirty-first round").

The trace rank heatmap of an adapter run whose r changes, an esd.json missing a key every one holds, the report's
hint for a file that is no result, and the demo summary's share of the update an extracted adapter keeps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import spectra.plots.trace as trace_plots
from spectra.errors import ResultsFormatError
from spectra.esd_results import EsdResult
from spectra.report import collect


def test_the_rank_heatmap_divides_by_each_checkpoints_own_r(monkeypatch):
    """r = 4 at step 10 and 8 at step 30: the cell at step 30 read 6/4 = 1.50 "fraction of r" (more than r, clipped
    at the top of the scale); it is 6/8."""
    grids = []
    monkeypatch.setattr(trace_plots, "heatmap", lambda grid, *a, **k: grids.append(grid))
    doc = {"kind": "lora", "thresholds": [0.9], "checkpoints": [{"step": 10}, {"step": 30}],
           "matrices": [{"name": "model.layers.0.self_attn.q_proj.weight", "layer": 0, "shape": [64, 64], "lora_r": 4,
                         "points": [{"step": 10, "fro_norm": 1.0, "energy_rank": {"0.9": 2}, "lora_r": 4},
                                    {"step": 30, "fro_norm": 1.0, "energy_rank": {"0.9": 6}, "lora_r": 8}]}]}
    trace_plots.layer_step_heatmap(doc, which="rank")
    np.testing.assert_allclose(grids[0], [[0.5, 0.75]])
    del doc["matrices"][0]["points"][1]["lora_r"]  # a trace.json written before points carried their r: the matrix's
    trace_plots.layer_step_heatmap(doc, which="rank")
    np.testing.assert_allclose(grids[1], [[0.5, 1.5]])


def _esd_doc() -> dict:
    return {"schema": "spectra.esd/1", "model": "m", "matrices": [], "skipped": [], "config": {}, "warnings": [],
            "complete": True, "elapsed_s": 0.0, "device": "cpu", "version": "0"}


def test_an_esd_json_without_a_key_it_always_holds_is_one_line(tmp_path):
    """A hand-edited esd.json without "model" raised TypeError (EsdResult.__init__() missing … 'model') through
    spectra report, a traceback."""
    doc = _esd_doc()
    EsdResult.from_dict(doc)  # whole: read
    del doc["model"]
    with pytest.raises(ResultsFormatError, match="esd.json has no 'model', which spectra esd always writes"):
        EsdResult.from_dict(doc)
    (tmp_path / "esd.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError, match="has no 'model'"):
        collect([tmp_path / "esd.json"])


def test_a_file_that_is_no_result_names_every_result_file(tmp_path):
    (tmp_path / "lora_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(ResultsFormatError) as err:
        collect([tmp_path / "lora_config.json"])
    for name in ("results.json", "compare.json", "esd.json", "extract.json", "interfere.json", "trace.json", "trace.jsonl",
                 "train_log.jsonl", "recommend LoraConfig"):
        assert name in err.value.hint


def test_the_demo_summary_says_which_energy_an_extracted_adapter_keeps():
    """summary.md said "keeps 0.494 of ‖ΔW‖²_F" where extract.json says 0.256 of all of it (the embeddings and head,
    48% of the energy, are not extracted): the share is of the extracted matrices, said with the whole's."""
    from spectra.demo import extract_summary_lines

    x = {"rank": 8, "lora_params": 1000, "energy_kept": {"extracted_budget": 0.494, "extracted_rank8": 0.449},
         "energy_kept_all": {"extracted_budget": 0.256, "extracted_rank8": 0.233}, "loss": {}, "recovered": {}}
    line = extract_summary_lines(x)[0]
    assert "keeps 0.494 (0.256 of every matrix's) of the extracted matrices' ‖ΔW‖²_F" in line
    assert "0.449 (0.233 of every matrix's) at uniform rank 8" in line
