"""`timm-skipnet threshold`: one gate's threshold set from real images runs its block for the asked share."""
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers import randomize_gates
from timm_skipnet.data import (
    DataSpec,
    ImageStream,
    build_transforms,
    collate_skipping_bad,
    load_stream,
    make_loader,
    uniform_sample,
)
from timm_skipnet.loading import load_weights

CLI = [sys.executable, '-m', 'timm_skipnet.cli', 'threshold']
PUBLISHED = os.path.join(os.path.dirname(__file__), '..', 'hub_configs', 'skipnet_resnet38_cifar.cifar10')


@pytest.mark.slow
def test_the_threshold_runs_the_block_for_the_asked_share_of_the_split_and_touches_no_other_gate(cifar10_slice,
                                                                                                   tmp_path):
    cifar10_dir = cifar10_slice  # a uniform sample reads the whole split: 1,000 rows of it
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, scale=0.5)
    save_file(model.state_dict(), str(tmp_path / 'in.safetensors'))
    out = tmp_path / 'out.safetensors'
    run = subprocess.run(CLI + ['--model', 'skipnet_resnet38_cifar', '--checkpoint',
                          str(tmp_path / 'in.safetensors'), '--dataset', cifar10_dir, '--max-images', '64',
                          '--gate', '3', '--rate', '0.25', '--output', str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'runs the block for 25.0 % of 64 train images' in run.stdout
    load_weights(model, str(out))
    expected = torch.full((model.num_gated_blocks,), 0.5)
    assert torch.equal(torch.cat([model.gate_thresholds[:3], model.gate_thresholds[4:]]),
                       torch.cat([expected[:3], expected[4:]]))
    spec = DataSpec(cifar10_dir).resolved()
    # the sample is drawn uniformly from the whole split (seed 0), not its first 64 images (class-sorted folders)
    assert spec.train_num_samples == 1000
    rows = uniform_sample(load_stream(spec, 'train'), 64, seed=0)
    loader = torch.utils.data.DataLoader(ImageStream(rows, build_transforms(model, is_training=False),
                                                     spec.image_column, spec.label_column),
                                         batch_size=32, collate_fn=collate_skipping_bad)
    first = make_loader(spec, 'train', build_transforms(model, is_training=False), 32, limit=64)
    assert not torch.equal(torch.cat([y for _, y, _ in loader]), torch.cat([y for _, y, _ in first]))
    model.eval()
    with torch.no_grad():
        actions = torch.cat([model(x, return_trace=True).actions for x, _, _ in loader])
    assert actions.shape[0] == 64 and actions[:, 3].sum().item() == 16
    assert not (tmp_path / 'out.safetensors.tmp').exists()


def _threshold_cli(args, out):
    from timm_skipnet import cli
    cli.main(['threshold', '--model', 'skipnet_resnet38_cifar', *args, '--output', str(out)])


@pytest.mark.parametrize('rate', ['0', '1'])
def test_a_rate_outside_zero_one_is_refused_before_anything_is_written(cifar10_slice, tmp_path, rate):
    out = tmp_path / 'out.safetensors'
    with pytest.raises(ValueError, match=r'--rate must be in \(0, 1\)'):
        _threshold_cli(['--dataset', cifar10_slice, '--max-images', '8', '--gate', '0', '--rate', rate], out)
    assert not out.exists()


def test_the_uniform_sample_draws_every_row_of_a_class_sorted_stream_equally_often():
    stream = [{'i': i, 'label': i // 100} for i in range(1000)]  # 10 classes of 100, sorted as in an image folder
    counts = torch.zeros(1000)
    for seed in range(200):
        sample = uniform_sample(iter(stream), 100, seed=seed)
        assert len({r['i'] for r in sample}) == 100  # without replacement
        counts[[r['i'] for r in sample]] += 1
    per_class = counts.view(10, 100).sum(1) / (200 * 100)
    assert torch.allclose(per_class, torch.full((10,), 0.1), atol=0.01)  # the first 100 rows would be one class
    assert counts.min() > 0 and abs(counts.mean().item() - 20.0) < 1e-6  # each row kept 20 times in 200 on average
    assert uniform_sample(iter(stream[:7]), 100) == stream[:7]  # a split smaller than n: all of it


@pytest.mark.slow
def test_one_offset_on_every_threshold_saves_the_asked_share_of_macs_and_keeps_forced_gates(cifar10_slice, tmp_path,
                                                                                           capsys):
    cifar10_dir = cifar10_slice
    from timm_skipnet.accounting import measure_mac_table
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, scale=0.5)
    model.set_gate_thresholds([0.0] + [0.5] * (model.num_gated_blocks - 1))  # gate 0 forced open
    save_file(model.state_dict(), str(tmp_path / 'in.safetensors'))
    out = tmp_path / 'out.safetensors'
    _threshold_cli(['--checkpoint', str(tmp_path / 'in.safetensors'), '--dataset', cifar10_dir, '--max-images', '64',
                    '--macs-reduction', '30'], out)
    stdout = capsys.readouterr().out
    assert 'of the MACs on 64 train images' in stdout
    load_weights(model, str(out))
    model.eval()
    assert model.gate_thresholds[0].item() == 0.0  # forced open stays forced open
    offsets = model.gate_threshold_logits[1:]
    assert torch.allclose(offsets, offsets[:1].expand_as(offsets)) and offsets[0].item() != 0.0  # one shared shift
    spec = DataSpec(cifar10_dir).resolved()
    rows = uniform_sample(load_stream(spec, 'train'), 64, seed=0)
    loader = torch.utils.data.DataLoader(ImageStream(rows, build_transforms(model, is_training=False),
                                                     spec.image_column, spec.label_column),
                                         batch_size=32, collate_fn=collate_skipping_bad)
    batches = [x for x, _, _ in loader]
    table = measure_mac_table(model)
    saved = _saving(model, batches, table)
    assert 30.0 <= saved <= 32.0  # the first saving past 30 %: one image's block more or less is ~0.1 %
    printed = float(stdout.split('saves ')[1].split(' %')[0])
    assert abs(printed - saved) < 0.01
    # inside its plateau, not at the edge of a jump (found to 6e-5): a small shift either way saves the same
    found = model.gate_threshold_logits.clone()
    for nudge in (-1e-5, 1e-5):
        model.set_gate_thresholds(torch.cat([found[:1], found[1:] + nudge]).tolist(), logits=True)
        assert _saving(model, batches, table) == pytest.approx(saved)


def _saving(model, batches, table) -> float:
    """Percent of the full MACs the model's greedy decisions save on ``batches``, summed here from the table."""
    with torch.no_grad():
        actions = torch.cat([model(x, return_trace=True).actions for x in batches]).double()
    blocks = torch.tensor(table.blocks[1:], dtype=torch.float64)
    shortcuts = torch.tensor(table.shortcuts[1:], dtype=torch.float64)
    per_image = table.stem + table.blocks[0] + sum(table.gates) + table.head + actions @ blocks + \
        (1 - actions) @ shortcuts
    return 100 * (1 - per_image.mean().item() / table.full_macs)


@pytest.mark.slow
def test_the_budget_search_measures_the_greedy_policy_in_eval_mode_and_a_failed_search_restores_the_thresholds(
        cifar10_dir):
    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.thresholds import set_thresholds_for_macs_reduction
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, scale=0.5)
    model.train()  # the search must measure the greedy policy, not straight-through, and leave the mode alone
    loader = make_loader(DataSpec(cifar10_dir), 'train', build_transforms(model, is_training=False), 8, limit=16)
    offset, saved, n = set_thresholds_for_macs_reduction(model, loader, 30.0)
    assert model.training and n == 16 and saved >= 30.0
    model.eval()
    batches = [x for x, _, _ in loader]
    assert _saving(model, batches, measure_mac_table(model)) == pytest.approx(saved)  # eval-mode BN, greedy gates
    model.set_gate_thresholds(torch.zeros(model.num_gated_blocks).tolist(), logits=True)
    before = model.gate_threshold_logits.clone()
    with pytest.raises(ValueError, match='out of reach'):
        set_thresholds_for_macs_reduction(model, loader, 99.0)
    assert torch.equal(model.gate_threshold_logits, before)


def test_a_macs_reduction_out_of_reach_or_mixed_with_gate_and_rate_is_refused(cifar10_slice, tmp_path):
    out = tmp_path / 'out.safetensors'
    base = ['--dataset', cifar10_slice, '--max-images', '8']
    with pytest.raises(ValueError, match='Pass one of: --gate and --rate'):
        _threshold_cli(base + ['--macs-reduction', '30', '--gate', '0', '--rate', '0.5'], out)
    with pytest.raises(ValueError, match='Pass one of'):
        _threshold_cli(base + ['--macs-reduction', '30', '--harden'], out)
    with pytest.raises(ValueError, match=r'--tolerance .* in \[0, 0.5\)'):
        _threshold_cli(base + ['--harden', '--tolerance', '0.5'], out)
    # 99 % is more than skipping every gated block saves (the stem, first block and head always run)
    with pytest.raises(ValueError, match='out of reach'):
        _threshold_cli(base + ['--macs-reduction', '99'], out)
    assert not out.exists()


def test_the_budget_offset_is_the_middle_of_the_smallest_offsets_that_reach_the_budget():
    """Gates with one constant logit for every image and thresholds spread over the gates: gate k closes for every
    image once the offset reaches its margin m_k, so the saving is a staircase whose first step at or past 30 %
    is known exactly. The search must land on that step, in the middle of its window, not on a later one."""
    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.thresholds import set_thresholds_for_macs_reduction
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    model.gates.set_constant_probability(0.5)  # logit 0 for every gate and image
    k = model.num_gated_blocks
    margins = [0.5 + 0.25 * j for j in range(k)]  # gate j runs iff 0 > threshold_j + offset, i.e. offset < m_j
    model.set_gate_thresholds([-m for m in margins], logits=True)
    table = measure_mac_table(model)
    full, fixed = table.full_macs, table.stem + table.blocks[0] + sum(table.gates) + table.head

    def saving(closed):  # gates 0 .. closed - 1 closed
        macs = fixed + sum(table.shortcuts[1:closed + 1]) + sum(table.blocks[closed + 1:])
        return 100.0 * (1 - macs / full)
    closed = next(c for c in range(k + 1) if saving(c) >= 30.0)
    assert 0 < closed < k and saving(closed - 1) < 30.0
    offset, saved, n = set_thresholds_for_macs_reduction(model, [(torch.randn(4, 3, 32, 32), None, None)], 30.0)
    lo, hi = margins[closed - 1], margins[closed]  # every offset in [lo, hi) closes exactly `closed` gates
    assert n == 4 and saved == pytest.approx(saving(closed), rel=0, abs=1e-9)
    assert lo <= offset < hi and offset == pytest.approx((lo + hi) / 2, abs=1e-3)


def test_hardening_fixes_exactly_the_gates_that_never_vary_and_keeps_every_decision_on_those_images(
        cifar10_slice, tmp_path):
    """The published model on 500 real training images: the gates that decide one way for all of them get a forced
    threshold (0 or 1), the per-image ones keep theirs; the saved model decides and predicts exactly as before on
    those images, on the fast paths too; the CLI saves the same thresholds."""
    from safetensors.torch import load_file

    from timm_skipnet.policy import THRESHOLD_LOGIT_LIMIT
    from timm_skipnet.thresholds import harden_static_gates
    model = timm.create_model(f'local-dir:{PUBLISHED}', pretrained=True).eval()
    spec = DataSpec(cifar10_slice)
    loader = make_loader(spec, 'train', build_transforms(model, False), 250, limit=500)
    xs = torch.cat([x for x, _, _ in loader])
    with torch.no_grad():
        before = model.forward_with_gates(xs)
    rates = before.actions.mean(0)
    constant = [k for k, r in enumerate(rates.tolist()) if r in (0.0, 1.0)]
    assert 0 < len(constant) < model.num_gated_blocks  # the published model has both kinds
    hardened, measured, n = harden_static_gates(model, loader)
    assert hardened == constant and n == 500
    torch.testing.assert_close(torch.tensor(measured, dtype=torch.float64), rates.double())
    thr = model.gate_threshold_logits
    for k in range(model.num_gated_blocks):
        if k in constant:  # forced: at the limit, where the greedy rule ignores the logit
            assert thr[k].abs().item() >= THRESHOLD_LOGIT_LIMIT
            assert model.gate_thresholds[k].item() == (0.0 if rates[k] == 1 else 1.0)
        else:
            assert thr[k].item() == 0.0  # the p > 0.5 rule, untouched
    with torch.no_grad():
        after = model.forward_with_gates(xs)
        assert torch.equal(after.actions, before.actions)
        torch.testing.assert_close(model(xs), before.logits, rtol=0, atol=1e-5)  # the fast path
        torch.testing.assert_close(torch.cat([model(x[None]) for x in xs[:20]]), before.logits[:20], rtol=0,
                                   atol=1e-5)

    out = tmp_path / 'hardened.safetensors'
    from timm_skipnet import cli
    cli.main(['threshold', '--model', f'local-dir:{PUBLISHED}', '--pretrained', '--dataset', cifar10_slice,
              '--max-images', '500', '--sample', 'first', '--harden', '--output', str(out)])
    torch.testing.assert_close(load_file(str(out))['gate_threshold_logits'], thr)
