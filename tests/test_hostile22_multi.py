"""Several fine-tunes and the results contract (probe C, round 22).

1. ``interfere`` and ``compare`` exited 0 when nothing could be measured because the updates were exactly
   zero (a PEFT LoRA saved at initialisation, B = 0), every measure null; ``diff`` exits 3 for that. Now
   ``compare`` exits 3 when A's or B's update is zero on every compared module, ``interfere`` when fewer
   than two tasks change any compared matrix; results are still written; ``--allow-identical`` makes it 0.
2. interfere's report header said "N matrices every task updates" of the matrices every task holds; a task
   given twice printed its "ΔW = 0 on every compared matrix … the totals hold the other tasks only" warning
   twice under one label, which was also said when no other task changed anything.
3. ``interfere.csv``'s columns (``captured_t_in_s``, ``sti_all``, …) were documented nowhere; README lists
   each with the JSON field it holds.
4. ``spectra report`` showed an ``interfere.json`` whose ``complete`` was "no", 0 or null as a finished run,
   and one whose ``complete`` is false without a word.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from spectra.errors import ResultsFormatError
from tests.cli_util import cli
from tests.conftest import random_lora, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base, a LoRA saved at initialisation (B = 0: ΔW = 0) and two LoRAs of random factors, r = 2
    on q/v of both layers (4 matrices)."""
    import peft

    root = tmp_path_factory.mktemp("h22m")
    tiny_llama().save_pretrained(root / "base")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
                        ).save_pretrained(root / "l_noop")
    for name, seed in (("l_a", 1), ("l_b", 2)):
        random_lora(tiny_llama(), seed, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]).save_pretrained(root / name)
    return {n: root / n for n in ("base", "l_noop", "l_a", "l_b")}


def _updates(adapter: Path) -> dict[str, np.ndarray]:
    """Base tensor name -> s·B·A in float64, from the adapter file (s = alpha / r = 2)."""
    f = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, A in f.items():
        if key.endswith(".lora_A.weight"):
            B = f[key.replace("lora_A", "lora_B")]
            out[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = \
                2.0 * B.astype(np.float64) @ A.astype(np.float64)
    return out


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y)))


# ---- 1: exit 3 when nothing could be measured ----------------------------------------------------------------
def test_interfere_exits_3_when_no_pair_of_tasks_is_measured(made, tmp_path):
    base, noop, a, b = (str(made[k]) for k in ("base", "l_noop", "l_a", "l_b"))
    assert all(not np.any(d) for d in _updates(made["l_noop"]).values())  # the reference: B = 0, ΔW = 0
    r = cli(["interfere", "--base", base, noop, noop, "--out", str(tmp_path / "i"), "--no-plots"])
    assert r.returncode == 3, r.stderr
    (line,) = _errors(r.stderr)
    assert "every task (l_noop (1), l_noop (2))" in line and "no pair of tasks was measured" in line, line
    assert f"results were still written to {tmp_path / 'i'}" in line and "--allow-identical" in line, line
    doc = json.loads((tmp_path / "i" / "interfere.json").read_text())
    assert doc["complete"] is True and len(doc["modules"]) == 4
    assert all(m["fro"] == [0.0, 0.0] and m["cosine"][0][1] is None for m in doc["modules"])
    r = cli(["interfere", "--base", base, noop, a, "--no-plots"])  # one task changed something: still no pair
    assert r.returncode == 3 and "only l_a changed any" in _errors(r.stderr)[0], r.stderr
    assert cli(["interfere", "--base", base, noop, a, "--no-plots", "--allow-identical"]).returncode == 0
    # a zero task among two that changed something: exit 0, its pairs null, the others' measured
    r = cli(["interfere", "--base", base, noop, a, b, "--json", "--no-plots"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ua, ub = _updates(made["l_a"]), _updates(made["l_b"])
    for m in got["modules"]:
        assert m["cosine"][0][1] is None and m["cosine"][0][2] is None
        assert m["cosine"][1][2] == pytest.approx(_cosine(ua[m["name"]], ub[m["name"]]), abs=1e-6)
        assert m["fro"][1] == pytest.approx(np.linalg.norm(ua[m["name"]]), rel=1e-5)


def test_compare_exits_3_when_a_side_is_zero_on_every_module_and_names_it(made, tmp_path):
    base, noop, a, b = (str(made[k]) for k in ("base", "l_noop", "l_a", "l_b"))
    ua = _updates(made["l_a"])
    for i, (args, side) in enumerate((([noop, a], "ΔW of A is"), ([a, noop], "ΔW of B is"), ([noop, noop], "ΔW of A and B is"))):
        out = tmp_path / f"c{i}"
        r = cli(["compare", *args, "--base", base, "--out", str(out), "--no-plots"])
        assert r.returncode == 3, (args, r.stderr)
        (line,) = _errors(r.stderr)
        assert side in line and "on every one of the 4 compared modules" in line and noop in line, line
        assert f"results were still written to {out}" in line, line
        doc = json.loads((out / "compare.json").read_text())
        for m in doc["modules"]:
            assert m["status"] == "zero_update"
            if args == [noop, a]:
                assert m["fro_a"] == 0.0 and m["fro_b"] == pytest.approx(np.linalg.norm(ua[m["name"]]), rel=1e-5)
    assert cli(["compare", noop, a, "--base", base, "--allow-identical", "--no-plots"]).returncode == 0
    r = cli(["compare", a, b, "--base", base, "--json"])  # both changed: measured, exit 0
    assert r.returncode == 0 and not _errors(r.stderr), r.stderr


# ---- 2: wording ----------------------------------------------------------------------------------------------
def test_zero_task_warning_names_each_task_once_and_says_what_the_totals_hold(made, tmp_path):
    from spectra.interfere import interfere
    from spectra.report import build_report

    base, noop, a, b = (str(made[k]) for k in ("base", "l_noop", "l_a", "l_b"))
    res = interfere(base, [noop, noop, a, b], out_dir=tmp_path / "i", plots=False)
    zero = [w for w in res.warnings if "ΔW = 0 on every compared matrix" in w]
    assert zero == [w for w in zero if w.startswith("l_noop (1), l_noop (2): ")] and len(zero) == 1, res.warnings
    assert "the totals hold the other tasks only" in zero[0]
    assert len(res.warnings) == len(set(res.warnings)), res.warnings
    res = interfere(base, [noop, a], plots=False)
    (w,) = [w for w in res.warnings if "ΔW = 0 on every compared matrix" in w]
    assert w.startswith("l_noop: ") and "the other tasks only" not in w and "the totals hold l_a alone" in w, w
    # the header counts the matrices every task holds (an adapter's targets: 2 layers × q, v)
    n = len(_updates(made["l_a"]))
    html = build_report([tmp_path / "i"])
    assert f"{n} matrices every task holds" in html and "every task updates" not in html


# ---- 3: interfere.csv's columns, documented ------------------------------------------------------------------
def _readme_columns() -> dict[str, str]:
    """interfere.csv column -> the interfere.json field README says it holds (first code span of the row)."""
    text = (ROOT / "README.md").read_text()
    part = text[text.index("`interfere.csv`: one row per matrix and pair"):]
    part = part[:part.index("Figures:")]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)`", part, flags=re.M)
    return dict(rows)


def _field(expr: str, doc: dict, m: dict, s: int, t: int):
    """The value of README's field expression (``m.tsv.pairs[s][t]``, ``names[s]``, ``s``)."""
    if expr in ("s", "t"):
        return {"s": s, "t": t}[expr]
    obj = m if expr.startswith("m.") else doc
    for key, index in re.findall(r"\.?(\w+)|\[([st])\]", expr.removeprefix("m.")):
        obj = obj[key] if key else obj[{"s": s, "t": t}[index]]
    return obj


def test_every_interfere_csv_column_is_documented_with_its_json_field(made, tmp_path):
    base, noop, a, b = (str(made[k]) for k in ("base", "l_noop", "l_a", "l_b"))
    assert cli(["interfere", "--base", base, a, b, noop, "--out", str(tmp_path / "i"), "--no-plots",
                "--top-k", "1"]).returncode == 0
    doc = json.loads((tmp_path / "i" / "interfere.json").read_text())
    rows = list(csv.DictReader(io.StringIO((tmp_path / "i" / "interfere.csv").read_text())))
    documented = _readme_columns()
    assert set(rows[0]) == set(documented), set(rows[0]) ^ set(documented)
    assert "except `interfere.csv`" in (ROOT / "README.md").read_text()  # the "joined by _" rule points to the list
    n = len(doc["tasks"])
    expected = [(m, s, t) for m in doc["modules"] for s in range(n) for t in range(s + 1, n)]
    assert len(rows) == len(expected) == 4 * 3
    for row, (m, s, t) in zip(rows, expected):
        for col, expr in documented.items():
            want, got = _field(expr, doc, m, s, t), row[col]
            if want is None:
                assert got == "", (col, got)
            elif isinstance(want, str):
                assert got == want, (col, got, want)
            else:
                assert float(got) == want, (col, got, want)
    # and against float64 numpy: the pair cosine, and the captured energy of the other's rank-1 subspace
    ua, ub = _updates(made["l_a"]), _updates(made["l_b"])
    for row in rows:
        if (row["s"], row["t"]) == ("0", "1"):
            x, y = ua[row["name"]], ub[row["name"]]
            assert float(row["cosine"]) == pytest.approx(_cosine(x, y), abs=1e-6)
            U, _, Vt = np.linalg.svd(x)
            share = np.linalg.norm(U[:, :1].T @ y @ Vt[:1].T) ** 2 / np.linalg.norm(y) ** 2  # y inside x's top-1 pair
            assert float(row["captured_t_in_s"]) == pytest.approx(share, abs=1e-5)


# ---- 4: `complete` in interfere.json -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["no", 0, None, "false"])
def test_report_refuses_a_complete_that_is_not_true_or_false(made, tmp_path, value):
    from spectra.interfere import interfere
    from spectra.report import build_report

    interfere(str(made["base"]), [str(made["l_a"]), str(made["l_b"])], out_dir=tmp_path / "i", plots=False)
    doc = json.loads((tmp_path / "i" / "interfere.json").read_text())
    doc["complete"] = value
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "interfere.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError) as info:
        build_report([tmp_path / "e" / "interfere.json"])
    text = str(info.value)
    assert "complete must be true or false" in text and "interfere.json" in text and "\n" not in text, text


def test_report_says_an_incomplete_interfere_run_did_not_finish(made, tmp_path):
    from spectra.interfere import interfere
    from spectra.report import build_report

    interfere(str(made["base"]), [str(made["l_a"]), str(made["l_b"])], out_dir=tmp_path / "i", plots=False)
    path = tmp_path / "i" / "interfere.json"
    assert "did not finish" not in build_report([path])
    doc = json.loads(path.read_text())
    doc["complete"] = False
    path.write_text(json.dumps(doc))
    html = build_report([path])
    assert "This run did not finish (complete: false)" in html and f"only the {len(doc['modules'])} matrices" in html
