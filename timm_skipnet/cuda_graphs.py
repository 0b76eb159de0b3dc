"""A whole SkipNet inference call as one CUDA graph: the gates decide on the device, nothing is read back.

On a GPU the eager SkipNet reads every gate's decision back to the host (how many images run the block), which
drains the launch queue once per gated block, and inductor lowers ``torch.cond`` the same way (``pred.item()`` in
its wrapper code). Here the static execution path (:meth:`SkipNetResNet.set_gate_capacity`) is recorded once per
input shape and replayed:

* batch > 1 with ``overflow='shortcut'``: fixed-size sub-batches (top-k gather, block, scatter), no branch at all:
  records on any torch with CUDA graphs;
* batch 1, and batch > 1 with ``overflow='exact'``: each block (or its exact fallback) behind ``torch.cond``, which
  the capture turns into CUDA graph conditional nodes (torch's ``cudagraph_conditional_nodes``, CUDA >= 12.4): a
  skipped block's kernels are not launched. Where the installed torch lacks them, recording is refused with
  that reason.

The plain network (every gate open) records the same way, so both are timed as graphs (``timm-skipnet bench
--mode graph``).
"""
import contextlib
from typing import Optional

import torch
import torch.nn as nn

from .skipnet import SkipNetResNet, eager_control_flow

__all__ = ['CUDAGraphed', 'conditional_nodes_available', 'needs_conditional_nodes']


def _control_flow_modes():
    """(warm-up mode, capture mode) for torch.cond inside a CUDA graph, or None where torch has no such modes."""
    try:
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode,
            CUDAGraphCaptureControlFlowOpDispatchMode,
        )
    except ImportError:
        return None
    return ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode


def conditional_nodes_available() -> bool:
    """Whether this torch records ``torch.cond`` as CUDA graph conditional nodes."""
    return _control_flow_modes() is not None


def needs_conditional_nodes(model: nn.Module, batch: int) -> bool:
    """Whether the static path of ``model`` at this batch size branches (torch.cond) anywhere."""
    if not isinstance(model, SkipNetResNet) or model.gate_policy == 'open':
        return False
    if batch == 1:
        return True
    return model.capacity_overflow == 'exact' and any(
        model.gate_capacity_for(k, batch) < batch for k in range(model.num_gated_blocks))


@contextlib.contextmanager
def _static_execution(model: nn.Module):
    if not isinstance(model, SkipNetResNet):
        yield
        return
    previous = model.execution
    model.set_execution('static')
    try:
        with eager_control_flow():
            yield
    finally:
        model.set_execution(previous)


class CUDAGraphed:
    """``model`` (eval mode, on a CUDA device) recorded for inputs shaped like ``example``.

    Calling it copies the images into the graph's input, replays the graph and returns its output tensor, which the
    next call overwrites (clone it to keep it). What the model computes is fixed at recording (the folded gates, the
    sub-batch sizes): record again after changing weights, thresholds or capacities.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3,
                 pool: Optional[tuple] = None):
        inner = [m for m in model.modules() if isinstance(m, SkipNetResNet)]
        if inner and not isinstance(model, SkipNetResNet):
            raise ValueError(f'Record the SkipNet itself, not the {type(model).__name__} around it: only a SkipNet '
                             'switches to its static, sync-free path while it is recorded.')
        if model.training:
            raise ValueError('CUDA-graph an inference model: call model.eval() first (training updates BatchNorm '
                             'statistics and samples the gates).')
        if example.device.type != 'cuda':
            raise ValueError(f'CUDA graphs record CUDA work: the example is on {example.device}; move the model and '
                             'the example to a GPU (model.cuda(), x.cuda()).')
        modes = _control_flow_modes()
        branching = needs_conditional_nodes(model, example.shape[0])
        if branching and modes is None:
            raise RuntimeError(
                f'At batch {example.shape[0]} this SkipNet branches on its gates (torch.cond), which a CUDA graph can '
                f'hold only as conditional nodes, and torch {torch.__version__} has none '
                '(torch._higher_order_ops.cudagraph_conditional_nodes). Use a batch > 1 with '
                "model.set_gate_capacity(model.gate_capacity.tolist(), overflow='shortcut') (sync-free, no branch), "
                'or a torch that has them.')
        warm_mode = modes[0]() if branching else contextlib.nullcontext()
        capture_mode = modes[1]() if branching else contextlib.nullcontext()
        self.model = model
        self.static_input = example.detach().clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), _static_execution(model):
            counted = model.gate_overflow.clone() if isinstance(model, SkipNetResNet) else None
            side = torch.cuda.Stream(device=example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))  # after the copy above
            with torch.cuda.stream(side), warm_mode:
                for _ in range(max(1, warmup)):  # cuDNN / cuBLAS choose their kernels outside the recording
                    model(self.static_input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            with torch.cuda.graph(self.graph, pool=pool), capture_mode:
                self.static_output = model(self.static_input)
            if counted is not None:  # the warm-up calls count no overflow; replays do
                model.gate_overflow.copy_(counted)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape:
            raise ValueError(f'This graph was recorded for inputs of shape {tuple(self.static_input.shape)}, got '
                             f'{tuple(x.shape)}: record one CUDAGraphed per batch size (or pad the batch).')
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output
