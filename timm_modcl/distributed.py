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
import atexit
import contextlib
import datetime
import json
import os
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import DistributedError

__all__ = [
    'init_distributed', 'destroy_distributed', 'is_distributed', 'get_rank', 'get_world_size', 'get_local_rank',
    'is_main_process', 'env_world_size', 'unwrap_model', 'wrap_ddp', 'sync_batchnorm', 'barrier',
]

_created_group = False
T = TypeVar('T')


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


# ---------------------------------------------------------------------------------------------------- collectives
def flat_collective_(tensors: Sequence[torch.Tensor], device: torch.device, collective,
                     dtype: Optional[torch.dtype] = None) -> None:
    """Run ``collective`` in place on the tensors flattened into one buffer per dtype (or into one buffer of
    ``dtype``), and copy the results back into the tensors (cast to their own dtype)."""
    groups = {}
    for t in tensors:
        groups.setdefault(dtype or t.dtype, []).append(t)
    for kind, group in groups.items():
        flat = torch.cat([t.detach().reshape(-1).to(device, kind) for t in group])
        collective(flat)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t).to(t.device, t.dtype))
                offset += n


def all_reduce_numbers(values: Sequence[float], device: torch.device, op: str = 'sum') -> List[float]:
    """Sum (or ``'max'``) numbers over all processes (one collective); the values themselves without a group."""
    if not is_distributed() or get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == 'max' else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_tensors_(tensors: Sequence[torch.Tensor], device: torch.device, src: int = 0) -> None:
    """Overwrite ``tensors`` on every process with rank ``src``'s values (grouped by dtype, one collective each)."""
    if not is_distributed() or get_world_size() == 1:
        return
    flat_collective_(tensors, device, lambda flat: dist.broadcast(flat, src=src))


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s integer on every process."""
    if not is_distributed() or get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_bytes(data: Optional[bytes], device: torch.device, src: int = 0) -> Optional[bytes]:
    """Rank ``src``'s bytes (or ``None``) on every process."""
    if not is_distributed() or get_world_size() == 1:
        return data
    n = broadcast_int(-1 if data is None else len(data), device, src)
    if n < 0:
        return None
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    if get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src)
    return bytes(buf.cpu().numpy().tobytes())


def all_gather_bytes(data: bytes, device: torch.device) -> List[bytes]:
    """Every process's ``data``, in rank order (``[data]`` without a group)."""
    if not is_distributed() or get_world_size() == 1:
        return [data]
    world = get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [bytes(b[:int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]


def raise_together(error: Optional[BaseException], device: torch.device) -> None:
    """Every process calls this at the same point with the error it met there (or ``None``). When any process met
    one, every process raises: its own error if it met one, else the first failing rank's error class (a
    ``ModCLError``; anything else becomes a ``DistributedError``) with its message, prefixed with that rank, instead
    of waiting in its next collective until the process group times out (gloo's "Connection closed by peer").
    Costs one small all-reduce.
    """
    if not is_distributed() or get_world_size() == 1:
        if error is not None:
            raise error
        return
    if all_reduce_numbers([0.0 if error is None else 1.0], device, op='max')[0] == 0:
        return
    from . import errors as _errors
    mine = None if error is None else [type(error).__name__, str(error)]
    reports = [json.loads(b.decode('utf-8')) for b in all_gather_bytes(json.dumps(mine).encode('utf-8'), device)]
    if error is not None:
        raise error
    rank, (name, message) = next((r, item) for r, item in enumerate(reports) if item is not None)
    cls = getattr(_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, _errors.ModCLError)):
        cls = DistributedError
    raise cls(f'process {rank} failed: {message}')


def call_together(fn: Callable[[], T], device: Optional[torch.device]) -> T:
    """``fn()``, called by every process at the same point (a training step): when it raises on any process, every
    process raises the same typed error (``raise_together``) instead of hanging in the next collective.
    ``device=None`` (not distributed): ``fn()`` alone, its error raised as is.
    """
    error: Optional[Exception] = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 (raised below, on every process)
        error = e
    if device is not None:
        raise_together(error, device)
    elif error is not None:
        raise error
    return result


def check_same_backbone(model: nn.Module, device: torch.device) -> None:
    """Refuse to train when the processes' frozen backbones differ (different weight files on different machines).

    Raises:
        DistributedError: naming the ranks whose backbone fingerprint differs from rank 0's.
    """
    if not is_distributed() or get_world_size() == 1:
        return
    mine = model.backbone_fingerprint().encode()
    all_fps = all_gather_bytes(mine, device)
    bad = [r for r, fp in enumerate(all_fps) if fp != all_fps[0]]
    if bad:
        raise DistributedError(
            f'the processes have different frozen backbones: rank(s) {bad} differ from rank 0 (fingerprint '
            f'{all_fps[0][:12].decode()}...); every process must load the same backbone weights')


def check_same_batches(num_batches: Optional[int], device: torch.device, what: str) -> None:
    """Every process must run the same number of steps per epoch (DDP all-reduces every step).

    Raises:
        DistributedError: if the counts differ.
    """
    if not is_distributed() or get_world_size() == 1 or num_batches is None:
        return
    lo, hi = all_reduce_numbers([-num_batches, num_batches], device, op='max')
    if -lo != hi:
        raise DistributedError(f'{what} gives the processes different numbers of batches per epoch ({int(-lo)} to '
                               f'{int(hi)}); DDP needs the same number on every process: pass a Dataset (sharded '
                               f'with a DistributedSampler) or a DataLoader with a DistributedSampler')


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
    from .layers import TaskNorm, plain_class, task_aware_class
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


def rng_seed_for_run(seed: Optional[int], device: torch.device) -> int:
    """The shuffling seed every process agrees on: ``seed``, or rank 0's random draw."""
    if seed is not None:
        return int(seed)
    local = int(torch.empty((), dtype=torch.int64).random_(0, 2 ** 62).item())
    return broadcast_int(local, device)


_MOVED = {'task_bn_stats', 'average_bn_stats_', 'combine_recalibrated_bn_'}


def __getattr__(name: str):
    """The trained task's BN helpers moved to ``timm_modcl.training.batchnorm`` (still reachable here, with a
    ``DeprecationWarning``)."""
    if name in _MOVED:
        warnings.warn(f'timm_modcl.distributed.{name} moved to timm_modcl.training.batchnorm.{name}',
                      DeprecationWarning, stacklevel=2)
        from .training import batchnorm
        return getattr(batchnorm, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
