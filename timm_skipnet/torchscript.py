"""TorchScript for SkipNets: ``torch.jit.script(model)`` and ``torch.jit.trace(model, x)`` both give the inference
network.

TorchScript's compiler cannot read the gate loop (a ModuleList indexed by the gate number, policies as strings,
the trace record as a dataclass), and torch itself now marks ``torch.jit`` as deprecated in favour of
``torch.export`` and ``torch.compile``. So scripting a SkipNet scripts a thin module around a trace of its dense
greedy path: every block computed and each image's output mixed by its own 0/1 decision, which equals real skipping
on every finite input, any batch size. Like any trace, the script shares the
model's parameters and buffers (in-place changes such as ``set_gate_thresholds`` reach it; ``torch.jit.save``
stores them); it does not skip work. Real skipping in a deployable graph: ``torch.export`` (torch.cond per
block) or ONNX (:mod:`timm_skipnet.onnx_export`).
"""
import warnings
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['trace_inference']


class _ScriptedTrace(nn.Module):
    """What ``torch.jit.script`` compiles in place of a SkipNet: one call into the traced inference graph."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


def trace_inference(model: nn.Module, example: Optional[torch.Tensor] = None) -> torch.jit.ScriptModule:
    """The eval-mode greedy SkipNet as a TorchScript trace (dense path, equal logits). ``example``: an input batch;
    by default two images of the model's ``pretrained_cfg['input_size']``."""
    if model.training:
        raise ValueError('TorchScript holds the inference network: call model.eval() before tracing or scripting a '
                         'SkipNet (training samples the gates and updates BatchNorm statistics).')
    if example is None:
        ref = next(model.parameters())
        size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3, 224, 224)
        example = torch.zeros(2, *size, device=ref.device, dtype=ref.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*torch.jit.*deprecated.*')
        return torch.jit.trace(model, example, check_trace=False)


def scriptable(model: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of a SkipNet: a module TorchScript can compile, running the trace."""
    return _ScriptedTrace(trace_inference(model))
