"""Every test runs offline with a private Hugging Face home, and sees the SkipNet models registered."""
import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix='skipnet-hf-')
os.environ['HF_HOME'] = _HF_HOME
os.environ['HF_HUB_CACHE'] = os.path.join(_HF_HOME, 'hub')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # noqa: E402
import torch  # noqa: E402

import timm_skipnet  # noqa: E402,F401  -- registers the models at collection time

CIFAR10_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10', 'plain'))


@pytest.fixture
def cifar10_dir():
    if not os.path.isdir(CIFAR10_DIR):
        pytest.fail(f'CIFAR-10 Parquet folder not found at {CIFAR10_DIR} (the project expects ../shared beside it).')
    return CIFAR10_DIR


if os.environ.get('SKIPNET_TEST_THREADS'):  # e.g. 1 while a training run shares the CPU
    torch.set_num_threads(int(os.environ['SKIPNET_TEST_THREADS']))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
