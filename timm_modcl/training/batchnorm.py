"""The trained task's BatchNorm statistics: recalibration after training (plain averages over one pass of the
training data with the final weights) and, under DDP, their agreement across processes (rank 0's at the start,
averaged after every epoch, recalibrated over every process's batches)."""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed as _dist
from ..data import unpack_batch

__all__ = ['recalibrate_bn', 'task_bn_stats', 'average_bn_stats_', 'combine_recalibrated_bn_']


def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype,
                   progress: bool, task: str, comm: Optional[torch.device] = None) -> int:
    """Recompute the active task's BN running statistics as cumulative averages over one pass of ``loader``; with
    ``comm`` (DDP), over all processes' passes, each process weighted by its number of batches.

    Only the active task's statistics tensors change (the BN layers' buffers are that task's own); batches of one
    sample are skipped. When no batch is averaged, or on any error, the statistics are put back as they were.

    Returns:
        The number of batches averaged (over all processes with ``comm``).
    """
    from tqdm.auto import tqdm
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    model.train()
    batches, ok = 0, False
    try:
        for bn in bns:
            bn.reset_running_stats()  # in place: the active task's own statistics tensors
            bn.momentum = None        # cumulative moving average
        with torch.no_grad():
            for batch in tqdm(loader, desc=f'{task} BN statistics', disable=not progress, leave=False):
                x, _ = unpack_batch(batch, 'train_data')
                if x.shape[0] < 2:
                    continue
                x = x.to(device, non_blocking=True)
                model(x.to(dtype) if x.is_floating_point() else x)
                batches += 1
        if comm is not None:
            batches = combine_recalibrated_bn_(bns, batches, comm)
        ok = True
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        if batches == 0 or not ok:  # nothing to average (or an error): keep the statistics of training
            with torch.no_grad():
                for bn, (mean, var, n) in zip(bns, saved):
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(n)
    return batches


def task_bn_stats(model: nn.Module, task: str, kinds=('running_mean', 'running_var')) -> List[torch.Tensor]:
    """The live BatchNorm running-statistics tensors of ``task`` (floating point ones by default)."""
    return [t for k, t in model.task_tensors(task).items() if k.startswith('bn.') and k.rpartition('.')[2] in kinds]


def average_bn_stats_(model: nn.Module, task: str, device: torch.device) -> None:
    """Replace the task's BN running mean and variance by their average over the processes (one collective)."""
    if not _dist.is_distributed() or _dist.get_world_size() == 1:
        return
    world = _dist.get_world_size()

    def average(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(world)
    _dist.flat_collective_(task_bn_stats(model, task), device, average)


def combine_recalibrated_bn_(bns: Sequence[nn.Module], batches: int, device: torch.device) -> int:
    """Combine per-process cumulative BN averages over ``batches`` local batches into the average over all processes'
    batches (each process's statistics weighted by its batch count). Returns the total number of batches."""
    if not _dist.is_distributed() or _dist.get_world_size() == 1:
        return batches
    total = int(round(_dist.all_reduce_numbers([batches], device)[0]))
    if total == 0:
        return 0

    def weighted_average(flat: torch.Tensor) -> None:
        flat.mul_(batches)
        dist.all_reduce(flat)
        flat.div_(total)
    stats = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    _dist.flat_collective_(stats, device, weighted_average, dtype=torch.float64)
    with torch.no_grad():
        for bn in bns:
            bn.num_batches_tracked.fill_(total)
    return total
