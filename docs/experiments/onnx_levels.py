"""Batch-1 onnxruntime latency of the shipped SkipNet-38 export and its plain export (the same weights, every gate
open) at each of onnxruntime's graph optimisation levels, all in one process: each round times every runtime over
the same test images in a new random order; medians of per-round ratios. ORT_ENABLE_ALL adds the blocked NCHWc
layout, which the plain network keeps from stem to head and the SkipNet leaves at every `If`.

    .venv/bin/python docs/experiments/onnx_levels.py [--threads 2] [--rounds 7]
"""
import argparse
import copy
import os
import random
import statistics
import tempfile
import time

import onnxruntime as ort
import torch

from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.onnx_export import export_onnx

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'
LEVELS = {'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def us_per_image(runtime, xs) -> float:
    name = runtime.get_inputs()[0].name
    t = time.perf_counter()
    for i in range(len(xs)):
        runtime.run(None, {name: xs[i:i + 1]})
    return 1e6 * (time.perf_counter() - t) / len(xs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    model = load_model(SHIPPED, pretrained=True).eval()
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
    xs = torch.cat([x for x, _, _ in loader if x is not None]).numpy()
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    runtimes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in (('plain', plain), ('skipnet', model)):
            path = export_onnx(net, os.path.join(tmp, f'{name}.onnx'))
            for level, value in LEVELS.items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                opts.graph_optimization_level = value
                runtimes[(name, level)] = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    for r in runtimes.values():  # warm-up
        us_per_image(r, xs[:20])
    times = {k: [] for k in runtimes}
    for _ in range(args.rounds):
        order = list(runtimes.items())
        random.shuffle(order)
        for k, r in order:
            times[k].append(us_per_image(r, xs))
    print(f'# onnxruntime {ort.__version__}, {args.threads} threads, batch 1, {len(xs)} test images, '
          f'{args.rounds} rounds')
    print('| export | level | us / image | S vs plain, same level | S vs plain, level all |\n|---|---|---:|---:|---:|')
    for (name, level), v in times.items():
        same = statistics.median(a / b for a, b in zip(times[('plain', level)], v))
        best = statistics.median(a / b for a, b in zip(times[('plain', 'all')], v))
        print(f'| {name} | {level} | {statistics.median(v):,.0f} | {same:.2f}x | {best:.2f}x |')


if __name__ == '__main__':
    main()
