"""The analysis report: every number behind a plot is recomputed here from the raw per-image data, on a real slice of
CIFAR-10, with gates randomised so that decisions differ from image to image."""
import json
import os
import statistics
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import CIFAR10_DIR
from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet import cli
from timm_skipnet.analysis import (
    DEFAULT_SCALES,
    PLOT_FILES,
    compute_statistics,
    executed_buckets,
    read_class_names,
    run_analysis,
    write_report,
)
from timm_skipnet.data import DataSpec, build_transforms, make_loader

pytestmark = pytest.mark.xdist_group('analysis')  # the module's fixtures are computed once

N_IMAGES = 96
GRID = 8
CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def spec():
    if not os.path.isdir(CIFAR10_DIR):
        pytest.fail(f'CIFAR-10 Parquet folder not found at {CIFAR10_DIR}.')
    return DataSpec(CIFAR10_DIR)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_bn(m)
    randomize_gates(m)
    return m


@pytest.fixture(scope='module')
def batches(model, spec):
    """The loader's batches, kept: the analysis reads them and the tests check against them."""
    loader = make_loader(spec, 'test', build_transforms(model, is_training=False), batch_size=32, limit=N_IMAGES)
    return list(loader)


@pytest.fixture(scope='module')
def data(model, batches, spec):
    return run_analysis(model, batches, DEFAULT_SCALES, read_class_names(spec, 'test'), max_images=N_IMAGES,
                        grid_size=GRID, meta=dict(model='skipnet_resnet38_cifar', dataset=CIFAR10_DIR, split='test'))


@pytest.fixture(scope='module')
def stats(data):
    return compute_statistics(data)


@pytest.fixture(scope='module')
def report(data, stats, tmp_path_factory):
    return write_report(data, stats, str(tmp_path_factory.mktemp('analysis')))


def _images(batches):
    return torch.cat([x for x, _, _ in batches])


def _assert_valid_png(path):
    assert os.path.getsize(path) > 0
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()


def test_randomised_gates_make_decisions_that_vary_per_image(data):
    executed = data.executed.tolist()
    rates = data.actions.double().mean(0)
    assert data.num_images == N_IMAGES
    assert len(set(executed)) >= 3
    assert ((rates > 0) & (rates < 1)).sum() >= 3
    assert len({tuple(row) for row in data.actions.tolist()}) > 1


def test_actions_and_scaled_runs_match_an_independent_dense_forward(model, batches, data):
    model.set_execution('dense')
    try:
        with torch.no_grad():
            for name, scale in (('native', 1.0), ('scaled', 1.5)):
                preds, executed = [], []
                for x, _, _ in batches:
                    if scale != 1.0:
                        x = F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)
                    trace = model(x, return_trace=True)
                    preds.append(trace.logits.argmax(1))
                    executed.append(trace.executed_blocks.long())
                assert torch.equal(torch.cat(preds), data.scale_preds[scale]), name
                assert torch.equal(torch.cat(executed), data.scale_executed[scale]), name
    finally:
        model.set_execution('auto')
    assert torch.equal(data.labels, torch.cat([y for _, y, _ in batches]))
    assert torch.equal(data.scale_executed[1.0], data.executed)


def test_per_gate_rates_and_stages_match_the_raw_actions(data, stats):
    g = stats['gates']
    columns = list(zip(*data.actions.tolist()))
    assert g['per_gate_rate'] == pytest.approx([sum(col) / N_IMAGES for col in columns])
    assert g['gate_stage'] == ['layer1'] * 5 + ['layer2'] * 6 + ['layer3'] * 6  # ResNet-38: 6 blocks per stage
    assert g['gate_block'] == list(range(1, 18))
    for stage in ('layer1', 'layer2', 'layer3'):
        mine = [r for r, s in zip(g['per_gate_rate'], g['gate_stage']) if s == stage]
        assert g['per_stage_rate'][stage] == pytest.approx(sum(mine) / len(mine))


def test_executed_histogram_counts_every_image_once(data, stats):
    h = stats['executed_histogram']
    per_image = [1 + sum(row) for row in data.actions.tolist()]
    assert h['blocks'] == list(range(1, 19))
    assert sum(h['counts']) == N_IMAGES
    assert h['counts'] == [per_image.count(k) for k in h['blocks']]
    assert stats['executed_mean'] == pytest.approx(sum(per_image) / N_IMAGES)
    assert stats['executed_median'] == statistics.median(per_image)


def test_class_medians_match_a_plain_python_median(data, stats):
    groups = {}
    for y, p, e in zip(data.labels.tolist(), data.preds.tolist(), data.executed.tolist()):
        groups.setdefault(y, []).append((e, y == p))
    rows = stats['per_class']
    assert [r['name'] for r in rows] == CIFAR10_NAMES
    assert sum(r['count'] for r in rows) == N_IMAGES
    for r in rows:
        items = groups.get(r['label'], [])
        assert r['count'] == len(items)
        if items:
            assert r['median_executed'] == statistics.median([e for e, _ in items])
            assert r['top1_pct'] == pytest.approx(100 * sum(ok for _, ok in items) / len(items))
        else:
            assert r['median_executed'] is None and r['top1_pct'] is None


def test_accuracy_per_bucket_matches_a_recount(data, stats):
    pairs = list(zip(data.executed.tolist(), (data.preds == data.labels).tolist()))
    buckets = stats['accuracy_by_bucket']['buckets']
    assert 1 <= len(buckets) <= 8
    assert buckets[0]['lo'] == min(e for e, _ in pairs) and buckets[-1]['hi'] == max(e for e, _ in pairs)
    assert all(a['hi'] + 1 == b['lo'] for a, b in zip(buckets, buckets[1:]))
    assert sum(b['count'] for b in buckets) == N_IMAGES
    for b in buckets:
        inside = [ok for e, ok in pairs if b['lo'] <= e <= b['hi']]
        assert (b['count'], b['correct']) == (len(inside), sum(inside))
        assert b['top1_pct'] == (pytest.approx(100 * sum(inside) / len(inside)) if inside else None)


def test_executed_buckets_have_equal_width_and_are_at_most_eight():
    assert executed_buckets(5, 5) == [(5, 5)]
    assert executed_buckets(1, 8) == [(k, k) for k in range(1, 9)]
    assert executed_buckets(3, 12) == [(3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]
    assert executed_buckets(1, 18) == [(1, 3), (4, 6), (7, 9), (10, 12), (13, 15), (16, 18)]
    assert executed_buckets(1, 17)[-1] == (16, 17)  # the last one may be narrower
    for hi in range(1, 60):
        b = executed_buckets(1, hi)
        assert len(b) <= 8 and b[0][0] == 1 and b[-1][1] == hi
        assert len({h - lo for lo, h in b[:-1]}) <= 1


def test_scale_one_shift_is_zero_and_shift_histograms_match_raw_counts(data, stats):
    sc = stats['scales']
    values = sc['shift_values']
    by_scale = {s['scale']: s for s in sc['series']}
    assert list(by_scale) == list(DEFAULT_SCALES)
    assert [by_scale[s]['size'] for s in DEFAULT_SCALES] == [[24, 24], [32, 32], [40, 40], [48, 48]]
    one = by_scale[1.0]
    assert one['counts'][values.index(0)] == N_IMAGES and one['mean_shift'] == 0 and one['same_pct'] == 100
    base = data.executed.tolist()
    for s, row in by_scale.items():
        shift = [a - b for a, b in zip(data.scale_executed[s].tolist(), base)]
        counted = Counter(shift)
        assert row['counts'] == [counted.get(v, 0) for v in values]
        assert sum(row['counts']) == N_IMAGES
        assert row['mean_shift'] == pytest.approx(sum(shift) / N_IMAGES)
        assert row['fewer_pct'] + row['same_pct'] + row['more_pct'] == pytest.approx(100)
    assert any(any(v != 0 for v in data.scale_executed[s] - data.executed) for s in (0.75, 1.25, 1.5))


def test_grids_keep_only_the_extreme_images_with_their_pixels(data, batches, stats):
    images = _images(batches)
    executed = data.executed.tolist()
    for kept, rows, sign in ((data.fewest, stats['grids']['fewest'], 1), (data.most, stats['grids']['most'], -1)):
        expected = sorted(range(N_IMAGES), key=lambda i: (sign * executed[i], i))[:GRID]
        assert kept.indices.tolist() == expected == [r['index'] for r in rows]
        assert kept.images.shape[0] == GRID
        assert torch.equal(kept.images, images[expected])
        assert kept.executed.tolist() == [executed[i] for i in expected] == [r['executed'] for r in rows]
        assert [r['label_name'] for r in rows] == [CIFAR10_NAMES[data.labels[i]] for i in expected]
        assert [r['pred'] for r in rows] == [int(data.preds[i]) for i in expected]


def test_report_writes_valid_pngs_and_a_summary_matching_the_statistics(report, stats):
    assert set(PLOT_FILES) | {'summary_json', 'summary_md'} == set(report)
    for key, name in PLOT_FILES.items():
        assert os.path.basename(report[key]) == name
        _assert_valid_png(report[key])
    with open(report['summary_json']) as f:
        assert json.load(f) == stats
    with open(report['summary_md']) as f:
        md = f.read()
    for name in PLOT_FILES.values():
        assert f']({name})' in md
    assert f"Top-1 {stats['top1_pct']:.2f} %" in md


def test_max_images_trims_the_stream_and_bad_images_are_counted(model, batches):
    data = run_analysis(model, [(None, None, 2)] + batches, scales=(1.0,), max_images=10, grid_size=GRID)
    assert data.num_images == 10 and data.num_bad_images == 2
    assert len(data.fewest.indices) == len(data.most.indices) == GRID
    assert data.class_names == [str(i) for i in range(10)]  # no names given: numbered


def test_class_names_come_from_the_parquet_schema_or_image_folders(spec, tmp_path):
    assert read_class_names(spec, 'test') == CIFAR10_NAMES
    for name in ('dog', 'cat'):
        os.makedirs(tmp_path / 'test' / name)
    assert read_class_names(DataSpec(str(tmp_path)), 'test') == ['cat', 'dog']
    assert read_class_names(DataSpec('someone/not-a-local-folder'), 'test') is None


@pytest.mark.slow
def test_cli_analyze_runs_end_to_end_on_a_tiny_slice(model, tmp_path):
    from safetensors.torch import save_file
    ckpt = str(tmp_path / 'model.safetensors')
    save_file(model.state_dict(), ckpt)
    out = tmp_path / 'report'
    cli.main(['analyze', '--model', 'skipnet_resnet38_cifar', '--checkpoint', ckpt, '--dataset', CIFAR10_DIR,
              '--max-images', '32', '--batch-size', '16', '--device', 'cpu', '--output', str(out)])
    assert sorted(os.listdir(out)) == sorted([*PLOT_FILES.values(), 'summary.json', 'summary.md'])
    for name in PLOT_FILES.values():
        _assert_valid_png(out / name)
    with open(out / 'summary.json') as f:
        summary = json.load(f)
    assert summary['num_images'] == 32 and summary['meta']['split'] == 'test'
    assert min(summary['gates']['per_gate_rate']) < 1  # the checkpoint's gates, not a fresh model's open ones
    assert [r['name'] for r in summary['per_class']] == CIFAR10_NAMES
