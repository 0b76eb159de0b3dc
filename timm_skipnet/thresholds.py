"""Per-image gates after training: set one gate's greedy threshold so its block runs for a chosen share of images.

A trained gate's probabilities rank the images even where all of them fall on one side of 0.5 (REINFORCE often
ends that way): moving the threshold turns an always-closed or always-open gate into a per-image one, and sets the
compute budget, without retraining. The share is measured on a split you choose (by default ``train``, so the test
split stays unseen); the weights are saved with the new threshold (``gate_thresholds`` travels with them).
"""
import os

import torch


@torch.no_grad()
def gate_probabilities(model, loader, gate: int) -> torch.Tensor:
    """p of ``gate`` for every image, the model's current thresholds deciding the other gates."""
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device), return_trace=True).probs[:, gate].cpu() for x, _, _ in loader
                      if x is not None])


def check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f'--rate must be in (0, 1) (the share of images that run the block), got {rate}.')


def threshold_for_rate(probs: torch.Tensor, rate: float) -> float:
    """The t for which p > t holds for ``rate`` of ``probs`` (up to ties)."""
    check_rate(rate)
    return torch.quantile(probs.double(), 1.0 - rate).item()


def set_threshold_for_rate(model, loader, gate: int, rate: float) -> tuple:
    """Set gate ``gate``'s threshold from ``loader``'s images; returns ``(threshold, measured share, images)``."""
    if not 0 <= gate < model.num_gated_blocks:
        raise ValueError(f'--gate must be in [0, {model.num_gated_blocks - 1}] for this model, got {gate}.')
    check_rate(rate)
    probs = gate_probabilities(model, loader, gate)
    t = threshold_for_rate(probs, rate)
    thresholds = model.gate_thresholds.clone()
    thresholds[gate] = t
    model.set_gate_thresholds(thresholds.tolist())
    return t, (probs > t).float().mean().item(), len(probs)


def main(args) -> None:
    """``timm-skipnet threshold``."""
    from safetensors.torch import save_file

    from .loading import model_and_eval_loader
    check_rate(args.rate)
    if not args.output.endswith('.safetensors'):
        raise ValueError(f'--output must be a .safetensors file, got {args.output!r}.')
    args.split = args.split or 'train'
    model, loader, _, split = model_and_eval_loader(args)
    t, share, n = set_threshold_for_rate(model, loader, args.gate, args.rate)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + '.tmp'
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, args.output)
    print(f'gate {args.gate}: threshold {t:.6f} runs the block for {100 * share:.1f} % of {n} {split} images '
          f'-> {args.output}')


def add_parser(sub) -> None:
    p = sub.add_parser('threshold', help="set one gate's greedy threshold so its block runs for a share of images")
    p.add_argument('--model', required=True, help='skipnet_* name, local-dir:<folder> or hf-hub:<repo>')
    p.add_argument('--checkpoint', default='', help='weights file or exported folder to load on top')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--dataset', required=True, help='Hub dataset or local Parquet / image folder')
    p.add_argument('--split', default='', help='where the share is measured (default: train)')
    p.add_argument('--image-column', default=None)
    p.add_argument('--label-column', default=None)
    p.add_argument('--max-images', type=int, default=10_000, help='0: the whole split')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--device', default='')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--gate', type=int, required=True, help='gate index (gate k decides block k + 1)')
    p.add_argument('--rate', type=float, required=True, help='share of the images that should run the block')
    p.add_argument('--output', required=True, help='.safetensors file: the weights with the new threshold')
    p.set_defaults(func=main)
