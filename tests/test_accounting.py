"""Exact compute accounting: the analytic per-image count equals FlopCounterMode over the sparse executor."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import randomize_gates
from timm_skipnet.accounting import measure_mac_table


@pytest.mark.parametrize('name,size,gate_type', [('skipnet_resnet38_cifar', 32, 'rnn'),
                                                 ('skipnet_resnet38_cifar', 32, 'ff1'),
                                                 ('skipnet_resnet50', 64, 'rnn')])
def test_analytic_macs_equal_the_flop_counter_over_sparse_execution_per_image_and_for_a_mixed_batch(name, size,
                                                                                                    gate_type):
    model = timm.create_model(name, gate_type=gate_type, execution='sparse').eval()
    randomize_gates(model)
    table = measure_mac_table(model, (3, size, size))
    x = torch.randn(6, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        trace = model.forward_with_gates(x)
    assert 0 < trace.actions.mean() < 1
    per_gate = trace.actions.mean(0)
    assert ((per_gate > 0) & (per_gate < 1)).any()  # a block runs for part of the batch: the gather path
    analytic = table.per_image_macs(trace.actions)
    assert analytic.std() > 0  # images take paths of different cost
    assert counter.get_total_flops() == 2 * analytic.sum().item()  # FlopCounterMode: 2 FLOPs per MAC
    for i in range(len(x)):  # batch 1: each image alone costs exactly its own count
        with FlopCounterMode(display=False) as one:
            single = model.forward_with_gates(x[i:i + 1])
        assert torch.equal(single.actions[0], trace.actions[i])
        assert one.get_total_flops() == 2 * analytic[i].item(), i


def test_cifar_resnet38_costs_match_the_reference_hook_counts():
    table = measure_mac_table(timm.create_model('skipnet_resnet38_cifar'))
    assert table.blocks[1] == 4_718_592  # ordinary BasicBlock
    assert table.blocks[6] == 3_670_016 and table.blocks[12] == 3_670_016  # downsampling blocks incl. projection
    assert table.shortcuts[6] == 131_072 and table.shortcuts[1] == 0  # a skipped block costs its projection only
    assert table.stem + table.head == 443_008
    assert table.full_macs == 83_280_512  # 0.833e8, the paper's Fig. 4 bar
    assert 0 < sum(table.gates) < 0.005 * table.blocks[1]  # the RNN gates are nearly free


def test_imagenet_resnet50_costs_match_the_reference_hook_counts():
    table = measure_mac_table(timm.create_model('skipnet_resnet50'))
    assert round(table.blocks[0] / 1e5) == 2312 and round(table.blocks[1] / 1e5) == 2184
    assert round(table.blocks[3] / 1e5) == 3725 and round(table.shortcuts[3] / 1e5) == 1028
    assert round(table.full_macs / 1e6) == 4089


def test_computation_percentage_is_the_paper_block_count_proxy():
    table = measure_mac_table(timm.create_model('skipnet_resnet38_cifar'))
    k = table.num_blocks - 1
    actions = torch.stack([torch.ones(k), torch.zeros(k), torch.tensor([1.0, 0.0] * 8 + [1.0])])
    cp = table.computation_percentage(actions)
    assert torch.allclose(cp, torch.tensor([100.0, 100.0 / 18, 100.0 * 10 / 18], dtype=torch.float64))
    macs = table.per_image_macs(actions)
    assert macs[0] == table.full_macs + sum(table.gates)
    assert macs[1] == table.stem + table.blocks[0] + table.head + sum(table.gates) + sum(table.shortcuts)
