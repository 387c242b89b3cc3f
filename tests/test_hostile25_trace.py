"""Twenty-fifth round, trace findings (docs/bad_inputs.md, "twenty-fifth round"): a run whose first checkpoint is the
base, and two modules that turned by opposite amounts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from spectra.report_trace import findings as trace_findings
from spectra.trace import TraceConfig, trace

Q_NAME, V_NAME = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"


def _run(root: Path, degrees: float) -> tuple[str, list[str], np.ndarray]:
    """checkpoint-0 = the base; checkpoints 5 and 10 at t = 1, 2: q_proj's rank-4 update U·S·V(t)ᵀ turns its input
    directions by ``degrees`` per step (V(t) = cos(θt)·V1 + sin(θt)·V2), v_proj's grows on a straight line t·D."""
    rng = np.random.default_rng(5)
    d = 32
    W = {n: torch.from_numpy(rng.standard_normal((d, d))).float() for n in (Q_NAME, V_NAME)}
    save_file(W, str(root / "base.safetensors"))
    Q, _ = np.linalg.qr(rng.standard_normal((d, 12)))
    U, V1, V2 = Q[:, :4], Q[:, 4:8], Q[:, 8:12]
    S = np.diag([4.0, 3.0, 2.0, 1.0]) * 0.05
    th = math.radians(degrees)
    rels = []
    for step, t in ((0, 0), (5, 1), (10, 2)):
        folder = root / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        Vt = math.cos(th * t) * V1 + math.sin(th * t) * V2
        dq, dv = U @ S @ Vt.T if t else np.zeros((d, d)), t * (U @ S @ V1.T)
        T = {Q_NAME: (W[Q_NAME].double() + torch.from_numpy(dq)).float(), V_NAME: (W[V_NAME].double() + torch.from_numpy(dv)).float()}
        save_file(T, str(folder / "model.safetensors"))
        rels.append(np.linalg.norm(dv) / np.linalg.norm(W[V_NAME].double().numpy()))
    return str(root / "base.safetensors"), [str(root / "run")], np.array(rels)


def test_a_step_zero_copy_of_the_base_keeps_the_rank_sentence_and_opposite_turns_are_not_a_middle(tmp_path):
    """checkpoint-0 equal to the base: the "From step … the median rank … went from … to …" sentence was dropped
    (no rank at step 0) and the turn said "since the first checkpoint"; q_proj turned 80° (φ = cos²80° = 0.03) while
    v_proj did not (φ = 1): "turned part of the way: median φ = 0.52", a middle no module is in."""
    base, run, rels = _run(tmp_path, 100.0)
    res = trace(base, run, config=TraceConfig(top_k=4))
    found = trace_findings(tmp_path / "t.json", res.to_dict())
    text = " ".join(f.text for f in found)
    rank = next(f for f in found if "median rank" in f.text)
    assert "From step 5 to step 10" in rank.text and "(before step 5 no matrix had moved from the base)" in rank.text
    qn = np.linalg.norm(0.05 * np.array([4.0, 3.0, 2.0, 1.0]))  # q_proj's ‖ΔW‖ at steps 5 and 10 (a rotation keeps it)
    wq = np.random.default_rng(5).standard_normal((32, 32))
    ref0, ref1 = np.median([qn / np.linalg.norm(wq), rels[1]]), np.median([qn / np.linalg.norm(wq), rels[2]])
    assert abs(rank.numbers["rel_norm"][0] - ref0) < 1e-5 * ref0 and abs(rank.numbers["rel_norm"][1] - ref1) < 1e-5 * ref1
    turn = next(f for f in found if "input directions" in f.text)
    assert "since step 5" in turn.text and "turned part of the way" not in text
    phi_q = math.cos(math.radians(80.0)) ** 2  # the 4-dim subspaces at t = 1, 2: every principal angle 100° → 80°
    assert f"turned by different amounts in different modules (φ from {phi_q:.2f} to 1.00)" in turn.text
    # the same run turning 10° per step: every module's words agree, said as before
    (tmp_path / "b").mkdir()
    base, run, _ = _run(tmp_path / "b", 10.0)
    found = trace_findings(tmp_path / "t.json", trace(base, run, config=TraceConfig(top_k=4)).to_dict())
    turn = next(f for f in found if "input directions" in f.text)
    assert "barely turned since step 5" in turn.text  # φ = cos²10° = 0.970 and 1


def test_checkpoints_saved_with_unmerged_lora_layers_on_every_side_still_trace(tmp_path):
    """A model saved with its LoRA layers unmerged (base_layer, lora_A, lora_B) in the base and in every checkpoint
    pairs tensor by tensor, as diff pairs it; the review of this round's adapter-file check found trace refusing it
    ("holds LoRA factors … an adapter's weights file") before pairing was tried."""
    def weights(scale: float) -> dict:
        out = {}
        for layer in range(2):
            for m in ("q_proj", "v_proj"):
                p = f"model.layers.{layer}.self_attn.{m}"
                out[p + ".base_layer.weight"] = torch.randn(32, 32, generator=torch.Generator().manual_seed(layer * 7 + len(m)))
                out[p + ".lora_A.default.weight"] = torch.randn(4, 32, generator=torch.Generator().manual_seed(layer * 3 + 1)) * (1 + scale)
                out[p + ".lora_B.default.weight"] = torch.full((32, 4), scale)
        return out

    save_file(weights(0.0), str(tmp_path / "base.safetensors"))
    for step in (1, 2):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(weights(0.01 * step), str(folder / "model.safetensors"))
    res = trace(str(tmp_path / "base.safetensors"), [str(tmp_path / "run")], config=TraceConfig(top_k=2))
    assert res.matrices and all(len(m["points"]) == 2 for m in res.matrices)
