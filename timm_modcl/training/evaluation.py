"""Evaluation: top-1 accuracy (per epoch in training, and ``evaluate``) and top-k ``predict``; the task is chosen per
call, so threads can evaluate different tasks of one model in eval mode at once."""
from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import distributed as _dist
from .._rng import keep_rng_on_error
from ..data import check_labels, unpack_batch
from ..errors import DataError
from .loaders import DataLike, make_loader, model_dtype, resolve_device

__all__ = ['accuracy', 'evaluate', 'predict']


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader, task: Optional[str], device: torch.device, reduce: bool = False,
             comm: Optional[torch.device] = None) -> float:
    """Top-1 accuracy over ``loader``; ``reduce``: summed over all processes, the padding that a DistributedSampler
    repeats counted out, so every sample counts once.

    Raises:
        DataError: labels out of the task's range, no samples.
    """
    name = model.active_task if task is None else task
    dtype = model_dtype(model)
    sampler = getattr(loader, 'sampler', None)
    correct = seen = position = 0
    with model.inference_scope(task):
        num_classes = int(model.tasks[name].num_classes)
        for batch in loader:
            x, y = unpack_batch(batch, 'data')
            check_labels(y, num_classes, name, images=len(x))
            x = x.to(device)
            if x.is_floating_point():
                x = x.to(dtype)
            hit = model(x).argmax(1).cpu() == y.long()
            n = int(y.shape[0])
            mask = _dist.padding_mask(sampler, position, n) if reduce else None
            position += n
            if mask is not None:
                hit = hit & mask
                n = int(mask.sum())
            correct += int(hit.sum())
            seen += n
    if reduce:
        correct, seen = _dist.all_reduce_numbers([correct, seen], comm)
    if seen == 0:
        raise DataError('data yielded no samples')
    return correct / seen


@keep_rng_on_error()
def evaluate(
        model: nn.Module,
        data: DataLike,
        task: Optional[str] = None,
        *,
        batch_size: int = 64,
        device=None,
        num_workers: int = 0,
        distributed: bool = False,
) -> float:
    """Top-1 accuracy of a task (default: the active one) on a Dataset or DataLoader of ``(image, label)``.

    Runs in eval mode under ``torch.inference_mode``; the active task and train/eval mode are restored afterwards.

    Args:
        distributed: Every process of a process group calls ``evaluate`` together (a collective): a Dataset is
            sharded with a ``DistributedSampler``, and the counts are summed over the processes with the sampler's
            padding counted out, so the result is the accuracy over the whole dataset, on every process. A
            DataLoader with a DistributedSampler is reduced the same way; another DataLoader is evaluated whole on
            every process. Without a process group, the same as ``False``.

    Raises:
        TaskNotFoundError: for an unknown task.
        DataError: for empty data or labels out of the task's range.
        DistributedError: a NCCL process group with a model on the CPU.
        InputError: images the model cannot take (NaN/Inf values, wrong shape or dtype).
        On error the global random states (torch, NumPy, Python) are as they were.
    """
    model = _dist.unwrap_model(model)
    if task is not None:
        model.task_info(task)  # TaskNotFoundError
    device = resolve_device(model, device)
    reduce = bool(distributed) and _dist.is_distributed() and _dist.get_world_size() > 1
    comm = _dist.comm_device(device) if reduce else None
    loader = make_loader(data, batch_size, False, None, num_workers, device, 'data', shard=reduce)
    return accuracy(model, loader, task, device, reduce=reduce, comm=comm)


def predict(
        model: nn.Module,
        images: torch.Tensor,
        task: Optional[str] = None,
        *,
        topk: int = 5,
        device=None,
) -> List[List[tuple]]:
    """Top-k predictions of a task for a batch of preprocessed images ``(N, 3, H, W)``.

    Returns, per image, a list of ``(class index, class name or None, probability)`` sorted by probability.

    Raises:
        TaskNotFoundError: for an unknown task.
        InputError: images the model cannot take.
    """
    model = _dist.unwrap_model(model)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if task is not None:
        model.task_info(task)  # TaskNotFoundError
    device = resolve_device(model, device)
    dtype = model_dtype(model)
    out: List[List[tuple]] = []
    with torch.inference_mode(), model.inference_scope(task):
        names = model.tasks[model.active_task if task is None else task].class_names
        for start in range(0, images.shape[0], 64):
            probs = model(images[start:start + 64].to(device, dtype)).float().softmax(1).cpu()
            k = max(1, min(int(topk), probs.shape[1]))
            p, idx = probs.topk(k, dim=1)
            for pi, ii in zip(p.tolist(), idx.tolist()):
                out.append([(c, None if names is None else names[c], q) for c, q in zip(ii, pi)])
    return out
