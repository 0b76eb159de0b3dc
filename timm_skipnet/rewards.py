"""REINFORCE for SkipNet's hybrid RL stage (tensors in, tensors out).

Per image b and gated block k (K gates, forward order), with a_k = 1 when block k ran:
    reward  r_k = (1 - a_k) * alpha / K                 (alpha: the skip reward)
    return  G_k = r_k + gamma * G_{k+1},  G_{K+1} = -beta * CE_b
With gamma = 1: G_k = -beta * CE_b + (alpha / K) * sum_{j >= k} (1 - a_j)  (the paper's hybrid reward).
The policy loss sums over images and gates as the original CIFAR code (PyTorch 0.2 ``reinforce``) did; every image
gets its own return (no batch-mean broadcast, the bug of the original ImageNet port).
"""
from typing import Optional

import torch


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def skip_rewards(actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, K) per-gate reward for skipping, in float32 at least: under autocast the actions are bf16 / fp16, which
    would round alpha / K and every return built from it."""
    return (1.0 - _at_least_float32(actions)) * (alpha / actions.shape[1])


def discounted_returns(rewards: torch.Tensor, terminal: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """(B, K) returns G_k = r_k + gamma * G_{k+1}, with G_{K+1} = ``terminal`` (B,); float32 at least."""
    rewards, g = _at_least_float32(rewards), _at_least_float32(terminal)
    returns = torch.empty_like(rewards)
    for k in range(rewards.shape[1] - 1, -1, -1):
        g = rewards[:, k] + gamma * g
        returns[:, k] = g
    return returns


def reinforce_loss(log_probs: torch.Tensor, returns: torch.Tensor, baseline: Optional[str] = None) -> torch.Tensor:
    """sum_{b,k} -log pi(a_bk) * (G_bk - baseline_k); returns carry no gradient.

    ``baseline='batch_mean'`` subtracts each gate's batch-mean return: lower variance; since the mean includes the
    image's own return, the gradient is scaled by (1 - 1/B), a bias that vanishes with the batch size.
    """
    advantage = returns.detach()
    if baseline == 'batch_mean':
        advantage = advantage - advantage.mean(0, keepdim=True)
    elif baseline not in (None, 'none'):
        raise ValueError(f"baseline must be 'none' or 'batch_mean', got {baseline!r}.")
    return -(log_probs * advantage).sum()


def gate_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum_{b,k} H(p_bk), the Bernoulli entropy of every gate decision (nats): largest at p = 0.5, zero at 0 or 1."""
    p = probs.float().clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log()).sum()


def hybrid_rl_loss(logits: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor, log_probs: torch.Tensor, *,
                   alpha: float, beta: float = 1.0, gamma: float = 1.0, rl_weight: float = 0.01,
                   baseline: Optional[str] = None, ce_fn=None, probs: Optional[torch.Tensor] = None,
                   entropy_weight: float = 0.0):
    """Mean cross-entropy + rl_weight * (REINFORCE - entropy_weight * sum_{b,k} H(p_bk)). Returns (loss, ce_mean,
    rl_term). The entropy bonus (off by default; needs ``probs``) keeps gates stochastic for longer, so that a policy
    can settle on per-image decisions rather than every gate at p = 0 or 1."""
    ce = ce_fn(logits, targets) if ce_fn is not None else torch.nn.functional.cross_entropy(
        logits, targets, reduction='none')
    if ce.shape != logits.shape[:1]:  # a mean-reduced CE would give every image the batch-mean return
        raise ValueError(f'ce_fn must return one loss per image (reduction="none"), shape ({logits.shape[0]},); '
                         f'got shape {tuple(ce.shape)}.')
    returns = discounted_returns(skip_rewards(actions, alpha), -beta * ce.detach().float(), gamma)
    rl = reinforce_loss(log_probs.float(), returns, baseline)
    if entropy_weight:
        if probs is None:
            raise ValueError('entropy_weight needs the gate probabilities: pass probs=trace.probs.')
        rl = rl - entropy_weight * gate_entropy(probs)
    ce_mean = ce.mean()
    return ce_mean + rl_weight * rl, ce_mean, rl
