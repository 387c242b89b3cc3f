"""Twenty-fifth round, extract and recommend (docs/bad_inputs.md, "twenty-fifth round"): a budget left unspent by
--max-rank where another module stops at its rounding floor."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file


def test_an_unspent_budget_names_the_max_rank_cap_beside_the_rounding_floor(tmp_path):
    """Module 0: a rank-1 update (its next components at the rounding level); module 1: full rank 8. With --max-rank 1
    and a budget of every parameter, the warning blamed the rounding level alone, while module 1's 7 resolved
    components (half its energy) were left by the cap."""
    from spectra import diff
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig
    from spectra.recommend import recommend

    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    u, v = torch.randn(12, 1, generator=g), torch.randn(1, 8, generator=g)
    T = {"model.layers.0.mlp.up_proj.weight": W["model.layers.0.mlp.up_proj.weight"] + u @ v,
         "model.layers.1.mlp.up_proj.weight": W["model.layers.1.mlp.up_proj.weight"] + 0.3 * torch.randn(12, 8, generator=g)}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file(T, str(tmp_path / "t.safetensors"))
    b, t = str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")
    s1 = np.linalg.svd((T["model.layers.1.mlp.up_proj.weight"] - W["model.layers.1.mlp.up_proj.weight"]).double().numpy(),
                       compute_uv=False)
    assert s1[-1] > 1e-2 * s1[0]  # module 1: every component resolved
    res = extract(b, t, tmp_path / "x", config=ExtractConfig(budget="100%", max_rank=1), plots=False)
    assert [m["rank"] for m in res.modules] == [1, 1]
    said = [w for w in res.warnings if "parameters spent" in w]
    assert len(said) == 1, res.warnings
    assert "are at the rounding level of their stored weights" in said[0]  # module 0, as before
    assert ("1 modules stop at the largest rank --max-rank / --serving allows (e.g. model.layers.1.mlp.up_proj.weight at "
            "r = 1) with resolved components left" in said[0]), said[0]
    diff(b, t, plots=False).save(tmp_path / "d")
    rec = recommend(tmp_path / "d" / "results.json", energy=None, budget="100%", max_rank=1)
    spent = [n for n in rec.notes if "parameters spent" in n]
    assert spent and "1 modules are at the largest rank --max-rank 1 allows (e.g. model.layers.1.mlp.up_proj" in spent[0], rec.notes
    # --max-rank 2: module 0 holds its one resolved direction below the cap, module 1 stops at 2
    rec = recommend(tmp_path / "d" / "results.json", energy=None, budget="100%", max_rank=2)
    spent = [n for n in rec.notes if "parameters spent" in n]
    assert spent and "1 modules stop at the largest rank --max-rank 2 allows (e.g. model.layers.1.mlp.up_proj" in spent[0], rec.notes
    # without the cap: no word of it
    res = extract(b, t, tmp_path / "y", config=ExtractConfig(budget="100%"), plots=False)
    assert not any("stop at the largest rank" in w for w in res.warnings)
