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


def export_onnx(model, path: str, batch_size: int = 1, input_size: Optional[Sequence[int]] = None) -> str:
    """Write ``model`` (a SkipNet, eval, greedy gates) as an ONNX file at ``path``; written to a temporary file
    first and renamed, so an interrupted export never leaves a half-written model."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter translates through it)
    except ImportError as e:
        raise ImportError("ONNX export needs the 'onnx' extra: pip install 'timm-skipnet[onnx]'.") from e
    net = copy.deepcopy(model).eval()
    net.set_execution('static')
    size = tuple(input_size or net.pretrained_cfg.get('input_size') or (3, 224, 224))
    x = torch.randn(batch_size, *size)
    with torch.no_grad():
        program = torch.onnx.export(net, (x,), dynamo=True, optimize=True, verbose=False,
                                    input_names=['pixel_values'], output_names=['logits'])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
