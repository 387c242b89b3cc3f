#!/usr/bin/env bash
# Runs the CUDA tests, the eigensolver, engine and end-to-end benchmarks on a CUDA machine in one call (≤ 9.5 minutes)
# and writes their tables to bench/results/ (and to $OUT when set, for the device tool).
# Usage: bash bench/gpu.sh [tag] [all|e2e|diff]  (e2e: all but the engine benchmark; diff: the tests and the
# end-to-end run, ~4 minutes on an H200)   e.g. tag=h200 -> bench/results/engine-h200.md, diff-e2e-llama7b-h200.md
set -uo pipefail
cd "$(dirname "$0")/.."
tag=${1:-$(python3 -c "import re, torch; m = re.search(r'[ABHL]\d{2,3}S?', torch.cuda.get_device_name(0)); print(m.group(0).lower() if m else 'gpu')" 2>/dev/null || echo gpu)}
export PYTHONUNBUFFERED=1
# The device image has torch, numpy, scipy, safetensors, click, rich but not spectra: use the tree
# as is, with the CLI package (./cli, installed as spectra_cli) made importable by a link.
shim=$(mktemp -d); ln -s "$PWD/cli" "$shim/spectra_cli"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
what=${2:-all}
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu-$tag.log"
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$out/gpu-$tag.log"
echo "== CUDA paths of the engine against the CPU float64 reference (tests)" | tee -a "$out/gpu-$tag.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_engine.py -k cuda 2>&1 | tail -40 | tee -a "$out/gpu-$tag.log"
if [ "$what" != diff ]; then
echo "== eigensolves: batched, looped, concurrent streams" | tee -a "$out/gpu-$tag.log"
timeout 150 python3 bench/gpu_eig.py --device cuda --sizes 1024,2048,4096 --batch 8 --repeats 3 --save "gpu-eig-$tag" 2>&1 | tee -a "$out/gpu-$tag.log"
fi
if [ "$what" = all ]; then
echo "== engine benchmark" | tee -a "$out/gpu-$tag.log"
timeout 170 python3 bench/engine.py --full --device cuda --repeats 3 --naive-repeats 1 --batch 4 --save "engine-$tag" 2>&1 | tee -a "$out/gpu-$tag.log"
fi
echo "== end to end, Llama-2-7B shape" | tee -a "$out/gpu-$tag.log"
timeout 330 python3 bench/diff_e2e.py --shape llama-7b --device cuda --precisions float64,float32 --read-workers 4,8 --workdir /tmp/spectra-e2e --save "diff-e2e-llama7b-$tag" 2>&1 | tee -a "$out/gpu-$tag.log"
rm -rf /tmp/spectra-e2e
if [ "$out" != bench/results ]; then for f in bench/results/*-"$tag".md bench/results/*-"$tag".json; do [ "$f" -nt "$shim" ] && cp "$f" "$out"/; done; fi
ls -la "$out"
