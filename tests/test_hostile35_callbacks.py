"""Thirty-fifth round, the in-training tracker (:mod:`spectra.callbacks`): a resume from a model loaded out of the
run's own checkpoint, a second process in one folder, weights replaced or unfrozen during training, and names of a
submodule called ``module``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from spectra.callbacks import SpectraTracker

KEY = "model.layers.0.mlp.up_proj.weight"


class _Loaded(torch.nn.Module):
    """One matrix under a checkpoint's name, and the folder it was loaded from (``name_or_path``, as transformers)."""

    def __init__(self, weight: torch.Tensor, folder: Path) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].mlp = torch.nn.Module()
        self.model.layers[0].mlp.up_proj = torch.nn.Linear(16, 32, bias=False)
        with torch.no_grad():
            self.model.layers[0].mlp.up_proj.weight.copy_(weight)
        self.name_or_path = str(folder)


def _save(folder: Path, weight: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    save_file({KEY: weight.contiguous()}, folder / "model.safetensors")
    return folder


def _points(path: Path) -> dict[int, dict]:
    return {rec["step"]: rec["point"] for line in path.read_text().splitlines()
            if "matrix" in (rec := json.loads(line))}


def _warnings(path: Path) -> list[str]:
    return [rec["warning"] for line in path.read_text().splitlines() if "warning" in (rec := json.loads(line))]


def test_a_resume_from_a_model_loaded_out_of_the_runs_checkpoint_is_not_measured_from_the_base(tmp_path):
    """Loaded from checkpoint-2 and resumed from it, the tracker took that checkpoint for the base (it holds every
    weight in its shape): ΔW at step 3 was the last step's alone (‖ΔW‖ 0.07 for 0.6), said to be from the base. Now
    the run's own checkpoint, or a folder whose norms are not those the trace recorded, is not the base: the trace
    says ΔW is measured from the resumed weights. Loaded from the base itself, the resume is exact."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(32, 16, generator=g)
    base = _save(tmp_path / "base", W0)
    out = tmp_path / "run"
    steps = [0.05 * torch.randn(32, 16, generator=g) for _ in range(3)]
    m = _Loaded(W0, base)
    tracker = SpectraTracker(m, every=1, out_dir=out)
    for k in (1, 2):
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight.add_(steps[k - 1])
        tracker.step(m, k)
    at2 = m.model.layers[0].mlp.up_proj.weight.detach().clone()
    for folder in (out / "checkpoint-2", tmp_path / "elsewhere" / "ck"):  # the run's own checkpoint, and a copy elsewhere
        _save(folder, at2)
        tr2 = SpectraTracker(_Loaded(at2, folder), every=1, out_dir=out, resume_step=2)  # told by the trace's norms
        assert not tr2.from_base and "is not the base the trace measured from" in tr2.base_note, tr2.base_note
    # with no records to check against (a trace kept elsewhere), the folder's place and its trainer_state.json decide
    (tmp_path / "elsewhere" / "ck" / "trainer_state.json").write_text('{"global_step": 2}')  # the Trainer's own, at that step
    _save(tmp_path / "fresh" / "checkpoint-2", at2)
    for folder, trace_dir in ((tmp_path / "fresh" / "checkpoint-2", tmp_path / "fresh"), (tmp_path / "elsewhere" / "ck", tmp_path / "new")):
        tr2 = SpectraTracker(_Loaded(at2, folder), every=1, out_dir=trace_dir, resume_step=2)
        assert not tr2.from_base and "a checkpoint of this run" in tr2.base_note, (folder, tr2.base_note)
    exact = _Loaded(at2, base)  # loaded from the base, the checkpoint's weights put in (as Trainer's resume does)
    tr3 = SpectraTracker(exact, every=1, out_dir=out, resume_step=2)
    assert tr3.from_base
    with torch.no_grad():
        exact.model.layers[0].mlp.up_proj.weight.add_(steps[2])
    tr3.step(exact, 3)
    truth = np.linalg.norm((exact.model.layers[0].mlp.up_proj.weight.detach() - W0).double().numpy())
    assert abs(_points(out / "trace.jsonl")[3]["fro_norm"] - truth) < 1e-6 * truth


def test_a_new_tracker_in_a_folder_with_a_trace_keeps_it(tmp_path):
    """A second process writing into the same output_dir truncated the first run's trace.jsonl and deleted its
    trace_first.npz. The earlier trace is set aside as trace.1.jsonl, and the new one says so."""
    m = _Loaded(torch.randn(32, 16), tmp_path)
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path / "run")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.add_(0.1)
    tracker.step(m, 1)
    first = (tmp_path / "run" / "trace.jsonl").read_text()
    SpectraTracker(_Loaded(torch.randn(32, 16), tmp_path), every=1, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "trace.1.jsonl").read_text() == first and (tmp_path / "run" / "trace_first.1.npz").is_file()
    assert any("the earlier training's trace is kept as trace.1.jsonl" in w for w in _warnings(tmp_path / "run" / "trace.jsonl"))


def test_a_replaced_parameter_is_measured_as_replaced_and_a_later_unfrozen_one_is_named(tmp_path):
    """``m[0].weight = nn.Parameter(…)`` mid-training: the tracker kept measuring the old tensor (‖ΔW‖ 0.17 where it
    is 16), and a layer unfrozen after the tracker was made was never traced, with no word. Now step(model, …) follows
    the model: the replaced weight is measured as it is now, the unfrozen one is named."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False),
                            torch.nn.Linear(16, 16, bias=False))
    m[2].weight.requires_grad_(False)
    W0 = m[0].weight.detach().clone()
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path)
    with torch.no_grad():
        m[0].weight.add_(0.01 * torch.randn(16, 16))
    tracker.step(m, 1)
    m[0].weight = torch.nn.Parameter(m[0].weight.detach() + 1.0)
    m[2].weight.requires_grad_(True)
    tracker.step(m, 2)
    rec = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    at2 = next(r["point"] for r in rec if r.get("step") == 2 and r.get("matrix", {}).get("name") == "0.weight")
    truth = float(np.linalg.norm((m[0].weight.detach() - W0).double().numpy()))
    assert abs(at2["fro_norm"] - truth) < 1e-5 * truth and truth > 15
    said = _warnings(tmp_path / "trace.jsonl")
    assert any("replaced in the model since the tracker was made (e.g. 0.weight)" in w for w in said), said
    assert any("weights train now that did not when the tracker was made (e.g. 2.weight)" in w for w in said), said
    assert "2.weight" not in {r["matrix"]["name"] for r in rec if "matrix" in r}


def test_a_submodule_called_module_keeps_its_name_and_a_wrapper_loses_its_own(tmp_path):
    """``module.`` was stripped from any model's names: a submodule ``module`` and a weight ``weight`` beside it were
    one name, and the reader kept the unchanged one. Only a wrapper's (DDP, DataParallel, DeepSpeed) is stripped now."""
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(16, 16, bias=False)
            self.weight = torch.nn.Parameter(torch.randn(16, 16))

    m = M()
    assert {tr.name for tr in SpectraTracker(m, every=1).matrices} == {"module.weight", "weight"}
    wrapped = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False)))
    assert [tr.name for tr in SpectraTracker(wrapped, every=1).matrices] == ["0.weight"]


def test_a_base_stored_in_float32_and_trained_in_bfloat16_is_still_the_base(tmp_path):
    """The review: a norm check of the stored float32 tensor against the bf16 copy's recorded norm (6e-6 apart) refused
    the genuine base. The copy is made in the model's dtype, as at the start, so its norm is the recorded one."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(32, 16, generator=g)
    base = _save(tmp_path / "base", W0)  # float32 on disk
    m = _Loaded(W0, base).to(torch.bfloat16)
    tracker = SpectraTracker(m, every=1, out_dir=tmp_path / "run")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.add_(0.05)
    tracker.step(m, 1)
    resumed = _Loaded(W0, base).to(torch.bfloat16)
    with torch.no_grad():
        resumed.model.layers[0].mlp.up_proj.weight.copy_(m.model.layers[0].mlp.up_proj.weight)
    assert SpectraTracker(resumed, every=1, out_dir=tmp_path / "run", resume_step=1).from_base


def test_regression_probe_compiled_wrapper_stage2_base_and_a_blank_trace(tmp_path):
    """The round's regression probe: torch.compile(DataParallel(m)) (PyTorch's recommended order) kept `module.` in every
    name; a stage-2 run whose base is a stage-1 checkpoint at the resumed step, or a base saved inside the output
    folder, was refused though the trace's norms confirm it; a whitespace-only trace.jsonl was set aside with a warning."""
    compiled = torch.compile(torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))))
    assert [t.name for t in SpectraTracker(compiled, every=1).matrices] == ["0.weight"]
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(32, 16, generator=g)
    for base, out in ((tmp_path / "stage1" / "checkpoint-2", tmp_path / "stage2"), (tmp_path / "run3" / "base", tmp_path / "run3")):
        _save(base, W0)
        (base / "trainer_state.json").write_text('{"global_step": 2}')
        m = _Loaded(W0, base)
        tracker = SpectraTracker(m, every=1, out_dir=out)
        for k in (1, 2):
            with torch.no_grad():
                m.model.layers[0].mlp.up_proj.weight.add_(0.05)
            tracker.step(m, k)
        resumed = _Loaded(m.model.layers[0].mlp.up_proj.weight.detach(), base)
        with torch.no_grad():  # as the Trainer resumes: loaded from the base, the checkpoint's weights put in
            resumed.model.layers[0].mlp.up_proj.weight.copy_(m.model.layers[0].mlp.up_proj.weight)
        assert SpectraTracker(resumed, every=1, out_dir=out, resume_step=2).from_base, out
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "trace.jsonl").write_text("\n \n")
    SpectraTracker(_Loaded(W0, tmp_path), every=1, out_dir=tmp_path / "blank")
    assert not (tmp_path / "blank" / "trace.1.jsonl").exists()
