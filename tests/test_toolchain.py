"""The PyTorch toolchain paths users deploy through: FX symbolic tracing and TorchScript (script, trace, save/load)
give the eager model's logits, with gates that skip blocks for some images and not others."""
import pytest
import timm
import torch

from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet.torchscript import trace_inference

CASES = [('skipnet_resnet38_cifar', {}, 32), ('skipnet_resnet18', {}, 64),
         ('skipnet_from_timm', dict(base_model='resnet26d'), 64)]


def _gated(name, kwargs, seed=0):
    model = timm.create_model(name, **kwargs).eval()
    randomize_gates(model, seed=seed)
    randomize_bn(model, seed=seed)
    return model


def _mixed_decisions(model, x):
    actions = model.forward_with_gates(x).actions
    assert (actions == 0).any() and (actions == 1).any(), 'the gates should skip some blocks and run others'


@pytest.mark.parametrize('name,kwargs,size', CASES)
def test_fx_symbolic_trace_gives_the_eager_logits(name, kwargs, size):
    model = _gated(name, kwargs)
    graph = torch.fx.symbolic_trace(model)
    for batch in (1, 4):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            _mixed_decisions(model, x) if batch > 1 else None
            torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)
    ops = {n.op for n in graph.graph.nodes}
    assert 'call_module' in ops and 'placeholder' in ops  # a real graph of the network, not one opaque call


@pytest.mark.parametrize('name,kwargs,size', CASES[:2])
def test_torchscript_script_trace_and_reload_give_the_eager_logits(name, kwargs, size, tmp_path):
    model = _gated(name, kwargs)
    scripted = torch.jit.script(model)
    traced = trace_inference(model, torch.randn(2, 3, size, size))
    path = str(tmp_path / 'skipnet.pt')
    torch.jit.save(scripted, path)
    reloaded = torch.jit.load(path)
    for batch in (1, 5):  # batch sizes other than the traced one
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model(x)
            if batch > 1:
                _mixed_decisions(model, x)
            for got in (scripted(x), traced(x), reloaded(x)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_script_follows_thresholds_and_weights_changed_in_place():
    """Like any trace, the script shares the model's tensors: raising every threshold afterwards (in place) closes
    the script's gates too."""
    model = _gated('skipnet_resnet38_cifar', {})
    x = torch.randn(3, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        open_ = scripted(x).clone()
        model.set_gate_thresholds(1.0)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(scripted(x), open_)


def test_scripting_a_model_in_training_mode_is_refused_with_the_fix():
    model = timm.create_model('skipnet_resnet38_cifar').train()
    with pytest.raises(ValueError, match='model.eval'):
        torch.jit.script(model)


@pytest.mark.parametrize('name,kwargs,size', CASES[:2])
def test_torchvision_feature_extraction_traces_train_and_eval_graphs(name, kwargs, size):
    """The FX feature path timm's own checks use: node names in both modes, an extractor whose last node is the
    classifier and whose eval output equals the model's logits."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = _gated(name, kwargs)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes[-1] == eval_nodes[-1] == model.pretrained_cfg['classifier']
    stage_blocks = [n for n in eval_nodes if n.startswith('layer2.')]
    assert stage_blocks  # the blocks are nodes a user can tap
    extractor = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                         eval_return_nodes=[eval_nodes[-1], stage_blocks[-1]])
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = extractor.eval()(x)
        _mixed_decisions(model, x)
        torch.testing.assert_close(out[eval_nodes[-1]], model(x), rtol=1e-5, atol=1e-5)
    assert extractor.train()(x)[train_nodes[-1]].shape == (3, model.num_classes)


def test_fx_concrete_args_choose_the_traced_policy():
    model = _gated('skipnet_resnet38_cifar', {})
    x = torch.randn(2, 3, 32, 32)
    opened = torch.fx.symbolic_trace(model, concrete_args={'gate_policy': 'open'})
    with torch.no_grad():
        got = opened(x, 'open')  # FX checks a concrete argument's value on every call
        torch.testing.assert_close(got, model(x, gate_policy='open'), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, model(x))  # the greedy gates skip blocks: another output


def test_scripting_a_module_that_holds_a_skipnet_is_refused_and_leaves_it_intact():
    model = _gated('skipnet_resnet38_cifar', {})
    wrapper = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    with pytest.raises(RuntimeError, match='Script the SkipNet itself'):
        torch.jit.script(wrapper)
    assert wrapper[0] is model  # not replaced by its trace
