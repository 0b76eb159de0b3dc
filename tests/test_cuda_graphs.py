"""The whole-call CUDA graph computes what the eager model computes: the static path with torch.cond in eager mode
(what a recording captures as conditional nodes) equals the sparse path, and a recorded graph equals eager logits."""
import os

import pytest
import timm
import torch

from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet.cuda_graphs import CUDAGraphed, conditional_nodes_available, needs_conditional_nodes
from timm_skipnet.skipnet import eager_control_flow

PUBLISHED = os.path.join(os.path.dirname(__file__), '..', 'hub_configs', 'skipnet_resnet38_cifar.cifar10')
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (SKIPNET_TEST_CUDA=1 on a '
                               'GPU host)')


def _model(capacity=0.5, overflow='exact'):
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_gates(model)
    randomize_bn(model)
    model.set_gate_capacity(capacity, overflow=overflow)
    return model


@pytest.mark.parametrize('overflow', ['exact', 'shortcut'])
@pytest.mark.parametrize('batch', [1, 8])
def test_eager_branch_operators_give_the_sparse_result(batch, overflow):
    """What a recording captures: the static path branching with the cond operator instead of a host read."""
    model = _model(overflow=overflow)
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        sparse = model(x)
        actions = model.forward_with_gates(x).actions
        model.set_execution('static')
        static = model(x)  # Python branches (host reads)
        model.gate_overflow.zero_()
        with eager_control_flow():
            got = model(x)
    assert (actions == 0).any() and (actions == 1).any()
    if batch > 1:  # a capacity of half the batch: some gate overflowed, so the fallback branch was taken too
        assert int(model.gate_overflow.sum()) > 0
    torch.testing.assert_close(got, static, rtol=0, atol=0)
    if overflow == 'exact' or batch == 1:  # 'shortcut' may change what overflowing images compute, by design
        torch.testing.assert_close(got, sparse, rtol=0, atol=1e-5)


def test_only_branching_recordings_need_conditional_nodes():
    model = _model(capacity=0.5, overflow='exact')
    assert needs_conditional_nodes(model, 1)  # batch 1: every block behind a branch
    assert needs_conditional_nodes(model, 64)  # exact overflow: a fallback branch per gate
    model.set_gate_capacity(0.5, overflow='shortcut')
    assert not needs_conditional_nodes(model, 64)  # fixed sub-batches, no branch
    model.set_gate_capacity(1.0, overflow='exact')
    assert not needs_conditional_nodes(model, 64)  # every block on the whole batch: nothing to decide
    model.set_gate_policy('open')
    assert not needs_conditional_nodes(model, 1)  # the plain network


def test_recording_refuses_cpu_inputs_and_training_models():
    model = _model()
    with pytest.raises(ValueError, match='CUDA graphs record CUDA work'):  # a CPU-only machine stops here too
        CUDAGraphed(model, torch.randn(2, 3, 32, 32))
    model.train()
    with pytest.raises(ValueError, match='model.eval'):
        CUDAGraphed(model, torch.randn(2, 3, 32, 32))


@cuda_only
@pytest.mark.parametrize('batch,overflow', [(1, 'exact'), (64, 'shortcut'), (64, 'exact')])
def test_cuda_graph_replays_equal_eager_logits_on_the_published_model(batch, overflow):
    model = timm.create_model(f'local-dir:{PUBLISHED}', pretrained=True).eval().cuda()
    model.set_gate_capacity(model.gate_capacity.tolist(), sigmas=0.0, overflow=overflow)  # tight: overflow happens
    xs = [torch.randn(batch, 3, 32, 32, device='cuda') for _ in range(3)]
    if needs_conditional_nodes(model, batch) and not conditional_nodes_available():
        with pytest.raises(RuntimeError, match='conditional nodes'):
            CUDAGraphed(model, xs[0])
        return
    graphed = CUDAGraphed(model, xs[0])
    for x in xs:  # new images in the same recording: the decisions follow them
        with torch.inference_mode():
            model.set_execution('static')
            want = model(x)
            model.set_execution('auto')
            sparse = model(x)
        got = graphed(x).clone()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if overflow == 'exact':
            torch.testing.assert_close(got, sparse, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='recorded for inputs of shape'):
        graphed(torch.randn(batch + 1, 3, 32, 32, device='cuda'))


def test_a_recording_branches_once_per_gated_block_at_batch_1_and_once_per_gate_fallback_in_a_batch(monkeypatch):
    """Under eager_control_flow every decision goes through the cond operator (a conditional node when recorded),
    none through a host read."""
    import timm_skipnet.skipnet as skipnet
    calls = []
    real_cond = skipnet._cond

    def counting_cond(pred, *args):
        calls.append(tuple(pred.shape))
        return real_cond(pred, *args)
    monkeypatch.setattr(skipnet, '_cond', counting_cond)
    model = _model(capacity=0.5, overflow='exact')
    model.set_execution('static')
    with torch.inference_mode(), eager_control_flow():
        model(torch.randn(1, 3, 32, 32))
        assert len(calls) == model.num_gated_blocks
        calls.clear()
        model(torch.randn(8, 3, 32, 32))
    capped = sum(model.gate_capacity_for(k, 8) < 8 for k in range(model.num_gated_blocks))
    assert capped > 0 and len(calls) == capped  # one exact-fallback branch per gate whose sub-batch is smaller
    calls.clear()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))  # outside the block: Python branches, no cond operator
    assert not calls


def test_recording_a_module_around_a_skipnet_is_refused():
    wrapper = torch.nn.Sequential(_model())
    with pytest.raises(ValueError, match='Record the SkipNet itself'):
        CUDAGraphed(wrapper.eval(), torch.randn(2, 3, 32, 32))
