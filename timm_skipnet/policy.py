"""Gate policies: how a gate's logit becomes the 0/1 decision that runs or skips a block.

``straight_through`` (supervised pre-training), ``sample`` (REINFORCE), ``greedy`` (inference) and ``open``
(every block runs: exactly the plain ResNet). Tensors in, tensors out; nothing here knows about models.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ('straight_through', 'sample', 'greedy', 'open')
THRESHOLD = 0.5  # a block runs iff p > 0.5 (strict, as the original code), i.e. iff its logit > 0


@dataclass
class GateDecision:
    gate: torch.Tensor  # (B,) value multiplied into the merge; carries the STE gradient under straight_through
    action: torch.Tensor  # (B,) 0/1 execution decision, no gradient
    prob: torch.Tensor  # (B,) p = sigmoid(logit)
    log_prob: torch.Tensor  # (B,) log pi(action); differentiable w.r.t. the logit


# logit(1) as a finite number (the model clamps thresholds t = 0 / 1 to -/+ this): a gate at or above it is closed
THRESHOLD_LOGIT_LIMIT = 1e30


def hard_decision(logits: torch.Tensor, threshold_logit=0.0) -> torch.Tensor:
    """1 where p = sigmoid(logit) > t, i.e. logit > logit(t) (t = 0.5 unless the model sets per-gate thresholds).
    Decided on the logit: float32 sigmoid rounds logits within ~3e-8 of 0 to exactly 0.5, and the logit test keeps
    every path (train, eval, sparse, dense) on the same side of the line. A threshold at THRESHOLD_LOGIT_LIMIT or
    above is t = 1, a block forced closed: no logit runs it, not even +inf (an fp16 overflow)."""
    run = logits.float() > threshold_logit  # float32: a bf16 compare would round the threshold
    closed = threshold_logit >= THRESHOLD_LOGIT_LIMIT
    if torch.is_tensor(closed):
        run = run & ~closed
    elif closed:
        run = torch.zeros_like(run)
    return run.to(logits.dtype)


def straight_through(prob: torch.Tensor, hard: torch.Tensor = None) -> torch.Tensor:
    """Hard 0/1 value in the forward pass, gradient of ``prob`` in the backward pass."""
    if hard is None:
        hard = (prob > THRESHOLD).to(prob.dtype)
    return hard - prob.detach() + prob


def bernoulli_log_prob(logits: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log pi(a) for a ~ Bernoulli(sigmoid(logits)), computed stably from logits."""
    return -F.binary_cross_entropy_with_logits(logits, action, reduction='none')


def decide(logits: torch.Tensor, policy: str, threshold_logit: float = 0.0) -> GateDecision:
    """Turn gate logits (B,) into a :class:`GateDecision` under ``policy``; ``threshold_logit`` (logit(t)) moves
    the greedy policy's line from p > 0.5 to p > t."""
    prob = torch.sigmoid(logits)
    if policy == 'straight_through':
        gate = straight_through(prob, hard_decision(logits).detach())
        action = gate.detach()
    elif policy == 'sample':
        action = torch.bernoulli(prob.detach())
        gate = action
    elif policy == 'greedy':
        action = hard_decision(logits, threshold_logit).detach()
        gate = action
    elif policy == 'open':
        action = torch.ones_like(prob).detach()
        gate = action
    else:
        raise ValueError(f'Unknown gate policy {policy!r}; choose one of {POLICIES}.')
    return GateDecision(gate=gate, action=action, prob=prob, log_prob=bernoulli_log_prob(logits, action))
