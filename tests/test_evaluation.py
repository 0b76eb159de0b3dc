import pytest
import timm
import torch

import timm_skipnet  # noqa: F401
from tests.helpers import randomize_gates
from timm_skipnet.evaluation import collect, static_overflow, summarize


def test_evaluation_runs_only_the_chosen_blocks_even_after_training_forced_dense_execution():
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, seed=1)
    model.set_execution('dense')  # what the trainer sets
    model.train()
    seen = []  # images each gated block received, per call
    for k, block in enumerate(model.blocks()[1:]):
        block.register_forward_hook(lambda m, args, out, k=k: seen.append((k, args[0].shape[0])))
    torch.manual_seed(0)
    loader = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), 0) for _ in range(2)]

    results = collect(model, loader)

    ran = torch.zeros(model.num_gated_blocks)
    for k, n in seen:
        ran[k] += n
    executed = results['actions'].sum(0)
    assert 0 < executed.sum() < executed.numel() * 32  # some blocks skipped for some images
    assert torch.equal(ran, executed)  # a block sees exactly the images whose gate said run
    assert model.execution == 'dense' and model.training  # the caller's settings come back


def test_eval_command_reports_what_a_dense_forward_and_the_mac_table_give_for_the_published_model(cifar10_dir,
                                                                                                   tmp_path):
    """The command (greedy gates, sparse execution, its own summary) against an independent count: a traced dense
    forward of the same images, top-1 and MACs summed here per image from the measured per-part table."""
    import json
    import os

    from timm_skipnet import cli
    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = f'local-dir:{root}/hub_configs/skipnet_resnet38_cifar.cifar10'
    out = tmp_path / 'nested' / 'eval.json'
    cli.main(['eval', '--model', folder, '--dataset', cifar10_dir, '--max-images', '64', '--output', str(out)])
    summary = json.loads(out.read_text())

    model = timm.create_model(folder, pretrained=True).eval()
    model.set_execution('dense')
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 64, limit=64)
    (x, y, _), = list(loader)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
    actions = trace.actions.long()
    table = measure_mac_table(model)
    fixed = table.stem + table.blocks[0] + sum(table.gates) + table.head
    macs = fixed + actions @ torch.tensor(table.blocks[1:]) + (1 - actions) @ torch.tensor(table.shortcuts[1:])
    correct = int((trace.logits.argmax(1) == y).sum())
    assert summary['num_images'] == 64 and summary['split'] == 'test' and summary['num_bad_images'] == 0
    assert summary['top1'] == pytest.approx(100 * correct / 64, abs=1e-9)
    assert summary['macs_full'] == table.full_macs == 83_280_512
    assert summary['macs_mean'] == pytest.approx(int(macs.sum()) / 64, rel=1e-12)
    assert (summary['macs_min'], summary['macs_max']) == (int(macs.min()), int(macs.max()))
    assert summary['macs_reduction_pct'] == pytest.approx(100 * (1 - int(macs.sum()) / 64 / table.full_macs), rel=1e-9)
    assert summary['gmacs_mean'] == pytest.approx(int(macs.sum()) / 64 / 1e9, rel=1e-12)
    assert summary['macs_reduction_pct'] > 30  # the shipped model skips: the count is not the full model's
    assert summary['executed_blocks_mean'] == pytest.approx(1 + actions.sum(1).double().mean().item(), abs=1e-12)
    assert [round(r * 64) for r in summary['gate_execution_rates']] == actions.sum(0).tolist()


def test_static_overflow_counts_batches_gates_and_shortcut_decisions_by_hand():
    actions = torch.zeros(17, 2)  # two whole batches of 8, the 17th image left out
    actions[[0, 1, 2], 0] = 1  # batch 1: three images run gate 0, one more than its capacity of 2
    actions[[8, 9], 0] = 1  # batch 2: two, within it
    actions[:, 1] = 1  # gate 1 runs every image, capacity the whole batch
    actions[16, 0] = 1  # in no whole batch

    def capacity_for(k, b):
        return 2 if k == 0 else b

    report = static_overflow(actions, capacity_for, batch_sizes=(8, 64))
    assert list(report) == ['8']  # no whole batch of 64
    assert report['8'] == dict(batches=2, batches_overflowing_pct=50.0, gate_overflow_pct=[50.0, 0.0],
                               shortcut_decisions_pct=100.0 * 1 / (16 * 2))


def test_eval_overflow_report_equals_the_fallbacks_static_execution_counts():
    torch.manual_seed(0)
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_gates(model)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        actions = model.forward_with_gates(x).actions
        model.set_gate_capacity(actions.mean(0).clamp(0.05, 0.95).tolist(), sigmas=0.0, overflow='exact')
        model.set_execution('static')
        model.gate_overflow.zero_()
        for i in range(0, 32, 8):
            model(x[i:i + 8])
    from timm_skipnet.accounting import measure_mac_table
    results = dict(preds=torch.zeros(32, dtype=torch.long), labels=torch.zeros(32, dtype=torch.long),
                   actions=actions)
    report = summarize(results, measure_mac_table(model), capacity_for=model.gate_capacity_for)['static_overflow']
    fallbacks = torch.tensor(report['8']['gate_overflow_pct']) * 4 / 100
    assert fallbacks.sum() > 0  # some gate overflows at these capacities
    assert torch.equal(fallbacks.round().long(), model.gate_overflow)
