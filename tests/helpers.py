"""Shared test helpers."""
import torch


def randomize_gates(model, seed: int = 0, scale: float = 2.0) -> None:
    """Make gate decisions vary per image (a fresh model's gates are all open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gates = model.gates
        if hasattr(gates, 'head'):
            gates.head.weight.copy_(torch.randn(gates.head.weight.shape, generator=g) * scale)
            gates.head.bias.zero_()
        else:
            for gate in gates.gates:
                gate.fc.weight.copy_(torch.randn(gate.fc.weight.shape, generator=g) * scale)
                gate.fc.bias.zero_()


def randomize_bn(model, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode equivalences are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
