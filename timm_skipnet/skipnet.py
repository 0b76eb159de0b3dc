"""SkipNet ResNets as native timm models: a gate before every residual block but the first.

Block k runs for an image iff its gate says so; otherwise the image takes the block's shortcut (identity, or the
block's own downsample projection): ``x = g * Block(x) + (1 - g) * Shortcut(x)`` (Wang et al., ECCV 2018).

The backbone is timm's own :class:`~timm.models.resnet.ResNet`, untouched: stages keep their ``layerN.M`` names and
all gates live under ``gates.*``, so a plain timm ResNet checkpoint loads with only the gate keys missing. The
model class only replaces the trunk loop. Two execution modes:

* ``dense``: every block runs for every image and the result is mixed with the 0/1 mask. Needed for training
  (straight-through gradients, full-batch BatchNorm) and friendly to ``torch.compile`` / export.
* ``sparse``: a block runs only on the images whose gate is open (gather, run, scatter into the shortcut); at batch
  1 a plain branch. The inference default; identical outputs to ``dense`` in eval mode.
"""
import contextlib
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch.utils.checkpoint import checkpoint

from .folded_gates import tensor_version
from .gates import create_gates
from .policy import POLICIES, THRESHOLD_LOGIT_LIMIT, GateDecision, bernoulli_log_prob, decide
from .pretrained_errors import explain_missing_pretrained

__all__ = ['SkipNetResNet', 'SkipNetTrace', 'convert_to_skipnet', 'checkpoint_filter_fn', 'EXECUTION_MODES',
           'eager_control_flow']

EXECUTION_MODES = ('auto', 'dense', 'sparse', 'static')
CAPACITY_OVERFLOW = ('exact', 'shortcut')
DEFAULT_CAPACITY_SIGMAS = 2.0
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the original SkipNet CIFAR normalisation
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class SkipNetTrace:
    """Logits plus what every gate did, per image. K = number of gated blocks (all but the first)."""
    logits: torch.Tensor  # (B, num_classes)
    probs: torch.Tensor  # (B, K) gate probability of executing
    actions: torch.Tensor  # (B, K) 1 = block executed, 0 = skipped
    log_probs: torch.Tensor  # (B, K) log pi(action), differentiable (REINFORCE)
    gate_logits: Optional[torch.Tensor] = None  # (B, K) the gates' raw logits (p = sigmoid), exact where p rounds to 1

    @property
    def executed_blocks(self) -> torch.Tensor:
        """(B,) blocks run per image, the never-gated first block included."""
        return 1 + self.actions.sum(1)


_EAGER_CONTROL_FLOW = threading.local()  # .on, set by eager_control_flow() for this thread only


@contextlib.contextmanager
def eager_control_flow():
    """Within this block the static path branches with ``torch.cond`` in eager mode too, instead of reading the
    decision back to the host: recorded into a CUDA graph, each branch becomes a conditional node decided on the
    device (:mod:`timm_skipnet.cuda_graphs`)."""
    previous = getattr(_EAGER_CONTROL_FLOW, 'on', False)
    _EAGER_CONTROL_FLOW.on = True
    try:
        yield
    finally:
        _EAGER_CONTROL_FLOW.on = previous


def _control_flow_ops() -> bool:
    """Branch with torch.cond (compiling, exporting, or recording a CUDA graph) rather than a Python if."""
    return torch.compiler.is_compiling() or getattr(_EAGER_CONTROL_FLOW, 'on', False)


def _cond(pred: torch.Tensor, true_fn, false_fn, operands: tuple) -> torch.Tensor:
    """torch.cond while compiling; in eager (a CUDA graph being recorded) the operator itself, which the capture
    mode turns into a conditional node (eager torch.cond would compile the branches first)."""
    if torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return torch.ops.higher_order.cond(pred, true_fn, false_fn, operands)


def _fx_symbolic_tracing() -> bool:
    """torch.fx.symbolic_trace in progress (not torch.export, which sets the older, shared flag too)."""
    fx = torch.fx._symbolic_trace
    if hasattr(fx, 'is_fx_symbolic_tracing'):  # torch >= 2.9
        return fx.is_fx_symbolic_tracing()
    return fx.is_fx_tracing() and not torch.compiler.is_compiling()


def _branch_block(block: nn.Module, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The block or its shortcut behind one ``torch.cond`` on a one-element ``pred``."""
    return _cond(pred, lambda t: _fixed_layout(block(t)), lambda t: _fixed_layout(_shortcut_copy(block, t)),
                 (_fixed_layout(x),))


def _is_tracing() -> bool:
    """Compiling, exporting, scripting or FX-tracing: no host reads, no data-dependent shapes."""
    return (torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()
            or _fx_symbolic_tracing())


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a skipped block outputs: its own projection shortcut (no ReLU), or the identity."""
    return x if block.downsample is None else block.downsample(x)


def _shortcut_copy(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shortcut as a new tensor (a ``torch.cond`` branch may not return its input)."""
    return x.clone() if block.downsample is None else block.downsample(x)


class _Given(nn.Module):
    """Stands in for a block's ``downsample`` during one call, returning the projection already computed."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def _run_given_shortcut(block: nn.Module, x: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    downsample = block.downsample
    block.downsample = _Given(short)
    try:
        return block(x)
    finally:
        block.downsample = downsample


def _block_and_shortcut(block: nn.Module, x: torch.Tensor,
                        use_ckpt: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's output and its shortcut, with a projection shortcut computed once: run twice, its BatchNorm
    would update its running statistics twice per step (momentum 0.19 instead of 0.1) and cost twice. Under
    gradient checkpointing the recomputation reuses the same projection."""
    if block.downsample is None:
        return (checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)), x
    if _fx_symbolic_tracing():
        # FX records calls of installed submodules only, so the projection runs twice in an FX graph (in a training
        # graph its BatchNorm statistics then move twice per step: train with eager or torch.compile)
        return block(x), block.downsample(x)
    short = block.downsample(x)
    y = (checkpoint(_run_given_shortcut, block, x, short, use_reentrant=False) if use_ckpt
         else _run_given_shortcut(block, x, short))
    return y, short


_EXPORT_LAYOUT = threading.local()  # .fixed: False while a graph runtime that needs no fixed layout exports


@contextlib.contextmanager
def export_without_fixed_layout():
    """Export the ``torch.cond`` operands in whatever layout they have: for runtimes other than inductor (ONNX), to
    which the fixed layout of :func:`_fixed_layout` would only add transposes."""
    previous = getattr(_EXPORT_LAYOUT, 'fixed', True)
    _EXPORT_LAYOUT.fixed = False
    try:
        yield
    finally:
        _EXPORT_LAYOUT.fixed = previous


def _fixed_layout(x: torch.Tensor) -> torch.Tensor:
    """Under compile and export, one memory layout for every ``torch.cond`` operand and branch output: inductor's
    conv layout optimisation may otherwise hand a branch graph a channels-last tensor it was not traced for (under
    ``torch.compile`` a size assert fails; AOTInductor, which compiles the exported program without those asserts,
    silently computes wrong logits), and both branches must return the same strides. Eager calls keep their layout,
    as do exports inside :func:`export_without_fixed_layout`."""
    if torch.compiler.is_compiling() and (not torch.compiler.is_exporting()
                                          or getattr(_EXPORT_LAYOUT, 'fixed', True)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _mix(run: torch.Tensor, y: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    return torch.where(run.view(-1, 1, 1, 1), y, short)


def _greedy_margin(logits: torch.Tensor, threshold_logit: torch.Tensor) -> torch.Tensor:
    """logit - threshold in float32 (> 0 iff the block runs); a threshold forced to 1 (0) closes (opens) the gate
    whatever the logit, +inf from an fp16 overflow included; a NaN logit never runs a block."""
    margin = logits.float() - threshold_logit
    margin = torch.where(threshold_logit >= THRESHOLD_LOGIT_LIMIT, -torch.inf, margin)
    margin = torch.where(threshold_logit <= -THRESHOLD_LOGIT_LIMIT, torch.inf, margin)
    return torch.where(margin.isnan(), -torch.inf, margin)


def _run_capacity(block: nn.Module, x: torch.Tensor, run: torch.Tensor, margin: torch.Tensor,
                  cap: int) -> torch.Tensor:
    """The block on a fixed-size sub-batch: the ``cap`` images with the highest margins (every running image when
    at most ``cap`` run); the rest, and the non-running images among the ``cap``, take the shortcut."""
    if cap == 0:
        return _shortcut_copy(block, x)
    idx = torch.topk(margin, cap, sorted=False).indices
    xs = x.index_select(0, idx)
    ys = _mix(run.index_select(0, idx), block(xs), _shortcut(block, xs))
    return _shortcut(block, x).index_copy(0, idx, ys)


def _run_sparse(block: nn.Module, x: torch.Tensor, run: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
    """Run ``block`` only on the images where ``run`` (bool, (B,)) is set; the others take the shortcut and pay
    only for it. ``reuse_input``: ``x`` is a temporary nobody else holds, so an identity block may scatter into it
    in place (saves one full activation copy per block; only without autograd)."""
    if x.shape[0] == 1:
        return block(x) if bool(run[0]) else _shortcut(block, x)
    idx_run = run.nonzero().squeeze(1)
    n_run = idx_run.numel()
    if n_run == x.shape[0]:
        return block(x)
    if n_run == 0:
        return _shortcut(block, x)
    y_run = block(x.index_select(0, idx_run))
    if block.downsample is None:
        return x.index_copy_(0, idx_run, y_run) if reuse_input else x.index_copy(0, idx_run, y_run)
    idx_skip = (~run).nonzero().squeeze(1)
    y_skip = block.downsample(x.index_select(0, idx_skip))
    out = y_run.new_empty((x.shape[0],) + y_run.shape[1:])
    return out.index_copy_(0, idx_run, y_run).index_copy_(0, idx_skip, y_skip)




def _threshold_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """logit(t) in float64, rounded once to float32; t = 0 / 1 become -/+ THRESHOLD_LOGIT_LIMIT."""
    return torch.logit(probabilities.double()).clamp(-THRESHOLD_LOGIT_LIMIT, THRESHOLD_LOGIT_LIMIT).float()


class SkipNetResNet(ResNet):
    """timm ResNet with SkipNet gates.

    Args (beyond timm's ResNet):
        gate_type: ``'rnn'`` (shared LSTM, the paper's default), ``'ff1'`` or ``'ff2'`` (FFGate-I / II).
        gate_init_bias: initial gate logit; > 0 starts every gate open, so the model equals the plain ResNet.
        gate_policy: ``'auto'`` (straight-through in train mode, greedy in eval), or one of
            ``straight_through | sample | greedy | open``; change later with :meth:`set_gate_policy`.
        execution: ``'auto'`` (sparse in eval, dense in training / under torch.compile), ``'dense'`` or ``'sparse'``.
        stem_type: timm's stem types, plus ``'cifar'``: a single 3x3 stride-1 conv and no max-pool (6n+2 CIFAR nets).
    """

    def __init__(
            self,
            *args,
            gate_type: str = 'rnn',
            gate_init_bias: float = 3.0,
            gate_policy: str = 'auto',
            execution: str = 'auto',
            stem_type: str = '',
            **kwargs,
    ):
        cifar_stem = stem_type == 'cifar'
        if cifar_stem:
            # timm's stem width is 64 unless 'deep'; a deep stem of width c/2 yields c channels, then is replaced.
            channels = kwargs.get('channels', (16, 32, 64))
            kwargs.update(channels=channels, stem_width=channels[0] // 2)
            stem_type = 'deep'
        super().__init__(*args, stem_type=stem_type, **kwargs)
        if cifar_stem:
            self._make_cifar_stem(kwargs.get('in_chans', 3), kwargs.get('act_layer', nn.ReLU))
        self._init_skipnet(gate_type, gate_init_bias, gate_policy, execution)

    def _make_cifar_stem(self, in_chans: int, act_layer) -> None:
        w = self.conv1[-1].weight
        out_chs = w.shape[0]
        self.conv1 = nn.Conv2d(in_chans, out_chs, 3, 1, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.bn1 = nn.BatchNorm2d(out_chs, device=w.device, dtype=w.dtype)
        self.act1 = get_act_layer(act_layer)(inplace=True)
        self.maxpool = nn.Identity()
        # the CIFAR stem does not downsample: every tap is 4x finer than timm's ImageNet bookkeeping assumed
        self.feature_info[0]['reduction'] = 1
        for info in self.feature_info[1:]:
            info['reduction'] //= 4

    def _init_skipnet(self, gate_type: str, gate_init_bias: float, gate_policy: str, execution: str) -> None:
        """Attach the gates; shared by ``__init__`` and :func:`convert_to_skipnet` (which skips ``__init__``)."""
        self.stage_names = [info['module'] for info in self.feature_info[1:]]
        self.gate_type = gate_type
        self.set_gate_policy(gate_policy)
        self.set_execution(execution)
        ref = next(self.parameters())
        self.gates = create_gates(gate_type, self._gate_in_chs(), gate_init_bias, device=ref.device, dtype=ref.dtype)
        # the greedy (inference) policy runs block k iff logit_k > gate_threshold_logits[k] (p_k > t_k); saved with
        # the weights. Logits, not probabilities: a threshold between two gate values near p = 1 stays representable
        self.register_buffer('gate_threshold_logits', torch.zeros(self.gates.num_gates, device=ref.device))
        # static execution (the compiled path): per-gate execution rates that size each block's sub-batch, saved
        # with the weights; 1.0 = the whole batch (exact, no saving) until calibrated
        self.register_buffer('gate_capacity', torch.ones(self.gates.num_gates, device=ref.device))
        self.register_buffer('gate_capacity_sigmas', torch.tensor(DEFAULT_CAPACITY_SIGMAS, device=ref.device))
        self.register_buffer('gate_overflow', torch.zeros(self.gates.num_gates, dtype=torch.long, device=ref.device),
                             persistent=False)
        self.capacity_overflow = 'exact'
        self._capacity_rates = [1.0] * self.gates.num_gates
        self._capacity_sigmas = DEFAULT_CAPACITY_SIGMAS

    def _gate_in_chs(self) -> List[int]:
        """Input channels of every gated block (all but the first), from feature_info: no dummy forward."""
        in_chs = []
        for s, name in enumerate(self.stage_names):
            for j in range(len(getattr(self, name))):
                in_chs.append(self.feature_info[s]['num_chs'] if j == 0 else self.feature_info[s + 1]['num_chs'])
        return in_chs[1:]

    # ---- configuration -------------------------------------------------------------------------------------------
    def set_gate_policy(self, policy: str = 'auto') -> None:
        if policy != 'auto' and policy not in POLICIES:
            raise ValueError(f"gate_policy must be 'auto' or one of {POLICIES}, got {policy!r}.")
        self.gate_policy = policy

    def set_execution(self, execution: str = 'auto') -> None:
        if execution not in EXECUTION_MODES:
            raise ValueError(f'execution must be one of {EXECUTION_MODES}, got {execution!r}.')
        self.execution = execution

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .half() cast every float buffer: keep the thresholds float32, where they were calibrated
        saved = self._buffers.get('gate_threshold_logits')
        super()._apply(fn, recurse)
        moved = self._buffers.get('gate_threshold_logits')
        if saved is not None and moved is not None and moved.dtype != torch.float32:
            # follow the device, not the dtype; nothing to keep on a meta tensor (to_empty fills it on load)
            self._buffers['gate_threshold_logits'] = (
                moved.float() if saved.is_meta or moved.is_meta else saved.to(device=moved.device, dtype=torch.float32))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # older weights (trainer resumes, timm's load_checkpoint, strict loads): thresholds saved as probabilities
        # ('gate_thresholds', timm-skipnet 0.1) become logits; none at all means the p > 0.5 rule they were trained with
        key, old_key = prefix + 'gate_threshold_logits', prefix + 'gate_thresholds'
        if 'gate_threshold_logits' in self._buffers:
            old = state_dict.pop(old_key, None)
            if key not in state_dict:
                device = next((v.device for v in state_dict.values() if torch.is_tensor(v)), None)
                state_dict[key] = (torch.zeros(self.gates.num_gates, device=device) if old is None
                                   else _threshold_logits(old).to(device))
        if 'gate_capacity' in self._buffers:  # weights saved before static execution: no capacity calibrated
            device = next((v.device for v in state_dict.values() if torch.is_tensor(v)), None)
            state_dict.setdefault(prefix + 'gate_capacity', torch.ones(self.gates.num_gates, device=device))
            state_dict.setdefault(prefix + 'gate_capacity_sigmas',
                                  torch.tensor(DEFAULT_CAPACITY_SIGMAS, device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rules_key = None
        rates, sigmas = state_dict.get(prefix + 'gate_capacity'), state_dict.get(prefix + 'gate_capacity_sigmas')
        if rates is not None and not rates.is_meta and rates.shape == (self.gates.num_gates,):
            self._capacity_rates = [float(v) for v in rates.tolist()]
        if sigmas is not None and not sigmas.is_meta and sigmas.numel() == 1:
            self._capacity_sigmas = float(sigmas)

    @property
    def gate_thresholds(self) -> torch.Tensor:
        """Per-gate thresholds t_k of the greedy policy as probabilities (block k runs iff p_k > t_k). A computed
        copy: change them with :meth:`set_gate_thresholds`."""
        return torch.sigmoid(self.gate_threshold_logits.double()).float()

    @torch.no_grad()
    def set_gate_thresholds(self, thresholds: Union[float, List[float]], logits: bool = False) -> None:
        """Per-gate decision thresholds of the greedy policy: block k runs iff p_k > t_k (0.5 after training).
        Raising a gate's threshold skips its block for more images, lowering it runs the block for more: a
        compute budget set after training, without retraining. Training policies (sample, straight-through) keep
        their own rules. ``logits=True``: the values are logit(t_k) (any real, +-inf included)."""
        t = torch.tensor(thresholds, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(self.gates.num_gates)
        valid = ~t.isnan() if logits else (t >= 0) & (t <= 1)
        if t.shape != (self.gates.num_gates,) or not bool(valid.all()):
            form = 'logit (not NaN)' if logits else 'probability in [0, 1]'
            raise ValueError(f'gate thresholds must be one {form} or {self.gates.num_gates} of them (one per gated '
                             f'block), got {thresholds!r}.')
        self.gate_threshold_logits.copy_(t.clamp(-THRESHOLD_LOGIT_LIMIT, THRESHOLD_LOGIT_LIMIT) if logits
                                         else _threshold_logits(t))
        self._rules_key = None

    @property
    def num_gated_blocks(self) -> int:
        return self.gates.num_gates

    @property
    def num_blocks(self) -> int:
        return self.gates.num_gates + 1

    def blocks(self) -> List[nn.Module]:
        """All residual blocks in network order (block 0 is never gated)."""
        return [b for name in self.stage_names for b in getattr(self, name)]

    def _resolve(self, policy: Optional[str]) -> Tuple[str, str]:
        policy = policy or self.gate_policy
        if policy == 'auto':
            policy = 'straight_through' if self.training else 'greedy'
        if policy not in POLICIES:
            raise ValueError(f'Unknown gate policy {policy!r}; choose one of {POLICIES}.')
        execution = self.execution
        if execution == 'auto':
            tracing = _is_tracing()
            if self.training or policy == 'straight_through':
                execution = 'dense'
            elif tracing:  # static shapes and no host reads: skipping survives torch.compile(fullgraph=True)
                execution = 'static' if torch.compiler.is_compiling() else 'dense'
            else:
                execution = 'sparse'
        elif execution in ('sparse', 'static'):
            if self.training:
                raise RuntimeError(
                    f"execution={execution!r} runs blocks on sub-batches, which changes BatchNorm statistics and "
                    "leaves parameters unused: use it in eval mode only (model.eval()), or set_execution('dense') to "
                    "train.")
            if policy == 'straight_through':
                raise RuntimeError("The straight-through gradient needs every block's output: use execution='dense'.")
        return policy, execution

    def _has_forward_hooks(self) -> bool:
        """A hook may keep a block's or a gate's input or output, which the in-place scatter would later overwrite."""
        from torch.nn.modules import module as torch_module
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    # ---- forward -------------------------------------------------------------------------------------------------
    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _forward_trunk(
            self,
            x: torch.Tensor,
            policy: Optional[str] = None,
            with_trace: bool = False,
            take_indices: Optional[List[int]] = None,
            stop_index: Optional[int] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], Optional[Tuple[torch.Tensor, ...]]]:
        """Stem and gated blocks. Returns features, the requested taps and, with ``with_trace``, the gate record."""
        policy, execution = self._resolve(policy)
        if execution != 'dense' and x.is_meta:  # shapes only: no decision can be read back from a meta tensor
            execution = 'dense'
        if policy == 'greedy' and not with_trace and take_indices is None and stop_index is None:
            if execution == 'sparse':
                return self._forward_greedy_sparse(x), [], None
            if execution == 'static':
                return self._forward_greedy_static(x), [], None
        use_gates = policy != 'open' or with_trace
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        # every gated block's input is a temporary of this loop (block 0 always runs): scattering into it in place
        # is safe without autograd unless a tap (forward_intermediates) holds it
        in_place_unsafe = torch.is_grad_enabled() or take_indices is not None or self._has_forward_hooks()
        # the folded gates compute the same logits from fewer ops wherever nothing needs the gates' graph
        gates = self.gates.folded() if (policy == 'greedy' and not with_trace and not self.training
                                        and not _is_tracing()) else self.gates
        taps: List[torch.Tensor] = []
        x = self._forward_stem(x)
        if take_indices is not None and 0 in take_indices:
            taps.append(x)
        x = self.maxpool(x)
        state = gates.init_state(x) if use_gates else None
        thr = self.gate_threshold_logits if policy == 'greedy' else None  # 0 = the p > 0.5 rule
        probs, actions, log_probs, gate_logits = [], [], [], []
        k = 0
        last_stage = len(self.stage_names) if stop_index is None else stop_index
        for s, name in enumerate(self.stage_names[:last_stage]):
            for block in getattr(self, name):
                if k == 0 or not use_gates:
                    x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
                    k += 1
                    continue
                logits, state = gates(k - 1, x, state)
                if policy == 'greedy':
                    action = (_greedy_margin(logits, thr[k - 1]) > 0).to(logits.dtype)
                    d = GateDecision(gate=action, action=action, prob=torch.sigmoid(logits),
                                     log_prob=bernoulli_log_prob(logits, action))
                else:
                    d = decide(logits, policy)
                if with_trace:
                    probs.append(d.prob)
                    actions.append(d.action)
                    log_probs.append(d.log_prob)
                    gate_logits.append(logits)
                if execution == 'sparse':
                    x = _run_sparse(block, x, d.action > 0.5, reuse_input=not in_place_unsafe)
                elif execution == 'static':
                    x = self._run_static(block, x, d.action > 0.5, k - 1, _greedy_margin(logits, thr[k - 1])
                                         if thr is not None else d.action - 0.5)
                elif policy == 'open':
                    x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
                else:
                    y, short = _block_and_shortcut(block, x, use_ckpt)
                    # g * y + (1 - g) * shortcut in one fused kernel; exact for g in {0, 1}
                    x = torch.lerp(short, y, d.gate.to(x.dtype).view(-1, 1, 1, 1))
                k += 1
            if take_indices is not None and s + 1 in take_indices:
                taps.append(x)
        trace = None
        if with_trace:
            if probs:
                trace = tuple(torch.stack(t, 1) for t in (probs, actions, log_probs, gate_logits))
            else:
                empty = x.new_zeros(x.shape[0], 0)
                trace = (empty, empty, empty, empty)
        return x, taps, trace

    # ---- inference paths -----------------------------------------------------------------------------------------
    def _greedy_rules(self) -> List[Optional[bool]]:
        """Per gate: None (decide by the logit), or the fixed decision of a threshold forced to 0 (True) or 1 (False).
        Cached against the buffer's version, so a batch-1 call reads no tensor to know it."""
        buf = self.gate_threshold_logits
        key = (buf.data_ptr(), tensor_version(buf))
        if getattr(self, '_rules_key', None) != key:
            values = buf.tolist()
            self._rules = [True if v <= -THRESHOLD_LOGIT_LIMIT else False if v >= THRESHOLD_LOGIT_LIMIT else None
                           for v in values]
            self._threshold_floats = values
            last = max((k for k, rule in enumerate(self._rules) if rule is None), default=-1)
            recurrent = self.gates.folded().recurrent
            # per gate: 'decide' (compute it), 'advance' (its decision is fixed, but a later per-image RNN gate
            # reads its state), or 'none' (nothing reads it: a fixed FF gate, or a fixed RNN gate after the last
            # per-image one)
            self._gate_work = ['decide' if rule is None else 'advance' if recurrent and k < last else 'none'
                               for k, rule in enumerate(self._rules)]
            self._rules_key = key
        return self._rules

    def _forward_greedy_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The eager inference path: folded gates, and a skipped block costs only its shortcut. At batch 1 one host
        read per gate; in a batch the running images are gathered, run and scattered back."""
        gates = self.gates.folded()
        rules = self._greedy_rules()
        work = self._gate_work  # a gate whose threshold fixes its decision is computed only if a later gate reads it
        thr = self._threshold_floats
        x = self.maxpool(self._forward_stem(x))
        blocks = self.blocks()
        x = blocks[0](x)
        state = gates.init_state(x)
        if x.shape[0] == 1:
            host = gates.host(x) if gates.recurrent else None  # the LSTM step in NumPy on the CPU
            if host is not None:
                state = host.init_state()
            for k, block in enumerate(blocks[1:]):
                run = rules[k]
                if run is None:
                    if host is not None:
                        logit, state = host.logit(k, x, state)
                    else:
                        logit, state = gates.head_logit(k, x, state)
                        logit = logit.item()
                    run = logit > thr[k]  # float32 logit vs float32 threshold, compared exactly in Python
                elif work[k] == 'advance':
                    state = host.advance(k, x, state) if host is not None else gates.advance(k, x, state)
                x = block(x) if run else _shortcut(block, x)
            return x
        reuse_input = not (torch.is_grad_enabled() or self._has_forward_hooks())
        thr_t = self.gate_threshold_logits
        for k, block in enumerate(blocks[1:]):
            run = rules[k]
            if run is None:
                logits, state = gates(k, x, state)
                x = _run_sparse(block, x, logits.float() > thr_t[k], reuse_input=reuse_input)
                continue
            if work[k] == 'advance':
                state = gates.advance(k, x, state)
            x = block(x) if run else _shortcut(block, x)
        return x

    def _forward_greedy_static(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled / exported inference path: static shapes and no host reads, so ``torch.compile(
        fullgraph=True)`` keeps the skipping. Batch 1: each block behind ``torch.cond``. Larger batches: each block on
        a fixed-size sub-batch (its capacity, see :meth:`gate_capacity_for`), exact fallback on overflow."""
        gates = self.gates if _is_tracing() or self.training else self.gates.folded()
        x = self.maxpool(self._forward_stem(x))
        blocks = self.blocks()
        x = blocks[0](x)
        state = gates.init_state(x)
        thr = self.gate_threshold_logits
        constant = getattr(self, '_constant_thresholds', None)
        for k, block in enumerate(blocks[1:]):
            logits, state = gates(k, x, state)
            if constant is not None:  # thresholds fixed at export: a forced gate needs no branch, others one compare
                rule, value = constant[k]
                if rule is not None:
                    x = block(x) if rule else _shortcut(block, x)
                    continue
                run = logits.float() > value  # a NaN logit compares False: the block is skipped, as by the margin
                if x.shape[0] == 1 and torch.compiler.is_compiling():  # the compare feeds the branch as it is
                    x = _branch_block(block, x, run)
                    continue
                run = run.reshape(-1)
                # the capacity ranks running images first; a NaN logit ranks last, as in _greedy_margin
                margin = torch.where(run, logits.float().reshape(-1) - value, -torch.inf) if x.shape[0] > 1 else run
                x = self._run_static(block, x, run, k, margin)
                continue
            margin = _greedy_margin(logits, thr[k])
            x = self._run_static(block, x, margin > 0, k, margin)
        return x

    def _run_static(self, block: nn.Module, x: torch.Tensor, run: torch.Tensor, k: int,
                    margin: torch.Tensor) -> torch.Tensor:
        # compiled (or a CUDA graph being recorded): torch.cond keeps both branches; eager: a Python branch (one
        # host read)
        compiling = _control_flow_ops()
        batch = x.shape[0]
        if batch == 1:
            if not compiling:
                return block(x) if bool(run[0]) else _shortcut(block, x)
            return _branch_block(block, x, run[0])
        cap = self.gate_capacity_for(k, batch)
        if cap >= batch:
            return _mix(run, block(x), _shortcut(block, x))
        n_run = run.sum()
        if self.capacity_overflow == 'shortcut':
            # sync-free rule: running images beyond the capacity (the lowest margins) take the shortcut; counted
            self.gate_overflow[k] += (n_run - cap).clamp(min=0)
            return _run_capacity(block, x, run, margin, cap)
        # exact: a batch in which more images run than the capacity runs the block on all of them; counted
        overflow = n_run > cap
        self.gate_overflow[k] += overflow.to(self.gate_overflow.dtype)
        if not compiling:
            return _mix(run, block(x), _shortcut(block, x)) if bool(overflow) else _run_capacity(
                block, x, run, margin, cap)
        return _cond(overflow,
                     lambda t, r, m: _fixed_layout(_mix(r, block(t), _shortcut(block, t))),
                     lambda t, r, m: _fixed_layout(_run_capacity(block, t, r, m, cap)),
                     (_fixed_layout(x), run, margin))

    # ---- capacity (static execution) ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_gate_capacity(self, rates: Union[float, List[float]], sigmas: Optional[float] = None,
                          overflow: Optional[str] = None) -> None:
        """Per-gate execution rates that size the static sub-batches (``execution='static'``, the compiled path).

        In a batch of B images gate k runs its block on ``min(B, ceil(B r_k + sigmas * sqrt(B r_k (1 - r_k))))``
        images: the expected count plus ``sigmas`` binomial standard deviations. ``overflow``: ``'exact'`` (a
        batch in which more images run falls back to the whole batch for that block: results never change) or
        ``'shortcut'`` (no fallback and no host read: the lowest-margin images beyond the capacity take the
        shortcut). ``gate_overflow`` counts either event per gate. Calibrate with
        :func:`timm_skipnet.capacity.calibrate_capacity`; 1.0 everywhere (the default) never skips in a batch."""
        r = torch.tensor(rates, dtype=torch.float64)
        if r.dim() == 0:
            r = r.expand(self.gates.num_gates)
        if r.shape != (self.gates.num_gates,) or not bool(((r >= 0) & (r <= 1)).all()):
            raise ValueError(f'gate capacity rates must be one rate in [0, 1] or {self.gates.num_gates} of them (one '
                             f'per gated block), got {rates!r}.')
        if sigmas is not None and not sigmas >= 0:
            raise ValueError(f'sigmas must be >= 0, got {sigmas!r}.')
        if overflow is not None and overflow not in CAPACITY_OVERFLOW:
            raise ValueError(f'overflow must be one of {CAPACITY_OVERFLOW}, got {overflow!r}.')
        self.gate_capacity.copy_(r)
        if sigmas is not None:
            self.gate_capacity_sigmas.fill_(sigmas)
        if overflow is not None:
            self.capacity_overflow = overflow
        self._sync_capacity()

    def _sync_capacity(self) -> None:
        """Python copies of the capacity buffers: a compiled graph specialises on them instead of reading tensors."""
        self._capacity_rates = [float(v) for v in self.gate_capacity.tolist()]
        self._capacity_sigmas = float(self.gate_capacity_sigmas)

    def gate_capacity_for(self, k: int, batch: int) -> int:
        """Images gate ``k`` runs its block on in a static batch of ``batch`` (see :meth:`set_gate_capacity`)."""
        r = self._capacity_rates[k]
        expected = batch * r + self._capacity_sigmas * math.sqrt(batch * r * (1.0 - r))
        # rates are stored in float32: a count that is whole up to that rounding is not rounded up
        return min(batch, math.ceil(expected * (1.0 - 1e-6)))

    def forward_features(self, x: torch.Tensor, gate_policy: Optional[str] = None) -> torch.Tensor:
        return self._forward_trunk(x, gate_policy)[0]

    def forward(
            self,
            x: torch.Tensor,
            gate_policy: Optional[str] = None,
            return_trace: bool = False,
    ) -> Union[torch.Tensor, SkipNetTrace]:
        """Logits, as every timm model. ``return_trace=True`` gives a :class:`SkipNetTrace` instead; passing it as a
        forward argument (not a separate method) keeps DDP / Accelerate gradient hooks working in training."""
        # FX symbolic tracing makes every argument not given in concrete_args a proxy: those take their defaults
        gate_policy = None if isinstance(gate_policy, torch.fx.Proxy) else gate_policy
        return_trace = False if isinstance(return_trace, torch.fx.Proxy) else return_trace
        x, _, trace = self._forward_trunk(x, gate_policy, with_trace=return_trace)
        logits = self.forward_head(x)
        if not return_trace:
            return logits
        return SkipNetTrace(logits, *trace)

    def forward_with_gates(self, x: torch.Tensor, gate_policy: Optional[str] = None) -> SkipNetTrace:
        """Logits plus per-image gate probabilities, actions and log-probabilities."""
        return self.forward(x, gate_policy=gate_policy, return_trace=True)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stem output and every stage output (timm's ResNet taps), computed through the gates."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        stop = max_index if (stop_early or intermediates_only) else None
        x, taps, _ = self._forward_trunk(x, take_indices=take_indices, stop_index=stop)
        if intermediates_only:
            return taps
        return x, taps

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        prune_end = max_index < len(self.stage_names)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(model)``: the scriptable form, a trace of the eval-mode inference network (see
        :mod:`timm_skipnet.torchscript`; TorchScript cannot compile the gate loop itself)."""
        from .torchscript import scriptable
        frame, depth = sys._getframe(1), 0
        while frame is not None:  # torch writes a child's replacement back into its parent: refuse that
            depth += frame.f_code.co_name == 'call_prepare_scriptable_func_impl'
            frame = frame.f_back
        if depth > 1:
            raise RuntimeError(
                'torch.jit.script reached a SkipNet inside another module: TorchScript cannot compile its gate loop, '
                'and replacing it there by its trace would change your eager model. Script the SkipNet itself '
                '(torch.jit.script(skipnet)), or torch.jit.trace the whole model in eval mode.')
        return scriptable(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Gates join the last block group, so layer-wise lr decay gives them the head's full learning rate."""
        blocks = r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)'
        return dict(stem=r'^conv1|bn1|maxpool', blocks=[(blocks, None), (r'^gates', (99999,))])


_SUPPORTED_FAMILIES = ('resnet*', 'resnet*d', 'seresnet*', 'seresnext*', 'resnext*', 'wide_resnet*', 'ecaresnet*',
                       'resnetrs*', 'resnetaa*', 'resnetblur*', 'res2net*', 'res2next*', 'resnest*', 'skresnet*',
                       'skresnext*', 'senet154')


def convert_to_skipnet(
        model: nn.Module,
        gate_type: str = 'rnn',
        gate_init_bias: float = 3.0,
        gate_policy: str = 'auto',
        execution: str = 'auto',
) -> SkipNetResNet:
    """Turn a timm :class:`~timm.models.resnet.ResNet` instance into a SkipNet in place, keeping its weights.

    Gates start open (``gate_init_bias > 0``): the converted model's output equals the original's exactly.
    """
    if isinstance(model, SkipNetResNet):
        raise ValueError('The model is already a SkipNet; nothing to convert.')
    if not isinstance(model, ResNet):
        raise TypeError(
            f'convert_to_skipnet needs a timm.models.resnet.ResNet instance, got {type(model).__name__}. Supported '
            f'timm families (all built on that class): {", ".join(_SUPPORTED_FAMILIES)}. Pre-activation ResNetV2, '
            f'ByobNet (resnet26t/51q/61q), legacy SENet, RegNet, TResNet, NFNet and CSPNet are not residual nets of '
            f'that layout.')
    blocks = [b for info in model.feature_info[1:] for b in getattr(model, info['module'])]
    bad = sorted({type(b).__name__ for b in blocks if not hasattr(b, 'downsample')})
    if bad:
        raise TypeError(f'Blocks without a .downsample attribute cannot be gated: {bad}.')
    model.__class__ = SkipNetResNet
    model._init_skipnet(gate_type, gate_init_bias, gate_policy, execution)
    return model


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SkipNetResNet) -> Dict[str, torch.Tensor]:
    """Load SkipNet checkpoints as they are, plain timm / torchvision ResNet ones with the model's (open) gates,
    and original ``ucbdrive/skipnet`` ones through the converter."""
    for key in ('state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if any(k.startswith('group') and '_layer' in k for k in state_dict):
        from .original import convert_original_state_dict  # lazy: only for original checkpoints
        state_dict = convert_original_state_dict(state_dict, model)
    own = model.state_dict()
    for k, v in own.items():  # missing thresholds are filled by SkipNetResNet._load_from_state_dict
        if k.startswith('gates.') and k not in state_dict:
            state_dict[k] = v
    return state_dict


def _check_feature_cls(kwargs: Dict[str, Any]) -> None:
    if kwargs.get('features_only') and kwargs.get('feature_cls') in ('hook', 'fx', 'list', 'dict'):
        raise ValueError(
            f"feature_cls={kwargs['feature_cls']!r} taps the stage containers (layerN), which a SkipNet never calls as "
            "modules: its trunk calls the blocks one by one, because the gate state crosses stage boundaries. Use "
            "feature_cls='getter' (the default), or FX node names with torchvision's create_feature_extractor "
            "(names from get_graph_node_names(model)).")


def _create_skipnet(variant: str, pretrained: bool = False, **kwargs) -> SkipNetResNet:
    _check_feature_cls(kwargs)
    n_taps = 1 + len(kwargs['layers'])
    with explain_missing_pretrained(variant, kwargs.get('pretrained_cfg')):
        return build_model_with_cfg(
            SkipNetResNet, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            # the gates' recurrent state crosses stage boundaries: features come from forward_intermediates
            feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(n_taps))),
            **kwargs,
        )


HUB_ORG = 'timm-skipnet'  # the Hugging Face organisation holding trained SkipNet weights
PAPER = dict(paper_ids='arXiv:1711.09485', paper_name='SkipNet: Learning Dynamic Routing in Convolutional Networks',
             origin_url='https://github.com/timm-skipnet/timm-skipnet', license='apache-2.0')


def _cfg(**kwargs) -> Dict[str, Any]:
    base = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='conv1',
                classifier='fc', **PAPER)
    return {**base, **kwargs}


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(**{**dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                          mean=CIFAR_MEAN, std=CIFAR_STD), **kwargs})


def _backbone_cfg(timm_name: str) -> Dict[str, Any]:
    """A tag that initialises the backbone from timm's own ResNet weights (gates start open)."""
    src = get_pretrained_cfg(timm_name).to_dict()
    keep = ('input_size', 'test_input_size', 'pool_size', 'crop_pct', 'test_crop_pct', 'interpolation', 'mean',
            'std', 'num_classes', 'license')
    return _cfg(**{k: src[k] for k in keep if src.get(k) is not None}, hf_hub_id=f'timm/{timm_name}',
                notes=(f'Backbone from timm/{timm_name}; gates initialised open (equals the plain ResNet until '
                       'trained).',))


_IMAGENET_ARCHS = {  # name -> (block, layers, timm default tag)
    'skipnet_resnet18': (BasicBlock, (2, 2, 2, 2), 'resnet18.a1_in1k'),
    'skipnet_resnet34': (BasicBlock, (3, 4, 6, 3), 'resnet34.a1_in1k'),
    'skipnet_resnet50': (Bottleneck, (3, 4, 6, 3), 'resnet50.a1_in1k'),
    'skipnet_resnet101': (Bottleneck, (3, 4, 23, 3), 'resnet101.a1h_in1k'),
    'skipnet_resnet152': (Bottleneck, (3, 8, 36, 3), 'resnet152.a1h_in1k'),
}
_CIFAR_DEPTHS = (38, 74, 110, 152)

_default_cfgs = {}
for _name, (_, _, _timm_tag) in _IMAGENET_ARCHS.items():
    _base = _timm_tag.split('.')[0]
    _default_cfgs[f'{_name}.{_timm_tag.split(".")[1]}'] = _backbone_cfg(_timm_tag)
    _default_cfgs[f'{_name}.tv_in1k'] = _backbone_cfg(f'{_base}.tv_in1k')
# trained SkipNet weights published by this project (hub_configs/<arch>.<tag>/ holds each repo's content)
_default_cfgs['skipnet_resnet38_cifar.cifar10'] = _cifar_cfg(
    hf_hub_id=f'{HUB_ORG}/skipnet_resnet38_cifar.cifar10',
    notes=('SkipNet-38 (RNN gates) trained on CIFAR-10 with timm-skipnet: gates-open backbone -> rl -> ft; '
           'recipe in the model card.',))
for _depth in _CIFAR_DEPTHS:
    if not any(k.startswith(f'skipnet_resnet{_depth}_cifar.') for k in _default_cfgs):
        _default_cfgs[f'skipnet_resnet{_depth}_cifar'] = _cifar_cfg()
_default_cfgs['skipnet_from_timm'] = _cfg()
default_cfgs = generate_default_cfgs(_default_cfgs)


def _imagenet(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> SkipNetResNet:
    block, layers, _ = _IMAGENET_ARCHS[name]
    return _create_skipnet(name, pretrained, **dict(dict(block=block, layers=layers), **kwargs))


def _cifar(depth: int, pretrained: bool, kwargs: Dict[str, Any]) -> SkipNetResNet:
    n = (depth - 2) // 6
    args = dict(block=BasicBlock, layers=(n, n, n), channels=(16, 32, 64), stem_type='cifar', num_classes=10)
    return _create_skipnet(f'skipnet_resnet{depth}_cifar', pretrained, **dict(args, **kwargs))


@register_model
def skipnet_resnet18(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet ResNet-18 (BasicBlock [2, 2, 2, 2]): 7 gated blocks."""
    return _imagenet('skipnet_resnet18', pretrained, kwargs)


@register_model
def skipnet_resnet34(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet ResNet-34 (BasicBlock [3, 4, 6, 3]): 15 gated blocks."""
    return _imagenet('skipnet_resnet34', pretrained, kwargs)


@register_model
def skipnet_resnet50(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet ResNet-50 (Bottleneck [3, 4, 6, 3]): 15 gated blocks."""
    return _imagenet('skipnet_resnet50', pretrained, kwargs)


@register_model
def skipnet_resnet101(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet ResNet-101 (Bottleneck [3, 4, 23, 3]): 32 gated blocks, the paper's ImageNet model."""
    return _imagenet('skipnet_resnet101', pretrained, kwargs)


@register_model
def skipnet_resnet152(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet ResNet-152 (Bottleneck [3, 8, 36, 3]): 49 gated blocks."""
    return _imagenet('skipnet_resnet152', pretrained, kwargs)


@register_model
def skipnet_resnet38_cifar(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet-38 for 32 px CIFAR (6n+2, n=6, BasicBlock, widths 16/32/64): 17 gated blocks."""
    return _cifar(38, pretrained, kwargs)


@register_model
def skipnet_resnet74_cifar(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet-74 for 32 px CIFAR (n=12): 35 gated blocks."""
    return _cifar(74, pretrained, kwargs)


@register_model
def skipnet_resnet110_cifar(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet-110 for 32 px CIFAR (n=18): 53 gated blocks."""
    return _cifar(110, pretrained, kwargs)


@register_model
def skipnet_resnet152_cifar(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """SkipNet-152 for 32 px CIFAR (n=25, BasicBlock as the original): 74 gated blocks."""
    return _cifar(152, pretrained, kwargs)


class _ConvertedResNet:
    """Model constructor for ``skipnet_from_timm``: build a timm ResNet by name, then convert it."""

    def __new__(cls, base_model: str = 'resnet50', gate_type: str = 'rnn', gate_init_bias: float = 3.0,
                gate_policy: str = 'auto', execution: str = 'auto', base_pretrained: bool = False, **kwargs):
        import timm
        if base_model.startswith('skipnet_'):
            raise ValueError(f"base_model must be a plain timm ResNet name (e.g. 'resnet50d'), got {base_model!r}.")
        with explain_missing_pretrained(base_model):
            base = timm.create_model(base_model, pretrained=base_pretrained, **kwargs)
        return convert_to_skipnet(base, gate_type, gate_init_bias, gate_policy, execution)


@register_model
def skipnet_from_timm(pretrained: bool = False, **kwargs) -> SkipNetResNet:
    """Any timm ResNet-class model (``base_model='resnet50d'``, ``'seresnext50_32x4d'``, ...) as a SkipNet.

    Lets converted models round-trip through ``save_for_hf`` / ``local-dir:`` / ``hf-hub:``: the config records
    ``base_model`` and the gate arguments. ``base_pretrained=True`` starts from timm's weights for the base.
    """
    _check_feature_cls(kwargs)
    return build_model_with_cfg(
        _ConvertedResNet, 'skipnet_from_timm', pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(5))), **kwargs)
