"""ONNX export keeps the skipping and the results: checked in onnxruntime against the eager model."""
import os

import pytest
import timm
import torch

import timm_skipnet  # noqa: F401
from tests.helpers import randomize_bn, randomize_gates
from timm_skipnet.cli import main as cli
from timm_skipnet.onnx_export import count_if_nodes, export_onnx, onnx_logits, onnx_session

pytest.importorskip('onnxruntime', reason="the 'onnx' extra (installed by make test)")
SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


@pytest.mark.slow  # one export (about 15-25 s on a 2-core CPU)
def test_the_shipped_model_exported_at_batch_1_skips_blocks_in_onnxruntime_as_eager_does(cifar10_dir, tmp_path,
                                                                                          capsys):
    path = str(tmp_path / 'hub' / 'model.onnx')
    cli(['export-onnx', '--model', SHIPPED, '--output', path, '--data', cifar10_dir, '--check-images', '32'])
    assert 'batch 1, 17 If nodes' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'hub')) == ['model.onnx']  # no temporary file left beside it
    model = timm.create_model(SHIPPED, pretrained=True).eval()
    assert count_if_nodes(path) == model.num_gated_blocks  # every gated block behind its own If
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    x = torch.cat([b for b, _, _ in make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 16,
                                                limit=32)])
    with torch.no_grad():
        trace = model.forward_with_gates(x)
        model.set_gate_policy('open')
        every_block = model(x)
    assert trace.actions.sum(1).unique().numel() > 1  # the images take different paths
    got = onnx_logits(onnx_session(path, threads=1), x)
    torch.testing.assert_close(got, trace.logits, rtol=1e-4, atol=1e-4)
    assert (got - every_block).abs().amax(1).min() > 1e-2  # onnxruntime skipped blocks: not the every-block output
    # a block's weights are constants of the branch that runs it (onnxruntime pre-packs those), each stored once
    import onnx
    graph = onnx.load(path).graph
    branches = [a.g for n in graph.node if n.op_type == 'If' for a in n.attribute if a.name == 'then_branch']
    assert all(len(b.initializer) >= 2 for b in branches)  # the block's two convolutions at least
    names = [t.name for t in graph.initializer] + [t.name for n in graph.node if n.op_type == 'If'
                                                   for a in n.attribute for t in a.g.initializer]
    assert len(names) == len(set(names))


def test_weights_only_one_branch_reads_move_into_it_and_shared_ones_stay_outside():
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper

    from timm_skipnet.onnx_export import weights_into_branches

    def weight(name):
        return numpy_helper.from_array(torch.full((2,), 1.0).numpy(), name)

    def branch(name, reads):
        nodes = [helper.make_node('Add', ['x', reads[0]], [f'{name}_0'])]
        for i, w in enumerate(reads[1:]):
            nodes.append(helper.make_node('Add', [f'{name}_{i}', w], [f'{name}_{i + 1}']))
        out = helper.make_tensor_value_info(f'{name}_{len(reads) - 1}', TensorProto.FLOAT, [2])
        return helper.make_graph(nodes, name, [], [out])

    # w_then_top: one branch and a top-level node read it; w_then_loop: one branch and a top-level Loop's body
    cond = helper.make_node('If', ['c'], ['y'], then_branch=branch('then', ['w_then', 'w_both', 'w_then_top',
                                                                           'w_then_loop']),
                            else_branch=branch('else', ['w_else', 'w_both']))
    top = helper.make_node('Add', ['y', 'w_top'], ['y2'])
    top2 = helper.make_node('Add', ['y2', 'w_then_top'], ['y3'])
    body = helper.make_graph(
        [helper.make_node('Identity', ['cond_in'], ['cond_out']),
         helper.make_node('Add', ['v', 'w_then_loop'], ['v2'])],
        'body', [helper.make_tensor_value_info('i', TensorProto.INT64, []),
                 helper.make_tensor_value_info('cond_in', TensorProto.BOOL, []),
                 helper.make_tensor_value_info('v', TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info('cond_out', TensorProto.BOOL, []),
         helper.make_tensor_value_info('v2', TensorProto.FLOAT, [2])])
    loop = helper.make_node('Loop', ['n', '', 'y3'], ['out'], body=body)
    names = ('w_then', 'w_else', 'w_both', 'w_top', 'w_then_top', 'w_then_loop')
    graph = helper.make_graph([cond, top, top2, loop], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info('c', TensorProto.BOOL, []),
                               helper.make_tensor_value_info('n', TensorProto.INT64, [])],
                              [helper.make_tensor_value_info('out', TensorProto.FLOAT, [2])],
                              [weight(n) for n in names])
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), full_check=True)
    assert weights_into_branches(graph) == 2
    branches = {a.name: a.g for a in graph.node[0].attribute}
    then_g, else_g = branches['then_branch'], branches['else_branch']
    assert [t.name for t in then_g.initializer] == ['w_then'] and [t.name for t in else_g.initializer] == ['w_else']
    assert sorted(t.name for t in graph.initializer) == ['w_both', 'w_then_loop', 'w_then_top', 'w_top']
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), full_check=True)


@pytest.mark.slow
def test_an_export_at_batch_4_keeps_exact_results_when_gates_overflow_their_capacity(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_gates(model)
    randomize_bn(model)
    model.set_gate_capacity(0.25, sigmas=0.0, overflow='exact')  # room for one image of four: some batches overflow
    path = export_onnx(model, str(tmp_path / 'b4.onnx'), batch_size=4)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
    running = trace.actions.reshape(4, 4, -1).sum(1)
    assert (running > 1).any() and (running <= 1).any()  # both the capacity path and the fallback are taken
    torch.testing.assert_close(onnx_logits(onnx_session(path, threads=1), x), trace.logits, rtol=1e-4, atol=1e-4)


def test_onnx_logits_refuse_a_batch_the_graph_cannot_take(tmp_path):
    class FixedBatch:
        def get_inputs(self):
            return [type('I', (), {'shape': [4, 3, 32, 32], 'name': 'pixel_values'})()]

    with pytest.raises(ValueError, match='batches of 4'):
        onnx_logits(FixedBatch(), torch.zeros(6, 3, 32, 32))
    with pytest.raises(ValueError, match='batch_size must be >= 1'):
        export_onnx(timm.create_model('skipnet_resnet38_cifar'), str(tmp_path / 'x.onnx'), batch_size=0)


@pytest.mark.parametrize('gate_type', ['rnn', 'ff1'])
def test_the_copy_prepared_for_export_computes_what_the_model_computes(gate_type):
    """Constant thresholds (forced gates included) and the reordered, folded LSTM gates: same logits eagerly."""
    from timm_skipnet.onnx_export import prepare_for_export
    model = timm.create_model('skipnet_resnet38_cifar', gate_type=gate_type).eval()
    randomize_gates(model)
    randomize_bn(model)
    model.set_gate_thresholds([0.0, 1.0] + [0.3 + 0.02 * k for k in range(model.num_gated_blocks - 2)])
    model.set_gate_capacity(0.5, overflow='exact')
    prepared = prepare_for_export(model)
    for batch in (1, 1, 6):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.execution == 'auto' and not hasattr(model, '_constant_thresholds')  # the model itself untouched


@pytest.mark.slow
def test_a_gate_whose_threshold_forces_its_decision_exports_without_a_branch(tmp_path):
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    randomize_gates(model)
    randomize_bn(model)
    model.set_gate_thresholds([0.0, 1.0] + [0.5] * (model.num_gated_blocks - 2))  # block 1 always, block 2 never
    path = export_onnx(model, str(tmp_path / 'forced.onnx'))
    assert count_if_nodes(path) == model.num_gated_blocks - 2
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
    assert trace.actions[:, 2:].unique().numel() == 2  # the free gates decide per image
    torch.testing.assert_close(onnx_logits(onnx_session(path, threads=1), x), trace.logits, rtol=1e-4, atol=1e-4)
