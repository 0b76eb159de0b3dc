"""Benchmarks compare like with like: compiled against compiled, a trained model on real images against itself with
every gate open, and the ideal speed-up from that model's own decisions on those images."""
import os

import pytest
import timm
import torch

from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.bench import format_images_table, format_table, run_bench, run_images_bench

PUBLISHED = 'local-dir:' + os.path.join(os.path.dirname(__file__), '..', 'hub_configs',
                                        'skipnet_resnet38_cifar.cifar10')


def test_images_bench_ideal_speedup_is_the_macs_ratio_of_the_models_own_decisions(cifar10_dir):
    rows = run_images_bench(PUBLISHED, cifar10_dir, batch_sizes=(1, 8), images=16, rounds=1)
    model = timm.create_model(PUBLISHED, pretrained=True).eval()
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    xs = torch.cat([x for x, _, _ in make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 16,
                                                 limit=16)])
    with torch.no_grad():
        actions = model.forward_with_gates(xs).actions
    table = measure_mac_table(model)
    ideal = table.full_macs / table.per_image_macs(actions).mean().item()
    assert [(r['batch'], r['mode'], r['images']) for r in rows] == [(1, 'eager', 16), (8, 'eager', 16)]
    for r in rows:
        assert r['ideal_R'] == pytest.approx(ideal, rel=1e-12)
        assert r['speedup_S'] == pytest.approx(r['skipnet_img_per_s'] / r['plain_img_per_s'])
        assert r['eta'] == pytest.approx(r['speedup_S'] / ideal)
    assert '| 8 | eager | 16 |' in format_images_table(rows)


def test_images_bench_refuses_a_batch_larger_than_the_images(cifar10_dir):
    with pytest.raises(ValueError, match='larger than the 16 images'):
        run_images_bench(PUBLISHED, cifar10_dir, batch_sizes=(32,), images=16, rounds=1)


@pytest.mark.slow
def test_compiled_bench_times_compiled_variants_only_and_reports_the_gate_cost():
    rows = run_bench('skipnet_resnet18', batch_sizes=[2], rate=0.5, img_size=32, min_time=0.01, min_iters=1,
                     compile=True)
    assert [r['variant'] for r in rows] == ['plain timm ResNet (compiled)', 'SkipNet, all gates open (compiled)',
                                            'SkipNet static, rate 0.5 (compiled)']
    plain, opened, gated = rows
    assert plain['ideal_R'] == 1.0 and gated['ideal_R'] > 1.2
    assert opened['gate_us'] == pytest.approx(1e3 * (opened['latency_ms'] - plain['latency_ms']) / 7)
    assert 'Gate cost per gate' in format_table(rows)
