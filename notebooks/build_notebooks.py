"""Writes the example notebooks, and with ``--execute`` runs them and keeps their outputs.

    python notebooks/build_notebooks.py             # write the .ipynb files (no outputs)
    python notebooks/build_notebooks.py --execute   # write, then run each one here and save its outputs

Kept as code so the notebooks stay reviewable and reproducible; they are committed executed (so
that they read as documents), and the test suite executes them again. They read the demo's results
committed in ``reports/demo`` (written by ``make demo``): nothing is trained or downloaded.
"""

import argparse
import os
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

SETUP = """%matplotlib inline
from pathlib import Path
import spectra

# The demo's runs as `make demo` wrote them into reports/demo (committed with the repository): the results
# of every diff and compare, the training logs and the report. Nothing is trained or downloaded here.
demo = Path("../reports/demo")
print(sorted(p.name for p in demo.iterdir() if p.is_dir()))"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", ("# spectra quickstart\n\n"
               "What did fine-tuning do to the weights? `spectra.diff(base, tuned)` answers for every matrix pair; here we "
               "read what it wrote for the demo's runs (`make demo`: a tiny byte-level Llama pretrained on prose, then "
               "fine-tuned on Python code) and look at it from Python: the findings in words, the per-module medians, "
               "the per-matrix table, the heatmaps and the spectra. Every metric is defined in `docs/definitions.md`.")),
        ("code", SETUP),
        ("md", ("On your own checkpoints the first line would be `res = spectra.diff('path/to/base', 'path/to/tuned', "
               "out_dir='res')` (folders, `.safetensors`, `.bin`, hub ids, or a PEFT adapter as TUNED); "
               "`DiffResult.load` reads the `results.json` such a run wrote. This is the full fine-tune:")),
        ("code", "res = spectra.DiffResult.load(demo / 'diff_full')\nres  # a short summary, not every number"),
        ("md", ("**Findings**: what the numbers say, in words, warnings first (a rounding-level update, mixed precisions or a "
               "quantisation grid would show here).")),
        ("code", ("from spectra.findings import diff_findings\n\n"
                 "for f in diff_findings(res):\n    print(('WARNING: ' if f.warning else '- ') + f.text)")),
        ("md", ("The table `spectra diff` prints: medians per module kind. `energy_rank` is the rank needed for 90% of ΔW's "
               "energy, `energy_rank_frac` the same divided by p = min(out, in), `random_frac` what a Gaussian random "
               "matrix of the same shape needs (a dense, unstructured update), `rel_norm` = ‖ΔW‖_F / ‖W_base‖_F.")),
        ("code", "res.summary()"),
        ("md", ("One row per matrix; column names work as attributes (`energy_rank_0_9` is `energy_rank[\"0.9\"]`) and "
               "`layer` is an integer column.")),
        ("code", ("df = res.to_dataframe()\n"
                 "df[['name', 'layer', 'module', 'energy_rank_0_9', 'energy_rank_frac_0_9', 'random_energy_rank_0_9', 'rel_norm']].head(10)")),
        ("code", "df.groupby('layer').energy_rank_frac_0_9.median()  # rank needed along the depth"),
        ("md", "Rank needed per layer and module, as a fraction of p, with each shape's random baseline under its module name:"),
        ("code", "res.plot_rank_heatmap()"),
        ("md", ("The spectra of every layer: normalised singular values, and the cumulative energy up to the 99% rank "
               "(solid where the stored top singular values reach, dotted through the energy ranks beyond them).")),
        ("code", "res.plot_spectra()"),
        ("md", "A LoRA adapter the same way: the heatmap then shows how many of the adapter's r ranks the update needs."),
        ("code", ("lora = spectra.DiffResult.load(demo / 'diff_lora8')\n"
                 "print(next(f.text for f in diff_findings(lora) if f.topic == 'adapter'))\nlora.plot_rank_heatmap()")),
        ("md", "And a live run, on a generated Llama-shaped pair with a planted low-rank update (seconds on a CPU):"),
        ("code", ("import os, tempfile\nfrom spectra.synthetic import LlamaShape, make_llama_pair\n\n"
                 "os.chdir(tempfile.mkdtemp())  # a scratch folder: the pair's paths below are relative to it\n"
                 "base, tuned = make_llama_pair('.', shape=LlamaShape(layers=2, hidden=256, intermediate=688, "
                 "heads=4, kv_heads=2, vocab=512))\n"
                 "planted = spectra.diff(base, tuned)\nprint(planted)\nprint(diff_findings(planted)[0].text)")),
    ],
    "02_hu_et_al_section7.ipynb": [
        ("md", ("# Reproducing Hu et al. (2021), Section 7, on the demo runs\n\n"
               "φ between the subspaces learned at r = 8 and r = 64 and between two seeds of r = 8 (Fig. 3/4), and the "
               "amplification factor (Table 7), from the `spectra compare` results of the demo. The demo model is tiny; "
               "the point is the method, not GPT-3's numbers. Definitions: `docs/definitions.md`, \"Subspaces\".")),
        ("code", SETUP),
        ("md", "On your own adapters: `spectra.compare('lora-r8/', 'lora-r64/', base='base/')`; here the demo's results:"),
        ("code", ("import statistics\n\n"
                 "ranks = spectra.CompareResult.load(demo / 'compare_lora8_vs_lora64')\n"
                 "seeds = spectra.CompareResult.load(demo / 'compare_lora8_vs_lora8_seed2')\n"
                 "for name, c in (('r=8 vs r=64', ranks), ('r=8 vs r=8, other seed', seeds)):\n"
                 "    right = [m.phi['right'] for m in c.modules if m.phi.get('right')]\n"
                 "    print(f'{name}: median φ {statistics.median(p.phi_full for p in right):.3f} '\n"
                 "          f'(random subspaces: {statistics.median(p.random for p in right):.3f})')")),
        ("code", "from spectra.plots import compare_figures\n\ncompare_figures(ranks)['phi_grids']"),
        ("md", ("Amplification (Table 7 layout): ‖ΔW‖_F, its projection ‖U_rᵀ W V_r‖_F on its own top-r directions, "
               "the factor, and the same projection for W's own directions and for random ones.")),
        ("code", ("for m in ranks.modules:\n"
                 "    a = (m.amplification or {}).get('a')\n"
                 "    if a is not None and m.module in ('q_proj', 'v_proj'):\n"
                 "        print(f'{m.module:7s} L{m.layer} r={a.r}  |ΔW|={a.delta_fro:.3f}  |UᵀWV|={a.proj_delta:.3f}  '\n"
                 "              f'factor={a.factor:.2f}  own={a.proj_own:.3f}  random={a.proj_random_expected:.4f}')")),
    ],
    "03_biderman_et_al_spectra.ipynb": [
        ("md", ("# Biderman et al. (2024): how much rank does full fine-tuning need?\n\n"
               "Rank needed to explain 90% of ΔW per layer and module for the full fine-tune and the LoRA runs of the demo, "
               "against the random-matrix baseline, and the spectra themselves (Fig. 6 and S7 style), from the demo's "
               "`spectra diff` results.")),
        ("code", SETUP),
        ("code", ("import pandas as pd\n\n"
                 "runs = {name: spectra.DiffResult.load(demo / f'diff_{name}') for name in ('full', 'lora8', 'lora64')}\n"
                 "full = runs['full'].summary()\n"
                 "table = pd.DataFrame({name: r.summary().energy_rank for name, r in runs.items()}).reindex(full.index)\n"
                 "table.assign(random=(full.random_frac * full.p).round())  # median rank needed for 90%, per module kind")),
        ("code", ("ratio = runs['full'].to_dataframe().energy_rank_0_9.median() / runs['lora8'].to_dataframe().energy_rank_0_9.median()\n"
                 "print(f'full fine-tuning needs {ratio:.1f}x the rank of LoRA r = 8 for 90% of its update')")),
        ("code", "runs['full'].plot_rank_heatmap()"),
        ("code", "runs['full'].plot_spectra()"),
    ],
}


def write(names: list[str] | None = None) -> list[Path]:
    """Write the notebooks (cells only, no outputs), with stable cell ids so that diffs stay small."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem.split('_')[0]}-{i:02d}"
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / name)
        paths.append(HERE / name)
    return paths


def execute(path: Path, timeout: int = 1200) -> None:
    """Run a notebook top to bottom in its folder and save it with its outputs."""
    import nbclient

    nb = nbf.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}}).execute()
    nbf.write(nb, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and save its outputs")
    parser.add_argument("names", nargs="*", help="only these notebooks (file names)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for path in write(args.names):
        if args.execute:
            execute(path)
        print(path.name, "executed" if args.execute else "written")


if __name__ == "__main__":
    main()
