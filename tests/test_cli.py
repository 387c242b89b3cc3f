"""The command line: outputs, exit codes and one-line errors (no tracebacks for expected cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra_cli.main import main


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(24, 16, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}
    base["model.layers.0.input_layernorm.weight"] = torch.ones(16)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_diff_writes_outputs_and_prints_table(pair, tmp_path):
    res = _run("diff", *pair, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "q_proj" in res.stdout and "rank[0.9]" in res.stdout
    assert "4 matrices" in res.stderr and "1 skipped" in res.stderr
    for f in ("results.json", "results.csv", "results.jsonl", "rank_heatmap.png", "relnorm_heatmap.png", "diff_config.json"):
        assert (tmp_path / "out" / f).is_file(), f


def test_diff_json_to_stdout(pair):
    res = _run("diff", *pair, "--json", "-t", "0.9")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema"] == "spectra.diff/1" and doc["thresholds"] == [0.9]
    assert len(doc["modules"]) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (("diff", "{d}/missing.safetensors", "{d}/tuned.safetensors"), "missing.safetensors: no such file or folder"),
        (("diff", "{d}/base.safetensors", "{d}/tuned.safetensors", "--layers", "x"), "--layers must look like"),
        (("diff", "{d}/base.safetensors", "{d}/base.safetensors"), "ΔW = 0"),
        (("diff", "{d}/base.safetensors", "{d}/garbage.safetensors"), "garbage.safetensors: header declares"),
        (("diff", "{d}/base.safetensors", "{d}/evil.bin"), "refused: loading this file would need pickle code execution"),
        (("inspect", "{d}/nothing"), "nothing: no such file or folder"),
    ],
)
def test_expected_errors_are_one_line_with_nonzero_exit(pair, args, message):
    d = pair[0].parent
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, d / "evil.bin")
    res = CliRunner().invoke(main, [a.format(d=d) for a in args])
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_identical_allowed_with_flag(pair):
    res = _run("diff", pair[0], pair[0], "--allow-identical")
    assert res.exit_code == 0 and "exactly zero" in res.stderr


def test_inspect_lists_mapping(pair):
    res = _run("inspect", pair[0], "--json")
    records = json.loads(res.stdout)
    assert {r["module"] for r in records} == {"q_proj", "v_proj"}
    assert {r["layer"] for r in records} == {0, 1}
    res = _run("inspect", pair[0], "--all")
    assert res.exit_code == 0 and "input_layernorm" in res.stdout


def test_console_script_and_module_entry_points(pair):
    """The installed `spectra` script and `python -m spectra` both run; no top-level `cli` module is installed."""
    exe = Path(sys.executable).parent / "spectra"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert "spectra" in out.stdout
    out = subprocess.run([sys.executable, "-m", "spectra", "diff", "--help"], capture_output=True, text=True, check=True)
    assert "BASE" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli'))"],
                           capture_output=True, text=True, cwd="/", check=True)
    assert probe.stdout.strip() == "None"


def test_console_script_exit_keeps_status_output_and_exit_hooks(pair, tmp_path):
    """`spectra` ends with os._exit after the command (no interpreter teardown): the command's status,
    everything printed (a large --json on a pipe), atexit hooks and non-daemon threads are kept."""
    base, tuned = pair
    hook = tmp_path / "hook.txt"
    script = (
        "import atexit, sys, threading, time\n"
        f"atexit.register(lambda: open({str(hook)!r}, 'a').write('atexit\\n'))\n"
        f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(hook)!r}, 'a').write('thread\\n'))).start()\n"
        "from spectra_cli.main import run\n"
        "sys.argv = ['spectra'] + sys.argv[1:]\n"
        "run()\n"
    )

    def spectra(*args):
        hook.unlink(missing_ok=True)
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)

    out = spectra("diff", str(base), str(tuned), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["modules"]  # the whole document reached the pipe
    assert hook.read_text().splitlines() == ["thread", "atexit"]  # the thread joined first, as the interpreter does
    out = spectra("diff", str(base), str(base))
    assert out.returncode == 3 and "error:" in out.stderr and hook.read_text().endswith("atexit\n")
    out = spectra("diff", str(base), str(tmp_path / "missing.safetensors"))
    assert out.returncode in (1, 2) and hook.read_text().endswith("atexit\n")
    out = spectra("--no-such-option")
    assert out.returncode == 2 and "No such option" in out.stderr


def test_debug_env_shows_traceback(pair, monkeypatch):
    monkeypatch.setenv("SPECTRA_DEBUG", "1")
    res = CliRunner().invoke(main, ["diff", str(pair[0].parent / "missing.safetensors"), str(pair[1])])
    assert res.exit_code != 0 and res.exception is not None and not isinstance(res.exception, SystemExit)


def test_names_with_markup_characters_are_printed_verbatim(pair, tmp_path):
    odd = tmp_path / "ckpt[v2]"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes(pair[1].read_bytes())
    res = _run("diff", pair[0], odd, "--out", tmp_path / "o[/]")
    assert res.exit_code == 0, res.output
    assert "o[/]" in res.stderr
    res = _run("inspect", odd)
    assert "ckpt[v2]" in res.stdout


# ---- issue 18: the answer in words, legends, caveats in sight; issue 13: odd names and values -----

def test_diff_prints_legend_findings_and_explains_what_was_skipped(pair, tmp_path):
    res = _run("diff", *pair, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "p = min(out, in)" in res.stdout and "spectra diff --explain" in res.stdout
    assert "Findings" in res.stdout and "of its p = 16 directions" in res.stdout and "Size:" in res.stdout
    skipped = [line for line in res.stderr.splitlines() if line.startswith("skipped:")]
    assert skipped and "1 × 1-D tensor (norm or bias)" in skipped[0] and 'results.json "skipped"' in skipped[0]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert f"in {doc['elapsed_s']:.1f} s on cpu" in res.stderr  # the report shows this same number


def test_explain_needs_no_checkpoint_and_defines_every_column():
    res = _run("diff", "--explain")
    assert res.exit_code == 0
    for col in ("p ", "rank[0.9]", "/ p", "random / p", "‖ΔW‖/‖W‖", "LoRA r", "docs/definitions.md"):
        assert col in res.stdout, col
    assert "min(out, in)" in res.stdout


def _bf16_rounding_pair(d: Path) -> tuple[Path, Path]:
    """A bf16 pair whose update is rounding noise (a 3e-3 relative jitter stored in bf16)."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": (torch.randn(64, 1024, generator=g) * 0.02).bfloat16() for i in range(2)}
    tuned = {k: (v.float() * (1 + 3e-3 * torch.randn(v.shape, generator=g))).bfloat16() for k, v in base.items()}
    save_file(base, str(d / "bf_base.safetensors"))
    save_file(tuned, str(d / "bf_tuned.safetensors"))
    return d / "bf_base.safetensors", d / "bf_tuned.safetensors"


def test_rounding_level_update_is_a_visible_warning_and_in_results_json(tmp_path):
    base, tuned = _bf16_rounding_pair(tmp_path)
    res = _run("diff", base, tuned, "--out", tmp_path / "o", "--no-plots")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and "rounding level" in warnings[-1]
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert any(w.startswith("caveat (rounding_level): ΔW is at the rounding level") and "in 2 of 2 matrices" in w
               for w in doc["warnings"])
    assert "No statement on rank" in res.stdout


def test_zero_size_matrix_on_both_sides_gives_a_table(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.q_proj.weight": torch.zeros(0, 16), "model.layers.0.k_proj.weight": torch.randn(8, 16, generator=g)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.1 for k, v in base.items()}, str(tmp_path / "t.safetensors"))
    res = _run("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--out", tmp_path / "o")
    assert res.exit_code == 0 and "k_proj" in res.stdout
    assert (tmp_path / "o" / "results.json").is_file()


def test_control_characters_in_names_never_reach_the_terminal(tmp_path):
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.\x1b[31mRED\x1b[0m\x07\x9b2J.q_proj.weight"
    base = {name: torch.randn(8, 16, generator=g), "model.layers.0.norm.\x1b]0;title\x07.weight": torch.ones(16)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / "t.safetensors"))
    for args in (("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors"),
                 ("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--json"),
                 ("inspect", tmp_path / "b.safetensors", "--all"), ("inspect", tmp_path / "b.safetensors", "--json")):
        res = _run(*args)
        assert res.exit_code == 0, res.output
        for raw in ("\x1b", "\x07", "\x9b"):
            assert raw not in res.stdout and raw not in res.stderr, (args, raw)
    assert "\\x1b[31mRED" in _run("inspect", tmp_path / "b.safetensors").stdout
    doc = json.loads(_run("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--json").stdout)
    assert doc["modules"][0]["name"] == name  # the data keeps the name as it is


def test_json_with_nan_prints_valid_json_and_warns(pair, monkeypatch):
    real = __import__("spectra").diff

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        result.modules[0].stable_rank = float("nan")
        result.modules[1].rel_norm = float("inf")
        return result

    monkeypatch.setattr("spectra.diff", poisoned)
    res = _run("diff", *pair, "--json")
    assert res.exit_code == 0

    def refuse(const):
        raise AssertionError(f"{const} in --json output")

    doc = json.loads(res.stdout, parse_constant=refuse)
    assert doc["modules"][0]["stable_rank"] is None and doc["modules"][1]["rel_norm"] is None
    assert any("NaN or infinite" in w for w in doc["warnings"])
    assert "are NaN or infinite (modules[0].stable_rank, modules[1].rel_norm): JSON output writes them as null" in res.stderr


def test_empty_out_is_refused_and_writes_nothing(pair, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    res = CliRunner().invoke(main, ["diff", str(pair[0]), str(pair[1]), "--out", ""])
    assert res.exit_code == 1
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--out must name a folder" in lines[0]
    assert list(work.iterdir()) == []


def test_progress_line_in_a_log_keeps_the_counts_and_shortens_the_name(tmp_path):
    g = torch.Generator().manual_seed(0)
    long = "model.layers.0." + "x" * 300 + ".q_proj.weight"
    base = {long: torch.randn(8, 16, generator=g), "model.layers.1.q_proj.weight": torch.randn(8, 16, generator=g)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / "t.safetensors"))
    res = _run("diff", tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    (line,) = [l for l in res.stderr.splitlines() if l.startswith("ΔW spectra")]
    assert " 2/2 " in line and " eta " in line and "…" not in line.split(" eta ")[0]
    assert len(line) <= 80 and "xxx" not in line[:25]


def test_help_is_complete_and_not_truncated():
    res = _run("--help")
    for name in ("diff", "report", "inspect"):
        (line,) = [l for l in res.stdout.splitlines() if l.strip().startswith(name + " ")]
        assert not line.rstrip().endswith("..."), line
    from spectra_cli.main import main as group

    for name in ("diff", "report", "inspect"):
        cmd = group.commands[name]
        missing = [p.name for p in cmd.params if isinstance(p, __import__("click").Option) and not p.help]
        assert missing == [], (name, missing)


def test_inspect_orders_layers_by_number(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(4, 4, generator=g) for i in range(12) for m in ("v_proj", "q_proj")}
    sd["model.embed_tokens.weight"] = torch.randn(10, 4, generator=g)
    sd["lm_head.weight"] = torch.randn(10, 4, generator=g)
    save_file(sd, str(tmp_path / "m.safetensors"))
    records = json.loads(_run("inspect", tmp_path / "m.safetensors", "--json").stdout)
    assert records[0]["name"] == "model.embed_tokens.weight" and records[-1]["name"] == "lm_head.weight"
    layered = [(r["layer"], r["module"]) for r in records if r["layer"] is not None]
    assert layered == [(i, m) for i in range(12) for m in ("q_proj", "v_proj")]


def test_cli_import_pauses_the_collector_only_while_loading():
    """Importing the command line freezes what torch and the library loaded and leaves the collector on;
    a mmap threshold the user set stays theirs (the call is skipped, nothing fails)."""
    code = ("import gc, spectra_cli\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 10000)\n")
    for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "131072"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        assert out.stdout.split() == ["True", "True"]
    # a program that turned the collector off keeps it off
    out = subprocess.run([sys.executable, "-c", "import gc; gc.disable(); import spectra_cli; print(gc.isenabled())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("args, said", [
    (["diff", "B", "T", "--out", "D"], "stopped before any result was written to D: run the command again"),
    (["extract", "B", "T", "-r", "4", "--out", "D"], "stopped before any result was written to D"),
    (["compare", "A", "B", "--out", "C"], "stopped before any result was written to C"),  # journaled: --resume
    (["interfere", "T1", "T2", "--base", "B", "--out", "C"], "stopped before any result was written to C"),
    (["diff", "B", "T"], "nothing was written (no --out)"),
    (["compare", "A", "B"], "nothing was written (no --out)"),
    (["inspect", "B"], ""),
])
def test_the_stop_message_says_what_this_command_keeps(args, said):
    """A stop names what it leaves: a journal to resume only where the command has --resume and an
    --out folder (it said "kept in the --out folder ... --resume" for compare, which has neither)."""
    from spectra_cli.main import kept_on_stop, main

    ctx = main.make_context("spectra", list(args))
    kept = kept_on_stop(main, ctx)
    assert (said in kept) if said else kept == ""
    if "--resume" not in kept:
        assert "resume" not in kept


def test_ctrl_c_while_the_command_starts_is_one_line():
    """A stop during the ~1 s of imports printed a KeyboardInterrupt traceback from inside torch."""
    import shutil
    import signal
    import time

    exe = shutil.which("spectra", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the spectra console script is not installed beside this interpreter")
    proc = subprocess.Popen([exe, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)  # inside the imports (they take ~1 s on this project's CPU)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert proc.returncode in (130, -signal.SIGINT), err  # -SIGINT: before Python installed its handler
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
