"""`make demo`: SkipNet on CIFAR-10 in minutes on a CPU, ending with one table.

1. The shipped SkipNet-38 (hub_configs/skipnet_resnet38_cifar.cifar10), loaded as a user would, on the test split:
   top-1, exact MACs per image, the measured speed-up over the same network with every block running (a plain
   ResNet-38: same architecture and cost as the same-budget ResNet-38 baseline), and the per-gate plots.
2. The step every user takes: fine-tune a pretrained, gates-open ResNet-38 into a SkipNet with the hybrid trainer
   (rl, then a short ft). The start is the shipped model's backbone with fresh gates, all open: the gates-open
   baseline's own weights are not in the repository, and that backbone was itself trained to lose blocks, which is
   why a few hundred updates suffice here (a backbone from scratch takes the full recipe: hours).
3. How to reload, evaluate, analyse and publish the result.

Data: a local Parquet folder from --data or $CIFAR10_DIR; with neither, `uoft-cs/cifar10` is streamed from the Hub.
"""
import argparse
import os
import time

import timm
import torch
from accelerate.state import AcceleratorState

import timm_skipnet  # noqa: F401 -- registers the skipnet_* models with timm
from timm_skipnet.accounting import measure_mac_table
from timm_skipnet.analysis import compute_statistics, run_analysis, write_report
from timm_skipnet.bench import speedup_on_images
from timm_skipnet.data import DataSpec, build_transforms, make_loader
from timm_skipnet.evaluation import collect, summarize
from timm_skipnet.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, 'hub_configs', 'skipnet_resnet38_cifar.cifar10')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=os.environ.get('CIFAR10_DIR', 'uoft-cs/cifar10'))
    p.add_argument('--output', default='runs/demo', help='an existing folder resumes (or re-evaluates) its runs')
    p.add_argument('--test-images', type=int, default=10_000, help='test images for the shipped model')
    p.add_argument('--eval-images', type=int, default=2000, help='test images for the fine-tuned model')
    p.add_argument('--speed-images', type=int, default=2560, help='images timed at batch 256 (300 at batch 1)')
    p.add_argument('--rl-steps', type=int, default=250, help='rl updates')
    p.add_argument('--ft-steps', type=int, default=100, help='ft updates')
    p.add_argument('-b', '--batch-size', type=int, default=64)
    return p.parse_args()


def load_images(data: str, model, n: int):
    """The first ``n`` test images, decoded and preprocessed once: [(images, labels, n_bad)] batches of 256."""
    spec = DataSpec(data).resolved()
    return [b for b in make_loader(spec, spec.eval_split, build_transforms(model, False), 256, limit=n)]


def first(batches, n: int):
    """The first ``n`` images of ``batches``."""
    out, seen = [], 0
    for x, y, bad in batches:
        if seen >= n:
            break
        out.append((x[:n - seen], y[:n - seen], bad))
        seen += len(y)
    return out


def measure_speed(folder: str, images: torch.Tensor) -> dict:
    """Images/s of the SkipNet in ``folder`` on its own decisions against the same weights with every block running
    (gate policy 'open', no gate computed: the plain ResNet-38); medians of 3 interleaved rounds."""
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    resnet = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    resnet.set_gate_policy('open')
    return speedup_on_images(model, resnet, images, settings=((1, min(300, len(images))), (256, len(images))))


def shipped_model(args, out: str):
    """Part 1: the shipped SkipNet-38 as a user loads it; returns its summary, speed and the loaded test batches."""
    model = timm.create_model(f'local-dir:{SHIPPED}', pretrained=True).eval()
    batches = load_images(args.data, model, max(args.test_images, args.eval_images, args.speed_images))
    data = run_analysis(model, first(batches, args.test_images), scales=(1.0,), max_images=args.test_images,
                        progress=True, meta=dict(model=f'local-dir:{SHIPPED}', dataset=args.data, split='test'))
    summary = summarize(dict(preds=data.preds, labels=data.labels, actions=data.actions.float()),
                        measure_mac_table(model))
    plots = write_report(data, compute_statistics(data), os.path.join(out, 'shipped_analysis'))
    print('timing the shipped SkipNet-38 against the same weights with every block running ...', flush=True)
    images = torch.cat([x for x, _, _ in first(batches, args.speed_images)])
    return summary, measure_speed(SHIPPED, images), plots, batches, images


def finetune(args, out: str):
    """Part 2: a gates-open ResNet-38 -> rl -> ft with the hybrid trainer; returns (start, rl, ft) summaries."""
    common = dict(model='skipnet_resnet38_cifar', dataset=args.data, batch_size=args.batch_size,
                  eval_num_samples=args.eval_images, log_every=25, checkpoint_every=10_000, seed=0)
    stages = [
        # fresh gates at p = sigmoid(0.5) = 0.62 for every image: greedy, the start is the gates-open ResNet-38;
        # sampled, about 4 blocks in 10 are dropped while REINFORCE learns which ones the network can lose. A
        # constant lr and rl_weight 0.03 (3x the published recipe's) let the gates move within a few hundred
        # updates; alpha 1.2: skipping a block earns 1.2 / 17 = 0.07, weighed against the cross-entropy it adds
        ('rl', dict(stage='rl', steps=args.rl_steps, initial_checkpoint=SHIPPED, reset_gates=True, gate_init_bias=0.5,
                    lr=0.01, sched='none', weight_decay=1e-4, alpha=1.2, rl_weight=0.03, rl_baseline='batch_mean')),
        # the backbone fine-tuned under the learned greedy policy (gates frozen), distilled from the gates-open start
        ('ft', dict(stage='ft', steps=args.ft_steps, lr=0.01, sched='cosine', weight_decay=1e-4,
                    distill_from=SHIPPED, distill_gates='open', distill_weight=0.7, distill_temperature=1.0)),
    ]
    results, previous = {}, None
    for name, kw in stages:
        run = os.path.join(out, name)
        if previous:
            kw['initial_checkpoint'] = os.path.join(previous, 'model')
        if os.path.exists(os.path.join(run, 'checkpoints', 'latest')):
            kw['resume'] = run
        AcceleratorState._reset_state(True)
        print(f'\n== {name}: {kw["steps"]} updates of {args.batch_size} images ==', flush=True)
        results[name] = train(TrainConfig(output=run, **common, **kw))
        previous = run
    return results, previous


def _row(name, images, s, speed=None, resnet=False):
    macs = s['macs_full'] if resnet else s['macs_mean']
    fewer = 0.0 if resnet else round(s['macs_reduction_pct'], 1) + 0.0  # + 0.0: never '-0.0 %'
    sp = '1.00x / 1.00x (itself)' if resnet else (
        f"{speed[1]['speedup']:.2f}x / {speed[256]['speedup']:.2f}x" if speed else 'n/a')
    blocks = s['num_blocks'] if resnet else s['executed_blocks_mean']
    return f"| {name} | {images:,} | {s['top1']:.2f} | {macs / 1e6:.2f} | {fewer:.1f} % | {blocks:.2f} | {sp} |"


def main() -> None:
    args = parse_args()
    out = args.output
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    print(f'== 1. the shipped SkipNet-38, timm.create_model("local-dir:{SHIPPED}", pretrained=True): '
          f'{args.test_images:,} test images of {args.data} ==', flush=True)
    shipped, shipped_speed, plots, batches, images = shipped_model(args, out)
    t1 = time.perf_counter()

    # the start of part 2: the same weights run with every block (what --reset-gates with an open bias gives)
    start_model = timm.create_model(f'local-dir:{SHIPPED}', pretrained=True).eval()
    start_model.set_gate_policy('open')
    eval_batches = first(batches, args.eval_images)
    start = summarize(collect(start_model, eval_batches), measure_mac_table(start_model))
    print(f'\n== 2. fine-tune the gates-open ResNet-38 into a SkipNet: rl, then ft '
          f'(evaluated on {args.eval_images:,} test images) ==\n'
          f'The start is the shipped SkipNet-38 with fresh gates, all open: a gates-open ResNet-38 at '
          f"{start['top1']:.2f} % (the same-budget ResNet-38 baseline's own weights are not in the repository). That "
          'backbone was trained to run without some of its blocks, which is why a few hundred updates find them; a '
          'backbone never trained to lose blocks needs the full recipe (examples/cifar10_skipnet38.sh, hours).',
          flush=True)
    results, final_run = finetune(args, out)
    print('timing the fine-tuned SkipNet-38 against the same weights with every block running ...', flush=True)
    final_speed = measure_speed(os.path.join(final_run, 'model'), images)
    t2 = time.perf_counter()

    print(f'\n## SkipNet-38 on CIFAR-10 ({args.data}): measured by this run\n')
    print('| model | test images | top-1 (%) | MMACs / image (exact) | fewer MACs | blocks run (of 18) '
          '| speed-up over ResNet-38, batch 1 / 256 |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    print(_row('shipped SkipNet-38 (hub_configs/, local-dir:)', shipped['num_images'], shipped, shipped_speed))
    print(_row('ResNet-38: its backbone, every block running (the fine-tune\'s start)', start['num_images'], start,
               resnet=True))
    print(_row(f'after rl ({args.rl_steps} updates of {args.batch_size})', results['rl']['num_images'],
               results['rl']))
    print(_row(f'after rl + ft ({args.ft_steps} updates): the fine-tuned SkipNet-38', results['ft']['num_images'],
               results['ft'], final_speed))
    print(f'\nSpeed-up: images/s on this CPU ({torch.get_num_threads()} threads), SkipNet on its own decisions over '
          f'the same weights with every block running (the plain ResNet-38 computation), batch 1 on 300 images and '
          f'batch 256 on {len(images):,} (the first test images); medians of 3 '
          f'interleaved rounds. Per-gate plot of the shipped model: {plots["gate_rates"]} (all plots and a summary: '
          f'{os.path.dirname(plots["gate_rates"])}).')
    print(f'Wall time: {_minutes(t2 - t0)} (shipped model {_minutes(t1 - t0)}, fine-tune {_minutes(t2 - t1)}).')
    model_dir = os.path.abspath(os.path.join(final_run, 'model'))
    print(f"""
Next steps with the fine-tuned model ({model_dir}):
  reload:   model = timm.create_model("local-dir:{model_dir}", pretrained=True)   # after import timm_skipnet
  evaluate: timm-skipnet eval --model local-dir:{model_dir} --dataset {args.data}
  analyse:  timm-skipnet analyze --model local-dir:{model_dir} --dataset {args.data} --output {out}/analysis
  publish:  timm-skipnet export {final_run} --output hub_configs/skipnet_resnet38_cifar.my_tag --repo-id <you>/<name>
            timm-skipnet publish hub_configs/skipnet_resnet38_cifar.my_tag <you>/<name>
  the full recipe of the shipped model (hours on a CPU): bash examples/cifar10_skipnet38.sh""")


def _minutes(seconds: float) -> str:
    return f'{int(seconds // 60)} min {seconds % 60:.0f} s'


if __name__ == '__main__':
    main()
