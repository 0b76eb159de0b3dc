"""After examples/cifar10_skipnet38.sh: pick the published SkipNet-38, export it to hub_configs/, plot accuracy vs
MACs against the baseline and the paper, and measure the CPU wall-clock speed-up over the baseline.

    .venv/bin/python examples/cifar10_report.py --runs runs --data ../shared/data/cifar10/plain

Runs come in families (FAMILIES): a backbone, its same-budget baselines (gates open) and the SkipNet runs trained
from it. A SkipNet run is a candidate only when a gates-open ResNet-38 of its lineage (one trained from the SkipNet's
backbone, or the backbone itself) trained at least as many epochs, counted over the ``--initial-checkpoint`` chain.
Its baseline is the issue's, the same data pipeline and budget: of those ResNet-38s, the one with the closest
budget (never less; of two, the more accurate), and the target asks that baseline to reach 90.0 %.
The most accurate gates-open ResNet-38 of any family and budget is printed beside it, for context.
Selection rule: among the runs within 0.5 top-1 points of their baseline at >= 30 % fewer MACs whose baseline
reaches 90.0 %, the one with the fewest MACs; if none qualifies, the most accurate run with >= 30 % fewer MACs (and
the card says the target was missed).

Every run seen is recorded in examples/cifar10_runs.json (the ledger; committed): runs/ is git-ignored and does not
survive a fresh checkout, so runs missing there are read from the ledger. Their weights are gone: when the choice
is a ledger-only run, it must be the one already published, and only the plot and the table are regenerated.
"""
import argparse
import fnmatch
import glob
import json
import os
import platform
import re

import timm
import torch

import timm_skipnet  # noqa: F401
from timm_skipnet.bench import speedup_on_images
from timm_skipnet.checkpoints import atomic_write_text
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.hub import export_run

TAG = 'skipnet_resnet38_cifar.cifar10'
REPO = f'timm-skipnet/{TAG}'
# paper Fig. 6c (SkipNet HRL points on CIFAR-10, MACs x1e8, top-1 %), and Table 2 R-38
PAPER_POINTS = [(0.60, 92.75), (0.79, 93.05), (1.26, 93.30), (1.44, 93.68)]
PAPER_R38 = (0.833, 92.50)
# backbone run, its same-budget baseline (gates open), and the SkipNet runs trained from the backbone
FAMILIES = [
    dict(backbone='c10_r38_base', baselines=['c10_r38_base_ft'], skipnets=['c10_r38_rl_a*', 'c10_r38_ft_a*']),
    dict(backbone='c10_r38_long', baselines=['c10_r38_long_base_ft'],
         skipnets=['c10_r38_long_rl_a*', 'c10_r38_long_ft_a*']),
    dict(backbone='c10_r38_long2', baselines=['c10_r38_long2_base_ft', 'c10_r38_long2_swa', 'c10_r38_long2_swa25',
                                                 'c10_r38_long2_swa35'],
         skipnets=['c10_r38_long2_rl_a*', 'c10_r38_long2_kd_a*', 'c10_r38_long2_ft_a*', 'c10_r38_long2_kdswa_a*',
                   'c10_r38_long2_kdswa25_a*', 'c10_r38_long2_kdswawd_a*',
                   'c10_r38_long2_kdswat25_a*', 'c10_r38_long2_rlent_a*', 'c10_r38_long2_kdswaent_a*',
                   'c10_r38_thr_*']),
    dict(backbone='c10_r38_long3', baselines=['c10_r38_long3_base_ft'],
         skipnets=['c10_r38_long3_rl_a*', 'c10_r38_long3_kd_a*']),
    dict(backbone='c10_r38_dp', baselines=['c10_r38_dp_swa', 'c10_r38_dp_swa25', 'c10_r38_dp_swa35'],
         skipnets=['c10_r38_dp_rl_a*', 'c10_r38_dp_kdswa_a*', 'c10_r38_dp_kdrl_a*', 'c10_r38_dp_kdrlswa_a*',
                   'c10_r38_dp_kdswaseed*_a*', 'c10_r38_dp_kdswanodp_a*', 'c10_r38_dp_kdswa25_a*',
                   'c10_r38_dp_kdswa25seed*_a*', 'c10_r38_dp_kdswa25nodp_a*']),
]
# the stages of the lineage script (every run as it was trained) that train each backbone's family
LINEAGES = 'docs/experiments/cifar10_lineages.sh'
RECIPE_STAGES = {'c10_r38_base': ['all'], 'c10_r38_long': ['base', 'long_all'],
                 'c10_r38_long2': ['base', 'long', 'long2', 'long2_all', 'long2_kd15', 'long2_swa', 'long2_swa_ext',
                                   'long2_kdswawd', 'long2_kdswat25', 'long2_rlswa', 'long2_ent', 'thr', 'thr_cos',
                                   'long3'],
                 'c10_r38_long3': ['base', 'long', 'long2', 'long3', 'long3_all'],
                 'c10_r38_dp': ['dp_all']}
# runs trained by a stage of their own after the family's stages
RUN_STAGES = {'c10_r38_dp_kdrl*': ('dp_kdrl',), 'c10_r38_dp_kdswaseed*': ('dp_seed',),
              'c10_r38_dp_kdswanodp*': ('dp_nodp',), 'c10_r38_dp_kdswa25_*': ('dp_swa_ext',),
              'c10_r38_dp_swa35': ('dp_swa_ext',), 'c10_r38_dp_kdswa25seed*': ('dp_seed', 'dp_seed_ext'),
              'c10_r38_dp_kdswa25nodp*': ('dp_nodp', 'dp_nodp_ext')}


LEDGER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10_runs.json')
BASELINE_TARGET = 90.0  # the target for the same-budget ResNet-38
LEDGER_SUMMARY_KEYS = ('top1', 'macs_full', 'macs_mean', 'macs_reduction_pct', 'executed_blocks_mean')


def _family_of(name: str):
    return next((f for f in FAMILIES if name in (f['backbone'], *f['baselines'])
                 or any(fnmatch.fnmatchcase(name, g) for g in f['skipnets'])), None)


def read_ledger(path: str = LEDGER) -> dict:
    """name -> run record (summary, epochs, family, lineage, live=False) of every run the ledger holds."""
    if not os.path.exists(path):
        return {}
    runs = {}
    for name, r in _load(path)['runs'].items():
        family = _family_of(name)
        if family is not None:
            runs[name] = dict(summary=r['summary'], epochs=r['epochs'], family=family, lineage=set(r['lineage']),
                              chain=list(r['lineage']), live=False, source=r.get('source', ''),
                              hours=r.get('hours'))
    return runs


def write_ledger(runs: dict, path: str = LEDGER) -> None:
    """Merge ``runs`` into the ledger (temp file, then rename); a live run replaces its recorded entry."""
    ledger = _load(path) if os.path.exists(path) else {'runs': {}}
    for name, r in runs.items():
        if r.get('live'):
            ledger['runs'][name] = dict(epochs=r['epochs'], lineage=r['chain'],
                                        summary={k: r['summary'][k] for k in LEDGER_SUMMARY_KEYS},
                                        hours=round(r['hours'], 3),
                                        source=f"{name}/eval_*.json, recorded by cifar10_report.py")
    ledger['runs'] = dict(sorted(ledger['runs'].items(), key=lambda kv: (kv[1]['lineage'][-1], kv[1]['epochs'], kv[0])))
    atomic_write_text(path, json.dumps(ledger, indent=1) + '\n')


def _load(path):
    with open(path) as f:
        return json.load(f)


def _wall_time(run_dir: str) -> float:
    """Seconds between the log's first and last line (all sittings; gaps between sittings excluded)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))]
    total, prev = 0.0, None
    for r in rows:
        if prev is not None and r['time'] - prev < 600:
            total += r['time'] - prev
        prev = r['time']
    return total


def _images(data: str, n: int, model):
    loader = make_loader(DataSpec(data), 'test', build_transforms(model, False), 256, limit=n)
    return [(x, y) for x, y, _ in loader]


def _alpha_env(run: str) -> str:
    """The recipe's alpha list variable (and seed) set to ``run``'s, so that the commands train that run."""
    m = re.match(r'c10_r38_(long\d?|dp)_.*_a([\d.]+)$', run)
    seed = re.search(r'seed(\d+)_a', run)
    return (f'{m.group(1).upper()}_ALPHAS={m.group(2)} ' if m else '') + (f'SEED={seed.group(1)} ' if seed else '')


def _siblings(candidates: dict, chosen: str) -> list:
    """The other candidates started from the same run as ``chosen`` and trained as long (its replicates with another
    seed, its one-setting ablations): the card reports the spread of the recipe, not only the published draw."""
    start, epochs = candidates[chosen]['chain'][1:2], candidates[chosen]['epochs']
    return [n for n, c in candidates.items() if n != chosen and c['chain'][1:2] == start and c['epochs'] == epochs]


def _siblings_sentence(candidates: dict, chosen: str) -> str:
    siblings = _siblings(candidates, chosen)
    if not siblings:
        return ''
    gaps = [candidates[n]['gap'] for n in [chosen, *siblings]]
    listed = ', '.join(f"{n} {candidates[n]['summary']['top1']:.2f} % (gap {candidates[n]['gap']:.2f})"
                       for n in siblings)
    return (f' Other runs from the same start and budget (another seed, or one setting changed): {listed}; the mean '
            f'gap of all {len(gaps)} is {sum(gaps) / len(gaps):.2f}, so read this model as one draw of the recipe.')


def _recipe_stages(run: str, backbone: str) -> list:
    return RECIPE_STAGES[backbone] + [st for pattern, stages in RUN_STAGES.items()
                                      if fnmatch.fnmatchcase(run, pattern) for st in stages]


def _reproduce_commands(run: str, backbone: str) -> list:
    """Shell lines that train ``run``: the recipe script for a run of the shipped model's recipe, else the stages of
    the lineage script that made it."""
    recipe = re.fullmatch(r'c10_r38_dp_kdswa25(?:seed(\d+))?_a([\d.]+)', run)
    data = 'CIFAR10_DIR=../shared/data/cifar10/plain'
    if recipe:
        seed = f'SEED={recipe.group(1)} ' if recipe.group(1) else ''
        return [f'ALPHA={recipe.group(2)} {seed}{data} bash examples/cifar10_skipnet38.sh']
    return [f'{_alpha_env(run)}{data} bash {LINEAGES} {stage}' for stage in _recipe_stages(run, backbone)]


def _kind(name: str, family: dict) -> str:
    if name == family['backbone']:
        return 'backbone'
    if name in family['baselines']:
        return 'baseline'
    if name.startswith('c10_r38_thr_'):  # distilled ft from the published model (stage thr)
        return 'kd'
    suffixes = r'(\d+|ls|swa|wd|t|ent|seed\d+|rlswa|nodp)*'  # variants of a stage: kdswa, kdswaseed1, kdrlswa, ...
    return next((k for k in ('kd', 'ft', 'rl') if re.search(rf'_{k}{suffixes}_a', name)), 'rl')


# marker and legend text per kind of run; each family gets one colour
KIND_STYLE = {'backbone': ('s', 'ResNet-38 backbone (gates open)'),
              'baseline': ('D', 'same-budget baseline (gates open)'),
              'rl': ('o', 'SkipNet after rl'), 'ft': ('v', 'SkipNet after rl + ft'),
              'kd': ('*', 'SkipNet after rl + distilled ft')}


def _averaged(name: str) -> bool:
    """Runs whose weights are an SWA average: the *swa* stages and thr / thr_ctl (not thr_cos)."""
    return 'swa' in name or (name.startswith('c10_r38_thr_') and not name.endswith('_cos'))


def plot(points, path, published=None):
    """points: [(family label, kind, name, macs, top1)]; colour = family, marker = kind, the published run ringed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.plot([p[0] for p in PAPER_POINTS], [p[1] for p in PAPER_POINTS], 'o--', color='gray')
    ax.plot(*PAPER_R38, 's', color='gray', mfc='none', ms=9)
    families = list(dict.fromkeys(p[0] for p in points))
    colours = dict(zip(families, plt.rcParams['axes.prop_cycle'].by_key()['color']))
    for family, kind, name, macs, top1 in points:
        marker = KIND_STYLE[kind][0]
        averaged = _averaged(name)  # weight-averaged runs (--model-ema as SWA): black edge
        ax.plot(macs / 1e8, top1, marker, color=colours[family], ms=13 if marker == '*' else 8, alpha=0.9,
                mec='black' if averaged else colours[family], mew=1.2 if averaged else 1.0)
        if name == published:
            ax.plot(macs / 1e8, top1, 'o', mfc='none', mec='black', ms=20, mew=1.5)
            ax.annotate('published', (macs / 1e8, top1), xytext=(-70, 8), textcoords='offset points', fontsize=9)
    handles = [Line2D([], [], ls='--', marker='o', color='gray', label='SkipNet paper, HRL (R-38/74/110, lossless)'),
               Line2D([], [], ls='', marker='s', mfc='none', color='gray', label='paper ResNet-38')]
    handles += [Line2D([], [], ls='', marker='o', color=colours[f], label=f) for f in families]
    if any(_averaged(p[2]) for p in points):
        handles.append(Line2D([], [], ls='', marker='o', color='white', mec='black', mew=1.2,
                              label='black edge: weights averaged (SWA)'))
    kinds = list(dict.fromkeys(p[1] for p in points))
    handles += [Line2D([], [], ls='', marker=KIND_STYLE[k][0], color='black', mfc='white', ms=10 if k == 'kd' else 7,
                       label=KIND_STYLE[k][1]) for k in kinds]
    full = max(p[3] for p in points if p[1] in ('backbone', 'baseline'))
    ax.axvline(0.7 * full / 1e8, ls=':', color='black', lw=1)  # the target: >= 30 % fewer MACs
    ax.axhline(90.0, ls=':', color='black', lw=1)  # ... and a >= 90 % baseline
    handles.append(Line2D([], [], ls=':', color='black', lw=1, label='targets: 90 % baseline, 30 % fewer MACs'))
    ax.set_xlabel('MACs per image (x 1e8), exact count incl. gates')
    ax.set_ylabel('top-1 accuracy on the 10k test split (%)')
    ax.set_title('SkipNet-38 on CIFAR-10 (this repo, JPEG copy) vs the paper: accuracy vs compute')
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _config(run_dir: str) -> dict:
    ckpt = os.path.join(run_dir, 'checkpoints')
    return _load(os.path.join(ckpt, open(os.path.join(ckpt, 'latest')).read().strip(), 'trainer_state.json'))['config']


def _run_name(weights: str) -> str:
    """``runs/<name>/model`` or ``runs/<name>`` -> ``<name>``."""
    path = os.path.normpath(weights)
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) == 'model' else path)


def _is_run(path: str) -> bool:
    return os.path.exists(os.path.join(path, 'checkpoints', 'latest'))


def _origin(path: str):
    """Weights that are not a run (a copy of a published folder, a file with a threshold set) name the run or
    weights they came from in a sidecar, ``<file>.origin`` or ``<folder>/origin``, written by the recipe."""
    for f in (path + '.origin', os.path.join(path, 'origin')):
        if os.path.isfile(f):
            return open(f).read().strip()
    return None


def _chain(run_dir: str):
    """The run and every run it was started from (``--initial-checkpoint <run>/model``), newest first. The chain
    may end in a run that only the ledger knows (its checkpoints gone)."""
    chain = [run_dir]
    seen = {os.path.realpath(run_dir)}

    def visit(path):
        if os.path.realpath(path) in seen:
            raise SystemExit(f'{run_dir}: its --initial-checkpoint / origin chain loops back to {path}; fix the '
                             f'origin sidecars.')
        seen.add(os.path.realpath(path))
        return path

    parent = _config(run_dir)['initial_checkpoint']
    while parent:
        run = visit(os.path.dirname(os.path.normpath(parent)) if os.path.basename(os.path.normpath(parent)) == 'model'
                    else parent)
        while not _is_run(run) and _origin(run):
            run = visit(_origin(run))
        chain.append(run)
        if not _is_run(run):
            break  # a ledger-only run (or no run at all: _epochs says so)
        parent = _config(run)['initial_checkpoint']
    return chain


def _epochs(run_dir: str, ledger: dict) -> int:
    """Training budget in epochs, counted over the whole chain of runs (a ledger-only ancestor with its own)."""
    total = 0
    for r in _chain(run_dir):
        if _is_run(r):
            total += _config(r)['epochs']
        elif os.path.basename(os.path.normpath(r)) in ledger:
            total += ledger[os.path.basename(os.path.normpath(r))]['epochs']
        else:
            raise SystemExit(f'{run_dir} was trained from {r}, which is neither a run directory nor in the ledger: '
                             f'cannot count its epochs.')
    return total


def _lineage(run_dir: str, ledger: dict) -> list:
    names = [os.path.basename(os.path.normpath(c)) for c in _chain(run_dir)]
    return names + [n for n in ledger.get(names[-1], {}).get('chain', ()) if n not in names]  # ordered, to the root


def _eval(run_dir: str):
    files = glob.glob(os.path.join(run_dir, 'eval_*.json'))
    final = [f for f in files if '_epoch' not in f and not f.endswith(('eval_published.json', '_no_ema.json'))]
    return _load(final[0]) if len(final) == 1 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', default='runs')
    p.add_argument('--data', default=os.environ.get('CIFAR10_DIR', '../shared/data/cifar10/plain'))
    p.add_argument('--out', default=f'hub_configs/{TAG}')
    p.add_argument('--assets', default='docs')
    p.add_argument('--dry-run', action='store_true', help='print the table and the choice; measure and write nothing')
    p.add_argument('--ledger', default=LEDGER, help='the record of every run seen (read, and merged into)')
    args = p.parse_args()
    runs = read_ledger(args.ledger)  # name -> record; the runs found under --runs replace their recorded entries
    ledger = dict(runs)
    for family in FAMILIES:
        for name in [family['backbone'], *family['baselines']] + sorted(
                os.path.basename(d) for g in family['skipnets'] for d in glob.glob(os.path.join(args.runs, g))):
            run_dir = os.path.join(args.runs, name)
            summary = _eval(run_dir) if os.path.isdir(run_dir) else None
            if summary is not None:
                chain = _lineage(run_dir, ledger)
                runs[name] = dict(summary=summary, epochs=_epochs(run_dir, ledger), family=family, lineage=set(chain),
                                  chain=chain, live=True, hours=_wall_time(run_dir) / 3600)
    by_epochs = sorted(runs, key=lambda n: runs[n]['epochs'])
    runs = {n: runs[n] for f in FAMILIES for n in by_epochs if runs[n]['family'] is f}
    if not runs:
        raise SystemExit(f'No finished run under {args.runs} and no ledger at {args.ledger}: run '
                         f'examples/cifar10_skipnet38.sh first.')
    gates_open = [n for n, r in runs.items() if _kind(n, r['family']) in ('backbone', 'baseline')]
    top1 = {n: r['summary']['top1'] for n, r in runs.items()}
    best_resnet = max(gates_open, key=top1.get)  # of any family and budget: context, not the target's baseline
    candidates = {}
    for name, r in runs.items():
        if name in gates_open:
            continue
        same_budget = [n for n in gates_open if runs[n]['epochs'] >= r['epochs']
                       and r['family']['backbone'] in runs[n]['lineage']]
        if same_budget:  # the closest budget, never less; of two with that budget, the more accurate
            budget = min(runs[n]['epochs'] for n in same_budget)
            baseline = max((n for n in same_budget if runs[n]['epochs'] == budget), key=top1.get)
            candidates[name] = dict(r, baseline=baseline, best_resnet=best_resnet,
                                    gap=top1[baseline] - top1[name], gap_best=top1[best_resnet] - top1[name])
    if not candidates:
        raise SystemExit('No finished SkipNet run with a finished same-budget baseline yet: run '
                         'examples/cifar10_skipnet38.sh until an rl stage and its baseline end.')
    ok = {k: v for k, v in candidates.items() if v['gap'] <= 0.5 and v['summary']['macs_reduction_pct'] >= 30
          and top1[v['baseline']] >= BASELINE_TARGET}
    skipping = {k: v for k, v in candidates.items() if v['summary']['macs_reduction_pct'] >= 30} or candidates
    chosen = min(ok, key=lambda k: ok[k]['summary']['macs_mean']) if ok else \
        max(skipping, key=lambda k: skipping[k]['summary']['top1'])
    if args.dry_run:
        print_table(runs, candidates, args.runs)
        print(f"\nwould publish {chosen} ({'meets' if chosen in ok else 'misses'} the target; same-budget baseline "
              f"{candidates[chosen]['baseline']}, best ResNet-38 of any budget {best_resnet})"
              + _siblings_sentence(candidates, chosen))
        return
    run_dir = os.path.join(args.runs, chosen)
    base_run = candidates[chosen]['baseline']
    base = runs[base_run]['summary']
    if not runs[chosen]['live']:
        _replot_published(runs, candidates, chosen, args)
        return

    model = timm.create_model(f'local-dir:{os.path.abspath(run_dir)}/model', pretrained=True).eval()
    # the ResNet-38's speed: the same architecture with every gate open, i.e. the plain ResNet-38 computation (no
    # gate runs); speed does not depend on the weights, so the baseline's own weights are not needed
    baseline = timm.create_model(f'local-dir:{os.path.abspath(run_dir)}/model', pretrained=True).eval()
    baseline.set_gate_policy('open')
    batches = _images(args.data, 10_000, model)
    measured = speedup_on_images(model, baseline, torch.cat([x for x, _ in batches]))
    speed = {bs: (m['model_img_per_s'], m['baseline_img_per_s']) for bs, m in measured.items()}
    first_1000 = _first_n_top1(model, batches, 1000)

    plot_path = _plot_runs(runs, args.assets, chosen)

    s = runs[chosen]['summary']
    cfg = _config(run_dir)
    # the whole lineage, ledger-only ancestors included; their hours where the ledger recorded them
    chain = _lineage(run_dir, ledger)
    def run_hours(name):
        recorded = (runs.get(name) or ledger.get(name) or {}).get('hours')
        if recorded is not None:
            return recorded
        path = os.path.join(args.runs, name)
        return _wall_time(path) / 3600 if _is_run(path) else None

    hours_by_run = {n: run_hours(n) for n in chain}
    hours = sum(h for h in hours_by_run.values() if h is not None)
    untimed = [n for n, h in hours_by_run.items() if h is None]
    best_resnet = candidates[chosen]['best_resnet']
    target = (f'>= 30 % fewer MACs within 0.5 points of the same-budget baseline, the most accurate gates-open '
              f'ResNet-38 of its lineage with the closest budget (never less), which must reach '
              f'{BASELINE_TARGET:.1f} %')
    verdict = f'meets the target ({target})' if chosen in ok else f'MISSES the target ({target})'
    rows = []
    for name in dict.fromkeys([base_run, best_resnet]):
        roles = ' and '.join(role for role, n in (('same-budget baseline', base_run),
                                                  ('most accurate ResNet-38 of any budget', best_resnet)) if n == name)
        rows.append(f"| ResNet-38 {name} ({runs[name]['epochs']} epochs, gates open, {roles}) "
                    f"| {runs[name]['summary']['top1']:.2f} | {runs[name]['summary']['macs_full'] / 1e6:.2f} | 0 % | "
                    + (f'{speed[1][1]:.0f} | {speed[256][1]:.0f} |' if name == base_run else '| |'))
    extra = '\n'.join([
        '## Comparison with the same-recipe baseline (measured)', '',
        '| model | top-1 (%) | MMACs / image | MACs reduction | CPU images/s, batch 1 | CPU images/s, batch 256 |',
        '|---|---:|---:|---:|---:|---:|', *rows,
        f"| this model ({chosen}, {runs[chosen]['epochs']} epochs) | {s['top1']:.2f} | {s['macs_mean'] / 1e6:.2f} | "
        f"{s['macs_reduction_pct']:.1f} % | {speed[1][0]:.0f} | {speed[256][0]:.0f} |", '',
        f'Wall-clock speed-up over the baseline on the CIFAR-10 test images (real skipping, CPU, '
        f'{torch.get_num_threads()} threads): {speed[1][0] / speed[1][1]:.2f}x at batch 1 (first 1,000 images), '
        f'{speed[256][0] / speed[256][1]:.2f}x at batch 256 (10,000 images); medians of 3 interleaved rounds.',
        f"This model {verdict}: {candidates[chosen]['gap']:.2f} points below its baseline, "
        f"{candidates[chosen]['gap_best']:.2f} below the most accurate ResNet-38 of any budget. Top-1 on the first "
        f'1,000 test images: {first_1000:.2f} %.' + _siblings_sentence(candidates, chosen), '',
        '## Reproduce', '', '```bash', *_reproduce_commands(chosen, candidates[chosen]['family']['backbone']),
        '.venv/bin/python examples/cifar10_report.py', '```', '',
        f"Training chain: {' <- '.join(chain)}"
        + (f" (the last stage distilled from {_run_name(cfg['distill_from'])}"
           f", weight {cfg['distill_weight']}, temperature {cfg['distill_temperature']})"
           if cfg.get('distill_from') else '') + f". Seed {cfg['seed']}; training time "
        f'{hours:.2f} h (sum of the logged intervals of every run in the chain; start-up and evaluation excluded; runs '
        f'that shared the two cores with other jobs count their slower wall time'
        + (f"; not counted, their time unrecorded: {', '.join(untimed)}" if untimed else '') + ') '
        f'on a 2-core CPU ({platform.machine()}), torch {torch.__version__}, no GPU. Data: the 50,000-image train '
        f'split of ../shared/data/cifar10/plain (JPEG quality 75 copy of CIFAR-10); results on its 10,000-image '
        f'test split.',
    ])
    s = dict(s, first_1000_top1=first_1000, dataset='CIFAR-10 (JPEG copy, ../shared/data/cifar10/plain)',
             speedup_batch1=speed[1][0] / speed[1][1], speedup_batch256=speed[256][0] / speed[256][1],
             baseline_run=base_run, baseline_top1=base['top1'], training_epochs=runs[chosen]['epochs'])
    eval_path = os.path.join(run_dir, 'eval_published.json')
    atomic_write_text(eval_path, json.dumps(s, indent=2))
    export_run(run_dir, args.out, repo_id=REPO, eval_json=eval_path, card_extra=extra)
    write_ledger(runs, args.ledger)
    print(f'published {chosen} to {args.out}; plot {plot_path}; ledger {args.ledger}')
    print_table(runs, candidates, args.runs)
    print(extra)


def _plot_runs(runs, assets: str, chosen: str) -> str:
    points = []
    for name, r in runs.items():
        s_, family = r['summary'], r['family']
        kind = _kind(name, family)
        label = f"{runs[family['backbone']]['epochs']}-epoch backbone family" if family['backbone'] in runs \
            else family['backbone']
        points.append((label, kind, name, s_['macs_full'] if kind in ('backbone', 'baseline') else s_['macs_mean'],
                       s_['top1']))
    os.makedirs(assets, exist_ok=True)
    return plot(points, os.path.join(assets, 'cifar10_accuracy_vs_macs.png'), published=chosen)


def _replot_published(runs, candidates, chosen: str, args) -> None:
    """The choice is a ledger-only run (its checkpoints are gone): it must be the published one; keep the folder,
    regenerate the plot, record the live runs."""
    results = os.path.join(args.out, 'eval_results.json')
    if not os.path.isfile(results):
        raise SystemExit(f'{chosen} is the best run but only the ledger knows it (no {args.runs}/{chosen}) and '
                         f'{args.out} has no eval_results.json to show it is published there: retrain it '
                         f'(examples/cifar10_skipnet38.sh) or restore the published folder.')
    published = _load(results)
    if abs(published['top1'] - runs[chosen]['summary']['top1']) > 1e-9 or \
            abs(published['macs_mean'] - runs[chosen]['summary']['macs_mean']) > 1e-3:
        raise SystemExit(f'{chosen} is the best run but only the ledger knows it (no {args.runs}/{chosen}) and '
                         f'{args.out} holds another model: retrain it (examples/cifar10_skipnet38.sh) to publish it.')
    plot_path = _plot_runs(runs, args.assets, chosen)
    write_ledger(runs, args.ledger)
    print(f'{chosen} (already published in {args.out}, weights unchanged) is still the choice; plot {plot_path}; '
          f'ledger {args.ledger}')
    print_table(runs, candidates, args.runs)


def print_table(runs, candidates, runs_dir: str) -> None:
    print('\n| run | epochs | top-1 (%) | MMACs / image | fewer MACs | blocks run (of 18) '
          '| gap to same-budget baseline (the target) | gap to best ResNet-38 (any budget) | train time (this run) |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for name, r in runs.items():
        s_ = r['summary']
        gates_open = _kind(name, r['family']) in ('backbone', 'baseline')  # run as the plain ResNet: no gate cost
        macs, fewer = (s_['macs_full'], 0.0) if gates_open else (s_['macs_mean'], s_['macs_reduction_pct'])
        c = candidates.get(name)
        gap = f"{c['gap']:.2f} ({c['baseline']})" if c else ''
        gap_best = f"{c['gap_best']:.2f}" if c else ''
        hours = f"{_wall_time(os.path.join(runs_dir, name)) / 3600:.2f} h" if r['live'] else 'ledger'
        print(f"| {name} | {r['epochs']} | {s_['top1']:.2f} | {macs / 1e6:.2f} | "
              f"{fewer:.1f} % | {s_['executed_blocks_mean']:.2f} | {gap} | {gap_best} | {hours} |")


def _first_n_top1(model, batches, n: int) -> float:
    xs = torch.cat([x for x, _ in batches])[:n]
    ys = torch.cat([y for _, y in batches])[:n]
    with torch.inference_mode():
        return 100.0 * (model(xs).argmax(1) == ys).float().mean().item()


if __name__ == '__main__':
    main()
