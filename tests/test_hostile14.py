"""Fourteenth round of the outside probe (docs/bad_inputs.md, "fourteenth round")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectra
from spectra.interfere import interfere
from spectra.trace import trace


def _phi3_folders(root: Path) -> dict[str, Path]:
    """base, a, b folders of a one-layer Phi-3 layout (fused qkv_proj 48×16 with 4 heads, o_proj)."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.qkv_proj.weight": torch.randn(48, 16, generator=g),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16, generator=g)}
    out = {}
    for who, scale in (("base", 0.0), ("a", 0.1), ("b", 0.2)):
        (root / who).mkdir()
        (root / who / "config.json").write_text(json.dumps({"model_type": "phi3", "num_attention_heads": 4,
                                                            "num_key_value_heads": 4, "hidden_size": 16}))
        save_file({k: v + scale * torch.randn(*v.shape, generator=g) for k, v in base.items()},
                  str(root / who / "model.safetensors"))
        out[who] = root / who
    return out


def test_commands_that_keep_fused_matrices_whole_say_so(tmp_path):
    """diff splits Phi-3's qkv_proj into q, k, v; trace and interfere analysed it whole without a word, so a
    user lining up their qkv_proj row with diff's q/k/v rows read different numbers for "the same" module."""
    f = _phi3_folders(tmp_path)
    diff = spectra.diff(str(f["base"]), str(f["a"]))
    assert sorted(m.name.rsplit(":", 1)[-1] for m in diff.modules if "qkv" in m.name) == ["k", "q", "v"]
    tr = trace(str(f["base"]), [str(f["a"]), str(f["b"])], plots=False)
    warned = {
        "trace": tr.warnings,
        "interfere": interfere(str(f["base"]), [str(f["a"]), str(f["b"])], plots=False).warnings,
        "compare": spectra.compare(str(f["a"]), str(f["b"]), base=str(f["base"]), plots=False).warnings,
    }
    for command, warnings in warned.items():
        said = [w for w in warnings if "fused" in w]
        assert len(said) == 1, (command, warnings)
        assert f"analysed whole by {command}" in said[0] and "qkv_proj" in said[0] and "(q, k, v)" in said[0]
    # the whole matrix's spectrum is what trace reports: float64 reference on the stored tensors
    from safetensors.torch import load_file

    W0 = load_file(str(f["base"] / "model.safetensors"))["model.layers.0.self_attn.qkv_proj.weight"].double()
    W1 = load_file(str(f["a"] / "model.safetensors"))["model.layers.0.self_attn.qkv_proj.weight"].double()
    ref = np.linalg.svd((W1 - W0).numpy(), compute_uv=False)
    (m,) = [m for m in tr.matrices if m["name"].endswith("qkv_proj.weight")]
    assert np.isclose(m["points"][0]["fro_norm"], np.sqrt(np.sum(ref**2)), rtol=1e-6)
    assert np.isclose(m["points"][0]["spectral_norm"], ref[0], rtol=1e-6)


def test_no_fused_warning_without_fused_matrices(tmp_path):
    f = _phi3_folders(tmp_path)
    from spectra.interfere import InterfereConfig

    cfg = InterfereConfig(include="o_proj")
    assert not [w for w in interfere(str(f["base"]), [str(f["a"]), str(f["b"])], config=cfg, plots=False).warnings if "fused" in w]


# ---- the command line ---------------------------------------------------------------------------------
def _run(*args: str):
    from click.testing import CliRunner

    from spectra_cli.main import main

    return CliRunner().invoke(main, list(args))


def _qkv_pair(root: Path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "k_proj", "v_proj")]
    b = {n: torch.randn(8, 8, generator=g) for n in names}
    save_file(b, str(root / "b.safetensors"))
    save_file({n: v + 0.1 * torch.randn(8, 8, generator=g) for n, v in b.items()}, str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors")


def test_demo_refuses_a_folder_holding_files_it_did_not_write(tmp_path):
    """spectra demo --out DIR replaced a user's model copied to DIR/checkpoints/full, exit 0, no word."""
    from spectra.errors import ConfigError
    from spectra.training_inputs import DEMO_MARK, claim_demo_folder

    mine = tmp_path / "mine" / "checkpoints" / "full"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_bytes(b"user's weights")
    res = _run("demo", "--synthetic", "--quick", "--out", str(tmp_path / "mine"))
    assert res.exit_code == 1 and "did not write" in res.output and "Traceback" not in res.output
    assert (mine / "model.safetensors").read_bytes() == b"user's weights"
    assert not (tmp_path / "mine" / DEMO_MARK).exists()
    for ok in ("empty", "marked", "old_demo"):  # an empty folder, the demo's own (marked, or made before the mark)
        (tmp_path / ok).mkdir()
    (tmp_path / "marked" / DEMO_MARK).write_text("")
    (tmp_path / "marked" / "results.json").write_text("{}")
    (tmp_path / "old_demo" / "checkpoints" / "data").mkdir(parents=True)
    (tmp_path / "old_demo" / "checkpoints" / "data" / "source_train.txt").write_text("prose")
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "summary.json").write_text("{}")  # a common name: not the demo's sign
    with pytest.raises(ConfigError, match="did not write"):
        claim_demo_folder(tmp_path / "users")
    # (a mark that names no kind, beside a diff's results and no summary: a synthetic demo's)
    for ok, kind in (("new", "training"), ("empty", "training"), ("marked", "synthetic"), ("old_demo", "training")):
        claim_demo_folder(tmp_path / ok, kind)
        assert (tmp_path / ok / DEMO_MARK).is_file()


def test_output_paths_expand_the_home_folder_and_refuse_a_dash(tmp_path, monkeypatch):
    """A quoted '~/res' made a folder named '~' in the current folder (inputs expanded it); '--out -' made a
    folder named '-' and `report -o -` an HTML file named '-'."""
    b, t = _qkv_pair(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = _run("diff", b, t, "--out", "~/res", "--no-plots")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "home" / "res" / "results.json").is_file() and not (tmp_path / "~").exists()
    for args in (("diff", b, t, "--out", "-"), ("report", str(tmp_path / "home" / "res"), "-o", "-")):
        res = _run(*args)
        assert res.exit_code == 2 and "not standard output" in res.output
    assert not (tmp_path / "-").exists()


def test_option_values_are_shown_and_combined_as_given(tmp_path):
    b, t = _qkv_pair(tmp_path)
    res = _run("diff", b, t, "-t", "1.0000001")  # was "Got 1 instead": a value inside the range it refused
    assert res.exit_code == 1 and "Got 1.0000001 instead" in res.output
    res = _run("diff", b, t, "--nproc", "10000000", "--plan")  # 44 s and 1.7 GiB to plan
    assert res.exit_code == 2 and "--nproc" in res.output
    res = _run("diff", b, t, "--approx", "--method", "svd")  # every matrix was sketched; config said svd
    assert res.exit_code == 1 and "does not apply with approx" in res.output
    res = _run("diff", b, t, "--plan", "--out", str(tmp_path / "p"), "--report")
    assert res.exit_code == 0 and "--plan runs nothing and writes nothing; --out, --report apply to the run" in res.output
    # --include twice: the first pattern was dropped without a word; one regex must say "either"
    res = _run("diff", b, t, "--include", "q_proj", "--include", "k_proj", "--json", "--no-plots")
    assert res.exit_code == 2 and "given 2 times" in res.output and "'q_proj|k_proj'" in res.output
    res = _run("sweep", "--base", b, "--data", b, "--out", str(tmp_path / "s"), "--ranks", "8,x")
    assert res.exit_code == 2 and "--ranks" in res.output and "--seeds" not in res.output


def test_the_same_path_given_twice_is_named(tmp_path):
    b, _ = _qkv_pair(tmp_path)
    res = _run("diff", b, b)
    assert res.exit_code == 3 and "the same path was given as both" in res.output
    (tmp_path / "phi").mkdir()
    f = _phi3_folders(tmp_path / "phi")
    r = interfere(str(f["base"]), [str(f["a"]), str(f["a"]), str(f["b"])], plots=False)
    assert sum("are the same checkpoint" in w for w in r.warnings) == 1


def test_trace_refuses_to_write_a_checkpoint_folder_into_the_run_it_traces(tmp_path):
    """-o runs/checkpoint-3 was accepted; every later trace of runs (its own --resume too) listed it as an
    unreadable checkpoint."""
    f = _phi3_folders(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    for step, who in ((1, "a"), (2, "b")):
        (runs / f"checkpoint-{step}").symlink_to(f[who], target_is_directory=True)
    res = _run("trace", str(f["base"]), str(runs), "-o", str(runs / "checkpoint-3"), "--no-plots")
    assert res.exit_code == 1 and "inside the run folder" in res.output and not (runs / "checkpoint-3").exists()
    assert _run("trace", str(f["base"]), str(runs), "-o", str(tmp_path / "tr"), "--no-plots").exit_code == 0


# ---- stops and earlier runs' files --------------------------------------------------------------------
def test_a_new_run_removes_an_earlier_runs_outputs_before_writing_its_own(tmp_path):
    """A compare, interfere or esd stopped while writing, in a folder an earlier run of it had filled, left the
    new JSON beside the earlier run's CSV and figures (of other inputs)."""
    from spectra.io.files import remove_earlier_outputs

    out = tmp_path / "o"
    out.mkdir()
    for name in ("compare.json", "compare.csv", "phi_grids.png", "report.html", "mine.png", "interfere_cosine.png"):
        (out / name).write_text("earlier")
    (out / "linked.csv").symlink_to(out / "mine.png")
    names = ("compare.json", "compare.csv", "phi_grids.png", "report.html", "linked.csv")
    remove_earlier_outputs(out, "interfere.json", "spectra.interfere/1", ("compare.csv",), ("*.png",))  # no interfere here
    remove_earlier_outputs(out, "compare.json", "spectra.compare/1", names, ("interfere_*.png",))  # not spectra's compare.json
    assert len(list(out.iterdir())) == 7
    (out / "compare.json").write_text('{\n "schema": "spectra.compare/1",\n "a": "x"}')
    remove_earlier_outputs(out, "compare.json", "spectra.compare/1", names, ("interfere_*.png",))
    assert sorted(p.name for p in out.iterdir()) == ["linked.csv", "mine.png"]  # the user's file and a link stay


def test_commands_clear_their_earlier_outputs(tmp_path, monkeypatch):
    """The three commands call the clearing before their first write; their files all go when asked to."""
    f = _phi3_folders(tmp_path)
    from spectra.esd_run import esd
    from spectra.io import files

    seen = []

    def spy(out, marker, *args):
        seen.append(marker)
        files.remove_earlier_outputs(out, marker, *args)

    for module in ("spectra.comparison", "spectra.interfere", "spectra.esd_run"):
        monkeypatch.setattr(f"{module}.remove_earlier_outputs", spy)
    for name, run in (("compare", lambda o: spectra.compare(str(f["a"]), str(f["b"]), base=str(f["base"]), out_dir=o)),
                      ("interfere", lambda o: interfere(str(f["base"]), [str(f["a"]), str(f["b"])], out_dir=o)),
                      ("esd", lambda o: esd(str(f["a"]), out_dir=o))):
        o = tmp_path / f"out_{name}"
        run(o)
        stale = o / "report.html"
        stale.write_text("an earlier run's report")
        run(o)
        assert not stale.exists(), name
    # compare and interfere clear as their journal starts and again as they save (saving is public: a result saved alone)
    assert seen == ["compare.json"] * 4 + ["interfere.json"] * 4 + ["esd.json", "esd.json"]


def test_an_output_folder_removed_mid_run_is_not_sent_to_resume(tmp_path):
    import errno

    from spectra.errors import output_error

    err = output_error(tmp_path / "gone" / "results.jsonl", OSError(errno.ENOENT, "No such file or directory"))
    assert "removed during the run" in str(err) and "--resume" not in str(err) and "disk space" not in str(err)


def test_trace_of_lora_checkpoints_on_a_fused_matrix_says_so(tmp_path):
    """The warning above was given for full checkpoints only; a run of LoRA checkpoints on qkv_proj said nothing."""
    f = _phi3_folders(tmp_path)
    g = torch.Generator().manual_seed(5)
    run = tmp_path / "run"
    for step in (10, 20):
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["qkv_proj"], "base_model_name_or_path": str(f["base"])}))
        prefix = "base_model.model.model.layers.0.self_attn.qkv_proj"
        save_file({f"{prefix}.lora_A.weight": torch.randn(2, 16, generator=g), f"{prefix}.lora_B.weight": torch.randn(48, 2, generator=g)},
                  str(ck / "adapter_model.safetensors"))
    res = trace(str(f["base"]), [str(run)], plots=False)
    assert res.matrices and [w for w in res.warnings if "1 fused matrix (e.g." in w and "analysed whole by trace" in w]


# ---- tied heads, storage precisions, renamed modules (probe of round 14, second part) ---------------------
def test_recommend_finds_the_renames_of_a_base_given_by_a_relative_path(tmp_path, monkeypatch):
    """A diff run as `spectra diff llava_base llava_tuned` (relative paths, the usual way) made recommend read
    no config.json (its resolved path was "outside" the unresolved folder): rank_pattern keys in the stored
    names, which PEFT ignored under transformers 5's renamed modules."""
    import transformers as T

    monkeypatch.chdir(tmp_path)
    for tag, seed in (("base", None), ("tuned", 1)):
        torch.manual_seed(0)
        vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=16, patch_size=8)
        tc = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
        m = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=63))
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    if p.ndim == 2:
                        p.add_(1e-2 * torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g))
        m.save_pretrained(f"llava_{tag}")
    assert _run("diff", "llava_base", "llava_tuned", "-o", "d", "--no-plots").exit_code == 0
    res = _run("recommend", "d/results.json", "-e", "0.5")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    keys = list(cfg["rank_pattern"]) + list(cfg.get("alpha_pattern", {}))
    assert keys and all(not k.startswith("language_model.") for k in keys), keys
    assert any(k.startswith("model.language_model.") for k in keys), keys


def test_a_bf16_base_tuned_and_saved_in_float32_is_an_update_not_rounding_noise(tmp_path):
    """Changes below one bf16 step of a bf16 base, saved in float32 (fp32 master weights), are the update:
    they were called rounding noise, and recommend refused ("nothing to adapt")."""
    from spectra.numerics import numeric_flags

    g = torch.Generator().manual_seed(0)
    W = (0.02 * torch.randn(128, 96, generator=g)).bfloat16()
    update = 1e-5 * torch.randn(128, 4, generator=g) @ torch.randn(4, 96, generator=g)
    tuned = W.float() + update
    codes = [n.code for n in numeric_flags(W, tuned, tuned - W.float(), base_dtype="bfloat16", tuned_dtype="float32")]
    assert "rounding_level" not in codes
    (note,) = [n for n in numeric_flags(W, tuned, tuned - W.float(), base_dtype="bfloat16", tuned_dtype="float32")
               if n.code == "precision_mismatch"] or [None]
    assert note is None or "if TUNED was made from a float32 original" in note.message
    # the other way round, the tuned side was rounded when saved: still rounding noise
    base32 = W.float() + 1e-3 * torch.randn(128, 96, generator=g) * W.float().abs()  # off the bf16 grid
    t16 = base32.bfloat16()
    codes = [n.code for n in numeric_flags(base32, t16, t16.float() - base32, base_dtype="float32", tuned_dtype="bfloat16")]
    assert "rounding_level" in codes


def test_the_subnormal_note_gives_the_flush_effect_itself(tmp_path):
    """fp16 weights with 0.2% subnormals, half the entries moved 2 ulps: the note said flushing would change
    ΔW by 'up to 15%' where it changes it by 0.02% (both sides' subnormals of an entry mostly cancel)."""
    from spectra.numerics import SUBNORMAL_EFFECT, numeric_flags

    g = torch.Generator().manual_seed(1)
    b = (0.02 * torch.randn(256, 128, generator=g)).half()
    move = (torch.rand(256, 128, generator=g) < 0.5)
    t = torch.where(move, torch.nextafter(torch.nextafter(b, b * 0), b * 0), b)  # two steps towards zero
    d = t.double() - b.double()
    tiny = torch.finfo(torch.float16).tiny
    ftz = lambda x: torch.where(x.double().abs() < tiny, 0.0, x.double())  # noqa: E731
    exact = float(torch.linalg.norm((ftz(t) - ftz(b)) - d) / torch.linalg.norm(d))
    notes = [n for n in numeric_flags(b, t, d.float(), base_dtype="float16", tuned_dtype="float16") if n.code == "subnormal"]
    if exact >= SUBNORMAL_EFFECT:
        (note,) = notes
        assert f"{exact:.1%}" in note.message
    else:
        assert not notes, (exact, notes[0].message)


def test_a_tied_head_stored_under_its_own_name_is_not_a_second_row(tmp_path):
    """A tied model saved with lm_head.weight stored too (torch.save of its state dict) gave the embedding's
    update twice in diff (two rows, one update) and recommend budgeted it twice; a base that stores its
    tied head was told its head's update "is not measured"."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    base = tiny_llama(tie=True)
    base.save_pretrained(tmp_path / "base")  # tied: no lm_head.weight stored
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert "lm_head.weight" not in sd
    g = torch.Generator().manual_seed(2)
    tuned = {k: v + 1e-2 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in sd.items()}
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"].clone()
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    res = spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned"))
    names = [m.name for m in res.modules]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    (skip,) = [s for s in res.skipped if s["name"] == "lm_head.weight"]
    assert "tied to model.embed_tokens.weight" in skip["reason"]
    (emb,) = [m for m in res.modules if m.name == "model.embed_tokens.weight"]
    d = tuned["model.embed_tokens.weight"].double() - sd["model.embed_tokens.weight"].double()
    assert np.isclose(emb.fro_norm, float(torch.linalg.norm(d)), rtol=1e-6)
    # the other way round: the base stores its tied head, the tuned does not: nothing is unmeasured
    back = spectra.diff(str(tmp_path / "tuned"), str(tmp_path / "base"))
    assert not [w for w in back.warnings if "is not measured" in w]
    assert [m.name for m in back.modules if m.role == "embed"] == ["model.embed_tokens.weight"]


def test_compare_of_a_resized_vocabulary_says_which_rows_it_compares(tmp_path):
    """compare of fine-tunes that added tokens compared the 64 shared rows (right numbers) without the note
    spectra diff gives."""
    from conftest import tiny_llama

    base = tiny_llama(vocab=64)
    base.save_pretrained(tmp_path / "base")
    for who, seed in (("a", 1), ("b", 2)):
        m = tiny_llama(vocab=64)
        m.resize_token_embeddings(72)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    p.add_(1e-2 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / who)
    res = spectra.compare(str(tmp_path / "a"), str(tmp_path / "b"), base=str(tmp_path / "base"), plots=False)
    (emb,) = [m for m in res.modules if m.name == "model.embed_tokens.weight"]
    assert emb.out == 64 and "rows differ (base 64, tuned 72" in (emb.note or "")
    assert all("rows differ" not in (m.note or "") for m in res.modules if m.role not in ("embed", "head"))
