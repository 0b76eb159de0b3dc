"""What a newcomer meets first: a README that fits a screenful of reading, no lab-notebook vocabulary, pretrained
weights that explain themselves when the Hub is out of reach, and `make demo` that runs end to end."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ROOT / 'hub_configs' / 'skipnet_resnet38_cifar.cifar10'


def test_readme_is_at_most_15000_characters():
    assert len((ROOT / 'README.md').read_text()) <= 15_000


def _tracked_text_files():
    names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.is_file() and path.suffix not in ('.png', '.safetensors', '.bin', '.pth', '.pt'):
            yield name, path.read_text(errors='ignore')


def test_no_file_speaks_of_numbered_work_sittings():
    # the repository speaks of the project: experiments carry dates or names, never the sitting that ran them
    # (code may still name APIs: pytest's scope='session', get_session(), requests.Session())
    word = re.compile(r'(?<![\w.])' + 'ses' + r'sions?(?![\w(])', re.IGNORECASE)
    api = re.compile(r'''scope=['"]''' + 'ses' + r'''sion['"]''')
    found = [name for name, text in _tracked_text_files() if word.search(api.sub('', text))]
    assert not found, f'files that mention work sittings: {found}'


def test_pretrained_without_the_hub_names_the_repo_and_the_shipped_folder():
    import timm

    # conftest runs offline (HF_HUB_OFFLINE=1) with an empty Hub cache: the download cannot succeed, and the
    # entrypoint itself says what to do
    with pytest.raises(RuntimeError) as info:
        timm.create_model('skipnet_resnet38_cifar.cifar10', pretrained=True)
    message = str(info.value)
    assert 'skipnet_resnet38_cifar.cifar10' in message and 'timm-skipnet/skipnet_resnet38_cifar.cifar10' in message
    assert f"timm.create_model('local-dir:{SHIPPED}', pretrained=True)" in message
    model = timm.create_model(f'local-dir:{SHIPPED}', pretrained=True)  # and the advice works
    assert model.num_classes == 10


def test_a_converted_base_model_without_the_hub_names_its_timm_repo():
    import timm
    with pytest.raises(RuntimeError, match='timm/resnet18.a1_in1k'):
        timm.create_model('skipnet_from_timm', base_model='resnet18.a1_in1k', base_pretrained=True)


def test_the_default_tag_and_a_backbone_tag_name_their_own_repos():
    from huggingface_hub.errors import LocalEntryNotFoundError

    from timm_skipnet.pretrained_errors import explain_missing_pretrained, missing_pretrained_message
    with pytest.raises(RuntimeError, match='timm/resnet50.tv_in1k') as info:
        with explain_missing_pretrained('skipnet_resnet50', 'tv_in1k'):
            raise LocalEntryNotFoundError('offline')
    assert 'local-dir:/path/to/folder' in str(info.value)  # nothing shipped for it: how to load a local copy
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    with pytest.raises(RuntimeError, match='timm-skipnet/skipnet_resnet38_cifar.cifar10'):
        with explain_missing_pretrained('skipnet_resnet38_cifar'):  # no tag: timm's default, the shipped one
            raise ConnectionError('no network')
    with pytest.raises(RuntimeError, match='timm/resnet50.tv_in1k'):
        with explain_missing_pretrained('resnet50.tv_in1k'):  # skipnet_from_timm's base_model, tag in the name
            raise LocalEntryNotFoundError('offline')
    assert 'the Hugging Face Hub,' in missing_pretrained_message('skipnet_x', None)


def test_errors_that_are_not_about_the_hub_pass_through():
    from timm_skipnet.pretrained_errors import explain_missing_pretrained
    with pytest.raises(ValueError, match='bad argument'):
        with explain_missing_pretrained('skipnet_resnet38_cifar', 'cifar10'):
            raise ValueError('bad argument')


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_slice(cifar10_dir, tmp_path):
    env = dict(os.environ, CIFAR10_DIR=cifar10_dir, OMP_NUM_THREADS=os.environ.get('SKIPNET_TEST_THREADS', '2'))
    out = subprocess.run(
        [sys.executable, str(ROOT / 'examples' / 'demo.py'), '--output', str(tmp_path / 'demo'), '--test-images', '300',
         '--eval-images', '256', '--speed-images', '256', '--rl-steps', '2', '--ft-steps', '2', '-b', '16'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout[out.stdout.index('## SkipNet-38 on CIFAR-10'):]
    assert table.count('\n| ') == 5  # header + the shipped, start, rl and ft rows
    assert '| shipped SkipNet-38 (hub_configs/, local-dir:) | 300 |' in table
    assert (tmp_path / 'demo' / 'shipped_analysis' / 'gate_execution_rates.png').stat().st_size > 10_000
    assert (tmp_path / 'demo' / 'ft' / 'model' / 'model.safetensors').exists()
    assert 'timm-skipnet eval --model local-dir:' in out.stdout and 'Wall time:' in out.stdout
