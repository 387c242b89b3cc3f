"""Twenty-first round, ``spectra trace``: the report's per-module table takes its medians over the matrices that
changed (as the terminal table and trace.json's findings do); a checkpoint-N link to a sibling checkpoint, or one
set of weights listed under two spellings (a folder and its weights file), is traced once; a model beside the
checkpoints whose trainer_state.json gives its step is left out with that step said, not called unknown."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ConfigError
from spectra.trace_inputs import find_checkpoints, moved
from tests.cli_util import cli as _cli

D = 16
NAMES = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: 0.05 * torch.randn(D, D, generator=g) for n in NAMES}


def _at_step(base: dict[str, torch.Tensor], step: int, frozen=lambda name: False) -> dict[str, torch.Tensor]:
    """The base plus a planted update whose rank grows with the step (the same directions at every step, per matrix);
    ``frozen`` matrices (and every up_proj: a module kind that never changes) stay equal to the base."""
    out = {}
    for j, (n, w) in enumerate(base.items()):
        g = torch.Generator().manual_seed(100 + j)
        U, V = torch.linalg.qr(torch.randn(D, D, generator=g))[0], torch.linalg.qr(torch.randn(D, D, generator=g))[0]
        r = min(1 + step // 10 + j % 2, 8)
        s = torch.tensor([0.1 * 0.7 ** i for i in range(r)]) * step / 10
        out[n] = w.clone() if frozen(n) or "up_proj" in n or step == 0 else w + (U[:, :r] * s) @ V[:, :r].T
    return out


def _write(folder: Path, weights: dict[str, torch.Tensor], step: int | None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                               "log_history": [{"step": step, "loss": 1 / (step + 1)}]}))
    return folder


def _run(root: Path, steps: tuple[int, ...], frozen=lambda name: False) -> tuple[Path, Path]:
    base = _base()
    _write(root / "base", base, None)
    for s in steps:
        _write(root / "run" / f"checkpoint-{s}", _at_step(base, s, frozen), s)
    return root / "base", root / "run"


def _html_rows(report: str) -> dict[str, list[str]]:
    """The per-module-kind table of the report: module -> its cells as shown."""
    part = report.split("<h3>Per module kind", 1)[1].split("</table>", 1)[0]
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", part.split("<tbody>", 1)[1]):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)]
        rows[cells[0]] = cells[1:]
    return rows


def _terminal_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) == 7 and cells[1].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


def _median(doc: dict, module: str, i: int, value) -> float | None:
    """The median of ``value`` over the module kind's matrices that changed at checkpoint ``i``, from trace.json."""
    vals = [value(m["points"][i]) for m in doc["matrices"] if m["module"] == module and moved(m["points"][i])]
    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else None


def _cell(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


@pytest.mark.parametrize("case", ["frozen_layer", "first_equals_base"])
def test_report_module_table_takes_medians_over_the_matrices_that_changed(tmp_path, case):
    """The report's table counted a frozen layer's zero in its medians (rank 1 → 1.5 where the terminal and trace.json
    say 2 → 3), showed "0 0" for a module kind that never changes and "first 0" for a checkpoint equal to the base,
    where the terminal shows "–"."""
    if case == "frozen_layer":
        base, run = _run(tmp_path, (10, 20), frozen=lambda n: n == "model.layers.0.self_attn.q_proj.weight")
    else:
        base, run = _run(tmp_path, (0, 10))
    proc = _cli(["trace", str(base), str(run), "-o", str(tmp_path / "t"), "--report", "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    rows = _html_rows((tmp_path / "t" / "report.html").read_text(encoding="utf-8"))
    terminal = _terminal_rows(proc.stdout)
    key = "0.9" if "0.9" in doc["matrices"][0]["points"][-1]["energy_rank"] else sorted(
        doc["matrices"][0]["points"][-1]["energy_rank"])[0]
    rank = lambda p: (p.get("energy_rank") or {}).get(key)  # noqa: E731
    rel = lambda p: p.get("rel_norm")  # noqa: E731
    modules = {m["module"] for m in doc["matrices"]}
    assert len(modules) == 3 and set(rows) == modules and set(terminal) == modules, (rows, terminal, modules)
    for module in modules:
        expected = [_median(doc, module, i, fn) for fn in (rank, rel) for i in (0, -1)]
        assert rows[module][1:5] == [_cell(x, 4) for x in expected], (module, rows[module], expected)
        assert terminal[module][1:5] == [_cell(x, 3) for x in expected], (module, terminal[module], expected)
    assert rows["up_proj" if "up_proj" in rows else next(m for m in modules if "up_proj" in m)][1:5] == ["–"] * 4
    if case == "frozen_layer":  # the planted ranks: the frozen layer-0 q_proj's zero is left out
        q = next(m for m in modules if "q_proj" in m)
        assert _median(doc, q, 0, rank) is not None and rows[q][1] == _cell(_median(doc, q, 0, rank), 4)
    else:  # the first checkpoint equals the base: nothing moved there
        assert all(rows[m][1] == "–" and rows[m][3] == "–" for m in modules), rows


@pytest.mark.parametrize("link", ["checkpoint-30", "checkpoint-5"])
def test_a_checkpoint_link_to_a_sibling_is_traced_once(tmp_path, link):
    """ln -s checkpoint-20 run/checkpoint-30 was traced as a third step (exit 0, a fake plateau). The real folder is
    kept, the link left out with a reason naming both, whichever of the two sorts first."""
    base, run = _run(tmp_path, (10, 20))
    (run / link).symlink_to("checkpoint-20")
    found = find_checkpoints([str(run)])
    assert [Path(r.path).name for r in found.checkpoints] == ["checkpoint-10", "checkpoint-20"], found.checkpoints
    left = [s for s in found.skipped if Path(s["path"]).name == link]
    assert len(left) == 1 and "checkpoint-20" in left[0]["reason"], found.skipped
    assert not any(link in w for w in found.warnings), found.warnings  # no step clash said for a step that is not traced
    proc = _cli(["trace", str(base), str(run), "-o", str(tmp_path / "t"), "--no-plots"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20]
    assert link in proc.stderr and "checkpoint-20" in proc.stderr.split(link, 1)[1].split("\n", 1)[0], proc.stderr


def test_two_checkpoint_links_to_one_folder_keep_one(tmp_path):
    """Two checkpoint-N links to one checkpoint outside the run: the one whose name is its step is kept."""
    base = _base()
    _write(tmp_path / "other" / "checkpoint-20", _at_step(base, 20), 20)
    _write(tmp_path / "run" / "checkpoint-10", _at_step(base, 10), 10)
    for name in ("checkpoint-20", "checkpoint-40"):
        (tmp_path / "run" / name).symlink_to(tmp_path / "other" / "checkpoint-20")
    found = find_checkpoints([str(tmp_path / "run")])
    assert [Path(r.path).name for r in found.checkpoints] == ["checkpoint-10", "checkpoint-20"], found.checkpoints
    assert [Path(s["path"]).name for s in found.skipped] == ["checkpoint-40"], found.skipped


def test_a_folder_and_its_weights_file_are_listed_twice(tmp_path):
    """run/checkpoint-20 and run/checkpoint-20/model.safetensors were traced as two checkpoints of step 20 (only a
    same-step warning): the listed-twice check compared the arguments, not the weights they are read from."""
    base, run = _run(tmp_path, (10, 20))
    ck = run / "checkpoint-20"
    for spelling in (ck / "model.safetensors", tmp_path / "run" / "." / "checkpoint-20" / "model.safetensors"):
        with pytest.raises(ConfigError, match="listed twice"):
            find_checkpoints([str(run / "checkpoint-10"), str(ck), str(spelling)])
    (tmp_path / "w.safetensors").symlink_to(ck / "model.safetensors")
    with pytest.raises(ConfigError, match="listed twice"):
        find_checkpoints([str(run / "checkpoint-10"), str(tmp_path / "w.safetensors"), str(ck)])
    proc = _cli(["trace", str(base), str(run / "checkpoint-10"), str(ck), str(ck / "model.safetensors"),
                 "-o", str(tmp_path / "t"), "--no-plots"])
    assert proc.returncode == 1 and "listed twice" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_model_beside_the_checkpoints_with_a_known_step_says_it(tmp_path):
    """run/final/ (or run/last -> ../other/checkpoint-100) with a trainer_state.json giving global_step 100 was left out
    as "its step is not known; … give it a trainer_state.json with its global_step", though it has one."""
    base, run = _run(tmp_path, (10, 20))
    _write(run / "final", _at_step(_base(), 100), 100)
    _write(tmp_path / "other" / "checkpoint-100", _at_step(_base(), 100), 100)
    (run / "last").symlink_to(tmp_path / "other" / "checkpoint-100")
    _write(run / "nostate", _at_step(_base(), 30), None)
    found = find_checkpoints([str(run)])
    reasons = {Path(s["path"]).name: s["reason"] for s in found.skipped}
    assert set(reasons) == {"final", "last", "nostate"}, reasons
    for name in ("final", "last"):
        assert "step 100" in reasons[name] and "trainer_state.json" in reasons[name], reasons[name]
        assert "not known" not in reasons[name] and "give it a trainer_state.json" not in reasons[name], reasons[name]
    assert "not known" in reasons["nostate"], reasons["nostate"]
