"""scikit-learn's bundled handwritten digits split into a sequence of small tasks (``digits_tasks``), for the demo and
the tests.
"""

from typing import List, NamedTuple, Optional

import torch
from torch.utils.data import TensorDataset

from ..errors import DataError


class DigitsTask(NamedTuple):
    """One task of ``digits_tasks``; unpacks as ``name, class_names, train, test``."""
    name: str
    class_names: List[str]
    train: TensorDataset
    test: TensorDataset


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
