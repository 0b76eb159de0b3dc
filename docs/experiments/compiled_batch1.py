"""Batch 1 under `torch.compile` on the CPU: where the compiled SkipNet-38's time goes, and what inductor's C++
wrapper changes. The shipped SkipNet-38 against the same weights as a plain ResNet-38, every variant compiled with
`fullgraph=True` from its own copy, in one process:

  plain      every block, no gate
  SkipNet    `prepare_for_export(model)`: thresholds as constants, gates in their export form, a `torch.cond` per
             gated block (the static path at batch 1)
  one path   thresholds that force each gate the way most images go (no gate computed, no `torch.cond`): the blocks
             alone, the most compiled skipping can give

each with inductor's default Python wrapper, with its C++ wrapper (`options={'cpp_wrapper': True}`), and built ahead of
time into an AOTInductor package (`timm_skipnet.aoti_export`, no Python between kernels). Rounds time
every variant over the same test images in a new random order; ratios are medians of per-round ratios to the plain
network compiled the same way, so a slow round slows all variants alike.

    .venv/bin/python docs/experiments/compiled_batch1.py [--threads 2] [--rounds 20]
"""
import argparse
import copy
import os
import random
import statistics
import tempfile
import time

import torch

from timm_skipnet.aoti_export import export_aoti, load_aoti
from timm_skipnet.capacity import gate_rates
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.onnx_export import prepare_for_export
from timm_skipnet.policy import THRESHOLD_LOGIT_LIMIT

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'
NO_ASSERTS = {'size_asserts': False, 'alignment_asserts': False, 'scalar_asserts': False}
WRAPPERS = {'python wrapper': {}, 'C++ wrapper': {'cpp_wrapper': True}, 'python, no asserts': NO_ASSERTS,
            'C++, no asserts': {'cpp_wrapper': True, **NO_ASSERTS}, 'AOTInductor': None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--wrappers', nargs='+', default=['python wrapper', 'C++ wrapper', 'AOTInductor'],
                   choices=list(WRAPPERS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every variant compiles the same forward once
    model = load_model(SHIPPED, pretrained=True).eval()
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
    xs = [x[None] for batch, _, _ in loader for x in batch]
    one_path = copy.deepcopy(model)
    rates = gate_rates(model, [torch.cat(xs)])
    one_path.set_gate_thresholds([-THRESHOLD_LOGIT_LIMIT if r >= 0.5 else THRESHOLD_LOGIT_LIMIT for r in rates],
                                 logits=True)
    with torch.inference_mode():
        share = statistics.mean(float((model.forward_with_gates(x).actions
                                       == one_path.forward_with_gates(x).actions).all()) for x in xs)
    sources = {'plain': plain, 'SkipNet': prepare_for_export(model), 'one path': prepare_for_export(one_path)}
    variants = {}
    with torch.inference_mode():
        for wrapper in args.wrappers:
            options = WRAPPERS[wrapper]
            for name, net in sources.items():
                if options is None:  # torch.export, then compiled ahead of time into a package
                    with tempfile.TemporaryDirectory() as tmp:
                        compiled = load_aoti(export_aoti(net, os.path.join(tmp, 'net.pt2')))
                else:
                    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, dynamic=False, options=options)
                for x in xs[:20]:  # compiles
                    compiled(x)
                variants[wrapper, name] = compiled
        times = {key: [] for key in variants}
        order = list(variants.items())
        for _ in range(args.rounds):
            random.shuffle(order)
            for key, net in order:
                t = time.perf_counter()
                for x in xs:
                    net(x)
                times[key].append((time.perf_counter() - t) / len(xs))
    print(f'# batch 1, {len(xs)} CIFAR-10 test images, {args.threads} threads, torch {torch.__version__}, '
          f'{args.rounds} rounds; the one path is the SkipNet\'s own path for {100 * share:.0f} % of these images\n'
          '| wrapper | variant | us / image | S vs plain, same wrapper | S vs plain, first wrapper |\n'
          '|---|---|---:|---:|---:|')
    for (wrapper, name), ts in times.items():
        same = statistics.median(a / b for a, b in zip(times[wrapper, 'plain'], ts))
        base = statistics.median(a / b for a, b in zip(times[args.wrappers[0], 'plain'], ts))
        print(f'| {wrapper} | {name} | {1e6 * statistics.median(ts):,.0f} | {same:.2f}x | {base:.2f}x |')


if __name__ == '__main__':
    main()
