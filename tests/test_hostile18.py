"""Eighteenth round of the outside probe (docs/bad_inputs.md, "eighteenth round")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from tests.pair_util import small_pair
from tests.train_util import tiny_llama


def _llama_like(root: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(16, 16, generator=g) / 4
            for i in range(2) for m in ("q_proj", "v_proj")}


def test_compare_warns_of_an_update_larger_than_the_base_given(tmp_path):
    """Two fine-tunes of one base compared against another base of the same shapes: diff, trace and
    interfere warn that ‖ΔW‖/‖W_base‖ is above 1 ("is it a fine-tune of this base?"); compare said nothing
    and reported amplification and intruders against weights the checkpoints were never tuned from."""
    W, other = _llama_like(tmp_path, 0), _llama_like(tmp_path, 1)
    g = torch.Generator().manual_seed(2)
    for name in ("a", "b"):
        save_file({n: w + 0.02 * torch.randn(16, 16, generator=g) for n, w in W.items()}, str(tmp_path / f"{name}.safetensors"))
    save_file(W, str(tmp_path / "base.safetensors"))
    save_file(other, str(tmp_path / "other.safetensors"))
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    wrong = spectra.compare(a, b, base=str(tmp_path / "other.safetensors"))
    rels = {who: float(np.median([
        float(torch.linalg.vector_norm(tuned[n].double() - other[n].double()) / torch.linalg.vector_norm(other[n].double()))
        for n in W])) for who, tuned in (("A", load_file(a)), ("B", load_file(b)))}
    assert min(rels.values()) > 1
    for who, rel in rels.items():
        assert any(w.startswith(f"{who} (") and f"median ‖ΔW‖/‖W_base‖ is {rel:.2f}" in w for w in wrong.warnings), wrong.warnings
    right = spectra.compare(a, b, base=str(tmp_path / "base.safetensors"))
    assert not any("larger than the base" in w for w in right.warnings)


def test_compare_of_two_copies_of_one_fine_tune_says_so(tmp_path):
    """`compare la la` warned "A and B are the same checkpoint"; `compare la la_copy` (cp -r) said nothing and
    its findings read as two runs that agree perfectly (φ = 1 everywhere)."""
    W = _llama_like(tmp_path, 0)
    g = torch.Generator().manual_seed(3)
    save_file(W, str(tmp_path / "base.safetensors"))
    (tmp_path / "a").mkdir()
    save_file({n: w + 0.05 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in W.items()},
              str(tmp_path / "a" / "model.safetensors"))
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    res = spectra.compare(str(tmp_path / "a"), str(tmp_path / "a_copy"), base=str(tmp_path / "base.safetensors"))
    assert any("same norm, to 12 digits, on every one of the 4 compared modules" in w for w in res.warnings)
    same = spectra.compare(str(tmp_path / "a"), str(tmp_path / "a"), base=str(tmp_path / "base.safetensors"))
    assert sum("same checkpoint" in w or "same norm" in w for w in same.warnings) == 1  # said once
    (tmp_path / "b").mkdir()
    save_file({n: w + 0.05 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in W.items()},
              str(tmp_path / "b" / "model.safetensors"))
    other = spectra.compare(str(tmp_path / "a"), str(tmp_path / "b"), base=str(tmp_path / "base.safetensors"))
    assert not any("same norm" in w for w in other.warnings)


def test_interfere_of_two_copies_of_one_fine_tune_says_so(tmp_path):
    """interfere warned of a task path given twice, not of the same fine-tune copied to a second folder."""
    from spectra.interfere import interfere

    W = _llama_like(tmp_path, 0)
    g = torch.Generator().manual_seed(4)
    save_file(W, str(tmp_path / "base.safetensors"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({n: w + 0.05 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in W.items()},
                  str(tmp_path / name / "model.safetensors"))
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    tasks = [str(tmp_path / d) for d in ("a", "b", "a_copy")]
    res = interfere(str(tmp_path / "base.safetensors"), tasks, plots=False)
    copies = [w for w in res.warnings if "same norm, to 12 digits" in w]
    assert len(copies) == 1 and "every one of the 4 matrices" in copies[0], res.warnings
    names = res.names
    assert copies[0].startswith(f"tasks {names[0]} and {names[2]} ")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_ww_compatible_rows_are_weightwatchers_on_moe_models(tmp_path, arch):
    """transformers >= 5 loads per-expert weights into one stacked parameter and builds the routers as
    ...TopKRouter modules: WeightWatcher sees neither, while --ww-compatible kept them (48 experts and 2 routers,
    60 rows against WeightWatcher's 10 in the probe), so "the rows compare one to one" was false on MoE models."""
    from tests.test_esd import _compare_rows, _ww_rows

    transformers = pytest.importorskip("transformers")
    from spectra.esd_run import EsdConfig, esd

    small = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    if arch == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**small, num_local_experts=8))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **small, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=32))
    model.save_pretrained(tmp_path)
    rows = _ww_rows(model)
    res = esd(tmp_path, config=EsdConfig(ww_compatible=True, device="cpu"))
    assert {m.name for m in res.matrices} == {k + ".weight" for k in rows}
    _compare_rows(rows, res, {})
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    experts = [n for n in reasons if ".experts." in n]
    assert len(experts) == 2 * 8 * 3 and all("stacked parameter" in reasons[n] for n in experts)
    router = "model.layers.0.block_sparse_moe.gate.weight" if arch == "mixtral" else "model.layers.0.mlp.gate.weight"
    assert "not a Linear, Conv or Embedding: WeightWatcher does not see it" in reasons[router]
    # without --ww-compatible every matrix is analysed
    assert len(esd(tmp_path, config=EsdConfig(device="cpu")).matrices) > len(res.matrices) + 48


def test_cli_lines_never_carry_a_names_terminal_controls(tmp_path):
    """`spectra esd` printed tensor names and paths raw (diff escaped them): a name holding ESC [2J cleared
    the user's screen, an OSC 8 sequence made a link; now every CLI line goes through one helper."""

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x)}
    g = torch.Generator().manual_seed(5)
    evil = "model.layers.0.x\x1b[2J\x1b[31mRED\x1b]8;;http://evil\x1b\\.weight"
    W = {evil: torch.randn(30, 20, generator=g), "model.layers.0.y\x1b[31m.weight": torch.full((30, 20), float("nan")),
         "model.layers.0.ok.weight": torch.randn(30, 20, generator=g)}
    save_file(W, str(tmp_path / "b.safetensors"))
    save_file({n: w + 0.1 * torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g) for n, w in W.items()},
              str(tmp_path / "t.safetensors"))
    out = tmp_path / "o\x1b[32mx"
    for args in (["esd", str(tmp_path / "b.safetensors"), "--out", str(out / "esd")],
                 ["extract", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-r", "2", "--out",
                  str(out / "extract"), "--no-plots"],
                 ["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(out / "diff"),
                  "--no-plots"]):
        proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                              text=True, timeout=240, cwd=root, env={**env, "COLUMNS": "200"})
        text = proc.stdout + proc.stderr
        assert "Traceback" not in text, text
        assert "\x1b" not in text and "\\x1b[2J" in text, (args[0], text)


def _tiny_pair(root: Path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(6)
    W = _llama_like(root, 0)
    save_file(W, str(root / "b.safetensors"))
    T = {n: w + 0.1 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for n, w in W.items()}
    save_file(T, str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors")


def test_extract_force_deletes_only_its_own_uniform_adapters(tmp_path):
    """--force removed every folder in --out whose name began with uniform_r (a user's uniform_runs_notes/),
    and an input inside such a folder was deleted before it was read (a StopIteration traceback)."""
    from spectra.errors import ConfigError
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    base, tuned = _tiny_pair(tmp_path)
    out = tmp_path / "out"
    (out / "uniform_runs_notes").mkdir(parents=True)
    (out / "uniform_runs_notes" / "a.txt").write_text("keep")
    (out / "uniform_r7").mkdir()
    (out / "uniform_r7" / "notes.txt").write_text("keep")  # not an adapter spectra wrote
    (out / "uniform_r2").mkdir()
    for n in ("adapter_config.json", "adapter_model.safetensors"):  # what --eval writes: removed
        (out / "uniform_r2" / n).write_text("{}")
    extract(base, tuned, out, config=ExtractConfig(rank=2), plots=False, force=True)
    assert (out / "uniform_runs_notes" / "a.txt").read_text() == "keep"
    assert (out / "uniform_r7" / "notes.txt").read_text() == "keep"
    assert not (out / "uniform_r2").exists() and (out / "adapter_model.safetensors").is_file()
    inner = out / "uniform_r3"
    inner.mkdir()
    moved = inner / "t.safetensors"
    moved.write_bytes(Path(tuned).read_bytes())
    with pytest.raises(ConfigError, match="lies in .*uniform_r3, the folder where --eval writes"):
        extract(base, str(moved), out, config=ExtractConfig(rank=2), plots=False, force=True)
    assert moved.is_file()
    # --force into a folder that does not exist yet (the demo does it): nothing to delete (review of this round)
    extract(base, tuned, tmp_path / "fresh", config=ExtractConfig(rank=2), plots=False, force=True)
    assert (tmp_path / "fresh" / "adapter_model.safetensors").is_file()


def test_extract_says_an_unchanged_embedding_is_unchanged(tmp_path):
    """An unchanged embedding was listed as not extracted with "embedding: pass --embeddings to extract it",
    as if part of the update were left behind."""
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig
    from spectra.extract_results import UNCHANGED

    base, tuned = _tiny_pair(tmp_path)
    W, T = load_file(base), load_file(tuned)
    emb = torch.randn(40, 16, generator=torch.Generator().manual_seed(7))
    W["model.embed_tokens.weight"] = T["model.embed_tokens.weight"] = emb
    W["model.embed_tokens2.weight"] = emb.clone()
    T["model.embed_tokens2.weight"] = emb + 0.01
    W["lm_head.weight"] = emb.clone()  # a resized vocabulary: 4 rows added, the shared rows unchanged
    T["lm_head.weight"] = torch.cat([emb, torch.ones(4, 16)])
    save_file(W, base)
    save_file(T, tuned)
    res = extract(base, tuned, tmp_path / "o", config=ExtractConfig(rank=2), plots=False)
    reasons = {r["name"]: r["reason"] for r in res.not_extracted}
    assert reasons["model.embed_tokens.weight"] == UNCHANGED == "unchanged (ΔW = 0): nothing to extract"
    assert "--embeddings" in reasons["model.embed_tokens2.weight"], reasons  # a changed one keeps the advice
    # equal over the rows both share, yet not unchanged: a LoRA cannot add the new rows (review of this round)
    assert reasons["lm_head.weight"] != UNCHANGED and "rows" in reasons["lm_head.weight"], reasons


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess[str]:

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x), **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", *args], capture_output=True,
                          text=True, timeout=240, cwd=root, env=env, **kw)


def test_single_file_outputs_replace_only_their_own_regular_files(tmp_path):
    """`report -o` and `recommend -o` renamed a new file over a FIFO, a symbolic link or a device node (as
    root, `-o /dev/full` replaced the machine's /dev/full) and over model files the protected list missed
    (special_tokens_map.json, preprocessor_config.json), exit 0."""

    from spectra.errors import ConfigError
    from spectra.io.files import refuse_replacing
    from spectra.recommend import is_recommended_config
    from spectra.report import is_report, write_report

    base, tuned = small_pair(tmp_path)
    res = tmp_path / "res"
    spectra.diff(base, tuned, out_dir=res, plots=False)
    os.mkfifo(tmp_path / "fifo.html")
    (tmp_path / "real.html").write_text("<p>mine</p>")
    (tmp_path / "link.html").symlink_to(tmp_path / "real.html")
    for target in ("fifo.html", "link.html"):
        with pytest.raises(ConfigError, match="is a (FIFO|symbolic link): spectra writes a new file"):
            write_report([str(res)], tmp_path / target)
    assert (tmp_path / "fifo.html").is_fifo() and (tmp_path / "link.html").is_symlink()
    with pytest.raises(ConfigError, match="is a device"):
        refuse_replacing("/dev/null", (".json",), option="-o")
    with pytest.raises(ConfigError, match="exists and is not a file this command writes"):
        write_report([str(res)], tmp_path / "real.html")  # an .html spectra did not write
    assert (tmp_path / "real.html").read_text() == "<p>mine</p>"
    ours = write_report([str(res)], tmp_path / "r.html")
    assert is_report(ours) and write_report([str(res)], ours) == ours  # its own report: replaced
    for name in ("special_tokens_map.json", "preprocessor_config.json", "notes.json"):
        (tmp_path / name).write_text('{"pad_token": "<pad>"}')
        proc = _cli(["recommend", str(res), "-o", str(tmp_path / name)])
        assert proc.returncode != 0 and "is not a file this command writes" in proc.stderr and "Traceback" not in proc.stderr
        assert (tmp_path / name).read_text() == '{"pad_token": "<pad>"}'
    assert _cli(["recommend", str(res), "-o", str(tmp_path / "lora.json")]).returncode == 0
    assert is_recommended_config(tmp_path / "lora.json")
    assert _cli(["recommend", str(res), "-o", str(tmp_path / "lora.json")]).returncode == 0  # its own: replaced


def test_paths_too_long_or_looping_are_one_line(tmp_path):
    """A path component over 255 bytes (OSError ENAMETOOLONG) and an --out that is a symbolic link loop
    (pathlib's RuntimeError) ended in tracebacks."""
    base, tuned = small_pair(tmp_path)
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    long = str(tmp_path / ("y" * 300))
    for args in (["diff", base, long], ["report", str(tmp_path), "-o", long + ".html"],
                 ["extract", base, tuned, "-r", "1", "-o", str(tmp_path / "loop1")]):
        proc = _cli(args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and ("longer than the file system allows" in lines[0] or "loop" in lines[0].lower()), proc.stderr


def test_train_force_never_deletes_a_model_no_run_wrote(tmp_path):
    """`train --force` into a folder holding a downloaded model (config.json, model.safetensors, no
    train_config.json) replaced its weights: --force is for an earlier run's files."""
    from spectra.errors import ConfigError
    from spectra.training_inputs import check_out

    base, tuned = small_pair(tmp_path)
    out = tmp_path / "downloaded"
    out.mkdir()
    (out / "model.safetensors").write_bytes(Path(tuned).read_bytes())
    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds .*which no spectra train run wrote"):
        check_out(out, base=tmp_path / "base_folder", inputs=[], force=True)
    (out / "train_config.json").write_text("{}")  # an earlier run's folder: --force may clear it
    check_out(out, base=tmp_path / "base_folder", inputs=[], force=True)
    # sweep --force over a folder whose full/ holds a copied model: refused before anything is deleted
    from spectra.training import sweep

    runs = tmp_path / "runs"
    (runs / "full").mkdir(parents=True)
    (runs / "full" / "model.safetensors").write_bytes(Path(tuned).read_bytes())
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    with pytest.raises(ConfigError, match="full holds model.safetensors, which no spectra train run wrote"):
        sweep(str(tmp_path / "base_folder"), str(tmp_path / "data.txt"), str(runs), methods=["full"], ranks=[], force=True, steps=1)
    assert (runs / "full" / "model.safetensors").read_bytes() == Path(tuned).read_bytes()


def test_a_terminal_reporting_zero_columns_still_gets_the_results(tmp_path):
    """COLUMNS=0 on a terminal: rich printed nothing (no table, no findings, no warnings), exit 0."""

    base, tuned = small_pair(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "COLUMNS": "0", "TERM": "xterm",
           "PYTHONPATH": os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x)}
    master, slave = os.openpty()  # stdout and stderr a terminal, as a user's
    proc = subprocess.Popen([sys.executable, "-c", "from spectra_cli.main import run; run()", "diff", base, tuned, "--no-plots"],
                            stdout=slave, stderr=slave, cwd=root, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=240) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "Rank needed for" in text and "2 matrices in" in text, text


def test_an_empty_output_path_is_a_usage_error(tmp_path):
    """`recommend -o ""` took the empty path for "not given": exit 0, nothing written where asked."""
    base, tuned = small_pair(tmp_path)
    spectra.diff(base, tuned, out_dir=tmp_path / "res", plots=False)
    proc = _cli(["recommend", str(tmp_path / "res"), "-o", ""])
    assert proc.returncode == 1 and "error: --out must name a file. Got '' instead" in proc.stderr and "Traceback" not in proc.stderr


def test_ww_compatible_keeps_a_fused_matrix_transformers_chunks_into_linears(tmp_path):
    """nomic-bert's stored Wqkv is chunked on load into Linear q/k/v, which WeightWatcher sees: the first
    --ww-compatible mend took every converter for a stacked parameter and dropped it (review of this round)."""
    import json

    transformers = pytest.importorskip("transformers")
    from spectra.esd_run import EsdConfig, esd

    cfg = transformers.AutoConfig.for_model("nomic_bert", num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                            intermediate_size=128, vocab_size=100).to_dict()
    cfg["architectures"] = ["NomicBertModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    save_file({"encoder.layers.0.attn.Wqkv.weight": torch.randn(192, 64, generator=g),
               "encoder.layers.0.attn.out_proj.weight": torch.randn(64, 64, generator=g),
               "encoder.layers.0.mlp.fc11.weight": torch.randn(128, 64, generator=g),
               "encoder.layers.0.mlp.fc2.weight": torch.randn(64, 128, generator=g)}, str(tmp_path / "model.safetensors"))
    res = esd(tmp_path, config=EsdConfig(ww_compatible=True, device="cpu"))
    assert "encoder.layers.0.attn.Wqkv.weight" in {m.name for m in res.matrices}, res.skipped
    assert not any("WeightWatcher does not see it" in s["reason"] for s in res.skipped)


def test_an_update_and_its_negation_are_not_called_copies(tmp_path):
    """Task negation (B's update = −A's, exactly) has A's norm on every matrix: interfere called the two
    "copies of one fine-tune" while it measured cosine −1 (review of this round)."""
    from spectra.interfere import interfere

    g = torch.Generator().manual_seed(8)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    W = {n: torch.randint(-8, 8, (16, 16), generator=g).float() for n in names}  # exact ± in float32
    D = {n: (torch.randint(-2, 3, (16, 2), generator=g) @ torch.randint(-2, 3, (2, 16), generator=g)).float() / 4 for n in names}
    save_file(W, str(tmp_path / "base.safetensors"))
    for name, sign in (("a", 1), ("neg", -1)):
        save_file({n: W[n] + sign * D[n] for n in names}, str(tmp_path / f"{name}.safetensors"))
    res = interfere(str(tmp_path / "base.safetensors"), [str(tmp_path / "a.safetensors"), str(tmp_path / "neg.safetensors")],
                    plots=False)
    assert all(m["fro"][0] == m["fro"][1] and m["cosine"][0][1] == pytest.approx(-1) for m in res.modules)
    assert not any("copies of one fine-tune" in w for w in res.warnings), res.warnings
    both = spectra.compare(str(tmp_path / "a.safetensors"), str(tmp_path / "neg.safetensors"),
                           base=str(tmp_path / "base.safetensors"))
    said = [w for w in both.warnings if "same norm" in w]
    assert len(said) == 1 and "or one the negation of the other" in said[0]  # compare's measures are blind to sign


def test_trace_takes_each_checkpoints_loss_from_its_own_state(tmp_path):
    """Two runs written into one output_dir: every checkpoint's loss was looked up in the histories merged
    newest-first, so checkpoint-2 and -4 got the second run's losses (5.39, 4.96 for their own 5.46, 5.31),
    without a word; a checkpoint of another model that failed still supplied its log."""
    import json

    from spectra.trace import TraceConfig, trace

    base, tuned = small_pair(tmp_path)
    run = tmp_path / "run"

    def ckpt(step: int, history: list[tuple[int, float]]) -> None:
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(Path(tuned).read_bytes())
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"step": s, "loss": v} for s, v in history]}))

    ckpt(2, [(2, 5.4604)])
    ckpt(4, [(2, 5.4604), (4, 5.3081)])
    ckpt(6, [(2, 5.3926), (4, 4.9623), (6, 4.5)])  # a second run into the same folder
    res = trace(base, [str(run)], config=TraceConfig(), plots=False)
    assert [(c["step"], c["loss"]) for c in res.checkpoints] == [(2, 5.4604), (4, 5.3081), (6, 4.5)]
    assert any("log different training losses at step 2 (5.46 and 5.393)" in w for w in res.warnings), res.warnings


def test_tracker_names_matrices_as_a_checkpoint_stores_them_under_ddp(tmp_path):
    """A tracker given the DDP-wrapped model named every matrix `module.model.…`: a filter written against the
    stored names matched nothing ("found no matrix"), and its names differed from `spectra trace` of the run."""
    pytest.importorskip("transformers")
    from spectra.callbacks import SpectraTracker
    from spectra.trace import TraceConfig

    model = tiny_llama()

    class DistributedDataParallel(torch.nn.Module):  # a stand-in (the real one needs a process group): the model as `module`
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    tracker = SpectraTracker(DistributedDataParallel(model), every=1, out_dir=None, config=TraceConfig(include=r"^model\.layers\.1\.self_attn\.q"))
    assert [t.name for t in tracker.matrices] == ["model.layers.1.self_attn.q_proj.weight"]


def test_spectra_train_traces_the_step_it_saves(tmp_path):
    """`spectra train --steps 7 --trace-every 5` measured step 5 only while the saved adapter is step 7: the
    report said "At step 5 (the only checkpoint)" and "1 checkpoints (steps 5–5)"."""
    import json

    pytest.importorskip("transformers")
    import pydoc_data.topics as topics

    from spectra.report_trace import section_html
    from spectra.trace import load_trace
    from spectra.training import TrainConfig, train

    tiny_llama().save_pretrained(tmp_path / "base")
    (tmp_path / "data.txt").write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:20_000])
    train(TrainConfig(base=str(tmp_path / "base"), data=str(tmp_path / "data.txt"), out=str(tmp_path / "run"), method="lora",
                      rank=2, steps=7, batch=2, seq_len=32, eval_every=7, eval_batches=1, trace_every=5, device="cpu"))
    res = load_trace(tmp_path / "run" / "trace.jsonl")
    assert [c["step"] for c in res.checkpoints] == [5, 7]
    logged = {json.loads(line)["step"]: json.loads(line)["train_loss"]
              for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines() if "train_loss" in line}
    assert res.checkpoints[-1]["loss"] == pytest.approx(logged[7])  # the loss the run logged at that step
    page = section_html(tmp_path / "run" / "trace.jsonl", res.to_dict())
    assert "2 checkpoints (steps 5–7)" in page


def test_a_trainer_callback_trace_shows_the_logged_loss_at_each_checkpoint():
    """The Trainer callback writes its matrix records with loss null (on_step_end has none) and the Trainer's
    logs as {"log": …} lines: the report's checkpoint table showed "–" at every step."""
    from spectra.trace import result_from_records

    point = {"energy_rank": {"0.9": 1}, "fro_norm": 1.0}
    records = [{"header": {"kind": "full", "config": {"thresholds": [0.9]}}},
               {"log": {"step": 2, "loss": 5.535}}, {"log": {"step": 4, "loss": 5.1}},
               *({"kind": "full", "step": s, "loss": None, "matrix": {"name": "q.weight", "shape": [4, 4]}, "point": point}
                 for s in (2, 4))]
    res = result_from_records(records)
    assert [(c["step"], c["loss"]) for c in res.checkpoints] == [(2, 5.535), (4, 5.1)]
