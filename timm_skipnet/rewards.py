"""REINFORCE for SkipNet's hybrid RL stage (tensors in, tensors out).

Per image b and gated block k (K gates, forward order), with a_k = 1 when block k ran:
    reward  r_k = (1 - a_k) * alpha / K                 (alpha: the skip reward)
    return  G_k = r_k + gamma * G_{k+1},  G_{K+1} = -beta * CE_b
With gamma = 1: G_k = -beta * CE_b + (alpha / K) * sum_{j >= k} (1 - a_j)  (the paper's hybrid reward).
The policy loss sums over images and gates as the original CIFAR code (PyTorch 0.2 ``reinforce``) did; every image
gets its own return (no batch-mean broadcast, the bug of the original ImageNet port).

With a compute budget (:class:`MacsBudget`, ``--target-macs``) the skip reward is replaced by a price on each image's
exact MACs M_b (accounting.MacTable, gates included), relative to the budget T and in units of the full model's F:
    reward  r_k = -lambda * a_k * (block_k - shortcut_k) / F     (what running block k adds)
    return  G_{K+1} = -beta * CE_b - lambda * (M_floor - T) / F  (M_floor: every gated block skipped)
so that with gamma = 1 the first gate's return is -beta * CE_b - lambda * (M_b - T) / F, and gate k's return counts
only the MACs of the decisions from k on. The multiplier lambda >= 0 follows dual ascent on the batch's mean MACs
(:func:`dual_ascent`), so the mean lands on the budget while every image keeps its own price-weighted trade-off; an
optional proportional term (:func:`pi_multiplier`) damps the overshoot of a policy that answers the price late.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

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


def parse_target_macs(text: str):
    """``--target-macs`` as ``('share', s)`` (a share of the full model's MACs: ``0.6`` or ``60%``) or ``('macs', m)``
    (MACs per image with a unit: ``52.7M``, ``0.0527G``); a clear ValueError for anything else."""
    raw = str(text).strip()
    units = {'M': 1e6, 'G': 1e9}
    how = ("give a share of the full model's MACs (0.6 or 60%) or MACs per image with a unit (52.7M, 0.0527G)")
    try:
        if raw[-1:] == '%':
            kind, value = 'share', float(raw[:-1]) / 100.0
        elif raw[-1:].upper() in units:
            kind, value = 'macs', float(raw[:-1]) * units[raw[-1:].upper()]
        else:
            kind, value = 'share', float(raw)
    except ValueError:
        raise ValueError(f'--target-macs {text!r} is not a budget: {how}.') from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f'--target-macs {text!r} must be a positive budget: {how}.')
    if kind == 'share' and value > 1.0:
        raise ValueError(f"--target-macs {text!r}: a plain number is a share of the full model's MACs, at most 1 "
                         f"(100%); for MACs per image add the unit, e.g. {raw}M.")
    return kind, value


@dataclass
class MacsBudget:
    """The rl stage's compute budget: exact per-image MACs from the model's MAC table, a target, and the current
    Lagrange multiplier. Rewards are in units of the full model's MACs, so lambda is a price in nats of
    cross-entropy per full network and means the same for any model size."""
    table: 'object'  # accounting.MacTable
    target_macs: float  # T, MACs per image
    multiplier: float = 0.0  # lambda >= 0, the price in the rewards
    integral: Optional[float] = None  # the PI controller's integral; None: equal to the multiplier

    def __post_init__(self):
        if self.integral is None:
            self.integral = self.multiplier

    def update(self, mean_share: float, lr: float, kp: float = 0.0) -> None:
        """One step of the price after an update whose sampled paths spent ``mean_share`` of the full MACs."""
        self.integral, self.multiplier = pi_multiplier(self.integral, mean_share, self.target_share, lr, kp)

    @classmethod
    def from_target(cls, table, text: str, multiplier: float = 0.0) -> 'MacsBudget':
        """A budget from ``--target-macs`` text; refused when no policy of this model can meet it."""
        kind, value = parse_target_macs(text)
        target = value * table.full_macs if kind == 'share' else value
        budget = cls(table, float(target), float(multiplier))
        low, high = budget.floor_macs, budget.floor_macs + float(sum(budget.extra_macs))
        if not low < target <= high:
            raise ValueError(
                f'--target-macs {text} is {target / 1e6:.2f} MMACs per image ({target / table.full_macs:.1%} of the '
                f'full {table.full_macs / 1e6:.2f} M); this model spends between {low / 1e6:.2f} M '
                f'({low / table.full_macs:.1%}: every gated block skipped, gates included) and {high / 1e6:.2f} M '
                f'({high / table.full_macs:.1%}): choose a budget inside that range.')
        if multiplier < 0:
            raise ValueError(f'the multiplier of the MACs budget must be >= 0, got {multiplier}.')
        return budget

    @property
    def full_macs(self) -> float:
        return float(self.table.full_macs)

    @property
    def target_share(self) -> float:
        return self.target_macs / self.full_macs

    @property
    def extra_macs(self):
        """Per gated block: the MACs that running it adds over skipping it (block minus its shortcut)."""
        return [b - s for b, s in zip(self.table.blocks[1:], self.table.shortcuts[1:])]

    @property
    def floor_macs(self) -> float:
        """An image that skips every gated block: stem, block 0, every gate, the skipped blocks' shortcuts, head."""
        return float(self.table.per_image_macs(torch.zeros(1, len(self.table.gates)))[0])

    def image_macs(self, actions: torch.Tensor) -> torch.Tensor:
        """(B,) exact MACs of each image's sampled path (float64, on the CPU), from the accounting module."""
        return self.table.per_image_macs(actions.detach().cpu())

    def rewards(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, K) r_bk = -lambda * a_bk * (block_k - shortcut_k) / F, float32 at least."""
        a = _at_least_float32(actions)
        extra = torch.tensor(self.extra_macs, dtype=torch.float64).div(self.full_macs).to(a.device, a.dtype)
        return -self.multiplier * a * extra

    def terminal(self) -> float:
        """-lambda * (M_floor - T) / F: with the per-gate rewards, the return of the first gate prices the image's
        whole path against the budget."""
        return -self.multiplier * (self.floor_macs - self.target_macs) / self.full_macs


def dual_ascent(multiplier: float, mean_share: float, target_share: float, lr: float) -> float:
    """lambda <- max(0, lambda + lr * (mean sampled MACs share - target share)): the price rises while the batches
    spend more than the budget, falls while they spend less, and never turns into a reward for running blocks."""
    return max(0.0, multiplier + lr * (mean_share - target_share))


def pi_multiplier(integral: float, mean_share: float, target_share: float, lr: float,
                  kp: float) -> Tuple[float, float]:
    """(integral, lambda) after one update of a PI-controlled price (Stooke et al., 2020, "PID Lagrangian methods"):
    integral <- max(0, integral + lr * e), lambda = max(0, integral + kp * e), e = mean share - target share.
    The policy answers the price with a lag of hundreds of updates; the integral alone keeps rising through that
    lag and overshoots the budget. The proportional term prices the current error at once, so it falls as soon as
    the MACs cross the budget. kp = 0 is plain dual ascent (lambda == integral)."""
    integral = dual_ascent(integral, mean_share, target_share, lr)
    return integral, max(0.0, integral + kp * (mean_share - target_share))


def gate_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum_{b,k} H(p_bk), the Bernoulli entropy of every gate decision (nats): largest at p = 0.5, zero at 0 or 1."""
    p = probs.float().clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log()).sum()


def hybrid_rl_loss(logits: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor, log_probs: torch.Tensor, *,
                   alpha: float, beta: float = 1.0, gamma: float = 1.0, rl_weight: float = 0.01,
                   baseline: Optional[str] = None, ce_fn=None, probs: Optional[torch.Tensor] = None,
                   entropy_weight: float = 0.0, budget: Optional[MacsBudget] = None):
    """Mean cross-entropy + rl_weight * (REINFORCE - entropy_weight * sum_{b,k} H(p_bk)). Returns (loss, ce_mean,
    rl_term). The entropy bonus (off by default; needs ``probs``) keeps gates stochastic for longer, so that a policy
    can settle on per-image decisions rather than every gate at p = 0 or 1. With ``budget`` the price on each
    image's MACs replaces the skip reward (``alpha`` must then be 0, so that no run silently gets both)."""
    if budget is not None and alpha:
        raise ValueError(f'a MACs budget replaces the skip reward: pass alpha=0 with it, got alpha={alpha}.')
    ce = ce_fn(logits, targets) if ce_fn is not None else torch.nn.functional.cross_entropy(
        logits, targets, reduction='none')
    if ce.shape != logits.shape[:1]:  # a mean-reduced CE would give every image the batch-mean return
        raise ValueError(f'ce_fn must return one loss per image (reduction="none"), shape ({logits.shape[0]},); '
                         f'got shape {tuple(ce.shape)}.')
    terminal = -beta * ce.detach().float()
    if budget is None:
        rewards = skip_rewards(actions, alpha)
    else:
        rewards, terminal = budget.rewards(actions), terminal + budget.terminal()
    returns = discounted_returns(rewards, terminal, gamma)
    rl = reinforce_loss(log_probs.float(), returns, baseline)
    if entropy_weight:
        if probs is None:
            raise ValueError('entropy_weight needs the gate probabilities: pass probs=trace.probs.')
        rl = rl - entropy_weight * gate_entropy(probs)
    ce_mean = ce.mean()
    return ce_mean + rl_weight * rl, ce_mean, rl
