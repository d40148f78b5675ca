"""Collectives of a run on small values (numbers, ints, bytes, flat tensors) and the agreement of every process: an
error raised together, the same backbone, the same number of batches, the same shuffling seed.
"""

import json
from typing import Callable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import DistributedError
from .process import get_rank, get_world_size, is_distributed

T = TypeVar('T')


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
    from .. import errors as _errors
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


def rng_seed_for_run(seed: Optional[int], device: torch.device) -> int:
    """The shuffling seed every process agrees on: ``seed``, or rank 0's random draw."""
    if seed is not None:
        return int(seed)
    local = int(torch.empty((), dtype=torch.int64).random_(0, 2 ** 62).item())
    return broadcast_int(local, device)
