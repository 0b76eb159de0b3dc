"""SkipNet semantics: which blocks are gated, what a gate reads, the merge rule, sparse == dense, conversion."""
import copy

import pytest
import timm
import torch

from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet import convert_to_skipnet
from timm_skipnet.skipnet import _shortcut


@pytest.mark.parametrize('name,gated', [('skipnet_resnet38_cifar', 17), ('skipnet_resnet74_cifar', 35),
                                        ('skipnet_resnet110_cifar', 53), ('skipnet_resnet152_cifar', 74),
                                        ('skipnet_resnet18', 7), ('skipnet_resnet34', 15), ('skipnet_resnet50', 15),
                                        ('skipnet_resnet101', 32), ('skipnet_resnet152', 49)])
def test_every_block_but_the_first_is_gated(name, gated):
    model = timm.create_model(name)
    assert model.num_gated_blocks == gated and len(model.blocks()) == gated + 1


def test_cifar_backbone_is_the_original_6n_plus_2_resnet():
    model = timm.create_model('skipnet_resnet38_cifar')
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert [model.feature_info[i]['num_chs'] for i in range(1, 4)] == [16, 32, 64]
    # RNN-gate SkipNet-38 of the original has 571,913 parameters incl. one unused gate projection (64*10+10)
    assert sum(p.numel() for p in model.parameters()) == 571_913 - 650


def test_gate_for_block_k_reads_block_k_input():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_gates(model)
    block_inputs, gate_inputs = {}, {}
    for k, block in enumerate(model.blocks()):
        block.register_forward_pre_hook(lambda m, a, k=k: block_inputs.setdefault(k, a[0].clone()))
    for j, embed in enumerate(model.gates.embed):
        embed.register_forward_pre_hook(lambda m, a, j=j: gate_inputs.setdefault(j, a[0].clone()))
    model(torch.randn(2, 3, 32, 32), gate_policy='open', return_trace=True)  # open: every block sees its input
    for j in range(model.num_gated_blocks):
        assert torch.allclose(gate_inputs[j], block_inputs[j + 1].mean((2, 3))), j


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1', 'ff2'])
def test_merge_is_gate_times_block_plus_complement_times_shortcut(gate_type):
    model = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
    randomize_bn(model)
    randomize_gates(model)
    x = torch.randn(16, 3, 32, 32)
    trace = model.forward_with_gates(x)
    assert 0 < trace.actions.mean() < 1, 'the test needs a mix of executed and skipped blocks'
    assert (trace.actions[:, [5, 11]] == 0).any()  # a stride-2 stage entry is skipped: projection-only output
    with torch.no_grad():
        h = model.maxpool(model._forward_stem(x))
        for k, block in enumerate(model.blocks()):
            if k == 0:
                h = block(h)
                continue
            a = trace.actions[:, k - 1].view(-1, 1, 1, 1)
            h = a * block(h) + (1 - a) * _shortcut(block, h)
        expected = model.forward_head(h)
    assert torch.allclose(trace.logits, expected, atol=1e-5)


@pytest.mark.parametrize('name,size', [('skipnet_resnet38_cifar', 32),
                                       pytest.param('skipnet_resnet50', 64, marks=pytest.mark.slow)])
@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
@pytest.mark.parametrize('batch', [1, 5])
def test_sparse_and_dense_execution_agree_in_eval(name, size, gate_type, batch):
    model = timm.create_model(name, gate_type=gate_type).eval()
    randomize_bn(model)
    randomize_gates(model)
    x = torch.randn(batch, 3, size, size)
    model.set_execution('sparse')
    sparse = model.forward_with_gates(x)
    model.set_execution('dense')
    dense = model.forward_with_gates(x)
    assert torch.equal(sparse.actions, dense.actions)
    assert torch.allclose(sparse.logits, dense.logits, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # the inference hot path: greedy, untraced, scattering in place
        x_before = x.clone()
        model.set_execution('sparse')
        fast = model(x)
        model.set_execution('dense')
        assert torch.allclose(fast, model(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(x, x_before)
    for policy in ('sample', 'open'):
        torch.manual_seed(3)
        d = model(x, gate_policy=policy)
        model.set_execution('sparse')
        torch.manual_seed(3)
        s = model(x, gate_policy=policy)
        model.set_execution('dense')
        assert torch.allclose(s, d, rtol=1e-4, atol=1e-4), policy


def test_inference_threshold_is_strictly_greater_than_one_half():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    model.gates.set_constant_probability(0.5)
    assert model.forward_with_gates(torch.randn(2, 3, 32, 32)).actions.sum() == 0
    model.gates.set_constant_probability(0.5001)
    assert model.forward_with_gates(torch.randn(2, 3, 32, 32)).actions.min() == 1


def test_sparse_execution_is_refused_in_training_mode():
    model = timm.create_model('skipnet_resnet38_cifar', execution='sparse').train()
    with pytest.raises(RuntimeError, match='eval mode'):
        model(torch.randn(2, 3, 32, 32))


def test_straight_through_forward_is_hard_and_gradient_reaches_the_gates():
    model = timm.create_model('skipnet_resnet38_cifar').train()
    randomize_gates(model)
    trace = model(torch.randn(4, 3, 32, 32), return_trace=True)
    assert set(trace.actions.unique().tolist()) <= {0.0, 1.0}
    trace.logits.logsumexp(1).sum().backward()
    assert model.gates.head.weight.grad.abs().sum() > 0
    assert model.gates.embed[3].weight.grad.abs().sum() > 0


def test_skipnet_resnet50_with_open_gates_equals_timm_resnet50():
    plain = timm.create_model('resnet50').eval()
    randomize_bn(plain)
    skip = timm.create_model('skipnet_resnet50', pretrained=True,
                             pretrained_cfg_overlay=dict(state_dict=plain.state_dict())).eval()
    x = torch.randn(2, 3, 64, 64)
    for execution in ('sparse', 'dense'):
        skip.set_execution(execution)
        assert torch.equal(skip(x), plain(x))
        assert torch.equal(skip(x, gate_policy='open'), plain(x))


FAMILIES = ['resnet18', 'resnet50d', 'seresnext26d_32x4d', 'resnext50_32x4d',
            'ecaresnet26t', 'res2net50_14w_8s', 'resnest14d', 'skresnet18', 'resnetblur18', 'resnet10t']


@pytest.mark.parametrize('base', FAMILIES)
def test_any_timm_resnet_converts_and_open_gates_reproduce_it_exactly(base):
    model = timm.create_model(base).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    skip = convert_to_skipnet(copy.deepcopy(model))
    assert skip.num_gated_blocks == len(skip.blocks()) - 1
    assert torch.equal(skip(x), expected)
    skip.train()
    skip(x).sum().backward()
    assert all(p.grad is not None for p in skip.parameters())


@pytest.mark.parametrize('base', ['resnetv2_50', 'resnet51q', 'legacy_seresnet18',
                                  'regnetx_002'])
def test_non_resnet_families_get_a_clear_error(base):
    model = timm.create_model(base)
    with pytest.raises(TypeError, match=r'Supported timm families.*resnet\*.*ResNetV2'):
        convert_to_skipnet(model)


@pytest.mark.parametrize('base', ['seresnext26d_32x4d', 'resnet18d'])
def test_skipnet_from_timm_builds_the_named_resnet_with_its_weights_and_gates(base):
    plain = timm.create_model(base, num_classes=3).eval()
    randomize_bn(plain)
    model = timm.create_model('skipnet_from_timm', base_model=base, num_classes=3, gate_type='ff2').eval()
    assert type(model.gates).__name__ == 'FeedForwardGates'
    assert model.num_gated_blocks == len(model.blocks()) - 1 == sum(len(getattr(plain, f'layer{i}')) for i in
                                                                  range(1, 5)) - 1
    own = model.state_dict()
    trunk = {k: v for k, v in own.items() if not k.startswith(('gates.', 'gate_'))}  # gate_*: SkipNet's own buffers
    assert trunk.keys() == plain.state_dict().keys()  # the named architecture, tensor for tensor
    assert all(own[k].shape == v.shape for k, v in plain.state_dict().items())
    model.load_state_dict({**own, **plain.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x, gate_policy='open'), plain(x))  # gates open: exactly the timm model
    randomize_bn(model.gates)
    randomize_gates(model)
    actions = model.forward_with_gates(x).actions
    assert 0 < actions.mean() < 1 and not torch.allclose(model(x), plain(x))  # and the gates do skip its blocks
    with pytest.raises(ValueError, match='plain timm ResNet'):
        timm.create_model('skipnet_from_timm', base_model='skipnet_resnet50')


def test_in_place_scatter_never_touches_tensors_a_hook_holds():
    from timm_skipnet.bench import calibrate_gates
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_bn(model)
    x = torch.randn(8, 3, 32, 32)
    calibrate_gates(model, x, 0.5)
    actions = model.forward_with_gates(x).actions
    assert ((actions.sum(0) > 0) & (actions.sum(0) < 8)).any()  # some block runs for a part of the batch only
    held = []
    for block in model.blocks():
        block.register_forward_hook(lambda m, a, out: held.append((out, out.clone())))
    with torch.inference_mode():
        model(x)
    assert held and all(torch.equal(out, copy) for out, copy in held)


def test_feature_wrappers_that_would_bypass_the_gates_are_refused():
    for cls in ('hook', 'fx'):
        with pytest.raises(ValueError, match="feature_cls='getter'"):
            timm.create_model('skipnet_resnet38_cifar', features_only=True, feature_cls=cls)


@pytest.mark.parametrize('gate_type', ['ff1', 'ff2', 'rnn'])
def test_reset_gates_forgets_everything_a_trained_gate_learned(gate_type):
    fresh = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type, gate_init_bias=0.0).gates
    trained = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type, gate_init_bias=0.0).gates
    holder = torch.nn.Module()
    holder.gates = trained  # the helpers act on a model's .gates
    randomize_bn(holder)
    randomize_gates(holder)
    trained.init_weights(0.0)
    x = torch.randn(4, 16, 32, 32)
    state_f, state_t = fresh.init_state(x), trained.init_state(x)
    logit_f, _ = fresh.eval()(0, x, state_f)
    logit_t, _ = trained.eval()(0, x, state_t)
    assert torch.allclose(torch.sigmoid(logit_t), torch.full_like(logit_t, 0.5)) and torch.allclose(logit_f, logit_t)
    for (name, a), b in zip(fresh.named_buffers(), trained.buffers()):
        if 'num_batches_tracked' not in name:
            assert torch.equal(a, b), name  # BatchNorm running statistics are back to 0 / 1


def test_greedy_thresholds_move_each_gates_line_and_sparse_dense_and_batch_one_agree():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_bn(model)
    randomize_gates(model, scale=1.0)
    x = torch.randn(8, 3, 32, 32)
    probs = model.forward_with_gates(x).probs
    default = model.forward_with_gates(x)
    assert torch.equal(default.actions, (probs > 0.5).float())  # 0.5 everywhere: the old rule, unchanged
    t = torch.rand(model.num_gated_blocks) * 0.6 + 0.2
    model.set_gate_thresholds(t.tolist())
    model.set_execution('dense')
    dense = model.forward_with_gates(x)
    # decisions follow p > t_k per gate; the recorded p is the gate's own probability, not shifted (gate 0 reads
    # the same input either way; later gates read what the new decisions made)
    assert torch.equal(dense.actions, (dense.gate_logits > model.gate_threshold_logits).float())
    assert torch.allclose(torch.sigmoid(dense.gate_logits), dense.probs)
    assert torch.allclose(model.gate_thresholds, t)
    assert torch.allclose(dense.probs[:, 0], probs[:, 0])
    assert not torch.equal(dense.actions, default.actions)
    model.set_execution('sparse')
    assert torch.allclose(model(x), dense.logits, rtol=1e-4, atol=1e-5)
    one = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(one, dense.logits, rtol=1e-4, atol=1e-5)
    # the training policies keep their own rules
    model.train()
    model.set_execution('dense')
    st = model.forward_with_gates(x, gate_policy='straight_through')
    assert torch.equal(st.actions, (st.probs > 0.5).float())


def test_gate_thresholds_of_zero_and_one_force_a_block_on_and_off():
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    x = torch.randn(6, 3, 32, 32)
    t = [0.5] * model.num_gated_blocks
    t[2], t[5] = 0.0, 1.0
    for p in (0.3, 0.7):  # every gate closed, then every gate open, at the default 0.5
        model.gates.set_constant_probability(p)
        model.set_gate_thresholds(0.5)
        assert model.forward_with_gates(x).actions.mean().item() == (p > 0.5)
        model.set_gate_thresholds(t)
        for execution in ('dense', 'sparse'):
            model.set_execution(execution)
            actions = model.forward_with_gates(x).actions
            assert actions[:, 2].min() == 1 and actions[:, 5].max() == 0, (p, execution)


def test_gate_thresholds_travel_with_the_weights_and_older_weights_load_at_one_half(tmp_path):
    from safetensors.torch import load_file, save_file

    from timm_skipnet.loading import load_weights
    model = timm.create_model('skipnet_resnet38_cifar')
    model.set_gate_thresholds([0.1 + 0.05 * k for k in range(model.num_gated_blocks)])
    save_file(model.state_dict(), str(tmp_path / 'new.safetensors'))
    again = timm.create_model('skipnet_resnet38_cifar')
    load_weights(again, str(tmp_path / 'new.safetensors'))
    assert torch.equal(again.gate_thresholds, model.gate_thresholds)
    old = {k: v for k, v in load_file(str(tmp_path / 'new.safetensors')).items() if k != 'gate_threshold_logits'}
    save_file(old, str(tmp_path / 'old.safetensors'))
    fresh = timm.create_model('skipnet_resnet38_cifar')
    load_weights(fresh, str(tmp_path / 'old.safetensors'))  # strict: the missing buffer is filled, not refused
    assert torch.equal(fresh.gate_thresholds, torch.full((model.num_gated_blocks,), 0.5))
    load_weights(again, str(tmp_path / 'old.safetensors'))  # into a thresholded model: back to the old rule
    assert torch.equal(again.gate_thresholds, torch.full((model.num_gated_blocks,), 0.5))
    plain = timm.create_model('skipnet_resnet38_cifar')
    plain.set_gate_thresholds(0.9)
    plain.load_state_dict(old)  # strict torch load (trainer resume, timm's load_checkpoint) of older weights
    assert torch.equal(plain.gate_thresholds, torch.full((model.num_gated_blocks,), 0.5))
    # timm-skipnet 0.x saved probabilities under 'gate_thresholds': they load as the same thresholds
    save_file({**old, 'gate_thresholds': model.gate_thresholds}, str(tmp_path / 'v0.safetensors'))
    for load in (lambda m: load_weights(m, str(tmp_path / 'v0.safetensors')),
                 lambda m: m.load_state_dict(load_file(str(tmp_path / 'v0.safetensors')))):
        m = timm.create_model('skipnet_resnet38_cifar')
        load(m)
        assert torch.allclose(m.gate_thresholds, model.gate_thresholds, rtol=0, atol=1e-6)


@pytest.mark.slow  # bfloat16 convolutions are slow on a CPU
def test_thresholds_stay_float32_logits_in_a_bfloat16_model_and_split_gates_whose_p_rounds_to_one():
    from timm_skipnet.thresholds import set_threshold_for_rate
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_bn(model)
    randomize_gates(model, scale=30.0)
    k = model.num_gated_blocks
    model.set_gate_thresholds([0.0] * k)  # every block runs: gate 3 reads the same input whatever the gates' bias
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():  # gate 3's logits around 7 (p > 0.998): p is 1.0 in bfloat16, whose spacing below 1 is 2^-8
        model.gates.head.bias.fill_(7.0 - model.forward_with_gates(x).gate_logits[:, 3].mean().item())
    model.set_gate_thresholds([0.0] * 3 + [0.7] + [0.0] * (k - 4))
    before = model.gate_threshold_logits.clone()
    model.to(torch.bfloat16)
    assert model.gate_threshold_logits.dtype == torch.float32 and torch.equal(model.gate_threshold_logits, before)
    x = x.to(torch.bfloat16)
    model.set_gate_thresholds([0.0] * 3 + [0.5] + [0.0] * (k - 4))
    trace = model.forward_with_gates(x)
    assert bool((trace.probs[:, 3] == 1).all()) and bool((trace.actions[:, 3] == 1).all())
    _, share, n = set_threshold_for_rate(model, [(x, None, None)], gate=3, rate=0.5)
    actions = model.forward_with_gates(x).actions[:, 3]
    assert n == 64 and 0.4 <= share <= 0.6 and actions.mean().item() == share  # the share the model really runs


@pytest.mark.parametrize('bad', [1.5, -0.1, [0.5, 0.5]])
def test_bad_gate_thresholds_are_refused_with_the_expected_form(bad):
    model = timm.create_model('skipnet_resnet38_cifar')
    with pytest.raises(ValueError, match='one per gated block'):
        model.set_gate_thresholds(bad)


def test_forced_thresholds_survive_weight_averaging_and_a_meta_model_loads_them_after_to_empty(tmp_path):
    from safetensors.torch import save_file
    from timm.utils import ModelEmaV3

    from timm_skipnet.loading import load_weights
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    k = model.num_gated_blocks
    t = [0.5] * k
    t[2], t[5] = 0.0, 1.0  # forced on / off: finite sentinels, not +-inf, which an EMA lerp turns into NaN
    model.set_gate_thresholds(t)
    ema = ModelEmaV3(model, decay=0.9)
    for _ in range(3):
        ema.update(model, step=1)
    assert torch.isfinite(ema.module.gate_threshold_logits).all()
    assert torch.equal(ema.module.gate_thresholds, model.gate_thresholds)
    # fresh gates are open (p = 0.95): gate 5 closes only by its threshold; gate 2 would close on a NaN threshold
    actions = ema.module.eval().forward_with_gates(torch.randn(4, 3, 32, 32)).actions
    assert actions[:, 2].min() == 1 and actions[:, 5].max() == 0 and actions[:, 3].min() == 1
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    meta = timm.create_model('skipnet_resnet38_cifar', device='meta')
    assert meta.gate_threshold_logits.is_meta
    meta = meta.to_empty(device='cpu')
    load_weights(meta, str(tmp_path / 'w.safetensors'))
    assert torch.equal(meta.gate_threshold_logits, model.gate_threshold_logits)
    assert meta.to(torch.bfloat16).gate_threshold_logits.dtype == torch.float32


@pytest.mark.slow  # bfloat16 convolutions are slow on a CPU
@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_sparse_execution_under_bfloat16_autocast_runs_the_blocks_dense_execution_runs(gate_type):
    model = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
    randomize_bn(model)
    randomize_gates(model)
    x = torch.randn(16, 3, 32, 32)
    # bfloat16 keeps 8 bits of mantissa: its gate logits sit up to a tenth of their spread away from the float32 ones,
    # and a logit within rounding of its threshold may fall either side on paths that compute the gates in another
    # order (the hot path folds BatchNorm into them). Each gate's threshold, in network order, goes in the widest gap of
    # its bfloat16 logits on this batch, so every decision is clear.
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for k in range(model.num_gated_blocks):
            logits = model.forward_with_gates(x).gate_logits[:, k].float().sort().values
            gap = (logits[1:] - logits[:-1]).argmax()
            thresholds = model.gate_threshold_logits.clone()
            thresholds[k] = (logits[gap] + logits[gap + 1]) / 2
            model.set_gate_thresholds(thresholds.tolist(), logits=True)
        logits = model.forward_with_gates(x).gate_logits.float()
        margins = logits - model.gate_threshold_logits
    assert (margins.abs() / (logits.amax(0) - logits.amin(0))).min() > 0.03  # clear of rounding, for each gate
    traces = {}
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for execution in ('dense', 'sparse'):
            model.set_execution(execution)
            traces[execution] = model.forward_with_gates(x)
        with torch.inference_mode():  # the untraced hot path: folded gates, scattering in place
            fast = model(x)
    dense, sparse = traces['dense'], traces['sparse']
    assert ((sparse.actions.mean(0) > 0) & (sparse.actions.mean(0) < 1)).all()  # every gate splits the batch
    assert torch.equal(sparse.actions, (margins > 0).float())  # the calibrated decisions
    assert torch.equal(sparse.actions, dense.actions)
    assert sparse.logits.dtype == dense.logits.dtype == fast.dtype == torch.bfloat16
    for other in (dense.logits, fast):
        torch.testing.assert_close(sparse.logits.float(), other.float(), rtol=0.05, atol=0.05)
