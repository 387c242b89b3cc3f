"""Twenty-eighth probe round: esd (docs/bad_inputs.md, "twenty-eighth round")."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from spectra.esd_run import esd


def test_esd_of_fp8_checkpoint_notes_one_dequantisation_per_matrix(tmp_path):
    # a checkpoint analysed alone has no base and tuned side: the note said "base dequantised …; tuned dequantised …"
    torch.manual_seed(0)
    codes = (torch.randn(200, 300) * 20).to(torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": codes, "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 3) + 0.5,
               "model.layers.0.mlp.down_proj.weight": codes.clone(), "model.layers.0.mlp.down_proj.weight_scale": torch.tensor(0.001)},
              str(path))
    notes = {m.name: m.note for m in esd(path).matrices}
    assert notes["model.layers.0.mlp.up_proj.weight"] == (
        "dequantised from float8_e4m3fn with 128x128 block scales (model.layers.0.mlp.up_proj.weight_scale_inv)")
    assert notes["model.layers.0.mlp.down_proj.weight"].startswith("dequantised from float8_e4m3fn with ")
    assert all("base" not in n and "tuned" not in n for n in notes.values())
