#!/usr/bin/env bash
# Every GPU speed row of the project in one run under 8 minutes (the slowest steps first get a time limit each):
#   1. the published SkipNet-38 on CIFAR-10 test images vs the same weights with every gate open, eager and
#      compiled (torch.compile(fullgraph=True): static execution, its shipped capacity), batch 1 to 4,096;
#      and the same compiled with CUDA graphs (--compile-mode reduce-overhead) at batch 256;
#   2. synthetic per-image gates, half of the blocks per image: skipnet_resnet101 at 224 px, plain timm ResNet vs
#      SkipNet, eager (batch 1 / 64 / 256) and compiled (batch 256);
#   3. training steps per stage against a plain step (SkipNet-38, batch 256).
# On a machine without this repository's venv: PYTHON=python3 with the package on PYTHONPATH, `datasets` installed,
# and CIFAR10_DIR pointing at a copy of the test split (test-00000-of-00001.parquet, 9.5 MB).
# Tables go to stdout and JSON to $OUT (or runs/gpu_bench); record hardware, torch version and date beside them.
#   bash examples/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${CIFAR10_DIR:-../shared/data/cifar10/plain}
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
step() { local limit=$1; shift; echo; echo "## $* (limit ${limit} s)"; timeout "$limit" "$@" || echo "(step ended: rc $?)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)'
date -u +%F
BENCH="$PY -m timm_skipnet.cli bench --device cuda"
step 90 $BENCH --model local-dir:hub_configs/skipnet_resnet38_cifar.cifar10 --data "$DATA" --images 8192 \
  --mode eager --batch-sizes 1 8 64 256 1024 4096 --output "$OUT/published_eager.json"
step 120 $BENCH --model local-dir:hub_configs/skipnet_resnet38_cifar.cifar10 --data "$DATA" --images 8192 \
  --mode compiled --batch-sizes 1 64 256 4096 --output "$OUT/published_compiled.json"
# CUDA graphs over static execution; perf_hints prints why inductor skips a graph, if it does (on an H200 on
# 2026-12-04 this row ran at 0.23x, the plain network gaining from its graphs and the SkipNet not)
step 60 env TORCH_LOGS=perf_hints $BENCH --model local-dir:hub_configs/skipnet_resnet38_cifar.cifar10 --data "$DATA" \
  --images 8192 --mode compiled --compile-mode reduce-overhead --batch-sizes 256 --output "$OUT/published_cudagraphs.json"
step 60 $BENCH --model skipnet_resnet101 --mode eager --batch-sizes 1 64 256 --min-time 1 --output "$OUT/r101_eager.json"
# compiling ResNet-101 with 32 gated blocks took more than 100 s for two batch sizes: one, with the time it needs
step 120 $BENCH --model skipnet_resnet101 --mode compiled --batch-sizes 256 --min-time 1 \
  --output "$OUT/r101_compiled.json"
step 30 $BENCH --model skipnet_resnet38_cifar --train --batch-sizes 256 --steps 20
echo "done: $OUT"
