"""Where an exported SkipNet-38 loses time in onnxruntime at batch 1: the shipped export against the plain export
(every block, no gate), an export whose thresholds force one image path (no gate, no If: the blocks alone), and the
shipped export with each If rewritten as a zero-or-one-image slice (a skipped block's convolutions run on an empty
batch, no subgraph call). Every variant is timed over the same test images in a new random order each round; ratios
are medians of per-round ratios to the plain export.

    .venv/bin/python docs/experiments/onnx_overheads.py [--threads 2] [--rounds 9]
"""
import argparse
import collections
import copy
import os
import random
import statistics
import tempfile
import time

import numpy as np
import onnx
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.loading import load_model
from timm_skipnet.onnx_export import export_onnx, onnx_session

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def _outer_inputs(graph):
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        defined.update(node.output)
    return {name for node in graph.node for name in node.input if name and name not in defined}


def _inline(branch, prefix, x_name, x_new, nodes, inits):
    """The branch's nodes at the top level, its values renamed under ``prefix``, its input ``x_name`` read as
    ``x_new``; returns the name of its output."""
    rename = {t.name: prefix + t.name for t in branch.initializer}
    rename.update({o: prefix + o for node in branch.node for o in node.output if o})
    rename[x_name] = x_new
    for t in branch.initializer:
        copied = onnx.TensorProto()
        copied.CopyFrom(t)
        copied.name = rename[t.name]
        inits.append(copied)
    for node in branch.node:
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        del copied.input[:], copied.output[:]
        copied.input.extend(rename.get(i, i) for i in node.input)
        copied.output.extend(rename.get(o, o) for o in node.output)
        copied.name = prefix + node.name
        nodes.append(copied)
    return rename.get(branch.output[0].name, branch.output[0].name)


def ifs_to_slices(model):
    """Each top-level If of a batch-1 graph as: n = cond (0 or 1); the then-branch on x[:n], the else-branch on x[n:],
    concatenated. The same function without subgraph calls."""
    g = model.graph
    g.initializer.extend([nh.from_array(np.array([v], np.int64), f'const_{v}') for v in (0, 1, -1)])
    weights = {t.name for t in g.initializer}
    nodes, inits = [], []
    for idx, node in enumerate(g.node):
        if node.op_type != 'If':
            nodes.append(node)
            continue
        branches = {a.name: a.g for a in node.attribute}
        (x_name,) = _outer_inputs(branches['then_branch']) - weights
        p = f'if{idx}/'
        nodes += [oh.make_node('Cast', [node.input[0]], [p + 'n1'], to=TensorProto.INT64),
                  oh.make_node('Reshape', [p + 'n1', 'const_-1'], [p + 'n']),
                  oh.make_node('Slice', [x_name, 'const_0', p + 'n', 'const_0'], [p + 'run']),
                  oh.make_node('Slice', [x_name, p + 'n', 'const_1', 'const_0'], [p + 'skip'])]
        y = _inline(branches['then_branch'], p + 'then/', x_name, p + 'run', nodes, inits)
        s = _inline(branches['else_branch'], p + 'else/', x_name, p + 'skip', nodes, inits)
        nodes.append(oh.make_node('Concat', [y, s], [node.output[0]], axis=0))
    del g.node[:], g.value_info[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    return model


def us_per_image(runtime, xs) -> float:
    name = runtime.get_inputs()[0].name
    runtime.run(None, {name: xs[:1]})
    t0 = time.perf_counter()
    for i in range(len(xs)):
        runtime.run(None, {name: xs[i:i + 1]})
    return (time.perf_counter() - t0) / len(xs) * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='../shared/data/cifar10/plain')
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--rounds', type=int, default=9)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    model = load_model(SHIPPED, pretrained=True).eval()
    loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), 100, limit=args.images)
    xs = torch.cat([x for x, _, _ in loader if x is not None])
    with torch.no_grad():
        actions = model.forward_with_gates(xs).actions
    path, count = collections.Counter(tuple(int(v) for v in row) for row in actions.tolist()).most_common(1)[0]
    table = measure_mac_table(model)
    plain = copy.deepcopy(model)
    plain.set_gate_policy('open')
    forced = copy.deepcopy(model)
    forced.set_gate_thresholds([-1e31 if run else 1e31 for run in path], logits=True)
    runtimes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in (('plain', plain), ('skipnet', model), ('one path, no gates', forced)):
            runtimes[name] = onnx_session(export_onnx(net, os.path.join(tmp, f'{len(runtimes)}.onnx')), args.threads)
        sliced = ifs_to_slices(onnx.load(os.path.join(tmp, '1.onnx')))
        onnx.save(sliced, os.path.join(tmp, 'sliced.onnx'))
        runtimes['skipnet, If as slices'] = onnx_session(os.path.join(tmp, 'sliced.onnx'), args.threads)
    for name in ('skipnet', 'skipnet, If as slices'):  # the rewrite computes the same logits
        out = runtimes[name].run(None, {runtimes[name].get_inputs()[0].name: xs[:1].numpy()})[0]
        assert np.allclose(out, model(xs[:1]).detach().numpy(), atol=1e-4), name
    times = {name: [] for name in runtimes}
    xs_np = xs.numpy()
    for _ in range(args.rounds):
        order = list(runtimes.items())
        random.shuffle(order)
        for name, s in order:
            times[name].append(us_per_image(s, xs_np))
    import onnxruntime
    print(f'# onnxruntime {onnxruntime.__version__}, {args.threads} threads, batch 1, {len(xs)} test images, '
          f'{args.rounds} rounds; forced path: {sum(path) + 1} of {len(path) + 1} blocks ({count} of the images), '
          f'R {table.full_macs / table.per_image_macs(torch.tensor([path], dtype=torch.float)).item():.2f}; '
          f'SkipNet R {table.full_macs / table.per_image_macs(actions).mean().item():.2f}')
    print('| export | us / image | S |')
    print('|---|---:|---:|')
    for name, v in times.items():
        ratio = statistics.median(b / t for b, t in zip(times['plain'], v))
        print(f'| {name} | {statistics.median(v):,.0f} | {ratio:.2f}x |')


if __name__ == '__main__':
    main()
