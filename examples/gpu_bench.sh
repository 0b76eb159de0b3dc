#!/usr/bin/env bash
# The project's GPU measurements, one named row each; the default set runs in under 8 minutes on one H200:
#   tests                    the CUDA-only tests (folded gates on CUDA, CUDA graphs equal eager logits)
#   published-graph-b1       the published SkipNet-38 on CIFAR-10 test images vs the same weights with every gate
#                            open, both recorded as one CUDA graph (bench --mode graph), batch 1: each block behind a
#                            conditional node
#   published-graph          the same, batch 64 to 4,096, exact capacity rule (conditional node per gate fallback)
#   published-graph-shortcut the same with the sync-free 'shortcut' capacity rule (no branch in the graph)
#   r101-graph-shortcut      skipnet_resnet101, 224 px, half of the blocks per image (synthetic gates), plain timm
#                            ResNet vs SkipNet, both as CUDA graphs, batch 64 / 256, 'shortcut' rule
#   r101-graph-b1            the same at batch 1
#   train-compiled           one optimizer step per stage vs a plain step, every forward compiled (SkipNet-38, 256)
#   published-reduce-overhead  torch.compile(mode='reduce-overhead') of both, 'shortcut' rule, batch 256 / 1,024
# Further rows, not in the default set: published-eager, published-compiled, r101-eager, r101-compiled, train.
# On a machine without this repository's venv: PYTHON=python3 with the package on PYTHONPATH, `datasets` (and
# pytest for the tests row) installed, and CIFAR10_DIR pointing at a copy of the test split
# (test-00000-of-00001.parquet, 9.5 MB). Tables go to stdout and JSON to $OUT (or runs/gpu_bench); record hardware,
# torch version and date beside them.
#   bash examples/gpu_bench.sh                 # the default rows
#   ROWS="published-eager train" bash examples/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${CIFAR10_DIR:-../shared/data/cifar10/plain}
OUT=${OUT:-runs/gpu_bench}
ROWS=${ROWS:-tests published-graph-b1 published-graph published-graph-shortcut r101-graph-shortcut r101-graph-b1 \
train-compiled published-reduce-overhead}
mkdir -p "$OUT"
step() { local limit=$1; shift; echo; echo "## $* (limit ${limit} s)"; timeout "$limit" "$@" || echo "(step ended: rc $?)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)'
$PY -c 'import timm_skipnet.cuda_graphs as g; print("CUDA graph conditional nodes:", g.conditional_nodes_available())'
date -u +%F
BENCH="$PY -m timm_skipnet.cli bench --device cuda"
PUBLISHED=(--model local-dir:hub_configs/skipnet_resnet38_cifar.cifar10 --data "$DATA" --images 8192)
for row in $ROWS; do
  case $row in
    tests) step 60 env SKIPNET_TEST_CUDA=1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
             tests/test_fast_inference.py -k cuda ;;
    published-graph-b1) step 45 $BENCH "${PUBLISHED[@]}" --mode graph --batch-sizes 1 --output "$OUT/$row.json" ;;
    published-graph) step 60 $BENCH "${PUBLISHED[@]}" --mode graph --batch-sizes 64 256 1024 4096 \
                       --output "$OUT/$row.json" ;;
    published-graph-shortcut) step 45 $BENCH "${PUBLISHED[@]}" --mode graph --overflow shortcut \
                                --batch-sizes 64 256 1024 --output "$OUT/$row.json" ;;
    r101-graph-shortcut) step 60 $BENCH --model skipnet_resnet101 --mode graph --overflow shortcut \
                           --batch-sizes 64 256 --min-time 1 --output "$OUT/$row.json" ;;
    r101-graph-b1) step 30 $BENCH --model skipnet_resnet101 --mode graph --batch-sizes 1 --min-time 1 \
                     --output "$OUT/$row.json" ;;
    # four compilations of a forward and backward: about 3 minutes
    train-compiled) step 240 $BENCH --model skipnet_resnet38_cifar --train --mode compiled --batch-sizes 256 \
                      --steps 10 ;;
    published-reduce-overhead) step 120 $BENCH "${PUBLISHED[@]}" --mode compiled --compile-mode reduce-overhead \
                                 --overflow shortcut --batch-sizes 256 1024 --output "$OUT/$row.json" ;;
    r101-reduce-overhead) step 150 $BENCH --model skipnet_resnet101 --mode compiled --compile-mode reduce-overhead \
                            --overflow shortcut --batch-sizes 256 --min-time 1 --output "$OUT/$row.json" ;;
    published-eager) step 90 $BENCH "${PUBLISHED[@]}" --mode eager --batch-sizes 1 8 64 256 1024 4096 \
                       --output "$OUT/$row.json" ;;
    published-compiled) step 120 $BENCH "${PUBLISHED[@]}" --mode compiled --batch-sizes 1 64 256 4096 \
                          --output "$OUT/$row.json" ;;
    r101-eager) step 60 $BENCH --model skipnet_resnet101 --mode eager --batch-sizes 1 64 256 --min-time 1 \
                  --output "$OUT/$row.json" ;;
    # compiling ResNet-101 with 32 gated blocks took more than 100 s for two batch sizes: one
    r101-compiled) step 120 $BENCH --model skipnet_resnet101 --mode compiled --batch-sizes 256 --min-time 1 \
                     --output "$OUT/$row.json" ;;
    train) step 30 $BENCH --model skipnet_resnet38_cifar --train --batch-sizes 256 --steps 20 ;;
    *) echo "unknown row '$row'" >&2; exit 2 ;;
  esac
done
echo "done: $OUT"
