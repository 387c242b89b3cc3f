"""The ``spectra extract`` section of ``spectra report``, from an ``extract.json`` (schema
``spectra.extract/1``): what the adapter keeps against a uniform rank of the same size, the ranks it
chose, the held-out losses when measured, and what a LoRA could not hold.

Every name from a checkpoint or a path is escaped (:func:`spectra.report_html.esc`); figures are
inline SVG. The lead wires :func:`section_html`, :func:`findings` and :func:`title` into
:mod:`spectra.report` by :data:`SCHEMA`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spectra.errors import ResultsFormatError
from spectra.findings import Finding
from spectra.plots.base import svg_img
from spectra.plots.extract import energy_figure, rank_heatmap
from spectra.report_html import esc, legend, note, table
from spectra.results_check import impossible, is_int, is_num

SCHEMA = "spectra.extract/1"

#: Column definitions of the per-module table (shown as its legend).
COLUMNS = (
    ("rank", "LoRA rank r kept for the module (B is out × r, A is r × in)."),
    ("params", "r · (out + in): the module's LoRA parameters as PEFT builds them (r · (2·out + in) for an expert matrix PEFT "
               "fuses with another: Mixtral's w1 and w3 become gate_up_proj, at rank 2r over both outputs)."),
    ("energy kept", "Σ_{i≤r} σᵢ² / ‖ΔW‖²_F: the share of the update's squared Frobenius norm the rank-r truncation keeps."),
    ("‖ΔW − BA‖/‖ΔW‖", "Relative Frobenius error of the truncation, √(1 − energy kept) (Eckart–Young)."),
    ("σ_{r+1}/σ₁", "Relative spectral-norm error of the truncation, ‖ΔW − BA‖₂ / ‖ΔW‖₂."),
    ("uniform", "Energy kept by the uniform rank with the same total parameter count, from the same spectrum."),
    ("‖ΔW‖/‖W‖", "Size of the update against the base weight."),
)


#: Float rounding allowed above 1 in a share (an energy summed in float64 can end at 1 + 1e-16).
_SHARE_SLACK = 1e-9


#: Keys of an ``extract.json`` module record the report reads, and those that are numbers (or null).
_REQUIRED = ("name", "shape", "rank", "params", "energy_kept")
_NUMBERS = ("rank", "params", "energy_kept", "rel_fro_error", "spectral_error", "fro_norm", "rel_norm", "uniform_rank",
            "uniform_energy_kept", "storage_error")


def check(path: Path, doc: dict[str, Any]) -> None:
    """Refuse an ``extract.json`` holding values no extraction can produce (a rank outside
    0 … min(shape), a share of energy outside [0, 1], a negative norm or count, an empty shape, a loss
    that is not a finite number ≥ 0), and a module record without one of :data:`_REQUIRED` or with text where
    :data:`_NUMBERS` are numbers: the report would show them as facts. Other types the report reads
    fail later, in :func:`spectra.report._guarded`.

    Raises:
        ResultsFormatError: one line naming the file, the record and the field.
    """
    def bad(where: str, value: Any, why: str) -> None:
        impossible(where, value, why, path, rerun="spectra extract --force")

    # ranges of numbers only: a value of another type is shown escaped, or fails in the section's code
    def share(where: str, v: Any) -> None:
        if is_num(v) and not 0 <= v <= 1 + _SHARE_SLACK:
            bad(where, v, "a share lies from 0 to 1")

    def count(where: str, v: Any) -> None:
        if is_num(v) and not v >= 0:
            bad(where, v, "a count, size or norm is not negative")

    t, u = doc.get("totals"), doc.get("uniform")
    for name, rec in (("totals", t), ("uniform", u)):
        if isinstance(rec, dict):
            for key in ("energy_kept", "rel_fro_error", "median_energy_kept", "min_energy_kept", "param_fraction",
                        "energy_kept_all", "not_extracted_energy_share"):
                (share if key != "param_fraction" else count)(f"{name}.{key}", rec.get(key))
            for key in ("params", "full_params", "modules", "changed", "modules_at_90", "rank", "min_rank", "max_rank", "bytes"):
                count(f"{name}.{key}", rec.get(key))
    if isinstance(t, dict) and is_num(t.get("modules_at_90")) and is_num(t.get("modules")) and t["modules_at_90"] > t["modules"]:
        bad("totals.modules_at_90", t["modules_at_90"], f"more than the {t['modules']} modules")
    seen: set[str] = set()
    for i, m in enumerate(doc.get("modules") or []):
        if not isinstance(m, dict):
            continue
        at = f"modules[{i}] ({str(m.get('name'))[:80]})"
        for key in _REQUIRED:  # the generic "KeyError: 'energy_kept'" named no record
            if key not in m:
                raise ResultsFormatError(f"{at}: missing key {key!r}", path=path, hint="rerun spectra extract --force to rewrite it")
        for key in _NUMBERS:  # a number as text was shown raw, unrounded, where every other file refuses it
            if m.get(key) is not None and not is_num(m[key]):
                raise ResultsFormatError(f"{at}.{key} must be a number or null. Got {str(m[key])[:60]!r} instead", path=path,
                                         hint="the file was edited or damaged; rerun spectra extract --force to rewrite it")
        if str(m.get("name")) in seen:  # counted twice in the table, and against the totals
            bad(f"{at}.name", str(m["name"])[:80], "each module has one record; this name came before")
        seen.add(str(m.get("name")))
        shape = m.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(x) and x >= 1 for x in shape)):
            bad(f"{at}.shape", shape, "a matrix has two sides of at least 1: [out, in]")
        for key in ("rank", "uniform_rank"):
            if key in m and not (is_int(m[key]) and 0 <= m[key] <= min(shape)):
                bad(f"{at}.{key}", m[key], f"a rank lies from 0 to min(shape) = {min(shape)}, a whole number")
        per = _per_rank(m)
        if per is None:
            bad(f"{at}.params_per_rank", m.get("params_per_rank"), f"out + in = {sum(shape)} (or 2·out + in for an expert PEFT fuses)")
        if is_int(m.get("rank")) and is_num(m.get("params")) and m["params"] != m["rank"] * per:
            bad(f"{at}.params", m["params"], f"a rank-{m['rank']} LoRA of {shape[0]}×{shape[1]} has "
                                             f"r·({'out + in' if per == sum(shape) else '2·out + in'}) = {m['rank'] * per} parameters")
        for key in ("energy_kept", "rel_fro_error", "spectral_error", "uniform_energy_kept"):
            share(f"{at}.{key}", m.get(key))
        kept, err = m.get("energy_kept"), m.get("rel_fro_error")
        if is_num(kept) and is_num(err) and abs(err ** 2 - max(0.0, 1.0 - kept)) > 1e-3:  # Eckart–Young: one number twice
            bad(f"{at}.rel_fro_error", err, f"it is √(1 − energy_kept) = {math.sqrt(max(0.0, 1.0 - kept)):.6g}")
        for key in ("params", "fro_norm", "base_fro_norm", "rel_norm"):
            count(f"{at}.{key}", m.get(key))
    if isinstance(t, dict) and isinstance(doc.get("modules"), list) and all(isinstance(m, dict) for m in doc["modules"]):
        _check_totals(doc["modules"], t, u if isinstance(u, dict) else {}, bad)
    ev = doc.get("eval")
    if isinstance(ev, dict):
        loss = ev.get("loss")
        for name, v in (loss.items() if isinstance(loss, dict) else ()):
            if is_num(v) and not (math.isfinite(v) and v >= 0):
                bad(f"eval.loss.{name}", v, "a mean cross-entropy is a finite number of at least 0")
        for key in ("blocks", "seq_len", "tokens"):
            if is_num(ev.get(key)) and not ev[key] >= 1:
                bad(f"eval.{key}", ev[key], "at least one block of at least one token is scored")


def _per_rank(m: dict[str, Any]) -> int | None:
    """A checked module's LoRA parameters per rank: ``params_per_rank`` (an older file: out + in), which is out + in, or
    2·out + in for an expert matrix PEFT fuses with another (:attr:`spectra.extract_plan.Target.fused_out`); else None."""
    out, inn = m["shape"]
    per = m.get("params_per_rank", out + inn)
    return per if per == out + inn or (m.get("expert") is not None and per == 2 * out + inn) else None


def _check_totals(mods: list[dict[str, Any]], t: dict[str, Any], u: dict[str, Any], bad) -> None:
    """The totals are sums and counts over the listed modules (extract_results.build_result): one that is not
    is stated as the adapter's. Keys an older extract.json lacks are not checked."""
    def same(where: str, value: Any, want: Any, why: str) -> None:
        if is_num(value) and want is not None and not math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12):
            bad(where, value, f"{why} ({want:,})" if is_int(want) else f"{why} ({want:.6g})")

    def total(key: str) -> int | None:
        vals = [m.get(key) for m in mods]
        return sum(vals) if all(is_num(v) for v in vals) else None

    same("totals.modules", t.get("modules"), len(mods), "it is the number of modules listed")
    kept = [m["energy_kept"] for m in mods if is_num(m.get("energy_kept")) and is_num(m.get("fro_norm")) and m["fro_norm"] > 0]
    if kept and is_num(t.get("energy_kept")) and not min(kept) - 1e-9 <= t["energy_kept"] <= max(kept) + 1e-9:
        bad("totals.energy_kept", t["energy_kept"], f"an energy-weighted mean of the modules' shares, from {min(kept):.6g} to "
                                                    f"{max(kept):.6g}")
    same("totals.params", t.get("params"), total("params"), "it is the sum of the modules' params")
    if all(is_int(m.get("uniform_rank")) for m in mods):
        same("uniform.params", u.get("params"), sum(m["uniform_rank"] * (_per_rank(m) or 0) for m in mods),
             "it is the sum of the modules' uniform_rank · params_per_rank")
    if all(is_int(m.get("rank")) for m in mods):
        same("totals.adapted", t.get("adapted"), sum(m["rank"] > 0 for m in mods), "it is the number of modules of rank above 0")
    if all(isinstance(m.get("changed"), bool) for m in mods):
        same("totals.changed", t.get("changed"), sum(m["changed"] for m in mods), "it is the number of modules marked changed")
        if all(is_int(m.get("rank")) for m in mods):  # the dense update's size: the matrices the adapter carries factors for
            full = sum(m["shape"][0] * m["shape"][1] for m in mods if m["changed"] or m["rank"])
            same("totals.full_params", t.get("full_params"), full, "it is out · in summed over the modules changed or adapted")
    if is_num(t.get("params")) and is_num(t.get("full_params")) and t["full_params"] > 0:
        same("totals.param_fraction", t.get("param_fraction"), t["params"] / t["full_params"], "it is params / full_params")


def title(path: Path, doc: dict[str, Any]) -> str:
    """How the findings and warnings name this input (after :func:`check`: the report calls this first)."""
    check(path, doc)
    return f"extract ({doc.get('mode')}): {doc.get('tuned')} − {doc.get('base')}"


def findings(path: Path, doc: dict[str, Any]) -> list[Finding]:
    """The adapter in words: energy kept against the uniform rank, the spread of ranks, the budget's gap,
    the held-out losses; warnings for what the adapter does not hold."""
    check(path, doc)
    t, u = doc["totals"], doc["uniform"]
    out = []
    if doc.get("complete") is False:  # "nothing to extract" writes its extract.json too, with no adapter
        out.append(Finding("incomplete", "No adapter was written (complete: false): the run found nothing to extract, or "
                           "stopped; the numbers below are what it measured, not an adapter's." if doc.get("adapter") is None else
                           "This run did not finish (complete: false): finish it with `spectra extract … --resume`.", warning=True))
    changed = t.get("changed", t["modules"])  # extract.json before the count: every module counted
    if changed == 0:  # no energy to keep: "100% with 0 parameters" and "13 of the 0 changed" said nothing true
        out.append(Finding("modules", f"None of the {t['modules']} modules changed (ΔW = 0, or at the rounding level of its "
                                      "stored weights): there is no update to extract.", warning=True))
        return out + [Finding("warning", w, warning=True) for w in doc.get("warnings", [])]
    if t.get("energy_kept") is not None:
        # energy_kept is of the extracted matrices only: an embedding or head left out holds energy the
        # adapter does not, which "of the update's energy" hid (energy_kept_all is of every weight matrix)
        text = (f"The adapter keeps {t['energy_kept']:.1%} of the extracted matrices' energy{_of_all(doc)} with "
                f"{t['params']:,} LoRA parameters ({t['param_fraction']:.2%} of the full update's), "
                f"ranks {t['min_rank']}–{t['max_rank']}")
        if u.get("energy_kept") is not None:
            text += f"; a uniform rank {u['rank']} with the same parameters would keep {u['energy_kept']:.1%}"
        out.append(Finding("energy", text + ".", numbers={"energy_kept": t["energy_kept"], "uniform": u.get("energy_kept"),
                                                          "energy_kept_all": t.get("energy_kept_all"),
                                                          "not_extracted_energy_share": t.get("not_extracted_energy_share")}))
    rest = f"; {t['modules'] - changed} unchanged or at the rounding level" if changed < t["modules"] else ""
    out.append(Finding("modules", f"{t['modules_at_90']} of the {changed} changed modules keep at least 90% of their energy "
                                  f"(median module {t['median_energy_kept']:.1%}, lowest {t['min_energy_kept']:.1%}{rest}).",
                       numbers={"modules_at_90": t["modules_at_90"]}))
    a = doc.get("allocation")
    if a:
        best = ("every component fitted; " if a.get("critical") is None else
                "it keeps the most energy any allocation of whole components can (the exact search proved it); "
                if a.get("optimal") else "the exact search gave up: the greedy's allocation, not proven the most; ")
        out.append(Finding("budget", f"The allocation used {a['used_params']:,} of {a['budget_params']:,} parameters; "
                                     f"{best}no allocation within the budget could keep more than {a['fractional_bound']:.2%} "
                                     f"(gap {a['gap']:.2e} of the energy).", numbers=dict(a)))
    ev = doc.get("eval")
    if ev:
        loss = ev["loss"]
        rec = ev.get("recovered") or {}
        text = (f"Held-out loss on {Path(ev['text']).name}: base {loss['base']:.4f}, tuned {loss['tuned']:.4f}, "
                f"base + adapter {loss['extracted']:.4f}, base + uniform adapter {loss['uniform']:.4f} nats/token")
        if rec.get("extracted") is not None:
            text += (f"; the adapter reproduces {rec['extracted']:.0%} of the fine-tune's loss change "
                     f"(uniform: {rec['uniform']:.0%})")
        out.append(Finding("eval", text + ".", numbers={"loss": loss, "recovered": rec}))
    lost = [r for r in doc.get("not_lora", []) if r.get("held") is None]
    if lost:
        worst = max(lost, key=lambda r: r.get("rel_norm") or 0.0)
        out.append(Finding("not_lora", f"{len(lost)} changed norms or biases are not in the adapter (largest change "
                                       f"‖Δ‖/‖base‖ = {worst.get('rel_norm') or 0:.3g}, {worst['name']}); --save-modules keeps those PEFT can hold.",
                           warning=True))
    left = [r for r in doc.get("not_extracted", []) if (r.get("rel_norm") or 0) > 0]
    if left:
        worst = max(left, key=lambda r: r.get("rel_norm") or 0.0)
        out.append(Finding("not_extracted", f"{len(left)} changed matrices are not in the adapter (largest ‖ΔW‖/‖W‖ = "
                                            f"{worst['rel_norm']:.3g}, {worst['name']}: {worst['reason']}).", warning=True))
    out += [Finding("warning", w, warning=True) for w in doc.get("warnings", [])]
    return out


def _of_all(doc: dict[str, Any]) -> str:
    """`` (x% of all the weight matrices': the n not extracted, e.g. NAME, hold y%)`` when matrices left out of the
    adapter (``not_extracted``, and an adapter's ``modules_to_save`` matrices not saved) hold any of ‖ΔW‖²_F; else ``""``
    (an extract.json before ``energy_kept_all`` too)."""
    t = doc["totals"]
    share, kept_all = t.get("not_extracted_energy_share"), t.get("energy_kept_all")
    if not (is_num(share) and share > 0 and is_num(kept_all)):
        return ""
    left = [r for r in doc.get("not_extracted") or [] if isinstance(r, dict)]
    left += [r for r in doc.get("not_lora") or [] if isinstance(r, dict) and r.get("kind") == "modules_to_save of the adapter"
             and len(r.get("shape") or ()) == 2 and not r.get("held")]
    # the largest named: the matrices as energy_kept_all counts them (extract_results.build_result)
    left = sorted((r for r in left if is_num(r.get("fro_norm")) and r["fro_norm"] > 0), key=lambda r: -r["fro_norm"])
    # a share below the printed precision is said as such, not as "0.0%" beside a claim that it holds some
    said = f"{share:.1%}" if share >= 0.0005 else "under 0.05%"
    who = (f"the {len(left)} not extracted, e.g. {left[0].get('name')}," if len(left) > 1 else
           f"{left[0].get('name')}, not extracted," if left else "those not extracted")
    # a NaN matrix left out has no energy to count
    of = "of every weight matrix with a finite ΔW" if t.get("unmeasured") else "of all the weight matrices'"
    return f" ({kept_all:.1%} {of}: {who} hold{'s' if len(left) == 1 else ''} {said})"


def section_html(path: Path, doc: dict[str, Any]) -> str:
    """The report section of one ``extract.json``."""
    check(path, doc)
    t, u, s = doc["totals"], doc["uniform"], doc.get("serving") or {}
    sel = doc.get("selection") or {}
    rule = {"rank": f"--rank {sel.get('rank')}", "energy": f"--energy {sel.get('energy')}",
            "budget": f"--budget {sel.get('budget')} ({sel.get('budget_params') or 0:,} parameters)"}.get(doc.get("mode"), "")
    out = [f"<h2>LoRA extraction: {esc(doc.get('tuned'))} − {esc(doc.get('base'))}</h2>",
           f"<p>results: {esc(path)} · rule: {esc(rule)} · adapter dtype {esc(doc.get('dtype'))} · "
           f"{esc(doc.get('strategy'))} · {doc.get('elapsed_s', 0):.1f} s on {esc(doc.get('device'))}</p>"]
    changed = t.get("changed", t["modules"])
    rows = [["extracted", t["params"], t["param_fraction"], t["energy_kept"], t["rel_fro_error"], f"{t['modules_at_90']} / {changed}"],
            [f"uniform r = {u['rank']}", u["params"], u["params"] / t["full_params"] if t.get("full_params") else None,
             u["energy_kept"], u["rel_fro_error"], f"{u['modules_at_90']} / {changed}"]]
    a = doc.get("allocation")
    if a:
        rows.append(["fractional bound (no allocation keeps more)", a["budget_params"], None, a["fractional_bound"], None, None])
    out.append(table(["adapter", "LoRA params", "share of the full update", "energy kept", "‖ΔW − BA‖/‖ΔW‖", "changed modules ≥ 90%"],
                     rows))
    if s.get("max_lora_rank"):
        # every value read from the file is escaped, numbers too: a hand-edited extract.json is untrusted
        out.append(f"<p>Serving with vLLM: max_lora_rank {esc(s['max_lora_rank'])} for {esc(s['modules'])} modules, "
                   f"{esc(format(s['params'], ','))} parameters allocated per adapter slot.</p>")
    out.append(note("Energy kept is the share of ‖ΔW‖²_F (summed over the modules) that the adapter's B·A reproduces; "
                    "the truncation's relative error is √(1 − energy kept). The uniform row spends the same number of "
                    "parameters on one rank for every module: the difference is what choosing ranks per module buys."))
    ev = doc.get("eval")
    if ev:
        rec = ev.get("recovered") or {}
        out.append("<h3>Held-out loss</h3>")
        out.append(table(["model", "loss (nats/token)", "share of the fine-tune's loss change"],
                         [[k, v, rec.get(k) if k not in ("base", "tuned") else (0.0 if k == "base" else 1.0)] for k, v in ev["loss"].items()]))
        out.append(note(f"Mean token cross-entropy on the first {esc(ev['blocks'])} blocks of {esc(ev['seq_len'])} tokens of "
                        f"{esc(ev['text'])}; the share is (base − model) / (base − tuned).{_eval_how(ev)}"))
    out.append(svg_img(energy_figure(doc), alt="energy kept and rank per module"))
    heat = rank_heatmap(doc)
    if heat is not None:
        out.append(svg_img(heat, alt="rank per layer and module"))
    out.append("<h3>Every module (click a column to sort)</h3>")
    out.append(table(["module", "layer", "shape", "rank", "params", "energy kept", "‖ΔW − BA‖/‖ΔW‖", "σ_{r+1}/σ₁", "uniform",
                      "‖ΔW‖/‖W‖", "method", "note"],
                     [[m["name"], m.get("layer"), "×".join(map(str, m["shape"])), m["rank"], m["params"], m["energy_kept"],
                       m["rel_fro_error"], m.get("spectral_error"), m.get("uniform_energy_kept"), m.get("rel_norm"),
                       m.get("method"), m.get("note")] for m in doc["modules"]], sortable=True))
    out.append(legend(COLUMNS))
    if doc.get("not_extracted"):
        out.append("<h3>Matrices not in the adapter</h3>")
        out.append(table(["name", "shape", "‖ΔW‖/‖W‖", "why"],
                         [[r["name"], "×".join(map(str, r["shape"])), r.get("rel_norm"), r["reason"]] for r in doc["not_extracted"]]))
    if doc.get("not_lora"):
        out.append("<h3>Norms and biases (a LoRA holds matrices only)</h3>")
        out.append(table(["name", "kind", "‖Δ‖/‖base‖", "kept as", "why"],
                         [[r["name"], r["kind"], r.get("rel_norm"), r.get("held") or "not kept", r.get("reason")] for r in doc["not_lora"]],
                         sortable=True))
    return "\n".join(out)


def _eval_how(ev: dict[str, Any]) -> str:
    """How the text was read and the adapters scored (older extract.json files lack these keys)."""
    tok, scored = ev.get("tokenizer"), ev.get("scored")
    out = ""
    if isinstance(tok, dict):
        where = {"base": "the base folder's tokenizer", "tuned": "the tuned folder's tokenizer (the base has none)",
                 "bytes": "UTF-8 bytes (no tokenizer files)"}.get(tok.get("source"), tok.get("source"))
        out += f" Text read with {esc(where)}."
    if isinstance(scored, dict):
        out += " Adapters scored " + esc(", ".join(f"{k}: {v}" for k, v in scored.items() if k != "base")) + "."
    return out


__all__ = ["COLUMNS", "SCHEMA", "check", "findings", "section_html", "title"]
