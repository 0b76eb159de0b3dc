"""AOTInductor export that keeps the skipping: the static execution path, ``torch.export``-ed and compiled ahead of
time into a ``.pt2`` package of C++ kernels that runs without Python in the loop.

At batch 1 every gated block sits behind a ``torch.cond``, which the package runs as a C++ ``if``; a larger batch
runs each block on its fixed-size sub-batch (the gate capacity saved with the weights). Load the package with
``torch._inductor.aoti_load_package(path)`` in Python, or ``torch::inductor::AOTIModelPackageLoader`` in C++; it
needs torch, not this package. Building one needs a C++ compiler (as ``torch.compile`` on a CPU does).
"""
import os
from typing import Optional, Sequence

import torch

from .onnx_export import prepare_for_export


def export_aoti(model, path: str, batch_size: int = 1, input_size: Optional[Sequence[int]] = None) -> str:
    """Write ``model`` (a SkipNet, eval, greedy gates) as an AOTInductor package at ``path`` (``.pt2``), built in a
    temporary file and renamed, so an interrupted build never leaves a half-written package."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if not str(path).endswith('.pt2'):
        raise ValueError(f'an AOTInductor package is a .pt2 file; got {path!r}.')
    net = prepare_for_export(model)
    size = tuple(input_size or net.pretrained_cfg.get('input_size') or (3, 224, 224))
    device = next(net.parameters()).device  # a model on a GPU builds a package for that GPU
    with torch.no_grad():
        program = torch.export.export(net, (torch.randn(batch_size, *size, device=device),))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path[:-4]}.tmp{os.getpid()}.pt2'
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_aoti(path: str):
    """The compiled package at ``path`` as a callable: ``load_aoti(path)(x)`` gives the logits of a batch of the
    size it was built for."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no AOTInductor package at {path!r}; build one with timm-skipnet export-aoti.')
    return torch._inductor.aoti_load_package(path)


def main(args) -> None:
    """``timm-skipnet export-aoti``: build the package and check it against the eager model."""
    from .loading import load_model
    model = load_model(args.model, args.checkpoint, pretrained=args.pretrained).eval()
    path = export_aoti(model, args.output, batch_size=args.batch_size)
    size = tuple(model.pretrained_cfg.get('input_size') or (3, 224, 224))
    if args.data:
        from .data import DataSpec, build_transforms, make_loader
        loader = make_loader(DataSpec(args.data), 'test', build_transforms(model, False), args.batch_size,
                             limit=args.check_images)
        x = torch.cat([b for b, _, _ in loader if b is not None])
        x = x[:(x.shape[0] // args.batch_size) * args.batch_size]
    else:
        x = torch.randn(args.batch_size * max(1, args.check_images // args.batch_size), *size)
    runner = load_aoti(path)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
        got = torch.cat([runner(x[i:i + args.batch_size]) for i in range(0, x.shape[0], args.batch_size)])
    diff = (got - trace.logits).abs().max().item()
    same_class = (got.argmax(1) == trace.logits.argmax(1)).float().mean().item()
    print(f'wrote {path}: batch {args.batch_size}; AOTInductor vs eager on {x.shape[0]} '
          f'{"test" if args.data else "random"} images: max |logit difference| {diff:.2e}, same class '
          f'{100 * same_class:.1f} %, blocks run per image {trace.executed_blocks.float().mean().item():.2f} of '
          f'{model.num_blocks}')


def add_parser(sub) -> None:
    p = sub.add_parser('export-aoti', help='compile the model ahead of time (AOTInductor .pt2 package, torch.cond '
                                           'per gated block at batch 1) and check it against eager')
    p.add_argument('--model', required=True, help='skipnet_* name, local-dir:<folder> or hf-hub:<repo>')
    p.add_argument('--checkpoint', default='', help='weights file or exported folder to load on top')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--output', required=True, help='the .pt2 package, e.g. beside the Hub folder')
    p.add_argument('-b', '--batch-size', type=int, default=1, help='the package\'s fixed batch size')
    p.add_argument('--data', default='', help='check on this dataset\'s test images instead of random inputs')
    p.add_argument('--check-images', type=int, default=64, help='images the check runs')
    p.set_defaults(func=main)
