"""``DistributedDataParallel`` around the active task (``wrap_ddp``, ``ddp_session``), the ``SyncBatchNorm`` swap of its
task-aware norms (``sync_batchnorm``), and the padding of a ``DistributedSampler`` (``padding_mask``).
"""

import contextlib
import warnings
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..errors import DistributedError


# ---------------------------------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` over a modcl model whose task is bound already.

    ``broadcast_buffers=False``: the frozen backbone (buffers) is never sent; the task's own BatchNorm statistics are
    kept consistent by ``training.batchnorm.average_bn_stats_`` (or SyncBatchNorm). DDP broadcasts rank 0's task
    parameters once.
    """
    with warnings.catch_warnings():
        # torch >= 2.14 deprecates broadcast_buffers for forward_sync_buffers, but forward_sync_buffers=False still
        # broadcasts every buffer (the whole frozen backbone) at construction; broadcast_buffers=False does not
        warnings.filterwarnings('ignore', message='.*broadcast_buffers.* is deprecated', category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)


@contextlib.contextmanager
def ddp_session(model: nn.Module, device: torch.device, enabled: bool, sync_bn: bool = False
                ) -> Iterator[nn.Module]:
    """The module to train with: ``model`` wrapped by ``wrap_ddp`` when ``enabled`` (its BatchNorm layers made
    ``SyncBatchNorm`` first with ``sync_bn``: DDP looks for them when it is built), else ``model`` itself. On exit the
    wrapper (and its reducer's gradient hooks) is dropped before the layers swap back.

    Raises:
        DistributedError: ``sync_bn`` with a BatchNorm type that has no synchronised counterpart.
    """
    if not enabled:
        yield model
        return
    with (sync_batchnorm(model) if sync_bn else contextlib.nullcontext()):
        net: Optional[nn.Module] = wrap_ddp(model, device)
        try:
            yield net
        finally:
            net = None


# ---------------------------------------------------------------------------------------------------- SyncBatchNorm
def _sync_base(base: type) -> type:
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    if base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return nn.SyncBatchNorm
    if base in (BatchNormAct2d, SyncBatchNormAct):
        return SyncBatchNormAct
    raise DistributedError(f'SyncBatchNorm: cannot convert {base.__module__}.{base.__qualname__} (only torch\'s '
                           f'BatchNorm1d/2d/3d and timm\'s BatchNormAct2d are supported)')


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module, process_group=None) -> Iterator[int]:
    """Run the model's BatchNorm layers as ``SyncBatchNorm`` inside the ``with`` block, in place.

    The task-aware BN layers keep their module objects, buffers and task bindings: only their class is swapped
    (``nn.BatchNorm2d`` -> ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` -> ``timm.layers.SyncBatchNormAct``) and
    swapped back on exit, so the model and its state dict are exactly as before. Yields the number of layers
    converted. (timm's and torch's ``convert_sync_batchnorm`` would build new modules, which cannot carry the
    per-task statistics, and fail on modcl's frozen affine buffers.) torch's SyncBatchNorm synchronises only GPU
    tensors in training.

    Raises:
        DistributedError: a BatchNorm layer of a type with no synchronised counterpart (nothing is changed then).
    """
    from ..layers import TaskNorm, plain_class, task_aware_class
    todo = []
    for m in model.modules():
        if isinstance(m, TaskNorm) and isinstance(m, nn.modules.batchnorm._BatchNorm):
            todo.append((m, type(m), task_aware_class(TaskNorm, _sync_base(plain_class(m)))))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise DistributedError(f'SyncBatchNorm: {type(m).__name__} is not a task-aware layer of a modcl model')
    for m, _, sync_cls in todo:
        m.__class__ = sync_cls
        m.process_group = process_group
    try:
        yield len(todo)
    finally:
        for m, cls, _ in todo:
            m.__class__ = cls
            m.__dict__.pop('process_group', None)


# ---------------------------------------------------------------------------------------------------- data
def padding_mask(sampler, start: int, count: int) -> Optional[torch.Tensor]:
    """For the ``count`` samples from position ``start`` of this process's share of a ``DistributedSampler``, which
    are real samples (``True``) and which are the padding it repeats so every process gets the same number.

    ``None`` when ``sampler`` is not a DistributedSampler (every sample is real).
    """
    from torch.utils.data.distributed import DistributedSampler
    if not isinstance(sampler, DistributedSampler):
        return None
    positions = sampler.rank + (torch.arange(start, start + count) * sampler.num_replicas)
    return positions < len(sampler.dataset)
