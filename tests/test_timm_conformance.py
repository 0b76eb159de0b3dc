"""Every skipnet_* model behaves like a native timm model (checks ported from timm's tests/test_models.py)."""
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

MODELS = sorted(timm.list_models('skipnet_*'))
DEEP = {'skipnet_resnet101', 'skipnet_resnet152', 'skipnet_resnet110_cifar', 'skipnet_resnet152_cifar'}


def _size(name, cfg_size):
    return cfg_size if name.endswith('_cifar') else 64


def test_registry_lists_every_architecture_with_the_skipnet_prefix():
    expected = {f'skipnet_resnet{d}' for d in (18, 34, 50, 101, 152)} | {
        f'skipnet_resnet{d}_cifar' for d in (38, 74, 110, 152)} | {'skipnet_from_timm'}
    assert set(MODELS) == expected
    assert set(timm.list_models(module='skipnet')) == expected  # module is not 'resnet'
    assert 'resnet50' in timm.list_models(module='resnet')  # timm's own entries untouched
    assert timm.get_pretrained_cfg('resnet50').hf_hub_id == 'timm/resnet50.a1_in1k'


@pytest.mark.parametrize('name', MODELS)
def test_forward_batch_one_and_two_give_finite_logits(name):
    model = timm.create_model(name).eval()
    s = _size(name, model.pretrained_cfg['input_size'][-1])
    for bs in (1, 2):
        out = model(torch.randn(bs, 3, s, s))
        assert out.shape == (bs, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', [m for m in MODELS if m not in DEEP])
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    s = 32 if name.endswith('_cifar') else 64
    out = model(torch.randn(2, 3, s, s))
    assert out.shape[-1] == 42
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg_matches_the_model(name):
    # the deep models are only read here: built on the meta device, nothing is initialised
    model = timm.create_model(name, **(dict(device='meta') if name in DEEP else {})).eval()
    cfg = model.pretrained_cfg
    for key in ('input_size', 'pool_size', 'first_conv', 'classifier', 'mean', 'std', 'paper_ids'):
        assert cfg.get(key), key
    assert cfg['paper_ids'] == 'arXiv:1711.09485'
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] + '.weight' in sd
    if name in DEEP:
        return
    feats = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert feats.shape[1] == model.num_features and tuple(feats.shape[-2:]) == tuple(cfg['pool_size'])
    assert model.forward_head(feats, pre_logits=True).shape[-1] == model.head_hidden_size


@pytest.mark.parametrize('name', ['skipnet_resnet38_cifar', 'skipnet_resnet18', 'skipnet_resnet50'])
def test_num_classes_in_chans_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=7, in_chans=1).eval()
    s = _size(name, 32)
    assert model(torch.randn(2, 1, s, s)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, s, s)).shape == (2, model.num_features)
    model.reset_classifier(0, '')
    assert model(torch.randn(2, 1, s, s)).dim() == 4
    unpooled = timm.create_model(name, num_classes=0, global_pool='', in_chans=1).eval()
    assert unpooled(torch.randn(1, 1, s, s)).dim() == 4


@pytest.mark.parametrize('name', ['skipnet_resnet38_cifar', 'skipnet_resnet18', 'skipnet_resnet50'])
def test_features_only_and_forward_intermediates_follow_the_gates(name):
    from tests.helpers import randomize_bn, randomize_gates
    s = _size(name, 32)
    x = torch.randn(2, 3, s, s)
    model = timm.create_model(name).eval()
    randomize_bn(model)  # timm zero-initialises each block's last BatchNorm: a fresh block adds nothing, skipped or not
    randomize_gates(model)
    actions = model.forward_with_gates(x).actions
    assert (actions == 0).any() and (actions == 1).any()  # some blocks skipped: features that ignored the gates differ
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.feature_info)
    assert torch.allclose(final, model.forward_features(x))
    model.set_gate_policy('open')
    assert not torch.allclose(model.forward_intermediates(x)[1][-1], inter[-1])  # so the gates change the features
    model.set_gate_policy('auto')
    feat_model = timm.create_model(name, features_only=True).eval()
    head = {model.pretrained_cfg['classifier'] + '.weight', model.pretrained_cfg['classifier'] + '.bias'}
    missing, unexpected = feat_model.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) <= head  # every trunk and gate tensor lands; only the classifier has no home
    feats = feat_model(x)
    assert [f.shape[1] for f in feats] == feat_model.feature_info.channels()
    for a, b in zip(feats, inter):
        assert torch.allclose(a, b)
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    assert len(sub(x)) == 2


@pytest.mark.parametrize('name', ['skipnet_resnet38_cifar', 'skipnet_resnet18'])
def test_grad_checkpointing_gives_the_same_outputs_and_grads(name):
    s = _size(name, 32)
    x = torch.randn(2, 3, s, s)
    model = timm.create_model(name).train()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out2 = model(x)
    out2.sum().backward()
    assert torch.allclose(out, out2, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-5), n


@pytest.mark.slow
def test_torch_compile_dense_matches_eager():
    from tests.helpers import randomize_gates
    model = timm.create_model('skipnet_resnet38_cifar', execution='dense').eval()
    randomize_gates(model)
    x = torch.randn(4, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', ['skipnet_resnet38_cifar', 'skipnet_resnet50'])
def test_data_config_and_transform_resolve(name):
    model = timm.create_model(name)
    cfg = resolve_model_data_config(model)
    transform = create_transform(**cfg, is_training=False)
    img = Image.new('RGB', (300, 240), (120, 30, 200))
    x = transform(img)
    assert tuple(x.shape) == tuple(cfg['input_size'])
