"""Accuracy and exact compute of a SkipNet over a dataset: top-1, MACs per image, per-gate execution rates."""
from typing import Dict, Optional

import torch

from .accounting import MacTable
from .checkpoints import atomic_write_text


@torch.no_grad()
def collect(model, loader, accelerator=None, max_batches: Optional[int] = None, progress: bool = False) -> Dict:
    """Run ``model`` (greedy gates, sparse execution) over this process's ``loader``; per-image tensors of all
    processes, gathered once at the end (processes may hold different numbers of images and batches)."""
    from tqdm.auto import tqdm
    net = accelerator.unwrap_model(model, keep_fp32_wrapper=False) if accelerator is not None else model
    was_training, execution = net.training, net.execution
    device = next(net.parameters()).device
    preds, labels, actions, probs, n_bad = [], [], [], [], 0
    bar = tqdm(loader, desc='eval', disable=not progress, leave=False)
    try:  # a bad batch or an interrupt must not leave a training model in eval mode / sparse execution
        net.eval()
        net.set_execution('sparse')  # what a user runs: skipped blocks cost nothing (a trainer may have left 'dense')
        for i, (x, y, bad) in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            n_bad += bad
            if x is None:
                continue
            trace = net(x.to(device), return_trace=True)
            preds.append(trace.logits.argmax(1).cpu())
            labels.append(y)
            actions.append(trace.actions.cpu())
            probs.append(trace.probs.cpu())
    finally:
        net.train(was_training)
        net.set_execution(execution)
    k = net.num_gated_blocks
    local = dict(preds=_cat(preds, (0,), torch.long), labels=_cat(labels, (0,), torch.long),
                 actions=_cat(actions, (0, k), torch.float32), probs=_cat(probs, (0, k), torch.float32),
                 num_bad_images=n_bad)
    if accelerator is None or accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object
    parts = gather_object([local])
    return dict(**{key: torch.cat([p[key] for p in parts]) for key in ('preds', 'labels', 'actions', 'probs')},
                num_bad_images=sum(p['num_bad_images'] for p in parts))


def _cat(tensors, empty_shape, dtype) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(empty_shape, dtype=dtype)


def summarize(results: Dict, table: MacTable) -> Dict:
    """JSON-ready report: accuracy, MACs distribution, reduction, the paper's CP, per-gate execution rates."""
    actions = results['actions']
    if actions.shape[0] == 0:
        raise RuntimeError(f"No image could be evaluated ({results.get('num_bad_images', 0)} undecodable): check the "
                           f"dataset path, split and column names.")
    correct = (results['preds'] == results['labels']).float()
    macs = table.per_image_macs(actions)
    executed = (1 + actions.sum(1)).long()
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return dict(
        num_images=int(correct.numel()),
        num_bad_images=int(results.get('num_bad_images', 0)),
        top1=100.0 * correct.mean().item(),
        macs_full=table.full_macs,
        macs_mean=macs.mean().item(),
        macs_std=macs.std(unbiased=False).item(),
        macs_min=macs.min().item(),
        macs_max=macs.max().item(),
        macs_p10_p50_p90=torch.quantile(macs, q).tolist(),
        gmacs_full=table.full_macs / 1e9,
        gmacs_mean=macs.mean().item() / 1e9,
        macs_reduction_pct=100.0 * (1 - macs.mean().item() / table.full_macs),
        computation_percentage=table.computation_percentage(actions).mean().item(),
        cp_reduction_pct=100.0 - table.computation_percentage(actions).mean().item(),
        executed_blocks_mean=executed.double().mean().item(),
        executed_blocks_histogram={int(k): int(v) for k, v in zip(*torch.unique(executed, return_counts=True))},
        gate_execution_rates=actions.mean(0).tolist(),
        num_blocks=table.num_blocks,
        input_size=list(table.input_size),
    )


def format_summary(s: Dict) -> str:
    rates = ' '.join(f'{r:.2f}' for r in s['gate_execution_rates'])
    return '\n'.join([
        '| metric | value |', '|---|---:|',
        f"| images | {s['num_images']} (bad, skipped: {s['num_bad_images']}) |",
        f"| top-1 (%) | {s['top1']:.2f} |",
        f"| MACs / image, full model | {s['macs_full'] / 1e6:.2f} M |",
        f"| MACs / image, mean +- std | {s['macs_mean'] / 1e6:.2f} +- {s['macs_std'] / 1e6:.2f} M |",
        f"| MACs / image, p10 / p50 / p90 | {' / '.join(f'{v / 1e6:.2f}' for v in s['macs_p10_p50_p90'])} M |",
        f"| MACs reduction vs full (exact) | {s['macs_reduction_pct']:.1f} % |",
        f"| paper's computation percentage (block count) | {s['computation_percentage']:.1f} % |",
        f"| executed blocks / image (of {s['num_blocks']}) | {s['executed_blocks_mean']:.2f} |",
        f'| per-gate execution rates | {rates} |',
    ])


def main(args) -> Dict:
    """``timm-skipnet eval``: top-1 and exact compute of a model on a dataset split, printed and saved as JSON."""
    import json
    import os

    from .accounting import measure_mac_table
    from .loading import model_and_eval_loader
    model, loader, _, split = model_and_eval_loader(args)
    summary = summarize(collect(model, loader, progress=True), measure_mac_table(model))
    summary.update(model=args.model, checkpoint=args.checkpoint or None, dataset=args.dataset, split=split)
    print(format_summary(summary))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_text(args.output, json.dumps(summary, indent=2))
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser('eval', help='top-1, MACs per image and per-gate execution rates on a dataset split')
    p.add_argument('--model', required=True, help='skipnet_* name, local-dir:<folder>, hf-hub:<repo>, or a timm '
                                                  'ResNet name (converted)')
    p.add_argument('--checkpoint', default='', help='weights file or exported folder to load on top')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--dataset', default='uoft-cs/cifar10', help='Hub dataset or local Parquet / image folder')
    p.add_argument('--split', default='', help='default: the dataset\'s evaluation split')
    p.add_argument('--image-column', default=None)
    p.add_argument('--label-column', default=None)
    p.add_argument('--max-images', type=int, default=0, help='0: the whole split')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--device', default='')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--output', default='', help='write the summary JSON here')
    p.set_defaults(func=main)
