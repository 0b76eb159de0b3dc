"""What the gates learned: execution rate per block, executed blocks per image, per class and per accuracy bucket,
the images that run the fewest / most blocks, and how depth follows input scale (the paper's
Fig. 7-10).

Three steps, so every number behind a plot can be tested without looking at pixels:
``run_analysis`` (model + loader -> per-image tensors), ``compute_statistics`` (tensors -> JSON-ready numbers) and
``write_report`` (numbers -> PNG plots of :mod:`timm_skipnet.analysis_plots`, ``summary.json``,
``summary.md``). ``timm-skipnet analyze`` chains them.
"""
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoints import atomic_write_text

DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5)
MAX_BUCKETS = 8  # accuracy-per-bucket plot: at most this many equal-width buckets of executed blocks
PLOT_FILES = dict(
    gate_rates='gate_execution_rates.png',
    executed='executed_blocks_histogram.png',
    per_class='class_median_executed_blocks.png',
    fewest='grid_fewest_blocks.png',
    most='grid_most_blocks.png',
    accuracy='accuracy_by_executed_blocks.png',
    scales='scale_shift_histogram.png',
)


# ---- data ------------------------------------------------------------------------------------------------------------
@dataclass
class KeptImages:
    """The few images a grid shows (normalised, CPU) and what the model did with each."""
    images: torch.Tensor  # (M, C, H, W)
    indices: torch.Tensor  # (M,) position in the analysed stream
    labels: torch.Tensor  # (M,)
    preds: torch.Tensor  # (M,)
    executed: torch.Tensor  # (M,) executed blocks, the never-gated first block included

    def cat(self, other: 'KeptImages') -> 'KeptImages':
        return KeptImages(*(torch.cat([a, b]) for a, b in zip(self._fields(), other._fields())))

    def take(self, positions: torch.Tensor) -> 'KeptImages':
        return KeptImages(*(t[positions] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.indices, self.labels, self.preds, self.executed


@dataclass
class AnalysisData:
    """Per-image results of one pass over the data (CPU tensors); everything the statistics are computed from."""
    labels: torch.Tensor  # (N,)
    preds: torch.Tensor  # (N,) at the model's input size
    actions: torch.Tensor  # (N, K) uint8, 1 = gated block ran
    scale_executed: dict[float, torch.Tensor]  # scale -> (N,) executed blocks at that input scale
    scale_preds: dict[float, torch.Tensor]  # scale -> (N,)
    scale_sizes: dict[float, tuple[int, int]]  # scale -> input (H, W) in pixels
    input_size: tuple[int, int]  # (H, W) of the unscaled input
    fewest: KeptImages  # the images that ran the fewest blocks, fewest first
    most: KeptImages  # the images that ran the most blocks, most first
    num_blocks: int
    gate_stages: list[str]  # stage name of each gated block
    class_names: list[str]
    mean: tuple[float, ...]  # normalisation of the images, to show them again
    std: tuple[float, ...]
    num_bad_images: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # model / dataset / split, copied into the summary

    @property
    def num_images(self) -> int:
        return int(self.labels.numel())

    @property
    def executed(self) -> torch.Tensor:
        """(N,) blocks run per image at the model's input size, the never-gated first block included."""
        return 1 + self.actions.long().sum(1)

    @property
    def scales(self) -> list[float]:
        return list(self.scale_executed)


def gate_stages(model) -> list[str]:
    """Stage name of every gated block, in network order (block 0 is never gated)."""
    return [name for name in model.stage_names for _ in getattr(model, name)][1:]


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _check_scales(scales: Sequence[float]) -> list[float]:
    scales = sorted({float(s) for s in scales})
    if any(s <= 0 for s in scales):
        raise ValueError(f'Scales must be positive, got {scales}.')
    return scales


def _extreme_order(executed: torch.Tensor, indices: torch.Tensor, largest: bool) -> torch.Tensor:
    """Positions sorted by executed blocks (descending for ``largest``); ties keep stream order, so runs repeat."""
    order = torch.argsort(indices)
    key = executed[order]
    return order[torch.argsort(-key if largest else key, stable=True)]


def _keep_extremes(kept: KeptImages | None, batch: KeptImages, k: int, largest: bool) -> KeptImages:
    """Merge a batch into the running selection and keep only the k most extreme images (bounded memory)."""
    pool = batch if kept is None else kept.cat(batch)
    return pool.take(_extreme_order(pool.executed, pool.indices, largest)[:k])


def _trace(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and gate actions under the inference policy (greedy gates)."""
    t = model(x, gate_policy='greedy', return_trace=True)
    return t.logits.argmax(1).cpu(), t.actions.cpu().to(torch.uint8)


def _analyse_batch(model, x: torch.Tensor, scales: Sequence[float]) -> dict[str, Any]:
    """One batch at the input size and at every scale (the normalised batch, bilinearly resized)."""
    size = tuple(x.shape[-2:])
    preds, actions = _trace(model, x)
    executed = 1 + actions.long().sum(1)
    out = dict(preds=preds, actions=actions, executed={}, scale_preds={}, sizes={})
    for s in scales:
        new = scaled_size(size, s)
        if new == size:  # same pixels, same decisions: reuse rather than run again
            p, e = preds, executed
        else:
            p, a = _trace(model, F.interpolate(x, size=new, mode='bilinear', align_corners=False))
            e = 1 + a.long().sum(1)
        out['scale_preds'][s], out['executed'][s], out['sizes'][s] = p, e, new
    return out


class _Collector:
    """Per-batch results, concatenated at the end; of the images themselves only the grid candidates are kept."""

    def __init__(self, scales: Sequence[float], grid_size: int):
        self.scales, self.grid_size = scales, grid_size
        self.labels, self.preds, self.actions = [], [], []
        self.executed = {s: [] for s in scales}
        self.scale_preds = {s: [] for s in scales}
        self.fewest = self.most = None
        self.sizes, self.input_size, self.seen = {}, None, 0

    def add(self, x: torch.Tensor, y: torch.Tensor, out: dict[str, Any]) -> None:
        if self.input_size is None:
            self.input_size, self.sizes = tuple(x.shape[-2:]), out['sizes']
        self.labels.append(y.cpu())
        self.preds.append(out['preds'])
        self.actions.append(out['actions'])
        for s in self.scales:
            self.executed[s].append(out['executed'][s])
            self.scale_preds[s].append(out['scale_preds'][s])
        batch = KeptImages(x.cpu(), torch.arange(self.seen, self.seen + len(y)), y.cpu(), out['preds'],
                           1 + out['actions'].long().sum(1))
        self.fewest = _keep_extremes(self.fewest, batch, self.grid_size, largest=False)
        self.most = _keep_extremes(self.most, batch, self.grid_size, largest=True)
        self.seen += len(y)


@torch.no_grad()
def run_analysis(model, loader, scales: Sequence[float] = DEFAULT_SCALES, class_names: Sequence[str] | None = None,
                 max_images: int | None = None, grid_size: int = 16, progress: bool = False,
                 meta: dict[str, Any] | None = None) -> AnalysisData:
    """Run ``model`` (eval mode, greedy gates) over ``loader`` batches ``(images, labels, n_bad)``.

    Keeps per-image labels, predictions and gate actions, executed blocks at every input scale, and only the
    ``grid_size`` images with the fewest and the most executed blocks (not the whole stream).
    """
    from timm.data import resolve_model_data_config
    from tqdm.auto import tqdm
    scales = _check_scales(scales)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    col, n_bad = _Collector(scales, grid_size), 0
    bar = tqdm(total=max_images or None, desc='analyze', unit='img', disable=not progress)
    try:
        for x, y, bad in loader:
            n_bad += bad
            if x is None:
                continue
            if max_images:
                x, y = x[:max_images - col.seen], y[:max_images - col.seen]
            col.add(x, y, _analyse_batch(model, x.to(device), scales))
            bar.update(len(y))
            if max_images and col.seen >= max_images:
                break
    finally:
        bar.close()
        model.train(was_training)
    if not col.seen:
        raise ValueError(f'No images to analyse ({n_bad} unreadable).')
    labels, preds = torch.cat(col.labels), torch.cat(col.preds)
    if labels.min() < 0:
        raise ValueError('The split has unlabelled images (label < 0): analyse a labelled split (e.g. validation).')
    cfg = resolve_model_data_config(model)
    return AnalysisData(
        labels=labels, preds=preds, actions=torch.cat(col.actions),
        scale_executed={s: torch.cat(v) for s, v in col.executed.items()},
        scale_preds={s: torch.cat(v) for s, v in col.scale_preds.items()},
        scale_sizes=col.sizes, input_size=col.input_size, fewest=col.fewest, most=col.most,
        num_blocks=model.num_blocks, gate_stages=gate_stages(model),
        class_names=_complete_class_names(class_names, model.num_classes, labels, preds),
        mean=tuple(cfg['mean']), std=tuple(cfg['std']), num_bad_images=n_bad, meta=dict(meta or {}))


def _complete_class_names(names: Sequence[str] | None, num_classes: int, *label_tensors) -> list[str]:
    """Known names, numbered beyond them: every label and prediction gets a name."""
    n = max([num_classes or 0] + [int(t.max()) + 1 for t in label_tensors if t.numel()])
    names = [str(c) for c in (names or [])][:n]
    return names + [str(i) for i in range(len(names), n)]


def read_class_names(spec, split: str) -> list[str] | None:
    """Class names of a local dataset: the Parquet schema's ``huggingface`` features (Hub layout), or the sorted
    sub-folders of an image folder (as ``datasets`` numbers them). ``None`` for Hub datasets: labels stay numbered."""
    from .data import _parquet_files
    spec = spec.resolved()
    folder = spec.dataset
    if not os.path.isdir(folder):
        return None
    files = _parquet_files(folder, split) or sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.parquet'))
    if files:
        import pyarrow.parquet as pq
        meta = json.loads((pq.read_schema(files[0]).metadata or {}).get(b'huggingface', b'{}'))
        names = meta.get('info', {}).get('features', {}).get(spec.label_column, {}).get('names')
        return [str(n) for n in names] if names else None
    split_dir = os.path.join(folder, split)
    if os.path.isdir(split_dir):
        return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))) or None
    return None


# ---- statistics ------------------------------------------------------------------------------------------------------
def _pct(num: float, den: float) -> float | None:
    return 100.0 * num / den if den else None


def gate_statistics(data: AnalysisData) -> dict[str, Any]:
    """Fraction of images that ran each gated block, and the mean of that over each stage."""
    rates = data.actions.double().mean(0).tolist()
    per_stage = {}
    for stage in dict.fromkeys(data.gate_stages):
        vals = [r for r, s in zip(rates, data.gate_stages) if s == stage]
        per_stage[stage] = sum(vals) / len(vals)
    return dict(gate_block=list(range(1, data.num_blocks)), gate_stage=list(data.gate_stages), per_gate_rate=rates,
                per_stage_rate=per_stage)


def executed_histogram(executed: torch.Tensor, num_blocks: int) -> dict[str, list[int]]:
    """Images per executed-block count, over every possible count 1..num_blocks."""
    counts = torch.bincount(executed, minlength=num_blocks + 1)[1:num_blocks + 1]
    return dict(blocks=list(range(1, num_blocks + 1)), counts=counts.tolist())


def class_statistics(labels: torch.Tensor, preds: torch.Tensor, executed: torch.Tensor,
                     class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class: images, median executed blocks (mean of the middle two for even counts), top-1."""
    groups: dict[int, list[tuple[int, bool]]] = {c: [] for c in range(len(class_names))}
    for y, p, e in zip(labels.tolist(), preds.tolist(), executed.tolist()):
        groups[y].append((e, y == p))
    rows = []
    for c, items in groups.items():
        rows.append(dict(label=c, name=class_names[c], count=len(items),
                         median_executed=statistics.median(e for e, _ in items) if items else None,
                         top1_pct=_pct(sum(ok for _, ok in items), len(items))))
    return rows


def executed_buckets(lo: int, hi: int, max_buckets: int = MAX_BUCKETS) -> list[tuple[int, int]]:
    """Inclusive ranges of equal integer width covering ``lo..hi`` (the last may be narrower), at most
    ``max_buckets`` of them: the smallest width that fits."""
    width = -(-(hi - lo + 1) // max_buckets)
    return [(a, min(a + width - 1, hi)) for a in range(lo, hi + 1, width)]


def bucket_statistics(executed: torch.Tensor, correct: torch.Tensor,
                      max_buckets: int = MAX_BUCKETS) -> dict[str, Any]:
    """Top-1 per bucket of executed blocks (equal-width buckets over the observed range), with image counts."""
    lo, hi = int(executed.min()), int(executed.max())
    rows = []
    for a, b in executed_buckets(lo, hi, max_buckets):
        inside = (executed >= a) & (executed <= b)
        n, ok = int(inside.sum()), int(correct[inside].sum())
        rows.append(dict(lo=a, hi=b, count=n, correct=ok, top1_pct=_pct(ok, n)))
    return dict(rule=f'equal-width integer buckets over the observed range {lo}..{hi}, at most {max_buckets} '
                     '(the last may be narrower); both ends inclusive',
                width=rows[0]['hi'] - rows[0]['lo'] + 1, buckets=rows)


def scale_statistics(data: AnalysisData) -> dict[str, Any]:
    """Per scale: the distribution of (executed blocks at scale s - at the input size) over images (Fig. 8)."""
    base = data.executed
    shifts = {s: data.scale_executed[s] - base for s in data.scales}
    lo = min((int(d.min()) for d in shifts.values()), default=0)
    hi = max((int(d.max()) for d in shifts.values()), default=-1)
    series = []
    for s, d in shifts.items():
        n = d.numel()
        series.append(dict(
            scale=s, size=list(data.scale_sizes[s]), executed_mean=data.scale_executed[s].double().mean().item(),
            mean_shift=d.double().mean().item(), fewer_pct=_pct(int((d < 0).sum()), n),
            same_pct=_pct(int((d == 0).sum()), n), more_pct=_pct(int((d > 0).sum()), n),
            top1_pct=_pct(int((data.scale_preds[s] == data.labels).sum()), n),
            counts=torch.bincount(d - lo, minlength=hi - lo + 1).tolist()))
    return dict(reference_size=list(data.input_size), shift_values=list(range(lo, hi + 1)), series=series)


def _grid_rows(kept: KeptImages, names: Sequence[str]) -> list[dict[str, Any]]:
    return [dict(index=i, label=y, label_name=names[y], pred=p, pred_name=names[p], executed=e)
            for i, y, p, e in zip(kept.indices.tolist(), kept.labels.tolist(), kept.preds.tolist(),
                                  kept.executed.tolist())]


def compute_statistics(data: AnalysisData) -> dict[str, Any]:
    """Every number behind the plots, JSON-ready (exactly what ``summary.json`` holds)."""
    executed = data.executed
    correct = data.preds == data.labels
    return dict(
        meta=dict(data.meta),
        num_images=data.num_images,
        num_bad_images=data.num_bad_images,
        num_blocks=data.num_blocks,
        num_gated_blocks=data.num_blocks - 1,
        input_size=list(data.input_size),
        top1_pct=_pct(int(correct.sum()), data.num_images),
        executed_mean=executed.double().mean().item(),
        executed_median=statistics.median(executed.tolist()),
        gates=gate_statistics(data),
        executed_histogram=executed_histogram(executed, data.num_blocks),
        per_class=class_statistics(data.labels, data.preds, executed, data.class_names),
        accuracy_by_bucket=bucket_statistics(executed, correct),
        scales=scale_statistics(data),
        grids=dict(fewest=_grid_rows(data.fewest, data.class_names), most=_grid_rows(data.most, data.class_names)),
    )


# ---- report ----------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = '.1f') -> str:
    return '-' if v is None else format(v, spec)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + [
        '| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]


def format_markdown(stats: dict[str, Any]) -> str:
    """``summary.md``: the numbers of ``summary.json`` as tables, each under its plot."""
    meta, n, nb = stats['meta'], stats['num_images'], stats['num_blocks']
    g, h, b, sc = stats['gates'], stats['executed_histogram'], stats['accuracy_by_bucket'], stats['scales']
    hist = [(k, c, f'{100 * c / n:.1f}') for k, c in zip(h['blocks'], h['counts']) if c]
    lines = [
        f"# SkipNet analysis: {meta.get('model', 'model')} on {meta.get('dataset', 'data')} "
        f"({meta.get('split', '')})", '',
        f"{n} images ({stats['num_bad_images']} unreadable, skipped), input {stats['input_size'][0]}x"
        f"{stats['input_size'][1]} px, {nb} blocks ({stats['num_gated_blocks']} gated), greedy gates. "
        f"Top-1 {_fmt(stats['top1_pct'], '.2f')} %; executed blocks per image: mean {stats['executed_mean']:.2f}, "
        f"median {stats['executed_median']:g}.", '',
        '## 1. Execution rate per gated block', '', f"![execution rate per block]({PLOT_FILES['gate_rates']})", '',
        *_markdown_table(['block', 'stage', 'execution rate'],
                         [(k, s, f'{r:.3f}') for k, s, r in zip(g['gate_block'], g['gate_stage'],
                                                                 g['per_gate_rate'])]), '',
        '## 2. Executed blocks per image', '', f"![executed blocks histogram]({PLOT_FILES['executed']})", '',
        *_markdown_table(['executed blocks', 'images', '% of images'], hist), '',
        '## 3. Median executed blocks per class', '', f"![per-class medians]({PLOT_FILES['per_class']})", '',
        *_markdown_table(['label', 'class', 'images', 'median executed blocks', 'top-1 (%)'],
                         [(r['label'], r['name'], r['count'], _fmt(r['median_executed'], 'g'),
                           _fmt(r['top1_pct'])) for r in stats['per_class']]), '',
    ]
    for key, title in (('fewest', 'fewest'), ('most', 'most')):
        lines += [f'## 4. Images that run the {title} blocks', '', f'![{title} blocks]({PLOT_FILES[key]})', '',
                  *_markdown_table(['stream index', 'label', 'prediction', 'executed blocks'],
                                   [(r['index'], r['label_name'], r['pred_name'], r['executed'])
                                    for r in stats['grids'][key]]), '']
    lines += [
        '## 5. Accuracy per bucket of executed blocks', '', f"![accuracy per bucket]({PLOT_FILES['accuracy']})", '',
        f"Buckets: {b['rule']}; width {b['width']}.", '',
        *_markdown_table(['executed blocks', 'images', 'correct', 'top-1 (%)'],
                         [(f"{r['lo']}-{r['hi']}", r['count'], r['correct'], _fmt(r['top1_pct']))
                          for r in b['buckets']]), '',
        '## 6. Multi-scale test', '', f"![scale shift]({PLOT_FILES['scales']})", '',
        f"Reference: the model's input size {sc['reference_size'][0]}x{sc['reference_size'][1]} px; at scale s the "
        'normalised batch is resized bilinearly. Shift = executed blocks at s - executed blocks at scale 1.', '',
        *_markdown_table(['scale', 'input (px)', 'executed mean', 'mean shift', 'fewer (%)', 'same (%)', 'more (%)',
                          'top-1 (%)'],
                         [(f"{s['scale']:g}", f"{s['size'][0]}x{s['size'][1]}", f"{s['executed_mean']:.2f}",
                           f"{s['mean_shift']:+.2f}", _fmt(s['fewer_pct']), _fmt(s['same_pct']), _fmt(s['more_pct']),
                           _fmt(s['top1_pct'])) for s in sc['series']]), '',
    ]
    if sc['series']:
        lines += _markdown_table(['shift'] + [f"images at x{s['scale']:g}" for s in sc['series']],
                                 [(v, *(s['counts'][i] for s in sc['series']))
                                  for i, v in enumerate(sc['shift_values'])]) + ['']
    return '\n'.join(lines)


def write_report(data: AnalysisData, stats: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write the seven PNG plots, ``summary.json`` (= ``stats``) and ``summary.md``; return their paths by key."""
    from .analysis_plots import (
        plot_bucket_accuracy,
        plot_class_medians,
        plot_executed_histogram,
        plot_gate_rates,
        plot_image_grid,
        plot_scale_shift,
    )
    os.makedirs(out_dir, exist_ok=True)
    p = {k: os.path.join(out_dir, f) for k, f in PLOT_FILES.items()}
    nb = stats['num_blocks']
    plot_gate_rates(stats, p['gate_rates'])
    plot_executed_histogram(stats, p['executed'])
    plot_class_medians(stats, p['per_class'])
    plot_image_grid(data.fewest, stats['grids']['fewest'], data.mean, data.std, nb,
                    'Images that run the fewest blocks', p['fewest'])
    plot_image_grid(data.most, stats['grids']['most'], data.mean, data.std, nb,
                    'Images that run the most blocks', p['most'])
    plot_bucket_accuracy(stats, p['accuracy'])
    plot_scale_shift(stats, p['scales'])
    p['summary_json'] = os.path.join(out_dir, 'summary.json')
    atomic_write_text(p['summary_json'], json.dumps(stats, indent=2))
    p['summary_md'] = os.path.join(out_dir, 'summary.md')
    atomic_write_text(p['summary_md'], format_markdown(stats) + '\n')
    return p


# ---- command line ----------------------------------------------------------------------------------------------------
def main(args) -> dict[str, Any]:
    from .loading import model_and_eval_loader
    model, loader, spec, split = model_and_eval_loader(args)
    meta = dict(model=args.model, checkpoint=args.checkpoint or None, dataset=args.dataset, split=split)
    data = run_analysis(model, loader, args.scales, read_class_names(spec, split), args.max_images or None,
                        args.grid_size, progress=True, meta=meta)
    stats = compute_statistics(data)
    paths = write_report(data, stats, args.output)
    print(f"{stats['num_images']} images, top-1 {_fmt(stats['top1_pct'], '.2f')} %, executed blocks mean "
          f"{stats['executed_mean']:.2f} of {stats['num_blocks']}; report: {paths['summary_md']}")
    return stats


def add_parser(sub) -> None:
    p = sub.add_parser('analyze', help='plots and tables of what the gates do: per block, image, class and scale')
    p.add_argument('--model', required=True,
                   help="skipnet_* name, 'local-dir:/path', 'hf-hub:org/name', or a timm ResNet name (converted)")
    p.add_argument('--checkpoint', default='', help='weights to load: .safetensors, .pth or an exported folder')
    p.add_argument('--pretrained', action='store_true', help='start from the model name\'s pretrained weights')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the dataset')
    p.add_argument('--dataset', required=True, help='Hub dataset (streamed) or a local Parquet / image folder')
    p.add_argument('--split', default=None, help="default: the dataset's evaluation split")
    p.add_argument('--image-column', default=None)
    p.add_argument('--label-column', default=None)
    p.add_argument('--max-images', type=int, default=2000, help='images to analyse (0: all)')
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--scales', type=float, nargs='*', default=list(DEFAULT_SCALES),
                   help="input scales for the multi-scale test, x the model's input size (none: skip it)")
    p.add_argument('--grid-size', type=int, default=16, help='images in each of the fewest / most blocks grids')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers')
    p.add_argument('--output', default='output/analysis', help='folder for the PNGs, summary.json and summary.md')
    p.set_defaults(func=main)
