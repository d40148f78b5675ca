"""Datasets named as timm's ``train.py`` names them (``timm.data.create_dataset``), with the model's preprocessing.

    flowers/                 an image folder (class subfolders, or train/ and val/ with class subfolders)
    hfds/NAME                a Hugging Face dataset: a local copy (a folder ``load_dataset`` reads, e.g. one written
                             with ``save_to_disk`` or parquet files), one in the cache (``data_dir``), or downloaded
                             with ``download=True``
    torch/NAME               a torchvision dataset (mnist, fashion_mnist, kmnist, cifar10, cifar100, ...) in
                             ``data_dir``, or downloaded there with ``download=True``
    wds/NAME                 WebDataset shards in ``data_dir`` (``_info.json`` naming the splits' shards, or a split
                             such as ``NAME-train-{0000..0099}.tar|100000``), streamed: for data that does not fit
                             one disk

    train, val, classes = task_datasets('hfds/beans', model, data_dir='hf_cache/', download=True)

Image folders keep ``image_folder_datasets``'s rules. Elsewhere the training split is ``train_split`` and the
validation split ``val_split``; when the data has no such split, ``val_fraction`` of each class of the training
split is held out (map-style datasets; a WebDataset then has no validation). Class names come from the dataset
(folder names, a ``ClassLabel`` feature, torchvision's ``classes``) or from a class map file (one name per line).
Labels are checked against the classes up front where the dataset lists them without reading images (Hugging Face
and torchvision datasets); otherwise ``train_task`` / ``evaluate`` check every batch.
"""
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import ChainDataset, ConcatDataset, Dataset, IterableDataset

from .data import ImageFiles, check_labels, data_config, image_folder_datasets
from .data.folders import _split
from .errors import DataError

__all__ = ['DATA_PREFIXES', 'DataSource', 'TaskData', 'parse_data', 'read_class_map', 'task_datasets',
           'eval_dataset']

#: The ``PREFIX/NAME`` datasets ``task_datasets`` takes (timm's ``create_dataset`` prefixes).
DATA_PREFIXES = ('hfds', 'torch', 'wds')
_NOT_SUPPORTED = {
    'hfids': 'streams from the Hub (no local copy); use hfds/NAME with a local copy, or wds/ shards',
    'tfds': 'needs TensorFlow; use hfds/, torch/ or wds/',
}


class DataSource(NamedTuple):
    """A parsed ``--data``: ``kind`` is ``folder`` or one of ``DATA_PREFIXES``; ``name`` the folder or the dataset
    name after the prefix."""
    kind: str
    name: str


class TaskData(NamedTuple):
    """What ``task_datasets`` returns; unpacks as ``train, val, class_names``."""
    train: Dataset
    val: Optional[Dataset]
    class_names: List[str]


def parse_data(data: Union[str, os.PathLike]) -> DataSource:
    """Split ``data`` into its kind and name: ``PREFIX/NAME`` for a known prefix (case-insensitive, as timm's),
    else a folder.

    Raises:
        DataError: a prefix timm knows that modcl does not take (``hfids/``, ``tfds/``), or a name missing after
            the prefix. A folder is not checked here.
    """
    text = os.fspath(data)
    prefix, sep, rest = text.partition('/')
    if sep and prefix.lower() in DATA_PREFIXES and not Path(prefix).is_dir():
        if not rest.strip('/'):
            raise DataError(f'{text!r}: name the dataset after {prefix.lower()}/ (e.g. {prefix.lower()}/NAME)')
        return DataSource(prefix.lower(), rest)
    if sep and prefix.lower() in _NOT_SUPPORTED and not Path(prefix).is_dir():
        raise DataError(f'{text!r}: {prefix.lower()}/ datasets are not supported ({_NOT_SUPPORTED[prefix.lower()]})')
    return DataSource('folder', text)


def describe_missing_folder(data: str) -> str:
    """Why a ``--data`` that is neither a prefixed dataset nor an existing folder cannot be used."""
    prefix, sep, _ = data.partition('/')
    hint = (f' (and {prefix + "/"!r} is not a dataset prefix: {", ".join(p + "/" for p in DATA_PREFIXES)})'
            if sep and prefix and not Path(prefix).exists() else '')
    return f'data folder {data!r} does not exist{hint}'


def read_class_map(path: Union[str, os.PathLike]) -> List[str]:
    """The class names of a class map file: a text file with one class name per line, in label order (timm's
    ``--class-map`` text format; pickled class maps are refused).

    Raises:
        DataError: missing or unreadable file, another format, no names, or a name given twice.
    """
    path = Path(path)
    if path.suffix.lower() not in ('.txt', ''):
        raise DataError(f'class map {str(path)!r}: expected a text file with one class name per line')
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read class map {str(path)!r}: {e}') from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f'class map {str(path)!r} names no classes')
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f'class map {str(path)!r} names class {n!r} twice')
        seen.add(n)
    return names


class _RGB:
    """A timm transform applied to an image converted to RGB (torchvision's MNIST gives grayscale images)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        if getattr(img, 'mode', 'RGB') != 'RGB':
            img = img.convert('RGB')
        return self.transform(img)


class _Transformed(Dataset):
    """``(transform(image), label)`` of some samples of a map-style dataset that yields ``(PIL image, label)``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform, class_names: Sequence[str]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.dataset[self.indices[i]][:2]
        return self.transform(img), label


class _SplitMissing(Exception):
    """The dataset has no split of the asked name (internal: the caller falls back)."""


@contextmanager
def _hub_offline(offline: bool):
    """``datasets`` without network while ``offline`` (a local copy or the cache only)."""
    if not offline:
        yield
        return
    import datasets
    from unittest import mock
    with mock.patch.object(datasets.config, 'HF_HUB_OFFLINE', True):
        yield


def _create(source: DataSource, split: str, *, data_dir: Optional[str], class_map: Optional[List[str]],
            download: bool, training: bool, seed: int, batch_size: int):
    """timm's ``create_dataset`` for one split, its errors turned into DataError (``_SplitMissing`` for a split
    the data does not have)."""
    from timm.data import create_dataset
    kind, name = source
    text = f'{kind}/{name}'
    kw: Dict[str, Any] = dict(root=data_dir, split=split, download=download)
    if kind == 'torch':
        if data_dir is None:
            raise DataError(f'{text!r} needs a data folder (--data-dir DIR): where the dataset is, or is downloaded '
                            f'to with --dataset-download')
        if class_map is not None:
            raise DataError('a class map applies to image folders, hfds/ and wds/ datasets, not torch/ datasets')
    elif kind == 'hfds':
        if class_map is not None:
            kw['class_map'] = {n: i for i, n in enumerate(class_map)}
    elif kind == 'wds':
        if data_dir is None or not Path(data_dir).is_dir():
            raise DataError(f'{text!r} needs the folder of its shards (--data-dir DIR)'
                            + ('' if data_dir is None else f'; {data_dir!r} is not a folder'))
        kw.update(is_training=training, seed=seed, batch_size=batch_size)
    try:
        if kind == 'wds':
            import webdataset  # noqa: F401  (timm's reader needs it)
        with _hub_offline(kind == 'hfds' and not download):
            return create_dataset(text, **kw)
    except ImportError as e:
        extra = 'datasets' if kind == 'hfds' else 'webdataset'
        raise DataError(f'{text!r} needs the {extra} package: pip install "timm_modcl[data]" ({e})') from None
    except AssertionError as e:  # timm's check of torch/ names
        raise DataError(f'{text!r}: {e or "unknown torchvision dataset"} (known: mnist, fashion_mnist, kmnist, '
                        f'cifar10, cifar100, qmnist, ...)') from None
    except Exception as e:  # noqa: BLE001 - datasets', torchvision's and webdataset's errors
        msg = ' '.join(str(e).split()) or type(e).__name__
        if ('Unknown split' in msg or 'not found in info' in msg or
                (kind == 'wds' and isinstance(e, (RuntimeError, KeyError)) and split in msg)):
            raise _SplitMissing(msg) from None
        if not download and (kind == 'torch' and 'not found' in msg.lower() or kind == 'hfds' and (
                'offline' in msg.lower() or "Couldn't reach" in msg or 'ConnectionError' in type(e).__name__)):
            raise DataError(f'{text!r} has no local copy' + (f' in {data_dir!r}' if data_dir else '')
                            + f'; pass --dataset-download to download it ({msg[:200]})') from None
        raise DataError(f'cannot read {text!r} (split {split!r}): {type(e).__name__}: {msg[:300]}') from None


def _class_names(ds, source: DataSource, class_map: Optional[List[str]], num_classes: Optional[int]) -> List[str]:
    if class_map is not None:
        return list(class_map)
    reader = getattr(ds, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None)
    if mapping:
        return [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    classes = getattr(ds, 'classes', None)
    if classes:
        return [str(c) for c in classes]
    if num_classes is not None:
        return [str(i) for i in range(num_classes)]
    raise DataError(f'{source.kind}/{source.name} does not list its classes: give their number (--num-classes N) '
                    f'or their names (--class-map FILE, one name per line)')


def _labels(ds) -> Optional[List[int]]:
    """Every label of a map-style dataset, when it can be had without reading images; else ``None``."""
    targets = getattr(ds, 'targets', None)
    if targets is not None:
        return [int(t) for t in targets]
    reader = getattr(ds, 'reader', None)
    if reader is not None and hasattr(reader, 'iter_targets'):
        try:
            return [int(t) for t in reader.iter_targets()]
        except KeyError as e:  # timm's class-map remapping of a class the map does not name
            raise DataError(f'label {e} is not among the classes of the class map') from None
    return None


def _check(labels: Optional[List[int]], classes: List[str], what: str) -> None:
    if labels is None:
        return
    try:
        check_labels(torch.tensor(labels, dtype=torch.long), len(classes))
    except DataError as e:
        raise DataError(f'{what}: {e}') from None


def _transforms(model: Optional[nn.Module], input_size: Optional[int], augment: bool):
    from timm.data import create_transform
    cfg = data_config(model, input_size)
    return (_RGB(create_transform(**cfg, is_training=True, no_aug=not augment)),
            _RGB(create_transform(**cfg, is_training=False)))


def _one_split(source, split, transform, opts, training, class_map, num_classes):
    """``(dataset with transform, class names, labels or None)`` of one split (map-style: a ``_Transformed``)."""
    ds = _create(source, split, training=training, class_map=class_map, **opts)
    classes = _class_names(ds, source, class_map, num_classes)
    what = f'{source.kind}/{source.name} (split {split!r})'
    if isinstance(ds, IterableDataset):
        ds.transform = transform
        ds.class_names = classes
        return ds, classes, None
    labels = _labels(ds)
    _check(labels, classes, what)
    return _Transformed(ds, range(len(ds)), transform, classes), classes, labels


def task_datasets(
        data: Union[str, os.PathLike],
        model: Optional[nn.Module] = None,
        *,
        data_dir: Optional[str] = None,
        train_split: str = 'train',
        val_split: Optional[str] = 'validation',
        class_map: Optional[Union[str, os.PathLike]] = None,
        num_classes: Optional[int] = None,
        download: bool = False,
        val_fraction: float = 0.2,
        seed: int = 0,
        input_size: Optional[int] = None,
        augment: bool = True,
        batch_size: int = 32,
        class_names: Optional[Sequence[str]] = None,
) -> TaskData:
    """Training and validation datasets of a task from an image folder or a ``hfds/``, ``torch/`` or ``wds/``
    dataset (see the module docstring), with the model's timm preprocessing.

    Args:
        data: An image folder, or ``PREFIX/NAME``.
        model: Whose pretrained config gives the preprocessing (``None``: ImageNet defaults).
        data_dir: Where a prefixed dataset is (torch/: required; wds/: the shards' folder; hfds/: the datasets
            cache).
        train_split, val_split: Split names (``val_split=None``: no validation split, only ``val_fraction``).
            Image folders use their own ``train``/``val`` subfolders.
        class_map: A text file of class names, one per line, in label order (the classes and their order).
        num_classes: The number of classes of a WebDataset without a class map.
        download: Let Hugging Face or torchvision datasets download what is not there.
        val_fraction, seed: The share of each class held out for validation when there is no validation split.
        input_size: Square input size in pixels, overriding the model's.
        augment: timm's training augmentation for the training set.
        batch_size: Batch size hint of WebDataset readers.
        class_names: Fix the classes (a trained task's); the data's classes must be these.

    Returns:
        ``TaskData(train, val, class_names)``; a WebDataset's datasets are ``IterableDataset`` objects (iterate
        them through a DataLoader).

    Raises:
        DataError: unknown or unsupported prefix, missing folder or local copy (without ``download``), missing
            split, missing package, classes that cannot be known, labels outside the classes, classes other than
            ``class_names``, and what ``image_folder_datasets`` raises for folders.
    """
    source = parse_data(data)
    names = read_class_map(class_map) if class_map is not None else None
    if source.kind == 'folder':
        if not Path(source.name).exists():
            raise DataError(describe_missing_folder(source.name))
        return TaskData(*image_folder_datasets(
            source.name, model, input_size=input_size, val_fraction=val_fraction, seed=seed, augment=augment,
            class_names=class_names if class_names is not None else names))
    train_tf, eval_tf = _transforms(model, input_size, augment)
    opts = dict(data_dir=None if data_dir is None else str(data_dir), download=download, seed=seed,
                batch_size=batch_size)
    train, classes, labels = _one_split(source, train_split, train_tf, opts, True, names, num_classes)
    _same_classes(classes, class_names, f'{source.kind}/{source.name}')
    val = None
    if val_split:
        try:
            val, val_classes, _ = _one_split(source, val_split, eval_tf, opts, False, names, len(classes))
        except _SplitMissing:
            val = None
        else:
            if val_classes != classes:
                raise DataError(f'{source.kind}/{source.name}: the {val_split!r} split has other classes than the '
                                f'{train_split!r} split')
    if val is None and val_fraction > 0 and not isinstance(train, IterableDataset):
        first, second = _split([(i, y) for i, y in enumerate(labels if labels is not None else
                                                              [0] * len(train))], float(val_fraction), seed,
                               key=lambda s: s[0])
        base = train.dataset
        train = _Transformed(base, [i for i, _ in first], train_tf, classes)
        val = _Transformed(base, [i for i, _ in second], eval_tf, classes) if second else None
    return TaskData(train, val, classes)


def _same_classes(found: List[str], expected: Optional[Sequence[str]], what: str) -> None:
    if expected is None:
        return
    expected = [str(c) for c in expected]
    if len(found) != len(expected):
        raise DataError(f'{what} has {len(found)} classes; the task has {len(expected)}')
    if found != expected and not all(f.isdigit() for f in found):
        diff = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
        raise DataError(f'{what}: class {diff} is {found[diff]!r}; the task has {expected[diff]!r}')


def eval_dataset(
        data: Union[str, os.PathLike],
        model: Optional[nn.Module] = None,
        *,
        split: str = 'val',
        class_names: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> Optional[Dataset]:
    """The images to evaluate a task on, with the evaluation transform: ``split='val'`` the validation split as
    ``task_datasets`` makes it (``None`` if there is none), ``'all'`` every image (training and validation
    splits).

    Args:
        data, model: As ``task_datasets``.
        split: ``'val'`` or ``'all'``.
        class_names: The task's classes (``None``: the data's, which must then number ``num_classes``).
        num_classes: The task's number of classes.
        **kwargs: ``task_datasets``'s other arguments.

    Raises:
        DataError: as ``task_datasets``; an unknown ``split``; data with another number of classes than the task.
    """
    if split not in ('val', 'all'):
        raise DataError(f"split must be 'val' or 'all', got {split!r}")
    kwargs['augment'] = False
    if kwargs.get('num_classes') is None:  # a WebDataset without a class map has the task's classes
        kwargs['num_classes'] = len(class_names) if class_names is not None else num_classes
    if split == 'all':
        kwargs['val_fraction'] = 0.0
    train, val, classes = task_datasets(data, model, class_names=class_names, **kwargs)
    if class_names is None and num_classes is not None and len(classes) != num_classes:
        raise DataError(f'the task has {num_classes} classes, {os.fspath(data)!r} has {len(classes)}'
                        + (' class folders' if parse_data(data).kind == 'folder' else ''))
    if split == 'val':
        return val
    if isinstance(train, _Transformed):
        train = _Transformed(train.dataset, train.indices, _transforms(model, kwargs.get('input_size'), False)[1],
                             classes)
    else:  # an image folder's ImageFiles (its val/ folder, if any, is left out as before), or a WebDataset
        train.transform = _transforms(model, kwargs.get('input_size'), False)[1]
    if val is None or isinstance(train, ImageFiles):
        return train
    return ChainDataset([train, val]) if isinstance(train, IterableDataset) else ConcatDataset([train, val])
