"""The outside probe's tenth round: what the ninth left found but not mended, and what the tenth found.

Each test fails on the code before the round (4f3aadc) and passes now (docs/bad_inputs.md, "tenth round"),
but three guards that pass on both: the end-to-end run under coreutils ``timeout`` (the stop path the
unit test of a doubled signal exercises), the labels of the linear-time rewrite against the pairwise
rule (the fix is of time, which no test asserts), and a one-sided selection compare must not refuse
(a regression of this round's own refusal, found by its review).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from rich.table import Table

from spectra.errors import ConfigError
from spectra_cli.main import main

NAMES = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _pair(tmp_path, names=NAMES, *, zero_base=()):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    b = {n: (torch.zeros(16, 16) if n in zero_base else torch.randn(16, 16, generator=g)) for n in names}
    t = {n: v + 0.1 * torch.randn(16, 16, generator=g) for n, v in b.items()}
    t2 = {n: v + 0.1 * torch.randn(16, 16, generator=g) for n, v in t.items()}
    for name, d in (("b", b), ("t", t), ("t2", t2)):
        save_file(d, str(tmp_path / f"{name}.safetensors"))
    return [tmp_path / f"{n}.safetensors" for n in ("b", "t", "t2")]


def _last_line(res) -> str:
    return res.output.strip().splitlines()[-1]


# ---- an empty selection is a failure in every command ------------------------------------------------------
def test_compare_and_trace_refuse_filters_that_leave_nothing(tmp_path):
    """diff, esd and extract exited 1; compare and trace printed an empty table and exited 0."""
    b, t, t2 = _pair(tmp_path)
    for args in (["compare", t, t2, "--base", b, "--layers", "99"], ["compare", t, t2, "--base", b, "--include", "nomatch"],
                 ["trace", b, t, t2, "--include", "nomatch"], ["trace", b, t, t2, "--layers", "7"]):
        res = _cli(*args)
        assert res.exit_code == 1, (args, res.output)
        assert "no matrix is left by --" in _last_line(res) and "Traceback" not in res.output


def test_trace_of_adapters_refuses_filters_that_leave_nothing(tmp_path):
    import peft
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    for i in (1, 2):
        m = peft.get_peft_model(T.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        m.save_pretrained(tmp_path / f"checkpoint-{i}")
    res = _cli("trace", tmp_path / "base", tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", "--include", "nomatch")
    assert res.exit_code == 1 and "no matrix is left by --include 'nomatch'" in _last_line(res), res.output
    assert "modules the first adapter updates" in _last_line(res)


def test_esd_names_its_matrices_without_pairs(tmp_path):
    b, _, _ = _pair(tmp_path)
    res = _cli("esd", b, "--include", "nomatch")
    assert res.exit_code == 1 and "none of the 4 matrices passes" in _last_line(res), res.output


# ---- tables on narrow terminals keep every digit ---------------------------------------------------------
def _table() -> Table:
    table = Table(title="t")
    for col in ("module", "layer", "r_A", "φ(right)", "random", "B in A", "best r_A", "A in B", "amp A", "amp B", "intr A"):
        table.add_column(col, justify="left" if col == "module" else "right")
    table.add_row("model.layers.0.self_attn.qkv_proj:q", "0", "8", "0.512", "0.500", "0.398", "1.000", "0.028", "0.21",
                  "1.48", "0")
    return table


@pytest.mark.parametrize("width", [200, 100, 80, 60, 30])
def test_tables_never_cut_a_number(width):
    """At 80 columns every number of compare's table read "0.…"; at 60 the qkv parts of diff all read
    "qkv_pro…". Now numbers keep their digits at any width and names fold (or, too narrow even for
    that, each row becomes a block of ``column: value`` lines)."""
    from spectra_cli.console import print_table

    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    print_table(console, _table())
    text = console.export_text()
    assert "…" not in text
    for value in ("0.512", "0.500", "0.398", "1.000", "0.028", "0.21", "1.48"):
        assert value in text, (width, text)
    assert "qkv_proj:q" in text.replace("\n", "").replace("│", "").replace(" ", "")
    assert max(len(line) for line in text.splitlines()) <= width


# ---- training and evaluation options ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as T

    root = tmp_path_factory.mktemp("h10train")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    T.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    import pydoc_data.topics as topics

    (root / "data.txt").write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:6_000], encoding="utf-8")
    return root


def _train(tiny, tmp_path, *extra):
    return _cli("train", "--base", tiny / "base", "--data", tiny / "data.txt", "--steps", "1", "--batch", "1", "--seq-len", "16",
                "--eval-every", "1", "--trace-every", "0", "--device", "cpu", "-o", tmp_path / "run", *extra)


@pytest.mark.parametrize("extra, words", [
    (["--rank", str(2**63 - 1)], "--rank 9223372036854775807 is above min(out, in) of every matrix it adapts (at most 32 here)"),
    (["--rank", "10" * 15], "is above min(out, in)"),
    (["--batch", "100000000000000000000"], "--batch 100000000000000000000 × --seq-len 16 is more tokens per step than"),
    (["--alpha", "1e308"], "lower --alpha"),
])
def test_train_options_beyond_reason_are_one_line_that_names_them(tiny, tmp_path, extra, words):
    """--rank 2^63: "Storage size calculation overflowed" traceback; 10^30: blamed on --targets;
    --batch 1e20: a torch.randint traceback with C++ frames (a batch larger than the data's blocks is still
    allowed: blocks are drawn with replacement); --alpha 1e308: "the base model's loss is
    not finite on this data" (its loss is finite: the LoRA scale overflows)."""
    res = _train(tiny, tmp_path, *extra)
    assert res.exit_code == 1, res.output
    assert words in _last_line(res) and "Traceback" not in res.output
    assert "base model's loss is not finite" not in res.output


def test_sweep_rank_beyond_the_model_names_the_rank(tiny, tmp_path):
    res = _cli("sweep", "--base", tiny / "base", "--data", tiny / "data.txt", "--methods", "lora", "--ranks", "1" + "0" * 24,
               "--steps", "1", "--batch", "1", "--seq-len", "16", "--device", "cpu", "-o", tmp_path / "sw")
    assert res.exit_code == 1 and "is above min(out, in)" in _last_line(res) and "--targets" not in _last_line(res), res.output


def test_huge_read_limits_read_the_whole_file(tmp_path):
    """extract --eval-blocks 1e20 (or --eval-seq-len) asked f.read() for 1e20 bytes: OverflowError."""
    from spectra.training_inputs import read_text_prefix

    f = tmp_path / "a.txt"
    f.write_text("hello world\n" * 10, encoding="utf-8")
    assert read_text_prefix(f, 10**20) == ("hello world\n" * 10, True)
    assert read_text_prefix(f, 5) == ("hello", False)


def test_a_data_folder_reads_its_jsonl_and_refuses_a_model_folder(tmp_path, tiny):
    """A folder read its .json files as text and skipped its .jsonl files; a model folder given as data
    (or as --eval) was read as its config and tokenizer JSON."""
    from spectra.errors import SpectraError
    from spectra.training_inputs import read_examples

    d = tmp_path / "data"
    d.mkdir()
    (d / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f" A{i}"}) + "\n" for i in range(3)))
    (d / "notes.txt").write_text("plain text\n")
    ex = read_examples(d)
    assert ("Q0?", " A0") in ex and ("", "plain text\n") in ex and len(ex) == 4
    with pytest.raises(SpectraError, match="is a model folder"):
        read_examples(tiny / "base")


# ---- recommend, --explain, identical inputs, messages --------------------------------------------------------
def test_recommend_refuses_a_task_type_peft_does_not_know(tmp_path):
    """recommend wrote task_type "BOGUS" into its LoraConfig (peft.LoraConfig raises on it); extract refused it."""
    from spectra.recommend import recommend

    b, t, _ = _pair(tmp_path)
    assert _cli("diff", b, t, "-o", tmp_path / "d").exit_code == 0
    with pytest.raises(ConfigError, match="--task-type must be none or one of CAUSAL_LM"):
        recommend(tmp_path / "d", task_type="BOGUS")
    res = _cli("recommend", tmp_path / "d", "--task-type", "BOGUS")
    assert res.exit_code == 1 and "--task-type must be" in _last_line(res)
    assert recommend(tmp_path / "d", task_type="SEQ_CLS").config["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize("cmd", ["diff", "compare"])
def test_explain_with_json_prints_json(cmd):
    for args in ([cmd, "--explain", "--json"], [cmd, "--json", "--explain"]):
        res = _cli(*args)
        assert res.exit_code == 0
        doc = json.loads(res.output)
        assert "module" in doc["columns"] and doc["notes"]
    assert not _cli(cmd, "--explain").output.lstrip().startswith("{")


def test_trace_refuses_a_checkpoint_listed_twice_and_compare_warns_of_one_input_twice(tmp_path):
    b, t, t2 = _pair(tmp_path)
    res = _cli("trace", b, t, tmp_path / "." / "t.safetensors")
    assert res.exit_code == 1 and "is listed twice" in _last_line(res), res.output
    res = _cli("compare", t, tmp_path / "." / "t.safetensors", "--base", b)
    assert res.exit_code == 0 and "A and B are the same checkpoint" in res.output


def test_option_messages_name_the_option(tmp_path):
    b, t, _ = _pair(tmp_path)
    res = _cli("diff", b, t, "-t", "1e-400")
    assert res.exit_code == 1 and "a value below 5e-324, the smallest float, which reads as 0" in _last_line(res) and "[0.0]" not in res.output
    res = _cli("diff", b, t, "--device", "tpu")
    assert res.exit_code == 1 and "--device must be auto, cpu, cuda or cuda:N" in _last_line(res)


def test_a_zero_base_matrix_says_why_its_relative_norm_is_null(tmp_path):
    import spectra

    b, t, _ = _pair(tmp_path, zero_base=(NAMES[0],))
    mods = {m.name: m for m in spectra.diff(str(b), str(t)).modules}
    assert mods[NAMES[0]].rel_norm is None and "W_base is all zero" in mods[NAMES[0]].note
    assert mods[NAMES[1]].rel_norm == pytest.approx(
        np.linalg.norm(mods[NAMES[1]].fro_norm) / mods[NAMES[1]].base_fro_norm) and "W_base" not in mods[NAMES[1]].note


# ---- stops -------------------------------------------------------------------------------------------------
def test_one_stop_delivered_twice_is_one_stop(tmp_path):
    """coreutils timeout signals the command and then its process group: the second copy, microseconds
    later, ended the run at once ("a second stop signal") instead of letting it flush its results."""
    script = """
import signal, sys, time
from spectra_cli.main import _StopSignals
stop = _StopSignals(30.0, "kept")
stop._seen(signal.SIGTERM)
stop._seen(signal.SIGTERM)  # the same stop, delivered again at once
print("still running", stop.count, flush=True)
time.sleep(0.4)
stop._seen(signal.SIGTERM)  # a later one is a second stop
print("not reached")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "still running 1" in res.stdout and "not reached" not in res.stdout
    assert res.returncode == 143 and "stopped at once (a second stop signal)" in res.stderr


def test_sweep_stop_note_lists_what_was_written(tmp_path):
    """A sweep stopped during its last step said "sweep.json and the analyses were not written" with
    every analysis on disk."""
    from spectra_cli.training import sweep_cmd

    _sweep_stop_note = sweep_cmd.stop_note  # what a stopped sweep says (spectra_cli.main.kept_on_stop)

    since = time.time() - 5
    (tmp_path / "lora2").mkdir()
    (tmp_path / "lora2" / "train_summary.json").write_text("{}")
    (tmp_path / "analysis" / "diff_lora2").mkdir(parents=True)
    (tmp_path / "analysis" / "diff_lora2" / "results.json").write_text("{}")
    note = _sweep_stop_note({"out_dir": str(tmp_path)}, since)
    assert "finished runs (lora2)" in note and "finished analyses (diff_lora2)" in note
    assert note.endswith("sweep.json was not written (rerun with the same options and --resume to finish the sweep, keeping "
                         "what is finished; --force deletes the finished runs and starts again)")
    (tmp_path / "sweep.json").write_text("{}")
    assert "were written" in _sweep_stop_note({"out_dir": str(tmp_path)}, since)


def test_timeout_of_a_running_diff_stops_it_cleanly(tmp_path):
    """The whole path under coreutils timeout (it forwards a SIGTERM to the command and to its group):
    the stop of SIGTERM with the journal kept, not "stopped at once"."""
    from conftest import wait_for_journal
    from safetensors.torch import save_file

    if not os.path.exists("/usr/bin/timeout"):
        pytest.skip("no coreutils timeout")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2000)]
    b = {n: torch.randn(96, 96, generator=g) for n in names}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file({n: v + 0.1 for n, v in b.items()}, str(tmp_path / "t.safetensors"))
    proc = subprocess.Popen(["/usr/bin/timeout", "600", sys.executable, "-m", "spectra", "diff", str(tmp_path / "b.safetensors"),
                             str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o"), "--no-plots"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_journal(proc, tmp_path / "o" / "results.jsonl", lines=3)
        proc.terminate()  # to timeout, which sends it on twice
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "stopped at once" not in err and "stopped by SIGTERM" in err


# ---- the same number in different places (probe B) ------------------------------------------------------
def test_a_threshold_is_shown_with_every_digit_it_has(tmp_path):
    """-t 0.995 was titled "Rank needed for 100% of ΔW's energy" in the table, findings, heatmap and report."""
    from spectra.display import tau_percent

    assert [tau_percent(t) for t in (0.995, 0.9, 0.899, 1.0, 0.5)] == ["99.5%", "90%", "89.9%", "100%", "50%"]
    b, t, _ = _pair(tmp_path)
    res = _cli("diff", b, t, "-t", "0.995", "-t", "1.0", "-o", tmp_path / "d", "--report")
    assert res.exit_code == 0, res.output
    assert "99.5% of ΔW's energy" in res.output and "for 100% of ΔW" not in res.output
    html = (tmp_path / "d" / "report.html").read_text()
    assert "99.5%" in html and "for 100% of" not in html


def test_alpha_keeps_the_side_of_its_flag_when_rounded():
    """α = 1.99697, flagged over-trained, read "2.00" in the esd table, its heatmap and its legend."""
    from spectra.esd import alpha_text

    assert alpha_text(1.99697) == "1.997" and alpha_text(6.0004) == "6.0004" and alpha_text(3.14159) == "3.14"
    assert alpha_text(2.0) == "2.00" and alpha_text(None) == "–"
    for a in np.linspace(1.99, 2.01, 41).tolist() + np.linspace(5.99, 6.01, 41).tolist():
        shown = float(alpha_text(a))
        assert (shown < 2) == (a < 2) and (shown > 6) == (a > 6), a


def _compare_two_shapes(tmp_path):
    """Two unrelated dense updates of q_proj (64×64) and k_proj (16×64): every module at chance."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base, a, b = {}, {}, {}
    for i in range(6):
        for m, rows in (("q_proj", 64), ("k_proj", 16)):
            n = f"model.layers.{i}.self_attn.{m}.weight"
            base[n] = torch.randn(rows, 64, generator=g)
            a[n] = base[n] + 0.1 * torch.randn(rows, 64, generator=g)
            b[n] = base[n] + 0.1 * torch.randn(rows, 64, generator=g)
    for name, d in (("base", base), ("a", a), ("b", b)):
        save_file(d, str(tmp_path / f"{name}.safetensors"))
    from spectra.comparison import CompareConfig, compare

    return compare(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), base=str(tmp_path / "base.safetensors"),
                   config=CompareConfig(top_k=4))


def test_compare_measures_each_module_against_its_own_random_baseline(tmp_path):
    """The findings divided the median captured energy by the median baseline of all shapes (0.81× for
    updates at chance) and the heatmap drew one mark for all: k_proj cells looked 1.6× above random."""
    from spectra.compare_findings import compare_findings, random_two_sided
    from spectra.plots.compare import captured_heatmap

    res = _compare_two_shapes(tmp_path)
    ratios = [m.captured["b_in_a"].two_sided / random_two_sided(m.rank_a, m.out, m.in_) for m in res.modules]
    captured = next(f for f in compare_findings(res) if f.topic == "captured")
    assert captured.numbers["median_ratio_to_random"] == pytest.approx(float(np.median(ratios)))
    assert 0.85 < captured.numbers["median_ratio_to_random"] < 1.2  # at chance, by construction
    fig = captured_heatmap(res)
    labels = " ".join(t.get_text() for ax in fig.axes for t in ax.get_xticklabels())
    assert f"random {16 / 4096:.2g}" in labels and f"random {16 / 1024:.2g}" in labels


def test_an_adapter_is_reported_in_layer_order(tmp_path):
    """Its modules came out in the file's key order: layer 10 before layer 2."""
    from safetensors.torch import save_file

    import spectra

    g = torch.Generator().manual_seed(0)
    base, ad = {}, {}
    for i in range(12):
        n = f"model.layers.{i}.self_attn.q_proj"
        base[n + ".weight"] = torch.randn(32, 32, generator=g)
        ad[f"base_model.model.{n}.lora_A.weight"] = torch.randn(2, 32, generator=g)
        ad[f"base_model.model.{n}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    (tmp_path / "ad").mkdir()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ad, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    for args in ((str(tmp_path / "base.safetensors"), str(tmp_path / "ad")), (str(tmp_path / "ad"),)):
        assert [m.layer for m in spectra.diff(*args).modules] == list(range(12))


def test_the_lora_r_column_shows_the_ranks_layers_have(tmp_path):
    """r = 2 in some layers and 8 in others showed "LoRA r 5", a rank no matrix has."""
    from spectra.results import DiffResult

    res = DiffResult.from_dict(json.loads(_rank_pattern_results(tmp_path).read_text()))
    row = next(r for r in res.summary_records() if r["module"] == "q_proj")
    assert row["lora_r_range"] == (2, 8)
    out = _cli("diff", tmp_path / "ad").output
    assert "2–8" in out and "│      5 │" not in out


def _rank_pattern_results(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ad, pattern = {}, {}
    for i in range(4):
        r = 2 if i < 2 else 8
        n = f"model.layers.{i}.self_attn.q_proj"
        ad[f"base_model.model.{n}.lora_A.weight"] = torch.randn(r, 32, generator=g)
        ad[f"base_model.model.{n}.lora_B.weight"] = torch.randn(32, r, generator=g)
        pattern[f"model.layers.{i}.self_attn.q_proj"] = r
    (tmp_path / "ad").mkdir()
    save_file(ad, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": pattern,
         "task_type": "CAUSAL_LM"}))
    assert _cli("diff", tmp_path / "ad", "-o", tmp_path / "d").exit_code == 0
    return tmp_path / "d" / "results.json"


def test_report_of_esd_and_compare_names_their_inputs(tmp_path):
    """An esd report had no findings and "–" for its model and matrix count; a compare report showed the
    base under "base / A" and never named A."""
    import re

    b, t, t2 = _pair(tmp_path)
    assert _cli("esd", t, "-o", tmp_path / "e", "--no-plots").exit_code == 0
    assert _cli("compare", t, t2, "--base", b, "-o", tmp_path / "c", "--no-plots").exit_code == 0
    assert _cli("report", tmp_path / "e", tmp_path / "c", "-o", tmp_path / "r.html").exit_code == 0
    html = (tmp_path / "r.html").read_text()
    overview = html[html.index("<h2>Overview</h2>"):]
    rows = re.findall(r"<tr>(.*?)</tr>", overview[:overview.index("</table>")], re.S)
    cells = {re.findall(r"<td>(.*?)</td>", r)[0]: re.findall(r"<td>(.*?)</td>", r) for r in rows[1:]}
    assert cells["esd"][2].endswith("/t.safetensors") and cells["esd"][4] == "4"
    assert cells["compare"][2].endswith("/t.safetensors") and cells["compare"][3].endswith("/t2.safetensors")
    found = html[html.index('<section id="findings">'):html.index("<h2>Overview</h2>")]
    assert "esd: " in found and "Median α over 4 matrices" in found


# ---- resources and scale (probe A) ---------------------------------------------------------------------
def test_labels_of_many_paths_match_the_pairwise_rule():
    """Labelling compared every pair of module paths (8k Switch-style ``experts.expert_N`` paths: 26 s for
    ``inspect``); one count per suffix must give the same labels."""
    import random

    from spectra.naming import module_labels

    def pairwise(rel_paths):  # the rule as written before: a suffix is a label when no other path ends in it
        paths = sorted(set(rel_paths))
        split = {p: p.split(".") for p in paths}
        out = {}
        for p in paths:  # (no vague leaf such as "layer" among the words below: every label starts at the leaf)
            comps = split[p]
            for n in range(1, len(comps) + 1):
                if not comps[-n].isdigit() and not any(q != p and split[q][-n:] == comps[-n:] for q in paths):
                    break
            out[p] = ".".join(comps[-n:])
        return out

    rng = random.Random(0)
    words = ["attn", "mlp", "c_proj", "q", "0", "2", "block", "router", "experts", "w1", "dense", "output"]
    for _ in range(300):
        paths = [".".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 12))]
        assert module_labels(paths) == pairwise(paths), paths


def test_the_spectra_figure_shows_at_most_twenty_module_kinds(tmp_path):
    from safetensors.torch import save_file

    import spectra
    from spectra.plots.diff import MAX_KINDS, spectra_figure

    g = torch.Generator().manual_seed(0)
    b = {f"model.layers.0.block.m{k}.weight": torch.randn(8, 8, generator=g) for k in range(30)}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file({n: v + 0.1 * torch.randn(8, 8, generator=g) for n, v in b.items()}, str(tmp_path / "t.safetensors"))
    res = spectra.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert len({m.module for m in res.modules}) == 30
    fig = spectra_figure(res)
    assert len(fig.axes) <= 2 * MAX_KINDS + 1 and f"the {MAX_KINDS} of 30 module kinds" in fig._suptitle.get_text()


def test_results_json_is_rewritten_less_often_when_a_rewrite_is_slow(tmp_path):
    """Each rewrite serialises every record so far; at 16k matrices (5 s a save) a rewrite every 5 s made
    the run mostly rewriting."""
    from spectra.journal import REWRITE_COST_FACTOR, REWRITE_EVERY_S, Journal

    class Doc:
        saves = 0

        def save_json(self, path):
            Doc.saves += 1

    j = Journal(tmp_path)
    tmp_path.joinpath("results.jsonl").write_text("")
    j.last, j.save_s = time.monotonic() - REWRITE_EVERY_S - 1, (REWRITE_EVERY_S + 2) / REWRITE_COST_FACTOR
    j.add(Doc(), None, _skip())
    assert Doc.saves == 0  # 6 s since the last, but the last took 0.9 s: not before 7.2 s
    j.save_s = 0.01
    j.add(Doc(), None, _skip())
    assert Doc.saves == 1


def _skip():
    from spectra.pairing import Skipped

    return Skipped("x.weight", "1-D")


def test_out_of_memory_is_one_line_that_keeps_the_journal(tmp_path, monkeypatch):
    """A pair larger than the memory left ended in a RuntimeError traceback from torch's allocator."""
    import spectra
    from spectra.errors import out_of_memory

    b, t, _ = _pair(tmp_path)

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 576000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(spectra, "diff", no_memory)
    res = _cli("diff", b, t, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "error: out of memory: an allocation of 549.3 MiB failed" in _last_line(res)
    assert out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == \
        "out of memory: an allocation of 2.00 GiB failed"
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(MemoryError()) is not None
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 300 bytes")) == \
        "out of memory: an allocation of 300 B failed"


def test_report_reads_a_folder_of_any_depth(tmp_path):
    """``report DIR`` walked it with rglob: RecursionError on a folder ~1000 levels deep."""
    b, t, _ = _pair(tmp_path)
    assert _cli("diff", b, t, "-o", tmp_path / "r" / "d", "--no-plots").exit_code == 0
    levels = [str(tmp_path / "r" / "n")]
    for _ in range(1100):  # one mkdir per level: mkdir(parents=True) and rmtree recurse too
        os.mkdir(levels[-1])
        levels.append(levels[-1] + "/d")
    try:
        res = _cli("report", tmp_path / "r", "-o", tmp_path / "r.html")
    finally:
        for level in reversed(levels[:-1]):
            os.rmdir(level)
    assert res.exit_code == 0, res.output
    assert "Overview" in (tmp_path / "r.html").read_text()


def test_moe_rules_say_when_transformers_helper_failed(monkeypatch):
    """A transformers whose conversion helper raised fell back to spectra's tables without a word."""
    pytest.importorskip("transformers.conversion_mapping")
    from transformers import conversion_mapping

    from spectra.peft_moe import peft_moe_rules

    def broken(model_type):
        raise TypeError("changed signature")

    assert "raised" not in peft_moe_rules("phimoe").source
    monkeypatch.setattr(conversion_mapping, "get_checkpoint_conversion_mapping", broken)
    rules = peft_moe_rules("phimoe")  # fused, and converted by no PEFT release
    assert "get_checkpoint_conversion_mapping raised TypeError" in rules.source and rules.experts_dropped


# ---- review of the round ---------------------------------------------------------------------------------
def test_a_filter_that_leaves_only_one_sided_modules_is_not_an_empty_selection(tmp_path):
    """compare A B --include v_proj with v_proj updated by B only: "only in B" (not "no matrix is left", which is
    not what happened); since the nineteenth round a one-line error, exit 1, as two inputs sharing no module are."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    a = {n: v + (0.1 * torch.randn(16, 16, generator=g) if "q_proj" in n else 0) for n, v in base.items()}
    b = {n: v + 0.1 * torch.randn(16, 16, generator=g) for n, v in base.items()}
    for name, d in (("base", base), ("a", a), ("b", b)):
        save_file(d, str(tmp_path / f"{name}.safetensors"))
    res = _cli("compare", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--base", tmp_path / "base.safetensors",
               "--include", "v_proj", "--allow-identical")  # A's v_proj is zero: exit 3 without the flag
    assert res.exit_code == 0 and "no matrix is left" not in res.output, res.output
    assert "2 modules compared" in res.output  # full checkpoints: A's v_proj is a zero update, not one-sided
    for name, mods in (("ad_a", ("q_proj",)), ("ad_b", ("q_proj", "v_proj"))):  # adapters: v_proj only in B
        (tmp_path / name).mkdir()
        save_file({f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{x}.weight": torch.randn(*shape, generator=g)
                   for i in range(2) for m in mods for x, shape in (("A", (2, 16)), ("B", (16, 2)))},
                  str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(mods), "task_type": "CAUSAL_LM"}))
    res = _cli("compare", tmp_path / "ad_a", tmp_path / "ad_b", "--include", "v_proj")
    assert res.exit_code == 1 and "no matrix is left" not in res.output, res.output
    assert "only matrices one input holds (2 only in B" in res.output


def test_a_table_of_prose_keeps_its_columns_on_a_narrow_terminal():
    """--plan's right column is text: taken for numbers it forced every row into ": value" blocks at 80 columns."""
    from spectra_cli.console import print_table

    table = Table(show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("estimated time", "0.1 s (slowest rank: read+ΔW 0.0 s, decompositions 0.0 s)")
    table.add_row("calibration", "cpu, float64: Gram 12.8 G mult-adds/s, eigensolve 5.50 G p³/s, read+ΔW 1 MB/s")
    console = Console(width=80, record=True, color_system=None)
    print_table(console, table)
    text = console.export_text()
    assert "│ estimated time" in text and "\n  : " not in text and max(len(x) for x in text.splitlines()) <= 80


def test_an_adapter_on_a_zero_base_matrix_says_why_its_relative_norm_is_null(tmp_path):
    from safetensors.torch import save_file

    import spectra

    g = torch.Generator().manual_seed(0)
    n = "model.layers.0.self_attn.q_proj"
    save_file({n + ".weight": torch.zeros(16, 16)}, str(tmp_path / "base.safetensors"))
    (tmp_path / "ad").mkdir()
    save_file({f"base_model.model.{n}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"base_model.model.{n}.lora_B.weight": torch.randn(16, 2, generator=g)}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    m = spectra.diff(str(tmp_path / "base.safetensors"), str(tmp_path / "ad")).modules[0]
    assert m.rel_norm is None and "W_base is all zero" in m.note
