"""Twenty-third round, journals edited before ``--resume`` (docs/bad_inputs.md, "twenty-third round"): ``extract``,
``trace`` and ``esd`` took a changed record into their results with exit 0 (σ₁ × 10 gave a kept share of 1.38; an
energy rank against its own singular values; an α against its own verdict), and ``extract`` took a scratch file
swapped with another module's, or named by the journal anywhere. Every command's records are sealed now, as compare's
and interfere's were; a scratch file is used only if it holds the bytes it was written with."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectra.errors import ResultsFormatError
from tests.test_hostile21_resume import _folder, _run


def _pair(root: Path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    W = {f"model.layers.{i}.self_attn.{m}.weight": torch.randn(24, 24, generator=g) for i in range(2) for m in ("q_proj", "k_proj")}
    save_file(W, str(root / "b.safetensors"))
    save_file({k: v + 0.3 * torch.randn(24, 3, generator=g) @ torch.randn(3, 24, generator=g) for k, v in W.items()},
              str(root / "t.safetensors"))
    return str(root / "b.safetensors"), str(root / "t.safetensors")


def _stopped_after(src: Path, dst: Path, journal: str, keep: int) -> Path:
    """A copy of the finished run ``src`` as if stopped after ``keep`` journal records (its results gone)."""
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.is_file() and f.suffix in (".json", ".csv", ".html", ".png", ".safetensors") and f.name != "adapter_config.json":
            f.unlink()
    lines = (dst / journal).read_text().splitlines(keepends=True)
    (dst / journal).write_text("".join(lines[: 1 + keep]))
    return dst / journal


def _edit(journal: Path, line: int, old: str, new: str) -> None:
    lines = journal.read_text().splitlines(keepends=True)
    assert old in lines[line - 1], lines[line - 1][:200]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    journal.write_text("".join(lines))


def test_extract_refuses_an_edited_record_and_recomputes_swapped_scratch_files(tmp_path):
    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    base, tuned = _pair(tmp_path)
    cfg = ExtractConfig(rank=3)
    extract(base, tuned, tmp_path / "ref", config=cfg, plots=False)
    want = (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()
    # a spectrum record's σ₁ times ten: refused, naming the line
    journal = _stopped_after(tmp_path / "ref", tmp_path / "a", "extract.jsonl", keep=3)
    rec = json.loads(journal.read_text().splitlines()[1])
    s1 = rec["spectrum"]["S"][0]
    _edit(journal, 2, json.dumps(s1), json.dumps(s1 * 10))
    with pytest.raises(ResultsFormatError, match=r"record 2 was changed after it was written") as e:
        extract(base, tuned, tmp_path / "a", config=cfg, resume=True, plots=False)
    assert "extract.jsonl" in str(e.value)
    # the scratch files of two modules of one shape swapped: recomputed, the adapter is the uninterrupted run's
    def stop(event) -> None:
        if event.done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(base, tuned, tmp_path / "b", config=cfg, plots=False, callback=stop)
    scratch = tmp_path / "b" / ".extract-scratch"
    files = sorted(scratch.glob("*.safetensors"))
    assert len(files) >= 2
    a, b = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(b)
    files[1].write_bytes(a)
    extract(base, tuned, tmp_path / "b", config=cfg, resume=True, plots=False)
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == want
    # a journal whose factor record names another file is refused by its seal (it never reads a path it names)
    with pytest.raises(KeyboardInterrupt):
        extract(base, tuned, tmp_path / "c", config=cfg, plots=False, callback=stop)
    journal = tmp_path / "c" / "extract.jsonl"
    text = journal.read_text()
    line = next(i for i, x in enumerate(text.splitlines(), start=1) if '"factors"' in x and '"file": "1.safetensors"' in x)
    _edit(journal, line, '"file": "1.safetensors"', '"file": "../../x.safetensors"')
    with pytest.raises(ResultsFormatError, match=rf"record {line} was changed"):
        extract(base, tuned, tmp_path / "c", config=cfg, resume=True, plots=False)


def test_trace_refuses_an_edited_energy_rank(tmp_path):
    from spectra.trace import trace

    base, run = _run(tmp_path)
    trace(str(base), [str(run)], out_dir=tmp_path / "a", plots=False)
    journal = _stopped_after(tmp_path / "a", tmp_path / "b", "trace_journal.jsonl", keep=2)
    line = journal.read_text().splitlines()[1]
    rank = re.search(r'"0\.9": (\d+)', line)
    assert rank
    _edit(journal, 2, rank.group(0), f'"0.9": {int(rank.group(1)) + 3}')
    with pytest.raises(ResultsFormatError, match="record 2 was changed after it was written"):
        trace(str(base), [str(run)], out_dir=tmp_path / "b", resume=True, plots=False)


def test_esd_refuses_an_edited_alpha(tmp_path):
    from spectra.esd_run import EsdConfig, esd

    model = _folder(tmp_path / "model", 0)
    esd(str(model), out_dir=tmp_path / "a", config=EsdConfig(device="cpu"), plots=False)
    journal = _stopped_after(tmp_path / "a", tmp_path / "b", "esd.jsonl", keep=3)
    line = journal.read_text().splitlines()[2]
    alpha = re.search(r'"alpha": ([0-9.e+-]+)', line)
    assert alpha
    _edit(journal, 3, alpha.group(0), '"alpha": 3.0')
    with pytest.raises(ResultsFormatError, match="record 3 was changed after it was written"):
        esd(str(model), out_dir=tmp_path / "b", config=EsdConfig(device="cpu"), resume=True, plots=False)


def test_a_record_with_an_infinite_norm_is_journaled_as_null_and_resumes(tmp_path):
    """The review: sealing every record made json.dumps(allow_nan=False) run before the journal's NaN/Inf → null, so
    extract of a float64 base whose ‖W‖ overflows failed with a traceback (it used to finish)."""
    import numpy as np

    from spectra.extract import extract
    from spectra.extract_plan import ExtractConfig

    g = torch.Generator().manual_seed(0)
    b = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, dtype=torch.float64, generator=g) * 1e307,
         "model.layers.0.self_attn.v_proj.weight": torch.randn(64, 64, dtype=torch.float64, generator=g)}
    t = {k: v.clone() for k, v in b.items()}
    t["model.layers.0.self_attn.q_proj.weight"][:4] *= 1.5
    t["model.layers.0.self_attn.v_proj.weight"] += torch.randn(64, 2, dtype=torch.float64, generator=g) @ \
        torch.randn(2, 64, dtype=torch.float64, generator=g)
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    cfg = ExtractConfig(rank=2)

    def stop(event) -> None:
        if event.done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "x", config=cfg, plots=False,
                callback=stop)
    lines = [json.loads(x) for x in (tmp_path / "x" / "extract.jsonl").read_text().splitlines()[1:]]
    assert any(r.get("spectrum", {}).get("base_fro", 0) is None for r in lines)  # ‖W_base‖ overflows: null
    res = extract(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), tmp_path / "x", config=cfg, plots=False,
                  resume=True)
    v = next(m for m in res.modules if "v_proj" in m["name"])
    S = np.linalg.svd((t["model.layers.0.self_attn.v_proj.weight"] - b["model.layers.0.self_attn.v_proj.weight"]).numpy(),
                      compute_uv=False)
    assert v["rank"] == 2 and v["energy_kept"] == pytest.approx(1.0, abs=1e-9) and S[2] / S[0] < 1e-12


def test_diff_refuses_an_edited_record_its_checks_cannot_see(tmp_path):
    """The last probe: diff's results.jsonl was not sealed; a base_fro_norm edited from 0 to 10 (plausible for every
    check of a record) went into results.json on --resume, exit 0."""
    import spectra

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)]
    b = {n: (torch.zeros(8, 6) if i == 1 else torch.randn(8, 6, generator=g)) for i, n in enumerate(names)}
    t = {n: v + 0.1 * torch.randn(8, 6, generator=g) for n, v in b.items()}
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(t, str(tmp_path / "t.safetensors"))
    args = (str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    spectra.diff(*args, out_dir=tmp_path / "a", plots=False)
    out = tmp_path / "c"
    out.mkdir()
    (out / "results.json").write_text((tmp_path / "a" / "results.json").read_text())
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines(keepends=True)
    line = next(i for i, x in enumerate(lines, start=1) if names[1] in x)
    (out / "results.jsonl").write_text("".join(lines[:line]))  # stopped after that record
    _edit(out / "results.jsonl", line, '"base_fro_norm": 0.0', '"base_fro_norm": 10.0')
    with pytest.raises(ResultsFormatError, match=rf"record {line} was changed after it was written") as e:
        spectra.diff(*args, out_dir=out, resume=True, plots=False)
    assert "results.jsonl" in str(e.value)
    # unedited, the same stopped journal resumes to the uninterrupted run's numbers
    (out / "results.jsonl").write_text("".join(lines[:line]))
    res = spectra.diff(*args, out_dir=out, resume=True, plots=False)
    whole = {m.name: m for m in spectra.diff(*args, plots=False).modules}
    assert {m.name: (m.fro_norm, m.base_fro_norm) for m in res.modules} == {n: (m.fro_norm, m.base_fro_norm) for n, m in whole.items()}
