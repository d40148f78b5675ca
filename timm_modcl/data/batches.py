"""Checking what a data loader yields: ``(image, label)`` batches (``unpack_batch``) and labels in range
(``check_labels``).
"""

from typing import Optional, Tuple

import torch

from ..errors import DataError


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
