"""``spectra compare``: every value against a brute-force float64 numpy/scipy computation on small
planted checkpoints written here (a base, a full fine-tune, LoRA adapters with known factors), the
undefined cases (an update that is exactly zero, NaN/Inf), the filters, ``CompareResult.load``'s
validation, the CLI, and end to end on adapters and a full fine-tune trained for a few steps.

Brute force: ``numpy.linalg.svd`` of every dense matrix in float64, φ by a double loop over (i, j),
principal angles by ``scipy.linalg.subspace_angles``, the random projections of the amplification
table redrawn from the same seed in the same order. Stored values are rounded (φ grids and intruder
cosines to 6 decimals, angle cosines to 8), which sets the tolerances below; everything else agrees
to about 1e-12.
"""

from __future__ import annotations

import json
import math

import click
import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from spectra import CompareConfig, CompareResult, compare
from spectra.errors import ResultsFormatError
from spectra_cli.compare import compare_cmd

H, KV, FF = 24, 12, 40  # hidden, k/v rows, MLP width: square, wide and tall matrices
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.v_proj": (KV, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}
LAYERS = 2
R, ALPHA = 4, 8.0  # LoRA rank and alpha: scale 2
TOP_K = 6


def _name(layer: int, mod: str) -> str:
    return f"model.layers.{layer}.{mod}.weight"


def _write_adapter(folder, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}))
    tensors = {}
    for name, (B, A) in factors.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[stem + ".lora_A.weight"], tensors[stem + ".lora_B.weight"] = A.contiguous(), B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Folders base/; full/ (layer 1 v_proj unchanged: ΔW = 0); lora/ (every module's A shares two
    input directions with the full update; layer 0 up_proj saved at init, B = 0; layer 1 q_proj has a
    large rank-1 part along a direction unlike W's, a planted intruder); the NaN variants lora_nan/
    and full_nan/."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(0)
    base, full, factors = {"model.embed_tokens.weight": torch.randn(50, H, generator=g)}, {}, {}
    full["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.01 * torch.randn(50, H, generator=g)
    for layer in range(LAYERS):
        for mod, (o, i) in SHAPES.items():
            name = _name(layer, mod)
            W = torch.randn(o, i, generator=g) / i**0.5
            # full update: spectrum 1, 1/2, 1/3, … on random directions, 5% of ‖W‖
            Uf = torch.linalg.qr(torch.randn(o, min(o, i), generator=g, dtype=torch.float64)).Q
            Vf = torch.linalg.qr(torch.randn(i, min(o, i), generator=g, dtype=torch.float64)).Q
            D = (Uf / torch.arange(1, min(o, i) + 1)) @ Vf.T
            D *= 0.05 * W.norm() / D.norm()
            base[name] = W
            full[name] = W if (layer, mod) == (1, "self_attn.v_proj") else (W.double() + D).float()
            B = torch.randn(o, R, generator=g) * 0.05
            A = torch.randn(R, i, generator=g) / i**0.5
            A[:2] = Vf[:, :2].T.float()  # two input directions shared with the full update
            if (layer, mod) == (0, "mlp.up_proj"):
                B = torch.zeros(o, R)
            if (layer, mod) == (1, "self_attn.q_proj"):
                # |cos| = 1/√o with every left singular vector of W: a direction W does not have
                u = torch.linalg.svd(W.double(), full_matrices=True).U.sum(dim=1).float() / o**0.5
                B[:, 0] = 5.0 * u
            factors[name] = (B, A)
    for sub, sd in (("base", base), ("full", full)):
        (root / sub).mkdir()
        save_file(sd, str(root / sub / "model.safetensors"))
    _write_adapter(root / "lora", factors)
    nan = dict(factors)
    A = factors[_name(0, "self_attn.q_proj")][1].clone()
    A[1, 3] = float("nan")
    nan[_name(0, "self_attn.q_proj")] = (factors[_name(0, "self_attn.q_proj")][0], A)
    _write_adapter(root / "lora_nan", nan)
    bad = dict(full)
    bad[_name(1, "mlp.down_proj")] = full[_name(1, "mlp.down_proj")].clone()
    bad[_name(1, "mlp.down_proj")][0, 0] = float("inf")
    (root / "full_nan").mkdir()
    save_file(bad, str(root / "full_nan" / "model.safetensors"))
    return {"root": root, "base": base, "full": full, "factors": factors}


# ---- brute force -----------------------------------------------------------------------------------
def _svd(M: np.ndarray):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return U, S, Vt.T


def _phi_grid(QA: np.ndarray, QB: np.ndarray) -> np.ndarray:
    out = np.zeros((QA.shape[1], QB.shape[1]))
    for i in range(1, QA.shape[1] + 1):
        for j in range(1, QB.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(QA[:, :i].T @ QB[:, :j]) ** 2 / min(i, j)
    return out


def _captured(D: np.ndarray, U: np.ndarray, V: np.ndarray) -> dict[str, float]:
    total = np.sum(D**2)
    S = np.linalg.svd(D, compute_uv=False)
    r = U.shape[1]
    return {"two_sided": np.sum((U.T @ D @ V) ** 2) / total, "left": np.sum((U.T @ D) ** 2) / total,
            "right": np.sum((D @ V) ** 2) / total, "best_rank_r": np.sum(S[:r] ** 2) / total}


def _dense_updates(planted, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, ΔW of the LoRA, ΔW of the full fine-tune) in float64, as spectra forms them."""
    W = planted["base"][name]
    B, A = planted["factors"][name]
    lora = (ALPHA / R) * (B.double() @ A.double())
    full = (planted["full"][name] - W).double()  # the float32 subtraction form_delta does
    return W.double().numpy(), lora.numpy(), full.numpy()


def _check_module(m, W, DA, DB, ra, rb, random_bases):
    UA, _, VA = _svd(DA)
    UB, _, VB = _svd(DB)
    assert (m.rank_a, m.rank_b) == (ra, rb)
    assert m.fro_a == pytest.approx(np.linalg.norm(DA), rel=1e-12) and m.fro_b == pytest.approx(np.linalg.norm(DB), rel=1e-12)
    for side, (QA, QB) in {"right": (VA[:, :ra], VB[:, :rb]), "left": (UA[:, :ra], UB[:, :rb])}.items():
        grid = _phi_grid(QA, QB)
        ph = m.phi[side]
        assert ph.phi_full == pytest.approx(grid[-1, -1], abs=1e-10) and ph.phi_11 == pytest.approx(grid[0, 0], abs=1e-10)
        assert ph.mean == pytest.approx(grid.mean(), abs=1e-10) and ph.random == max(ra, rb) / QA.shape[0]
        theta = np.sort(scipy.linalg.subspace_angles(QA, QB))
        np.testing.assert_allclose(m.angles[side].cosines, np.cos(theta), atol=2e-8)
        assert m.angles[side].grassmann == pytest.approx(np.linalg.norm(theta), abs=1e-7)
    for who, (D, U, V) in {"b_in_a": (DB, UA[:, :ra], VA[:, :ra]), "a_in_b": (DA, UB[:, :rb], VB[:, :rb])}.items():
        ref = _captured(D, U, V)
        got = m.captured[who]
        for k, v in ref.items():
            assert getattr(got, k) == pytest.approx(v, abs=1e-10), (m.name, who, k)
    SW = np.linalg.svd(W, compute_uv=False)
    UW = np.linalg.svd(W, full_matrices=False)[0]
    for who, D, r in (("a", DA, ra), ("b", DB, rb)):
        U, _, V = _svd(D)
        amp = m.amplification[who]
        proj = np.linalg.norm(U[:, :r].T @ W @ V[:, :r])
        assert amp.delta_fro == pytest.approx(np.linalg.norm(D), rel=1e-12)
        assert amp.proj_delta == pytest.approx(proj, rel=1e-9) and amp.factor == pytest.approx(np.linalg.norm(D) / proj, rel=1e-9)
        assert amp.proj_own == pytest.approx(np.sqrt(np.sum(SW[:r] ** 2)), rel=1e-12)
        assert amp.w_fro == pytest.approx(np.linalg.norm(W), rel=1e-12)
        assert amp.proj_random_expected == pytest.approx(r * np.linalg.norm(W) / math.sqrt(W.size), rel=1e-12)
        Ur, Vr = random_bases[who]
        assert amp.proj_random == pytest.approx(np.linalg.norm(Ur.T @ W @ Vr), rel=1e-12)
        Ut = np.linalg.svd(W + D, full_matrices=False)[0][:, :10]
        max_cos = np.abs(Ut.T @ UW).max(axis=1)
        intr = m.intruders[who]
        np.testing.assert_allclose(intr.max_cos, max_cos, atol=1e-6)
        assert intr.count == int(np.sum(max_cos < 0.5))
        assert intr.counts == {str(e / 10): int(np.sum(max_cos < e / 10)) for e in range(1, 10)}


def _random_bases(res: CompareResult, seed: int = 0):
    """The random U, V of every module's amplification, drawn as compare draws them: one seed per
    module from one generator, modules in order; from each module's seed A then B, U then V."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in res.modules:
        gm = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        drawn = {}
        for who, r in (("a", m.rank_a), ("b", m.rank_b)):
            Ur = torch.linalg.qr(torch.randn(m.out, r, generator=gm, dtype=torch.float64)).Q.numpy()
            Vr = torch.linalg.qr(torch.randn(m.in_, r, generator=gm, dtype=torch.float64)).Q.numpy()
            drawn[who] = (Ur, Vr)
        out.append(drawn)
    return out


# ---- values against brute force ----------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_every_value_matches_brute_force(planted, workers):
    root = planted["root"]
    cfg = CompareConfig(side="both", top_k=TOP_K, device="cpu")
    res = compare(str(root / "lora"), str(root / "full"), base=str(root / "base"), config=cfg, workers=workers)
    assert res.kinds == {"a": "lora", "b": "full"} and res.device == "cpu"
    assert [m.name for m in res.modules] == [_name(layer, mod) for layer in range(LAYERS) for mod in SHAPES]
    for m, rnd in zip(res.modules, _random_bases(res)):
        W, DA, DB = _dense_updates(planted, m.name)
        if m.status != "ok":
            continue
        _check_module(m, W, DA, DB, R, min(TOP_K, min(W.shape)), rnd)
        assert np.allclose(res.phi_grids[m.name]["right"], _phi_grid(_svd(DA)[2][:, :R], _svd(DB)[2][:, :m.rank_b]), atol=6e-7)
    checked = [m for m in res.modules if m.status == "ok"]
    assert len(checked) == 2 * len(SHAPES) - 2
    planted_intruder = next(m for m in res.modules if m.name == _name(1, "self_attn.q_proj"))
    assert planted_intruder.intruders["a"].count >= 1 and planted_intruder.intruders["b"].count == 0
    assert res.b_only == ["model.embed_tokens.weight"] and res.a_only == []


def test_workers_do_not_change_any_number(planted):
    root = planted["root"]
    cfg = CompareConfig(top_k=TOP_K, device="cpu")
    one, two = (compare(str(root / "lora"), str(root / "full"), base=str(root / "base"), config=cfg, workers=w).to_dict()
                for w in (1, 2))
    one.pop("elapsed_s"), two.pop("elapsed_s")
    assert one == two


def test_zero_update_gives_null_measures_with_the_reason(planted):
    root = planted["root"]
    res = compare(str(root / "lora"), str(root / "full"), base=str(root / "base"), config=CompareConfig(top_k=TOP_K))
    by = {m.name: m for m in res.modules}
    frozen_a = by[_name(0, "mlp.up_proj")]  # LoRA saved at init: B = 0
    frozen_b = by[_name(1, "self_attn.v_proj")]  # tuned == base
    for m, zero, live in ((frozen_a, "a", "b"), (frozen_b, "b", "a")):
        assert m.status == "zero_update" and f"ΔW of {zero.upper()} is exactly zero" in m.reason
        assert m.phi == {"right": None} and m.angles == {"right": None} and m.captured == {"b_in_a": None, "a_in_b": None}
        assert m.name not in res.phi_grids
        assert m.amplification[zero] is None and m.intruders[zero] is None
        assert getattr(m, f"fro_{zero}") == 0.0
        # the other side's own measures are still computed, and right
        W, DA, DB = _dense_updates(planted, m.name)
        D = DB if live == "b" else DA
        U, _, V = _svd(D)
        r = m.rank_b if live == "b" else m.rank_a
        assert m.amplification[live].factor == pytest.approx(np.linalg.norm(D) / np.linalg.norm(U[:, :r].T @ W @ V[:, :r]), rel=1e-9)
    doc = json.loads(res.to_json())  # null in JSON, not NaN, and it loads back
    rec = next(m for m in doc["modules"] if m["name"] == frozen_a.name)
    assert rec["phi"] == {"right": None} and rec["status"] == "zero_update"
    assert CompareResult.from_dict(doc).to_dict() == doc


def test_nan_in_a_lora_factor_or_a_weight_skips_that_module(planted):
    root = planted["root"]
    res = compare(str(root / "lora_nan"), str(root / "full_nan"), base=str(root / "base"), config=CompareConfig(top_k=TOP_K))
    skipped = {s["name"]: s["reason"] for s in res.skipped}
    assert set(skipped) == {_name(0, "self_attn.q_proj"), _name(1, "mlp.down_proj")}
    assert "lora_A" in skipped[_name(0, "self_attn.q_proj")] and "NaN or Inf" in skipped[_name(0, "self_attn.q_proj")]
    assert "tuned weights contain NaN or Inf" in skipped[_name(1, "mlp.down_proj")]
    assert len(res.modules) == 2 * len(SHAPES) - 2
    out = CliRunner().invoke(compare_cmd, [str(root / "lora_nan"), str(root / "full_nan"), "--base", str(root / "base")])
    assert out.exit_code == 0 and "Traceback" not in out.output and "2 skipped" in out.stderr


def test_layer_filter_applies_to_the_one_sided_lists(planted):
    root = planted["root"]
    res = compare(str(root / "lora"), str(root / "full"), base=str(root / "base"), config=CompareConfig(layers="0", top_k=TOP_K))
    assert {m.layer for m in res.modules} == {0} and res.b_only == [] and res.a_only == []
    res = compare(str(root / "lora"), str(root / "full"), base=str(root / "base"),
                  config=CompareConfig(include="q_proj|embed", top_k=TOP_K))
    assert {m.module for m in res.modules} == {"q_proj"} and res.b_only == ["model.embed_tokens.weight"]


# ---- compare.json: round trip and validation --------------------------------------------------------
@pytest.fixture(scope="module")
def written(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("written")
    root = planted["root"]
    compare(str(root / "lora"), str(root / "full"), base=str(root / "base"), config=CompareConfig(top_k=TOP_K), out_dir=out,
            plots=False)
    return out / "compare.json"


def test_load_round_trips_and_accepts_files_without_the_new_keys(written):
    doc = json.loads(written.read_text())
    res = CompareResult.load(written)
    assert res.to_dict() == doc and CompareResult.load(written.parent).to_dict() == doc
    old = {k: v for k, v in doc.items() if k not in ("skipped", "device")}
    old["modules"] = [{k: v for k, v in m.items() if k not in ("status", "reason")} for m in doc["modules"] if m["status"] == "ok"]
    assert [m.status for m in CompareResult.from_dict(old).modules] == ["ok"] * len(old["modules"])


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(modules="x"), "modules must be an array"),
    (lambda d: d.pop("modules"), "missing key 'modules'"),
    (lambda d: d.update(kinds={"a": "lora"}), "kinds must be an object"),
    (lambda d: d["modules"][1]["phi"]["right"].update(phi_full="0.5"), "modules[1].phi.right.phi_full must be a number or null"),
    (lambda d: d["modules"][0].update(rank_a=4.5), "modules[0].rank_a must be an integer"),
    (lambda d: d["modules"][2].pop("captured"), "modules[2].missing key 'captured'"),
    (lambda d: d["modules"][2]["intruders"]["b"].update(max_cos=[0.1, "y"]), "modules[2].intruders.b.max_cos must be an array"),
    (lambda d: d["modules"][0].update(status="fine"), "modules[0].status must be one of ok, zero_update"),
    (lambda d: d.update(phi_grids={"m": {"right": [[0.1, "z"]]}}), "phi_grids['m'] must be an object of number grids"),
    (lambda d: d.update(schema="spectra.diff/1"), "schema must be 'spectra.compare/1'"),
])
def test_load_names_the_bad_key_in_one_line(written, tmp_path, edit, key):
    doc = json.loads(written.read_text())
    edit(doc)
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsFormatError) as exc:
        CompareResult.load(path)
    assert key in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_refuses_what_is_not_json(tmp_path):
    (tmp_path / "compare.json").write_text("{not json")
    with pytest.raises(ResultsFormatError, match="not valid JSON"):
        CompareResult.load(tmp_path)


def test_report_section_findings_and_title(written):
    """The report's compare section (spectra.report_compare) on a result with null measures: the
    figures, the tables with their legend, the zero updates explained, findings in words."""
    import matplotlib

    from spectra import report_compare

    doc = json.loads(written.read_text())
    with matplotlib.rc_context({"svg.fonttype": "path"}):
        html = report_compare.section_html(written, doc)
    assert html.count("<img") == 5 and "Columns of this table" in html and "best r_A" in html
    assert "zero_update" in html and "is exactly zero" in html and "Amplification" in html
    found = report_compare.findings(written, doc)
    assert [f.topic for f in found if f.warning] == ["zero"]
    assert {"captured", "phi", "amplification", "intruders", "unmatched"} <= {f.topic for f in found}
    assert report_compare.title(written, doc).startswith("compare: ")
    doc["modules"][0]["fro_a"] = "big"
    with pytest.raises(ResultsFormatError, match=r"modules\[0\].fro_a must be a number"):
        report_compare.section_html(written, doc)


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_table_legend_findings_and_filters(planted, tmp_path):
    root = planted["root"]
    out = CliRunner().invoke(compare_cmd, [str(root / "lora"), str(root / "full"), "--base", str(root / "base"),
                                           "--top-k", str(TOP_K), "--layers", "0-1", "--out", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    assert "φ(right)" in out.stdout and "best r_A" in out.stdout and "spectra compare --explain" in out.stdout
    assert "Findings" in out.stdout and "of what was possible" in out.stdout and "random baseline" in out.stdout
    assert "Amplification" in out.stdout and "Intruder dimensions" in out.stdout
    assert "–" in out.stdout  # the zero updates' undefined measures
    assert "0 only by B" in out.stderr and "on cpu" in out.stderr  # embed_tokens is outside layers 0-1
    assert "warning:" in out.stderr and "exactly zero" in out.stderr
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert doc["b_only"] == [] and doc["device"] == "cpu" and doc["config"]["device"] == "auto"
    for f in ("compare.csv", "captured_heatmap.png", "phi_grids.png", "principal_angles.png", "intruders_a.png", "intruders_b.png"):
        assert (tmp_path / "o" / f).is_file(), f


def test_cli_explain_and_help_text_on_every_option():
    out = CliRunner().invoke(compare_cmd, ["--explain"])
    assert out.exit_code == 0 and "best r_A" in out.stdout and "intr A, intr B" in out.stdout and "docs/definitions.md" in out.stdout
    assert all(p.help for p in compare_cmd.params if isinstance(p, click.Option)), "every option has help"
    help_text = CliRunner().invoke(compare_cmd, ["--help"]).stdout
    for opt in ("--no-plots", "--device", "--explain", "--top-k"):
        assert opt in help_text


# ---- end to end on trained runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("peft")
    from tests.train_util import make_runs

    return make_runs(tmp_path_factory.mktemp("runs"))


def test_lora_r8_vs_r64(runs, tmp_path):
    res = compare(runs["lora8"], runs["lora64"], base=runs["base"], out_dir=tmp_path)
    assert res.kinds == {"a": "lora", "b": "lora"} and len(res.modules) == 14
    for m in res.modules:
        assert (m.rank_a, m.rank_b, m.status) == (8, 64, "ok")
        grid = np.asarray(res.phi_grids[m.name]["right"])
        assert grid.shape == (8, 64) and grid.min() >= -1e-12 and grid.max() <= 1 + 1e-9
        assert m.phi["right"].random == pytest.approx(64 / m.in_)
        ce = m.captured["b_in_a"]
        assert 0 <= ce.two_sided <= ce.best_rank_r + 1e-9 and ce.left <= ce.best_rank_r + 1e-9
        assert set(m.amplification) == {"a", "b"} and m.amplification["a"].factor > 0
        assert set(m.intruders["a"].counts) == {str(e / 10) for e in range(1, 10)}
    assert CompareResult.load(tmp_path).to_dict() == json.loads((tmp_path / "compare.json").read_text())


def test_identical_adapter_is_fully_similar(runs):
    res = compare(runs["lora8"], runs["lora8"], config=CompareConfig(side="both"))
    for m in res.modules:
        for side in ("left", "right"):
            assert m.phi[side].phi_full == pytest.approx(1.0, abs=1e-9)
            assert m.angles[side].grassmann == pytest.approx(0.0, abs=1e-5)
        assert m.captured["b_in_a"].two_sided == pytest.approx(1.0, abs=1e-9)


def test_lora_vs_full_and_cli(runs, tmp_path):
    from spectra_cli.main import main

    res = compare(runs["lora8"], runs["full"], base=runs["base"], config=CompareConfig(top_k=32))
    assert res.kinds == {"a": "lora", "b": "full"}
    for m in res.modules:
        assert m.rank_b == 32
        ce = m.captured["b_in_a"]  # how much of the full update the LoRA subspaces hold
        assert 0 <= ce.two_sided <= ce.best_rank_r <= 1 + 1e-9
    out = CliRunner().invoke(main, ["compare", str(runs["lora8"]), str(runs["lora8b"]), "--base", str(runs["base"]),
                                    "--out", str(tmp_path / "cli"), "--layers", "1"])
    assert out.exit_code == 0, out.output
    assert "φ(right)" in out.stdout and (tmp_path / "cli" / "compare.json").is_file()
    bad = CliRunner().invoke(main, ["compare", str(runs["lora8"]), str(runs["full"])])
    assert bad.exit_code == 1 and "needs the base model" in bad.stderr
