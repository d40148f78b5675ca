"""The epoch loop of ``train_task``: steps whose errors every DDP process raises together, the end of an epoch
(counts over the processes, divergence check, validation, history, early stop, checkpoint), and what follows the
last epoch (BN recalibration, prototype statistics)."""
import time
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from .. import distributed as _dist
from ..data import check_labels, unpack_batch
from ..errors import DataError, NonFiniteLossError
from .batchnorm import average_bn_stats_, recalibrate_bn
from .evaluation import accuracy
from .setup import TrainRun

__all__ = ['train_epochs', 'finish']

_END = object()


def train_epochs(run: TrainRun) -> None:
    """Train from ``run.start_epoch`` to the last epoch or an early stop (through DDP under DDP)."""
    with _dist.ddp_session(run.model, run.device, run.ddp, run.sync_bn) as net:
        try:
            for epoch in range(run.start_epoch, run.opts.epochs):
                if run.done:
                    break
                run.scheduler.step(epoch)
                if isinstance(getattr(run.train_loader, 'sampler', None), DistributedSampler):
                    run.train_loader.sampler.set_epoch(epoch)
                net.train()
                t0 = time.perf_counter()
                sums = train_epoch(run, net, epoch)
                end_epoch(run, epoch, sums, t0)
        finally:
            net = None  # no reference to the DDP wrapper outlives the session (not even in a traceback)


def _forward(run: TrainRun, net: nn.Module, batches, epoch: int) -> Optional[Tuple[torch.Tensor, ...]]:
    """``(loss, logits, labels)`` of the next batch, or ``None`` at the end of the epoch."""
    batch = next(batches, _END)
    if batch is _END:
        return None
    x, y = unpack_batch(batch, 'train_data')
    check_labels(y, run.num_classes, run.task, images=len(x))
    x = x.to(run.device, non_blocking=True)
    if x.is_floating_point():
        x = x.to(run.dtype)
    y = y.to(run.device, non_blocking=True).long()
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp):
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=run.opts.label_smoothing)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f'task {run.task!r}: the loss became {loss.item()} in epoch {epoch + 1}; the task is put back to its '
            f'last good state and nothing of it was saved (lower the learning rate, or look for NaN or Inf values '
            f'in the data)')
    return loss, logits, y


def train_epoch(run: TrainRun, net: nn.Module, epoch: int) -> Tuple[float, int, int]:
    """One pass over the training data; returns this process's ``(loss sum, correct, samples)``.

    An error of one process (a bad sample or label in its shard, a NaN loss) ends every process with the same
    typed error before the backward's all-reduce (``distributed.call_together``).

    Raises:
        NonFiniteLossError: a NaN or Inf loss (the task is put back to its last good state first).
        DataError: bad batches or labels.
    """
    from tqdm.auto import tqdm
    bar = tqdm(run.train_loader, desc=f'{run.task} {epoch + 1}/{run.opts.epochs}', disable=not run.show,
               leave=True, dynamic_ncols=True)
    batches = iter(bar)
    loss_sum, correct, seen = 0.0, 0, 0
    while True:
        try:
            out = _dist.call_together(lambda: _forward(run, net, batches, epoch), run.comm)
        except NonFiniteLossError:  # the forward in train mode moved the BN statistics already
            run.snapshot.put_back()
            raise
        if out is None:
            break
        loss, logits, y = out
        run.stepper.step(loss)
        n = y.shape[0]
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        bar.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{correct / seen:.3f}')
    bar.close()
    return loss_sum, correct, seen


def end_epoch(run: TrainRun, epoch: int, sums: Tuple[float, int, int], t0: float) -> None:
    """Sum the counts over the processes (and average the BN statistics), refuse a diverged task, validate,
    record the history, ask the callback, write the checkpoint.

    Raises:
        DataError: no batches. NonFiniteLossError: a task tensor became NaN or Inf (put back first).
        CheckpointError: the checkpoint cannot be written.
    """
    loss_sum, correct, seen = sums
    if run.ddp:
        loss_sum, correct, seen = _dist.all_reduce_numbers([loss_sum, correct, seen], run.comm)
        if not run.sync_bn:
            average_bn_stats_(run.model, run.task, run.comm)
    if seen == 0:
        raise DataError('train_data yielded no batches')
    bad = run.snapshot.non_finite()
    if bad:
        run.snapshot.put_back()
        raise NonFiniteLossError(
            f'task {run.task!r}: {bad[0]} (and {len(bad) - 1} more) became NaN or Inf in epoch {epoch + 1}; the '
            f'task is put back to its last good state and nothing of it was saved (lower the learning rate)')
    run.snapshot.take()
    val_acc = None
    if run.val_loader is not None:
        val_acc = accuracy(run.model, run.val_loader, None, run.device, reduce=run.ddp, comm=run.comm)
    _record(run, epoch, loss_sum / seen, correct / seen, val_acc, t0)
    stop = bool(run.opts.callback(run.history)) if run.opts.callback is not None else False
    if run.ddp:
        stop = _dist.all_reduce_numbers([float(stop)], run.comm, op='max')[0] > 0
    if stop:
        run.history.stopped_early = epoch + 1 < run.opts.epochs
        run.done = True
    if run.checkpoint is not None:
        run.checkpoint.save(run, epoch + 1, run.done or epoch + 1 == run.opts.epochs)


def _record(run: TrainRun, epoch: int, loss: float, acc: float, val_acc: Optional[float], t0: float) -> None:
    h = run.history
    h.train_loss.append(loss)
    h.train_acc.append(acc)
    h.val_acc.append(val_acc)
    h.lr.append(float(run.optimizer.param_groups[0]['lr']))
    h.head_lr.append(float(run.optimizer.param_groups[-1]['lr']))
    h.epoch_time_s.append(time.perf_counter() - t0)
    if run.show:
        from tqdm.auto import tqdm
        msg = f'{run.task} epoch {epoch + 1}/{run.opts.epochs}: loss {loss:.4f}, train acc {100 * acc:.1f}%'
        if val_acc is not None:
            msg += f', val acc {100 * val_acc:.1f}%'
        tqdm.write(msg)


def finish(run: TrainRun) -> None:
    """After the last epoch (when any was trained): recalibrate the task's BN statistics, then store its prototype
    statistics for task-agnostic prediction (``serving.compute_task_statistics``), as the options ask."""
    if not run.history.epochs:
        return
    if run.opts.recalibrate_bn:
        recalibrate_bn(run.model, run.train_loader, run.device, run.dtype, run.show, run.task, run.comm)
    if run.opts.prototypes:
        from ..serving import compute_task_statistics
        compute_task_statistics(run.model, run.task, run.train_loader, num_workers=run.opts.num_workers,
                                progress=run.show, all_reduce=run.ddp)
