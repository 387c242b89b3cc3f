"""``spectra trace``: synthetic checkpoint sequences with known answers, real short Trainer runs (full
and PEFT), half-written and foreign checkpoints, resume, and the bound on reads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra.errors import CheckpointNotFoundError, ConfigError, SpectraError
from spectra.io.checkpoint import Checkpoint
from spectra.report_trace import findings, section_html
from spectra.trace import TraceConfig, find_checkpoints, load_trace, trace
from spectra_cli.main import main
from spectra_cli.trace import trace_cmd

NAMES = {"model.layers.0.self_attn.q_proj.weight": (12, 12), "model.layers.1.self_attn.q_proj.weight": (12, 12),
         "model.layers.0.mlp.up_proj.weight": (20, 12), "model.layers.1.mlp.up_proj.weight": (20, 12)}


def write_state(folder: Path, step: int, losses: dict[int, float]) -> None:
    folder.joinpath("trainer_state.json").write_text(json.dumps(
        {"global_step": step, "log_history": [{"step": s, "loss": v} for s, v in sorted(losses.items()) if s <= step]}))


def synthetic_run(root: Path, update, steps=(10, 20, 30, 40)) -> tuple[Path, Path, dict]:
    """A base and checkpoint-N folders with W_N = W_base + update(name, N) (float64 storage: exact)."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in NAMES.items()}
    (root / "base").mkdir(parents=True)
    save_file(base, root / "base" / "model.safetensors")
    losses = {s: 3.0 - s / 100 for s in range(1, max(steps) + 1)}
    deltas = {}
    for step in steps:
        folder = root / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        deltas[step] = {n: update(n, step) for n in NAMES}
        save_file({n: base[n] + deltas[step][n] for n in NAMES}, folder / "model.safetensors")
        write_state(folder, step, losses)
    return root / "base", root / "run", deltas


def _planted(name: str, rank: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(name) % 1000)
    out, inn = NAMES[name]
    return 0.05 * torch.randn(out, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, inn, generator=g, dtype=torch.float64)


def test_scaled_update_keeps_ranks_and_directions(tmp_path):
    """ΔW_t = t·ΔW: energy ranks and effective rank constant, norms ∝ t, subspaces unturned."""
    base, run, deltas = synthetic_run(tmp_path, lambda n, s: (s / 10) * _planted(n))
    res = trace(str(base), [str(run)], out_dir=tmp_path / "out", config=TraceConfig(top_k=2))
    assert [c["step"] for c in res.checkpoints] == [10, 20, 30, 40] and res.kind == "full"
    assert [c["loss"] for c in res.checkpoints] == pytest.approx([2.9, 2.8, 2.7, 2.6])
    assert len(res.matrices) == 4
    assert not (tmp_path / "out" / ".spectra.lock").exists()  # a finished run leaves no lock behind
    for m in res.matrices:
        S_ref = np.linalg.svd(deltas[10][m["name"]].numpy(), compute_uv=False)
        W_fro = float(np.linalg.norm(load_base(base, m["name"])))
        for i, p in enumerate(m["points"]):
            t = i + 1
            assert p["fro_norm"] == pytest.approx(t * np.linalg.norm(S_ref), rel=1e-9)
            assert p["rel_norm"] == pytest.approx(t * np.linalg.norm(S_ref) / W_fro, rel=1e-9)
            assert p["sigma_ratio"] == pytest.approx(S_ref[0] / S_ref[1], rel=1e-7)
            assert p["energy_rank"] == m["points"][0]["energy_rank"]
            # the Gram route holds every σ to ≈1e-8·σ₁ (README): the zero ones read as ~1e-8, moving the entropy by ~1e-7
            assert p["effective_rank"] == pytest.approx(m["points"][0]["effective_rank"], rel=1e-6)
            assert p["singular_values"][:3] == pytest.approx((t * S_ref[:3]).tolist(), rel=1e-7)
            if i == 0:
                assert p["turn_prev"] is None and p["turn_first"] is None
            else:
                for side in ("left", "right"):
                    assert p["turn_prev"][side]["phi"] == pytest.approx(1.0, abs=1e-12)
                    assert p["turn_first"][side]["max_angle_deg"] == pytest.approx(0.0, abs=1e-5)
                    assert p["turn_first"][side]["k"] == 2
    for f in ("trace.json", "trace.csv", "trace_metrics.png", "trace_heatmap_rank.png", "trace_heatmap_turn.png", "trace_loss.png"):
        assert (tmp_path / "out" / f).is_file(), f
    doc = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert doc["schema"] == "spectra.trace/1" and len(doc["loss_history"]) == 40
    assert (tmp_path / "out" / "trace.csv").read_text().count("\n") == 1 + 4 * 4


def load_base(base: Path, name: str) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(base / "model.safetensors")[name].numpy()


def test_alpha_of_the_weights_matches_the_esd_module(tmp_path):
    """--alpha: WeightWatcher's α of W_step (and of W_base) as spectra.esd fits it to numpy's eigenvalues."""
    from safetensors.torch import load_file

    from spectra.esd import power_law_fit

    base, run, _ = synthetic_run(tmp_path, lambda n, s: (s / 10) * _planted(n), steps=(10, 20))
    res = trace(str(base), [str(run)], config=TraceConfig(alpha=True, include="up_proj"))
    for m in res.matrices:
        W0 = load_file(base / "model.safetensors")[m["name"]].numpy()
        W1 = load_file(run / "checkpoint-20" / "model.safetensors")[m["name"]].numpy()
        for got, W in ((m["base_alpha"], W0), (m["points"][1]["alpha"], W1)):
            ref = power_law_fit(np.linalg.svd(W, compute_uv=False) ** 2).alpha
            assert got == pytest.approx(ref, rel=1e-9)


def test_turning_update_gives_the_planted_angle(tmp_path):
    """A rank-1 update whose left vector turns by 10° per checkpoint in a fixed plane."""
    def update(name: str, step: int) -> torch.Tensor:
        out, inn = NAMES[name]
        a = math.radians(step)  # steps 10, 20, 30: 10° apart
        u = torch.zeros(out, dtype=torch.float64)
        u[0], u[1] = math.cos(a), math.sin(a)
        v = torch.zeros(inn, dtype=torch.float64)
        v[2] = 1.0
        return 0.3 * torch.outer(u, v)

    base, run, _ = synthetic_run(tmp_path, update, steps=(10, 20, 30))
    res = trace(str(base), [str(run)], config=TraceConfig(top_k=1))
    for m in res.matrices:
        p2, p3 = m["points"][1], m["points"][2]
        assert p2["turn_prev"]["left"]["max_angle_deg"] == pytest.approx(10.0, abs=1e-6)
        assert p3["turn_first"]["left"]["max_angle_deg"] == pytest.approx(20.0, abs=1e-6)
        assert p3["turn_first"]["left"]["phi"] == pytest.approx(math.cos(math.radians(20)) ** 2, abs=1e-12)
        assert p3["turn_prev"]["right"]["phi"] == pytest.approx(1.0, abs=1e-12)  # the input side did not move
        assert p3["energy_rank"]["0.9"] == 1 and p3["sigma_ratio"] is None  # rank 1: σ₂ = 0


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> None:
    folder.mkdir(parents=True)
    tensors = {}
    for name, (B, A) in factors.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    folder.joinpath("adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                                   "target_modules": ["q_proj", "up_proj"]}))


def test_adapter_checkpoints_with_known_answers(tmp_path):
    """LoRA checkpoints with B_t = t·B: r = 4 but B·A of rank 2, so the effective rank uses half of r."""
    base, _, _ = synthetic_run(tmp_path / "syn", lambda n, s: torch.zeros(NAMES[n], dtype=torch.float64), steps=(1,))
    g = torch.Generator().manual_seed(1)
    facs = {}
    for n, (out, inn) in NAMES.items():
        B = torch.cat([torch.randn(out, 2, generator=g), torch.zeros(out, 2)], dim=1)  # rank 2 of r = 4, exactly
        facs[n] = (B, torch.randn(4, inn, generator=g))
    run = tmp_path / "lora_run"
    for t in (1, 2, 3):
        write_adapter(run / f"checkpoint-{5 * t}", {n: (t * B, A) for n, (B, A) in facs.items()}, r=4, alpha=8)
        write_state(run / f"checkpoint-{5 * t}", 5 * t, {5 * t: 1.0 / t})
    res = trace(str(base), [str(run)])
    assert res.kind == "lora" and [c["step"] for c in res.checkpoints] == [5, 10, 15]
    for m in res.matrices:
        B, A = facs[m["name"]]
        dense = 2.0 * B.double() @ A.double()
        S_ref = np.linalg.svd(dense.numpy(), compute_uv=False)
        assert m["lora_r"] == 4
        for t, p in enumerate(m["points"], start=1):
            assert p["fro_norm"] == pytest.approx(t * np.linalg.norm(S_ref), rel=1e-6)
            assert p["energy_rank"]["0.99"] <= 2
            q = S_ref[:2] / S_ref[:2].sum()
            assert p["effective_rank_over_r"] == pytest.approx(math.exp(-np.sum(q * np.log(q))) / 4, rel=1e-6)
            if t > 1:
                assert p["turn_first"]["right"]["phi"] == pytest.approx(1.0, abs=1e-9)
                assert p["turn_first"]["right"]["k"] == 2  # the rank-deficient direction is never a subspace


# ---- real short Trainer runs ---------------------------------------------------------------------------
def trainer_run(root: Path, method: str, *, every: int | None = None, steps: int = 6, save_steps: int = 2) -> Path:
    """A few steps of transformers.Trainer on a tiny Llama (full or PEFT LoRA), saving checkpoint-N
    folders; with ``every``, a SpectraCallback traces it in the process. Returns the run folder."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from spectra.callbacks import attach

    torch.manual_seed(0)
    if not (root / "base" / "model.safetensors").is_file():
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    args = transformers.TrainingArguments(output_dir=str(root / method), max_steps=steps, save_steps=save_steps,
                                          per_device_train_batch_size=8, logging_steps=1, report_to=[], use_cpu=True,
                                          learning_rate=5e-3, disable_tqdm=True, save_only_model=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    if every:
        attach(trainer, every=every)
    trainer.train()
    return root / method


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return root, {m: trainer_run(root, m) for m in ("full", "lora")}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_real_trainer_runs(runs, method):
    root, folders = runs
    res = trace(str(root / "base"), [str(folders[method])])
    assert res.kind == method and [c["step"] for c in res.checkpoints] == [2, 4, 6]
    assert all(c["loss"] is not None and c["source"] == "trainer_state" for c in res.checkpoints)
    assert [h["step"] for h in res.loss_history] == [1, 2, 3, 4, 5, 6]
    assert len(res.matrices) == (3 * 2 if method == "lora" else 2 * 7 + 2)  # LoRA targets; or every 2-D weight
    for m in res.matrices:
        fro = [p["fro_norm"] for p in m["points"]]
        assert all(f > 0 for f in fro) and all("skip" not in p for p in m["points"])
        assert m["points"][-1]["turn_first"] is not None
    if method == "lora":
        assert all(m["lora_r"] == 4 and 0 < m["points"][-1]["effective_rank_over_r"] <= 1 for m in res.matrices)
    else:  # embeddings and head are traced too
        assert {"embed_tokens", "lm_head"} <= {m["module"] for m in res.matrices}


def test_reads_are_bounded(runs, monkeypatch):
    """Full checkpoints: every base tensor and every checkpoint tensor is read exactly once."""
    root, folders = runs
    reads: list[str] = []
    load = Checkpoint.load

    def counting(self, name, **kw):
        reads.append(f"{self.label}|{name}")
        return load(self, name, **kw)

    monkeypatch.setattr(Checkpoint, "load", counting)
    res = trace(str(root / "base"), [str(folders["full"])])
    assert len(reads) == len(set(reads)) == len(res.matrices) * (1 + len(res.checkpoints))


def test_half_written_and_missing_checkpoints(runs, tmp_path):
    root, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["full"], run)
    (run / "checkpoint-6" / "trainer_state.json").unlink()  # the newest, still being saved
    f = run / "checkpoint-2" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    found = find_checkpoints([str(run)])
    assert [c.step for c in found.checkpoints] == [4]
    reasons = {Path(s["path"]).name: s["reason"] for s in found.skipped}
    assert "still being saved" in reasons["checkpoint-6"] and "cannot be read" in reasons["checkpoint-2"]
    res = trace(str(root / "base"), [str(run)])
    assert [c["step"] for c in res.checkpoints] == [4] and len(res.skipped_checkpoints) == 2
    with pytest.raises(SpectraError, match=r"checkpoint-2|truncated|size"):  # listed explicitly: an error, one line
        trace(str(root / "base"), [str(run / "checkpoint-2"), str(run / "checkpoint-4")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint-N folders"):
        trace(str(root / "base"), [str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="mix"):
        trace(str(root / "base"), [str(folders["full"] / "checkpoint-2"), str(folders["lora"] / "checkpoint-4")])


def test_checkpoint_of_another_model_is_left_out(runs, tmp_path):
    root, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["full"], run)
    other = {n: torch.zeros(3, 3) for n in NAMES}  # another architecture: nothing pairs with the base
    (run / "checkpoint-4" / "model.safetensors").unlink()
    save_file(other, run / "checkpoint-4" / "model.safetensors")
    res = trace(str(root / "base"), [str(run)])
    failed = {c["step"]: c["failed"] for c in res.checkpoints}
    assert "does not pair with the base" in failed[4] and not failed[2] and not failed[6]
    assert all(m["points"][1].get("skip") == failed[4] for m in res.matrices)
    assert all("skip" not in m["points"][2] for m in res.matrices)


def test_resume_gives_the_uninterrupted_result(runs, tmp_path):
    root, folders = runs
    for method in ("full", "lora"):
        out = tmp_path / method
        whole = trace(str(root / "base"), [str(folders[method])], out_dir=out, plots=False)
        journal = out / "trace_journal.jsonl"
        lines = journal.read_text().splitlines()
        journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # killed mid-write after one record
        again = trace(str(root / "base"), [str(folders[method])], out_dir=out, resume=True, plots=False)
        assert again.matrices == whole.matrices
    with pytest.raises(ConfigError, match="different inputs or options"):
        trace(str(root / "base"), [str(folders["full"])], out_dir=tmp_path / "full", resume=True, config=TraceConfig(top_k=3))


def test_cli_and_report(runs, tmp_path):
    root, folders = runs
    group = type(main)(commands=[trace_cmd])
    out = CliRunner().invoke(group, ["trace", str(root / "base"), str(folders["lora"]), "--out", str(tmp_path / "o"), "--top-k", "2",
                                     "--no-plots"])
    assert out.exit_code == 0, out.output
    assert "rank[0.9] first" in out.stdout and "q_proj" in out.stdout
    path = tmp_path / "o" / "trace.json"
    doc = json.loads(path.read_text())
    html = section_html(path, doc)
    assert "<h2>Trace" in html and "<script" not in html
    assert any("effective rank" in f.text for f in findings(path, doc))
    assert load_trace(tmp_path / "o").matrices == doc["matrices"]
    bad = CliRunner().invoke(group, ["trace", str(root / "base"), str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "no such file or folder" in bad.stderr and "Traceback" not in bad.output
