"""Streaming image-classification data: Hub datasets, local Parquet or image folders -> timm transforms.

Images are read undecoded and decoded here, so a corrupt file is counted and skipped instead of crashing the run,
and resuming can skip the already-seen part of an epoch without decoding it. Several processes split the stream
with ``split_dataset_by_node``; shuffling uses a buffer and a per-epoch seed (``set_epoch``).
"""
import io
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image

PRESETS: Dict[str, Dict] = {
    'uoft-cs/cifar10': dict(image_column='img', label_column='label', train_split='train', eval_split='test',
                            num_classes=10, train_num_samples=50_000, eval_num_samples=10_000),
    'uoft-cs/cifar100': dict(image_column='img', label_column='fine_label', train_split='train', eval_split='test',
                             num_classes=100, train_num_samples=50_000, eval_num_samples=10_000),
    'ILSVRC/imagenet-1k': dict(image_column='image', label_column='label', train_split='train',
                               eval_split='validation', num_classes=1000, train_num_samples=1_281_167,
                               eval_num_samples=50_000),
}
_GENERIC = dict(image_column='image', label_column='label', train_split='train', eval_split='test')


@dataclass
class DataSpec:
    """Where the data comes from and what its columns are called (presets fill the blanks)."""
    dataset: str = 'uoft-cs/cifar10'  # Hub name, or a local folder of Parquet files / class sub-folders
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: Optional[str] = None
    eval_split: Optional[str] = None
    num_classes: Optional[int] = None
    train_num_samples: Optional[int] = None  # epoch length of a stream (streams have no length)
    eval_num_samples: Optional[int] = None

    def resolved(self) -> 'DataSpec':
        preset = PRESETS.get(self.dataset, {})
        if not preset:
            check_local_path(self.dataset)
        if not preset and os.path.isdir(self.dataset):
            preset = _sniff_local(self.dataset)
        out = DataSpec(**{**_GENERIC, **preset, **{k: v for k, v in vars(self).items() if v is not None}})
        return out


def looks_like_path(name: str) -> bool:
    """A Hub dataset id is ``name`` or ``owner/name``; anything absolute, relative (``./``, ``~``), deeper, inside an
    existing local folder or ending in a file extension is a local path the user meant, never a Hub id to stream."""
    return (os.path.isabs(name) or name.startswith(('.', '~')) or name.count('/') > 1 or '\\' in name
            or ('/' in name and os.path.isdir(name.split('/')[0]))
            or name.endswith(('.parquet', '.arrow', '.jsonl', '.csv')))


def check_local_path(name: str) -> None:
    """Say that a local dataset path is missing (or is a file) instead of asking for --num-classes, then streaming it
    from the Hub under a name that does not exist there."""
    if os.path.isdir(name):
        return
    if os.path.isfile(name):
        raise ValueError(f"--dataset {name} is a file: pass the folder holding the '<split>-*.parquet' files or the "
                         f"'<split>/<class>/<image>' folders.")
    if looks_like_path(name):
        raise FileNotFoundError(f'--dataset {name} does not exist: pass an existing folder of Parquet files or an '
                                f'image folder (or a Hub dataset id such as uoft-cs/cifar10).')


def _parquet_files(folder: str, split: str) -> List[str]:
    files = sorted(f for f in os.listdir(folder) if f.endswith('.parquet') and f.startswith(f'{split}-'))
    return [os.path.join(folder, f) for f in files]


def _sniff_local(folder: str) -> Dict:
    """Columns, class count and split sizes of a local Parquet folder (Hub layout ``<split>-*.parquet``)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith('.parquet'))
    if not files:
        return {}
    import json

    import pyarrow.parquet as pq
    schema = pq.read_schema(os.path.join(folder, files[0]))
    out = {}
    for cand in ('img', 'image'):
        if cand in schema.names:
            out['image_column'] = cand
            break
    for cand in ('label', 'fine_label', 'labels'):
        if cand in schema.names:
            out['label_column'] = cand
            break
    hf_meta = json.loads((schema.metadata or {}).get(b'huggingface', b'{}'))
    label_feature = hf_meta.get('info', {}).get('features', {}).get(out.get('label_column', ''), {})
    if label_feature.get('names'):
        out['num_classes'] = len(label_feature['names'])
    splits = sorted({f.split('-')[0] for f in files})
    if 'test' not in splits and 'validation' in splits:
        out['eval_split'] = 'validation'
    rows = {sp: sum(pq.ParquetFile(os.path.join(folder, f)).metadata.num_rows for f in files
                    if f.split('-')[0] == sp) for sp in splits}
    out['train_num_samples'] = rows.get('train')
    out['eval_num_samples'] = rows.get(out.get('eval_split', 'test'))
    return {k: v for k, v in out.items() if v is not None}


def load_stream(spec: DataSpec, split: str):
    """An undecoded ``datasets.IterableDataset`` for ``split``."""
    import datasets
    spec = spec.resolved()
    src = spec.dataset
    if os.path.isdir(src):
        files = _parquet_files(src, split)
        if files:
            ds = datasets.load_dataset('parquet', data_files={split: files}, split=split, streaming=True)
        elif os.path.isdir(os.path.join(src, split)):
            ds = datasets.load_dataset('imagefolder', data_dir=os.path.join(src, split), split='train',
                                       streaming=True)
        else:
            raise FileNotFoundError(
                f"No data for split '{split}' in {src}: expected Parquet files named '{split}-*.parquet' or an image "
                f"folder '{src}/{split}/<class>/<image>'.")
    else:
        try:
            ds = datasets.load_dataset(src, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 -- re-raised with the fix
            raise RuntimeError(
                f"Could not stream '{src}' split '{split}' from the Hugging Face Hub ({type(e).__name__}: {e}). "
                f"Pass a local folder instead (--dataset /path/to/parquet_or_imagefolder), or check the name.") from e
    missing = [c for c in (spec.image_column, spec.label_column) if c not in (ds.column_names or [c])]
    if missing:
        raise KeyError(f'Columns {missing} not in {src} (has {ds.column_names}): set --image-column / '
                       f'--label-column.')
    return ds.cast_column(spec.image_column, datasets.Image(decode=False))


def decode_image(value) -> Image.Image:
    """PIL RGB image from a ``datasets.Image(decode=False)`` value (bytes or path)."""
    if isinstance(value, dict):
        data, path = value.get('bytes'), value.get('path')
        img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    else:
        img = value
    img.load()
    return img.convert('RGB')


class LabelError(ValueError):
    """A label no class index can mean (null, or outside ``0 .. num_classes - 1``): the row is never trained on or
    scored, since a wrong label silently changes the loss or the accuracy."""


def _bad_label_rows(source: str, split: str, column: str, num_classes: Optional[int], limit: int = 5) -> List[str]:
    """``file row N (value)`` for the first bad labels of a local Parquet split (one column read; error path only):
    the streamed position of a shuffled or sharded stream is no place a user can find."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    if not os.path.isdir(source):
        return []
    found = []
    for path in _parquet_files(source, split):
        labels = pq.read_table(path, columns=[column]).column(column)
        bad = pc.is_null(labels)
        if num_classes is not None:
            bad = pc.or_kleene(bad, pc.or_kleene(pc.less(labels, 0), pc.greater_equal(labels, num_classes)))
        for row in pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist():
            found.append(f'{path} row {row} ({labels[row].as_py()})')
            if len(found) >= limit:
                return found
    return found


def check_label(value, row: int, num_classes: Optional[int], column: str, split: str = '', source: str = '',
                position: str = 'row') -> int:
    """The class index of one row; :class:`LabelError` naming the split, column, row and value when it has none."""
    if value is None:
        problem = 'is null'
    elif isinstance(value, float) and value != value:
        problem = 'is NaN'
    else:
        label = int(value)  # not a number at all raises: counted with the undecodable rows (a wrong column)
        if label != value and not isinstance(value, str):
            problem = f'is {value!r}, not an integer class index'
        elif num_classes is not None and not 0 <= label < num_classes:
            problem = f'is {label}, outside 0..{num_classes - 1} ({num_classes} classes)'
        else:
            return label
    where = f"split '{split}' of {source}" if split else 'the data'
    message = (f"Label column '{column}', {position} {row} of {where} {problem}: such a row can be neither trained "
               f"on nor scored.")
    rows = _bad_label_rows(source, split, column, num_classes) if split and source else []
    if rows:
        message += ' Bad labels: ' + ', '.join(rows) + '.'
    if value is None or value == -1:
        message += ' A null or -1 label usually marks an unlabelled split (e.g. a Hub test split): use a labelled one.'
    message += ' Fix the data, or point --label-column / --num-classes at the right column and class count.'
    raise LabelError(message)


class ImageStream(torch.utils.data.IterableDataset):
    """Decodes and transforms a (sharded, shuffled) stream; yields ``(image, label)`` or ``None`` for a bad image.

    Labels are checked as they stream (null, or outside ``0 .. num_classes - 1`` when ``num_classes`` is given): a
    bad label raises :class:`LabelError` naming ``split``, the column, the row and the value, instead of being
    scored as a wrong prediction or crashing the loss with an IndexError. ``ordered``: the stream reads the split
    in file order (no shuffle, one reader), so its position is the split's row number."""

    def __init__(self, ds, transform: Callable, image_column: str, label_column: str, skip: int = 0,
                 limit: Optional[int] = None, num_classes: Optional[int] = None, split: str = '', source: str = '',
                 ordered: bool = True):
        super().__init__()
        self.ds, self.transform, self.skip, self.limit = ds, transform, skip, limit
        self.image_column, self.label_column = image_column, label_column
        self.num_classes, self.split, self.source, self.ordered = num_classes, split, source, ordered

    def __iter__(self) -> Iterator[Optional[Tuple[torch.Tensor, int]]]:
        good = bad = 0
        limit, worker = self.limit, torch.utils.data.get_worker_info()
        if limit is not None and worker is not None:  # each worker reads its own shards: share the cap
            limit = limit // worker.num_workers + (worker.id < limit % worker.num_workers)
        for i, row in enumerate(self.ds):
            if limit is not None and i >= limit:
                return
            if i < self.skip:
                continue
            try:
                label = check_label(row[self.label_column], i, self.num_classes, self.label_column, self.split,
                                    self.source, 'row' if self.ordered else 'streamed row')
                sample = self.transform(decode_image(row[self.image_column])), label
            except LabelError:
                raise
            except Exception as e:  # noqa: BLE001 -- an undecodable image is skipped and counted, never fatal
                bad += 1
                if good == 0 and bad >= 64:  # nothing decodes: a wrong column or split, not a few corrupt files
                    raise RuntimeError(f"The first {bad} samples all failed ({type(e).__name__}: {e}): check "
                                       f"--image-column '{self.image_column}' / --label-column "
                                       f"'{self.label_column}' and the split.") from e
                yield None
                continue
            good += 1
            yield sample


def uniform_sample(ds, n: int, seed: int = 0) -> list:
    """``n`` rows drawn uniformly without replacement from the whole (undecoded) stream by reservoir sampling
    (Algorithm R): one pass, ``n`` rows in memory, whatever the stream's order (image folders come sorted by class,
    so their first ``n`` rows, or a shuffle buffer's, are a few classes)."""
    import random
    rng, reservoir = random.Random(seed), []
    for i, row in enumerate(ds):
        if i < n:
            reservoir.append(row)
        else:
            j = rng.randint(0, i)
            if j < n:
                reservoir[j] = row
    return reservoir


def collate_skipping_bad(batch):
    """Stack good samples; return ``(images, labels, number_of_bad_images)``."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if not good:
        return None, None, n_bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, labels, n_bad


def build_transforms(model, is_training: bool, small_image_threshold: int = 64):
    """timm's transforms for the model's data config. Small inputs (CIFAR, 32 px) train with the classic
    pad-4 random crop + flip instead of timm's RandomResizedCrop, which is built for ImageNet-sized images."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms as T
    cfg = resolve_model_data_config(model)
    size = cfg['input_size'][-1]
    if is_training and size <= small_image_threshold:
        return T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(cfg['mean'], cfg['std'])])
    return create_transform(**cfg, is_training=is_training)


def reshard_for_workers(ds, workers: int, world_size: int = 1):
    """Each DataLoader worker reads whole shards, so two CIFAR files keep all but two workers idle: split by Parquet
    row group (``IterableDataset.reshard``, recent ``datasets``) when the workers outnumber the shards. Must precede
    the shuffle. A shard count that divided evenly between processes is kept divisible (else every process would
    read every shard and keep a row in ``world_size``)."""
    if workers * world_size <= ds.n_shards or not hasattr(ds, 'reshard'):
        return ds
    finer = ds.reshard()
    if world_size > 1 and ds.n_shards % world_size == 0 and finer.n_shards % world_size != 0:
        return ds
    return finer


def make_loader(spec: DataSpec, split: str, transform: Callable, batch_size: int, *, rank: int = 0,
                world_size: int = 1, shuffle: bool = False, seed: int = 0, epoch: int = 0, skip: int = 0,
                limit: Optional[int] = None, shuffle_buffer: int = 10_000, workers: int = 0,
                shard_for_workers: Optional[int] = None, num_classes: Optional[int] = None,
                check_labels: bool = True):
    """A DataLoader over this process's share of ``split``. ``skip`` drops already-seen samples of the epoch
    (resume) without decoding them; ``limit`` caps the samples per process (split between its workers). Labels
    must lie in ``0 .. num_classes - 1`` (default: the dataset's class count, when known; ``check_labels=False``:
    any non-null label, where labels are never read).
    ``shard_for_workers`` (default: ``workers``) decides the sharding, hence the order of a shuffled stream: a
    resume that reads in one process passes the run's worker count to see the epoch in the same order."""
    from datasets.distributed import split_dataset_by_node
    spec = spec.resolved()
    ds = reshard_for_workers(load_stream(spec, split), workers if shard_for_workers is None else shard_for_workers,
                             world_size)
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        ds.set_epoch(epoch)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    stream = ImageStream(ds, transform, spec.image_column, spec.label_column, skip=skip, limit=limit,
                         num_classes=None if not check_labels else num_classes or spec.num_classes, split=split,
                         source=spec.dataset, ordered=not shuffle and world_size == 1 and workers == 0)
    # an own generator: creating the iterator must not draw from the global RNG, or resuming would shift it
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate_skipping_bad,
                                       num_workers=workers, generator=generator)
