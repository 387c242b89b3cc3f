#!/usr/bin/env bash
# Runs the engine and end-to-end benchmarks on a CUDA machine in one call (about 8 minutes) and
# writes their tables to bench/results/ (and to $OUT when set, for the device tool).
# Usage: bash bench/gpu.sh [tag]     e.g. tag=h200 -> bench/results/engine-h200.md, diff-e2e-llama7b-h200.md
set -uo pipefail
cd "$(dirname "$0")/.."
tag=${1:-$(python3 -c "import torch;print(torch.cuda.get_device_name(0).split()[-1].lower())" 2>/dev/null || echo gpu)}
export PYTHONUNBUFFERED=1
# The device image has torch, numpy, scipy, safetensors, click, rich but not spectra: use the tree
# as is, with the CLI package (./cli, installed as spectra_cli) made importable by a link.
shim=$(mktemp -d); ln -s "$PWD/cli" "$shim/spectra_cli"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu-$tag.log"
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$out/gpu-$tag.log"
echo "== CUDA paths of the engine against the CPU float64 reference (tests)" | tee -a "$out/gpu-$tag.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 | tail -5 | tee -a "$out/gpu-$tag.log"
echo "== engine benchmark" | tee -a "$out/gpu-$tag.log"
timeout 200 python3 bench/engine.py --full --device cuda --repeats 5 --naive-repeats 3 --batch 8 --save "engine-$tag" 2>&1 | tee -a "$out/gpu-$tag.log"
echo "== end to end, Llama-2-7B shape" | tee -a "$out/gpu-$tag.log"
timeout 300 python3 bench/diff_e2e.py --shape llama-7b --device cuda --workdir /tmp/spectra-e2e --save "diff-e2e-llama7b-$tag" 2>&1 | tee -a "$out/gpu-$tag.log"
rm -rf /tmp/spectra-e2e
if [ "$out" != bench/results ]; then cp bench/results/*-"$tag".* "$out"/ 2>/dev/null; fi
ls -la "$out"
