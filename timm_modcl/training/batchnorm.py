"""BatchNorm recalibration after training: the trained task's running statistics recomputed as plain averages over
one pass of the training data with the final weights (under DDP, over every process's batches)."""
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed as _dist
from ..data import unpack_batch

__all__ = ['recalibrate_bn']


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
            batches = _dist.combine_recalibrated_bn_(bns, batches, comm)
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
