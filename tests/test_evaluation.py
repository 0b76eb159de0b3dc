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
