"""Exact per-image compute of a SkipNet from its gate decisions.

A per-part MAC table is measured once with torch's ``FlopCounterMode`` at batch 1 (stem, every block, every
projection shortcut, every gate, head); the cost of an image is then

    MACs = stem + block_0 + sum_k [a_k * block_k + (1 - a_k) * shortcut_k] + sum_k gate_k + head

with a_k in {0, 1} the decision for gated block k. ``computation_percentage`` is the paper's block-count proxy
``100 * (1 + sum_k a_k) / N`` (it ignores stem, head, gates and shortcut costs), kept for comparability.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_macs(fn, *args) -> int:
    """Multiply-accumulates of one call (FlopCounterMode counts 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


@dataclass
class MacTable:
    input_size: Sequence[int]
    stem: int
    blocks: List[int]  # full cost of every block (block 0 included), projection shortcut included
    shortcuts: List[int]  # cost of a skipped block: its projection shortcut, 0 for an identity shortcut
    gates: List[int]  # one per gated block (all run for every image)
    head: int

    @property
    def full_macs(self) -> int:
        """The plain ResNet: every block, no gates."""
        return self.stem + sum(self.blocks) + self.head

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def per_image_macs(self, actions: torch.Tensor) -> torch.Tensor:
        """(B,) exact MACs from (B, K) 0/1 actions."""
        a = actions.double()
        blocks = torch.tensor(self.blocks[1:], dtype=torch.float64, device=a.device)
        shortcuts = torch.tensor(self.shortcuts[1:], dtype=torch.float64, device=a.device)
        fixed = self.stem + self.blocks[0] + sum(self.gates) + self.head
        return fixed + a @ blocks + (1 - a) @ shortcuts

    def computation_percentage(self, actions: torch.Tensor) -> torch.Tensor:
        """(B,) the paper's block-count proxy, in percent."""
        return 100.0 * (1 + actions.double().sum(1)) / self.num_blocks

    def to_dict(self) -> Dict:
        return asdict(self)


@torch.no_grad()
def measure_mac_table(model, input_size: Sequence[int] = None) -> MacTable:
    """Measure every part of ``model`` (a :class:`SkipNetResNet`) once at batch 1."""
    input_size = tuple(input_size or model.pretrained_cfg['input_size'])
    was_training = model.training
    model.eval()
    try:
        ref = next(model.parameters())
        x = torch.randn(1, *input_size, device=ref.device, dtype=ref.dtype)
        stem = count_macs(lambda t: model.maxpool(model._forward_stem(t)), x)
        x = model.maxpool(model._forward_stem(x))
        state = model.gates.init_state(x)
        blocks, shortcuts, gates = [], [], []
        for k, block in enumerate(model.blocks()):
            if k > 0:
                gates.append(count_macs(model.gates, k - 1, x, state))
                _, state = model.gates(k - 1, x, state)
            shortcuts.append(count_macs(block.downsample, x) if block.downsample is not None else 0)
            blocks.append(count_macs(block, x))
            x = block(x)
        head = count_macs(model.forward_head, x)
    finally:
        model.train(was_training)
    return MacTable(list(input_size), stem, blocks, shortcuts, gates, head)
