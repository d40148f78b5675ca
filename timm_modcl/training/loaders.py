"""Devices and DataLoaders of training and evaluation: where the model is, and the loaders built from Datasets
(shuffled with a seed, sharded with a ``DistributedSampler`` under DDP)."""
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .. import distributed as _dist
from ..errors import DataError, TaskError

__all__ = ['DataLike', 'model_device', 'model_dtype', 'resolve_device', 'target_device', 'check_dataset',
           'make_loader', 'data_len', 'loader_len']

DataLike = Union[Dataset, DataLoader]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: the frozen backbone's."""
    dtype = getattr(model, 'backbone_dtype', None)
    if dtype is not None:
        return dtype
    for t in model.parameters():
        return t.dtype
    return torch.float32


def resolve_device(model: nn.Module, device) -> torch.device:
    """``device`` (the whole model is moved there) or, for ``None``, where the model is.

    Raises:
        TaskError: a CUDA device without CUDA.
    """
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise TaskError(f'device {device} requested but CUDA is not available')
    model.to(device)
    return device


def target_device(model: nn.Module, device, ddp: bool) -> torch.device:
    """The device to train on: ``device`` or the model's; under DDP a CUDA device without index is this process's.

    Raises:
        TaskError: a CUDA device without CUDA.
    """
    target = model_device(model) if device is None else torch.device(device)
    if target.type == 'cuda':
        if not torch.cuda.is_available():
            raise TaskError(f'device {target} requested but CUDA is not available')
        if ddp and (device is None or torch.device(device).index is None):
            target = torch.device('cuda', _dist.get_local_rank())
    return target


def check_dataset(data: DataLike, batch_size: int, what: str) -> Optional[int]:
    """The length of a Dataset (``None`` when it has none).

    Raises:
        DataError: not a Dataset, a bad ``batch_size``, or an empty Dataset.
    """
    if not isinstance(data, Dataset):
        raise DataError(f'{what} must be a torch Dataset or DataLoader, got {type(data).__name__}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f'batch_size must be a positive integer, got {batch_size!r}')
    try:
        n = len(data)
    except TypeError:
        n = None
    if n == 0:
        raise DataError(f'{what} is empty')
    return n


def make_loader(data: DataLike, batch_size: int, shuffle: bool, seed: Optional[int], num_workers: int,
                device: torch.device, what: str, shard: bool = False) -> DataLoader:
    """A DataLoader as given, or one over a Dataset; ``shard``: this process's share (``DistributedSampler``, shuffled
    with ``seed`` when ``shuffle``), the loader's own generator then only seeds worker processes.

    Raises:
        DataError: see ``check_dataset``; a Dataset without a length to shard.
    """
    if isinstance(data, DataLoader):
        return data
    n = check_dataset(data, batch_size, what)
    generator = None
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    sampler = None
    if shard:
        if n is None:
            raise DataError(f'{what} has no length; distributed training shards a Dataset with a DistributedSampler, '
                            f'which needs len(); pass a DataLoader that shards it instead')
        sampler = DistributedSampler(data, num_replicas=_dist.get_world_size(), rank=_dist.get_rank(),
                                     shuffle=shuffle, seed=int(seed or 0), drop_last=False)
        n = len(sampler)
        if shuffle:  # the sampler shuffles (the same permutation on every process); this seeds only the workers
            generator.manual_seed(int(seed or 0) + _dist.get_rank())
    # BatchNorm cannot normalise a batch of one sample with 1x1 feature maps: drop a last batch of size 1
    drop_last = shuffle and n is not None and n > 1 and n % batch_size == 1
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=device.type == 'cuda')


def data_len(data: DataLike) -> Optional[int]:
    """The number of samples of a Dataset or of a DataLoader's Dataset (``None`` when unknown)."""
    try:
        return len(data.dataset if isinstance(data, DataLoader) else data)
    except TypeError:
        return None


def loader_len(loader: DataLoader) -> Optional[int]:
    """The number of batches of a DataLoader (``None`` when unknown)."""
    try:
        return len(loader)
    except TypeError:
        return None
