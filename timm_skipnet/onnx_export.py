"""ONNX export that keeps the skipping: the static execution path traced by ``torch.onnx.export(dynamo=True)``.

At batch 1 every gated block sits behind an ONNX ``If`` (from ``torch.cond``), so onnxruntime runs or skips each
block per image. At a larger batch each block runs on its fixed-size sub-batch (the gate capacity saved with the
weights) with an exact fallback ``If`` on overflow, so results equal the eager model's. The graph has a fixed batch
size: the capacity, and so the graph, depend on it. Needs the ``onnx`` extra (onnx, onnxscript; onnxruntime to
check).
"""
import copy
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .folded_gates import FoldedRecurrentGates
from .gates import RecurrentGates
from .skipnet import export_without_fixed_layout


class _ExportRecurrentGates(nn.Module):
    """The folded RNN gates written out for a graph runtime: the projection folded into the LSTM input weights, the
    LSTM's rows reordered (i, f, o, g) so one Sigmoid and one Tanh cover the four gates, the hidden-to-hidden product
    added in the same Gemm, the first gate's zero state left out, and the logit kept as a (B, 1) column that the
    compare feeds to the branch as it is. 13 ONNX nodes a gate instead of 24; the same function as the trained
    gates."""

    def __init__(self, bank: RecurrentGates):
        super().__init__()
        folded = FoldedRecurrentGates(bank)
        h = self.hidden = folded.hidden_dim
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        self.num_gates = folded.num_gates
        for k in range(self.num_gates):
            self.register_buffer(f'w_in{k}', folded.w_in[k][order].t().contiguous())
            self.register_buffer(f'b_in{k}', folded.b_in[k][order].clone())
        self.register_buffer('w_hh', folded.w_hh[order].t().contiguous())
        self.register_buffer('head_w', folded.head_w)
        self.register_buffer('head_b', folded.head_b)

    def folded(self) -> '_ExportRecurrentGates':
        return self  # already the inference form (eager calls of the prepared copy)

    def init_state(self, x: torch.Tensor):
        return None  # h = c = 0 before the first gate

    def forward(self, index: int, x: torch.Tensor, state):
        z = torch.addmm(getattr(self, f'b_in{index}'), x.mean((2, 3)), getattr(self, f'w_in{index}'))
        if state is not None:
            z = torch.addmm(z, state[0], self.w_hh)
        h = self.hidden
        i, f, o = torch.sigmoid(z[:, :3 * h]).chunk(3, 1)
        c = i * torch.tanh(z[:, 3 * h:])
        if state is not None:
            c = c + f * state[1]
        h_new = o * torch.tanh(c)
        return torch.addmm(self.head_b, h_new, self.head_w), (h_new, c)  # (B, 1): no Squeeze before the compare


def prepare_for_export(model) -> nn.Module:
    """A copy of ``model`` (eval, static execution) to export, with what a graph runtime needs no branch for resolved
    now: the thresholds as constants (a forced gate becomes a plain block or shortcut; the others one compare) and,
    for RNN gates, the folded gates of :class:`_ExportRecurrentGates`. For its logits only: a snapshot of the
    thresholds and weights (later changes to ``model`` do not reach it), and its RNN gates return (B, 1) logits, so
    ``forward_with_gates`` does not apply to it. A prepared copy prepares as a copy of itself."""
    net = copy.deepcopy(model).eval()
    if getattr(net, '_constant_thresholds', None) is not None:
        return net
    net.set_execution('static')
    net._greedy_rules()  # the thresholds as Python floats, with the forced gates marked
    net._constant_thresholds = list(zip(net._rules, net._threshold_floats))
    if isinstance(net.gates, RecurrentGates):
        net.gates = _ExportRecurrentGates(net.gates)
    return net


def export_onnx(model, path: str, batch_size: int = 1, input_size: Optional[Sequence[int]] = None) -> str:
    """Write ``model`` (a SkipNet, eval, greedy gates) as an ONNX file at ``path``; written to a temporary file
    first and renamed, so an interrupted export never leaves a half-written model."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter translates through it)
    except ImportError as e:
        raise ImportError("ONNX export needs the 'onnx' extra: pip install 'timm-skipnet[onnx]'.") from e
    net = prepare_for_export(model)
    size = tuple(input_size or net.pretrained_cfg.get('input_size') or (3, 224, 224))
    x = torch.randn(batch_size, *size)
    with torch.no_grad(), export_without_fixed_layout():
        program = torch.onnx.export(net, (x,), dynamo=True, optimize=True, verbose=False,
                                    input_names=['pixel_values'], output_names=['logits'])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        program.save(tmp)
        import onnx
        proto = onnx.load(tmp)
        if weights_into_branches(proto.graph):
            onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _outer_names(graph, out: set) -> set:
    """Names a (sub)graph reads from the scopes around it, nested graphs included."""
    defined = {t.name for t in graph.initializer} | {t.name for t in graph.input}
    for node in graph.node:
        defined.update(node.output)
    for node in graph.node:
        out.update(name for name in node.input if name and name not in defined)
        for attr in node.attribute:
            if attr.g.node:
                _outer_names(attr.g, out)
    return out - defined


def weights_into_branches(graph) -> int:
    """Move each weight that only one branch of one top-level ``If`` reads into that branch, as its own initializer.

    onnxruntime pre-packs a convolution's weights (its blocked NCHWc layout, fused BatchNorm and activation) only when
    they are constants of the graph the node sits in; a branch reading them from the outer scope gets a slower
    convolution. Batch 1, the shipped SkipNet-38 on 2 threads: 1.86 -> 1.35 ms (docs/deployment.md). Weights both
    branches read (a projection shortcut, or every weight of a batch graph's overflow fallback) stay where they are,
    so no tensor is stored twice. Returns how many moved."""
    readers = {}  # outer name -> every subgraph of a top-level node that reads it (If branches, Loop / Scan bodies)
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                for name in _outer_names(attr.g, set()):
                    readers.setdefault(name, []).append((node.op_type, attr.g))
    top = {name for node in graph.node for name in node.input} | {t.name for t in graph.output}
    moved = []
    for t in graph.initializer:
        branches = readers.get(t.name, [])
        if len(branches) == 1 and branches[0][0] == 'If' and t.name not in top:
            branches[0][1].initializer.append(t)
            moved.append(t.name)
    if moved:
        keep = [t for t in graph.initializer if t.name not in set(moved)]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return len(moved)


def onnx_session(path: str, threads: int = 0):
    """An onnxruntime CPU InferenceSession (``threads`` intra-op threads; 0: onnxruntime's default)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the exporter leaves unused initialisers that onnxruntime warns about
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def onnx_logits(ort_session, x: torch.Tensor) -> torch.Tensor:
    """Logits of an exported model for ``x``, batch by batch at the graph's fixed batch size."""
    import numpy as np
    batch = ort_session.get_inputs()[0].shape[0]
    if x.shape[0] % batch:
        raise ValueError(f'the ONNX graph takes batches of {batch}; got {x.shape[0]} images, not a multiple of it.')
    name = ort_session.get_inputs()[0].name
    outs = [ort_session.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, x.shape[0], batch)]
    return torch.from_numpy(np.concatenate(outs))


def count_if_nodes(path: str) -> int:
    """Top-level ``If`` nodes: the blocks whose run-or-skip onnxruntime decides per call."""
    import onnx
    return sum(node.op_type == 'If' for node in onnx.load(path).graph.node)


def main(args) -> None:
    """``timm-skipnet export-onnx``: write the ONNX file and check it against the eager model in onnxruntime."""
    from .loading import load_model
    model = load_model(args.model, args.checkpoint, pretrained=args.pretrained).eval()
    path = export_onnx(model, args.output, batch_size=args.batch_size)
    size = tuple(model.pretrained_cfg.get('input_size') or (3, 224, 224))
    if args.data:
        from .data import DataSpec, build_transforms, make_loader
        loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), args.batch_size,
                             limit=args.check_images)
        x = torch.cat([b for b, _, _ in loader if b is not None])
        x = x[:(x.shape[0] // args.batch_size) * args.batch_size]
    else:
        x = torch.randn(args.batch_size * max(1, args.check_images // args.batch_size), *size)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
    got = onnx_logits(onnx_session(path), x)
    diff = (got - trace.logits).abs().max().item()
    same_class = (got.argmax(1) == trace.logits.argmax(1)).float().mean().item()
    print(f'wrote {path}: batch {args.batch_size}, {count_if_nodes(path)} If nodes; onnxruntime vs eager on '
          f'{x.shape[0]} {"test" if args.data else "random"} images: max |logit difference| {diff:.2e}, same class '
          f'{100 * same_class:.1f} %, blocks run per image {trace.executed_blocks.float().mean().item():.2f} of '
          f'{model.num_blocks}')


def add_parser(sub) -> None:
    p = sub.add_parser('export-onnx', help='write an ONNX file that keeps the skipping (If nodes at batch 1) and '
                                           'check it in onnxruntime')
    p.add_argument('--model', required=True, help='skipnet_* name, local-dir:<folder> or hf-hub:<repo>')
    p.add_argument('--checkpoint', default='', help='weights file or exported folder to load on top')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--output', required=True, help='the .onnx file, e.g. beside the Hub folder')
    p.add_argument('-b', '--batch-size', type=int, default=1, help='the graph\'s fixed batch size (1: If per block)')
    p.add_argument('--data', default='', help='check on this dataset\'s test images instead of random inputs')
    p.add_argument('--check-images', type=int, default=64, help='images the check runs')
    p.set_defaults(func=main)
