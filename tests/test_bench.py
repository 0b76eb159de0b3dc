"""The benchmark measures what it says: calibrated per-image decisions, R from those decisions, one row each."""
import timm
import torch

from timm_skipnet.bench import calibrate_gates, run_bench, run_train_bench


def test_calibrated_gates_run_about_the_requested_share_with_per_image_decisions():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    x = torch.randn(32, 3, 32, 32)
    rate = calibrate_gates(model, x, 0.5)
    actions = model.forward_with_gates(x).actions
    assert abs(rate - 0.5) < 0.1 and abs(actions.mean().item() - rate) < 1e-6
    assert len({tuple(a.tolist()) for a in actions}) > 1  # images take different paths


def test_bench_rows_report_ideal_and_measured_speedups():
    rows = run_bench('skipnet_resnet18', batch_sizes=[2], rate=0.5, img_size=32, min_time=0.01, min_iters=1)
    assert [r['variant'] for r in rows] == ['plain timm ResNet', 'SkipNet, all gates open',
                                            'SkipNet dense, rate 0.5', 'SkipNet sparse, rate 0.5']
    plain, open_, dense, sparse = rows
    assert plain['ideal_R'] == 1.0 and plain['speedup_S'] == 1.0
    assert open_['ideal_R'] < 1.0  # all blocks plus the gates' own MACs
    assert dense['ideal_R'] == sparse['ideal_R'] > 1.2
    assert all(abs(r['eta'] - r['speedup_S'] / r['ideal_R']) < 1e-9 for r in rows)


def test_train_bench_times_every_stage_against_a_plain_step():
    rows = run_train_bench('skipnet_resnet38_cifar', batch_size=4, steps=1)
    assert [r['variant'].split()[0] for r in rows] == ['plain', 'base', 'sp', 'rl']
    assert rows[0]['cost_vs_plain'] == 1.0 and all(r['step_ms'] > 0 for r in rows)
