"""``spectra extract`` (a LoRA adapter from an update, for a rank, energy or parameter budget) and
``spectra recommend`` (a LoraConfig for training from a diff's results)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click
from rich.table import Table

from spectra_cli.console import OutPath, cell, echo_json, given, one_pattern, print_table, progress_bar, short_name, shown, stderr, stdout


@click.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.option("--out", "-o", "out_dir", required=True, type=OutPath(file_okay=False),
              help="The adapter folder to write (must be empty or new; see --force, --resume).")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=None, help="Every module keeps R components (uniform).")
@click.option("--energy", "-e", type=float, default=None,
              help="Each module keeps the smallest rank holding ≥ τ of its ‖ΔW‖² (default: 0.9 when no rule is given), "
                   "never directions at the rounding level of the stored weights.")
@click.option("--budget", "-b", default=None,
              help="Total LoRA parameters (1200000, 1.2M), a share of the full update's (10%: of the changed matrices' "
                   "out × in), or a size (50MB, 1GiB: the factors' bytes in the output dtype, not the file's header of tensor names): "
                   "components go where they keep the most energy.")
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="No module keeps more components than this.")
@click.option("--serving", type=click.Choice(["none", "vllm"]), default="none", show_default=True,
              help="vllm: ranks up to 512, the largest max_lora_rank vLLM serves; the serving cost (max_lora_rank × "
                   "modules, as vLLM pads every module) is reported either way.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "float64"]), default="auto", show_default=True,
              help="Storage dtype of the adapter (auto: the tuned checkpoint's).")
@click.option("--rslora", is_flag=True, help="Write an rsLoRA adapter (alpha = √r; still scale 1).")
@click.option("--embeddings", is_flag=True, help="Also extract embeddings (PEFT's embedding LoRA) and the output head.")
@click.option("--save-modules", is_flag=True,
              help="Keep changed norms as PEFT modules_to_save and biases of adapted modules as lora_B.bias.")
@click.option("--include", multiple=True, callback=one_pattern,
              help="Regex: extract only matrices whose name matches.")
@click.option("--exclude", multiple=True, callback=one_pattern,
              help="Regex: leave out matrices whose name matches.")
@click.option("--layers", default=None, help="Layer selection such as '0-3,7,10-'.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--strategy", type=click.Choice(["auto", "one-pass", "two-pass"]), default="auto", show_default=True,
              help="one-pass: one read and one decomposition per matrix; two-pass: spectra first, then the vectors.")
@click.option("--approx-above", type=click.IntRange(min=0), default=16384, show_default=True,
              help="Randomized SVD (certified residual) for matrices with min(out, in) above this; 0: never.")
@click.option("--precision", type=click.Choice(["mixed", "float64"]), default="mixed", show_default=True,
              help="--rank on the CPU: mixed finds each subspace in float32 and computes values and factors on it in "
                   "float64 (energies within ~1e-8 of ‖ΔW‖² of float64's, measured); float64: exact float64 vectors throughout.")
@click.option("--task-type", default="auto", show_default=True,
              help="PEFT task_type of the adapter (auto: the tuned model's classifier task if it has one, else the base's config.json).")
@click.option("--eval", "eval_text", type=click.Path(exists=True), default=None,
              help="A text file: held-out loss of base, tuned, base + adapter and base + a uniform adapter of the same size.")
@click.option("--eval-seq-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="--eval: tokens per block of the text.")
@click.option("--eval-blocks", type=click.IntRange(min=1), default=32, show_default=True,
              help="--eval: at most this many blocks of the text are scored.")
@click.option("--batch-memory", type=click.IntRange(min=1), default=None, metavar="MIB", help="Memory cap of one batch, MiB.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out (same inputs and options).")
@click.option("--force", is_flag=True, help="Overwrite the earlier outputs of spectra extract in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print extract.json to stdout instead of the table.")
@click.option("--no-plots", is_flag=True, help="Do not write extract.png and extract_ranks.png.")
def extract_cmd(base, tuned, out_dir, rank, energy, budget, max_rank, serving, dtype, rslora, embeddings, save_modules,
                include, exclude, layers, device, strategy, approx_above, precision, task_type, eval_text, eval_seq_len, eval_blocks,
                batch_memory, resume, force, as_json, no_plots) -> None:
    """Extract a PEFT LoRA adapter from TUNED − BASE that keeps the most of the update.

    TUNED is a full fine-tuned checkpoint or a PEFT adapter of BASE (resized: from its factors; DoRA
    from its dense update). The adapter loads with peft.PeftModel.from_pretrained(base_model, OUT);
    OUT/extract.json says, per module, the rank, the energy kept, the errors, and what a uniform rank
    of the same size would keep.
    """
    from spectra.display import matrices
    from spectra.extract import ExtractConfig, ExtractEvent, extract
    from spectra.extract_results import UNCHANGED

    config = ExtractConfig(rank=rank, energy=energy, budget=budget, max_rank=max_rank, serving=serving, dtype=dtype,
                           rslora=rslora, embeddings=embeddings, save_modules=save_modules, include=include, exclude=exclude,
                           layers=layers, device=device, strategy=strategy, approx_above=approx_above or None, precision=precision,
                           task_type=None if task_type == "none" else task_type, eval_text=eval_text,
                           eval_seq_len=eval_seq_len, eval_blocks=eval_blocks,
                           max_batch_bytes=batch_memory << 20 if batch_memory else None)
    err = stderr()
    moot = [f"--{n.replace('_', '-')}" for n in ("eval_seq_len", "eval_blocks") if eval_text is None and given(n)]
    if moot:  # they shape the --eval scoring alone; extract.json records them as null without it
        err.print(f"[yellow]warning:[/] {' and '.join(moot)} {'apply' if len(moot) > 1 else 'applies'} only with --eval: "
                  "no effect here (recorded as null in extract.json)", highlight=False)
    progress = progress_bar(err)
    tasks: dict[str, int] = {}

    def on_event(ev: ExtractEvent) -> None:
        if ev.stage not in tasks:
            tasks[ev.stage] = progress.add_task(ev.stage, total=ev.total, current="")
        progress.update(tasks[ev.stage], completed=min(ev.done, ev.total), current=short_name(ev.name))

    with progress:
        result = extract(base, tuned, out_dir, config=config, resume=resume, force=force, plots=not no_plots, callback=on_event)
    if as_json:
        echo_json(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        out = stdout()
        print_table(out, summary_table(result.to_dict()))
        print_table(out, totals_table(result.to_dict()))
        if (losses := eval_table(result.to_dict())) is not None:
            print_table(out, losses)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}", highlight=False)
    held = [r for r in result.not_lora if r["held"] is None]
    if held:
        one = len(held) == 1
        kinds = sorted({("saved module" if one else "saved modules") if r.get("kind") == "modules_to_save of the adapter"
                        else ("norm/bias" if one else "norms/biases") for r in held})
        err.print(f"{len(held)} changed {' and '.join(kinds)} {'is' if one else 'are'} not in the adapter (see not_lora in extract.json"
                  f"{'' if save_modules else '; --save-modules keeps those PEFT can hold'})", highlight=False)
    moved = [r for r in result.not_extracted if r.get("reason") != UNCHANGED]  # an unchanged matrix leaves nothing behind
    if moved:
        still = len(result.not_extracted) - len(moved)
        err.print(f"{matrices(len(moved))} that changed not extracted{f' ({still} unchanged besides)' if still else ''} "
                  "(see not_extracted in extract.json)", highlight=False)
    err.print(shown(f"adapter: {Path(out_dir)} ({result.adapter['bytes']:,} bytes, {result.dtype}) in {result.elapsed_s:.1f} s; "
                     f"load it with peft.PeftModel.from_pretrained(base_model, {str(out_dir)!r})"), highlight=False)


def summary_table(doc: dict) -> Table:
    """Per module label: matrices (changed/all where some are unchanged), rank (median and range) and energy
    kept (median, min) of the changed ones, and parameters."""
    from spectra.roles import role_sort_key

    groups: dict[str, list[dict]] = {}
    for m in doc["modules"]:
        groups.setdefault(m["label"], []).append(m)
    table = Table(title=shown(f"spectra extract ({doc['mode']}): {doc['tuned']} − {doc['base']}"), title_justify="left")
    for col in ("module", "n", "rank (median)", "range", "energy kept (median)", "min", "uniform (median)", "params"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for label in sorted(groups, key=lambda k: role_sort_key(groups[k][0].get("role"), k)):
        # the medians are of the changed modules (an unchanged one keeps "1.000" at rank 0), n counts all
        n, ms = len(groups[label]), [m for m in groups[label] if m.get("changed", True)]
        params = f"{sum(m['params'] for m in groups[label]):,}"  # an unchanged expert of a stack holds some
        if not ms:
            table.add_row(cell(label), f"0/{n}", "–", "–", "–", "–", "–", params)
            continue
        ranks = sorted(m["rank"] for m in ms)
        kept = sorted(m["energy_kept"] for m in ms)
        uni = sorted(m["uniform_energy_kept"] for m in ms if m.get("uniform_energy_kept") is not None)
        # the median as extract.json, diff and trace take it (the mean of the middle two of an even count)
        table.add_row(cell(label), str(n) if n == len(ms) else f"{len(ms)}/{n}", f"{statistics.median(ranks):g}",
                      f"{ranks[0]}–{ranks[-1]}", f"{statistics.median(kept):.3f}", f"{kept[0]:.3f}",
                      f"{statistics.median(uni):.3f}" if uni else "–", params)
    return table


def totals_table(doc: dict) -> Table:
    """The adapter against the uniform rank of the same parameter count, and the serving cost."""
    t, u, s = doc["totals"], doc["uniform"], doc["serving"]
    outside = t.get("not_extracted_energy_share") or 0.0
    finite = " (over the matrices with a finite ΔW)" if t.get("unmeasured") else ""
    whole = "the selected matrices' ΔW energy" if t.get("outside_selection") else "all of ΔW's energy"  # the rest unread
    kept, kept_all = t.get("energy_kept"), t.get("energy_kept_all")
    title = ("totals (energy kept: share of the extracted matrices' ΔW energy; the matrices not extracted hold "
             f"{outside:.1%} of {'the selected' if t.get('outside_selection') else 'all of'} it{finite})" if outside >= 0.0005
             # modules saved whole (modules_to_save) keep their update: the share over all of it is another number
             else f"totals (energy kept: share of the extracted matrices' ΔW energy; with the modules saved whole, {kept_all:.4f} "
                  f"of {whole}{finite})" if kept is not None and kept_all is not None and abs(kept_all - kept) >= 5e-5
             else f"totals (energy kept: share of {whole}{finite})")
    table = Table(title=title, title_justify="left", show_header=True)
    changed = t.get("changed", t["modules"])  # the modules with an update (extract.json before: all of them)
    for col in ("", "params", "share of full update", "energy kept", "‖ΔW − BA‖/‖ΔW‖", "changed modules ≥ 90%"):
        table.add_column(col, justify="left" if not col else "right")

    def f(x, spec=".4f"):
        return "–" if x is None else format(x, spec)

    table.add_row("extracted", f"{t['params']:,}", f(t["param_fraction"]), f(t["energy_kept"]), f(t["rel_fro_error"]),
                  f"{t['modules_at_90']} / {changed}")
    table.add_row(f"uniform r = {u['rank']}", f"{u['params']:,}", f(u["params"] / t["full_params"] if t["full_params"] else None),
                  f(u["energy_kept"]), f(u["rel_fro_error"]), f"{u['modules_at_90']} / {changed}")
    if doc.get("allocation"):
        a = doc["allocation"]
        how = "" if a.get("critical") is None else " (allocation: the optimum)" if a.get("optimal") else " (allocation: not proven)"
        table.add_row(f"fractional bound{how}", f"{a['budget_params']:,}", "", f(a["fractional_bound"]), "", "")
    if s.get("max_lora_rank"):
        table.add_row(f"vLLM serving (max_lora_rank {s['max_lora_rank']})", f"{s['params']:,}", "", "", "", "")
    return table


def eval_table(doc: dict) -> Table | None:
    """``--eval``'s held-out losses (nats per token), a table of their own: in the totals table they stood
    under its "energy kept" header."""
    if not doc.get("eval"):
        return None
    table = Table(title="held-out loss (--eval, nats per token)", title_justify="left")
    table.add_column("model")
    table.add_column("loss", justify="right")
    for name, loss in doc["eval"]["loss"].items():
        table.add_row(shown(name), "–" if loss is None else f"{loss:.4f}")
    return table


@click.command("recommend")
@click.argument("results", type=click.Path(exists=True))
@click.option("--energy", "-e", type=float, default=None,
              help="Each module's rank holds ≥ τ of its ‖ΔW‖² (default 0.9 without --budget; with it, a cap within the budget).")
@click.option("--budget", "-b", default=None,
              help="At most this many LoRA parameters (1.2M; 10%: of the changed matrices' out × in; 50MB of bf16).")
@click.option("--alpha-ratio", type=float, default=2.0, show_default=True, help="lora_alpha = ratio × r (Biderman et al.: 2).")
@click.option("--rslora", is_flag=True, help="use_rslora (alpha = ratio × √r).")
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="Cap every rank.")
@click.option("--embeddings", is_flag=True, help="Also recommend LoRA for embeddings and the head.")
@click.option("--task-type", default="auto", show_default=True,
              help="PEFT task_type of the config (auto: SEQ_CLS/TOKEN_CLS/QUESTION_ANS for a classifier's results, else "
                   "CAUSAL_LM; 'none' for none).")
@click.option("--out", "-o", "out_path", type=OutPath(dir_okay=False), default=None, help="Write the config JSON here too.")
def recommend_cmd(results, energy, budget, alpha_ratio, rslora, max_rank, embeddings, task_type, out_path) -> None:
    """A PEFT LoraConfig (r, rank_pattern, alpha_pattern, target_modules) for training, from the
    results.json of `spectra diff` alone. The config goes to stdout as JSON: LoraConfig(**json.load(f))."""
    from spectra.io.files import atomic_write_text, refuse_input_as_output, refuse_replacing
    from spectra.recommend import is_recommended_config, recommend

    if out_path:  # before anything: -o results.json would replace the diff it reads
        refuse_input_as_output(out_path, [Path(results) / "results.json" if Path(results).is_dir() else Path(results)])
        refuse_replacing(out_path, (".json",), option="-o", owned=is_recommended_config)
    if energy is None and budget is None:
        energy = 0.9
    rec = recommend(results, energy=energy, budget=budget, alpha_ratio=alpha_ratio, rslora=rslora, max_rank=max_rank,
                    embeddings=embeddings, task_type=None if task_type == "none" else task_type)
    # top-level keys sorted, not the patterns: PEFT takes the first rank_pattern key that matches (longest first)
    text = json.dumps(dict(sorted(rec.config.items())), indent=2)
    if out_path:  # first: a closed or broken stdout must not cost the file
        atomic_write_text(Path(out_path), text + "\n")
    click.echo(text)
    err = stderr()
    for n in rec.notes:
        err.print(f"note: {shown(n)}", highlight=False)
    err.print(f"{len(rec.ranks)} module{'s' * (len(rec.ranks) != 1)}, {rec.params:,} LoRA parameters "
              f"({rec.params / rec.full_params:.2%} of the full update's {rec.full_params:,})", highlight=False)
