"""The main job (`make demo`): a short base -> sp -> rl run of SkipNet-38 on CIFAR-10, then the evaluation table.

Data: a local Parquet folder from --data or $CIFAR10_DIR; with neither, `uoft-cs/cifar10` is streamed from the Hub.
About 12 minutes on a 2-core CPU. The full recipe (hours) is examples/cifar10_skipnet38.sh.
"""
import argparse
import os

from accelerate.state import AcceleratorState

from timm_skipnet.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default=os.environ.get('CIFAR10_DIR', 'uoft-cs/cifar10'))
    parser.add_argument('--output', default='runs/demo')
    parser.add_argument('--base-epochs', type=int, default=3)
    parser.add_argument('--eval-images', type=int, default=2000)
    args = parser.parse_args()
    common = dict(model='skipnet_resnet38_cifar', dataset=args.data, batch_size=128, eval_num_samples=args.eval_images,
                  log_every=50, checkpoint_every=390, seed=0)
    stages = [
        ('base', dict(stage='base', epochs=args.base_epochs, lr=0.1, weight_decay=5e-4, warmup_epochs=0.2)),
        ('sp', dict(stage='sp', epochs=1, lr=0.01, weight_decay=5e-4, reset_gates=True, gate_init_bias=0.5)),
        # as in the full recipe: fresh gates at p = 0.5, so the backbone learns to run with blocks missing
        ('rl', dict(stage='rl', epochs=1, lr=0.01, weight_decay=1e-4, alpha=2.0, rl_baseline='batch_mean',
                    reset_gates=True, gate_init_bias=0.0)),
    ]
    results, previous = [], None
    for name, kw in stages:
        out = os.path.join(args.output, name)
        if previous:
            kw['initial_checkpoint'] = os.path.join(previous, 'model')
        if os.path.exists(os.path.join(out, 'checkpoints', 'latest')):
            kw['resume'] = out
        AcceleratorState._reset_state(True)
        results.append((name, train(TrainConfig(output=out, **common, **kw))))
        previous = out
    print(f'\n## SkipNet-38 demo on {args.data}: {args.eval_images} test images\n')
    print('| stage | top-1 (%) | MMACs / image (mean) | MACs reduction (exact) | computation % (paper proxy) |')
    print('|---|---:|---:|---:|---:|')
    for name, s in results:
        print(f"| {name} | {s['top1']:.2f} | {s['macs_mean'] / 1e6:.2f} of {s['macs_full'] / 1e6:.2f} | "
              f"{s['macs_reduction_pct']:.1f} % | {s['computation_percentage']:.1f} % |")
    print(f'\nReload the final model: timm.create_model("local-dir:{os.path.abspath(previous)}/model")')


if __name__ == '__main__':
    main()
