"""Capacity calibration for static execution: how many images of a batch each gated block must have room for.

Under ``torch.compile`` (or with ``execution='static'``) a block runs on a sub-batch of fixed size, so the graph
has static shapes and no host reads. The size comes from the gate's execution rate on training images
(:meth:`SkipNetResNet.set_gate_capacity` gives the rule); a batch that needs more room falls back to the whole batch
for that block (``overflow='exact'``: the result never changes, only its speed) or, opt-in, sends the excess
images down the shortcut (``'shortcut'``: sync-free, counted in ``model.gate_overflow``).
"""
from typing import Iterable, List

import torch


@torch.no_grad()
def gate_rates(model, batches: Iterable[torch.Tensor]) -> List[float]:
    """Per-gate share of images whose greedy decision runs the block (the model's thresholds included)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total, count = None, 0
        for x in batches:
            if x is None:
                continue
            actions = model(x.to(device), gate_policy='greedy', return_trace=True).actions.double().sum(0).cpu()
            total = actions if total is None else total + actions
            count += x.shape[0]
    finally:
        model.train(was_training)
    if not count:
        raise ValueError('No images to calibrate the gate capacity on: the data loader yielded nothing.')
    return (total / count).tolist()


def calibrate_capacity(model, batches: Iterable[torch.Tensor], sigmas: float = None) -> List[float]:
    """Measure the gates' execution rates on ``batches`` and store them as the model's static capacity."""
    rates = gate_rates(model, batches)
    model.set_gate_capacity(rates, sigmas=sigmas)
    return rates


def expected_overflow_free(model, batch: int) -> List[int]:
    """The sub-batch size of every gated block at batch size ``batch``."""
    return [model.gate_capacity_for(k, batch) for k in range(model.num_gated_blocks)]
