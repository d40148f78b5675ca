"""Image folders as datasets: finding and reading image files, ``scan_image_folder``, timm's evaluation transform
for a model (``data_config``, ``eval_transform``), ``ImageFiles`` and ``image_folder_datasets`` (train / validation).
"""

import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import DataError

_VAL_SYNONYMS = ('val', 'validation', 'valid')


class FolderDatasets(NamedTuple):
    """What ``image_folder_datasets`` returns; unpacks as ``train, val, class_names``.

    Both datasets are ``ImageFiles`` objects, with ``samples``, ``class_names``, ``skipped_files`` (the unreadable
    files that were left out, as paths) and ``decode_failures``.
    """
    train: Dataset
    val: Optional[Dataset]
    class_names: List[str]


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
