"""Computing a task's prototype statistics from its training data (``compute_task_statistics``)."""

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from .. import scorers as _scorers
from .._rng import keep_rng_on_error
from ..errors import DataError, StatisticsError, TaskError
from .prototypes import (
    DEFAULT_PROTOTYPE_POWER, DEFAULT_PROTOTYPE_RANK, DEFAULT_PROTOTYPE_SHRINKAGE, _Moments, _check_hyper, _power,
    check_prototype_statistics,
)


# ---------------------------------------------------------------------------------------------------- data
@keep_rng_on_error()
def compute_task_statistics(
        model: nn.Module,
        task: str,
        data,
        *,
        rank: int = DEFAULT_PROTOTYPE_RANK,
        power: float = DEFAULT_PROTOTYPE_POWER,
        shrinkage: float = DEFAULT_PROTOTYPE_SHRINKAGE,
        num_classes: Optional[int] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = False,
        all_reduce: bool = False,
) -> 'OrderedDict[str, torch.Tensor]':
    """Compute a task's prototype statistics from its training data and store them in the task.

    Runs the frozen, unmodulated backbone (the ``base`` task, eval mode, no autograd) over ``data`` and fits the
    Gaussian model of ``prototype_statistics`` to its pre-logits features. The statistics are stored as the task's
    ``proto_*`` statistics (saved in its adapter file; other statistics of the task are kept). The model is otherwise
    unchanged: its active task, train/eval modes, parameters and BatchNorm statistics stay as they were. Evaluation
    transforms give the best statistics; training augmentation is tolerated.

    Args:
        model: A modcl model with a timm ``forward_features`` / ``forward_head``.
        task: The task the data belongs to.
        data: A Dataset or DataLoader of ``(image, label)`` (images preprocessed as for the task), or a pair of
            tensors ``(images, labels)``.
        rank, power, shrinkage: See ``prototype_statistics``.
        num_classes: Number of classes (default: the task's; needed for a task without head).
        batch_size, num_workers: For the DataLoader made from a Dataset.
        progress: Show a tqdm progress bar.
        all_reduce: Sum the statistics over the processes of the default ``torch.distributed`` group (every
            process must call this with its shard of the data).

    Returns:
        The new statistics (the task's own tensors).

    Raises:
        TaskNotFoundError: for an unknown task.
        TaskError: bad hyper-parameters, or a task without classes and no ``num_classes``.
        DataError: for unusable data (not image/label pairs, labels out of range, no samples, statistics that
            would not load again).
        UnsupportedModelError: for a model without ``forward_features`` / ``forward_head(pre_logits=True)``.
        InputError: images the model cannot take (NaN/Inf values, wrong shape or dtype).
        On error the task's statistics and the global random states (torch, NumPy, Python) are as they were.
    """
    state = model.task_info(task)
    _check_hyper(rank, power, shrinkage)
    if num_classes is None:
        num_classes = int(state.num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TaskError(f'task {task!r} has no classes: pass num_classes= for its prototype statistics')
    if state.num_classes and num_classes != state.num_classes:
        raise TaskError(f'task {task!r} has {state.num_classes} classes, got num_classes={num_classes}')
    _scorers.check_all_reduce(all_reduce)
    moments: Optional[_Moments] = None

    def add(f: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal moments
        if moments is None:
            moments = _Moments(num_classes, f.shape[1])
        moments.add(_power(f.to(torch.float64), float(power)), y)
    _scorers.for_each_base_feature(model, task, data, num_classes, add, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress, desc='prototypes')
    dtype = model.backbone_dtype
    if moments is None:
        moments = _Moments(num_classes, 1)
    if all_reduce:
        moments.all_reduce()
    stats = moments.finish(rank, float(power), float(shrinkage))
    stats = OrderedDict((k, v.to(model.backbone_device, dtype if dtype.is_floating_point else torch.float32))
                        for k, v in stats.items())
    try:  # what is stored must load again (adapter files validate the statistics)
        check_prototype_statistics(stats, num_classes, None, task)
    except StatisticsError as e:
        raise DataError(f'the data gave unusable prototype statistics ({e}); use more varied samples or rank=0') \
            from None
    model.update_task_statistics(task, stats)
    return stats
