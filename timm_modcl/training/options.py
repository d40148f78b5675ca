"""The arguments of ``train_task`` as one value, checked before anything is changed or drawn."""
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from ..errors import DataError, TaskError
from ..model import is_modcl_model
from ..task import BASE_TASK
from .loaders import DataLike, check_dataset, data_len

__all__ = ['TrainOptions', 'check_task']

#: (name, check, what it must be) of the numeric arguments; ``None`` passes where the description says so
_NUMBERS = (('lr', lambda v: v > 0, 'a positive number'),
            ('head_lr', lambda v: v > 0, 'None or a positive number'),
            ('weight_decay', lambda v: v >= 0, 'a non-negative number'),
            ('gamma', lambda v: v > 0, 'a positive number'),
            ('label_smoothing', lambda v: 0 <= v < 1, 'a number from 0 to below 1'),
            ('grad_clip', lambda v: v > 0, 'None or a positive number'))


def _whole(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def check_task(model: nn.Module, task: str) -> int:
    """The number of classes of the trainable ``task`` of a modcl ``model``.

    Raises:
        TaskError: not a modcl model, the ``'base'`` task, a task without a head.
        TaskNotFoundError: the model has no such task.
    """
    if not is_modcl_model(model):
        raise TaskError(f'train_task needs a modcl model (timm.create_model("modcl_...") or timm_modcl.modulate), '
                        f'got {type(model).__name__}')
    info = model.task_info(task)  # TaskNotFoundError naming the model's tasks
    if task == BASE_TASK:
        raise TaskError(f'the {BASE_TASK!r} task is the frozen pretrained model and is not trained; add a task with '
                        f'model.add_task(name, num_classes) and train that')
    if int(info.num_classes) < 1 or not model.has_head:
        raise TaskError(f'task {task!r} has no classifier head to train')
    return int(info.num_classes)


@dataclass
class TrainOptions:
    """The keyword arguments of ``train_task`` (documented there); ``check`` validates them and fills defaults."""
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    head_lr: Optional[float] = 3e-4
    weight_decay: float = 0.0
    milestones: Optional[Sequence[int]] = None
    gamma: float = 0.1
    sched: str = 'cosine'
    warmup_epochs: int = 0
    opt: str = 'adam'
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None
    amp: Optional[bool] = None
    device: Any = None
    seed: Optional[int] = None
    num_workers: int = 0
    progress: bool = True
    callback: Optional[Callable[[Any], Optional[bool]]] = None
    recalibrate_bn: bool = True
    distributed: Optional[bool] = None
    sync_bn: bool = False
    checkpoint: Optional[Union[str, os.PathLike]] = None
    resume: bool = False
    prototypes: bool = True

    def check(self, task: str, train_data: DataLike, val_data: Optional[DataLike]) -> None:
        """Validate every argument (``milestones`` gets its default and is sorted).

        Raises:
            TaskError: a bad argument. DataError: bad or empty data, an ``IterableDataset``.
            CheckpointError: a checkpoint path that cannot be written.
        """
        if not _whole(self.epochs) or self.epochs < 0:
            raise TaskError(f'epochs must be a non-negative integer, got {self.epochs!r}')
        for name, ok, expected in _NUMBERS:
            v = getattr(self, name)
            if v is None and expected.startswith('None'):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise TaskError(f'{name} must be {expected}, got {v!r}')
        if not _whole(self.num_workers) or self.num_workers < 0:
            raise TaskError(f'num_workers must be a non-negative integer, got {self.num_workers!r}')
        if not isinstance(self.opt, str):
            raise TaskError(f'opt must be the name of a timm optimizer (e.g. \'adam\'), got {self.opt!r}')
        self.milestones = self._checked_milestones()
        if self.sched not in ('step', 'cosine'):
            raise TaskError(f"sched must be 'step' or 'cosine', got {self.sched!r}")
        if not _whole(self.warmup_epochs) or not 0 <= self.warmup_epochs <= max(self.epochs, 0):
            raise TaskError(f'warmup_epochs must be an integer from 0 to epochs ({self.epochs}), got '
                            f'{self.warmup_epochs!r}')
        if self.distributed not in (None, True, False):
            raise TaskError(f'distributed must be None, True or False, got {self.distributed!r}')
        self._check_checkpoint(task)
        self._check_data(train_data, val_data)

    def _checked_milestones(self) -> List[int]:
        milestones = self.milestones
        if milestones is None:
            milestones = [self.epochs // 2] if self.epochs >= 2 else []
        try:
            milestones = sorted(int(m) for m in milestones if not isinstance(m, bool))
        except (TypeError, ValueError):
            raise TaskError(f'milestones must be a list of epochs, got {milestones!r}') from None
        if any(m < 0 for m in milestones):
            raise TaskError(f'milestones must be non-negative epochs, got {milestones}')
        return milestones

    def _check_checkpoint(self, task: str) -> None:
        from .resume import check_checkpoint_path
        if self.resume and self.checkpoint is None:
            raise TaskError('resume=True needs checkpoint=PATH (the checkpoint to resume from)')
        if self.checkpoint is not None:
            check_checkpoint_path(self.checkpoint, task)

    def _check_data(self, train_data: DataLike, val_data: Optional[DataLike]) -> None:
        for what, data in (('train_data', train_data), ('val_data', val_data)):
            if data is not None and not isinstance(data, DataLoader):
                check_dataset(data, self.batch_size, what)
        if isinstance(train_data, IterableDataset):
            raise DataError('train_data is an IterableDataset, which train_task can neither shuffle nor shard: pass '
                            'a map-style Dataset, or a DataLoader over it (used as given; a resume then repeats the '
                            'stream\'s order only if the stream does)')

    def run_record(self, amp: bool, world: int, sync_bn: bool, train_data: DataLike) -> Dict[str, Any]:
        """What a checkpoint records of the run and a resume must find equal."""
        return {'epochs': self.epochs, 'batch_size': self.batch_size, 'lr': float(self.lr), 'head_lr': self.head_lr,
                'opt': self.opt, 'weight_decay': float(self.weight_decay), 'milestones': self.milestones,
                'gamma': float(self.gamma), 'sched': self.sched, 'warmup_epochs': self.warmup_epochs,
                'label_smoothing': float(self.label_smoothing), 'grad_clip': self.grad_clip, 'amp': amp,
                'seed': self.seed, 'world_size': world, 'sync_bn': sync_bn, 'train_size': data_len(train_data)}
