"""Twenty-second round, ``spectra trace`` and the findings: a ``global_step`` that is no integer (``true``, ``"4"``, ``4.5``,
``null``) gives the step of the folder name with a note (``true`` was step 1, which ``spectra report`` then refused);
a kind tied at the top at the displayed precision is named with the others (not one of them picked); an adapter run whose
adapted modules change between checkpoints is said; a checkpoint of another architecture is said, and marked failed when
most of its matrices cannot be paired (its few matching shapes were traced against an unrelated base)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.findings import diff_findings
from spectra.metrics import spectrum_metrics
from spectra.randmat import random_energy_rank
from spectra.results import DiffResult, ModuleResult
from spectra.trace import load_trace, trace
from spectra.trace_inputs import check_trace_matrix
from tests.cli_util import cli

D = 16
KINDS = {"self_attn.q_proj": (D, D), "self_attn.v_proj": (D, D), "mlp.up_proj": (24, D)}


def _names(layers: int = 2, kinds=KINDS) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{k}.weight": s for i in range(layers) for k, s in kinds.items()}


def _weights(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}


def _save(folder: Path, weights: dict[str, torch.Tensor], state: dict | None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def _update(name: str, step: int) -> torch.Tensor:
    """A planted rank-2 update growing with the step (float64 storage: ΔW is exact)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    out, inn = _names(3)[name]
    return 0.01 * step * torch.randn(out, 2, generator=g, dtype=torch.float64) @ torch.randn(2, inn, generator=g, dtype=torch.float64)


def _full_run(root: Path, steps=(10, 20, 30)) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    base = _weights(_names(), 0)
    _save(root / "base", base, None)
    for s in steps:
        _save(root / "run" / f"checkpoint-{s}", {n: w + _update(n, s) for n, w in base.items()},
              {"global_step": s, "log_history": [{"step": t, "loss": 3.0 - t / 100} for t in range(1, s + 1)]})
    return root / "base", root / "run", base


# ---- 1. a global_step that is no integer ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, "20", 20.5, None, "absent", -3])
def test_a_global_step_that_is_no_integer_gives_the_folder_names_step_with_a_note(tmp_path, value):
    """``"global_step": true`` was step 1 (a bool is an int in Python): the loss of step 1, ``"step": true`` in trace.json,
    which report and --resume then refused; ``"20"``, ``20.5``, ``null`` fell back to the folder name without a word."""
    base, run, _ = _full_run(tmp_path)
    state = run / "checkpoint-20" / "trainer_state.json"
    doc = json.loads(state.read_text())
    if value == "absent":
        del doc["global_step"]
    else:
        doc["global_step"] = value
    state.write_text(json.dumps(doc))
    spelled = "has no global_step" if value == "absent" else f"global_step is {json.dumps(value)}, not a step (a whole number >= 0)"
    for paths in ([str(run)], [str(run / f"checkpoint-{s}") for s in (10, 20, 30)]):  # a run folder; listed checkpoints
        res = trace(str(base), paths)
        steps = [c["step"] for c in res.checkpoints]
        assert steps == [10, 20, 30] and all(type(s) is int for s in steps), steps
        ck = res.checkpoints[1]
        assert ck["source"] == "folder name" and ck["loss"] == pytest.approx(3.0 - 20 / 100), ck  # step 20's loss, not step 1's
        assert spelled in ck["note"] and ck["note"].endswith("step from the folder name"), ck["note"]
        assert [c["note"] for c in (res.checkpoints[0], res.checkpoints[2])] == ["", ""]
        for m in res.matrices:
            check_trace_matrix(m, m["name"], None)  # what report and --resume check
            assert [p["step"] for p in m["points"]] == [10, 20, 30]
            ref = np.linalg.norm(_update(m["name"], 20).numpy())
            assert m["points"][1]["fro_norm"] == pytest.approx(ref, rel=1e-9)


def test_report_and_resume_read_a_trace_whose_checkpoint_said_global_step_true(tmp_path):
    base, run, _ = _full_run(tmp_path)
    state = run / "checkpoint-20" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": True}))
    out = tmp_path / "t"
    proc = cli(["trace", str(base), str(run), "-o", str(out), "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    assert [c["step"] for c in json.loads((out / "trace.json").read_text())["checkpoints"]] == [10, 20, 30]
    rep = cli(["report", str(out)])
    assert rep.returncode == 0 and "must be an integer" not in rep.stderr, rep.stderr
    again = cli(["trace", str(base), str(run), "-o", str(out), "--no-plots", "--resume"])
    assert again.returncode == 0, again.stderr
    assert load_trace(out).checkpoints[1]["step"] == 20


# ---- 2. ties in the findings ---------------------------------------------------------------------------------
def _module(name: str, layer: int, kind: str, role: str, S: np.ndarray, base_fro: float) -> ModuleResult:
    shape = (len(S), len(S))
    m = spectrum_metrics(S, shape, (0.9,))
    return ModuleResult(name=name, layer=layer, module=kind, role=role, shape=list(shape), fro_norm=m.fro_norm,
                        base_fro_norm=base_fro, rel_norm=m.fro_norm / base_fro, spectral_norm=m.spectral_norm,
                        stable_rank=m.stable_rank, effective_rank=m.effective_rank, energy_rank={"0.9": m.energy_rank[0.9]},
                        random_energy_rank={"0.9": random_energy_rank(shape, 0.9)},
                        energy_rank_frac={"0.9": m.energy_rank_frac[0.9]}, singular_values=[float(x) for x in S],
                        nuclear_norm=m.nuclear_norm, signal_rank=m.signal_rank)


def _kinds_text(kinds: list[str]) -> str:
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"


def test_findings_name_every_kind_tied_at_the_top_as_shown():
    """"by median the largest kind is q_proj (0.03)" where seven kinds' medians agree to three digits, and "highest in
    up_proj" where gate_proj has exactly the same rank: one of a tie was picked by its position."""
    for bases in ({"q_proj": 100.0, "k_proj": 100.3, "v_proj": 100.1, "gate_proj": 160.0, "up_proj": 100.2},  # four tie at 0.03
                  {"q_proj": 100.0, "k_proj": 160.0, "v_proj": 160.0, "gate_proj": 161.0, "up_proj": 55.0},   # one largest (up)
                  {"q_proj": 100.0, "k_proj": 100.2, "v_proj": 100.1, "gate_proj": 100.4, "up_proj": 100.3}):  # every kind alike
        _check_ties(bases)


def _check_ties(bases: dict[str, float]) -> None:
    S = {"q": np.array([3.0, 0.1] + [0.0] * 14), "k": np.array([3.0, 2.0, 1.0] + [0.0] * 13),
         "g": np.linspace(3.0, 1.0, 16)}  # gate and up: the same spectrum, so exactly the same rank needed
    spectra_of = {"q_proj": S["q"], "k_proj": S["k"], "v_proj": S["k"] * 0.99, "gate_proj": S["g"], "up_proj": S["g"] * 1.01}
    roles = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": "gate", "up_proj": "up"}
    mods = []
    for layer in range(2):
        for kind, s in spectra_of.items():
            scale = 3.0 / np.linalg.norm(s)  # ‖ΔW‖_F = 3 everywhere: the relative size is 3 / ‖W_base‖
            mods.append(_module(f"model.layers.{layer}.{kind}.weight", layer, kind, roles[kind], s * scale, bases[kind] * (1 + 0.01 * layer)))
    res = DiffResult(base="b", tuned="t", thresholds=[0.9], modules=mods, complete=True)
    f = {x.topic: x for x in diff_findings(res)}
    order = list(spectra_of)
    # the reference: float64 medians, and the kinds whose median shows (two decimals) as the extreme's does
    rel = {k: statistics.median(3.0 / (bases[k] * (1 + 0.01 * layer)) for layer in range(2)) for k in order}
    top = max(rel.values())
    tied = [k for k in order if f"{rel[k]:.2f}" == f"{top:.2f}"]
    top_matrix = max(mods, key=lambda m: m.rel_norm)
    size = f["size"].text
    if len(tied) == len(order):
        assert f"by median every kind is about the same ({top:.2f})." in size, size
    elif tied == [top_matrix.module]:
        assert "by median" not in size, size
    elif len(tied) == 1:
        assert f"by median the largest kind is {tied[0]} ({top:.2f})." in size, size
    else:
        assert f"by median the largest kinds are {_kinds_text(tied)} ({top:.2f} each)." in size, size
    assert f["size"].numbers["largest_kinds"] == tied
    frac = {k: statistics.median(m.energy_rank["0.9"] / 16 for m in mods if m.module == k) for k in order}
    hi, lo = max(frac.values()), min(frac.values())
    highs = [k for k in order if f"{frac[k]:.2f}" == f"{hi:.2f}"]
    lows = [k for k in order if f"{frac[k]:.2f}" == f"{lo:.2f}"]
    assert highs == ["gate_proj", "up_proj"] and lows == ["q_proj"], (frac, highs, lows)
    assert f"lowest in {_kinds_text(lows)}, highest in {_kinds_text(highs)};" in f["modules"].text, f["modules"].text


def test_the_demos_size_finding_names_the_seven_kinds_that_agree(tmp_path):
    proc = cli(["demo", "--synthetic", "--quick", "--out", str(tmp_path / "demo")])
    assert proc.returncode == 0, proc.stderr
    res = DiffResult.load(tmp_path / "demo")
    rels: dict[str, list[float]] = {}
    for m in res.modules:
        if m.fro_norm and m.rel_norm is not None:
            rels.setdefault(m.module, []).append(m.rel_norm)
    med = {k: float(np.median(v)) for k, v in rels.items()}
    top = max(med.values())
    tied = [k for k in rels if f"{med[k]:.2f}" == f"{top:.2f}"]
    assert len(tied) > 1, med  # the demo's kinds agree: the case reported
    size = next(x for x in diff_findings(res) if x.topic == "size")
    assert f"by median the largest kinds are {_kinds_text(tied)} ({top:.2f} each)." in size.text, size.text


# ---- 3. adapted modules that change between checkpoints ------------------------------------------------------
def _adapter(folder: Path, modules: list[str], step: int, r: int = 4) -> dict[str, np.ndarray]:
    """A LoRA checkpoint adapting ``modules`` (base names); returns each module's s·B·A (float64)."""
    folder.mkdir(parents=True)
    tensors, dense = {}, {}
    for name in modules:
        g = torch.Generator().manual_seed(sum(map(ord, name)) + step)
        out, inn = _names()[name]
        A, B = torch.randn(r, inn, generator=g), 0.1 * torch.randn(out, r, generator=g)
        stem = name.removesuffix(".weight")
        tensors[f"base_model.model.{stem}.lora_A.weight"] = A
        tensors[f"base_model.model.{stem}.lora_B.weight"] = B
        dense[name] = 2.0 * B.double().numpy() @ A.double().numpy()  # scale lora_alpha / r = 8 / 4
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    targets = sorted({n.split(".")[-2] for n in modules})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": targets}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return dense


def test_adapted_modules_that_enter_or_leave_between_checkpoints_are_said(tmp_path):
    """An r change got a warning; modules entering or leaving the adapter between steps (adapters of several runs) none."""
    _save(tmp_path / "base", _weights(_names(), 0), None)
    names = list(_names())
    q, v, up = ([n for n in names if k in n] for k in ("q_proj", "v_proj", "up_proj"))
    for changes in (True, False):  # and a run that keeps its modules: no such warning
        _check_adapter_run(tmp_path, {10: q + v, 20: q + v + up, 30: q + up} if changes else {s: q + v for s in (10, 20, 30)},
                           changes)


def _check_adapter_run(tmp_path: Path, held: dict[int, list[str]], changes: bool) -> None:
    run = tmp_path / f"run_{changes}"
    dense = {s: _adapter(run / f"checkpoint-{s}", mods, s) for s, mods in held.items()}
    res = trace(str(tmp_path / "base"), [str(run)])
    said = [w for w in res.warnings if "adapted modules change" in w]
    if not changes:
        assert said == [], res.warnings
    else:
        steps = sorted(held)
        parts = []
        for a, b in zip(steps, steps[1:]):
            came, went = sorted(set(held[b]) - set(held[a])), sorted(set(held[a]) - set(held[b]))
            bits = [f"{len(x)} {w} ({', '.join(x[:3])}{' …' if len(x) > 3 else ''})" for x, w in ((came, "enter"), (went, "leave")) if x]
            parts.append(f"from step {a} to {b}, " + " and ".join(bits))
        assert len(said) == 1 and "; ".join(parts) in said[0], (said, parts)
    for m in res.matrices:  # present where adapted, with ‖s·B·A‖_F; skipped where the adapter lacks it
        for s, pt in zip(sorted(held), m["points"]):
            if m["name"] in held[s]:
                assert pt["fro_norm"] == pytest.approx(np.linalg.norm(dense[s][m["name"]]), rel=1e-6)
            else:
                assert pt.get("skip") == "not in this adapter", pt


# ---- 4. a checkpoint of another architecture -----------------------------------------------------------------
OTHER = {"self_attn.q_proj": (D, D), "self_attn.v_proj": (D, D), "mlp.up_proj": (20, D)}  # MLP width 20, not 24


def test_a_checkpoint_of_another_architecture_is_failed_and_says_what_differs(tmp_path):
    """3 layers and another MLP width beside the base's 2: its attention matrices were traced against an unrelated base,
    its MLP skipped, its layer 2 unmentioned, and failed left empty."""
    base, run, _ = _full_run(tmp_path, steps=(10, 20))
    other = _weights(_names(3, OTHER), 5)
    _save(run / "checkpoint-30", other, {"global_step": 30, "log_history": []})
    res = trace(str(base), [str(run)])
    base_shapes = _names()
    differ = sorted(n for n in other if n in base_shapes and tuple(other[n].shape) != base_shapes[n])
    extra = sorted(n for n in other if n not in base_shapes)
    paired = len(other) - len(differ) - len(extra)
    assert (len(differ), len(extra), paired) == (2, 3, 4)
    ck = res.checkpoints[2]
    assert ck["failed"].startswith(f"does not pair with the base ({len(differ) + len(extra)} of its {len(other)} matrices "
                                   f"cannot be paired: {len(differ)} differ in shape from the base's (e.g. {differ[0]}: "
                                   f"base (24, 16) vs tuned (20, 16)); {len(extra)} are not in the base ({', '.join(extra)})"), ck
    assert any(w.endswith(ck["failed"]) and "checkpoint-30" in w for w in res.warnings), res.warnings
    assert [c["failed"] for c in res.checkpoints[:2]] == ["", ""]
    for m in res.matrices:  # nothing of it is traced; the two checkpoints of this base are, exactly
        assert m["points"][2] == {"step": 30, "skip": ck["failed"]}
        for i, s in enumerate((10, 20)):
            assert m["points"][i]["fro_norm"] == pytest.approx(np.linalg.norm(_update(m["name"], s).numpy()), rel=1e-9)


def test_a_checkpoint_with_a_matrix_the_base_lacks_is_traced_and_said(tmp_path):
    base, run, weights = _full_run(tmp_path, steps=(10, 30))
    extra = "model.layers.2.self_attn.q_proj.weight"
    _save(run / "checkpoint-20", {**{n: w + _update(n, 20) for n, w in weights.items()}, extra: torch.ones(D, D, dtype=torch.float64)},
          {"global_step": 20, "log_history": []})
    res = trace(str(base), [str(run)])
    assert [c["failed"] for c in res.checkpoints] == ["", "", ""]
    said = [w for w in res.warnings if "cannot be paired" in w]
    assert said == [f"checkpoint-20: 1 of its {len(weights) + 1} matrices cannot be paired: 1 is not in the base ({extra}); "
                    "those are not traced at this checkpoint (a checkpoint of another model, or of a resized one?)"], res.warnings
    assert extra not in {m["name"] for m in res.matrices}
    for m in res.matrices:
        for i, s in enumerate((10, 20, 30)):
            assert m["points"][i]["fro_norm"] == pytest.approx(np.linalg.norm(_update(m["name"], s).numpy()), rel=1e-9)
