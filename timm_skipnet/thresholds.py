"""Per-image gates after training: set one gate's greedy threshold so its block runs for a chosen share of images,
or shift every gate's threshold by one logit offset so the model saves a chosen share of its MACs.

A trained gate's probabilities rank the images even where all of them fall on one side of 0.5 (REINFORCE often
ends that way): moving the threshold turns an always-closed or always-open gate into a per-image one, and sets the
compute budget, without retraining. The share is measured on a split you choose (by default ``train``, so the test
split stays unseen); the weights are saved with the new threshold (``gate_threshold_logits`` travels with them).
Calibrated on the gates' logits, the quantity the greedy policy compares, so the share printed is the share the
model will run, also for gates whose probabilities all round to 1.

The reverse also pays: most gates of a REINFORCE-trained SkipNet decide the same way for every image. Hardening
(``--harden``) fixes such a gate's decision (threshold 0: always run; 1: never), so that only the per-image gates
cost anything at inference (a fixed RNN gate is still stepped where a later per-image gate reads its state; an ONNX
export has no branch for it). It changes what the model does on an image the gate would have decided otherwise, so
it is opt-in and measured: the rates printed are on the calibration split, and ``eval`` on the test split tells the
accuracy and MACs of the result.
"""
import os

import torch


@torch.no_grad()
def gate_logits(model, loader, gate: int) -> torch.Tensor:
    """logit of ``gate`` for every image (float32), the model's current thresholds deciding the other gates."""
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device), return_trace=True).gate_logits[:, gate].float().cpu() for x, _, _ in loader
                      if x is not None])


def check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f'--rate must be in (0, 1) (the share of images that run the block), got {rate}.')


def threshold_for_rate(values: torch.Tensor, rate: float) -> float:
    """The t for which value > t holds for ``rate`` of ``values`` (up to ties), as a float32 number: the model
    compares in float32, so the share is measured against exactly the threshold it will use."""
    check_rate(rate)
    return torch.quantile(values.double(), 1.0 - rate).float().item()


def set_threshold_for_rate(model, loader, gate: int, rate: float) -> tuple:
    """Set gate ``gate``'s threshold from ``loader``'s images; returns ``(threshold, measured share, images)``."""
    if not 0 <= gate < model.num_gated_blocks:
        raise ValueError(f'--gate must be in [0, {model.num_gated_blocks - 1}] for this model, got {gate}.')
    check_rate(rate)
    logits = gate_logits(model, loader, gate)
    t = threshold_for_rate(logits, rate)
    thresholds = model.gate_threshold_logits.clone()
    thresholds[gate] = t
    model.set_gate_thresholds(thresholds.tolist(), logits=True)
    return t, (logits > model.gate_threshold_logits[gate].cpu()).float().mean().item(), len(logits)


def check_tolerance(tolerance: float) -> None:
    if not 0.0 <= tolerance < 0.5:
        raise ValueError(f'--tolerance is the share of images a gate may decide otherwise, in [0, 0.5), got '
                         f'{tolerance}.')


@torch.no_grad()
def harden_static_gates(model, loader, tolerance: float = 0.0) -> tuple:
    """Fix the decision of every gate that runs its block for at most ``tolerance`` or at least ``1 - tolerance`` of
    ``loader``'s images (greedy, the current thresholds). Returns ``(hardened gates, per-gate rates, images)``."""
    from .capacity import gate_rates
    from .policy import THRESHOLD_LOGIT_LIMIT
    check_tolerance(tolerance)
    count = [0]

    def images():
        for x, _, _ in loader:
            if x is not None:
                count[0] += x.shape[0]
                yield x
    rates = gate_rates(model, images())
    thresholds = model.gate_threshold_logits.clone()
    hardened = []
    for k, rate in enumerate(rates):
        if rate <= tolerance or rate >= 1.0 - tolerance:
            thresholds[k] = THRESHOLD_LOGIT_LIMIT if rate <= tolerance else -THRESHOLD_LOGIT_LIMIT
            hardened.append(k)
    model.set_gate_thresholds(thresholds.tolist(), logits=True)
    return hardened, rates, count[0]


CACHE_LIMIT_BYTES = 4 * 2 ** 30


@torch.no_grad()
def mean_macs_reduction(model, batches, table) -> float:
    """Percent of the full model's MACs that the greedy policy saves on ``batches``, counted exactly per image."""
    device = next(model.parameters()).device
    macs = torch.cat([table.per_image_macs(model(x.to(device), gate_policy='greedy', return_trace=True).actions.cpu())
                      for x in batches])
    return 100.0 * (1.0 - macs.mean().item() / table.full_macs)


def _decoded_batches(loader) -> list:
    """The loader's images, decoded once and reused by every bisection step; refused past CACHE_LIMIT_BYTES."""
    batches, size = [], 0
    for x, _, _ in loader:
        if x is None:
            continue
        size += x.numel() * x.element_size()
        if size > CACHE_LIMIT_BYTES:
            raise ValueError(f'--macs-reduction keeps the calibration images in memory and they pass '
                             f'{CACHE_LIMIT_BYTES / 2 ** 30:.0f} GiB: lower --max-images (10,000 CIFAR images take '
                             f'0.1 GiB, 10,000 at 224 px 6 GiB).')
        batches.append(x)
    return batches


def set_thresholds_for_macs_reduction(model, loader, reduction: float, iterations: int = 20,
                                      max_offset: float = 1e4) -> tuple:
    """Add one logit offset to every gate's threshold (forced gates, at +-THRESHOLD_LOGIT_LIMIT, stay forced) so
    that the model saves ``reduction`` percent of its MACs on ``loader``'s images: one knob along the trained
    ranking of every gate, the accuracy / compute trade-off of a single trained model. The saving grows with the
    offset (a higher threshold runs fewer blocks; with the RNN gate, decisions also feed later gates, so bisection
    on the measured saving, not on each gate alone). The offset returned is the middle of the interval of offsets
    that give the first saving >= ``reduction``, not its edge, so float noise elsewhere (another device, bf16)
    moves few decisions. Returns ``(offset, measured reduction %, images)``."""
    from .accounting import measure_mac_table
    from .skipnet import THRESHOLD_LOGIT_LIMIT
    was_training = model.training
    model.eval()
    table = measure_mac_table(model)
    batches = _decoded_batches(loader)
    base = model.gate_threshold_logits.clone()
    forced = base.abs() >= THRESHOLD_LOGIT_LIMIT

    def saving_at(offset: float) -> float:
        model.set_gate_thresholds(torch.where(forced, base, base + offset).tolist(), logits=True)
        return mean_macs_reduction(model, batches, table)

    def bisect(lo: float, hi: float, go_up) -> tuple:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if go_up(saving_at(mid)) else (lo, mid)
        return lo, hi

    try:
        span = 8.0  # logits: widened until the target is bracketed (a gate trained far past its threshold)
        while True:
            r_lo, r_hi = saving_at(-span), saving_at(span)
            if r_lo <= reduction <= r_hi or span >= max_offset:
                break
            span *= 4
        if not r_lo <= reduction <= r_hi:
            raise ValueError(f'--macs-reduction {reduction} is out of reach for this model: shifting every '
                             f'threshold by -/+{span:g} logits saves {r_lo:.1f} .. {r_hi:.1f} % of the MACs on these '
                             f'images.')
        _, first = bisect(-span, span, lambda r: r < reduction)  # the smallest offset that saves >= reduction
        reached = saving_at(first)
        last, _ = bisect(first, span, lambda r: r <= reached)  # the largest offset that saves exactly as much
        offset = (first + last) / 2
        saved = saving_at(offset)
    except BaseException:
        model.set_gate_thresholds(base.tolist(), logits=True)
        raise
    finally:
        model.train(was_training)
    return offset, saved, sum(len(x) for x in batches)


def main(args) -> None:
    """``timm-skipnet threshold``."""
    from safetensors.torch import save_file

    from .loading import model_and_eval_loader
    budget = args.macs_reduction is not None
    modes = [budget, args.gate is not None or args.rate is not None, args.harden]
    if sum(modes) != 1:
        raise ValueError('Pass one of: --gate and --rate (one gate runs its block for a share of the images), '
                         '--macs-reduction (every threshold shifted to save a share of the MACs), or --harden (fix '
                         'the gates that decide the same way for every image).')
    if budget and not 0.0 <= args.macs_reduction < 100.0:
        raise ValueError(f'--macs-reduction is a percentage in [0, 100), got {args.macs_reduction}.')
    if args.harden:
        check_tolerance(args.tolerance)
    if modes[1]:
        if args.gate is None or args.rate is None:
            raise ValueError('--gate and --rate go together.')
        check_rate(args.rate)
    if not args.output.endswith('.safetensors'):
        raise ValueError(f'--output must be a .safetensors file, got {args.output!r}.')
    args.split = args.split or 'train'
    model, loader, _, split = model_and_eval_loader(args, check_labels=False)  # calibration never reads a label
    if args.harden:
        hardened, rates, n = harden_static_gates(model, loader, args.tolerance)
        per_image = [k for k in range(len(rates)) if k not in hardened]
        message = (f'hardened {len(hardened)} of {len(rates)} gates on {n} {split} images (tolerance '
                   f'{args.tolerance:g}): always run {[k for k in hardened if rates[k] > 0.5]}, never '
                   f'{[k for k in hardened if rates[k] <= 0.5]}; per image: '
                   + (', '.join(f'{k} ({100 * rates[k]:.1f} %)' for k in per_image) or 'none'))
    elif budget:
        offset, saved, n = set_thresholds_for_macs_reduction(model, loader, args.macs_reduction)
        message = (f'every threshold shifted by {offset:+.4f} logits saves {saved:.2f} % of the MACs on {n} {split} '
                   f'images')
    else:
        t, share, n = set_threshold_for_rate(model, loader, args.gate, args.rate)
        message = (f'gate {args.gate}: threshold logit {t:.6f} (p > '
                   f'{torch.sigmoid(torch.tensor(t, dtype=torch.float64)):.6f}) runs the block for {100 * share:.1f} '
                   f'% of {n} {split} images')
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + '.tmp'
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, args.output)
    print(f'{message} -> {args.output}')


def add_parser(sub) -> None:
    p = sub.add_parser('threshold', help="set one gate's greedy threshold so its block runs for a share of images, "
                                         "or every threshold so the model saves a share of its MACs")
    p.add_argument('--model', required=True, help='skipnet_* name, local-dir:<folder> or hf-hub:<repo>')
    p.add_argument('--checkpoint', default='', help='weights file or exported folder to load on top')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--dataset', required=True, help='Hub dataset or local Parquet / image folder')
    p.add_argument('--split', default='', help='where the share is measured (default: train)')
    p.add_argument('--image-column', default=None)
    p.add_argument('--label-column', default=None)
    p.add_argument('--max-images', type=int, default=10_000, help='images the share is measured on; 0: the whole split')
    p.add_argument('--sample', choices=('uniform', 'first'), default='uniform', help=(
        "uniform: --max-images drawn at random from the whole split (one undecoded pass; --seed); first: the "
        "split's first images (fast, but a class-sorted folder gives a few classes)"))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--device', default='')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--gate', type=int, default=None, help='gate index (gate k decides block k + 1)')
    p.add_argument('--rate', type=float, default=None, help='share of the images that should run the block')
    p.add_argument('--macs-reduction', type=float, default=None, help=(
        'instead of --gate/--rate: percent of the full MACs to save on these images, by one logit offset added to '
        'every gate threshold (bisection)'))
    p.add_argument('--harden', action='store_true', help=(
        'instead: fix the decision of every gate that decides the same way for all of these images (threshold 0 or '
        '1), so only the per-image gates cost time; measure with eval afterwards. Use --max-images 0'))
    p.add_argument('--tolerance', type=float, default=0.0, help=(
        '--harden: also fix gates that decide otherwise for at most this share of the images'))
    p.add_argument('--output', required=True, help='.safetensors file: the weights with the new threshold')
    p.set_defaults(func=main)
