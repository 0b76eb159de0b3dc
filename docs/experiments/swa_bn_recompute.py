"""What recomputing the BatchNorm statistics of the shipped SWA average changes (torch update_bn semantics).

    .venv/bin/python docs/experiments/swa_bn_recompute.py 10000 50000   # training images per recompute
"""
import copy
import json
import os
import sys

import timm
import torch

import timm_skipnet  # noqa: F401
from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.train import update_bn

torch.set_num_threads(2)
DATA = '../shared/data/cifar10/plain'
spec = DataSpec(DATA)
shipped = timm.create_model('local-dir:hub_configs/skipnet_resnet38_cifar.cifar10', pretrained=True).eval()
table = measure_mac_table(shipped)
test = [(x, y) for x, y, _ in make_loader(spec, 'test', build_transforms(shipped, False), 500) if x is not None]


@torch.no_grad()
def score(model):
    model.eval()
    correct, macs, n = 0, 0.0, 0
    for x, y in test:
        tr = model.forward_with_gates(x)
        correct += (tr.logits.argmax(1) == y).sum().item()
        macs += table.per_image_macs(tr.actions).sum().item()
        n += len(y)
    return dict(top1=100 * correct / n, correct=correct, images=n, mmacs=macs / n / 1e6,
                fewer_macs_pct=100 * (1 - macs / n / table.full_macs))


rows = {'averaged running statistics (shipped)': score(shipped)}
for n_images in [int(a) for a in sys.argv[1:]] or [10_000]:
    net = copy.deepcopy(shipped)
    net.set_execution('dense')
    loader = make_loader(spec, 'train', build_transforms(net, True), 128, shuffle=True, seed=0, limit=n_images)
    with torch.no_grad():
        seen = update_bn(net, (x for x, _, _ in loader if x is not None), gate_policy='greedy', keep_gates=True)
    net.set_execution('auto')
    rows[f'recomputed on {seen} training images'] = score(net)
for k, v in rows.items():
    print(f"| {k} | {v['top1']:.2f} ({v['correct']}/{v['images']}) | {v['mmacs']:.2f} | {v['fewer_macs_pct']:.1f} % |")
os.makedirs("runs/swa_bn", exist_ok=True)
json.dump(rows, open("runs/swa_bn/result.json", "w"), indent=1)
