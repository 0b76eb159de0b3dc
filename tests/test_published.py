"""Every folder in hub_configs/ is honest: with weights, its stated accuracy on the first 1,000 CIFAR-10 test
images is reproduced within 1 point; without weights, its card claims no results."""
import json
import os

import pytest
import timm
import torch

from timm_skipnet.data import DataSpec, build_transforms, make_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = sorted(os.path.join(ROOT, 'hub_configs', d) for d in os.listdir(os.path.join(ROOT, 'hub_configs')))


@pytest.mark.parametrize('folder', FOLDERS, ids=os.path.basename)
def test_published_folder_reproduces_its_card_or_claims_nothing(folder, cifar10_dir):
    card = open(os.path.join(folder, 'README.md')).read()
    if not os.path.exists(os.path.join(folder, 'model.safetensors')):
        assert 'training in progress' in card and '## Results' not in card
        return
    stated = json.load(open(os.path.join(folder, 'eval_results.json')))['first_1000_top1']
    assert f'first 1,000 test images: {stated:.2f} %' in card
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 250, limit=1000)
    correct = total = 0
    with torch.inference_mode():
        for x, y, _ in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    assert total == 1000
    assert abs(100.0 * correct / total - stated) <= 1.0
