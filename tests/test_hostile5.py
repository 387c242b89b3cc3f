"""Hostile and odd inputs found by the fifth outside probe: each test reproduces a finding and checks the
fix against an independent reference (numpy float64 SVD, transformers' own loading order) or the
one-line error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import spectra.esd_run as esd_run
from spectra.compare_findings import compare_findings
from spectra.config import CompareConfig, DiffConfig, search_pattern
from spectra.engine import batch_singular_values
from spectra.errors import ConfigError
from spectra.esd_run import EsdConfig, esd
from spectra.extract_plan import ExtractConfig
from spectra.interfere import InterfereConfig
from spectra.io.checkpoint import open_checkpoint
from spectra.records import esd_fields
from spectra.trace import TraceConfig
from spectra_cli.main import main


def _ww_entropy(W: np.ndarray) -> float:
    """WeightWatcher's ``RMT_Util.matrix_entropy`` on an SVD in float64: ``pᵢ = λᵢ/Σλ + 1e-10``,
    divided by ``ln(numpy matrix_rank + 1e-10)``."""
    sv = np.linalg.svd(W, compute_uv=False)
    lam = sv**2
    p = lam / lam.sum() + 1e-10
    return float(-np.sum(p * np.log(p)) / np.log(np.linalg.matrix_rank(W) + 1e-10))


def _low_rank_mats() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(96, 64, generator=g)
    w1[30:] = 0  # 30 nonzero rows: rank 30
    w2 = (torch.randn(96, 20, generator=g, dtype=torch.float64)
          @ torch.randn(20, 64, generator=g, dtype=torch.float64)).float()  # rank 20 broken by float32 rounding
    w4 = torch.randn(128, 64, generator=g)
    w4[:, 40:] = 0  # rank 40
    return {"layers.0.mlp.up_proj.weight": w1, "layers.1.mlp.up_proj.weight": w2,
            "layers.2.mlp.up_proj.weight": torch.ones(96, 64), "layers.3.mlp.up_proj.weight": w4,
            "layers.4.mlp.up_proj.weight": torch.randn(80, 48, generator=g)}


@pytest.mark.parametrize("refine", [True, False])
def test_esd_rank_and_entropy_of_rank_deficient_matrices(tmp_path, monkeypatch, refine):
    """E1: the Gram route's rounding noise (≈ σ₁·√(p·ε)) was counted as rank (30 nonzero rows gave 45, an
    all-ones matrix 21). With the SVD refinement every count and entropy equals numpy's float64 SVD (and so
    WeightWatcher's); without it (matrices too large to refine) exact deficiencies still count right."""
    mats = _low_rank_mats()
    save_file(mats, str(tmp_path / "lr.safetensors"))
    if not refine:
        monkeypatch.setattr(esd_run, "REFINE_MAX_ELEMENTS", 0)
    got = {m["name"]: m for m in esd(tmp_path / "lr.safetensors", config=EsdConfig(device="cpu")).matrices}
    for name, W in mats.items():
        Wd = W.double().numpy()
        rank = int(np.linalg.matrix_rank(Wd))
        m = got[name]
        if not refine and name == "layers.1.mlp.up_proj.weight":
            # float32 rounding lifts the 44 zero singular values to ~1e-9·σ₁, below the Gram resolution:
            # unrefined, the rank is the product's 20, not numpy's 64
            assert (m["matrix_rank"], m["rank_loss"]) == (20, 44)
            continue
        assert m["matrix_rank"] == rank, name
        assert m["rank_loss"] == min(W.shape) - rank, name
        assert m["entropy"] == pytest.approx(_ww_entropy(Wd), rel=1e-9), name
    assert got["layers.0.mlp.up_proj.weight"]["matrix_rank"] == 30
    assert got["layers.2.mlp.up_proj.weight"]["matrix_rank"] == 1


def test_esd_fields_counts_only_what_the_gram_route_resolves():
    """E1 for ``diff --esd``: its spectra come from the float64 Gram route; an all-ones matrix is rank 1."""
    for W, rank in ((torch.ones(96, 64), 1), (torch.cat([torch.randn(30, 64), torch.zeros(66, 64)]), 30)):
        S = batch_singular_values([W], device="cpu", method="gram", dtype=torch.float64)[0]
        assert int(np.linalg.matrix_rank(W.double().numpy())) == rank
        f = esd_fields(S, S, S, shape=tuple(W.shape))
        assert f["base"]["matrix_rank"] == rank and f["delta"]["rank_loss"] == 64 - rank


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


@pytest.mark.parametrize("tensors,why", [
    ({"l.0.q_proj.weight": torch.ones(8, 4, dtype=torch.int8), "l.1.q_proj.weight": torch.ones(8, 4, dtype=torch.int8)},
     "2 × dtype int8 is not a float weight"),
    ({"l.0.q_proj.weight": torch.ones(0, 4), "l.1.q_proj.weight": torch.ones(8, 0)}, "empty tensor"),
])
def test_esd_of_nothing_analysable_says_why_without_base_or_tuned(tmp_path, tensors, why):
    """E2: esd named 'the base' and 'the tuned checkpoint' and the same tensor twice; it now says what was
    skipped and why."""
    save_file(tensors, str(tmp_path / "m.safetensors"))
    code, out = _cli("esd", str(tmp_path / "m.safetensors"))
    out = " ".join(out.split())
    assert code != 0 and "every tensor was skipped" in out and why in out and "l.0.q_proj.weight" in out, out
    assert "base" not in out and "tuned" not in out, out


@pytest.mark.parametrize("b,t,why", [
    (torch.ones(8, 4, dtype=torch.int32), torch.ones(8, 4, dtype=torch.int32), "1 × base dtype int32, tuned dtype int32"),
    (torch.ones(8, 4, dtype=torch.bool), torch.ones(8, 4, dtype=torch.bool), "not a float weight"),
    (torch.ones(8, 4), torch.ones(4, 8), "1 × shape mismatch (e.g. l.0.q_proj.weight: base (8, 4) vs tuned (4, 8))"),
    (torch.ones(8, 4), torch.ones(8, 3), "1 × shape mismatch"),
    (torch.ones(8, 4, 3, 3), torch.ones(8, 4, 3, 3), "1 × 4-D tensor, not a weight matrix"),
])
def test_diff_with_every_pair_skipped_gives_the_reasons(tmp_path, b, t, why):
    """E2: diff named the same tensor for 'base has e.g.' and 'tuned has e.g.' and hid the skip reasons."""
    save_file({"l.0.q_proj.weight": b}, str(tmp_path / "b.safetensors"))
    save_file({"l.0.q_proj.weight": t}, str(tmp_path / "t.safetensors"))
    code, out = _cli("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert code != 0 and "every tensor pair was skipped" in out and why in " ".join(out.split()), out
    assert "base has e.g." not in out


NAME = "model.layers.0.self_attn.q_proj.weight"
SETS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _weight_sets(folder: Path, which: tuple[str, ...]) -> dict[str, float]:
    """A folder holding the weight sets ``which``, each storing NAME filled with its own value."""
    folder.mkdir(parents=True)
    values = {}
    for i, kind in enumerate(which):
        v = float(i + 1)
        values[kind] = v
        t = {NAME: torch.full((8, 6), v)}
        if kind == "model.safetensors":
            save_file(t, str(folder / kind))
        elif kind == "pytorch_model.bin":
            torch.save(t, folder / kind)
        elif kind == "model.safetensors.index.json":
            save_file(t, str(folder / "model-00001-of-00001.safetensors"))
            (folder / kind).write_text(json.dumps({"metadata": {}, "weight_map": {NAME: "model-00001-of-00001.safetensors"}}))
        else:
            torch.save(t, folder / "pytorch_model-00001-of-00001.bin")
            (folder / kind).write_text(json.dumps({"metadata": {}, "weight_map": {NAME: "pytorch_model-00001-of-00001.bin"}}))
    return values


def _transformers_choice(folder: Path) -> str | None:
    """The weight set transformers' from_pretrained loads from ``folder`` (its own resolver)."""
    mu = pytest.importorskip("transformers.modeling_utils")
    resolve = getattr(mu, "_get_resolved_checkpoint_files", None)
    if resolve is None:
        return None
    files, meta = resolve(str(folder), None, None, None, {}, False, download_kwargs={"local_files_only": True})
    name = Path(files[0]).name
    if meta is not None:  # sharded: the index it read
        return "model.safetensors.index.json" if name.endswith(".safetensors") else "pytorch_model.bin.index.json"
    return name


@pytest.mark.parametrize("which", [SETS, SETS[1:], SETS[2:], ("model.safetensors", "pytorch_model.bin.index.json"),
                                   ("model.safetensors", "pytorch_model.bin"), SETS[1:3], SETS[:2]])
def test_folder_reads_the_weight_set_transformers_reads(tmp_path, which):
    """E3: the indexes were read before model.safetensors (a stale pytorch_model.bin index beside a newer
    model.safetensors made diff compare the stale weights). The order is now transformers', with a note."""
    values = _weight_sets(tmp_path / "m", which)
    expected = _transformers_choice(tmp_path / "m") or which[0]
    assert expected == which[0]  # FOLDER_WEIGHTS order, as transformers resolves it
    ckpt = open_checkpoint(tmp_path / "m")
    assert float(ckpt.load(NAME)[0, 0]) == values[expected]
    if len(which) > 1:
        assert len(ckpt.notes) == 1 and f"read {expected}" in ckpt.notes[0]
        assert all(k in ckpt.notes[0].split("ignored")[1] for k in which[1:])
    else:
        assert ckpt.notes == []


def test_stale_bin_index_beside_model_safetensors_reaches_the_result(tmp_path):
    """E3 end to end: the fresh model.safetensors is diffed (not the stale .bin), and the warning says so."""
    _weight_sets(tmp_path / "base", ("model.safetensors",))
    _weight_sets(tmp_path / "tuned", ("pytorch_model.bin.index.json",))  # value 1.0: the base's, stale
    save_file({NAME: torch.full((8, 6), 1.0) + torch.eye(8, 6)}, str(tmp_path / "tuned" / "model.safetensors"))
    code, out = _cli("diff", str(tmp_path / "base"), str(tmp_path / "tuned"))
    assert code == 0, out
    assert "read model.safetensors" in " ".join(out.split()) and "ignored pytorch_model.bin.index.json" in " ".join(out.split())
    res = esd(tmp_path / "tuned", config=EsdConfig(device="cpu"))
    assert any("ignored pytorch_model.bin.index.json" in w for w in res.warnings)


def test_compare_trace_and_interfere_say_which_weight_set_they_read(tmp_path):
    """The notes reached diff's and esd's warnings only; compare, trace and interfere read silently."""
    from spectra.comparison import compare
    from spectra.interfere import interfere
    from spectra.trace import trace

    _weight_sets(tmp_path / "base", ("model.safetensors",))
    for i in (1, 2):
        _weight_sets(tmp_path / f"t{i}", ("pytorch_model.bin.index.json",))
        save_file({NAME: torch.full((8, 6), 1.0) + i * torch.eye(8, 6)}, str(tmp_path / f"t{i}" / "model.safetensors"))
    said = "ignored pytorch_model.bin.index.json"
    base, t1, t2 = (str(tmp_path / n) for n in ("base", "t1", "t2"))
    res = compare(t1, t2, base=base, plots=False)
    assert sum(said in w for w in res.warnings) == 2 and any(said in f.text for f in compare_findings(res) if f.warning)
    assert sum(said in w for w in trace(base, [t1, t2], plots=False).warnings) == 2
    assert sum(said in w for w in interfere(base, [t1, t2], config=InterfereConfig(), plots=False).warnings) == 2


LONG = "model.layers.2." + "a" * 5000 + ".weight"


def _evil_pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", LONG]
    base = {n: torch.randn(16, 12, generator=g) for n in names}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({n: v + 0.1 * torch.randn(16, 12, generator=g) for n, v in base.items()}, str(tmp_path / "t.safetensors"))
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


@pytest.mark.parametrize("make", [
    lambda **kw: DiffConfig(**kw), lambda **kw: CompareConfig(**kw), lambda **kw: EsdConfig(**kw),
    lambda **kw: ExtractConfig(**kw), lambda **kw: InterfereConfig(**kw), lambda **kw: TraceConfig(**kw),
])
@pytest.mark.parametrize("option", ["include", "exclude"])
def test_every_command_refuses_a_catastrophic_filter(make, option):
    """E4: --include '(a+)+b' ran until killed on a 5000-character tensor name; the adapter-pattern guard
    now applies to every command's --include/--exclude (their configs share SharedOptions)."""
    for bad in ("(a+)+b", "(a|ab)*c", r"(x)\1", ".*a.*b.*c"):
        with pytest.raises(ConfigError, match=f"--{option} "):
            make(**{option: bad})
    make(**{option: r"layers\.\d+\.(q|k)_proj"})  # an ordinary filter is accepted


def test_filter_on_a_hostile_name_returns_at_once(tmp_path):
    """E4 end to end: refused before any matching (was a hang), on diff and esd; a literal filter matches the
    5000-character name as re.search does, and a filter with repetitions refuses to match it."""
    b, t = _evil_pair(tmp_path)
    for args in (["diff", str(b), str(t), "--include"], ["esd", str(t), "--exclude"], ["esd", str(t), "--plot-include"]):
        code, out = _cli(*args, "(a+)+b")
        assert code != 0 and "nested repetition" in out, out
    rx = search_pattern("--include", "aaaa")
    assert rx.search(LONG) == (re.search("aaaa", LONG) is not None)
    with pytest.raises(ConfigError, match="5022 characters"):
        search_pattern("--exclude", "q_pr.*j").search(LONG)
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):  # same answer as re.search
        for pat in (r"layers\.\d+", "q_proj|lm_head", r"\.0\.", "^lm"):
            assert search_pattern("--include", pat).search(name) == (re.search(pat, name) is not None)


@pytest.mark.parametrize("command", ["diff", "esd"])
def test_resume_accepts_the_same_files_spelled_differently(tmp_path, monkeypatch, command):
    """E5: --resume refused the same files named ./x or by an absolute path as "different inputs"; the
    fingerprint now compares resolved paths. A swapped file is still refused."""
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12),
               "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 12)}, str(tmp_path / "b.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12),
               "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 12)}, str(tmp_path / "t.safetensors"))
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    first = ["diff", "b.safetensors", "t.safetensors"] if command == "diff" else ["esd", "t.safetensors"]
    code, text = _cli(*first, "--out", out, "--no-plots")
    assert code == 0, text
    again = ["diff", "./b.safetensors", str(tmp_path / "t.safetensors")] if command == "diff" else ["esd", "./t.safetensors"]
    code, text = _cli(*again, "--out", out, "--no-plots", "--resume")
    assert code == 0, text
    (tmp_path / "t2").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12),
               "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 12)}, str(tmp_path / "t2" / "t.safetensors"))
    swapped = (["diff", "./b.safetensors", "t2/t.safetensors"] if command == "diff" else ["esd", "t2/t.safetensors"])
    code, text = _cli(*swapped, "--out", out, "--no-plots", "--resume")
    assert code != 0 and "different inputs" in " ".join(text.split()), text


@pytest.mark.parametrize("pattern", ["(?:.|.)" * 26 + "z", ".?" * 30 + "Z", "a{0,40}" + "a{0,40}b"])
def test_a_filter_of_written_out_choices_is_refused_at_once(pattern):
    """No repetition guard sees '(?:.|.)' written out 26 times: it took 51 s on one ordinary name."""
    with pytest.raises(ConfigError, match="alternatives and optional parts"):
        search_pattern("--include", pattern)


@pytest.mark.parametrize("pattern", [r"layers\.(1|2)\..*mlp", r"(q|k|v|o|gate|up|down)_proj", r"\d{1,3}",
                                     r"layers\.(0|1|2|3|4|5|6|7|8|9|10|11)\.", r"(?i)q_proj?"])
def test_ordinary_filters_with_choices_are_accepted(pattern):
    assert search_pattern("--include", pattern).search("model.layers.1.mlp.up_proj.weight") is not None


def test_inspect_says_which_weight_set_it_read(tmp_path):
    _weight_sets(tmp_path / "m", ("model.safetensors", "pytorch_model.bin"))
    code, out = _cli("inspect", str(tmp_path / "m"))
    assert code == 0 and "ignored pytorch_model.bin" in " ".join(out.split())
