"""Training to a compute budget (``--target-macs``): the priced return and the multiplier's update against hand
computations, the budget's syntax and range, a short real run pulled toward targets on both sides of its start, an
exact resume of the multiplier, and the evaluation's target and per-image-policy fields."""
import json
import math
import os
import shutil

import pytest
import timm
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from timm_skipnet.accounting import MacTable, measure_mac_table
from timm_skipnet.evaluation import format_summary, policy_diversity, recorded_target, summarize
from timm_skipnet.rewards import (
    MacsBudget,
    discounted_returns,
    dual_ascent,
    hybrid_rl_loss,
    parse_target_macs,
    pi_multiplier,
)
from timm_skipnet.train import TrainConfig, stage_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, 'hub_configs', 'skipnet_resnet38_cifar.cifar10')

# stem 10, block 0 of 100, four gated blocks (the second with a projection shortcut of 20), gates 1-2, head 5
TABLE = MacTable(input_size=[3, 8, 8], stem=10, blocks=[100, 50, 80, 40, 60], shortcuts=[0, 0, 20, 0, 0],
                 gates=[1, 1, 2, 2], head=5)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _hand_macs(actions_row, first_gate=0):
    """MACs of one image by hand from TABLE's lists, with the gates before ``first_gate`` counted as skips."""
    total = TABLE.stem + TABLE.blocks[0] + sum(TABLE.gates) + TABLE.head
    for k, a in enumerate(actions_row):
        ran = a == 1 and k >= first_gate
        total += TABLE.blocks[k + 1] if ran else TABLE.shortcuts[k + 1]
    return total


# ---- the objective, by hand ----------------------------------------------------------------------------------------
def test_priced_returns_equal_a_hand_computation_and_the_first_gate_prices_the_whole_path():
    actions = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ce = torch.tensor([0.4, 1.7, 0.05])
    full, target, lam, beta = TABLE.full_macs, 200.0, 0.8, 1.0
    assert full == 345
    budget = MacsBudget(TABLE, target, lam)
    returns = discounted_returns(budget.rewards(actions), -beta * ce + budget.terminal(), gamma=1.0)
    for b in range(3):
        row = actions[b].tolist()
        for k in range(4):  # gate k answers for its own and later decisions only
            expected = -beta * ce[b].item() - lam * (_hand_macs(row, first_gate=k) - target) / full
            assert math.isclose(returns[b, k].item(), expected, rel_tol=1e-6, abs_tol=1e-6), (b, k)
    # the first gate's return is the image's whole exact cost against the budget, as the accounting module counts it
    macs = TABLE.per_image_macs(actions)
    assert macs.tolist() == [_hand_macs(actions[b].tolist()) for b in range(3)] == [291, 141, 351]
    torch.testing.assert_close(returns[:, 0], -beta * ce - lam * (macs.float() - target) / full)

    # the REINFORCE term of hybrid_rl_loss: sum_{b,k} -log pi(a_bk) * G_bk, the per-image CE unchanged
    logits = torch.randn(3, 10)
    ce_fn = lambda lg, y: ce.clone()  # noqa: E731 -- the hand CE above, one loss per image
    log_probs = -torch.rand(3, 4)
    _, _, rl = hybrid_rl_loss(logits, torch.zeros(3, dtype=torch.long), actions, log_probs, alpha=0.0, beta=beta,
                              budget=budget, ce_fn=ce_fn, rl_weight=1.0)
    assert math.isclose(rl.item(), -(log_probs * returns).sum().item(), rel_tol=1e-6)
    # lambda = 0: no price at all, whatever the budget
    free = MacsBudget(TABLE, target, 0.0)
    assert torch.equal(free.rewards(actions), torch.zeros(3, 4)) and free.terminal() == 0.0
    with pytest.raises(ValueError, match='replaces the skip reward'):
        hybrid_rl_loss(logits, torch.zeros(3, dtype=torch.long), actions, log_probs, alpha=0.1, budget=budget,
                       ce_fn=ce_fn)


def test_stage_loss_with_a_budget_equals_a_hand_computation_on_skipnet38():
    from tests.helpers import randomize_gates
    model = timm.create_model('skipnet_resnet38_cifar').train()
    randomize_gates(model, scale=0.5)
    table = measure_mac_table(model)
    budget = MacsBudget.from_target(table, '0.5', multiplier=0.7)
    cfg = TrainConfig(stage='rl', target_macs='0.5', beta=1.0, rl_weight=0.01)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    ce_fn = torch.nn.CrossEntropyLoss(reduction='none')
    torch.manual_seed(5)
    out = stage_loss(model, x, y, cfg, ce_fn, budget=budget)
    torch.manual_seed(5)
    trace = model(x, gate_policy='sample', return_trace=True)
    k_gates = trace.actions.shape[1]
    expected_rl = 0.0
    for b in range(3):
        ce_b = ce_fn(trace.logits[b:b + 1], y[b:b + 1]).item()
        for k in range(k_gates):
            later = trace.actions[b:b + 1].clone()
            later[:, :k] = 0  # the MACs gate k answers for: every earlier gate counted as a skip
            ret = -ce_b - 0.7 * (table.per_image_macs(later).item() - budget.target_macs) / table.full_macs
            expected_rl -= trace.log_probs[b, k].item() * ret
    assert math.isclose(out['rl'].item(), expected_rl, rel_tol=1e-5)
    share = (table.per_image_macs(trace.actions).mean() / table.full_macs).item()
    assert math.isclose(out['macs_share'].item(), share, rel_tol=1e-12)
    with pytest.raises(ValueError, match='go together'):
        stage_loss(model, x, y, cfg, ce_fn)  # a budget run without its budget


def test_multiplier_update_is_projected_dual_ascent_by_hand():
    assert dual_ascent(0.3, mean_share=0.62, target_share=0.55, lr=0.5) == pytest.approx(0.3 + 0.5 * 0.07)
    assert dual_ascent(0.3, mean_share=0.50, target_share=0.55, lr=0.5) == pytest.approx(0.3 - 0.5 * 0.05)
    assert dual_ascent(0.01, mean_share=0.20, target_share=0.55, lr=0.5) == 0.0  # never a reward for compute
    assert dual_ascent(0.3, mean_share=0.90, target_share=0.55, lr=0.0) == 0.3  # lr 0: a fixed price


def test_pi_price_adds_the_proportional_term_to_the_integral_and_without_it_is_dual_ascent():
    # above the budget the price leads the integral, below it falls at once
    assert pi_multiplier(1.0, mean_share=0.50, target_share=0.40, lr=0.02, kp=10.0) == (
        pytest.approx(1.002), pytest.approx(1.002 + 1.0))
    assert pi_multiplier(1.0, mean_share=0.35, target_share=0.40, lr=0.02, kp=10.0) == (
        pytest.approx(0.999), pytest.approx(0.999 - 0.5))
    assert pi_multiplier(0.2, mean_share=0.30, target_share=0.40, lr=0.02, kp=10.0) == (pytest.approx(0.198), 0.0)
    for share in (0.2, 0.5, 0.9):
        assert pi_multiplier(0.3, share, 0.55, 0.5, kp=0.0) == (dual_ascent(0.3, share, 0.55, 0.5),) * 2
    table = measure_mac_table(timm.create_model('skipnet_resnet38_cifar'))
    budget = MacsBudget.from_target(table, '0.4', multiplier=0.7)
    assert budget.integral == 0.7
    budget.update(0.35, lr=0.02, kp=10.0)
    assert (budget.integral, budget.multiplier) == (pytest.approx(0.699), pytest.approx(0.199))


# ---- the budget's syntax and range ---------------------------------------------------------------------------------
def test_target_macs_reads_a_share_a_percentage_or_macs_with_a_unit():
    assert parse_target_macs('0.6') == ('share', 0.6)
    assert parse_target_macs('60%') == ('share', pytest.approx(0.6))
    assert parse_target_macs('52.7M') == ('macs', pytest.approx(52.7e6))
    assert parse_target_macs(' 0.0527g ') == ('macs', pytest.approx(52.7e6))
    table = measure_mac_table(timm.create_model('skipnet_resnet38_cifar'))
    assert MacsBudget.from_target(table, '0.6').target_macs == pytest.approx(0.6 * 83_280_512)
    assert MacsBudget.from_target(table, '52.7M').target_share == pytest.approx(52.7e6 / 83_280_512)


@pytest.mark.parametrize('text, message', [
    ('1.5', 'at most 1'), ('60', 'add the unit, e.g. 60M'), ('fast', 'is not a budget'), ('', 'is not a budget'),
    ('-0.2', 'must be a positive budget'), ('0', 'must be a positive budget'), ('nanM', 'must be a positive budget'),
    ('5M', 'between 5.44 M'), ('0.05', 'between 5.44 M'), ('90M', 'and 83.30 M'),
])
def test_a_bad_or_unreachable_budget_is_refused_naming_the_syntax_or_the_range(text, message):
    table = measure_mac_table(timm.create_model('skipnet_resnet38_cifar'))
    with pytest.raises(ValueError, match=message.replace('.', r'\.')):
        MacsBudget.from_target(table, text)


@pytest.mark.parametrize('settings, message', [
    (dict(stage='sp', target_macs='0.6'), '--target-macs trains the gates with REINFORCE'),
    (dict(stage='rl', target_macs='0.6', alpha=0.7), 'drop --alpha 0.7'),
    (dict(stage='rl', target_macs='60'), 'add the unit'),
    (dict(stage='rl', target_macs='0.6', macs_lambda_lr=-0.1), 'must be finite and >= 0'),
    (dict(stage='rl', target_macs='0.6', macs_lambda_init=float('nan')), 'must be finite and >= 0'),
    (dict(stage='rl', target_macs='0.6', macs_lambda_kp=-1.0), '--macs-lambda-kp -1.0'),
])
def test_impossible_budget_settings_fail_before_any_work(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(dataset=str(tmp_path / 'nowhere'), output=str(tmp_path / 'out'), **settings))
    assert not (tmp_path / 'out').exists()


def test_initial_checkpoint_takes_the_local_dir_spelling_of_an_exported_folder():
    """The documented budget runs start from ``--initial-checkpoint local-dir:hub_configs/...``."""
    from timm_skipnet.train import build_model
    model, _, _ = build_model(TrainConfig(stage='rl', initial_checkpoint=f'local-dir:{SHIPPED}'), num_classes=10)
    shipped = load_file(os.path.join(SHIPPED, 'model.safetensors'))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())


# ---- short real runs -----------------------------------------------------------------------------------------------
def _cfg(cifar10_dir, out, **kw) -> TrainConfig:
    """SkipNet-38 with the shipped model's backbone and fresh gates at p = 0.5 (the documented starting point), a
    fast policy (rl_weight 0.5) and a fast multiplier, so that a dozen updates of batch 8 show the direction."""
    base = dict(stage='rl', dataset=cifar10_dir, batch_size=8, train_num_samples=64, eval_num_samples=16, lr=0.05,
                sched='none', log_every=1, output=str(out), shuffle_buffer=64, checkpoint_every=1000,
                initial_checkpoint=SHIPPED, reset_gates=True, gate_init_bias=0.0, rl_baseline='batch_mean',
                rl_weight=0.5, macs_lambda_lr=1.0, export=False)
    return TrainConfig(**{**base, **kw})


def _logged(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sampled_macs_move_toward_the_target_from_above_and_from_below(cifar10_dir, tmp_path):
    """Fresh gates at p = 0.5 spend 53 % of the full MACs: a budget of 90 % lets the cross-entropy open blocks
    (lambda stays 0), one of 25 % raises lambda until the policy skips."""
    moves = {}
    for target in (0.9, 0.25):
        AcceleratorState._reset_state(True)
        out = tmp_path / f't{target}'
        summary = train(_cfg(cifar10_dir, out, steps=12, target_macs=str(target), export=target == 0.9))
        rows = _logged(out)
        shares, lams = [r['macs_share'] for r in rows], [r['macs_lambda'] for r in rows]
        assert all(r['macs_target'] == pytest.approx(target) for r in rows)
        start, end = sum(shares[:2]) / 2, sum(shares[-4:]) / 4
        assert 0.45 < start < 0.62  # p = 0.5 everywhere: half the gated blocks
        assert abs(end - target) < abs(start - target) - 0.1, (target, shares)
        crossed = next((i for i, share in enumerate(shares) if share > target), len(shares))
        moves[target] = (start, end, max(lams[:crossed], default=0.0), max(lams))
        assert summary['target_macs'] == pytest.approx(target * 83_280_512)
        assert summary['macs_lambda'] == lams[-1]
    assert moves[0.9][1] > moves[0.9][0] and moves[0.9][2] == 0.0  # up, free until the budget is crossed
    assert moves[0.25][1] < moves[0.25][0] and moves[0.25][3] > 1.0  # down, priced
    # the exported folder records the budget, and `timm-skipnet eval` finds it there
    exported = json.loads((tmp_path / 't0.9' / 'model' / 'eval_results.json').read_text())
    assert exported['target_macs'] == pytest.approx(0.9 * 83_280_512)
    assert recorded_target(f"local-dir:{tmp_path / 't0.9' / 'model'}") == exported['target_macs']


@pytest.mark.slow
def test_resume_restores_the_multiplier_bit_exactly_and_refuses_a_changed_budget(cifar10_dir, tmp_path):
    # 8 updates per epoch: the first 2 are rl warm-up, where lambda must hold still; stop at 4, resume to 6
    kw = dict(steps=6, target_macs='0.3', macs_lambda_init=0.25, rl_warmup_epochs=0.25, checkpoint_every=2,
              keep_checkpoints=10, macs_lambda_kp=0.5)
    out = tmp_path / 'run'
    train(_cfg(cifar10_dir, out, **kw))
    lams = [r['macs_lambda'] for r in _logged(out)]
    assert lams[:2] == [0.25, 0.25] and lams[2] != 0.25  # held during warm-up, moving after
    ckpts = out / 'checkpoints'
    state = {s: json.loads((ckpts / f'step_{s:07d}' / 'trainer_state.json').read_text()) for s in (4, 6)}
    assert state[4]['macs_multiplier'] != state[6]['macs_multiplier'] and state[4]['macs_multiplier'] > 0
    assert state[6]['macs_multiplier'] == lams[-1]
    straight = load_file(str(ckpts / 'step_0000006' / 'model.safetensors'))
    shutil.rmtree(ckpts / 'step_0000006')
    (ckpts / 'latest').write_text('step_0000004')
    AcceleratorState._reset_state(True)
    train(_cfg(cifar10_dir, out, resume=str(out), **kw))
    resumed = json.loads((ckpts / 'step_0000006' / 'trainer_state.json').read_text())
    assert resumed['macs_multiplier'] == state[6]['macs_multiplier']  # bit for bit: the same float
    assert resumed['macs_integral'] == state[6]['macs_integral'] != resumed['macs_multiplier']  # the PI state too
    weights = load_file(str(ckpts / 'step_0000006' / 'model.safetensors'))
    assert all(torch.equal(weights[k], straight[k]) for k in straight)
    # another budget, or none, would chase a different target with this multiplier: refused, naming the flag
    for change, message in ((dict(target_macs='0.5'), r"--target-macs '0.3' \(now '0.5'\)"),
                            (dict(target_macs=''), r"--target-macs '0.3' \(now ''\)"),
                            (dict(macs_lambda_kp=0.0), r"--macs-lambda-kp 0.5 \(now 0.0\)")):
        AcceleratorState._reset_state(True)
        with pytest.raises(ValueError, match=message):
            train(_cfg(cifar10_dir, out, resume=str(out), **{**kw, **change}))


# ---- evaluation ----------------------------------------------------------------------------------------------------
def test_policy_diversity_counts_varying_gates_and_distinct_paths_on_a_hand_matrix():
    actions = torch.tensor([[1, 0, 1, 1],
                            [1, 0, 0, 1],
                            [1, 0, 1, 1],
                            [1, 0, 1, 0],
                            [1, 0, 1, 1]], dtype=torch.float32)
    # gate 0 always runs, gate 1 always skips: static; gates 2 and 3 differ between images
    # paths: 1011 (x3), 1001, 1010 -> 3 distinct, the most common holds 3 of 5 images
    assert policy_diversity(actions) == dict(varying_gates=2, varying_gates_pct=50.0, distinct_paths=3,
                                             most_common_path_pct=60.0)
    static = policy_diversity(torch.ones(7, 4))
    assert static == dict(varying_gates=0, varying_gates_pct=0.0, distinct_paths=1, most_common_path_pct=100.0)


def test_summary_reports_the_distance_to_a_trained_target_and_prints_it():
    actions = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # 291 and 141 MACs: mean 216
    results = dict(preds=torch.tensor([1, 2]), labels=torch.tensor([1, 0]), actions=actions)
    s = summarize(results, TABLE, target_macs=200.0)
    assert s['macs_mean'] == 216.0 and s['target_macs'] == 200.0
    assert s['target_macs_pct_of_full'] == pytest.approx(100 * 200 / 345)
    assert s['macs_over_target_pct'] == pytest.approx(8.0)  # 216 / 200: 8 % above the budget
    assert s['macs_over_target_points'] == pytest.approx(100 * 16 / 345)
    assert s['varying_gates'] == 3 and s['distinct_paths'] == 2
    table = format_summary(s)
    assert '| gates deciding per image (vary between images) | 3 of 4 (75 %) |' in table
    assert '| distinct execution paths | 2 (most common: 50.0 % of images) |' in table
    assert '(58.0 % of full): +8.0 % (+4.6 points of full) |' in table
    assert 'target' not in format_summary(summarize(results, TABLE))  # no budget, no target line


@pytest.mark.slow
def test_eval_command_compares_with_the_target_recorded_in_a_folder_or_given_on_the_command_line(cifar10_dir,
                                                                                                 tmp_path):
    from timm_skipnet import cli
    folder = tmp_path / 'budgeted'
    shutil.copytree(SHIPPED, folder)
    recorded = json.loads((folder / 'eval_results.json').read_text())
    recorded['target_macs'] = 0.6 * 83_280_512
    (folder / 'eval_results.json').write_text(json.dumps(recorded))
    for extra, target in (([], 0.6 * 83_280_512), (['--target-macs', '50M'], 50e6)):
        out = tmp_path / f'eval{len(extra)}.json'
        cli.main(['eval', '--model', f'local-dir:{folder}', '--dataset', cifar10_dir, '--max-images', '32',
                  '--output', str(out), *extra])
        s = json.loads(out.read_text())
        assert s['target_macs'] == pytest.approx(target)
        assert s['macs_over_target_pct'] == pytest.approx(100 * (s['macs_mean'] / target - 1))
        assert s['varying_gates'] > 0 and 1 < s['distinct_paths'] <= 32  # the shipped policy is per-image
    out = tmp_path / 'shipped.json'
    cli.main(['eval', '--model', f'local-dir:{SHIPPED}', '--dataset', cifar10_dir, '--max-images', '8',
              '--output', str(out)])
    assert 'target_macs' not in json.loads(out.read_text())  # trained with --alpha: no target to report
