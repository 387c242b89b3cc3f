"""Writes the example notebooks (run: python notebooks/build_notebooks.py). Kept as code so the
notebooks stay reviewable and reproducible; the test suite executes the .ipynb files it writes."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

SETUP = """%matplotlib inline
import os, tempfile
from pathlib import Path
from spectra.demo import DemoConfig, run_demo

# The demo's runs: reuse a finished one (SPECTRA_DEMO_DIR, or reports/demo after `make demo`), else train
# the quick version here (about half a minute on a laptop CPU, offline).
demo = Path(os.environ.get("SPECTRA_DEMO_DIR", "../reports/demo"))
if not (demo / "checkpoints").is_dir() or not any((demo / "checkpoints").glob("base-*/train_summary.json")):
    demo = Path(tempfile.mkdtemp()) / "demo"
    run_demo(DemoConfig.make(str(demo), quick=True), log=lambda m: None)
ck = demo / "checkpoints"
base = next(p for p in sorted(ck.glob("base-*")) if (p / "train_summary.json").is_file())
print("runs in", ck)"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# spectra quickstart\n\nDiff two checkpoints from Python, look at the rank needed per layer and module, and plot it. "
               "The checkpoints here are generated (a Llama-shaped pair with a planted update), so this runs anywhere offline."),
        ("code", "%matplotlib inline\nimport tempfile\nimport spectra\nfrom spectra.synthetic import LlamaShape, make_llama_pair\n\n"
                 "base, tuned = make_llama_pair(tempfile.mkdtemp(), shape=LlamaShape(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=512))\n"
                 "res = spectra.diff(base, tuned)\nlen(res.modules), res.thresholds"),
        ("md", "Median rank needed for 90% of ΔW's energy per module, next to a Gaussian matrix of the same shape:"),
        ("code", "for row in res.summary(0.9):\n    print(f\"{row['module']:10s} rank {row['energy_rank']:6.1f}  fraction {row['energy_rank_frac']:.3f}  random {row['random_frac']:.3f}\")"),
        ("code", "df = res.to_dataframe()\ndf[['name', 'layer', 'module', 'energy_rank_0.9', 'rel_norm', 'effective_rank']].head(10)"),
        ("code", "res.plot_rank_heatmap()"),
    ],
    "02_hu_et_al_section7.ipynb": [
        ("md", "# Reproducing Hu et al. (2021), Section 7, on the demo runs\n\n"
               "φ between the subspaces learned at r = 8 and r = 64 and between two seeds of r = 8 (Fig. 3/4), and the "
               "amplification factor (Table 7). The demo model is tiny; the point is the method, not GPT-3's numbers."),
        ("code", SETUP),
        ("code", "from spectra.compare import compare\n"
                 "ranks = compare(ck / 'lora8', ck / 'lora64', base=base)\nseeds = compare(ck / 'lora8', ck / 'lora8_seed2', base=base)\n"
                 "for name, c in (('r=8 vs r=64', ranks), ('r=8 vs r=8, other seed', seeds)):\n"
                 "    phis = [m['phi']['right']['phi_full'] for m in c.modules]\n"
                 "    rand = [m['phi']['right']['random'] for m in c.modules]\n"
                 "    print(f'{name}: median φ {sorted(phis)[len(phis)//2]:.3f} (random {sorted(rand)[len(rand)//2]:.3f})')"),
        ("code", "from spectra.plots import compare_figures\ncompare_figures(ranks)['phi_grids']"),
        ("md", "Amplification (Table 7 layout): ‖ΔW‖_F, its projection ‖U_rᵀ W V_r‖_F on its own top-r directions, "
               "the factor, and the same projection for W's own directions and for random ones."),
        ("code", "rows = [(m['module'], m['layer'], a['r'], a['delta_fro'], a['proj_delta'], a['factor'], a['proj_own'], a['proj_random_expected'])\n"
                 "        for m in ranks.modules for a in [m['amplification']['a']] if m['module'] in ('q_proj', 'v_proj')]\n"
                 "for r in rows:\n    print('%-7s L%s r=%d  |ΔW|=%.3f  |UᵀWV|=%.3f  factor=%.2f  own=%.3f  random=%.4f' % r)"),
    ],
    "03_biderman_et_al_spectra.ipynb": [
        ("md", "# Biderman et al. (2024): how much rank does full fine-tuning need?\n\n"
               "Rank needed to explain 90% of ΔW per layer and module for the full fine-tune and the LoRA runs of the demo, "
               "against the random-matrix baseline, and the spectra themselves (Fig. 6 and S7 style)."),
        ("code", SETUP),
        ("code", "import spectra\nfull = spectra.diff(base, ck / 'full')\nlora = spectra.diff(base, ck / 'lora8')\n"
                 "for name, r in (('full', full), ('lora8', lora)):\n"
                 "    med = sorted(m.energy_rank['0.9'] for m in r.modules)[len(r.modules)//2]\n"
                 "    print(f'{name}: median rank for 90% = {med}')"),
        ("code", "full.plot_rank_heatmap()"),
        ("code", "import numpy as np\nfrom matplotlib.figure import Figure\nfig = Figure(figsize=(6, 3.5), layout='constrained')\nax = fig.add_subplot()\n"
                 "for m in full.modules[1:8]:\n    s = np.asarray(m.singular_values)\n    ax.plot(np.cumsum(s**2) / m.fro_norm**2, label=m.module)\n"
                 "ax.axhline(0.9, ls='--', c='grey'); ax.set_xlabel('rank k'); ax.set_ylabel('cumulative energy'); ax.legend(fontsize=7)\nfig"),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / name)


if __name__ == "__main__":
    main()
