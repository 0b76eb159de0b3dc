import timm
import torch

import timm_skipnet  # noqa: F401
from tests.helpers import randomize_gates
from timm_skipnet.evaluation import collect


def test_evaluation_runs_only_the_chosen_blocks_even_after_training_forced_dense_execution():
    model = timm.create_model('skipnet_resnet38_cifar', num_classes=10)
    randomize_gates(model, seed=1)
    model.set_execution('dense')  # what the trainer sets
    model.train()
    seen = []  # images each gated block received, per call
    for k, block in enumerate(model.blocks()[1:]):
        block.register_forward_hook(lambda m, args, out, k=k: seen.append((k, args[0].shape[0])))
    torch.manual_seed(0)
    loader = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), 0) for _ in range(2)]

    results = collect(model, loader)

    ran = torch.zeros(model.num_gated_blocks)
    for k, n in seen:
        ran[k] += n
    executed = results['actions'].sum(0)
    assert 0 < executed.sum() < executed.numel() * 32  # some blocks skipped for some images
    assert torch.equal(ran, executed)  # a block sees exactly the images whose gate said run
    assert model.execution == 'dense' and model.training  # the caller's settings come back


def test_eval_command_reports_what_a_direct_evaluation_of_the_published_model_measures(cifar10_dir, tmp_path):
    import json
    import os

    from timm_skipnet import cli
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = f'local-dir:{root}/hub_configs/skipnet_resnet38_cifar.cifar10'
    out = tmp_path / 'nested' / 'eval.json'
    cli.main(['eval', '--model', folder, '--dataset', cifar10_dir, '--max-images', '64', '--output', str(out)])
    summary = json.loads(out.read_text())

    model = timm.create_model(folder, pretrained=True).eval()
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 32, limit=64)
    direct = collect(model, loader)
    assert summary['num_images'] == 64 and summary['split'] == 'test'
    assert abs(summary['top1'] - 100.0 * (direct['preds'] == direct['labels']).float().mean().item()) < 1e-6
    assert abs(summary['executed_blocks_mean'] - (1 + direct['actions'].sum(1).mean().item())) < 1e-4
