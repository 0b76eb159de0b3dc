"""Every test runs offline with a private Hugging Face home, on the CPU, and sees the SkipNet models registered.

The CPU, also on a machine with a GPU: several tests train twice and compare the weights bit for bit, or re-check a
command's result with exact tolerances, which needs deterministic kernels the trainer does not switch on. Hiding
the GPU before torch is imported (here, and in every subprocess a test starts, which inherits the environment) keeps
the suite's results the same on every host. ``SKIPNET_TEST_CUDA=1`` keeps the GPU visible for the tests marked as
CUDA-only (``-k cuda``).

One intra-op thread per test process (SKIPNET_TEST_THREADS overrides; subprocesses inherit it through
OMP_NUM_THREADS): the tensors here are small, so a second thread buys little, and on cores shared with other work
two threads spin-wait for each other (a 16-image search took 51 s with two threads and 4 s with one on a busy 2-core
machine). `make test` runs two such processes instead (pytest-xdist).
"""
import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix='skipnet-hf-')
os.environ['HF_HOME'] = _HF_HOME
os.environ['HF_HUB_CACHE'] = os.path.join(_HF_HOME, 'hub')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
if not os.environ.get('SKIPNET_TEST_CUDA'):  # SKIPNET_TEST_CUDA=1 on a GPU host runs the CUDA-only tests too
    os.environ['CUDA_VISIBLE_DEVICES'] = ''
    os.environ['ACCELERATE_USE_CPU'] = 'true'
TEST_THREADS = int(os.environ.get('SKIPNET_TEST_THREADS', '1'))
os.environ['OMP_NUM_THREADS'] = str(TEST_THREADS)

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# A shuffled stream of several Parquet files reads them in threads; `datasets` then sleeps 5 s whenever such a stream
# is closed, so that pyarrow's reader threads end before a script that stops right after could exit (a hang at
# interpreter exit, apache/arrow#45214). The trainer closes one per epoch, and the tests train many epochs of 64
# images: in this long-lived process the wait cost minutes and protects nothing. Subprocesses keep it.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

import timm_skipnet  # noqa: E402,F401  -- registers the models at collection time

CIFAR10_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10', 'plain'))
SLICE_ROWS = 1000


def _require_cifar10() -> str:
    if not os.path.isdir(CIFAR10_DIR):
        pytest.fail(f'CIFAR-10 Parquet folder not found at {CIFAR10_DIR} (the project expects ../shared beside it).')
    return CIFAR10_DIR


@pytest.fixture
def cifar10_dir():
    return _require_cifar10()


@pytest.fixture(scope='session')
def cifar10_slice(tmp_path_factory):
    """The first 1,000 rows of each CIFAR-10 split in the same layout (``train-*.parquet``, ``test-*.parquet``, the
    Hub's class names in the schema): for tests that read a whole split, e.g. a uniform sample of it."""
    import pyarrow.parquet as pq
    src = _require_cifar10()
    out = tmp_path_factory.mktemp('cifar10_slice')
    for split in ('train', 'test'):
        first = sorted(f for f in os.listdir(src) if f.startswith(f'{split}-') and f.endswith('.parquet'))[0]
        table = pq.read_table(os.path.join(src, first)).slice(0, SLICE_ROWS)
        pq.write_table(table, out / f'{split}-00000-of-00001.parquet')
    return str(out)


torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
