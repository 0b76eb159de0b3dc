"""The fast inference paths compute what the model defines: folded gates, the batch-1 path, static execution with
capacities (eager and under torch.compile(fullgraph=True)), and FlopCounterMode still sees the skipped MACs missing."""
import copy
import math
import os

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet.accounting import count_macs, measure_mac_table
from timm_skipnet.capacity import calibrate_capacity, gate_rates

PUBLISHED = os.path.join(os.path.dirname(__file__), '..', 'hub_configs', 'skipnet_resnet38_cifar.cifar10')


def _model(gate_type='rnn', layers=None, seed=0):
    kwargs = dict(gate_type=gate_type)
    if layers:
        kwargs['layers'] = layers
    model = timm.create_model('skipnet_resnet38_cifar', **kwargs).eval()
    randomize_gates(model, seed=seed)
    randomize_bn(model, seed=seed)
    return model


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_a_model_built_under_inference_mode_follows_new_weights_and_thresholds(gate_type):
    """Inference tensors keep no version counter: loading weights or thresholds must still reach the gates."""
    x = torch.randn(4, 3, 32, 32)
    other = _model(gate_type, seed=1)
    other.set_gate_thresholds([0.3 + 0.02 * k for k in range(other.num_gated_blocks)])
    weights = copy.deepcopy(other.state_dict())
    with torch.no_grad():
        want_batch, want_one = other.forward_with_gates(x).logits, other.forward_with_gates(x[:1]).logits
        other.set_gate_thresholds(1.0)  # every gate closed
        want_raised = other.forward_with_gates(x[:1]).logits
    with torch.inference_mode():
        model = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
        model(x[:1])
        model(x)  # folded copy and threshold rules cached
        model.load_state_dict(weights)
        got_batch, got_one = model(x), model(x[:1])
        model.set_gate_thresholds(1.0)
        got_raised = model(x[:1])
    torch.testing.assert_close(got_batch, want_batch)
    torch.testing.assert_close(got_one, want_one)
    torch.testing.assert_close(got_raised, want_raised)
    assert not torch.equal(want_one, want_raised)  # closing every gate changed the answer


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1', 'ff2'])
def test_folded_gates_give_the_unfolded_logits_and_decisions(gate_type):
    model = _model(gate_type)
    x = torch.randn(16, 16, 32, 32)
    folded, bank = model.gates.folded(), model.gates
    with torch.no_grad():
        s_f, s_u = folded.init_state(x), bank.init_state(x)
        for k, chs in enumerate(model._gate_in_chs()):
            xk = torch.randn(16, chs, 512 // chs, 512 // chs)
            lf, s_f = folded(k, xk, s_f)
            lu, s_u = bank(k, xk, s_u)
            torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-5)
            assert torch.equal(lf > 0, lu > 0)


def test_folded_pooling_scale_follows_the_feature_map_size():
    """The folded gate sums instead of averaging, with 1 / (H W) in its weights: a gate that sees another image
    size (the same weights at 32 and at 48 px) must scale by that size, not the first one it saw."""
    model = _model()
    folded, bank = model.gates.folded(), model.gates
    with torch.no_grad():
        for size in (8, 12, 8):
            x = torch.randn(4, 16, size, size) + 1.0  # a non-zero mean, so a wrong scale moves the logit
            lf, _ = folded(0, x, folded.init_state(x))
            lu, _ = bank(0, x, bank.init_state(x))
            torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-5)
            column, _ = folded.head_logit(0, x, folded.init_state(x))
            assert column.shape == (4, 1) and torch.equal(column.squeeze(1), lf)


def test_folded_gates_are_rebuilt_after_a_weight_change_and_dropped_in_training():
    model = _model()
    first = model.gates.folded()
    assert model.gates.folded() is first  # cached while nothing changed
    with torch.no_grad():
        model.gates.embed[3].weight.mul_(2.0)  # in place: the tensor's version moves
    second = model.gates.folded()
    assert second is not first
    torch.testing.assert_close(second.w_in[3], model.gates.lstm.weight_ih @ model.gates.embed[3].weight)
    model.train()
    assert model.gates._folded.value is None
    model.load_state_dict(_model(seed=1).state_dict())
    model.eval()
    torch.testing.assert_close(model.gates.folded().b_in[0], model.gates.lstm.weight_ih @ model.gates.embed[0].bias
                               + model.gates.lstm.bias_ih + model.gates.lstm.bias_hh)


def test_published_model_folded_decisions_equal_the_traced_unfolded_ones_on_real_images_in_batches_and_one_by_one(
        cifar10_dir):
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    model = timm.create_model(f'local-dir:{PUBLISHED}', pretrained=True).eval()
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 250, limit=1000)
    with torch.inference_mode():
        for x, _, _ in loader:
            traced = model.forward_with_gates(x)  # unfolded gates
            torch.testing.assert_close(model(x), traced.logits, rtol=0, atol=1e-5)  # folded, sparse
            model.set_execution('static')
            torch.testing.assert_close(model(x), traced.logits, rtol=0, atol=1e-5)
            model.set_execution('auto')
            # batch 1 (the NumPy LSTM step on the CPU): the same logits image by image
            one = torch.cat([model(x[i:i + 1]) for i in range(50)])
            torch.testing.assert_close(one, traced.logits[:50], rtol=0, atol=1e-5)


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_batch_one_sparse_dense_and_static_paths_equal_the_traced_model(gate_type):
    model = _model(gate_type)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        traced = model.forward_with_gates(x)
        assert 0 < traced.actions.mean() < 1
        for execution in ('sparse', 'dense', 'static'):
            model.set_execution(execution)
            one = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
            torch.testing.assert_close(one, traced.logits, rtol=1e-4, atol=1e-4)


def test_capacity_rule_is_expected_count_plus_binomial_sigmas():
    model = _model()
    model.set_gate_capacity([0.0, 1.0, 0.5] + [0.25] * 14, sigmas=2.0)
    assert model.gate_capacity_for(0, 64) == 0
    assert model.gate_capacity_for(1, 64) == 64
    assert model.gate_capacity_for(2, 64) == math.ceil(32 + 2 * math.sqrt(64 * 0.25))  # 40
    assert model.gate_capacity_for(3, 256) == math.ceil(64 + 2 * math.sqrt(256 * 0.25 * 0.75))
    assert model.gate_capacity_for(2, 1) == 1


@pytest.mark.parametrize('rate', [0.0, 0.3, 0.6])
def test_static_execution_with_exact_overflow_equals_sparse_execution(rate):
    """Whatever the capacity, 'exact' never changes a result: a batch that overflows runs the whole batch."""
    model = _model()
    model.set_gate_capacity(rate, sigmas=0.0, overflow='exact')
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        actions = model.forward_with_gates(x).actions
        model.set_execution('static')
        model.gate_overflow.zero_()
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    counts = actions.sum(0)
    caps = torch.tensor([model.gate_capacity_for(k, 12) for k in range(model.num_gated_blocks)])
    assert torch.equal(model.gate_overflow, (counts > caps).long())  # each fallback is counted


def test_static_execution_overflow_rule_shortcut_drops_the_lowest_margins_and_counts_them():
    model = _model()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
    counts = trace.actions.sum(0)
    k = int(torch.argmax(counts))  # a gate that runs for several images
    assert counts[k] >= 3
    rates = [1.0] * model.num_gated_blocks
    rates[k] = 1.0 / 12  # capacity 1 at batch 12 with no sigmas
    model.set_gate_capacity(rates, sigmas=0.0, overflow='shortcut')
    model.set_execution('static')
    with torch.no_grad():
        model.gate_overflow.zero_()
        out = model(x)
        # by hand: gate k runs only for its highest-logit image among those that would run; the gates after it
        # decide on what they then see
        logits = trace.gate_logits[:, k]
        keep = torch.zeros_like(trace.actions[:, k])
        keep[torch.argmax(torch.where(trace.actions[:, k] > 0, logits, torch.full_like(logits, -1e9)))] = 1
        h = model.maxpool(model._forward_stem(x))
        gates = model.gates.folded()
        state = gates.init_state(h)
        for j, block in enumerate(model.blocks()):
            if j > 0:
                gate_logit, state = gates(j - 1, h, state)
                a = keep if j - 1 == k else (gate_logit > 0).float()
                h = torch.where(a.view(-1, 1, 1, 1) > 0, block(h), h if block.downsample is None
                                else block.downsample(h))
            else:
                h = block(h)
        expected = model.forward_head(h)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert model.gate_overflow[k] == counts[k] - 1
    assert int(model.gate_overflow.sum()) == int(counts[k] - 1)


def test_capacity_travels_with_the_weights_and_older_weights_load_uncalibrated(tmp_path):
    model = _model()
    model.set_gate_capacity([0.1 * (k % 10) for k in range(17)], sigmas=1.5)
    state = model.state_dict()
    fresh = _model(seed=1)
    fresh.load_state_dict(state)
    assert fresh.gate_capacity_for(3, 100) == model.gate_capacity_for(3, 100) == math.ceil(30 + 1.5 * math.sqrt(21))
    older = {k: v for k, v in state.items() if not k.startswith('gate_capacity')}
    fresh.load_state_dict(older)
    assert [fresh.gate_capacity_for(k, 64) for k in range(17)] == [64] * 17


def test_calibrated_rates_are_the_greedy_execution_rates():
    model = _model()
    xs = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    rates = calibrate_capacity(model, xs)
    with torch.no_grad():
        expected = torch.cat([model.forward_with_gates(x).actions for x in xs]).double().mean(0)
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64), expected)
    torch.testing.assert_close(model.gate_capacity, expected.float())
    with pytest.raises(ValueError, match='yielded nothing'):
        gate_rates(model, [])


def test_bad_capacity_settings_are_refused():
    model = _model()
    with pytest.raises(ValueError, match='one rate in'):
        model.set_gate_capacity([0.5] * 3)
    with pytest.raises(ValueError, match='one rate in'):
        model.set_gate_capacity(1.5)
    with pytest.raises(ValueError, match='overflow must be'):
        model.set_gate_capacity(0.5, overflow='drop')
    with pytest.raises(RuntimeError, match='eval mode only'):
        model.train().set_execution('static')
        model(torch.randn(2, 3, 32, 32), gate_policy='greedy')


def test_default_inference_path_flop_count_misses_exactly_the_skipped_blocks():
    """FlopCounterMode over the default (folded, sparse) path: every skipped block's MACs are missing; the gates
    cost what their folded form costs."""
    model = _model()
    table = measure_mac_table(model, (3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        actions = model.forward_with_gates(x).actions
        model(x)  # folds the gates once (a one-time cost, not a per-image one)
        with FlopCounterMode(display=False) as counter:
            model(x)
        folded = model.gates.folded()
        h = model.blocks()[0](model.maxpool(model._forward_stem(x[:1])))
        state = folded.init_state(h)
        folded_gates = 0
        for k, block in enumerate(model.blocks()[1:]):
            folded_gates += count_macs(folded, k, h, state)
            _, state = folded(k, h, state)
            h = block(h)
    expected = table.per_image_macs(actions).sum().item() + len(x) * (folded_gates - sum(table.gates))
    assert counter.get_total_flops() // 2 == expected


@pytest.mark.slow
def test_compiled_fullgraph_model_really_skips_and_equals_eager():
    """torch.compile(fullgraph=True): no graph break, no data-dependent shape; batch 1 through torch.cond, a batch
    through the capacity sub-batches (with an overflow falling back exactly), and blocks that no image runs are
    really absent from the work (the shortcut result is returned)."""
    torch._dynamo.reset()
    model = _model(layers=(2, 2, 2))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        rates = calibrate_capacity(model, [x])
    assert 0 < sum(rates) < len(rates)
    model.set_gate_capacity([r * 0.5 for r in rates], sigmas=0.0)  # tight: some gates overflow and fall back
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x[:1]), expected[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,gate_type,size', [('skipnet_resnet50', 'rnn', 224),
                                                 ('skipnet_resnet38_cifar', 'ff1', 32)])
def test_models_build_and_run_on_the_meta_device_in_train_and_eval(name, gate_type, size):
    """timm checks configs and feature shapes on 'meta' without allocating weights: no value may be read back."""
    with torch.device('meta'):
        model = timm.create_model(name, gate_type=gate_type)
        classes = model.num_classes
        for batch in (1, 3):
            assert model.eval()(torch.randn(batch, 3, size, size)).shape == (batch, classes)
            assert model.train()(torch.randn(batch, 3, size, size)).shape == (batch, classes)
        feats = model.eval().forward_intermediates(torch.randn(2, 3, size, size), intermediates_only=True)
        assert [f.shape[1] for f in feats] == [info['num_chs'] for info in model.feature_info]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (runs on GPU hosts)')
@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_folded_gates_run_on_cuda_and_decide_as_the_traced_gates(gate_type):
    """CUDA's fused LSTM cell refuses one bias without the other: the folded RNN gate once crashed every eager
    GPU inference ("sym_strides() called on an undefined Tensor")."""
    model = _model(gate_type).cuda()
    x = torch.randn(16, 3, 32, 32, device='cuda')
    with torch.no_grad():
        trace = model.forward_with_gates(x)
        torch.testing.assert_close(model(x), trace.logits, rtol=1e-4, atol=1e-4)


def _recording(real, name, calls):
    def method(self, index, *args):
        calls.append((name, index))
        return real(self, index, *args)
    return method


def test_batch_one_numpy_lstm_step_gives_the_folded_gates_logits_and_state():
    """The CPU batch-1 twin reorders and rescales the LSTM rows to use one tanh: every gate's logit and state must
    stay the folded (torch) gate's, at two image sizes, through a chain of gates that carries the state."""
    model = _model()
    folded = model.gates.folded()
    with torch.no_grad():
        for size in (32, 48):
            x = torch.randn(1, 3, size, size)
            host = folded.host(x)
            assert host is not None and folded.host(x.bfloat16()) is None and folded.host(x.repeat(2, 1, 1, 1)) is None
            feats = model.maxpool(model._forward_stem(x))
            state, host_state = folded.init_state(feats), host.init_state()
            for k, block in enumerate(model.blocks()[:-1]):
                feats = block(feats)  # the input of gated block k + 1
                logit, state = folded.head_logit(k, feats, state)
                host_logit, host_state = host.logit(k, feats, host_state)
                assert abs(logit.item() - host_logit) < 1e-5
                torch.testing.assert_close(torch.from_numpy(host_state[0])[None], state[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(torch.from_numpy(host_state[1])[None], state[1], rtol=1e-5, atol=1e-6)


def test_batch_one_numpy_gate_on_wide_and_large_feature_maps_gives_the_folded_gates_logits():
    """ImageNet-width gates (256-2048 channels: the projection runs in slices) on maps from 7x7 to 112x112 (above
    8,192 positions the pooling is torch's): every slicing of the NumPy step must give the torch gate's logit."""
    model = timm.create_model('skipnet_resnet50').eval()
    folded = model.gates.folded()
    torch.manual_seed(0)
    with torch.no_grad():
        for side in (7, 56, 112):
            x = torch.randn(1, 3, 224, 224)
            host = folded.host(x)
            state, host_state = folded.init_state(x.new_zeros(1, 64, 1, 1)), host.init_state()
            for k, channels in enumerate(model._gate_in_chs()):
                feats = torch.rand(1, channels, side, side)
                logit, state = folded.head_logit(k, feats, state)
                host_logit, host_state = host.logit(k, feats, host_state)
                assert abs(logit.item() - host_logit) < 1e-4 * max(1.0, abs(logit.item())), (side, k, channels)
                torch.testing.assert_close(torch.from_numpy(host_state[1])[None], state[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_gates_with_a_fixed_decision_are_computed_only_where_a_later_gate_reads_them(gate_type, monkeypatch):
    """Thresholds 0 / 1 fix gates 0-2 and 4-16; gate 3 decides per image. RNN: gates 0-2 still step the LSTM (gate 3
    reads their state) without a head, nothing runs after gate 3; FF: only gate 3 runs. Outputs equal the traced
    model, which computes every gate."""
    model = _model(gate_type)
    k = model.num_gated_blocks
    fixed = [-math.inf, math.inf, -math.inf, 0.0] + [math.inf, -math.inf] * ((k - 4) // 2) + [-math.inf] * (k % 2)
    model.set_gate_thresholds(fixed, logits=True)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        logits = model.forward_with_gates(x).gate_logits[:, 3].sort().values
        fixed[3] = ((logits[2] + logits[3]) / 2).item()  # half of the images run block 4, none near the threshold
        model.set_gate_thresholds(fixed, logits=True)
        traced = model.forward_with_gates(x)
        assert 0 < traced.actions[:, 3].mean() < 1  # gate 3 really decides per image
        model(x)  # folds once
        calls = []
        bank = type(model.gates.folded())
        def recording(name):
            real = getattr(bank, name)

            def method(self, index, *args):
                calls.append((name, index))
                return real(self, index, *args)
            return method
        for name in ('head_logit', 'advance'):
            monkeypatch.setattr(bank, name, recording(name))
        if gate_type == 'rnn':  # batch 1 on the CPU steps the LSTM in NumPy: record that twin under the same names
            host = type(model.gates.folded().host(x[:1]))
            monkeypatch.setattr(host, 'logit', _recording(host.logit, 'head_logit', calls))
            monkeypatch.setattr(host, 'advance', _recording(host.advance, 'advance', calls))
        for batch in (x, x[:1]):
            calls.clear()
            out = model(batch)
            torch.testing.assert_close(out, traced.logits[:len(batch)], rtol=1e-5, atol=1e-5)
            expected = [('head_logit', 3)]
            if gate_type == 'rnn':
                expected = [('advance', 0), ('advance', 1), ('advance', 2)] + expected
            assert calls == expected
