"""What the gates learned: execution rate per block, executed blocks per image, per class and per accuracy bucket,
the images that run the fewest / most blocks, and how depth follows input scale (the paper's
Fig. 7-10).

Three steps, so every number behind a plot can be tested without looking at pixels:
``run_analysis`` (model + loader -> per-image tensors), ``compute_statistics`` (tensors -> JSON-ready numbers) and
``write_report`` (numbers -> PNG plots, ``summary.json``, ``summary.md``). ``timm-skipnet analyze`` chains them.
"""
import json
import math
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


# ---- plots -----------------------------------------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float]):
    """A figure on the Agg canvas, outside pyplot: no global state, no display needed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install 'timm-skipnet[plots]'.") from e
    fig = Figure(figsize=figsize, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _new_axes(figsize: tuple[float, float]):
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    return path


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps['tab10']
    return [cmap(i % 10) for i in range(n)]


def plot_gate_rates(stats: dict[str, Any], path: str) -> str:
    g = stats['gates']
    fig, ax = _new_axes((max(6.0, 0.28 * len(g['gate_block']) + 2), 4.2))
    stages = list(g['per_stage_rate'])
    for stage, color in zip(stages, _colors(len(stages))):
        idx = [i for i, s in enumerate(g['gate_stage']) if s == stage]
        ax.bar([g['gate_block'][i] for i in idx], [g['per_gate_rate'][i] for i in idx], color=color,
               label=f"{stage} (mean {g['per_stage_rate'][stage]:.2f})")
    if len(g['gate_block']) <= 40:
        ax.set_xticks(g['gate_block'])
    ax.set(xlabel='block index (network order; block 0 is never gated and always runs)',
           ylabel='execution rate (fraction of images)', ylim=(0, 1.12),
           title=f"Execution rate per gated block ({stats['num_images']} images)")
    ax.legend(title='stage', ncols=min(4, len(stages)), loc='upper left', fontsize='small')
    return _save(fig, path)


def plot_executed_histogram(stats: dict[str, Any], path: str) -> str:
    h = stats['executed_histogram']
    fig, ax = _new_axes((7, 4))
    ax.bar(h['blocks'], h['counts'], color='tab:blue', label='images')
    ax.axvline(stats['executed_mean'], color='tab:red', ls='--', label=f"mean = {stats['executed_mean']:.2f}")
    ax.set(xlabel=f"executed blocks per image (of {stats['num_blocks']})", ylabel='images (count)',
           xlim=(0.4, stats['num_blocks'] + 0.6), title=f"Executed blocks per image ({stats['num_images']} images)")
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    ax.legend()
    return _save(fig, path)


def _shown_classes(rows: list[dict[str, Any]], limit: int = 50) -> tuple[list[dict[str, Any]], str]:
    """All classes with images, or the limit/2 with the lowest and highest medians when there are too many."""
    rows = [r for r in rows if r['count']]
    if len(rows) <= limit:
        return rows, ''
    rows = sorted(rows, key=lambda r: (r['median_executed'], r['label']))
    half = limit // 2
    return rows[:half] + rows[-half:], f' - the {half} lowest and {half} highest of {len(rows)} classes'


def plot_class_medians(stats: dict[str, Any], path: str) -> str:
    rows, note = _shown_classes(stats['per_class'])
    fig, ax = _new_axes((max(6.0, 0.45 * len(rows) + 2), 4.5))
    x = list(range(len(rows)))
    bars = ax.bar(x, [r['median_executed'] for r in rows], color='tab:green', label='class median')
    if len(rows) <= 30:
        ax.bar_label(bars, labels=[f"n={r['count']}" for r in rows], fontsize='x-small', padding=2)
    ax.axhline(stats['executed_median'], color='tab:red', ls='--',
               label=f"all images: median {stats['executed_median']:g}")
    ax.set_xticks(x, [r['name'] for r in rows], rotation=45, ha='right', fontsize='small')
    ax.set(xlabel='class (ground truth)', ylabel=f"median executed blocks per image (of {stats['num_blocks']})",
           ylim=(0, stats['num_blocks'] * 1.12), title=f'Median executed blocks per class{note}')
    ax.legend(loc='upper right', fontsize='small')
    return _save(fig, path)


def plot_image_grid(kept: KeptImages, rows: list[dict[str, Any]], mean: Sequence[float], std: Sequence[float],
                    num_blocks: int, title: str, path: str) -> str:
    """Images un-normalised with the model's mean/std; title colour: green = correct, red = wrong."""
    ncols = min(8, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = _new_figure((1.75 * ncols, 2.0 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for ax in axes:
        ax.axis('off')
    for ax, img, r in zip(axes, kept.images, rows):
        pixels = (img.float() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap='gray', interpolation='nearest')
        caption = f"label: {r['label_name'][:14]}\npred: {r['pred_name'][:14]}\nblocks: {r['executed']}/{num_blocks}"
        ax.set_title(caption, fontsize=8, color='tab:green' if r['label'] == r['pred'] else 'tab:red')
    fig.suptitle(f'{title} (title green: correct, red: wrong)')
    return _save(fig, path)


def plot_bucket_accuracy(stats: dict[str, Any], path: str) -> str:
    b = stats['accuracy_by_bucket']['buckets']
    fig, ax = _new_axes((max(6.0, 0.9 * len(b) + 2), 4.2))
    x = list(range(len(b)))
    bars = ax.bar(x, [r['top1_pct'] or 0.0 for r in b], color='tab:purple', label='top-1 in bucket')
    ax.bar_label(bars, labels=[f"n={r['count']}" for r in b], fontsize='small', padding=2)
    ax.axhline(stats['top1_pct'], color='tab:red', ls='--', label=f"all images: {stats['top1_pct']:.1f} %")
    ax.set_xticks(x, [f"{r['lo']}" if r['lo'] == r['hi'] else f"{r['lo']}-{r['hi']}" for r in b])
    ax.set(xlabel=f"executed blocks per image (bucket, inclusive; of {stats['num_blocks']})",
           ylabel='top-1 accuracy (%)', ylim=(0, 112), title='Accuracy per bucket of executed blocks (n = images)')
    ax.legend(loc='upper left', fontsize='small')
    return _save(fig, path)


def plot_scale_shift(stats: dict[str, Any], path: str) -> str:
    """Grouped bars, one series per scale; the reference scale (a spike at 0) is left out unless it is alone."""
    sc = stats['scales']
    ref = sc['reference_size']
    series = [s for s in sc['series'] if s['size'] != ref] or sc['series']
    fig, ax = _new_axes((max(7.0, 0.5 * len(sc['shift_values']) + 3), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (s, color) in enumerate(zip(series, _colors(len(series)))):
        pct = [100.0 * c / stats['num_images'] for c in s['counts']]
        x = [v + (i - (len(series) - 1) / 2) * width for v in sc['shift_values']]
        ax.bar(x, pct, width=width, color=color,
               label=f"×{s['scale']:g} ({s['size'][0]}×{s['size'][1]} px), mean Δ {s['mean_shift']:+.2f}")
    ax.axvline(0, color='gray', lw=0.8)
    if len(sc['shift_values']) <= 25:
        ax.set_xticks(sc['shift_values'])
    else:
        _integer_ticks(ax.xaxis)
    ax.set(xlabel=f'Δ executed blocks per image: at scale s − at scale 1 ({ref[0]}×{ref[1]} px)',
           ylabel='images (%)', ylim=(0, 125), title='Executed-block shift with input scale (paper Fig. 8)')
    if series:
        ax.legend(title='input scale s', fontsize='small')
    return _save(fig, path)


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
    from .data import DataSpec, build_transforms, make_loader
    spec = DataSpec(args.dataset, image_column=args.image_column, label_column=args.label_column).resolved()
    split = args.split or spec.eval_split
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    from .loading import load_model
    model = load_model(args.model, args.checkpoint, args.num_classes or spec.num_classes, args.pretrained)
    model = model.to(device).eval()
    loader = make_loader(spec, split, build_transforms(model, is_training=False), args.batch_size,
                         limit=args.max_images or None, workers=args.workers)
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
