"""The process group: who this process is (rank, world size, local rank), joining and leaving the group torchrun
describes (``init_distributed``, ``destroy_distributed``), the device collectives use, and ``barrier``.
"""

import atexit
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import DistributedError

_created_group = False


# ---------------------------------------------------------------------------------------------------- queries
def env_world_size() -> int:
    """The number of processes the launcher's environment (``WORLD_SIZE``, set by torchrun) describes, else 1."""
    try:
        return max(1, int(os.environ.get('WORLD_SIZE', '1')))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from torchrun; else the global rank)."""
    try:
        return int(os.environ['LOCAL_RANK'])
    except (KeyError, ValueError):
        return get_rank()


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that logs and saves."""
    return get_rank() == 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------------- setup
def _launched() -> bool:
    """Whether a launcher (torchrun) described a process group in the environment, of any size."""
    return all(os.environ.get(v) for v in ('WORLD_SIZE', 'RANK', 'MASTER_ADDR', 'MASTER_PORT'))


def init_distributed(device=None, backend: Optional[str] = None, timeout_s: Optional[float] = None,
                     even_alone: bool = False) -> bool:
    """Join the process group described by torchrun's environment (``env://``), unless one is initialised already.

    The backend is NCCL for a CUDA ``device`` (this process then uses ``cuda:LOCAL_RANK``) and gloo otherwise. A
    group created here is destroyed at interpreter exit (or by ``destroy_distributed``).

    Args:
        device: The device training will run on (``'cuda'`` / ``'cpu'`` / ``None`` for CPU).
        backend: Override the backend (``'gloo'``, ``'nccl'``).
        timeout_s: Timeout of collective operations (default: torch's).
        even_alone: Also join a group of one process (``torchrun --nproc_per_node 1``).

    Returns:
        Whether training is distributed: a process group of more than one process exists.

    Raises:
        DistributedError: the environment names several processes but not how to reach them, or NCCL/CUDA is asked
            for without CUDA.
    """
    global _created_group
    if is_distributed():
        return get_world_size() > 1
    if env_world_size() <= 1 and not (even_alone and _launched()):
        return False
    if not dist.is_available():
        raise DistributedError('WORLD_SIZE > 1 but this torch build has no torch.distributed')
    missing = [v for v in ('RANK', 'MASTER_ADDR', 'MASTER_PORT') if not os.environ.get(v)]
    if missing:
        raise DistributedError(f'WORLD_SIZE={os.environ.get("WORLD_SIZE")} is set but {", ".join(missing)} not: '
                               f'launch with torchrun (torchrun --nproc_per_node N ...)')
    device = torch.device('cpu') if device is None else torch.device(device)
    if backend is None:
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if device.type == 'cuda' or backend == 'nccl':
        if not torch.cuda.is_available():
            raise DistributedError(f'device {device} / backend {backend} asked for, but CUDA is not available')
        torch.cuda.set_device(get_local_rank() if device.index is None else device.index)
    kwargs = {} if timeout_s is None else {'timeout': datetime.timedelta(seconds=float(timeout_s))}
    dist.init_process_group(backend=backend, init_method='env://', **kwargs)
    _created_group = True
    atexit.register(destroy_distributed)
    return get_world_size() > 1


def destroy_distributed() -> None:
    """Destroy the process group if ``init_distributed`` created it (a group the caller made is left alone)."""
    global _created_group
    if _created_group and is_distributed():
        dist.destroy_process_group()
    _created_group = False


def resolve_distributed(distributed: Optional[bool], device) -> bool:
    """Whether to train with DDP: ``None`` decides from the process group (initialising torchrun's when needed),
    ``False`` never, ``True`` always (a process group must exist or be described by the environment).

    Raises:
        DistributedError: ``distributed=True`` without a process group or torchrun environment.
    """
    if distributed is False:
        return False
    if distributed is None:
        if is_distributed():
            return get_world_size() > 1
        return init_distributed(device) if env_world_size() > 1 else False
    if not is_distributed() and env_world_size() <= 1 and not _launched():
        raise DistributedError('distributed=True but there is no process group: launch with torchrun '
                               '(torchrun --nproc_per_node N ...) or call torch.distributed.init_process_group')
    init_distributed(device, even_alone=True)
    return True


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for collectives must live: the CUDA device for NCCL, else the CPU.

    Raises:
        DistributedError: the process group only has NCCL but the model is not on CUDA.
    """
    if device.type == 'cuda':
        return device
    backend = str(dist.get_backend()).lower()
    if 'gloo' not in backend and 'mpi' not in backend and 'cpu' not in backend:
        raise DistributedError(f'the process group uses {backend}, which cannot reduce CPU tensors; train on CUDA '
                               f'(device="cuda") or use the gloo backend for CPU training')
    return torch.device('cpu')


def barrier() -> None:
    """``torch.distributed.barrier()`` when distributed, else nothing."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()
