"""The benchmark measures what it says: calibrated per-image decisions, R from those decisions, one row each."""
import pytest
import timm
import torch

from timm_skipnet.bench import calibrate_gates, format_table, run_bench, run_train_bench, speedup_on_images


def test_calibrated_gates_run_about_the_requested_share_with_per_image_decisions():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    x = torch.randn(32, 3, 32, 32)
    rate = calibrate_gates(model, x, 0.5)
    actions = model.forward_with_gates(x).actions
    assert abs(rate - 0.5) < 0.1 and abs(actions.mean().item() - rate) < 1e-6
    assert len({tuple(a.tolist()) for a in actions}) > 1  # images take different paths


def test_bench_rows_report_ideal_and_measured_speedups():
    from timm_skipnet.accounting import measure_mac_table
    rows = run_bench('skipnet_resnet18', batch_sizes=[2], rate=0.5, img_size=32, min_time=0.01, min_iters=1)
    assert [r['variant'] for r in rows] == ['plain timm ResNet', 'SkipNet, all gates open',
                                            'SkipNet dense, rate 0.5', 'SkipNet sparse, rate 0.5',
                                            'blocks only, decisions given']
    plain, open_, dense, sparse, given = rows
    # R from an independent count: all gates open costs every block plus every gate, measured here
    table = measure_mac_table(timm.create_model('skipnet_resnet18'), (3, 32, 32))
    assert open_['ideal_R'] == pytest.approx(table.full_macs / (table.full_macs + sum(table.gates)), rel=1e-12)
    skipping = table.full_macs / dense['ideal_R']  # the mean MACs of the calibrated decisions
    assert sparse['ideal_R'] > 1.2  # the dense, sparse and blocks-only rows share these decisions (R by construction)
    kept = sparse['speedup_S'] / given['speedup_S']
    assert f'sparse S / blocks-only S): batch 2: {kept:.3f}' in format_table(rows)
    assert table.stem + table.blocks[0] + table.head + sum(table.gates) + sum(table.shortcuts) < skipping
    # S of every row is the plain row's latency over its own, the throughput its batch over its latency
    for r in rows:
        assert r['batch'] == 2 and r['iters'] >= 1 and r['latency_ms'] > 0
        assert r['speedup_S'] == pytest.approx(plain['latency_ms'] / r['latency_ms'], rel=1e-9)
        assert r['img_per_s'] == pytest.approx(2 / (r['latency_ms'] / 1e3), rel=1e-9)
        assert r['eta'] == pytest.approx(r['speedup_S'] / r['ideal_R'], rel=1e-9)


@pytest.mark.slow
def test_bench_command_sets_its_threads_and_writes_the_printed_rows_as_json(tmp_path, capsys):
    import json

    from tests.conftest import TEST_THREADS
    from timm_skipnet import cli
    out = tmp_path / 'bench.json'
    try:
        cli.main(['bench', '--model', 'skipnet_resnet18', '--batch-sizes', '1', '2', '--img-size', '32',
                  '--min-time', '0.01', '--threads', '2', '--output', str(out)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(TEST_THREADS)
    printed = capsys.readouterr().out
    assert 'CPU, 2 threads' in printed.splitlines()[0]
    rows = json.loads(out.read_text())
    assert [(r['batch'], r['variant']) for r in rows] == [(b, v) for b in (1, 2) for v in (
        'plain timm ResNet', 'SkipNet, all gates open', 'SkipNet dense, rate 0.5', 'SkipNet sparse, rate 0.5',
        'blocks only, decisions given')]
    table = [line for line in printed.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        assert line.startswith(f"| {r['batch']} | {r['variant']} | {r['latency_ms']:.1f} |")


def test_train_bench_times_every_stage_against_a_plain_step():
    rows = run_train_bench('skipnet_resnet38_cifar', batch_size=4, steps=1)
    assert [r['variant'].split()[0] for r in rows] == ['plain', 'base', 'sp', 'rl']
    assert rows[0]['cost_vs_plain'] == 1.0 and all(r['step_ms'] > 0 for r in rows)


def test_speedup_on_images_times_each_setting_on_its_own_images_and_reports_the_ratio():
    calls = []

    class Recorder(torch.nn.Module):  # a real module whose every call is logged: (which model, batch size)
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append((self.tag, len(x)))
            return x.mean((1, 2, 3))

    xs = torch.randn(10, 3, 4, 4)
    rows = speedup_on_images(Recorder('skip'), Recorder('plain'), xs, settings=((1, 3), (4, 100)), rounds=2)
    assert set(rows) == {1, 4}
    assert rows[1]['images'] == 3 and rows[4]['images'] == 10  # a cap beyond the data is the whole data
    for r in rows.values():
        assert abs(r['speedup'] - r['model_img_per_s'] / r['baseline_img_per_s']) < 1e-12
    # per round and model: one warm-up batch, then every image once; rounds interleave the two models
    batch1 = [c for c in calls if c[1] == 1]
    assert len(batch1) == 2 * 2 * (1 + 3) and batch1[:4] == [('skip', 1)] * 4 and batch1[4:8] == [('plain', 1)] * 4
    skip_batched = [c[1] for c in calls if c[0] == 'skip' and c[1] != 1]
    assert skip_batched == [4, 4, 4, 2] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU machine --device cuda is valid')
def test_bench_refuses_a_cuda_device_it_cannot_see_with_the_fix():
    import argparse

    from timm_skipnet.bench import add_parser
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(['bench', '--device', 'cuda'])
    with pytest.raises(SystemExit, match='no CUDA device.*--device cpu'):
        args.func(args)


def test_bench_aoti_mode_asks_for_a_trained_model_on_real_images(monkeypatch):
    import argparse

    from timm_skipnet import aoti_export
    from timm_skipnet.bench import add_parser
    monkeypatch.setattr(aoti_export, 'export_aoti', lambda *a, **k: pytest.fail('built a package without --data'))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(['bench', '--mode', 'aoti', '--model', 'skipnet_resnet50'])
    with pytest.raises(SystemExit, match='--mode aoti.*add --data'):
        args.func(args)


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_each_timed_variant_runs_its_own_gates_in_any_order_without_refolding(gate_type, monkeypatch):
    """The all-open and rate-0.5 rows run their own gates whatever ran before them, and a timed call never refolds
    the gates (a refold inside the timing was once counted as gate cost)."""
    from timm.models.resnet import BasicBlock

    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.bench import _variants
    from timm_skipnet.folded_gates import FoldedCache
    with torch.inference_mode():
        torch.manual_seed(0)
        skip = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
        plain = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
        x, calib = torch.randn(8, 3, 32, 32), torch.randn(16, 3, 32, 32)
        macs_seen = []
        variants = _variants(plain, skip, x, 0.5, measure_mac_table(skip, (3, 32, 32)), macs_seen, calib)
        for name in ('SkipNet, all gates open', 'SkipNet sparse, rate 0.5'):  # warm-up: each copy folds once
            variants[name]()
        builds = []
        build = FoldedCache.get

        def counting_get(self, bank):
            before = self.key
            value = build(self, bank)
            builds.append(self.key != before)
            return value
        monkeypatch.setattr(FoldedCache, 'get', counting_get)
        images_per_block = []

        def count(module, inputs, output):
            if isinstance(module, BasicBlock):
                images_per_block.append(inputs[0].shape[0])
        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            blocks = 1 + skip.num_gated_blocks
            for name in ('SkipNet, all gates open', 'SkipNet sparse, rate 0.5', 'SkipNet, all gates open',
                         'SkipNet sparse, rate 0.5'):
                expected = variants[name].func.forward_with_gates(x).actions.sum().item() + x.shape[0]  # + block 0
                images_per_block.clear()
                variants[name]()
                assert sum(images_per_block) == expected, name
                if 'open' in name:
                    assert expected == blocks * x.shape[0]
                else:
                    assert x.shape[0] < expected < blocks * x.shape[0]
        finally:
            handle.remove()
        assert builds and not any(builds)


@pytest.mark.parametrize('batch', [1, 8])
def test_blocks_only_row_runs_the_sparse_models_blocks_with_no_gate_computed(batch, monkeypatch):
    """The blocks-only row is the ceiling the gated row is read against: it must run exactly the blocks the gated
    model runs (same logits) and must not compute a single gate."""
    from timm_skipnet.accounting import measure_mac_table
    from timm_skipnet.bench import _variants
    from timm_skipnet.gates import RecurrentGates
    with torch.inference_mode():
        torch.manual_seed(0)
        skip = timm.create_model('skipnet_resnet38_cifar').eval()
        plain = timm.create_model('skipnet_resnet38_cifar').eval()
        x, calib = torch.randn(batch, 3, 32, 32), torch.randn(16, 3, 32, 32)
        variants = _variants(plain, skip, x, 0.5, measure_mac_table(skip, (3, 32, 32)), [], calib)
        sparse, given = variants['SkipNet sparse, rate 0.5'], variants['blocks only, decisions given']
        actions = sparse.func.forward_with_gates(x).actions
        assert 0 < actions.float().mean() < 1  # some blocks skipped, some run
        expected = sparse()

        def no_gates(*args, **kwargs):
            raise AssertionError('a gate was computed')
        for name in ('forward', 'folded'):  # every gate computation, eager or folded, starts at one of these
            monkeypatch.setattr(RecurrentGates, name, no_gates)
        with pytest.raises(AssertionError, match='a gate was computed'):
            sparse()
        torch.testing.assert_close(given(), expected, rtol=0, atol=0)
