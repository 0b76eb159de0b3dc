"""SkipNet-38 trained to a MACs budget (`--target-macs`) against the alpha-trained rl stages of the ledger.

    bash examples/cifar10_skipnet38.sh budget            # the three runs (runs/c10_r38_shipped_rl_t<T>)
    TARGETS="0.55 0.4" FT_EPOCHS=3 bash examples/cifar10_skipnet38.sh budget-alpha budget-ft   # like for like
    .venv/bin/python docs/experiments/target_macs_plot.py  # tables to stdout, docs/cifar10_target_macs.png

Reads each budget run's final evaluation (`eval_rl.json`), the rl-stage runs recorded in examples/cifar10_runs.json
(the alpha sweep from other backbones: the rl stage only, before any ft), and, where they exist, the alpha runs from
the same start as the budget runs (runs/c10_r38_shipped_rl_a<A>) and the same short ft after each of both
(runs/c10_r38_shipped_ft<E>_<t|a><value>, `eval_ft.json`: the SWA average). Training runs are not committed: the
results of every run so far are recorded in docs/experiments/target_macs_runs.json, and runs/ folders that exist
are read over them.
"""
import glob
import json
import os
import re

LEDGER = 'examples/cifar10_runs.json'
RECORDED = 'docs/experiments/target_macs_runs.json'
BACKBONES = {'c10_r38_base': '50-epoch backbone', 'c10_r38_long': '90-epoch backbone',
             'c10_r38_long2': '140-epoch backbone', 'c10_r38_dp': '100-epoch backbone, drop path'}


def alpha_runs():
    """(backbone label, alpha, share of full MACs %, top-1) of every rl stage trained with --alpha."""
    runs = json.load(open(LEDGER))['runs']
    points = []
    for name, r in runs.items():
        m = re.fullmatch(r'c10_r38_(?:\w+_)?rl_a([\d.]+)(?:_w3)?', name)
        if not m:
            continue
        s = r['summary']
        points.append((BACKBONES.get(r['lineage'][1], r['lineage'][1]), float(m.group(1)),
                       100.0 * s['macs_mean'] / s['macs_full'], s['top1'], name))
    return points


def budget_runs(root='runs'):
    rows = []
    for d in sorted(glob.glob(os.path.join(root, 'c10_r38_shipped_rl_t*'))):
        path = os.path.join(d, 'eval_rl.json')
        if not os.path.exists(path):
            continue
        s = json.load(open(path))
        rows.append(dict(name=os.path.basename(d), target_pct=s['target_macs_pct_of_full'],
                         macs_pct=100.0 * s['macs_mean'] / s['macs_full'], top1=s['top1'],
                         over_points=s['macs_over_target_points'], varying=s['varying_gates'],
                         paths=s['distinct_paths'], common=s['most_common_path_pct'],
                         rates=s['gate_execution_rates']))
    return rows


def same_start_runs(root='runs'):
    """rl stage and, where run, ft of every run from the shipped backbone: {'t0.4': {...}, 'a1.0': {...}}."""
    out = {}
    for d in sorted(glob.glob(os.path.join(root, 'c10_r38_shipped_rl_*'))):
        key = os.path.basename(d).rsplit('_', 1)[1]
        path = os.path.join(d, 'eval_rl.json')
        if not os.path.exists(path):
            continue
        s = json.load(open(path))
        row = dict(key=key, rl_macs=100.0 * s['macs_mean'] / s['macs_full'], rl_top1=s['top1'])
        for ft in sorted(glob.glob(os.path.join(root, f'c10_r38_shipped_ft*_{key}', 'eval_ft.json'))):
            f = json.load(open(ft))
            row.update(ft_name=os.path.basename(os.path.dirname(ft)), ft_macs=100.0 * f['macs_mean'] / f['macs_full'],
                       ft_top1=f['top1'])
        out[key] = row
    return out


def main():
    recorded = json.load(open(RECORDED))
    alphas = alpha_runs()
    budgets = {b['name']: b for b in recorded['budget'] + budget_runs()}
    budgets = sorted(budgets.values(), key=lambda b: b['target_pct'])
    same = {**recorded['same_start'], **same_start_runs()}
    print('| run | trained to | MACs (% of full) | top-1 (%) | gates deciding per image | distinct paths |')
    print('|---|---|---:|---:|---:|---:|')
    for b in budgets:
        print(f"| {b['name']} | target {b['target_pct']:.0f} % | {b['macs_pct']:.1f} "
              f"({b['over_points']:+.1f} points) | {b['top1']:.2f} | {b['varying']} of {len(b['rates'])} | "
              f"{b['paths']} (most common {b['common']:.1f} %) |")
    for label, alpha, macs, top1, name in sorted(alphas, key=lambda p: p[2]):
        print(f'| {name} | alpha {alpha:g} ({label}) | {macs:.1f} | {top1:.2f} | | |')
    for b in budgets:
        print(f"{b['name']} per-gate execution rates: {' '.join(f'{r:.2f}' for r in b['rates'])}")
    print('\n| from the shipped backbone | rl: MACs (% of full) | rl: top-1 (%) | after the same ft: MACs | top-1 (%) '
          '|')
    print('|---|---:|---:|---:|---:|')
    for key, r in sorted(same.items(), key=lambda kv: kv[1]['rl_macs']):
        value = key[1:].replace('seed', ', seed ')
        trained = f'--target-macs {value}' if key.startswith('t') else f'--alpha {value}'
        ft = (f"{r['ft_macs']:.1f} | {r['ft_top1']:.2f}" if 'ft_top1' in r else '| ')
        print(f"| {trained} | {r['rl_macs']:.1f} | {r['rl_top1']:.2f} | {ft} |")
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label in dict.fromkeys(p[0] for p in alphas):
        pts = sorted((p for p in alphas if p[0] == label), key=lambda p: p[2])
        ax.plot([p[2] for p in pts], [p[3] for p in pts], 'o', label=f'--alpha, rl stage ({label})')
        for p in pts:
            ax.annotate(f'{p[1]:g}', (p[2], p[3]), xytext=(4, 3), textcoords='offset points', fontsize=7)
    if budgets:
        ax.plot([b['macs_pct'] for b in budgets], [b['top1'] for b in budgets], '*', ms=14, color='black',
                label='--target-macs, rl stage (from the shipped backbone)')
        for b in budgets:
            ax.axvline(b['target_pct'], ls=':', color='black', lw=1)
    same_alpha = sorted((r for k, r in same.items() if k.startswith('a')), key=lambda r: r['rl_macs'])
    if same_alpha:
        ax.plot([r['rl_macs'] for r in same_alpha], [r['rl_top1'] for r in same_alpha], 's', ms=8, color='tab:red',
                label='--alpha, rl stage (from the shipped backbone)')
        for r in same_alpha:
            seeded = 'seed' in r['key']  # above its point: a seed's twin sits close by
            ax.annotate(r['key'][1:].replace('seed', ', seed '), (r['rl_macs'], r['rl_top1']),
                        xytext=(-40, 8) if seeded else (4, -10), textcoords='offset points', fontsize=7)
    for marker, color, start in (('*', 'black', 't'), ('s', 'tab:red', 'a')):
        done = sorted((r for k, r in same.items() if k.startswith(start) and 'ft_top1' in r),
                      key=lambda r: r['ft_macs'])
        if done:
            ax.plot([r['ft_macs'] for r in done], [r['ft_top1'] for r in done], marker, ms=12 if marker == '*' else 8,
                    mfc='none', color=color, label=f"after the same ft ({'target' if start == 't' else 'alpha'})")
    ax.set_xlabel('MACs per image, % of the full ResNet-38 (exact, gates included); dotted: the targets')
    ax.set_ylabel('top-1 on the 10,000 test images (%)')
    ax.set_title('SkipNet-38, CIFAR-10: rl to a MACs budget vs the alpha sweep')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig('docs/cifar10_target_macs.png', dpi=120)
    print('wrote docs/cifar10_target_macs.png')


if __name__ == '__main__':
    main()
