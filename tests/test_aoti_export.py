"""AOTInductor export keeps the skipping and the results: the compiled package against the eager model."""
import os

import pytest
import timm
import torch

import timm_skipnet  # noqa: F401
from timm_skipnet.aoti_export import export_aoti, load_aoti
from timm_skipnet.cli import main as cli
from timm_skipnet.onnx_export import prepare_for_export

SHIPPED = 'local-dir:hub_configs/skipnet_resnet38_cifar.cifar10'


def _test_images(model, cifar10_dir, n):
    from timm_skipnet.data import DataSpec, build_transforms, make_loader
    loader = make_loader(DataSpec(cifar10_dir), 'test', build_transforms(model, False), 16, limit=n)
    return torch.cat([b for b, _, _ in loader])


@pytest.mark.slow  # one ahead-of-time build (about 45-60 s on a 2-core CPU)
def test_the_shipped_model_compiled_ahead_of_time_skips_blocks_and_gives_the_eager_logits(cifar10_dir, tmp_path,
                                                                                          capsys):
    # Without one fixed layout for the torch.cond operands under export, inductor's layout optimisation handed the
    # branches channels-last tensors they were not traced for and the package computed wrong logits, silently.
    path = str(tmp_path / 'hub' / 'model.pt2')
    cli(['export-aoti', '--model', SHIPPED, '--pretrained', '--output', path, '--data', cifar10_dir,
         '--check-images', '16'])
    assert 'batch 1; AOTInductor vs eager on 16 test images' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'hub')) == ['model.pt2']  # no temporary file left beside it
    model = timm.create_model(SHIPPED, pretrained=True).eval()
    x = _test_images(model, cifar10_dir, 32)
    runner = load_aoti(path)
    with torch.no_grad():
        trace = model.forward_with_gates(x)
        got = torch.cat([runner(x[i:i + 1]) for i in range(x.shape[0])])
        model.set_gate_policy('open')
        every_block = model(x)
    assert trace.actions.sum(1).unique().numel() > 1  # the images take different paths
    torch.testing.assert_close(got, trace.logits, rtol=1e-4, atol=1e-4)
    assert (got - every_block).abs().amax(1).min() > 1e-2  # the package skipped blocks: not the every-block output


def test_preparing_a_prepared_copy_gives_an_equal_copy(cifar10_dir):
    model = timm.create_model(SHIPPED, pretrained=True).eval()
    x = _test_images(model, cifar10_dir, 8)
    once = prepare_for_export(model)
    twice = prepare_for_export(once)
    assert twice is not once
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x), rtol=0, atol=0)
        torch.testing.assert_close(once(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_aoti_package_path_must_end_in_pt2_and_must_exist(tmp_path):
    model = timm.create_model('skipnet_resnet38_cifar').eval()
    with pytest.raises(ValueError, match=r'\.pt2 file'):
        export_aoti(model, str(tmp_path / 'model.so'))
    with pytest.raises(ValueError, match='batch_size must be >= 1'):
        export_aoti(model, str(tmp_path / 'model.pt2'), batch_size=0)
    with pytest.raises(FileNotFoundError, match='export-aoti'):
        load_aoti(str(tmp_path / 'missing.pt2'))
