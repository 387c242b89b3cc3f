"""Twentieth round, ``spectra report``: compare.json, interfere.json and extract.json values no run writes
(out of range, inconsistent with each other, a record twice) are refused in one line naming the file, the
record and the field; a trace refused for its filters leaves no journal that reads as a run to resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectra.comparison import compare
from spectra.errors import ConfigError, ResultsFormatError, SpectraError
from spectra.extract import extract
from spectra.extract_plan import ExtractConfig
from spectra.interfere import interfere
from spectra.report import build_report
from spectra.trace import JOURNAL, TraceConfig, trace

SHAPES = {f"model.layers.{i}.{m}.weight": s for i in range(2)
          for m, s in (("self_attn.q_proj", (16, 16)), ("self_attn.v_proj", (16, 16)), ("mlp.up_proj", (32, 16)))}


def _save(folder: Path, weights: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return str(folder)


def _tuned(base: dict[str, torch.Tensor], seed: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape[0], rank, generator=g) @ torch.randn(rank, v.shape[1], generator=g) / rank
            for k, v in base.items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A base, two full fine-tunes and a copy of the base (an update that is exactly zero: nulls in the results),
    and the real outputs of compare, interfere and extract on them."""
    root = tmp_path_factory.mktemp("h20r")
    g = torch.Generator().manual_seed(0)
    W = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    base, t1, t2, zero = (_save(root / n, w) for n, w in (("base", W), ("t1", _tuned(W, 1, 2)), ("t2", _tuned(W, 2, 4)),
                                                           ("zero", dict(W))))
    compare(t1, t2, base=base, out_dir=root / "cmp", plots=False)
    compare(zero, t1, base=base, out_dir=root / "cmp0", plots=False)  # A's update is zero: rank 0, measures null
    interfere(base, [t1, t2, zero], out_dir=root / "if", plots=False)
    extract(base, t1, root / "ex", config=ExtractConfig(rank=2), plots=False)
    return {"root": root, "base": Path(base), "t1": Path(t1), "compare": root / "cmp" / "compare.json",
            "compare0": root / "cmp0" / "compare.json", "interfere": root / "if" / "interfere.json",
            "extract": root / "ex" / "extract.json"}


def _refused(tmp_path: Path, source: Path, edit, *needles: str) -> str:
    """Build a report of ``source`` (accepted as written), then of ``source`` edited by ``edit``, which must be
    refused in one line naming the file and each of ``needles``; the message."""
    build_report([source])  # the writer's file is read
    doc = json.loads(source.read_text())
    edit(doc)
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / source.name).write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError) as info:
        build_report([folder])
    text = str(info.value)
    assert "\n" not in text and source.name in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def _each(key: str, fn):
    def edit(doc):
        for m in doc[key]:
            fn(m)
    return edit


# ---- compare.json ----------------------------------------------------------------------------------------
def _two_sided_above_best(m):
    c = m["captured"]["b_in_a"]
    c["two_sided"] = min(1.0, c["best_rank_r"] + 0.2)


COMPARE_EDITS = {
    "phi 5": (_each("modules", lambda m: m["phi"]["right"].__setitem__("phi_full", 5.0)), "modules[0].phi.right.phi_full"),
    "phi -0.5": (_each("modules", lambda m: m["phi"]["right"].__setitem__("phi_full", -0.5)), "phi.right.phi_full"),
    "captured 300%": (_each("modules", lambda m: m["captured"]["b_in_a"].__setitem__("two_sided", 3.0)),
                      "captured.b_in_a.two_sided"),
    "captured above the best": (_each("modules", _two_sided_above_best), "captured.b_in_a.two_sided", "best_rank_r"),
    "intruders -4": (_each("modules", lambda m: m["intruders"]["a"].__setitem__("count", -4)), "intruders.a.count"),
    "intruders 99999": (_each("modules", lambda m: m["intruders"]["a"].__setitem__("count", 99999)), "intruders.a.count"),
    "intruder counts": (_each("modules", lambda m: m["intruders"]["b"]["counts"].__setitem__("0.5", 50)),
                        "intruders.b.counts"),
    "rank -3": (_each("modules", lambda m: m.__setitem__("rank_a", -3)), "modules[0].rank_a"),
    "rank 1000": (_each("modules", lambda m: m.__setitem__("rank_a", 1000)), "modules[0].rank_a", "min(out, in)"),
    "fro -1": (_each("modules", lambda m: m.__setitem__("fro_a", -1.0)), "modules[0].fro_a"),
    "cosines": (_each("modules", lambda m: m["angles"]["right"].__setitem__("cosines", [5.0, -2.0])),
                "angles.right.cosines"),
    "grassmann": (_each("modules", lambda m: m["angles"]["right"].__setitem__("grassmann", -1.0)), "angles.right.grassmann"),
    "phi grids": (lambda d: [g.__setitem__(s, [[7.0] * len(grid[0]) for _ in grid]) for g in d["phi_grids"].values()
                             for s, grid in list(g.items())], "phi_grids["),
    "layer": (_each("modules", lambda m: m.__setitem__("layer", -7)), "modules[0].layer"),
    "elapsed": (lambda d: d.__setitem__("elapsed_s", -3.0), "elapsed_s"),
    "module twice": (lambda d: d["modules"].append(copy.deepcopy(d["modules"][0])), f"modules[{len(SHAPES)}].name"),
    "d": (_each("modules", lambda m: m["phi"]["right"].__setitem__("d", 3)), "phi.right.d"),
    "amplification": (_each("modules", lambda m: m["amplification"]["a"].__setitem__("factor", 1000.0)),
                      "amplification.a.factor"),
    "out 0": (_each("modules", lambda m: m.__setitem__("out", 0)), "modules[0].out must be a positive integer"),
    "in 0": (_each("modules", lambda m: m.__setitem__("in", 0)), "modules[0].in must be a positive integer"),
}


@pytest.mark.parametrize("case", list(COMPARE_EDITS))
def test_compare_json_values_no_comparison_gives_are_refused(made, tmp_path, case):
    """Each was shown as a finding with exit 0 ("A's top subspaces hold 300% of B's update energy", "reaches 129% of
    what was possible", a table of −4 intruders, "median over 24 modules"), or (out 0) a ZeroDivisionError."""
    edit, *needles = COMPARE_EDITS[case]
    _refused(tmp_path, made["compare"], edit, *needles)


def test_zero_update_records_stay_readable_and_rank_0_needs_their_status(made, tmp_path):
    """The writer's record of an exactly zero update (rank 0, null measures) is read; rank 0 on a module whose
    status says every measure was computed is not."""
    doc = json.loads(made["compare0"].read_text())
    assert {m["status"] for m in doc["modules"]} == {"zero_update"} and {m["rank_a"] for m in doc["modules"]} == {0}
    _refused(tmp_path, made["compare0"], _each("modules", lambda m: m.__setitem__("status", "ok")), "modules[0].rank_a")


def test_out_0_in_compare_json_is_one_line_from_the_cli(made, tmp_path):
    """The probe's traceback (ZeroDivisionError in random_two_sided) through the CLI: exit 1, one line."""
    doc = json.loads(made["compare"].read_text())
    doc["modules"][0]["out"] = 0
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.json").write_text(json.dumps(doc))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.run([sys.executable, "-c", "from spectra_cli.main import run; run()", "report", str(tmp_path / "c"),
                           "-o", str(tmp_path / "r.html")], capture_output=True, text=True, timeout=240, cwd=root, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "modules[0].out must be a positive integer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- interfere.json ---------------------------------------------------------------------------------------
def _summary(key, value):
    return lambda d: d["summary"].__setitem__(key, value)


def _cell(path, s, t, value, *, both=False):
    def edit(doc):
        m = doc
        for k in path:
            m = m[k]
        m[s][t] = value
        if both:
            m[t][s] = value
    return edit


INTERFERE_EDITS = {
    "summary cosine 5": (_cell(("summary", "cosine"), 0, 1, 5.0), "summary.cosine[0][1]"),
    "summary cosine one-sided": (_cell(("summary", "cosine"), 0, 1, 0.9), "summary.cosine[0][1]", "symmetric"),
    "summary cosine not the median": (_cell(("summary", "cosine"), 0, 1, 0.75, both=True), "summary.cosine[0][1]", "median"),
    "spectral_over_max -5": (_summary("spectral_over_max", -5.0), "summary.spectral_over_max"),
    "phi -3": (_cell(("summary", "phi"), 0, 1, -3.0), "summary.phi[0][1]"),
    "phi 7": (_cell(("summary", "phi"), 1, 0, 7.0), "summary.phi[1][0]"),
    "captured 42": (_cell(("summary", "captured"), 0, 1, 42.0), "summary.captured[0][1]"),
    "summary modules": (_summary("modules", 999), "summary.modules"),
    "module cosine 9": (_cell(("modules", 0, "cosine"), 0, 1, 9.0), "modules[0]", ".cosine[0][1]"),
    "module fro -1": (lambda d: d["modules"][0]["fro"].__setitem__(0, -1.0), "modules[0]", ".fro[0]"),
    "module ranks": (lambda d: d["modules"][0]["ranks"].__setitem__(0, "x"), "modules[0]", ".ranks[0]"),
    "module twice": (lambda d: d["modules"].append(copy.deepcopy(d["modules"][0])), f"modules[{len(SHAPES)}]", ".name"),
    "no modules, summary kept": (lambda d: d.__setitem__("modules", []), "summary.modules"),
    "warnings a string": (lambda d: d.__setitem__("warnings", "abc"), "warnings"),
    "names twice": (lambda d: d.__setitem__("names", ["a", "a", "b"]), "names"),
    "kinds": (lambda d: d.__setitem__("kinds", [1, 2, 3]), "kinds"),
    "elapsed": (lambda d: d.__setitem__("elapsed_s", -5), "elapsed_s"),
}


@pytest.mark.parametrize("case", list(INTERFERE_EDITS))
def test_interfere_json_values_no_run_gives_are_refused(made, tmp_path, case):
    """Each was shown with exit 0 ("median cosine 5.00", "over 12 matrices" of none listed, three warnings "a", "b",
    "c"); the writer's file, with nulls for the zero update, is read."""
    edit, *needles = INTERFERE_EDITS[case]
    _refused(tmp_path, made["interfere"], edit, *needles)


# ---- extract.json -----------------------------------------------------------------------------------------
def _params_of_rank(m):
    m["params"] = m["rank"] * (sum(m["shape"]) - 1)


EXTRACT_EDITS = {
    "totals.params": (lambda d: d["totals"].__setitem__("params", 10**12), "totals.params"),
    "module params": (lambda d: _params_of_rank(d["modules"][0]), "modules[0]", ".params", "r·(out + in)"),
    "shape": (lambda d: d["modules"][0].__setitem__("shape", "x"), "modules[0]", ".shape"),
    "module twice": (lambda d: d["modules"].append(copy.deepcopy(d["modules"][0])), f"modules[{len(SHAPES)}]", ".name"),
    "totals.modules": (lambda d: d["totals"].__setitem__("modules", d["totals"]["modules"] + 1), "totals.modules"),
    "uniform.params": (lambda d: d["uniform"].__setitem__("params", d["uniform"]["params"] * 2), "uniform.params"),
}


@pytest.mark.parametrize("case", list(EXTRACT_EDITS))
def test_extract_json_totals_and_modules_must_agree(made, tmp_path, case):
    """totals.params = 10¹² read "with 1,000,000,000,000 LoRA parameters" over modules summing to far fewer; a module
    appended twice was an extra row while the findings counted each module once."""
    edit, *needles = EXTRACT_EDITS[case]
    _refused(tmp_path, made["extract"], edit, *needles)


# ---- trace: a refused plan leaves no journal -----------------------------------------------------------------
def _write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    folder.mkdir(parents=True)
    tensors = {}
    for name, (B, A) in factors.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["q_proj", "up_proj"]}))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_trace_refused_for_its_filters_leaves_no_journal(made, tmp_path, kind):
    """--include that matches nothing failed with exit 1 but left trace_journal.jsonl holding only its fingerprint,
    which the report called an unfinished trace to finish with --resume (which fails alike)."""
    run = tmp_path / "run"
    g = torch.Generator().manual_seed(3)
    for step in (10, 20):
        if kind == "full":
            W = _load(made["t1"])
            _save(run / f"checkpoint-{step}", {k: v + 0.01 * step * torch.randn(v.shape, generator=g) for k, v in W.items()})
        else:
            _write_adapter(run / f"checkpoint-{step}", {n: (torch.randn(s[0], 2, generator=g), torch.randn(2, s[1], generator=g))
                                                         for n, s in SHAPES.items() if "v_proj" not in n})
    out = tmp_path / "tr"
    with pytest.raises(ConfigError, match="no matrix is left by --include 'nomatch'"):
        trace(str(made["base"]), [str(run)], config=TraceConfig(include="nomatch"), out_dir=out, plots=False)
    assert not (out / JOURNAL).exists()
    res = trace(str(made["base"]), [str(run)], config=TraceConfig(include="q_proj"), plots=False)  # a filter that matches
    assert res.matrices and all("q_proj" in m["name"] for m in res.matrices)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_report_of_a_journal_with_no_record_gives_no_resume_hint(tmp_path):
    """A journal of its fingerprint alone (a run stopped or refused before it finished anything) has nothing to
    resume: the report says to run the command again; one holding a record still says --resume."""
    empty, started = tmp_path / "empty", tmp_path / "started"
    for folder, lines in ((empty, ['{"fingerprint": "abc"}']), (started, ['{"fingerprint": "abc"}', '{"matrix": {}}'])):
        folder.mkdir()
        (folder / JOURNAL).write_text("\n".join(lines) + "\n")
    with pytest.raises(SpectraError) as info:
        build_report([empty])
    assert "--resume" not in str(info.value) and "run the command again" in str(info.value), str(info.value)
    with pytest.raises(SpectraError, match="finish it with the same command and --resume"):
        build_report([started])
