"""The batch-1 CPU gate (``folded_gates.HostRecurrentGates``) of this checkout against the one of an earlier commit,
inside the shipped SkipNet-38, with the plain ResNet-38 (same weights, every block, no gate) beside them. The three
run over the same test images in a new random order each round; ratios are medians of per-round ratios.

    .venv/bin/python docs/experiments/gate_step_ab.py --baseline <commit> [--threads 1] [--rounds 30]

With ``--model skipnet_resnet50 --rate 0.5`` (an untrained model): random gates calibrated as ``timm-skipnet bench``
does, so about half of the gated blocks run per image, on random 224-px images instead of test images.
"""
import argparse
import copy
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch

from timm_skipnet.bench import calibrate_gates
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def module_at(commit: str):
    source = subprocess.run(['git', 'show', f'{commit}:timm_skipnet/folded_gates.py'], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location('folded_gates_baseline', f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--baseline', required=True, help='the commit whose gate to compare with')
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=60)
    p.add_argument('--rounds', type=int, default=30)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--model', default=SHIPPED)
    p.add_argument('--rate', type=float, default=0.0, help='an untrained --model: random gates running this share')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rate:
        torch.manual_seed(0)
        model = timm.create_model(args.model).eval()
        size = model.pretrained_cfg['input_size']
        with torch.no_grad():
            calibrate_gates(model, torch.randn(16, *size), args.rate)
        xs = [torch.randn(1, *size) for _ in range(args.images)]
    else:
        model = load_model(args.model, pretrained=True).eval()
        loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
        xs = [x[None] for batch, _, _ in loader for x in batch]
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    folded = model.gates.folded()
    hosts = {'current': folded.host(xs[0]), 'baseline': module_at(args.baseline).HostRecurrentGates(folded)}

    def us_per_image(net, host=None):
        if host is not None:
            folded._host = host  # the model's forward asks the folded gates for their host twin
        t0 = time.perf_counter()
        for x in xs:
            net(x)
        return (time.perf_counter() - t0) / len(xs) * 1e6

    times = {'plain': [], 'baseline': [], 'current': []}
    with torch.inference_mode():
        for x in xs[:5]:
            model(x), plain(x)
        for _ in range(args.rounds):
            order = [('plain', plain, None)] + [(name, model, host) for name, host in hosts.items()]
            random.shuffle(order)
            for name, net, host in order:
                times[name].append(us_per_image(net, host))
                assert model.gates.folded() is folded  # no refold inside a timing
    images = 'random' if args.rate else 'CIFAR-10 test'
    print(f'# {args.model}, batch 1, {len(xs)} {images} images, {args.threads} threads, torch {torch.__version__}, '
          f'{args.rounds} rounds; baseline gate: {args.baseline}')
    print('| variant | us / image | S vs plain |')
    print('|---|---:|---:|')
    for name, v in times.items():
        ratio = statistics.median(b / t for b, t in zip(times['plain'], v))
        print(f'| {name} | {statistics.median(v):,.0f} | {ratio:.3f}x |')


if __name__ == '__main__':
    main()
