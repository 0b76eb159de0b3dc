"""`timm-skipnet threshold`: one gate's threshold set from real images runs its block for the asked share."""
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


def test_the_threshold_runs_the_block_for_the_asked_share_of_the_split_and_touches_no_other_gate(cifar10_dir, tmp_path):
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


@pytest.mark.parametrize('rate', ['0', '1'])
def test_a_rate_outside_zero_one_is_refused_before_anything_is_written(cifar10_dir, tmp_path, rate):
    out = tmp_path / 'out.safetensors'
    run = subprocess.run(CLI + ['--model', 'skipnet_resnet38_cifar', '--dataset', cifar10_dir,
                          '--max-images', '8', '--gate', '0', '--rate', rate, '--output', str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and '--rate must be in (0, 1)' in run.stderr and not out.exists()


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


def test_one_offset_on_every_threshold_saves_the_asked_share_of_macs_and_keeps_forced_gates(cifar10_dir, tmp_path):
    from timm_skipnet.accounting import measure_mac_table
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, scale=0.5)
    model.set_gate_thresholds([0.0] + [0.5] * (model.num_gated_blocks - 1))  # gate 0 forced open
    save_file(model.state_dict(), str(tmp_path / 'in.safetensors'))
    out = tmp_path / 'out.safetensors'
    run = subprocess.run(CLI + ['--model', 'skipnet_resnet38_cifar', '--checkpoint', str(tmp_path / 'in.safetensors'),
                                '--dataset', cifar10_dir, '--max-images', '64', '--macs-reduction', '30',
                                '--output', str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'of the MACs on 64 train images' in run.stdout
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
    table = measure_mac_table(model)
    with torch.no_grad():
        actions = torch.cat([model(x, return_trace=True).actions for x, _, _ in loader])
    blocks = torch.tensor(table.blocks[1:], dtype=torch.float64)
    shortcuts = torch.tensor(table.shortcuts[1:], dtype=torch.float64)
    per_image = table.stem + table.blocks[0] + sum(table.gates) + table.head + actions.double() @ blocks + \
        (1 - actions.double()) @ shortcuts
    saved = 100 * (1 - per_image.mean().item() / table.full_macs)
    assert 30.0 <= saved <= 32.0  # the first saving past 30 %: one image's block more or less is ~0.1 %
    printed = float(run.stdout.split('saves ')[1].split(' %')[0])
    assert abs(printed - saved) < 0.01


def test_the_budget_offset_sits_inside_its_plateau_and_a_failed_search_restores_the_thresholds(cifar10_dir):
    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.thresholds import mean_macs_reduction, set_thresholds_for_macs_reduction
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, scale=0.5)
    model.train()  # the search must measure the greedy policy, not straight-through, and leave the mode alone
    loader = make_loader(DataSpec(cifar10_dir), 'train', build_transforms(model, is_training=False), 32, limit=64)
    offset, saved, n = set_thresholds_for_macs_reduction(model, loader, 30.0)
    assert model.training and n == 64 and saved >= 30.0
    model.eval()
    batches = [x for x, _, _ in loader]
    table = measure_mac_table(model)
    base = model.gate_threshold_logits - offset
    for nudge in (-1e-5, 1e-5):  # not at the edge of a jump (found to 6e-5): a small shift either way saves the same
        model.set_gate_thresholds((base + offset + nudge).tolist(), logits=True)
        assert mean_macs_reduction(model, batches, table) == pytest.approx(saved)
    model.set_gate_thresholds(torch.zeros(model.num_gated_blocks).tolist(), logits=True)
    before = model.gate_threshold_logits.clone()
    with pytest.raises(ValueError, match='out of reach'):
        set_thresholds_for_macs_reduction(model, loader, 99.0)
    assert torch.equal(model.gate_threshold_logits, before)


def test_a_macs_reduction_out_of_reach_or_mixed_with_gate_and_rate_is_refused(cifar10_dir, tmp_path):
    out = tmp_path / 'out.safetensors'
    base = CLI + ['--model', 'skipnet_resnet38_cifar', '--dataset', cifar10_dir, '--max-images', '8',
                  '--output', str(out)]
    mixed = subprocess.run(base + ['--macs-reduction', '30', '--gate', '0', '--rate', '0.5'], capture_output=True,
                           text=True, timeout=300)
    assert mixed.returncode != 0 and 'either --gate and --rate' in mixed.stderr
    # 99 % is more than skipping every gated block saves (the stem, first block and head always run)
    far = subprocess.run(base + ['--macs-reduction', '99'], capture_output=True, text=True, timeout=300)
    assert far.returncode != 0 and 'out of reach' in far.stderr and not out.exists()
