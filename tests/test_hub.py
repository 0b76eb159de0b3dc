"""The real timm / huggingface_hub loading code, run offline against a Hub cache laid out on disk."""
import json
import os
import shutil

import huggingface_hub
import pytest
import timm
import torch
from timm.models import get_pretrained_cfg, save_for_hf

from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet.export import export_folder
from timm_skipnet.hub import check_folder, export_run, publish, write_hub_config

COMMIT = '0123456789abcdef0123456789abcdef01234567'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def put_in_cache(cache, repo_id: str, folder) -> None:
    """What `hf_hub_download` leaves behind: snapshots/<commit>/<files> and refs/main (40 hex, no newline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / 'snapshots' / COMMIT
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), snap / name)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)


@pytest.fixture
def trained_skipnet38(tmp_path):
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_bn(model)
    randomize_gates(model)
    folder = export_folder(model, str(tmp_path / 'skipnet_resnet38_cifar.cifar10'),
                           dict(num_classes=10, gate_type='rnn'))
    return model, folder


def test_published_tag_uses_a_full_repo_id_under_the_project_org():
    cfg = get_pretrained_cfg('skipnet_resnet38_cifar.cifar10')
    assert cfg.hf_hub_id == 'timm-skipnet/skipnet_resnet38_cifar.cifar10'
    assert timm.get_pretrained_cfg('skipnet_resnet38_cifar').tag == 'cifar10'


def test_pretrained_tag_hf_hub_and_local_dir_reproduce_the_saved_model(hub_cache, trained_skipnet38):
    src, folder = trained_skipnet38
    put_in_cache(hub_cache, 'timm-skipnet/skipnet_resnet38_cifar.cifar10', folder)
    x = torch.randn(4, 3, 32, 32)
    expected = src.forward_with_gates(x)
    assert 0 < expected.actions.mean() < 1
    for name in ('skipnet_resnet38_cifar.cifar10', 'skipnet_resnet38_cifar',
                 'hf-hub:timm-skipnet/skipnet_resnet38_cifar.cifar10', f'local-dir:{folder}'):
        model = timm.create_model(name, pretrained=True).eval()
        got = model.forward_with_gates(x)
        assert torch.equal(got.logits, expected.logits), name
        assert torch.equal(got.actions, expected.actions), name


def test_loading_with_other_num_classes_or_in_chans_keeps_the_trunk(hub_cache, trained_skipnet38):
    src, folder = trained_skipnet38
    put_in_cache(hub_cache, 'timm-skipnet/skipnet_resnet38_cifar.cifar10', folder)
    x = torch.randn(2, 3, 32, 32)
    for name in ('skipnet_resnet38_cifar.cifar10', 'hf-hub:timm-skipnet/skipnet_resnet38_cifar.cifar10',
                 f'local-dir:{folder}'):
        five = timm.create_model(name, pretrained=True, num_classes=5).eval()
        assert five(x).shape == (2, 5)
        assert torch.equal(five.forward_features(x), src.forward_features(x)), name
        gray = timm.create_model(name, pretrained=True, in_chans=1).eval()
        assert torch.allclose(gray.conv1.weight, src.conv1.weight.sum(1, keepdim=True)), name
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    feats = timm.create_model('skipnet_resnet38_cifar.cifar10', pretrained=True, features_only=True).eval()
    assert torch.equal(feats(x)[-1], src.forward_intermediates(x)[1][-1])


def test_backbone_tag_initialises_from_timms_resnet_with_open_gates(hub_cache, tmp_path):
    plain = timm.create_model('resnet18').eval()
    randomize_bn(plain)
    export = tmp_path / 'resnet18'
    save_for_hf(plain, str(export), safe_serialization=True)
    os.remove(export / 'config.json')  # timm's own repo layout is irrelevant here: only the weights are fetched
    put_in_cache(hub_cache, 'timm/resnet18.a1_in1k', export)
    skip = timm.create_model('skipnet_resnet18.a1_in1k', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(skip(x), plain(x))
    assert skip.forward_with_gates(x).actions.min() == 1
    ten = timm.create_model('skipnet_resnet18.a1_in1k', pretrained=True, num_classes=10, in_chans=1).eval()
    assert ten(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_export_run_writes_a_folder_timm_reloads_and_a_card_with_measurements(tmp_path, trained_skipnet38):
    src, folder = trained_skipnet38
    summary = dict(num_images=10, top1=50.0, macs_full=83_280_512, macs_mean=6e7, gmacs_full=0.0833,
                   gmacs_mean=0.06, macs_reduction_pct=28.0, computation_percentage=70.0, executed_blocks_mean=12.6,
                   num_blocks=18, gate_execution_rates=[0.5] * 17)
    (tmp_path / 'eval.json').write_text(json.dumps(summary))
    out = export_run(folder, str(tmp_path / 'again'), repo_id='timm-skipnet/skipnet_resnet38_cifar.cifar10',
                     eval_json=str(tmp_path / 'eval.json'))
    card = open(os.path.join(out, 'README.md')).read()
    assert 'import timm_skipnet' in card and 'hf-hub:timm-skipnet/skipnet_resnet38_cifar.cifar10' in card
    assert '28.0 % fewer' in card and '| top-1 (%) | 50.00 |' in card
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(x), src(x))
    assert check_folder(out)['architecture'] == 'skipnet_resnet38_cifar'


def test_publish_refuses_incomplete_or_foreign_folders(tmp_path, trained_skipnet38):
    _, folder = trained_skipnet38
    with pytest.raises(FileNotFoundError, match='timm-skipnet export'):
        publish(str(tmp_path), 'timm-skipnet/x')
    bad = tmp_path / 'bad'
    shutil.copytree(folder, bad)
    config = json.loads((bad / 'config.json').read_text())
    config['pretrained_cfg']['gate_type'] = 'rnn'
    (bad / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='gate_type'):
        publish(str(bad), 'timm-skipnet/x')


def test_publish_uploads_the_folder_with_huggingface_hub(monkeypatch, trained_skipnet38):
    _, folder = trained_skipnet38
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **kw: calls.append(('create',
                                                                                                         repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', lambda self, **kw: calls.append(('upload', kw)) or
                        'https://huggingface.co/timm-skipnet/x/commit/1')
    publish(folder, 'timm-skipnet/x')
    assert calls[0] == ('create', 'timm-skipnet/x')
    assert calls[1][1]['folder_path'] == folder and calls[1][1]['repo_id'] == 'timm-skipnet/x'


def test_hub_configs_folders_match_the_registered_cfgs(tmp_path):
    root = os.path.join(ROOT, 'hub_configs')
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    assert folders, 'hub_configs/ must hold at least one variant'
    for name in folders:
        assert timm.get_pretrained_cfg(name) is not None, f'{name} is not a registered arch.tag'
        shipped = json.loads(open(os.path.join(root, name, 'config.json')).read())
        fresh = json.loads(open(write_hub_config(name, str(tmp_path / name))).read())
        assert shipped['architecture'] == fresh['architecture']
        assert shipped['pretrained_cfg'] == fresh['pretrained_cfg'], name
        assert shipped['model_args'] == fresh['model_args'], name
        assert os.path.exists(os.path.join(root, name, 'README.md'))


def test_a_converted_timm_resnet_round_trips_through_a_hub_folder(tmp_path):
    model = timm.create_model('skipnet_from_timm', base_model='resnet18d', num_classes=4, gate_type='ff2').eval()
    randomize_bn(model)
    randomize_gates(model)
    folder = export_folder(model, str(tmp_path / 'converted'),
                           dict(base_model='resnet18d', num_classes=4, gate_type='ff2'))
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(reloaded(x), model(x))
    assert type(reloaded.gates).__name__ == 'FeedForwardGates'


def test_publish_command_passes_token_and_private_to_the_hub(monkeypatch, trained_skipnet38):
    from timm_skipnet import cli
    _, folder = trained_skipnet38
    calls = []
    init = huggingface_hub.HfApi.__init__

    def recording_init(self, *args, **kwargs):
        calls.append(('init', kwargs.get('token')))
        init(self, *args, **kwargs)
    monkeypatch.setattr(huggingface_hub.HfApi, '__init__', recording_init)
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo',
                        lambda self, repo_id, **kw: calls.append(('create', repo_id, kw.get('private'))))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', lambda self, **kw: calls.append(
        ('upload', kw['repo_id'], kw['folder_path'])) or 'https://huggingface.co/timm-skipnet/x/commit/1')
    cli.main(['publish', folder, 'timm-skipnet/x', '--private', '--token', 'hf_secret'])
    assert calls == [('init', 'hf_secret'), ('create', 'timm-skipnet/x', True), ('upload', 'timm-skipnet/x', folder)]
    calls.clear()
    cli.main(['publish', folder, 'timm-skipnet/x'])  # defaults: the logged-in token, a public repo
    assert calls[:2] == [('init', None), ('create', 'timm-skipnet/x', False)]


def test_greedy_thresholds_survive_export_command_local_dir_and_eval(tmp_path, cifar10_dir, capsys):
    from timm_skipnet import cli
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10).eval()
    randomize_bn(model)
    randomize_gates(model, scale=0.5)
    k = model.num_gated_blocks
    model.set_gate_thresholds([0.0, 1.0] + [0.3 + 0.4 * j / k for j in range(k - 2)])  # forced open, shut, graded
    run = export_folder(model, str(tmp_path / 'run_model'), dict(num_classes=10, gate_type='rnn'))
    out = tmp_path / 'skipnet_resnet38_cifar.thr'
    cli.main(['export', run, '--output', str(out), '--repo-id', 'timm-skipnet/skipnet_resnet38_cifar.thr'])
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert torch.equal(reloaded.gate_threshold_logits, model.gate_threshold_logits)
    cli.main(['eval', '--model', f'local-dir:{out}', '--dataset', cifar10_dir, '--max-images', '32',
              '--output', str(tmp_path / 'eval.json')])
    summary = json.loads((tmp_path / 'eval.json').read_text())
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 32, limit=32)
    (x, _, _), = list(loader)
    with torch.no_grad():
        actions = model.forward_with_gates(x).actions  # the thresholded source model, decided here
    assert actions[:, 0].min() == 1 and actions[:, 1].max() == 0 and 0 < actions[:, 2:].mean() < 1
    assert [round(r * 32) for r in summary['gate_execution_rates']] == actions.sum(0).long().tolist()
    default = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    default.set_gate_thresholds(0.5)
    with torch.no_grad():
        assert not torch.equal(default.forward_with_gates(x).actions, actions)  # the thresholds are what decided
