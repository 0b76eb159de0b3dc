"""Checkpoints of the original SkipNet code convert to our models with identical outputs and gate decisions.

The released files are offline (reference §6.1), so the tests build them: an independent minimal re-implementation of
the original forward (its module names, its merge rule, its gate modules), randomised, saved as the original did
(``module.`` keys, duplicate ``group*_ds*``, no ``num_batches_tracked``, legacy non-zip pickle).
"""
import json
import math
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_skipnet import cli
from timm_skipnet.original import (
    _model_from_arch,
    convert_original_checkpoint,
    convert_original_state_dict,
    load_original_checkpoint,
)

pytestmark = pytest.mark.xdist_group('original')  # the module's fixtures are computed once

# ---- minimal re-implementation of ucbdrive/skipnet (eval mode) ----------------------------------------------------


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _RNNControl(nn.Module):
    """The original ``RNNGate``: one LSTM step per gate, ``proj`` a Linear (CIFAR) or a 1x1 Conv2d (ImageNet)."""

    def __init__(self, proj_conv: bool):
        super().__init__()
        self.rnn = nn.LSTM(10, 10)
        self.proj = nn.Conv2d(10, 1, 1) if proj_conv else nn.Linear(10, 1)

    def forward(self, feature, hidden):
        b = feature.shape[0]
        out, hidden = self.rnn(feature.view(1, b, -1), hidden)
        h = out[0]
        logit = self.proj(h.view(b, 10, 1, 1)) if isinstance(self.proj, nn.Conv2d) else self.proj(h)
        return torch.sigmoid(logit.view(b)), hidden


class _FFGateI(nn.Module):
    """The original ``FeedforwardGateI``: 2 logits, p_exec = softmax[:, 1]."""

    def __init__(self, channel, pool_size):
        super().__init__()
        self.maxpool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(channel, channel, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channel)
        self.conv2 = nn.Conv2d(channel, channel, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channel)
        self.avg_layer = nn.AvgPool2d(math.floor(math.floor(pool_size / 2) / 2 + 0.5))
        self.linear_layer = nn.Conv2d(channel, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.maxpool(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        logits = self.linear_layer(self.avg_layer(x)).view(x.shape[0], 2)
        return F.softmax(logits, 1)[:, 1]


class _FFGateII(nn.Module):
    """The original ``FeedforwardGateII``: one stride-2 conv, 2 logits, p_exec = softmax[:, 1]."""

    def __init__(self, channel, pool_size):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, channel, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channel)
        self.avg_layer = nn.AvgPool2d(math.floor(pool_size / 2 + 0.5))
        self.linear_layer = nn.Conv2d(channel, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        logits = self.linear_layer(self.avg_layer(x)).view(x.shape[0], 2)
        return F.softmax(logits, 1)[:, 1]


class _OriginalSkipNet(nn.Module):
    """``ResNetRecurrentGateSP`` / ``ResNetFeedForwardSP`` (CIFAR) and ``RecurrentGatedResNet`` (ImageNet)."""

    def __init__(self, block, layers, num_classes=10, gate='rnn', imagenet=False, pools=(32, 16, 8)):
        super().__init__()
        self.layers, self.gate, self.imagenet = layers, gate, imagenet
        inplanes = 64 if imagenet else 16
        widths = (64, 128, 256, 512) if imagenet else (16, 32, 64)
        self.conv1 = nn.Conv2d(3, inplanes, 7, 2, 3, bias=False) if imagenet else nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for g, (n, planes, pool) in enumerate(zip(layers, widths, pools), 1):
            for i in range(n):
                stride = 2 if g > 1 and i == 0 else 1
                out = planes * block.expansion
                ds = None
                if stride != 1 or inplanes != out:
                    ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                layer = block(inplanes, planes, stride, ds)
                inplanes = out
                gate_layer = nn.Sequential(nn.AvgPool2d(pool), nn.Conv2d(out, 10, 1)) if gate == 'rnn' else \
                    _FFGateI(out, pool) if gate == 'ff1' else _FFGateII(out, pool)
                setattr(self, f'group{g}_ds{i}', ds)  # the same module object as layer.downsample
                setattr(self, f'group{g}_layer{i}', layer)
                setattr(self, f'group{g}_gate{i}', gate_layer)
        if gate == 'rnn':
            self.control = _RNNControl(proj_conv=imagenet)
        self.avgpool = nn.AvgPool2d(pools[-1])
        self.fc = nn.Linear(inplanes, num_classes)

    def _decide(self, gate_layer, x, hidden):
        if self.gate == 'rnn':
            p, hidden = self.control(gate_layer(x), hidden)
        else:
            p = gate_layer(x)
        return (p > 0.5).float(), hidden

    def forward(self, x):
        """Logits and the (B, N-1) execution masks, the merge of reference §1.4."""
        x = F.relu(self.bn1(self.conv1(x)))
        if self.imagenet:
            x = self.maxpool(x)
        b = x.shape[0]
        hidden = (x.new_zeros(1, b, 10), x.new_zeros(1, b, 10))
        x = self.group1_layer0(x)
        mask, hidden = self._decide(self.group1_gate0, x, hidden)
        masks, prev = [mask], x
        for g, n in enumerate(self.layers, 1):
            for i in range(1 if g == 1 else 0, n):
                ds = getattr(self, f'group{g}_ds{i}')
                if ds is not None:
                    prev = ds(prev)
                x = getattr(self, f'group{g}_layer{i}')(x)
                m = mask.view(b, 1, 1, 1)
                prev = x = m * x + (1 - m) * prev
                mask, hidden = self._decide(getattr(self, f'group{g}_gate{i}'), x, hidden)
                masks.append(mask)
        del masks[-1]  # the last block's gate decides nothing
        return self.fc(self.avgpool(x).flatten(1)), torch.stack(masks, 1)


def _randomize(model, x, seed):
    """Random BN statistics and gate weights; then each gate, in network order, is scaled and centred on the batch
    ``x`` so that it opens for some images and closes for others (a real mix, with margins far above rounding)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda shape, s=1.0: torch.randn(shape, generator=g) * s
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(r(m.running_mean.shape, 0.1))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(r(m.bias.shape, 0.1))
        if model.gate == 'rnn':
            for name, p in model.control.named_parameters():
                p.copy_(r(p.shape, 0.0 if name == 'proj.bias' else 1.0 if name == 'proj.weight' else 0.5))
        gates = [getattr(model, f'group{g}_gate{i}') for g, n in enumerate(model.layers, 1) for i in range(n)]
        model.eval()
        for gate in gates[:-1]:
            proj = gate[1] if model.gate == 'rnn' else gate.linear_layer
            feats = []
            hook = proj.register_forward_hook(lambda m, inp, out, feats=feats: feats.append(inp[0].flatten(1)))
            model(x)
            hook.remove()
            f = feats[0]
            c = f.shape[1]
            if model.gate == 'rnn':  # embeddings of per-image deviations, std ~3: the LSTM state differs per image
                w = r((10, c), 3 / math.sqrt(c)) / (f.std(0) + 1e-3)
                proj.weight.copy_(w.view(10, c, 1, 1))
                proj.bias.copy_(-(w @ f.mean(0)))
            else:  # 2 logits whose difference splits the batch in the middle
                w0, direction = r(c, 1 / math.sqrt(c)), r(c, 1 / math.sqrt(c)) / (f.std(0) + 1e-3)
                d = (f @ direction).sort().values
                mid = d[len(d) // 2 - 1: len(d) // 2 + 1].mean()
                b0 = r(()).item()
                proj.weight.copy_(torch.stack([w0, w0 + direction]).view(2, c, 1, 1))
                proj.bias.copy_(torch.tensor([b0, b0 - mid]))
    return model


def _original_checkpoint(model, arch=None):
    """The file layout of the released checkpoints: DataParallel keys, no num_batches_tracked."""
    sd = {'module.' + k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    ckpt = {'iter': 64000, 'state_dict': sd, 'best_prec1': 92.5}
    if arch is not None:
        ckpt['arch'] = arch
    return ckpt


def _save_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return str(path)


def _inputs(n, size, seed=1):
    """Images with different brightness and contrast, so gate decisions differ between images."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(n, 1, 1, 1, generator=g)
    return torch.randn(n, 3, size, size, generator=g) * scale + shift


def _assert_reproduces(model, ref_logits, ref_masks, x):
    model.eval()
    for execution in ('sparse', 'dense'):
        model.set_execution(execution)
        with torch.no_grad():
            trace = model.forward_with_gates(x)
        torch.testing.assert_close(trace.logits, ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(trace.actions, ref_masks), execution


def _assert_mixed(masks):
    """Some gates closed, some open, and at least one gate that splits the batch (exercises sparse gather)."""
    assert 0 < masks.mean() < 1
    per_gate = masks.mean(0)
    assert ((per_gate > 0) & (per_gate < 1)).any()


@pytest.fixture(scope='module')
def cifar_rnn(tmp_path_factory):
    """An original CIFAR-10 SkipNet-38 (RNN gate) as a legacy ``.pth.tar``, its reference outputs and inputs."""
    torch.manual_seed(0)
    x = _inputs(8, 32)
    ref = _randomize(_OriginalSkipNet(_BasicBlock, (6, 6, 6)), x, seed=0)
    with torch.no_grad():
        logits, masks = ref(x)
    ckpt = _original_checkpoint(ref, 'cifar10_rnn_gate_38')
    assert len(ckpt['state_dict']) == 249  # the released R-38 files' key count (reference §6.3)
    path = _save_legacy(ckpt, tmp_path_factory.mktemp('orig') / 'resnet-38-rnn-sp-cifar10.pth.tar')
    return dict(path=path, x=x, logits=logits, masks=masks)


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_converted_cifar_rnn_checkpoint_reproduces_original_forward(cifar_rnn):
    _assert_mixed(cifar_rnn['masks'])
    state_dict, meta = load_original_checkpoint(cifar_rnn['path'])
    assert meta['arch'] == 'cifar10_rnn_gate_38' and meta['best_prec1'] == 92.5 and meta['iter'] == 64000
    assert meta['model_name'] == 'skipnet_resnet38_cifar'
    assert meta['model_args'] == dict(num_classes=10, gate_type='rnn')
    model = timm.create_model(meta['model_name'], **meta['model_args'])
    model.load_state_dict(convert_original_state_dict(state_dict, model), strict=True)
    _assert_reproduces(model, cifar_rnn['logits'], cifar_rnn['masks'], cifar_rnn['x'])


def test_converted_cifar_ff1_checkpoint_reproduces_original_forward(tmp_path):
    x = _inputs(8, 32)
    ref = _randomize(_OriginalSkipNet(_BasicBlock, (6, 6, 6), gate='ff1'), x, seed=1)
    with torch.no_grad():
        logits, masks = ref(x)
    _assert_mixed(masks)
    path = _save_legacy(_original_checkpoint(ref, 'cifar10_feedforward_38'), tmp_path / 'ff.pth.tar')
    state_dict, meta = load_original_checkpoint(path)
    assert meta['model_name'] == 'skipnet_resnet38_cifar' and meta['model_args']['gate_type'] == 'ff1'
    model = timm.create_model('skipnet_resnet38_cifar', gate_type='ff1')
    model.load_state_dict(convert_original_state_dict(state_dict, model), strict=True)
    _assert_reproduces(model, logits, masks, x)


def test_converted_cifar_ffgate2_checkpoint_without_arch_is_recognised_from_its_keys_and_reproduces(tmp_path):
    x = _inputs(8, 32)
    ref = _randomize(_OriginalSkipNet(_BasicBlock, (6, 6, 6), gate='ff2'), x, seed=3)
    with torch.no_grad():
        logits, masks = ref(x)
    _assert_mixed(masks)
    path = _save_legacy(_original_checkpoint(ref), tmp_path / 'ff2.pth.tar')  # no arch: FFGate-II from its keys
    _, meta = load_original_checkpoint(path)
    assert meta['inferred_from'] == 'keys' and meta['model_name'] == 'skipnet_resnet38_cifar'
    assert meta['model_args'] == dict(num_classes=10, gate_type='ff2')
    folder = str(tmp_path / 'converted')
    cli.main(['convert-original', path, '--output', folder])
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert model.gates.gates[0].conv2 is None  # the one-conv gate
    _assert_reproduces(model, logits, masks, x)


@pytest.mark.slow
def test_converted_imagenet_rnn_checkpoint_reproduces_original_forward(tmp_path):
    # 64 px: spatial sizes 16/8/4/2 after the stem, so the original's fixed pools are global pools as at 224 px
    x = _inputs(4, 64)
    ref = _randomize(_OriginalSkipNet(_Bottleneck, (3, 4, 6, 3), num_classes=10, imagenet=True,
                                      pools=(16, 8, 4, 2)), x, seed=2)
    assert ref.control.proj.weight.shape == (1, 10, 1, 1)
    with torch.no_grad():
        logits, masks = ref(x)
    _assert_mixed(masks)
    ckpt = _original_checkpoint(ref)
    assert len(ckpt['state_dict']) == 325  # the released R-50 file's key count (reference §6.3)
    path = _save_legacy(ckpt, tmp_path / 'resnet-50-rnn-sp-imagenet.pth.tar')
    _, meta = load_original_checkpoint(path)  # no arch: the model is chosen from the keys
    assert meta['inferred_from'] == 'keys' and meta['model_name'] == 'skipnet_resnet50'
    assert meta['model_args'] == dict(num_classes=10, gate_type='rnn')
    folder = convert_original_checkpoint(path, str(tmp_path / 'converted'))
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    # the original's ImageNet evaluation transform: resize 256, centre crop 224, bilinear
    assert model.pretrained_cfg['crop_pct'] == 0.875 and model.pretrained_cfg['interpolation'] == 'bilinear'
    _assert_reproduces(model, logits, masks, x)
    # the HRL model of the same depth saves the same keys (reference 1.3): its arch name picks the same model
    rl = _save_legacy(_original_checkpoint(ref, 'imagenet_rnn_gate_rl_50'), tmp_path / 'resnet-50-rnn-rl.pth.tar')
    _, meta = load_original_checkpoint(rl)
    assert meta['inferred_from'] == 'arch' and meta['model_name'] == 'skipnet_resnet50'
    cli.main(['convert-original', rl, '--output', str(tmp_path / 'converted_rl')])
    _assert_reproduces(timm.create_model(f"local-dir:{tmp_path / 'converted_rl'}", pretrained=True), logits, masks, x)


@pytest.mark.parametrize('arch, expected', [
    ('cifar10_rnn_gate_38', ('skipnet_resnet38_cifar', 'rnn')),
    ('cifar10_rnn_gate_rl_110', ('skipnet_resnet110_cifar', 'rnn')),
    ('cifar100_rnn_gate_152', ('skipnet_resnet152_cifar', 'rnn')),
    ('imagenet_rnn_gate_101', ('skipnet_resnet101', 'rnn')),
    ('imagenet_rnn_gate_rl_50', ('skipnet_resnet50', 'rnn')),
    ('cifar10_feedforward_38', ('skipnet_resnet38_cifar', 'ff1')),
    ('cifar100_feeforward_38', ('skipnet_resnet38_cifar', 'ff1')),  # sic, as in the original
    ('cifar10_feedfoward_rl_38', ('skipnet_resnet38_cifar', 'ff1')),  # sic
    ('cifar100_feedford_rl_38', ('skipnet_resnet38_cifar', 'ff1')),  # sic
    ('cifar10_feedforward_74', ('skipnet_resnet74_cifar', 'ff1')),
    ('cifar10_feedforward_110', ('skipnet_resnet110_cifar', 'ff2')),
    ('something_else', None),
])
def test_original_arch_names_map_to_our_model_and_gate_type(arch, expected):
    assert _model_from_arch(arch) == expected


def test_plain_resnet_baseline_or_undefined_depth_arch_is_refused():
    with pytest.raises(ValueError, match='plain ResNet baseline'):
        _model_from_arch('cifar10_resnet_38')
    with pytest.raises(ValueError, match='skipnet_resnet20_cifar, which timm-skipnet does not define'):
        _model_from_arch('cifar10_rnn_gate_20')


def test_checkpoint_of_wrong_depth_is_refused_with_found_and_expected_layout(cifar_rnn):
    state_dict, _ = load_original_checkpoint(cifar_rnn['path'])
    expected = r'found: .*\[6, 6, 6\](.|\n)*expected: skipnet_resnet74_cifar.*\[12, 12, 12\]'
    with pytest.raises(ValueError, match=expected):
        convert_original_state_dict(state_dict, timm.create_model('skipnet_resnet74_cifar'))
    with pytest.raises(ValueError, match='model keys the checkpoint lacks: layer1.6.conv1.weight'):
        timm.create_model('skipnet_resnet74_cifar', pretrained=True,
                          pretrained_cfg_overlay=dict(file=cifar_rnn['path']))


def test_checkpoint_with_wrong_gate_type_is_refused(cifar_rnn):
    state_dict, _ = load_original_checkpoint(cifar_rnn['path'])
    with pytest.raises(ValueError, match=r"gate_type='rnn'(.|\n)*gate_type='ff1'"):
        convert_original_state_dict(state_dict, timm.create_model('skipnet_resnet38_cifar', gate_type='ff1'))


def test_mislabelled_arch_is_refused_naming_the_arch(cifar_rnn, tmp_path):
    ckpt = torch.load(cifar_rnn['path'], map_location='cpu', weights_only=True)
    ckpt['arch'] = 'cifar10_rnn_gate_110'
    path = _save_legacy(ckpt, tmp_path / 'mislabelled.pth.tar')
    with pytest.raises(ValueError, match="chosen from its arch 'cifar10_rnn_gate_110'"):
        convert_original_checkpoint(path, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_downsample_duplicate_that_differs_is_refused(cifar_rnn):
    state_dict, _ = load_original_checkpoint(cifar_rnn['path'])
    state_dict = dict(state_dict, **{'group2_ds0.0.weight': state_dict['group2_ds0.0.weight'] + 1})
    with pytest.raises(ValueError, match='should duplicate group2_layer0.downsample.0.weight'):
        convert_original_state_dict(state_dict, timm.create_model('skipnet_resnet38_cifar'))


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)


class _Payload:
    """Stands for any non-tensor object in a pickle; unpickling it would call a function."""

    def __reduce__(self):
        return _record_unpickling, ()


def test_checkpoint_with_pickled_objects_is_refused_without_running_them(cifar_rnn, tmp_path):
    ckpt = torch.load(cifar_rnn['path'], map_location='cpu', weights_only=True)
    ckpt['args'] = _Payload()
    path = _save_legacy(ckpt, tmp_path / 'payload.pth.tar')
    with pytest.raises(ValueError, match='non-tensor Python objects.*refuses to unpickle'):
        load_original_checkpoint(path)
    with pytest.raises(ValueError, match='non-tensor'):
        convert_original_checkpoint(path, str(tmp_path / 'out'))
    assert not _UNPICKLED


def test_cli_writes_folder_that_timm_reloads_with_identical_outputs(cifar_rnn, tmp_path, capsys):
    folder = str(tmp_path / 'skipnet_resnet38_cifar.orig')
    cli.main(['convert-original', cifar_rnn['path'], '--output', folder])
    assert 'skipnet_resnet38_cifar' in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    assert config['architecture'] == 'skipnet_resnet38_cifar'
    assert config['model_args'].items() >= dict(num_classes=10, gate_type='rnn').items()
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    _assert_reproduces(model, cifar_rnn['logits'], cifar_rnn['masks'], cifar_rnn['x'])


def test_timm_file_overlay_loads_original_checkpoint_through_filter_fn(cifar_rnn):
    """timm reads the legacy pickle with weights_only=True; checkpoint_filter_fn hands it to the converter."""
    model = timm.create_model('skipnet_resnet38_cifar', pretrained=True,
                              pretrained_cfg_overlay=dict(file=cifar_rnn['path']))
    _assert_reproduces(model, cifar_rnn['logits'], cifar_rnn['masks'], cifar_rnn['x'])
