"""Wall-clock speed-up of a trained SkipNet over the same network with every gate open (the plain ResNet: no gate
is computed) on the CIFAR-10 test images, on any device: real skipping on the model's own per-image decisions.

    .venv/bin/python examples/cifar10_speed.py --device cuda --output runs/speed_cuda.json

The ideal speed-up is the MACs ratio of the two on the same images; eta = measured / ideal.
"""
import argparse
import contextlib
import json
import os

import timm
import torch

import timm_skipnet  # noqa: F401
from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.bench import device_name, speedup_on_images
from timm_skipnet.checkpoints import atomic_write_text
from timm_skipnet.data import DataSpec, build_transforms, make_loader

PUBLISHED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default=PUBLISHED)
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default='', help="'bf16': time under bf16 autocast (GPU)")
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 256],
                   help='batch 1 times the first 1,000 images, larger batches all of them')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--output', default='')
    args = p.parse_args()
    if args.model.startswith('local-dir:') and not os.path.isdir(args.model[len('local-dir:'):]):
        raise SystemExit(f'{args.model}: no such folder; run from the repository root or pass --model.')
    model = timm.create_model(args.model, pretrained=True).eval()
    table = measure_mac_table(model)
    baseline = timm.create_model(args.model, pretrained=True).eval()
    baseline.set_gate_policy('open')  # = the plain ResNet: no gate is computed
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 500)
    xs = torch.cat([x for x, _, _ in loader])
    with torch.inference_mode():
        actions = torch.cat([model.forward_with_gates(xs[i:i + 500]).actions for i in range(0, len(xs), 500)])
    ideal = table.full_macs / table.per_image_macs(actions).mean().item()
    model, baseline = model.to(args.device), baseline.to(args.device)
    amp = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.amp == 'bf16'
           else contextlib.nullcontext())
    with amp:
        settings = [(bs, 1000 if bs == 1 else len(xs)) for bs in args.batch_sizes]
        rows = speedup_on_images(model, baseline, xs, settings, rounds=args.rounds, device=args.device)
    where = device_name(args.device) + (', bf16 autocast' if args.amp == 'bf16' else ', fp32')
    print(f'# {args.model} vs its gates-open self on {len(xs)} CIFAR-10 test images, {where}, '
          f'torch {torch.__version__}; ideal speed-up by MACs {ideal:.2f}x')
    print('| batch | images | SkipNet img/s | ResNet img/s | speed-up | eta = speed-up / ideal |')
    print('|---:|---:|---:|---:|---:|---:|')
    for bs, r in rows.items():
        print(f"| {bs} | {r['images']} | {r['model_img_per_s']:.0f} | {r['baseline_img_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['speedup'] / ideal:.2f} |")
    if args.output:
        atomic_write_text(args.output, json.dumps(dict(model=args.model, device=where, torch=torch.__version__,
                                                       ideal_speedup=ideal, rows=rows), indent=2))


if __name__ == '__main__':
    main()
