"""The analysis plots (``timm-skipnet analyze``): each turns the JSON-ready statistics of
:func:`timm_skipnet.analysis.compute_statistics` into one PNG, on matplotlib's Agg canvas without pyplot."""
import math
from collections.abc import Sequence
from typing import Any

import torch

from .analysis import KeptImages


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
