"""onnxruntime latency of an exported SkipNet against the same weights exported as the plain ResNet (every gate
open, no gate computed), batch 1 on real test images, the two runtimes interleaved; prints a table.

    python examples/onnx_speed.py --model local-dir:hub_configs/skipnet_resnet38_cifar.cifar10 \
        --data ../shared/data/cifar10/plain --threads 2
    python examples/onnx_speed.py --model skipnet_resnet50 --rate 0.5 --images 40 --threads 2   # synthetic gates
    python examples/onnx_speed.py --checkpoint runs/hardened.safetensors   # weights on top (e.g. threshold --harden)
"""
import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import timm_skipnet  # noqa: F401
from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.bench import calibrate_gates
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.onnx_export import count_if_nodes, export_onnx, onnx_session


def images_per_second(ort_session, xs) -> float:
    name = ort_session.get_inputs()[0].name
    ort_session.run(None, {name: xs[:1]})
    t0 = time.perf_counter()
    for i in range(len(xs)):
        ort_session.run(None, {name: xs[i:i + 1]})
    return len(xs) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='local-dir:hub_configs/skipnet_resnet38_cifar.cifar10')
    p.add_argument('--data', default=os.environ.get('CIFAR10_DIR', '../shared/data/cifar10/plain'))
    p.add_argument('--checkpoint', default='', help='weights file or exported folder loaded on top of --model')
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rate', type=float, default=0.0, help='an untrained --model: random per-image gates running this '
                   'share of the blocks (as timm-skipnet bench), on random images instead of --data')
    args = p.parse_args()
    if args.rate:
        model = load_model(args.model, args.checkpoint).eval()
        size = model.pretrained_cfg['input_size']
        xs = torch.randn(args.images, *size)
        calibrate_gates(model, torch.randn(16, *size), args.rate)
    else:
        model = load_model(args.model, args.checkpoint, pretrained=True).eval()
        loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
        xs = torch.cat([x for x, _, _ in loader if x is not None])
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    with torch.no_grad():
        actions = model.forward_with_gates(xs).actions
    table = measure_mac_table(model)
    ideal = table.full_macs / table.per_image_macs(actions).mean().item()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(m, os.path.join(tmp, f'{name}.onnx')) for name, m in (('skipnet', model),
                                                                                          ('plain', plain))}
        ort_sessions = {name: onnx_session(path, threads=args.threads) for name, path in paths.items()}
        ifs = {name: count_if_nodes(path) for name, path in paths.items()}
        rates = {name: [] for name in ort_sessions}
        order = list(ort_sessions.items())
        for _ in range(args.rounds):
            for name, s in order:
                rates[name].append(images_per_second(s, xs.numpy()))
            order.reverse()  # neither runtime always runs first
    med = {name: statistics.median(r) for name, r in rates.items()}
    import onnxruntime
    images = f'random images, gates at rate {args.rate:g}' if args.rate else 'test images'
    print(f'# {args.model}, onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads, torch '
          f'{torch.__version__}, batch 1, {len(xs)} {images}, medians of {args.rounds} interleaved rounds')
    print('| export | If nodes | images/s | measured S | ideal R |')
    print('|---|---:|---:|---:|---:|')
    print(f"| plain ResNet (every gate open) | {ifs['plain']} | {med['plain']:.0f} | 1.00x | 1.00x |")
    print(f"| SkipNet (greedy gates, If per block) | {ifs['skipnet']} | {med['skipnet']:.0f} | "
          f"{med['skipnet'] / med['plain']:.2f}x | {ideal:.2f}x |")


if __name__ == '__main__':
    main()
