"""Gate policies and the REINFORCE objective, checked against hand computations."""
import math

import pytest
import torch

from timm_skipnet.policy import decide, straight_through
from timm_skipnet.rewards import discounted_returns, gate_entropy, hybrid_rl_loss, reinforce_loss, skip_rewards


def test_straight_through_is_hard_forward_and_sigmoid_gradient_backward():
    logits = torch.tensor([-2.0, 0.3, 1.5], requires_grad=True)
    p = torch.sigmoid(logits)
    g = straight_through(p)
    assert g.tolist() == [0.0, 1.0, 1.0]
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    expected = torch.tensor([1.0, 2.0, 3.0]) * p.detach() * (1 - p.detach())
    assert torch.allclose(logits.grad, expected)


def test_sampled_log_prob_is_the_bernoulli_log_likelihood():
    logits = torch.tensor([-1.0, 0.0, 2.5, 4.0])
    torch.manual_seed(0)
    d = decide(logits, 'sample')
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(d.action)
    assert torch.allclose(d.log_prob, ref)
    assert not d.gate.requires_grad


def test_greedy_and_open_policies_are_deterministic():
    logits = torch.tensor([-0.1, 0.0, 0.1])
    assert decide(logits, 'greedy').action.tolist() == [0.0, 0.0, 1.0]
    assert decide(logits, 'open').action.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match='Unknown gate policy'):
        decide(logits, 'soft')


def test_returns_follow_the_recursion_and_the_gamma_one_closed_form():
    actions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    ce = torch.tensor([0.5, 2.0])
    alpha, beta = 0.3, 1.0
    r = skip_rewards(actions, alpha)
    g = discounted_returns(r, -beta * ce, gamma=1.0)
    # G_k = -beta*CE + alpha/K * sum_{j>=k} (1 - a_j), K = 3
    expected = torch.tensor([[-0.5 + 0.1 * 2, -0.5 + 0.1 * 2, -0.5 + 0.1],
                             [-2.0 + 0.1, -2.0, -2.0]])
    assert torch.allclose(g, expected)
    g9 = discounted_returns(r, -beta * ce, gamma=0.9)
    assert math.isclose(g9[0, 0].item(), 0 + 0.9 * (0.1 + 0.9 * (0.1 + 0.9 * -0.5)), rel_tol=1e-6)


def test_hybrid_loss_equals_a_hand_computation_with_per_image_credit():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    actions = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    log_probs = torch.tensor([[-0.2, -0.7], [-1.1, -0.4]], requires_grad=True)
    alpha, beta, rl_weight = 0.1, 1.0, 0.01
    loss, ce_mean, rl = hybrid_rl_loss(logits, targets, actions, log_probs, alpha=alpha, beta=beta,
                                       rl_weight=rl_weight)
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0))]
    total_rl = 0.0
    for b in range(2):
        for k in range(2):
            ret = -beta * ce[b] + alpha / 2 * sum(1 - actions[b, j].item() for j in range(k, 2))
            total_rl += -log_probs[b, k].item() * ret
    assert math.isclose(ce_mean.item(), sum(ce) / 2, rel_tol=1e-6)
    assert math.isclose(rl.item(), total_rl, rel_tol=1e-6)
    assert math.isclose(loss.item(), sum(ce) / 2 + rl_weight * total_rl, rel_tol=1e-6)
    loss.backward()  # the gradient w.r.t. log pi(a_bk) is -rl_weight * G_bk: each image its own return
    g0 = -beta * ce[0] + alpha / 2 * 1
    assert math.isclose(log_probs.grad[0, 0].item(), -rl_weight * g0, rel_tol=1e-6)


def test_reinforce_raises_the_probability_of_a_rewarded_action():
    logit = torch.zeros(1, requires_grad=True)
    action = torch.ones(1)
    log_prob = -torch.nn.functional.binary_cross_entropy_with_logits(logit, action, reduction='none')
    reinforce_loss(log_prob.view(1, 1), torch.ones(1, 1)).backward()
    assert logit.grad.item() < 0  # gradient descent increases the logit, i.e. p(action = 1)


def test_batch_mean_baseline_centres_each_gate_return():
    log_probs = torch.zeros(3, 2, requires_grad=True)
    returns = torch.tensor([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
    reinforce_loss(log_probs, returns, baseline='batch_mean').backward()
    assert torch.allclose(log_probs.grad, -(returns - returns.mean(0)))
    with pytest.raises(ValueError, match='baseline'):
        reinforce_loss(log_probs, returns, baseline='critic')


def test_gate_entropy_is_the_bernoulli_entropy_summed_over_images_and_gates():
    probs = torch.tensor([[0.5, 0.9], [0.0, 1.0]])
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert math.isclose(gate_entropy(probs).item(), math.log(2) + h09, abs_tol=1e-4)  # p = 0 or 1: no entropy


def test_entropy_bonus_is_subtracted_inside_the_rl_term_and_pulls_gates_towards_one_half():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    actions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_probs = torch.tensor([[-0.2, -0.7], [-1.1, -0.4]])
    probs = torch.tensor([[0.8, 0.3], [0.5, 0.6]], requires_grad=True)
    args = dict(alpha=0.5, rl_weight=0.01, probs=probs)
    plain, _, rl_plain = hybrid_rl_loss(logits, targets, actions, log_probs, **args)
    bonus, _, rl_bonus = hybrid_rl_loss(logits, targets, actions, log_probs, entropy_weight=0.2, **args)
    h = gate_entropy(probs.detach()).item()
    assert math.isclose(rl_bonus.item(), rl_plain.item() - 0.2 * h, rel_tol=1e-6)
    assert math.isclose(bonus.item(), plain.item() - 0.01 * 0.2 * h, rel_tol=1e-6)
    bonus.backward()  # dH/dp = log((1 - p) / p): descent moves p > 0.5 down, p < 0.5 up, leaves p = 0.5
    assert probs.grad[0, 0] > 0 and probs.grad[0, 1] < 0 and probs.grad[1, 1] > 0
    assert abs(probs.grad[1, 0].item()) < 1e-7
    assert math.isclose(probs.grad[0, 0].item(), -0.01 * 0.2 * math.log(0.2 / 0.8), rel_tol=1e-5)


def test_entropy_bonus_without_probabilities_is_refused_with_the_fix():
    with pytest.raises(ValueError, match='probs=trace.probs'):
        hybrid_rl_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(1, 1), torch.zeros(1, 1),
                       alpha=0.1, entropy_weight=0.1)
