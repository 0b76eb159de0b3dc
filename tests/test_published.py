"""The folders in hub_configs/ are honest. A folder that states results ships the weights they were measured on (a
card without its weights fails, it is not skipped), and those weights, evaluated here on the whole CIFAR-10 test
split, classify exactly the stated number of images correctly and cost exactly the stated mean MACs, counted per
image from their own gate decisions. The evaluation is deterministic on the CPU, so nothing needs a tolerance."""
import json
import os

import pytest
import timm
import torch

from tests.conftest import _require_cifar10
from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.data import DataSpec, build_transforms, make_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB = os.path.join(ROOT, 'hub_configs')
FOLDERS = sorted(os.path.join(HUB, d) for d in os.listdir(HUB) if os.path.isdir(os.path.join(HUB, d)))
SHIPPED = os.path.join(HUB, 'skipnet_resnet38_cifar.cifar10')  # the model README.md and MODEL_CARD.md present
TEST_IMAGES = 10_000
# the per-image results of a folder's weights are computed once per folder, for every test below
_EVALUATIONS = {}


def _states_results(folder) -> bool:
    card = open(os.path.join(folder, 'README.md')).read()
    return os.path.exists(os.path.join(folder, 'eval_results.json')) or '## Results' in card


def _stated(folder) -> dict:
    with open(os.path.join(folder, 'eval_results.json')) as f:
        return json.load(f)


def evaluate_folder(folder, batch_size: int = 500) -> dict:
    """Greedy gates, sparse execution (what a user of the folder runs) on the test split in its stored order:
    per-image predictions, labels and gate decisions, and exact integer MACs per image from the measured table."""
    weights = os.path.join(folder, 'model.safetensors')
    if not os.path.exists(weights):
        pytest.fail(f'{weights} is missing: the card in {folder} states results of weights it does not ship.')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    model.set_execution('sparse')
    loader = make_loader(DataSpec(_require_cifar10()), 'test', build_transforms(model, False), batch_size)
    preds, labels, actions = [], [], []
    with torch.inference_mode():
        for x, y, bad in loader:
            assert bad == 0
            trace = model.forward_with_gates(x)
            preds.append(trace.logits.argmax(1))
            labels.append(y)
            actions.append(trace.actions.long())
    table = measure_mac_table(model)
    actions = torch.cat(actions)
    # integers throughout: stem + block 0 + every gate + head, then per gated block its cost or its shortcut's
    fixed = table.stem + table.blocks[0] + sum(table.gates) + table.head
    macs = fixed + actions @ torch.tensor(table.blocks[1:]) + (1 - actions) @ torch.tensor(table.shortcuts[1:])
    return dict(preds=torch.cat(preds), labels=torch.cat(labels), actions=actions, macs=macs, table=table)


def _evaluation(folder) -> dict:
    if folder not in _EVALUATIONS:
        _EVALUATIONS[folder] = evaluate_folder(folder)
    return _EVALUATIONS[folder]


def test_the_shipped_model_is_a_folder_that_states_results():
    assert SHIPPED in FOLDERS and _states_results(SHIPPED)


@pytest.mark.parametrize('folder', FOLDERS, ids=os.path.basename)
def test_a_folder_ships_the_weights_its_card_states_results_of_or_claims_nothing(folder):
    card = open(os.path.join(folder, 'README.md')).read()
    if not _states_results(folder):
        assert 'training in progress' in card and not os.path.exists(os.path.join(folder, 'model.safetensors'))
        return
    assert os.path.exists(os.path.join(folder, 'model.safetensors')), f'{folder} states results without weights'
    assert os.path.exists(os.path.join(folder, 'eval_results.json')), f'{folder} states results without their JSON'


def check_accuracy(folder, ev) -> None:
    stated, card = _stated(folder), open(os.path.join(folder, 'README.md')).read()
    n = len(ev['labels'])
    correct = ev['preds'] == ev['labels']
    assert n == stated['num_images'] == TEST_IMAGES and stated['num_bad_images'] == 0
    assert int(correct.sum()) == round(stated['top1'] * n / 100)  # 8973 of 10,000: one image more or less fails
    assert f"| top-1 (%) | {100 * int(correct.sum()) / n:.2f} |" in card
    first = int(correct[:1000].sum())
    assert first == round(stated['first_1000_top1'] * 10)
    assert f'first 1,000 test images: {first / 10:.2f} %' in card


def check_macs(folder, ev) -> None:
    stated, card = _stated(folder), open(os.path.join(folder, 'README.md')).read()
    table, macs, actions = ev['table'], ev['macs'], ev['actions']
    n = len(macs)
    assert table.full_macs == stated['macs_full'] and tuple(table.input_size) == tuple(stated['input_size'])
    assert int(macs.sum()) == round(stated['macs_mean'] * n)  # the exact total MACs of the split
    assert (int(macs.min()), int(macs.max())) == (stated['macs_min'], stated['macs_max'])
    reduction = 100 * (1 - int(macs.sum()) / (n * table.full_macs))
    assert reduction == pytest.approx(stated['macs_reduction_pct'], rel=0, abs=1e-9)
    assert f'({reduction:.1f} % fewer' in card
    assert actions.sum(0).tolist() == [round(r * n) for r in stated['gate_execution_rates']]
    executed = (1 + actions.sum(1)).tolist()
    assert {str(k): executed.count(k) for k in sorted(set(executed))} == stated['executed_blocks_histogram']


CLAIMING = [f for f in FOLDERS if _states_results(f)]


@pytest.mark.slow
@pytest.mark.xdist_group('published')  # one evaluation of the split for both
@pytest.mark.parametrize('folder', CLAIMING, ids=os.path.basename)
def test_the_weights_classify_exactly_the_stated_number_of_test_images_correctly(folder):
    check_accuracy(folder, _evaluation(folder))


@pytest.mark.slow
@pytest.mark.xdist_group('published')  # one evaluation of the split for both
@pytest.mark.parametrize('folder', CLAIMING, ids=os.path.basename)
def test_the_weights_cost_exactly_the_stated_macs_on_the_test_split(folder):
    check_macs(folder, _evaluation(folder))
