"""Batch-1 speed of the shipped SkipNet-38 before and after `threshold --harden`, against the same weights as the
plain ResNet-38, eager and compiled, all in one process: each round times every variant over the same test images,
in a new random order; medians of the rounds. Compiled SkipNets are compiled from `prepare_for_export` copies
(thresholds as constants: a hardened gate needs no branch, and the compiler drops gates nothing reads).

    .venv/bin/python docs/experiments/hardened_speed.py --checkpoint runs/hardened.safetensors [--threads 2]
"""
import argparse
import copy
import random
import statistics
import time

import torch

from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.onnx_export import prepare_for_export

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--checkpoint', required=True, help='the hardened weights (timm-skipnet threshold --harden)')
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shipped = load_model(SHIPPED, pretrained=True).eval()
    hardened = load_model(SHIPPED, args.checkpoint, pretrained=True).eval()
    plain = copy.deepcopy(shipped)
    plain.set_gate_policy('open')
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(shipped, False), 100, limit=args.images)
    xs = [x[None] for batch, _, _ in loader for x in batch]
    variants = {'eager: plain ResNet-38': plain, 'eager: SkipNet-38': shipped, 'eager: SkipNet-38 hardened': hardened}
    for name, m in (('plain ResNet-38', plain), ('SkipNet-38', prepare_for_export(shipped)),
                    ('SkipNet-38 hardened', prepare_for_export(hardened))):
        variants[f'compiled: {name}'] = torch.compile(m, fullgraph=True, dynamic=False)
    times = {name: [] for name in variants}
    order = list(variants.items())
    with torch.inference_mode():
        for _, m in order:  # warm-up (compiles)
            for x in xs[:20]:
                m(x)
        for _ in range(args.rounds):
            random.shuffle(order)
            for name, m in order:
                t = time.perf_counter()
                for x in xs:
                    m(x)
                times[name].append((time.perf_counter() - t) / len(xs))
    print(f'# batch 1, {len(xs)} CIFAR-10 test images, {args.threads} threads, torch {torch.__version__}, medians of '
          f'{args.rounds} rounds\n| variant | us / image | S vs plain (same mode) |\n|---|---:|---:|')
    for name, ts in times.items():
        mode = name.split(':')[0]
        base = statistics.median(times[f'{mode}: plain ResNet-38'])
        print(f'| {name} | {1e6 * statistics.median(ts):.0f} | {base / statistics.median(ts):.2f}x |')


if __name__ == '__main__':
    main()
