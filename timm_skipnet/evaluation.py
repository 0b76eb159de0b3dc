"""Accuracy and exact compute of a SkipNet over a dataset: top-1, MACs per image, per-gate execution rates, how
per-image the policy is, and (for a model trained to a budget) how far its MACs landed from the target."""
from typing import Callable, Dict, Optional, Sequence

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


def policy_diversity(actions: torch.Tensor) -> Dict:
    """How per-image a policy is, from its (N, K) 0/1 decisions: the gates whose decision differs between images
    (a gate every image runs, or every image skips, is static), the distinct execution paths over the N images, and
    the share of images on the most common one. A policy whose gates all sit at p = 0 or 1 is a pruned ResNet:
    one path, no gate varying."""
    paths = actions.round().to(torch.uint8)
    if paths.shape[0] == 0:
        raise ValueError('policy_diversity needs at least one image.')
    varying = paths.amin(0) != paths.amax(0)
    _, counts = torch.unique(paths, dim=0, return_counts=True)
    k = paths.shape[1]
    return dict(varying_gates=int(varying.sum()), varying_gates_pct=100.0 * int(varying.sum()) / k if k else 0.0,
                distinct_paths=int(counts.numel()), most_common_path_pct=100.0 * int(counts.max()) / paths.shape[0])


def static_overflow(actions: torch.Tensor, capacity_for: Callable[[int, int], int],
                    batch_sizes: Sequence[int] = (8, 64, 256)) -> Dict:
    """How often static execution (the compiled path) would find more images running a block than its capacity,
    for the images in order cut into batches of each size (whole batches only). ``overflow='exact'`` runs such a
    block on the whole batch (same result, less speed); ``'shortcut'`` sends the excess images down the shortcut:
    ``shortcut_decisions_pct`` is the share of (image, gate) decisions that rule would change."""
    n, k = actions.shape
    report = {}
    for b in batch_sizes:
        m = n // b
        if m == 0 or k == 0:
            continue
        running = actions[:m * b].round().reshape(m, b, k).sum(1)
        capacity = torch.tensor([capacity_for(j, b) for j in range(k)], dtype=running.dtype)
        excess = (running - capacity).clamp(min=0)
        report[str(b)] = dict(batches=m, batches_overflowing_pct=100.0 * (excess.sum(1) > 0).double().mean().item(),
                              gate_overflow_pct=(100.0 * (excess > 0).double().mean(0)).tolist(),
                              shortcut_decisions_pct=100.0 * excess.sum().item() / (m * b * k))
    return report


def target_report(macs_mean: float, target_macs: float, full_macs: float) -> Dict:
    """Where the mean landed against the budget a model was trained to: + above it, - below."""
    return dict(target_macs=float(target_macs), target_macs_pct_of_full=100.0 * target_macs / full_macs,
                macs_over_target_pct=100.0 * (macs_mean / target_macs - 1.0),
                macs_over_target_points=100.0 * (macs_mean - target_macs) / full_macs)


def summarize(results: Dict, table: MacTable, target_macs: Optional[float] = None,
              capacity_for: Optional[Callable[[int, int], int]] = None) -> Dict:
    """JSON-ready report: accuracy, MACs distribution, reduction, the paper's CP, per-gate execution rates, how
    per-image the policy is; with ``target_macs`` (MACs per image) also the distance to that budget; with
    ``capacity_for`` (the model's ``gate_capacity_for``) how often its static capacity overflows."""
    actions = results['actions']
    if actions.shape[0] == 0:
        raise RuntimeError(f"No image could be evaluated ({results.get('num_bad_images', 0)} undecodable): check the "
                           f"dataset path, split and column names.")
    correct = (results['preds'] == results['labels']).float()
    macs = table.per_image_macs(actions)
    executed = (1 + actions.sum(1)).long()
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    summary = dict(
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
        **policy_diversity(actions),
    )
    if target_macs is not None:
        summary.update(target_report(summary['macs_mean'], target_macs, table.full_macs))
    if capacity_for is not None:
        summary['static_overflow'] = static_overflow(actions, capacity_for)
    return summary


def format_summary(s: Dict) -> str:
    rates = ' '.join(f'{r:.2f}' for r in s['gate_execution_rates'])
    lines = [
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
    ]
    if 'varying_gates' in s:
        k = len(s['gate_execution_rates'])
        lines += [f"| gates deciding per image (vary between images) | {s['varying_gates']} of {k} "
                  f"({s['varying_gates_pct']:.0f} %) |",
                  f"| distinct execution paths | {s['distinct_paths']} "
                  f"(most common: {s['most_common_path_pct']:.1f} % of images) |"]
    if 'target_macs' in s:
        lines.append(f"| MACs / image vs trained target | {s['macs_mean'] / 1e6:.2f} M vs "
                     f"{s['target_macs'] / 1e6:.2f} M ({s['target_macs_pct_of_full']:.1f} % of full): "
                     f"{s['macs_over_target_pct']:+.1f} % ({s['macs_over_target_points']:+.1f} points of full) |")
    for b, o in s.get('static_overflow', {}).items():
        lines.append(f"| static capacity overflow, batches of {b} | {o['batches_overflowing_pct']:.1f} % of "
                     f"{o['batches']} batches ('shortcut' would change {o['shortcut_decisions_pct']:.2f} % of "
                     f"decisions) |")
    return '\n'.join(lines)


def main(args) -> Dict:
    """``timm-skipnet eval``: top-1 and exact compute of a model on a dataset split, printed and saved as JSON."""
    import json
    import os

    from .accounting import measure_mac_table
    from .loading import model_and_eval_loader
    model, loader, _, split = model_and_eval_loader(args)
    table = measure_mac_table(model)
    if getattr(args, 'target_macs', ''):
        from .rewards import MacsBudget
        target = MacsBudget.from_target(table, args.target_macs).target_macs
    else:
        target = recorded_target(args.model, args.checkpoint)
    summary = summarize(collect(model, loader, progress=True), table, target_macs=target,
                        capacity_for=getattr(model, "gate_capacity_for", None))
    summary.update(model=args.model, checkpoint=args.checkpoint or None, dataset=args.dataset, split=split)
    print(format_summary(summary))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_text(args.output, json.dumps(summary, indent=2))
    return summary


def recorded_target(model: str, checkpoint: str = '') -> Optional[float]:
    """The MACs budget an exported folder was trained to (``eval_results.json``'s ``target_macs``, written by a
    ``--target-macs`` run), or None: for ``local-dir:<folder>`` or a ``--checkpoint`` folder."""
    import os

    from .loading import read_json
    folders = [model[len('local-dir:'):]] if model.startswith('local-dir:') else []
    folders += [checkpoint] if checkpoint and os.path.isdir(checkpoint) else []
    for folder in reversed(folders):  # weights loaded on top come from the checkpoint: its target wins
        path = os.path.join(folder, 'eval_results.json')
        if os.path.exists(path):
            target = read_json(path).get('target_macs')
            if target is not None:
                return float(target)
    return None


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
    p.add_argument('--target-macs', default='', help=(
        "report the distance to this budget: a share of the full model's MACs (0.6 or 60%%) or MACs per image "
        "(52.7M); default: the budget an exported folder was trained to (its eval_results.json), if any"))
    p.set_defaults(func=main)
