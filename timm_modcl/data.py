"""Datasets for training and evaluating tasks: image folders (built with timm's data pipeline) and the bundled
scikit-learn digits, split into a sequence of tasks for the demo.

    train_ds, val_ds, class_names = image_folder_datasets('flowers/', model, input_size=160)
    tasks = digits_tasks(num_tasks=5, size=32)   # [(name, class_names, train, test), ...]
"""
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from .errors import DataError

__all__ = [
    'DigitsTask', 'FolderDatasets', 'ImageFiles', 'image_folder_datasets', 'data_config', 'eval_transform',
    'scan_image_folder', 'digits_tasks', 'image_files', 'read_rgb_image',
]

_VAL_SYNONYMS = ('val', 'validation', 'valid')


# ---------------------------------------------------------------------------------------------------- batches
def unpack_batch(batch, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a batch that a Dataset or DataLoader yields, or a DataError naming ``what``."""
    if isinstance(batch, dict):
        raise DataError(f'{what} yields dicts; expected (image, label) pairs')
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataError(f'{what} must yield (image, label) pairs, got {type(batch).__name__}')
    return batch[0], torch.as_tensor(batch[1])


def check_labels(y: torch.Tensor, num_classes: int, task: Optional[str] = None, images: Optional[int] = None) -> None:
    """Labels must be one integer class index per image, from 0 to ``num_classes - 1`` (not floats, not one-hot).

    Raises:
        DataError: naming the first problem.
    """
    whose = f' for task {task!r}' if task is not None else ''
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f'labels{whose} must be integer class indices, got dtype {str(y.dtype).replace("torch.", "")}')
    if y.ndim != 1:
        raise DataError(f'labels{whose} must be one class index per image (a 1-D tensor), got shape {tuple(y.shape)}')
    if images is not None and y.shape[0] != images:
        raise DataError(f'a batch has {images} images but {y.shape[0]} labels')
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f'label {bad} is out of range{whose}, which has {num_classes} classes '
                        f'(labels 0..{num_classes - 1})')


class FolderDatasets(NamedTuple):
    """What ``image_folder_datasets`` returns; unpacks as ``train, val, class_names``.

    Both datasets are ``ImageFiles`` objects, with ``samples``, ``class_names``, ``skipped_files`` (the unreadable
    files that were left out, as paths) and ``decode_failures``.
    """
    train: Dataset
    val: Optional[Dataset]
    class_names: List[str]


class DigitsTask(NamedTuple):
    """One task of ``digits_tasks``; unpacks as ``name, class_names, train, test``."""
    name: str
    class_names: List[str]
    train: TensorDataset
    test: TensorDataset


def _natural_key(s: str):
    from timm.utils.misc import natural_key
    return natural_key(s)


def _image_extensions() -> set:
    from timm.data.readers.img_extensions import get_img_extensions
    return {e.lower() for e in get_img_extensions(as_set=True)}


def image_files(paths: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """Image files to predict on: files as given, and every image file of a folder (sorted, not recursive).

    Raises:
        DataError: a folder without image files.
    """
    out: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            out.append(path)
            continue
        exts = _image_extensions()
        found = sorted(f for f in path.iterdir() if f.suffix.lower() in exts and f.is_file())
        if not found:
            raise DataError(f'{str(path)!r} is a folder without image files (extensions: {", ".join(sorted(exts))})')
        out.extend(found)
    return out


def read_rgb_image(path: Union[str, os.PathLike]):
    """An image file decoded with PIL and converted to RGB.

    Raises:
        FileNotFoundError: no such file.
        DataError: PIL cannot read it.
    """
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, 'image does not exist', str(path))
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        why = ' '.join((str(e).strip() or type(e).__name__).split())
        raise DataError(f'cannot read image {str(path)!r}: {why}') from None


def _is_readable_image(path: str) -> Optional[str]:
    """``None`` if PIL can open and verify the file, else the reason it cannot."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error, ...)
        return f'{type(e).__name__}: {e}' if str(e) else type(e).__name__
    return None


def scan_image_folder(
        folder: Union[str, os.PathLike],
        class_names: Optional[Sequence[str]] = None,
        *,
        verify: bool = True,
) -> Tuple[List[Tuple[str, int]], List[str], List[Tuple[str, str]]]:
    """Find the images of an ImageFolder layout: one subfolder per class, images anywhere below it.

    Args:
        folder: The folder with one subfolder per class.
        class_names: Fixes the classes and their order (e.g. the classes a task was trained on); the folder may
            then hold a subset of them. Default: the subfolders, in natural sort order.
        verify: Open every image with PIL (``Image.verify``) and leave out the ones that fail.

    Returns:
        ``(samples, class_names, skipped)``: ``(path, class index)`` pairs sorted by path, the class names, and
        ``(path, reason)`` for each unreadable file that was left out.

    Raises:
        DataError: if the folder is missing, has no class subfolders, a class subfolder without readable images,
            a class not among ``class_names``, or no images at all.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f'data folder {str(root)!r} does not exist')
    if not root.is_dir():
        raise DataError(f'data folder {str(root)!r} is not a folder')
    found = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.')), key=_natural_key)
    if not found:
        raise DataError(f'{str(root)!r} has no class subfolders: expected an ImageFolder layout '
                        f'(one subfolder per class with its images, e.g. {root / "cat" / "1.jpg"})')
    if class_names is None:
        class_names = found
    else:
        class_names = [str(c) for c in class_names]
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise DataError(f'{str(root)!r} has class folders {unknown[:5]} that are not among the '
                            f'{len(class_names)} classes {list(class_names)[:10]}')
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    exts = _image_extensions()
    samples: List[Tuple[str, int]] = []
    skipped: List[Tuple[str, str]] = []
    empty: List[str] = []
    for cls in found:
        n = 0
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
            for fname in sorted(filenames):
                if fname.startswith('.') or os.path.splitext(fname)[1].lower() not in exts:
                    continue
                path = os.path.join(dirpath, fname)
                reason = _is_readable_image(path) if verify else None
                if reason is not None:
                    skipped.append((path, reason))
                    continue
                samples.append((path, class_to_idx[cls]))
                n += 1
        if n == 0:
            empty.append(cls)
    if empty:
        raise DataError(
            f'class folder(s) {empty[:5]} in {str(root)!r} have no readable images '
            f'(image extensions: {", ".join(sorted(exts))}); remove the empty folders or add images'
            + (f'; {len(skipped)} unreadable file(s) were skipped' if skipped else ''))
    samples.sort(key=lambda s: _natural_key(s[0]))
    return samples, list(class_names), skipped


def data_config(model: Optional[nn.Module] = None, input_size: Optional[int] = None) -> Dict:
    """timm's data config (input size, interpolation, mean/std, crop) for ``model``, optionally at another size."""
    from timm.data import resolve_data_config
    if model is None:
        cfg = resolve_data_config({'input_size': (3, input_size or 224, input_size or 224)})
    else:
        cfg = resolve_data_config({}, model=model)
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise DataError(f'input_size must be a positive integer (pixels), got {input_size!r}')
        cfg['input_size'] = (3, input_size, input_size)
    return cfg


def eval_transform(model: Optional[nn.Module] = None, input_size: Optional[int] = None):
    """timm's evaluation transform (resize, center crop, normalise) for ``model``."""
    from timm.data import create_transform
    return create_transform(**data_config(model, input_size), is_training=False)


class ImageFiles(Dataset):
    """``(image, label)`` pairs from a list of image files, decoded with PIL in RGB (so grayscale, RGBA and palette
    images all become 3-channel inputs) and preprocessed with a timm transform.

    A file that cannot be decoded when it is read (e.g. a JPEG truncated at its end, which passes the up-front check)
    is named in a ``UserWarning`` and listed in ``decode_failures``, and the next readable sample is used instead, so
    one bad file does not end a long training run.

    Attributes:
        samples: ``(path, class index)`` pairs.
        class_names: The class names, in label order.
        skipped_files: Unreadable files left out up front.
        decode_failures: Files that failed to decode while reading (in this process).
    """

    _MAX_CONSECUTIVE_FAILURES = 20

    def __init__(self, samples: Sequence[Tuple[str, int]], class_names: Sequence[str], transform=None,
                 skipped_files: Sequence[str] = ()) -> None:
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.skipped_files = list(skipped_files)
        self.decode_failures: List[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image
        n = len(self.samples)
        if not -n <= index < n:  # ends iteration; within range, an image that fails to decode is replaced by the next
            raise IndexError(f'index {index} is out of range for {n} images')
        index %= n
        for attempt in range(min(n, self._MAX_CONSECUTIVE_FAILURES)):
            path, target = self.samples[(index + attempt) % n]
            try:
                with Image.open(path) as im:
                    img = im.convert('RGB')
            except Exception as e:  # PIL raises many types (OSError 'image file is truncated', SyntaxError, ...)
                if path not in self.decode_failures:
                    self.decode_failures.append(path)
                    warnings.warn(f'cannot decode image {path} ({type(e).__name__}: {e}); using the next image in '
                                  f'its place', UserWarning, stacklevel=2)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise DataError(f'{self._MAX_CONSECUTIVE_FAILURES} images in a row from {self.samples[index][0]!r} could not '
                        f'be decoded')


def _split(samples: List[Tuple[Any, int]], fraction: float, seed: int, key=None):
    """Stratified split of ``(item, class index)`` pairs: about ``fraction`` of each class to the second part, at least
    one image kept in the first; both sorted by ``key`` (default: the natural order of the item, a path)."""
    by_class: Dict[int, List[Tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    first, second = [], []
    for c in sorted(by_class):
        items = list(by_class[c])
        rng.shuffle(items)
        n_val = min(len(items) - 1, int(math.floor(len(items) * fraction + 0.5)))
        if fraction > 0 and n_val == 0 and len(items) >= 2:
            n_val = 1
        second += items[:n_val]
        first += items[n_val:]
    if key is None:
        key = lambda s: _natural_key(s[0])  # noqa: E731
    return sorted(first, key=key), sorted(second, key=key)


def image_folder_datasets(
        root: Union[str, os.PathLike],
        model: Optional[nn.Module] = None,
        *,
        train_split: str = 'train',
        val_split: str = 'val',
        val_fraction: float = 0.2,
        seed: int = 0,
        input_size: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        augment: bool = True,
) -> FolderDatasets:
    """Training and validation datasets from an image folder, with the model's timm preprocessing.

    Layouts:
      * ``root/<train_split>/<class>/...`` (and optionally ``root/<val_split>/<class>/...``, also found as
        ``validation`` or ``valid``): the given splits;
      * ``root/<class>/...``: one folder of classes, split per class into train and val by ``val_fraction``
        (stratified, reproducible with ``seed``; every class keeps at least one training image).

    Images are loaded by ``ImageFiles`` in RGB, so grayscale, RGBA and palette images all become 3-channel inputs,
    and preprocessed with timm's transforms. Every file is checked up front with PIL; unreadable ones are left out
    with a ``UserWarning`` that counts them (the datasets' ``skipped_files`` lists them); a file that still fails to
    decode later is named in a warning (see ``ImageFiles``).

    Args:
        root: The data folder.
        model: Model whose pretrained config gives the preprocessing (``timm.data.resolve_data_config``);
            ``None``: ImageNet defaults.
        train_split, val_split: Names of the split subfolders.
        val_fraction: Share of each class held out for validation when there is no validation folder (0: none,
            ``val`` is then ``None``).
        seed: Seed of that split.
        input_size: Square input size in pixels, overriding the model's (e.g. 32 for tiny images or fast tests).
        class_names: Fix the classes and their order (e.g. a trained task's classes when evaluating); the folders
            may hold a subset of them.
        augment: Use timm's training augmentation for the training set (else the evaluation transform).

    Returns:
        ``FolderDatasets(train, val, class_names)``.

    Raises:
        DataError: for a missing folder, no class folders, an empty class folder, no readable images, or classes
            of the validation folder that the training folder does not have.
    """
    from timm.data import create_transform
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f'val_fraction must be in [0, 1), got {val_fraction!r}')
    root = Path(root)
    if not root.exists():
        raise DataError(f'data folder {str(root)!r} does not exist')
    if not root.is_dir():
        raise DataError(f'data folder {str(root)!r} is not a folder')
    train_root = root / train_split
    val_root = None
    if train_root.is_dir():
        for name in (val_split,) + _VAL_SYNONYMS:
            if (root / name).is_dir():
                val_root = root / name
                break
    else:
        train_root = root

    train_samples, classes, skipped = scan_image_folder(train_root, class_names)
    val_samples: List[Tuple[str, int]] = []
    val_skipped: List[Tuple[str, str]] = []
    if val_root is not None:
        try:
            val_samples, _, val_skipped = scan_image_folder(val_root, classes)
        except DataError as e:
            raise DataError(f'validation split: {e}') from None
    elif val_fraction > 0:
        train_samples, val_samples = _split(train_samples, float(val_fraction), seed)
    all_skipped = skipped + val_skipped
    if all_skipped:
        shown = ', '.join(f'{os.path.relpath(p, root)} ({why})' for p, why in all_skipped[:3])
        warnings.warn(f'skipped {len(all_skipped)} unreadable image file(s) in {str(root)!r}: {shown}'
                      + (' ...' if len(all_skipped) > 3 else ''), UserWarning, stacklevel=2)

    cfg = data_config(model, input_size)
    train_tf = create_transform(**cfg, is_training=True, no_aug=not augment)
    eval_tf = create_transform(**cfg, is_training=False)
    train_ds = ImageFiles(train_samples, classes, train_tf, [p for p, _ in skipped])
    val_ds = None
    if val_samples:
        val_ds = ImageFiles(val_samples, classes, eval_tf, [p for p, _ in val_skipped])
    return FolderDatasets(train_ds, val_ds, classes)


# ---------------------------------------------------------------------------------------------- digits
def digits_tasks(
        num_tasks: int = 5,
        size: int = 32,
        seed: int = 0,
        *,
        test_fraction: float = 0.2,
        max_train_per_class: Optional[int] = None,
) -> List[DigitsTask]:
    """scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes) as a sequence of tasks.

    The classes 0-9 are split into ``num_tasks`` consecutive groups (5 tasks: 0/1, 2/3, 4/5, 6/7, 8/9), each a
    task with its own labels ``0..k-1``. Images are upsampled (bilinear) to ``size`` pixels, repeated to 3 channels
    and normalised with the ImageNet mean and std. The train/test split is stratified and fixed by ``seed``.

    Args:
        num_tasks: Number of tasks, 1-10.
        size: Image size in pixels.
        seed: Seed of the train/test split (and of the ``max_train_per_class`` subset).
        test_fraction: Share of each class in the test set.
        max_train_per_class: Keep at most this many training images per class (for quick runs).

    Returns:
        One ``DigitsTask(name, class_names, train, test)`` per task, named ``digits-0-1`` etc.

    Raises:
        DataError: on bad arguments; ImportError (with advice) if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('digits_tasks needs scikit-learn: pip install "timm_modcl[demo]"') from e
    import numpy as np
    import torch.nn.functional as F
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= 10:
        raise DataError(f'num_tasks must be an integer from 1 to 10, got {num_tasks!r}')
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise DataError(f'size must be an integer >= 8, got {size!r}')
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f'test_fraction must be in (0, 1), got {test_fraction!r}')

    digits = load_digits()
    x_all = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8 in [0, 1]
    y_all = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y_all)), test_size=test_fraction, random_state=seed, stratify=y_all)
    x = F.interpolate(x_all, size=(size, size), mode='bilinear', align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous()
    y = torch.from_numpy(y_all)
    rng = np.random.default_rng(seed)

    tasks = []
    for group in np.array_split(np.arange(10), num_tasks):
        classes = [int(c) for c in group]
        remap = {c: i for i, c in enumerate(classes)}

        def subset(indices, cap=None):
            chosen = []
            for c in classes:
                ci = indices[y_all[indices] == c]
                if cap is not None and len(ci) > cap:
                    ci = np.sort(rng.choice(ci, cap, replace=False))
                chosen.append(ci)
            sel = torch.from_numpy(np.sort(np.concatenate(chosen)))
            labels = torch.tensor([remap[int(t)] for t in y[sel]], dtype=torch.long)
            return TensorDataset(x[sel].clone(), labels)

        name = 'digits-' + '-'.join(str(c) for c in classes)
        tasks.append(DigitsTask(name, [str(c) for c in classes], subset(idx_train, max_train_per_class),
                                subset(idx_test)))
    return tasks
