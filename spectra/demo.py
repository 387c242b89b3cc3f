"""The built-in demo (``spectra demo``, what ``make demo`` runs): real, tiny, offline reference runs.

1. Data every Python installation has: English prose (``pydoc_data.topics``) is the source domain,
   the standard library's own Python code the target domain.
2. A small Llama-architecture model (byte-level vocabulary, built from a transformers config, no hub)
   is pretrained briefly on the source and cached.
3. It is fine-tuned on the target: fully, with LoRA at r = 8 and r = 64, and with LoRA r = 8 under a
   second seed, each run logging target and source losses.
4. The analyses: ``diff`` of every run (rank-needed heatmaps), ``compare`` of LoRA vs full and of
   LoRA vs LoRA, a learning-vs-forgetting plot, a summary of where to look, and ``report.html``.
5. A second task: LoRA r = 8 on JSON records (built from the interpreter's Unicode database), and
   ``interfere`` of the two tasks' adapters, the second seed and the full fine-tune: how fine-tunes
   on the same and on different data collide. Every fine-tune is traced while it trains
   (``trace.jsonl``, :class:`spectra.callbacks.SpectraTracker`).
6. ``extract`` of the full fine-tune into LoRA adapters with the r = 8 run's parameter count (spread
   by energy, and uniform rank 8), then held-out losses of both and of the trained r = 8 adapter on
   unseen Python (learning) and on the prose probe (forgetting): is an extracted LoRA as good as one
   trained at that size?
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from spectra.compare_findings import phi_tells
from spectra.comparison import compare
from spectra.config import CompareConfig, DiffConfig
from spectra.errors import ConfigError, ResultsFormatError
from spectra.extract import extract
from spectra.extract_eval import held_out_losses
from spectra.extract_plan import ExtractConfig
from spectra.interfere import interfere
from spectra.io.files import atomic_write_text
from spectra.io.jsonfile import load_json, load_jsonl
from spectra.pipeline import diff
from spectra.plots import learning_forgetting_plot
from spectra.report import write_report
from spectra.training import TrainConfig, train
from spectra.training_inputs import MAX_SEED, claim_demo_folder


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick`` is the ≤ 2-minute version the tests run.

    Attributes:
        out: output folder.
        quick: tiny model and few steps.
        seed: seed of the base model and of the first run of each method.
        hidden, layers, intermediate, heads: the model (Llama architecture, vocab 256 bytes).
        pretrain_steps, finetune_steps, batch, seq_len: training lengths.
        lr_full, lr_lora: learning rates (LoRA ≈ 10× full, Biderman et al. 2024).
    """

    out: str = "out/demo"
    quick: bool = False
    seed: int = 0
    hidden: int = 192
    layers: int = 4
    intermediate: int = 512
    heads: int = 4
    pretrain_steps: int = 600
    finetune_steps: int = 300
    batch: int = 8
    seq_len: int = 128
    lr_full: float = 3e-4
    lr_lora: float = 3e-3

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED - 2:
            raise ConfigError(f"the demo's seed must be an integer from 0 to 2**63-3 (its runs use seed, seed+1 and "
                              f"seed+2). Got {self.seed!r} instead")

    @classmethod
    def make(cls, out: str = "out/demo", *, quick: bool = False, seed: int = 0) -> DemoConfig:
        if quick:
            return cls(out=out, quick=True, seed=seed, hidden=64, layers=2, intermediate=160, heads=4,
                       pretrain_steps=60, finetune_steps=30, batch=8, seq_len=64)
        return cls(out=out, seed=seed)


def source_text(limit: int = 400_000) -> str:
    """English prose: the help topics of the Python documentation (``pydoc_data.topics``)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:limit]


def target_text(limit: int = 400_000) -> str:
    """Python code: modules of the standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in ("json", "email", "http", "logging", "argparse.py", "csv.py", "textwrap.py", "string.py", "shlex.py", "fractions.py"):
        for f in sorted((stdlib / name).rglob("*.py")) if (stdlib / name).is_dir() else [stdlib / name]:
            if f.is_file():
                text = f.read_text(encoding="utf-8", errors="replace")
                parts.append(text)
                size += len(text)
                if size >= limit:
                    return "\n".join(parts)[:limit]
    return "\n".join(parts)[:limit]


#: standard-library modules outside :func:`target_text`'s corpus: held-out Python for evaluations
HELD_OUT_MODULES = ("calendar.py", "difflib.py", "heapq.py", "pprint.py", "dataclasses.py")


def held_out_python_text(limit: int = 80_000) -> str:
    """Python code no demo or study run trains on (:data:`HELD_OUT_MODULES`), for held-out losses."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / m).read_text(encoding="utf-8", errors="replace") for m in HELD_OUT_MODULES if (stdlib / m).is_file())[:limit]


def json_text(limit: int = 400_000) -> str:
    """JSON records, one per line, built from the interpreter's Unicode database (every Python has it,
    so the demo stays offline): a second target domain, data rather than code."""
    import unicodedata

    lines, size = [], 0
    for cp in range(0x20, 0x30000):
        name = unicodedata.name(chr(cp), None)
        if name is None:
            continue
        rec = {"codepoint": f"U+{cp:04X}", "name": name, "category": unicodedata.category(chr(cp)),
               "bidirectional": unicodedata.bidirectional(chr(cp)), "mirrored": bool(unicodedata.mirrored(chr(cp))),
               "decimal": unicodedata.decimal(chr(cp), None)}
        line = json.dumps(rec)
        lines.append(line)
        size += len(line) + 1
        if size >= limit:
            break
    return "\n".join(lines)[:limit]


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print, on_train: Callable[[str, dict], None] | None = None) -> dict:
    """Run every stage; returns the summary (also written to ``<out>/summary.json`` and ``summary.md``)."""
    import torch
    import transformers

    out = Path(config.out)
    claim_demo_folder(out)
    ck = out / "checkpoints"
    data = ck / "data"
    data.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    src, tgt = source_text(), target_text()
    cut = int(len(src) * 0.9)  # the last 10% of the source is the forgetting probe, never trained on
    (data / "source_train.txt").write_text(src[:cut], encoding="utf-8")
    (data / "source_eval.txt").write_text(src[cut:], encoding="utf-8")
    (data / "target.txt").write_text(tgt, encoding="utf-8")
    (data / "json.txt").write_text(json_text(), encoding="utf-8")
    stages["data"] = time.perf_counter() - t

    # base model: cached by a hash of what defines it
    t = time.perf_counter()
    key = hashlib.sha256(json.dumps([config.hidden, config.layers, config.intermediate, config.heads, config.pretrain_steps,
                                     config.batch, config.seq_len, config.seed, len(src)]).encode()).hexdigest()[:12]
    base = ck / f"base-{key}"
    if not (base / "train_summary.json").is_file():
        torch.manual_seed(config.seed)
        cfg = transformers.LlamaConfig(hidden_size=config.hidden, intermediate_size=config.intermediate,
                                       num_hidden_layers=config.layers, num_attention_heads=config.heads,
                                       num_key_value_heads=config.heads, vocab_size=256, max_position_embeddings=config.seq_len,
                                       bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
        init = ck / f"init-{key}"
        transformers.LlamaForCausalLM(cfg).save_pretrained(str(init))
        log(f"pretraining the base model on English prose ({config.pretrain_steps} steps)")
        train(TrainConfig(base=str(init), data=str(data / "source_train.txt"), out=str(base), method="full",
                          lr=1e-3 if not config.quick else 3e-3, steps=config.pretrain_steps, batch=config.batch,
                          seq_len=config.seq_len, seed=config.seed, eval_every=max(1, config.pretrain_steps // 4),
                          device="cpu" if config.quick else "auto"),
              callback=(lambda r: on_train("base", r)) if on_train else None,
              force=True)  # checkpoints/ is the demo's own cache: an interrupted pretraining's files are replaced
    else:
        log(f"using the cached base model {base}")
    stages["pretrain"] = time.perf_counter() - t

    runs = {"full": ("full", 0, config.seed), "lora8": ("lora", 8, config.seed), "lora64": ("lora", 64, config.seed),
            "lora8_seed2": ("lora", 8, config.seed + 1)}
    # the second task, JSON records instead of Python code, under a third seed: LoRA's A starts random and
    # moves little in a short run, so two runs with one seed share their input subspace whatever the data
    second = {"lora8_json": ("lora", 8, config.seed + 2)}
    for name, (method, rank, seed) in {**runs, **second}.items():
        t = time.perf_counter()
        corpus = "json.txt" if name in second else "target.txt"
        log(f"fine-tuning on {'JSON records' if name in second else 'Python code'}: {name}")
        train(TrainConfig(base=str(base), data=str(data / corpus), out=str(ck / name), method=method,
                          rank=max(rank, 1), lr=config.lr_full if method == "full" else config.lr_lora,
                          steps=config.finetune_steps, batch=config.batch, seq_len=config.seq_len, seed=seed,
                          eval_source=str(data / "source_eval.txt"), eval_every=max(1, config.finetune_steps // 5),
                          trace_every=max(1, config.finetune_steps // 10),
                          device="cpu" if config.quick else "auto"),
              callback=(lambda r, n=name: on_train(n, r)) if on_train else None,
              force=True)  # a rerun of the demo replaces its own earlier fine-tunes
        stages[f"train {name}"] = time.perf_counter() - t

    t = time.perf_counter()
    diffs = {}
    for name in runs:  # the full fine-tune also keeps the weights' spectra, for the report's Fig. S7-style panel
        diffs[name] = diff(str(base), str(ck / name), out_dir=out / f"diff_{name}", config=DiffConfig(weight_spectra=name == "full"))
    stages["diff"] = time.perf_counter() - t
    t = time.perf_counter()
    comparisons = {}
    for a, b, cfg in (("lora8", "full", CompareConfig(top_k=64)), ("lora8", "lora64", CompareConfig()), ("lora8", "lora8_seed2", CompareConfig())):
        comparisons[f"{a}_vs_{b}"] = compare(str(ck / a), str(ck / b), base=str(base), config=cfg, out_dir=out / f"compare_{a}_vs_{b}")
    stages["compare"] = time.perf_counter() - t
    t = time.perf_counter()
    tasks = ["lora8", "lora8_seed2", "lora8_json", "full"]  # same data twice, other data, full fine-tuning
    interference = interfere(str(base), [str(ck / n) for n in tasks], out_dir=out / "interfere")
    stages["interfere"] = time.perf_counter() - t

    t = time.perf_counter()
    (data / "python_eval.txt").write_text(held_out_python_text(), encoding="utf-8")
    extraction = extract_at_lora_size(base, ck / "full", ck / "lora8", out, {"python": data / "python_eval.txt",
                                      "prose": data / "source_eval.txt"}, seq_len=config.seq_len, log=log)
    stages["extract"] = time.perf_counter() - t

    logs = {name: load_jsonl(ck / name / "train_log.jsonl", what="train_log.jsonl", error=ResultsFormatError, skip_torn_tail=True)
            for name in runs}
    for name in {**runs, **second}:  # the logs, configs and traces travel with the analyses (checkpoints/ is a cache)
        (out / "runs" / name).mkdir(parents=True, exist_ok=True)
        for f in ("train_log.jsonl", "train_config.json", "train_summary.json", "trace.jsonl"):
            if (ck / name / f).is_file():
                (out / "runs" / name / f).write_bytes((ck / name / f).read_bytes())
    learning_forgetting_plot(logs, out / "learning_vs_forgetting.png")
    summary = _summary(config, runs, logs, diffs, comparisons, stages)
    summary["interference"] = _interference_summary(interference.summary, tasks)
    summary["extract"] = extraction
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "summary.md", _summary_md(summary))
    write_report([out / d for d in sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "checkpoints")],
                 out / "report.html", title="spectra demo: LoRA vs full fine-tuning of a tiny byte-level Llama")
    return summary


def extract_at_lora_size(base: Path, full: Path, lora: Path, out: Path, texts: dict[str, Path], *, seq_len: int = 128,
                         blocks: int = 16, log: Callable[[str], None] = print) -> dict:
    """Extract ``full`` (a fine-tuned model folder) into LoRA adapters with ``lora``'s trainable parameter
    count: ``out/extract_budget`` (ranks spread by energy) and ``out/extract_rank<r>`` (uniform, ``lora``'s
    rank), then the held-out losses of base, full, both adapters and the trained ``lora`` on each text.

    Returns:
        ``{"lora_params", "rank", "energy_kept": {adapter: share of the extracted matrices' ‖ΔW‖²_F},
        "energy_kept_all": {adapter: share of every matrix's}, "loss": {text: {model: nats/token}},
        "recovered": {text: {adapter: share of the full fine-tune's loss change}}, "tokens": {text: count}}``.
    """
    cfg = load_json(lora / "train_config.json", what="train_config.json", error=ResultsFormatError)
    params, rank = int(cfg["trainable_params"]), int(cfg["rank"])
    adapters = {"extracted_budget": out / "extract_budget", f"extracted_rank{rank}": out / f"extract_rank{rank}"}
    result: dict = {"lora_params": params, "rank": rank, "energy_kept": {}, "energy_kept_all": {}, "loss": {}, "recovered": {},
                    "tokens": {}}
    for (name, folder), config in zip(adapters.items(), (ExtractConfig(budget=str(params)), ExtractConfig(rank=rank))):
        log(f"extracting the full fine-tune at LoRA r={rank}'s size: {name}")
        res = extract(str(base), str(full), folder, config=config, force=True)
        result["energy_kept"][name] = res.totals["energy_kept"]
        result["energy_kept_all"][name] = res.totals.get("energy_kept_all")
    for text_name, text in texts.items():
        ev = held_out_losses(str(base), str(full), {**{k: str(v) for k, v in adapters.items()}, f"trained_lora{rank}": str(lora)},
                             str(text), seq_len=seq_len, blocks=blocks)
        result["loss"][text_name], result["recovered"][text_name], result["tokens"][text_name] = ev["loss"], ev["recovered"], ev["tokens"]
    return result


def _median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else float("nan")


def _summary(config, runs, logs, diffs, comparisons, stages) -> dict:
    per_run = {}
    start = logs["full"][0]
    for name in runs:
        last = logs[name][-1]
        res = diffs[name]
        per_run[name] = {
            "target_loss": last["target_loss"], "source_loss": last["source_loss"],
            "median_energy_rank_0.9": _median([m.energy_rank["0.9"] for m in res.modules]),
            "median_energy_rank_frac_0.9": _median([m.energy_rank_frac["0.9"] for m in res.modules]),
            "median_rel_norm": _median([m.rel_norm for m in res.modules if m.rel_norm is not None]),
        }
    full, lora = per_run["full"], per_run["lora8"]
    # φ of modules whose ranks nearly fill the space is near 1 for any subspaces: left out (compare_findings.phi_tells)
    told = {k: [m for m in c.modules if phi_tells(m, "right")] for k, c in comparisons.items()}
    comp = {k: {"median_phi": _median([m["phi"]["right"]["phi_full"] for m in told[k]]),
                "median_random_phi": _median([m["phi"]["right"]["random"] for m in told[k]]),
                "phi_modules": len(told[k]), "modules": len(c.modules),
                "median_captured_b_in_a": _median([m["captured"]["b_in_a"]["two_sided"] for m in c.modules]),
                "median_intruders_a": _median([m["intruders"]["a"]["count"] for m in c.modules]),
                "median_intruders_b": _median([m["intruders"]["b"]["count"] for m in c.modules])}
            for k, c in comparisons.items()}
    return {
        "config": asdict(config), "stage_seconds": stages, "base": {"target_loss": start["target_loss"], "source_loss": start["source_loss"]},
        "runs": per_run, "comparisons": comp,
        "findings": {
            "full_rank_over_lora_rank": full["median_energy_rank_0.9"] / max(lora["median_energy_rank_0.9"], 1e-9),
            "lora_learned_less": lora["target_loss"] > full["target_loss"],
            "lora_forgot_less": lora["source_loss"] < full["source_loss"],
            "forgetting": forgetting_text(start["source_loss"], full["source_loss"], lora["source_loss"]),
        },
    }


def forgetting_text(base: float, full: float, lora: float) -> str:
    """What the source (forgetting) losses say, against the base's first: a run whose source loss fell forgot nothing.

    >>> forgetting_text(3.4, 3.3, 3.36)
    'neither forgot: the source loss fell for both (base 3.400, full 3.300, LoRA r=8 3.360)'
    """
    losses = f"(base {base:.3f}, full {full:.3f}, LoRA r=8 {lora:.3f})"
    if full <= base and lora <= base:
        return f"neither forgot: the source loss fell for both {losses}"
    if full > base and lora > base:
        return f"LoRA r=8 forgot {'less' if lora < full else 'no less'} than full fine-tuning: the source loss rose for both {losses}"
    return f"only {'full fine-tuning' if full > base else 'LoRA r=8'} forgot: its source loss rose {losses}"


def _interference_summary(s: dict, tasks: list[str]) -> dict:
    """Median cosine and φ of the same-task pair (two seeds) and the two-task pair, and what summing does."""
    i, j, k = tasks.index("lora8"), tasks.index("lora8_seed2"), tasks.index("lora8_json")
    return {"tasks": tasks, "same_task_cosine": s["cosine"][i][j], "same_task_phi": s["phi"][i][j],
            "two_tasks_cosine": s["cosine"][i][k], "two_tasks_phi": s["phi"][i][k],
            "spectral_over_max": s["spectral_over_max"], "tsv_relative_fro": s["tsv_relative_fro"]}


def _summary_md(s: dict) -> str:
    f = s["findings"]
    lines = ["# spectra demo: LoRA vs full fine-tuning of a tiny byte-level Llama", "",
             f"Base (pretrained on English prose): target loss {s['base']['target_loss']:.3f}, source loss {s['base']['source_loss']:.3f}.", "",
             "| run | target loss (learning) | source loss (forgetting) | median rank for 90% of ΔW | as a fraction of p | median ‖ΔW‖/‖W‖ |",
             "|---|---|---|---|---|---|"]
    for name, r in s["runs"].items():
        lines.append(f"| {name} | {r['target_loss']:.3f} | {r['source_loss']:.3f} | {r['median_energy_rank_0.9']:g} | "
                     f"{r['median_energy_rank_frac_0.9']:.3f} | {r['median_rel_norm']:.3g} |")
    lines += ["", "| comparison | median φ(r_A, r_B) (right) | random | B's energy in A's subspaces | intruders A | intruders B |",
              "|---|---|---|---|---|---|"]
    for name, c in s["comparisons"].items():
        phi = ((f"{c['median_phi']:.3f}", f"{c['median_random_phi']:.3f}") if c.get("phi_modules", 1)
               else ("– (ranks fill d: φ ≈ 1 for any subspaces)", "–"))
        lines.append(f"| {name} | {phi[0]} | {phi[1]} | {c['median_captured_b_in_a']:.3f} | "
                     f"{c['median_intruders_a']:g} | {c['median_intruders_b']:g} |")
    lines += ["", "What came out (measured, whatever it is):", "",
              f"- Full fine-tuning's ΔW needs {f['full_rank_over_lora_rank']:.1f}× the rank of the LoRA r=8 update to explain 90% of its energy.",
              f"- LoRA r=8 {'learned less' if f['lora_learned_less'] else 'did not learn less'} than full fine-tuning (target loss); "
              f"{f['forgetting']}.",
              *([f"- Two LoRA r=8 fine-tunes on the same data (two seeds): median cosine {s['interference']['same_task_cosine']:.2f}, "
                 f"φ {s['interference']['same_task_phi']:.2f}; on Python code vs JSON records (other seeds too): cosine "
                 f"{s['interference']['two_tasks_cosine']:.2f}, φ {s['interference']['two_tasks_phi']:.2f} (`interfere/`)."]
                if "interference" in s else []),
              *(extract_summary_lines(s["extract"]) if "extract" in s else []), "",
              "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items()), "",
              "Look at: `report.html` (everything in one page), `learning_vs_forgetting.png`, `diff_*/rank_heatmap.png`, "
              "`compare_*/phi_grids.png`, `compare_*/captured_heatmap.png`."]
    return "\n".join(lines) + "\n"


def extract_summary_lines(x: dict) -> list[str]:
    """Extracted vs trained LoRA at the same size, for summary.md."""
    r = x["rank"]
    names = ("extracted_budget", f"extracted_rank{r}", f"trained_lora{r}")

    def kept(name: str) -> str:  # the extracted matrices' share, and every matrix's (the embeddings and head are not extracted)
        whole = (x.get("energy_kept_all") or {}).get(name)
        return f"{x['energy_kept'][name]:.3f}" + (f" ({whole:.3f} of every matrix's)" if whole is not None else "")

    lines = [f"- The full fine-tune extracted into LoRA adapters of the r={r} run's size ({x['lora_params']:,} parameters; "
             f"`extract_budget/`, `extract_rank{r}/`) keeps {kept('extracted_budget')} of the extracted matrices' ‖ΔW‖²_F spread "
             f"by energy and {kept(f'extracted_rank{r}')} at uniform rank {r}. Held-out losses (nats/token) and the share of "
             "the full fine-tune's change each reproduces:", "",
             "| text | base | full | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for text, loss in x["loss"].items():
        rec = x["recovered"][text]
        cells = [f"{loss[n]:.3f} ({'n/a' if rec.get(n) is None else format(rec[n], '.2f')})" for n in names]
        lines.append(f"| {text} | {loss['base']:.3f} | {loss['tuned']:.3f} | " + " | ".join(cells) + " |")
    return lines + [""]
