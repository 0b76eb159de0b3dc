"""SkipNet gates: small modules that read a block's input and emit one execution logit per image.

Every gate bank exposes the same interface so the model loop does not care which family it runs:
``init_state(x)`` once per forward, then ``forward(index, x, state) -> (logits, state)`` before each gated block.
Logits, not probabilities, are returned: the policy (``policy.py``) turns them into decisions.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folded_gates import FoldedCache, FoldedFeedForwardGates, FoldedRecurrentGates

GateState = Optional[Tuple[torch.Tensor, torch.Tensor]]

GATE_TYPES = ('rnn', 'ff1', 'ff2')


# Python floats, not tensors: gates are also built under torch.device('meta'), where no tensor value can be read
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


class RecurrentGates(nn.Module):
    """SkipNet's RNNGate: per-block GAP + projection to ``embed_dim``, one LSTM cell shared by all gates.

    The LSTM state starts at zero for every image and runs through the gates in network order, so a gate
    sees a summary of every earlier block's input. Projections are ``nn.Linear`` on the pooled features
    (numerically the original ``Conv2d(C, 10, 1)`` on a 1x1 map) and adaptive pooling replaces the
    original fixed ``AvgPool2d(P)``, so any input size works.
    """

    def __init__(self, in_chs: List[int], embed_dim: int = 10, hidden_dim: int = 10, init_bias: float = 3.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.hidden_dim = hidden_dim
        self.embed = nn.ModuleList([nn.Linear(c, embed_dim, **dd) for c in in_chs])
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim, **dd)
        self.head = nn.Linear(hidden_dim, 1, **dd)
        self._folded = FoldedCache(FoldedRecurrentGates)
        self.init_weights(init_bias)

    @property
    def num_gates(self) -> int:
        return len(self.embed)

    @torch.no_grad()
    def init_weights(self, init_bias: float) -> None:
        """Xavier LSTM / projections as the original ImageNet scripts; head weight 0 so every gate starts at
        p = sigmoid(init_bias) for every image (open for init_bias > 0: a converted ResNet is unchanged)."""
        for m in self.embed:
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        for name, p in self.lstm.named_parameters():
            nn.init.xavier_normal_(p) if name.startswith('weight') else nn.init.zeros_(p)
        self.set_constant_probability(_sigmoid(init_bias))

    @torch.no_grad()
    def set_constant_probability(self, p: float) -> None:
        """Make every gate emit exactly probability ``p`` for every image (benchmarks, tests, initialisation)."""
        nn.init.zeros_(self.head.weight)
        self.head.bias.fill_(_logit(p))

    def init_state(self, x: torch.Tensor) -> GateState:
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        return h, h.clone()

    def folded(self) -> FoldedRecurrentGates:
        """The inference form (projection folded into the LSTM, one fused cell); rebuilt after any weight change."""
        return self._folded.get(self)

    def train(self, mode: bool = True):
        self._folded.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        e = self.embed[index](x.mean((2, 3)))
        h, c = self.lstm(e, state)
        return self.head(h).squeeze(1), (h, c)


class FeedForwardGate(nn.Module):
    """SkipNet's FFGate-I (``variant='ff1'``) or FFGate-II (``'ff2'``), one independent gate per block.

    ff1: maxpool 2 -> conv3x3 -> BN -> ReLU -> conv3x3 stride 2 -> BN -> ReLU -> GAP -> linear.
    ff2: conv3x3 stride 2 -> BN -> ReLU -> GAP -> linear.
    One logit replaces the original 2-way softmax (softmax[1] == sigmoid(l1 - l0), so it is the same family).
    """

    def __init__(self, chs: int, variant: str = 'ff1', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if variant == 'ff1':
            self.pool = nn.MaxPool2d(2, ceil_mode=True)  # ceil_mode: equal on even sizes, never empty on 1x1 maps
            self.conv1 = nn.Conv2d(chs, chs, 3, 1, 1, bias=False, **dd)
            self.bn1 = nn.BatchNorm2d(chs, **dd)
            self.conv2 = nn.Conv2d(chs, chs, 3, 2, 1, bias=False, **dd)
            self.bn2 = nn.BatchNorm2d(chs, **dd)
        elif variant == 'ff2':
            self.pool = nn.Identity()
            self.conv1 = nn.Conv2d(chs, chs, 3, 2, 1, bias=False, **dd)
            self.bn1 = nn.BatchNorm2d(chs, **dd)
            self.conv2 = None
            self.bn2 = None
        else:
            raise ValueError(f"FeedForwardGate variant must be 'ff1' or 'ff2', got {variant!r}.")
        self.fc = nn.Linear(chs, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.pool(x))))
        if self.conv2 is not None:
            x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3))).squeeze(1)


class FeedForwardGates(nn.Module):
    """A bank of independent FFGates with the same interface as :class:`RecurrentGates` (state is unused)."""

    def __init__(self, in_chs: List[int], variant: str = 'ff1', init_bias: float = 3.0, device=None, dtype=None):
        super().__init__()
        self.gates = nn.ModuleList([FeedForwardGate(c, variant, device=device, dtype=dtype) for c in in_chs])
        self._folded = FoldedCache(FoldedFeedForwardGates)
        self.init_weights(init_bias)

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @torch.no_grad()
    def init_weights(self, init_bias: float) -> None:
        for g in self.gates:
            for m in g.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                elif isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()  # --reset-gates must not keep a trained gate's statistics
        self.set_constant_probability(_sigmoid(init_bias))

    @torch.no_grad()
    def set_constant_probability(self, p: float) -> None:
        logit = _logit(p)
        for g in self.gates:
            nn.init.zeros_(g.fc.weight)
            g.fc.bias.fill_(logit)

    def init_state(self, x: torch.Tensor) -> GateState:
        return None

    def folded(self) -> FoldedFeedForwardGates:
        """The inference form (BatchNorm folded into the convolutions); rebuilt after any weight change."""
        return self._folded.get(self)

    def train(self, mode: bool = True):
        self._folded.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        return self.gates[index](x), state


def create_gates(gate_type: str, in_chs: List[int], init_bias: float = 3.0, device=None, dtype=None) -> nn.Module:
    """Build a gate bank from its JSON-safe name (``'rnn'``, ``'ff1'``, ``'ff2'``)."""
    if gate_type == 'rnn':
        return RecurrentGates(in_chs, init_bias=init_bias, device=device, dtype=dtype)
    if gate_type in ('ff1', 'ff2'):
        return FeedForwardGates(in_chs, variant=gate_type, init_bias=init_bias, device=device, dtype=dtype)
    raise ValueError(f'Unknown gate_type {gate_type!r}; choose one of {GATE_TYPES}.')
