"""`timm-skipnet threshold`: one gate's threshold set from real images runs its block for the asked share."""
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers import randomize_gates
from timm_skipnet.data import DataSpec, build_transforms, make_loader
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
    # the sample is drawn from the shuffled split (seed 0), not its first 64 images (class-sorted folders)
    loader = make_loader(spec, 'train', build_transforms(model, is_training=False), 32, limit=64, shuffle=True)
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
