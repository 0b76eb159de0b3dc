"""Where a batch-1 SkipNet forward spends its time on the CPU: the shipped SkipNet-38 against the same weights as a
plain ResNet-38, with the gates' work removed step by step. Each image's path is taken from the real model first.

  plain      every block, no gate
  SkipNet    the model as users call it (folded gates, the LSTM step in NumPy)
  free gates the model's own forward, each gate's decision looked up instead of computed (its forward, rules and
             cache checks remain)
  oracle     the blocks of each image's path called directly: what skipping would cost with free gates and no
             framework around them

Rounds time every variant over the same images in a new random order; the ratios are medians of per-round ratios to
plain, so a slow round slows all variants alike.

    .venv/bin/python docs/experiments/batch1_anatomy.py [--threads 2] [--rounds 40]
"""
import argparse
import copy
import random
import statistics
import time

import torch

from timm_skipnet import folded_gates
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.skipnet import _shortcut

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=60)
    p.add_argument('--rounds', type=int, default=40)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(SHIPPED, pretrained=True).eval()
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
    xs = [x[None] for batch, _, _ in loader for x in batch]
    with torch.inference_mode():
        paths = [model.forward_with_gates(x).actions[0].tolist() for x in xs]
    blocks = model.blocks()
    host, real_logit = folded_gates.HostRecurrentGates, folded_gates.HostRecurrentGates.logit
    current = [None]

    def looked_up(self, k, x, state):
        return (1.0 if current[0][k] > 0.5 else -1.0), state

    def through(net, logit):
        def run():
            host.logit = logit
            for x, path in zip(xs, paths):
                current[0] = path
                net(x)
            host.logit = real_logit
        return run

    def oracle():
        for x, path in zip(xs, paths):
            y = blocks[0](model.maxpool(model._forward_stem(x)))
            for k, block in enumerate(blocks[1:]):
                y = block(y) if path[k] > 0.5 else _shortcut(block, y)
            model.forward_head(y)

    variants = {'plain ResNet-38': through(plain, real_logit), 'SkipNet-38': through(model, real_logit),
                'SkipNet-38, free gates': through(model, looked_up), 'oracle (path given)': oracle}
    times = {name: [] for name in variants}
    order = list(variants.items())
    with torch.inference_mode():
        for _, run in order:
            run()
        for _ in range(args.rounds):
            random.shuffle(order)
            for name, run in order:
                t = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t) / len(xs))
    base = times['plain ResNet-38']
    print(f'# batch 1, {len(xs)} CIFAR-10 test images, {args.threads} threads, torch {torch.__version__}, '
          f'{args.rounds} rounds\n| variant | us / image (median) | S vs plain (median of per-round ratios) |\n'
          '|---|---:|---:|')
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f'| {name} | {1e6 * statistics.median(ts):.0f} | {ratio:.2f}x |')


if __name__ == '__main__':
    main()
