"""``spectra train``, ``spectra sweep`` and ``spectra demo``: reference runs and the offline demo."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

import click
from rich.table import Table

from spectra.config import DiffConfig
from spectra_cli.console import OutPath, given, print_table, progress_bar, quiet_transformers, shown, stderr, stdout
from spectra_cli.diff import run_diff

#: Largest seed (spectra.training_inputs.MAX_SEED: torch seeds are 64-bit); written out so that the
#: CLI's option table does not import torch.
MAX_SEED = 2**63 - 1
#: The files a training run writes before it finishes (the adapter or model comes last).
_PARTIAL_FILES = ("train_config.json", "train_log.jsonl", "trace.jsonl", "trace_first.npz")


def _positive(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A float option that must be finite and > 0 when given (click's FloatRange lets NaN through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0. Got {value} instead")
    if value is not None and param.name == "lr":  # 1e-320 is 0 in float32: nothing would train (exit 0)
        from spectra.errors import ConfigError
        from spectra.training_inputs import check_lr

        try:
            check_lr(value)
        except ConfigError as exc:
            raise click.BadParameter(exc.message.removeprefix("--lr ") + f" ({exc.hint})") from None
    return value


def _written_since(out: Path, names: tuple[str, ...], since: float | None) -> list[str]:
    """The files of ``names`` in ``out`` written at or after ``since`` (``time.time()``; None: none)."""
    found = []
    for n in names:
        try:
            if since is not None and (out / n).stat().st_mtime >= since:
                found.append(n)
        except OSError:
            continue
    return found


def _train_stop_note(params: dict, since: float | None) -> str:
    """What a stopped ``spectra train`` leaves (spectra_cli.main.kept_on_stop): the log so far, not
    "nothing was kept"."""
    out = Path(params.get("out_dir") or ".")
    partial = _written_since(out, _PARTIAL_FILES, since)
    return (f"no {'adapter' if params.get('method', 'lora') == 'lora' else 'model'} was saved; "
            + (f"{', '.join(partial)} in {out} hold the run up to the stop (rerun with --force to start again)"
               if partial else f"nothing was written into {out}"))


def _demo_stop_note(params: dict, since: float | None) -> str:
    """What a stopped ``spectra demo`` leaves: its folder (a scratch one, made for --quick / --synthetic, named)."""
    ctx = click.get_current_context(silent=True)
    scratch = ctx.find_root().meta.get("spectra.demo_out") if ctx is not None else None
    out = params.get("out_dir") or scratch or "out/demo"
    from spectra.training_inputs import DEMO_MARK

    if Path(out).is_dir() and any(f.name != DEMO_MARK for f in Path(out).iterdir()):  # the mark alone is no work done
        return f"what the demo made so far is in {out}/" + (" (a scratch folder: delete it when done)" if out == scratch else "")
    return "nothing was written"


def _sweep_stop_note(params: dict, since: float | None) -> str:
    """What a stopped ``spectra sweep`` leaves: the runs it finished, in the order they ran."""
    out = Path(params.get("out_dir") or ".")
    finished = []
    for f in out.glob("*/train_summary.json"):
        with contextlib.suppress(OSError):
            mtime = f.stat().st_mtime
            if since is not None and mtime >= since:
                finished.append((mtime, f.parent.name))
    done = [name for _, name in sorted(finished)]
    analyses = sorted(f.parent.name for pattern in ("diff_*/results.json", "compare_*/compare.json")
                      for f in (out / "analysis").glob(pattern) if f.name in _written_since(f.parent, (f.name,), since))
    if _written_since(out, ("sweep.json",), since):  # stopped after its last write: everything is there
        return f"sweep.json and every run and analysis were written to {out} before the stop"
    return ((f"the finished runs ({', '.join(done)}) are in {out}; " if done else "")
            + (f"the finished analyses ({', '.join(analyses)}) are in {out / 'analysis'}; " if analyses else "")
            + f"sweep.json{' was' if analyses else ' and the analyses were'} not written (rerun with the same options and "
              "--resume to finish the sweep, keeping what is finished; --force deletes the finished runs and starts again)")


@click.command("train", short_help="One reference fine-tune (LoRA via PEFT, or full), logged.")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder (never downloaded).")
@click.option("--data", required=True, help="Target data: a text file, a folder of text/code files, or JSONL (text, or prompt/response).")
@click.option("--method", type=click.Choice(["full", "lora"]), default="lora", show_default=True,
              help="LoRA through PEFT, or full fine-tuning.")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--alpha", type=float, default=None, callback=_positive, help="LoRA alpha, > 0 (default 2·r, as Biderman et al. advise).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r).")
@click.option("--targets", default="all", show_default=True,
              help="all (default, Biderman et al.), attn, mlp (those of them the model has), all-linear (PEFT: every linear "
                   "layer but the output head), or comma-separated module names (each must exist in the model).")
@click.option("--lr", type=float, default=None, callback=_positive,
              help="Learning rate, > 0. Default 2e-4 for LoRA, 2e-5 for full (LoRA ≈ 10× full, Biderman et al.).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8), help="Tokens per sequence.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED),
              help="Seed of initialisation, data order and LoRA init.")
@click.option("--eval-source", default=None, help="Source-domain data: its loss measures forgetting.")
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(min=1), help="Steps between evaluations of target and source loss.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA with bf16 autocast when present), cpu, cuda, cuda:N or mps.")
@click.option("--trace-every", default=50, show_default=True, type=click.IntRange(min=0),
              help="Measure ΔW's spectrum and subspaces every N steps while training and at the last (OUT/trace.jsonl); 0: off.")
@click.option("--out", "-o", "out_dir", required=True, type=OutPath(file_okay=False),
              help="Output folder (adapter or model, logs): new or empty, never BASE; see --force.")
@click.option("--force", is_flag=True, help="Write into a used --out, first deleting the files an earlier run wrote there.")
def train_cmd(base, data, method, rank, alpha, rslora, targets, lr, steps, batch, seq_len, seed, eval_source, eval_every, device,
              trace_every, out_dir, force) -> None:
    """One reference fine-tune (LoRA through PEFT, or full), logged to OUT/train_log.jsonl.

    A LoRA run writes a standard PEFT adapter, a full run a safetensors model folder; both can be
    analysed with `spectra diff BASE OUT`. Tokens come from BASE's tokenizer files; a folder without
    them is read as UTF-8 bytes (ids 0-255; train_config.json says which). Data must be UTF-8 text
    (a file more than 1% undecodable is refused). OUT must be new or empty (--force: first delete an
    earlier run's files there); it is locked while the run writes it.
    """
    from spectra.training import LORA_ONLY, TrainConfig, train

    quiet_transformers()
    err = stderr()
    unused = [f"--{n}" for n in LORA_ONLY if given(n)]
    if method == "full" and unused:  # a full fine-tune trains every weight: these would otherwise pass unseen
        err.print(f"[yellow]warning:[/] --method full trains every weight: {', '.join(unused)} apply to LoRA only, "
                  "have no effect and are recorded as null in train_config.json", highlight=False)
    config = TrainConfig(base=base, data=data, out=out_dir, method=method, rank=rank, alpha=alpha, rslora=rslora,
                         targets=targets, lr=lr, steps=steps, batch=batch, seq_len=seq_len, seed=seed,
                         eval_source=eval_source, eval_every=eval_every, device=device, trace_every=trace_every)
    progress = progress_bar(err)
    task_id = progress.add_task(f"{method} fine-tune", total=steps, current="")

    def on_record(rec: dict) -> None:
        src = "" if rec["source_loss"] is None else f" source {rec['source_loss']:.3f}"
        progress.update(task_id, completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:  # a stop is worded by _train_stop_note (spectra_cli.main.kept_on_stop)
        summary = train(config, callback=on_record, force=force)
    _warn_untargeted(err, [Path(out_dir)])
    err.print(shown(f"{summary.steps} steps in {summary.seconds:.1f} s: target loss {summary.target_loss:.3f}"
                     + ("" if summary.source_loss is None else f", source loss {summary.source_loss:.3f}")
                     + f"; outputs in {out_dir}"), highlight=False)


def _warn_untargeted(err, runs: list[Path]) -> None:
    """Say once what a LoRA preset left out of the model (each run's train_config.json records it)."""
    from spectra.errors import SpectraError
    from spectra.io.jsonfile import load_json
    from spectra.lora_targets import untargeted_text

    for run in runs:
        with contextlib.suppress(SpectraError, OSError):  # the run wrote it: a record it cannot read was said by then
            if text := untargeted_text(load_json(run / "train_config.json", what="train_config.json")):
                err.print("[yellow]warning:[/] " + shown(text), highlight=False)
                return


def _int_list(text: str, option: str) -> list[int]:
    """A comma-separated list of integers (``--ranks``, ``--seeds``); a usage error naming ``option`` otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers. Got {text!r}", param_hint=option) from None


@click.command("sweep", short_help="Several reference runs on one base, then diff and compare them.")
@click.option("--base", required=True, help="Local Hugging Face causal-LM folder.")
@click.option("--data", required=True, help="Target data (as for spectra train).")
@click.option("--methods", default="lora,full", show_default=True, help="Comma-separated: lora, full.")
@click.option("--ranks", default="8,64", show_default=True, help="Comma-separated LoRA ranks (each >= 1, listed once).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (each listed once): one set of runs per seed.")
@click.option("--eval-source", default=None, help="Source-domain data for the forgetting measure.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8), help="Tokens per sequence.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--trace-every", default=50, show_default=True, type=click.IntRange(min=0),
              help="Measure each run's ΔW every N steps and at its last (RUN/trace.jsonl); 0: off.")
@click.option("--out", "-o", "out_dir", required=True, type=OutPath(file_okay=False),
              help="Output folder: one subfolder per run (adapter or model, logs), their diffs and compares, sweep.json.")
@click.option("--force", is_flag=True, help="Write into a used --out, first deleting what an earlier sweep wrote there.")
@click.option("--resume", is_flag=True, help="Finish an interrupted sweep in --out, given the options it was started with: "
                                             "keep its finished runs and analyses, train the others afresh.")
def sweep_cmd(base, data, methods, ranks, seeds, eval_source, steps, batch, seq_len, device, trace_every, out_dir, force,
              resume) -> None:
    """Several reference runs on one base and dataset, then diff each and, within each seed, compare
    every LoRA run with the full run and consecutive LoRA ranks (OUT/sweep.json lists everything; OUT/sweep_options.json
    records the options, which --resume must repeat)."""
    from spectra.errors import ConfigError
    from spectra.training import check_sweep, sweep

    quiet_transformers()
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    rank_list, seed_list = _int_list(ranks, "--ranks"), _int_list(seeds, "--seeds")
    try:  # a rank < 1, a repeated rank or seed, an empty list: usage errors, before anything runs
        check_sweep(method_list, rank_list if "lora" in method_list else [], seed_list)
    except ConfigError as exc:
        raise click.UsageError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
    if force and resume:
        raise click.UsageError("--force deletes the finished runs that --resume keeps: pass one of them")
    err = stderr()
    if "lora" not in method_list and given("ranks"):  # only LoRA runs have a rank: no run would use them
        err.print(f"[yellow]warning:[/] --ranks applies to LoRA runs only: --methods {','.join(method_list)} trains none, "
                  "so it has no effect", highlight=False)
    progress = progress_bar(err)
    tasks: dict[str, int] = {}

    def on_record(name: str, rec: dict) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"train {name}", total=steps, current="")
        progress.update(tasks[name], completed=rec["step"], current=f"target {rec['target_loss']:.3f}")

    with progress:  # a stop is worded by _sweep_stop_note
        doc = sweep(base, data, out_dir, methods=method_list, ranks=rank_list, seeds=seed_list, eval_source=eval_source,
                    callback=on_record, force=force, resume=resume, steps=steps, batch=batch, seq_len=seq_len, device=device,
                    trace_every=trace_every)
    _warn_untargeted(err, [Path(r["out"]) for r in doc["runs"].values() if r.get("out")])
    table = Table(title="sweep", title_justify="left")
    for c in ("run", "target loss", "source loss", "seconds"):
        table.add_column(c, justify="left" if c == "run" else "right")
    for name, r in doc["runs"].items():
        table.add_row(shown(name), f"{r['target_loss']:.3f}", "–" if r["source_loss"] is None else f"{r['source_loss']:.3f}", f"{r['seconds']:.1f}")
    print_table(stdout(), table)
    err.print(shown(f"analyses in {Path(out_dir) / 'analysis'}; index: {Path(out_dir) / 'sweep.json'}"), highlight=False)


@click.command("demo", short_help="Offline end-to-end demo: tiny pretrain, fine-tunes, every analysis.")
@click.option("--out", "out_dir", default=None, type=OutPath(file_okay=False),
              help="Where the runs, analyses and summary go (default: out/demo for the full demo; a new scratch "
                   "folder for --quick and --synthetic). reports/demo holds a committed copy of a full demo's outputs.")
@click.option("--quick", is_flag=True, help="A tiny model and few steps (≤ 2 minutes; what the tests run); "
                                            "with --synthetic, a smaller generated pair.")
@click.option("--synthetic", is_flag=True, help="No training: diff a generated Llama-shaped pair with a planted update.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED - 2),
              help="Seed of initialisation, data order and LoRA init (the demo's runs use seed, seed+1 and seed+2).")
def demo_cmd(out_dir, quick, synthetic, seed) -> None:
    """Offline end-to-end demo: pretrain a tiny byte-level Llama on English prose, fine-tune it on
    Python code (full, LoRA r=8 and r=64, a second seed) and on JSON records (LoRA r=8), then diff,
    compare, extract (the full fine-tune at LoRA r=8's size), interfere (the two tasks) and plot
    everything, with an HTML report."""
    err = stderr()
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="spectra-demo-") if (quick or synthetic) else "out/demo"
        if quick or synthetic:  # a stop names it (_demo_stop_note): not "nothing was written", leaving it unseen in /tmp
            click.get_current_context().find_root().meta["spectra.demo_out"] = out_dir
    elif quick and Path(out_dir).resolve() == (Path("reports") / "demo").resolve() and (Path(out_dir) / "summary.json").exists():
        raise click.UsageError("--quick would overwrite the full example in reports/demo: pass another --out (or none for a scratch folder)")
    out = Path(out_dir)
    from spectra.training_inputs import claim_demo_folder

    claim_demo_folder(out, "synthetic" if synthetic else "training")  # before anything is generated or trained
    if synthetic:
        from spectra.synthetic import LlamaShape, make_llama_pair

        t0 = time.perf_counter()
        # --quick: a quarter of the default width, half its depth (the same layout, seconds less to diff)
        shape = LlamaShape(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=512) if quick else LlamaShape()
        base, tuned = make_llama_pair(out / "checkpoints", shape=shape, seed=seed)
        err.print(shown(f"generated {base} and {tuned} in {time.perf_counter() - t0:.1f} s"), highlight=False)
        run_diff(str(base), str(tuned), DiffConfig(), out_dir=str(out), allow_identical=False)
        return
    from spectra.demo import DemoConfig, run_demo

    quiet_transformers()
    config = DemoConfig.make(str(out), quick=quick, seed=seed)
    t0 = time.perf_counter()
    progress = progress_bar(err)
    tasks: dict[str, int] = {}
    total = {"base": config.pretrain_steps}

    def on_train(name: str, rec: dict) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(f"train {name}", total=total.get(name, config.finetune_steps), current="")
        src = "" if rec["source_loss"] is None else f", source {rec['source_loss']:.3f}"
        progress.update(tasks[name], completed=rec["step"], current=f"target {rec['target_loss']:.3f}{src}")

    with progress:
        run_demo(config, log=lambda m: progress.console.print(shown(m), highlight=False), on_train=on_train)
    stdout().print((out / "summary.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    err.print(shown(f"demo finished in {time.perf_counter() - t0:.0f} s; everything is in {out}/"), highlight=False)


#: read by spectra_cli.main.kept_on_stop, for a clean stop and a hard exit alike
train_cmd.stop_note = _train_stop_note
sweep_cmd.stop_note = _sweep_stop_note
demo_cmd.stop_note = _demo_stop_note
