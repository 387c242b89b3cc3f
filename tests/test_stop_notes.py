"""What a stop says was kept: one wording for a clean stop and a hard exit (spectra_cli.main.kept_on_stop,
the ``stop_note`` of ``spectra train`` and ``sweep``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import click
import pytest

from spectra_cli.main import kept_on_stop, main


def _kept(args: list[str], since: float | None) -> str:
    ctx = click.Context(main)
    ctx.meta["spectra.args"] = args
    return kept_on_stop(main, ctx, since=since)


def test_train_stop_note_names_the_partial_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    started = time.time() - 1
    assert _kept(["train", "--base", "b", "--data", "d", "--out", str(out)], started) == f"no adapter was saved; nothing was written into {out}"
    (out / "train_log.jsonl").write_text("{}\n")
    (out / "train_config.json").write_text("{}")
    note = _kept(["train", "--base", "b", "--data", "d", "--method", "full", "-o", str(out)], started)
    assert note.startswith("no model was saved; train_config.json, train_log.jsonl in ") and "rerun with --force" in note
    assert "nothing was kept" not in note
    # files older than the run are an earlier run's, not this one's
    os.utime(out / "train_log.jsonl", (started - 100, started - 100))
    os.utime(out / "train_config.json", (started - 100, started - 100))
    assert "nothing was written" in _kept(["train", "--base", "b", "--data", "d", "-o", str(out)], started)


def test_sweep_stop_note_lists_finished_runs_in_run_order(tmp_path):
    out = tmp_path / "sweep"
    started = time.time() - 10
    for i, name in enumerate(["full_s0", "lora8_s0"]):
        (out / name).mkdir(parents=True)
        (out / name / "train_summary.json").write_text("{}")
        os.utime(out / name / "train_summary.json", (started + 5 - i, started + 5 - i))  # lora8 first
    (out / "lora64_s0").mkdir()  # started, not finished
    note = _kept(["sweep", "--base", "b", "--data", "d", "--out", str(out)], started)
    assert note.startswith(f"the finished runs (lora8_s0, full_s0) are in {out}; sweep.json and the analyses were not written")


def test_other_commands_keep_their_wording(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.jsonl").write_text('{"module": {"name": "x"}}\n')  # a result was journaled
    assert "run the same command with --resume" in _kept(["diff", "a", "b", "--out", str(tmp_path / "o")], None)


def test_a_hard_exit_words_what_exists_at_that_moment(tmp_path):
    """The message of a second signal is asked when it comes (the log written meanwhile), not at the start."""
    out = tmp_path / "run"
    out.mkdir()
    script = textwrap.dedent(f"""
        import pathlib, signal, time
        import click
        from spectra_cli.main import _StopSignals, kept_on_stop, main
        ctx = click.Context(main)
        ctx.meta["spectra.args"] = ["train", "--base", "b", "--data", "d", "--out", {str(out)!r}]
        started = time.time() - 1
        stop = _StopSignals(30.0, lambda: kept_on_stop(main, ctx, since=started))
        pathlib.Path({str(out / "train_log.jsonl")!r}).write_text("{{}}\\n")  # written after the start
        stop._seen(signal.SIGTERM)
        time.sleep(0.5)  # later than a copy of the same stop (spectra_cli.main.DUPLICATE_S)
        stop._seen(signal.SIGTERM)  # the second: ends the process at once
        print("not reached")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 143, res.stderr
    assert "not reached" not in res.stdout
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped at once (a second stop signal): no adapter was saved; train_log.jsonl in ")
    assert "nothing was kept" not in line


def _raise_behind(interrupt: BaseException | None):
    def fake_diff(*args, **kwargs):
        # what threading.Condition.wait leaves when the stop is raised inside it: the lock released,
        # the `with` around it failing on the way out, the stop as that error's context
        try:
            if interrupt is not None:
                raise interrupt
            raise ValueError("not a stop")
        except BaseException:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904
    return fake_diff


def test_a_stop_raised_inside_a_wait_is_still_the_stop(tmp_path, monkeypatch):
    """CI once saw a SIGTERM under coreutils timeout end in a traceback and exit 1: the handler's
    exception was raised inside a future's wait and came out as a RuntimeError carrying it."""
    from click.testing import CliRunner

    import spectra
    from spectra_cli.main import Terminated

    for f in ("b.safetensors", "t.safetensors"):
        (tmp_path / f).write_bytes(b"")
    args = ["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o"), "--no-plots"]
    for interrupt, code, said in ((Terminated(), 143, "stopped by SIGTERM"), (KeyboardInterrupt(), 130, "stopped by Ctrl-C")):
        monkeypatch.setattr(spectra, "diff", _raise_behind(interrupt))
        result = CliRunner().invoke(main, args)
        assert result.exit_code == code, result.output
        assert said in result.output and "Traceback" not in result.output
    # the same error with no stop behind it is a crash, shown as one
    monkeypatch.setattr(spectra, "diff", _raise_behind(None))
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, RuntimeError) and "un-acquired" in str(result.exception)


def test_an_error_raised_while_stopping_is_not_hidden_as_the_stop(tmp_path, monkeypatch):
    """Only the released-lock error carries the stop; a bug in cleanup during a stop stays an error."""
    from click.testing import CliRunner

    import spectra
    from spectra_cli.main import Terminated

    def fake_diff(*args, **kwargs):
        try:
            raise Terminated()
        finally:
            {}["journal"]  # noqa: B018 - a cleanup that fails while the stop is on its way

    for f in ("b.safetensors", "t.safetensors"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setattr(spectra, "diff", fake_diff)
    result = CliRunner().invoke(main, ["diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--no-plots"])
    assert isinstance(result.exception, KeyError) and "stopped by" not in result.output


# SIGHUP too (a terminal closed while the command loads), and under `python -m spectra` (argv[0] is spectra/__main__.py):
# that ended by the signal without the line
@pytest.mark.parametrize("sig, argv0", [("SIGTERM", "spectra"), ("SIGHUP", "spectra"),
                                        ("SIGHUP", os.path.join("x", "spectra", "__main__.py"))])
def test_sigterm_while_the_command_starts_says_nothing_was_written(sig, argv0):
    """SIGTERM during the imports (before the command's handler) ended the process without a word."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.argv = [{argv0!r}]
        class SignalAtClick:  # the signal arrives while the command imports its libraries
            def find_spec(self, name, path, target=None):
                if name == "click":
                    os.kill(os.getpid(), signal.{sig})
                return None
        sys.meta_path.insert(0, SignalAtClick())
        import spectra_cli
        print("imported")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    code_wanted = 128 + getattr(signal, sig)
    assert proc.returncode == code_wanted and proc.stderr.strip() == f"stopped by {sig} while starting: nothing was written", proc.stderr
    assert "imported" not in proc.stdout
