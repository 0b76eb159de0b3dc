"""What a gate costs inside the network at batch 1: plain ResNet-38 vs SkipNet-38 with every gate computed and open,
with the current folded gate and with its earlier form (mean pooling, squeeze before the host read). Calls
interleaved in a random order each round, medians; the per-gate cost is (open - plain) / 17.

    .venv/bin/python docs/experiments/gate_cost.py [--threads 2] [--rounds 400]
"""
import argparse
import copy
import random
import time

import timm
import torch

import timm_skipnet  # noqa: F401  (registers the models)
from timm_skipnet import folded_gates


def earlier_head_logit(self, index, x, state):
    pooled = x.mean((2, 3))
    h, c = torch.lstm_cell(pooled, state, self.w_in[index], self.w_hh, self.b_in[index], self.b_hh)
    return torch.addmm(self.head_b, h, self.head_w).squeeze(1), (h, c)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = timm.create_model('skipnet_resnet38_cifar').eval()
    plain = copy.deepcopy(skip)
    plain.set_gate_policy('open')  # every block, no gate computed
    skip.gates.set_constant_probability(1.0)
    skip.eval()
    x = torch.randn(1, 3, 32, 32)
    current = folded_gates.FoldedRecurrentGates.head_logit
    variants = {'plain': None, 'current gate': current, 'earlier gate': earlier_head_logit}
    times = {name: [] for name in variants}
    with torch.inference_mode():
        order = list(variants.items())
        for _ in range(args.rounds):
            random.shuffle(order)  # no variant always follows the same one
            for name, gate in order:
                if gate is not None:
                    folded_gates.FoldedRecurrentGates.head_logit = gate
                model = plain if gate is None else skip
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    folded_gates.FoldedRecurrentGates.head_logit = current
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    print(f'| variant | latency (us) | per gate (us) |  ({args.threads} threads)\n|---|---:|---:|')
    for name, t in median.items():
        per_gate = '' if name == 'plain' else f'{1e6 * (t - median["plain"]) / skip.num_gated_blocks:.1f}'
        print(f'| {name} | {1e6 * t:.0f} | {per_gate} |')


if __name__ == '__main__':
    main()
