"""Thirty-eighth round: one rule for which base tensor a tuned tensor outside the analysed matrices compares with
(docs/bad_inputs.md, "thirty-eighth round")."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from spectra import open_checkpoint
from spectra.stored_bytes import base_lookup, changed_tensors


def test_an_ambiguous_pairing_key_pairs_nothing_as_in_pairing(tmp_path):
    # two base tensors share the key layers.0.norm (with and without "model."): pairing pairs neither with a tuned
    # tensor of a third spelling, and the changed-tensor check (diff's, extract's) used to take the first of them
    base = {"model.layers.0.norm.weight": torch.ones(4), "layers.0.norm.weight": torch.full((4,), 2.0),
            "model.layers.0.mlp.weight": torch.ones(3, 4)}
    tuned = {"base_model.model.model.layers.0.norm.weight": torch.ones(4),  # equal to the first, not the second
             "base_model.model.model.layers.0.mlp.weight": torch.full((3, 4), 5.0)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    b, t = open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors")
    lookup = base_lookup(b)
    assert lookup("model.layers.0.norm.weight") == "model.layers.0.norm.weight"  # the same name first
    assert lookup("base_model.model.model.layers.0.norm.weight") is None  # two candidates: none
    assert lookup("base_model.model.model.layers.0.mlp.weight") == "model.layers.0.mlp.weight"  # one candidate
    assert lookup("model.layers.9.mlp.weight") is None
    assert changed_tensors(b, t, list(t.tensors)) == ["base_model.model.model.layers.0.mlp.weight"]
