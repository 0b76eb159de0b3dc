"""The gates' inference form: the same function as the trained gate banks, computed with fewer and larger ops.

At batch 1 a gate costs what its ops cost to launch, not their arithmetic: the RNN gate's pooling, projection,
LSTM cell and head are about a dozen dispatcher calls. In eval mode the gate banks hand the model a folded copy:

* RNN gates: the per-block projection ``e = W_k p + b_k`` meets the LSTM's input weights with no non-linearity in
  between, so ``W_ih e + b_ih = (W_ih W_k) p + (W_ih b_k + b_ih)``: one fused ``lstm_cell`` call takes the pooled
  features directly. The pooling's ``1 / (H W)`` goes into the same weights (one ``sum`` instead of a sum and a
  divide), per feature-map size. Products are formed in float64 and rounded once.
* FF gates: each BatchNorm (running statistics) is folded into the convolution before it.
* Batch 1 on the CPU (float32): the RNN gates' LSTM step runs in NumPy (:class:`HostRecurrentGates`). A 10-unit
  step is a few hundred multiply-adds; torch spends more on dispatching its dozen calls than on the arithmetic, NumPy
  about a third of that, and the decision is read on the host anyway.

The copy is rebuilt whenever a gate parameter or buffer changes (in-place updates bump tensor versions; moves
change storage; loading a state dict drops it) and dropped when the model goes back to training. Tensors made
under ``torch.inference_mode`` keep no version counter: after editing such weights in place, call ``model.eval()``
to drop the copy. Logits agree with the unfolded gates to float
rounding; decisions agree except for a logit within rounding of its threshold.
"""
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

GateState = Optional[Tuple[torch.Tensor, torch.Tensor]]


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """The in-place update counter, or None for an inference tensor (``torch.inference_mode`` tracks none)."""
    return None if t.is_inference() else t._version


def _collect_tensors(module: torch.nn.Module, out: List[torch.Tensor]) -> List[torch.Tensor]:
    """Every parameter and buffer, read straight from the module dicts: ``parameters()`` walks ``named_modules``
    with memo sets, which costs more than the whole check at batch 1."""
    out.extend(t for t in module._parameters.values() if t is not None)
    out.extend(t for t in module._buffers.values() if t is not None)
    for child in module._modules.values():
        if child is not None:
            _collect_tensors(child, out)
    return out


def _tensor_key(module: torch.nn.Module) -> Tuple:
    return tuple((t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in _collect_tensors(module, []))


class FoldedCache:
    """Holds one folded copy of a gate bank and rebuilds it when the bank's tensors changed."""

    def __init__(self, build: Callable):
        self.build = build
        self.key: Optional[Tuple] = None
        self.value = None

    def get(self, bank: torch.nn.Module):
        key = _tensor_key(bank)
        if key != self.key:
            self.value, self.key = self.build(bank), key
        return self.value

    def clear(self) -> None:
        self.value = self.key = None

    def __deepcopy__(self, memo):  # a copied model folds its own weights
        return FoldedCache(self.build)


class FoldedRecurrentGates:
    """RecurrentGates with every projection folded into the LSTM input weights."""

    @torch.no_grad()
    def __init__(self, bank):
        lstm = bank.lstm
        dtype = lstm.weight_ih.dtype
        w_ih = lstm.weight_ih.double()
        bias = lstm.bias_ih.double() + lstm.bias_hh.double()
        w_in64 = [w_ih @ e.weight.double() for e in bank.embed]
        self.w_in: List[torch.Tensor] = [w.to(dtype) for w in w_in64]
        self._w_in64 = w_in64
        self._w_sum: Dict[Tuple[int, int], torch.Tensor] = {}  # (gate, H * W) -> W_in / (H * W)
        self.b_in: List[torch.Tensor] = [(w_ih @ e.bias.double() + bias).to(dtype) for e in bank.embed]
        self.w_hh = lstm.weight_hh.detach().clone()
        # both biases are folded into b_in; CUDA's fused cell needs b_hh given whenever b_ih is (else it fails with
        # "sym_strides() called on an undefined Tensor")
        self.b_hh = torch.zeros_like(lstm.bias_hh.detach())
        self.head_w = bank.head.weight.detach().t().contiguous()  # (H, 1)
        self.head_b = bank.head.bias.detach().clone()
        self.hidden_dim = bank.hidden_dim
        self.dtype = dtype
        self._host: Optional[HostRecurrentGates] = None

    @property
    def num_gates(self) -> int:
        return len(self.w_in)

    def host(self, x: torch.Tensor) -> Optional['HostRecurrentGates']:
        """The NumPy twin for a float32 batch of 1 on the CPU (built once per folding), else None."""
        if x.shape[0] != 1 or x.device.type != 'cpu' or x.dtype != torch.float32 or self.dtype != torch.float32:
            return None
        if self._host is None:
            self._host = HostRecurrentGates(self)
        return self._host

    def init_state(self, x: torch.Tensor) -> GateState:
        h = torch.zeros(x.shape[0], self.hidden_dim, device=x.device, dtype=self.dtype)
        return h, h

    recurrent = True  # a later gate reads this gate's state

    def advance(self, index: int, x: torch.Tensor, state: GateState) -> GateState:
        """The LSTM step alone: a gate whose decision is fixed still feeds its state to the per-image gates after it."""
        return self._cell(index, x, state)

    def head_logit(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        """The logits as a (B, 1) column: the batch-1 path reads its one value with ``.item()``, no squeeze."""
        h, c = self._cell(index, x, state)
        return torch.addmm(self.head_b, h, self.head_w), (h, c)

    def _cell(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[2] * x.shape[3]
        w = self._w_sum.get((index, size))
        if w is None:
            w = self._w_sum[(index, size)] = (self._w_in64[index] / size).to(self.dtype)
        # bf16 / fp16 activations are summed with float32 accumulation, into the weights' dtype
        pooled = x.sum((2, 3)) if x.dtype == self.dtype else x.sum((2, 3), dtype=self.dtype)
        return torch.lstm_cell(pooled, state, w, self.w_hh, self.b_in[index], self.b_hh)

    def __call__(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        logit, state = self.head_logit(index, x, state)
        return logit.squeeze(1), state


# OpenBLAS splits a matrix-vector product over its own threads from 9,216 elements on (it then spins them against
# torch's threads for the same cores): the pooling and the projection keep every BLAS call below that
_ONE_BLAS_CALL = 8192


class HostRecurrentGates:
    """The folded RNN gates for one image on the CPU, in NumPy float32. The pooling is a BLAS product with a vector of
    ones (half the cost of a torch ``sum`` and its ``.numpy()``), the pooling's 1 / (H W) sits in the input weights,
    and the LSTM's rows are reordered (i, f, o, g) with the i, f, o rows scaled by 1/2, so one ``tanh`` covers all
    four: sigmoid(z) = (1 + tanh(z/2)) / 2; every step works in place on 1-D arrays. The state is a pair of (H,)
    arrays, ``(None, None)`` before the first gate (a zero state adds nothing). Logits agree with
    :class:`FoldedRecurrentGates` to float32 rounding. Batches keep the torch gates: NumPy measured no faster there
    (batch 8: 1.29x against 1.29x, 64: 1.48x against 1.46x)."""

    def __init__(self, folded: FoldedRecurrentGates):
        h = self.hidden = folded.hidden_dim
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        scale = torch.ones(4 * h, dtype=torch.float64)
        scale[:3 * h] = 0.5
        self._w_in64 = [w[order] * scale[:, None] for w in folded._w_in64]  # (4H, C)
        self._w_sum: Dict[Tuple[int, int], np.ndarray] = {}  # (gate, H * W) -> (C, 4H) / (H * W)
        self._ones: Dict[int, np.ndarray] = {}  # H * W -> ones
        self.b_in = [(b.double()[order] * scale).float().numpy() for b in folded.b_in]
        self.w_hh = (folded.w_hh.double()[order] * scale[:, None]).t().float().numpy().copy()
        self.head_w = folded.head_w[:, 0].numpy().copy()
        self.head_b = np.float32(folded.head_b.item())

    def init_state(self):
        return None, None

    def logit(self, index: int, x: torch.Tensor, state) -> Tuple[float, Tuple[np.ndarray, np.ndarray]]:
        """The gate's float32 logit as a Python float, and the new state."""
        h, c = self._step(index, x, state)
        return float(np.dot(h, self.head_w) + self.head_b), (h, c)

    def advance(self, index: int, x: torch.Tensor, state) -> Tuple[np.ndarray, np.ndarray]:
        """The LSTM step alone (a fixed gate whose state a later per-image gate reads)."""
        return self._step(index, x, state)

    def _step(self, index: int, x: torch.Tensor, state) -> Tuple[np.ndarray, np.ndarray]:
        a = x.detach().numpy()
        size = a.shape[2] * a.shape[3]
        w = self._w_sum.get((index, size))
        if w is None:
            w = self._w_sum[(index, size)] = (self._w_in64[index] / size).t().float().numpy().copy()
        channels = a.shape[1]
        ones = self._ones.get(size)
        if ones is None:
            ones = self._ones[size] = np.ones(size, np.float32)
        if size > _ONE_BLAS_CALL:  # even one channel would start BLAS threads: torch's own threads pool it
            pooled = x.detach().sum((2, 3)).reshape(channels).numpy()
        elif channels * size > _ONE_BLAS_CALL:  # one small product per channel: none large enough for BLAS threads
            pooled = np.matmul(a.reshape(channels, 1, size), ones).reshape(channels)
        else:
            pooled = np.dot(a.reshape(channels, size), ones)
        rows = _ONE_BLAS_CALL // w.shape[1]  # the projection too, in slices of input channels below that size
        z = np.dot(pooled[:rows], w[:rows])
        for start in range(rows, channels, rows):
            z += np.dot(pooled[start:start + rows], w[start:start + rows])
        z += self.b_in[index]
        h, c = state
        if h is not None:
            z += np.dot(h, self.w_hh)
        n = self.hidden
        t = np.tanh(z, out=z)
        s = t[:3 * n]
        s *= np.float32(0.5)
        s += np.float32(0.5)  # i, f, o
        c_new = s[:n] * t[3 * n:]
        if c is not None:
            c_new += s[n:2 * n] * c
        h_new = np.tanh(c_new)
        h_new *= s[2 * n:]
        return h_new, c_new


def _fold_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class FoldedFeedForwardGates:
    """FeedForwardGates with BatchNorm folded into the convolutions."""

    @torch.no_grad()
    def __init__(self, bank):
        self.layers = []
        for g in bank.gates:
            convs = [(g.conv1, g.bn1)] + ([(g.conv2, g.bn2)] if g.conv2 is not None else [])
            folded = [(*_fold_bn(conv, bn), conv.stride, conv.padding) for conv, bn in convs]
            self.layers.append((g.pool, folded, g.fc.weight.detach().clone(), g.fc.bias.detach().clone()))

    @property
    def num_gates(self) -> int:
        return len(self.layers)

    def init_state(self, x: torch.Tensor) -> GateState:
        return None

    recurrent = False  # every gate reads only its own block's input

    def advance(self, index: int, x: torch.Tensor, state: GateState) -> GateState:
        return state

    def head_logit(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        pool, convs, fc_w, fc_b = self.layers[index]
        x = pool(x)
        for weight, bias, stride, padding in convs:
            x = F.relu(F.conv2d(x, weight, bias, stride, padding))
        return F.linear(x.mean((2, 3)), fc_w, fc_b), state

    def __call__(self, index: int, x: torch.Tensor, state: GateState) -> Tuple[torch.Tensor, GateState]:
        logit, state = self.head_logit(index, x, state)
        return logit.squeeze(1), state
