"""Training one task on several processes with PyTorch's own engine (``torch.distributed``).

    torchrun --nproc_per_node 2 -m timm_modcl train --data flowers/ --task flowers --out adapters/
    torchrun --nproc_per_node 4 my_script.py      # a script that calls train_task(...)

Under torchrun, ``train_task`` joins the process group torchrun describes (gloo for CPU training, NCCL for CUDA; see
``init_distributed``), binds the task, and only then wraps the model in ``DistributedDataParallel``: DDP keeps the
Parameter objects it was given, and a modcl model's parameters are exactly the active task's. Frozen backbone
tensors are buffers, and DDP runs with ``broadcast_buffers=False``, so nothing frozen is sent per step; the active
task's BatchNorm running statistics are averaged across processes at the end of every epoch instead (or kept equal
by ``SyncBatchNorm``, see ``sync_batchnorm``). Datasets are sharded with ``DistributedSampler``; validation counts
are summed across processes with the sampler's padding left out, so every sample counts once.

The helpers here are small wrappers around ``torch.distributed``; they work (as no-ops) without a process group.
"""

import warnings

from .process import (
    barrier, comm_device, destroy_distributed, env_world_size, get_local_rank, get_rank, get_world_size,
    init_distributed, is_distributed, is_main_process, resolve_distributed, unwrap_model,
)
from .collectives import (
    T, all_gather_bytes, all_reduce_numbers, broadcast_bytes, broadcast_int, broadcast_tensors_, call_together,
    check_same_backbone, check_same_batches, flat_collective_, raise_together, rng_seed_for_run,
)
from .ddp import ddp_session, padding_mask, sync_batchnorm, wrap_ddp

__all__ = [
    'init_distributed', 'destroy_distributed', 'is_distributed', 'get_rank', 'get_world_size', 'get_local_rank',
    'is_main_process', 'env_world_size', 'unwrap_model', 'wrap_ddp', 'sync_batchnorm', 'barrier',
]

_MOVED = {'task_bn_stats', 'average_bn_stats_', 'combine_recalibrated_bn_'}


def __getattr__(name: str):
    """The trained task's BN helpers moved to ``timm_modcl.training.batchnorm`` (still reachable here, with a
    ``DeprecationWarning``)."""
    if name in _MOVED:
        warnings.warn(f'timm_modcl.distributed.{name} moved to timm_modcl.training.batchnorm.{name}',
                      DeprecationWarning, stacklevel=2)
        from ..training import batchnorm
        return getattr(batchnorm, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
