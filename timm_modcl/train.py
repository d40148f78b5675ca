"""Training and evaluation of one task of a modcl model.

    model.add_task('flowers', num_classes=102)
    history = train_task(model, 'flowers', train_ds, val_ds)   # the benchmark-validated recipe by default
    acc = evaluate(model, test_ds, task='flowers')

Only the trained task's modulators and head are optimised, and only its BatchNorm running statistics are updated
(BN layers run in train mode, as in the paper, which is how each task gets its own statistics). Every other task
keeps bit-identical outputs.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ._io import atomic_write_json
from .errors import DataError, TaskError
from .metrics import AccuracyMatrix
from .task import BASE_TASK

__all__ = ['TrainHistory', 'train_task', 'evaluate', 'predict', 'AccuracyMatrix']

DataLike = Union[Dataset, DataLoader]


@dataclass
class TrainHistory:
    """Per-epoch record of ``train_task`` (one list entry per finished epoch)."""
    task: str
    train_loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    val_acc: List[Optional[float]] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    head_lr: List[float] = field(default_factory=list)
    epoch_time_s: List[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        """Number of epochs trained."""
        return len(self.train_loss)

    @property
    def final_val_acc(self) -> Optional[float]:
        return self.val_acc[-1] if self.val_acc else None

    @property
    def total_time_s(self) -> float:
        return float(sum(self.epoch_time_s))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'TrainHistory':
        return cls(**d)

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``to_dict()`` as JSON, atomically (a temporary file in the same folder, then a rename)."""
        return atomic_write_json(path, self.to_dict())


# ------------------------------------------------------------------------------------------ helpers
def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


def _model_dtype(model: nn.Module) -> torch.dtype:
    if hasattr(model, '_ref_tensor'):
        return model._ref_tensor().dtype
    for t in model.parameters():
        return t.dtype
    return torch.float32


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is None:
        return _model_device(model)
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise TaskError(f'device {device} requested but CUDA is not available')
    model.to(device)
    return device


def _loader(data: DataLike, batch_size: int, shuffle: bool, seed: Optional[int], num_workers: int,
            device: torch.device, what: str) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
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
    generator = None
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    # BatchNorm cannot normalise a batch of one sample with 1x1 feature maps: drop a last batch of size 1
    drop_last = shuffle and n is not None and n > 1 and n % batch_size == 1
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=device.type == 'cuda')


def _unpack(batch, what: str):
    if isinstance(batch, dict):
        raise DataError(f'{what} yields dicts; expected (image, label) pairs')
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataError(f'{what} must yield (image, label) pairs, got {type(batch).__name__}')
    return batch[0], batch[1]


def _check_labels(y: torch.Tensor, num_classes: int, task: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f'label {bad} is out of range for task {task!r}, which has {num_classes} classes '
                        f'(labels 0..{num_classes - 1})')


def _amp_context(device: torch.device, enabled: bool):
    if not enabled:
        return None, None
    if device.type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler('cuda') if (device.type == 'cuda' and dtype == torch.float16) else None
    return dtype, scaler


# ------------------------------------------------------------------------------------------ training
def train_task(
        model: nn.Module,
        task: str,
        train_data: DataLike,
        val_data: Optional[DataLike] = None,
        *,
        epochs: int = 30,
        batch_size: int = 32,
        lr: float = 0.01,
        head_lr: Optional[float] = 3e-4,
        weight_decay: float = 0.0,
        milestones: Optional[Sequence[int]] = None,
        gamma: float = 0.1,
        sched: str = 'cosine',
        warmup_epochs: int = 0,
        opt: str = 'adam',
        label_smoothing: float = 0.0,
        grad_clip: Optional[float] = None,
        amp: Optional[bool] = None,
        device=None,
        seed: Optional[int] = None,
        num_workers: int = 0,
        progress: bool = True,
        callback: Optional[Callable[['TrainHistory'], Optional[bool]]] = None,
        recalibrate_bn: bool = True,
) -> TrainHistory:
    """Train one existing task of a modcl model; all other tasks stay bit-identical.

    The defaults are the ones the accuracy benchmark chose on validation (``benchmarks/results/accuracy.md``): Adam,
    learning rate 0.01 for the modulators and 3e-4 for the head, cosine decay, 30 epochs (the paper's recipe is
    ``head_lr=None, sched='step'``: one rate, divided by 10 after half of the epochs). The optimizer and schedule
    come from timm
    (``timm.optim.create_optimizer_v2`` with two parameter groups, ``timm.scheduler.create_scheduler_v2``).

    The task becomes (and stays) the active task. The model runs in train mode during the epochs, so the task's
    BatchNorm running statistics adapt to its data; other tasks' statistics, modulators and heads are untouched.
    The model's train/eval mode is restored at the end. With ``device`` the whole model (all tasks) is moved to
    that device and stays there.

    Args:
        model: A modcl model (e.g. ``timm.create_model('modcl_mobilenetv2_100', pretrained=True)``).
        task: Name of the task to train; it must exist (``model.add_task``) and cannot be ``'base'``.
        train_data: A torch ``Dataset`` of ``(image, label)`` or a ``DataLoader`` (used as given). A Dataset is
            wrapped in a shuffling DataLoader (seeded by ``seed``); a last batch of a single sample is dropped
            (BatchNorm cannot train on it).
        val_data: Optional Dataset or DataLoader evaluated after every epoch (``history.val_acc``).
        epochs: Number of epochs (0: only set up).
        batch_size: Batch size of the DataLoaders built from Datasets.
        lr: Learning rate of the modulators.
        head_lr: Learning rate of the task's linear head (default 3e-4); ``None``: ``lr``, as in the paper.
        weight_decay: Weight decay of both groups (pulls modulators towards 0).
        milestones: Epochs (0-based, as torch's ``MultiStepLR``) at which the learning rates are multiplied by
            ``gamma``; default ``[epochs // 2]``; ``[]`` keeps them constant.
        gamma: Learning-rate factor at each milestone.
        sched: ``'step'`` (the paper's: multiply by ``gamma`` at ``milestones``) or ``'cosine'`` (cosine decay to 0
            over the epochs; ``milestones`` / ``gamma`` are ignored).
        warmup_epochs: Epochs of linear warm-up from 1e-5 times the learning rates (both schedules).
        opt: Any optimizer name timm knows (``'adam'``, ``'adamw'``, ``'sgd'``, ...).
        label_smoothing: Cross-entropy label smoothing.
        grad_clip: Clip the gradient norm of the task's parameters to this value.
        amp: Mixed precision (bfloat16, or float16 with gradient scaling on GPUs without bfloat16); default: on
            for CUDA devices, off otherwise.
        device: Device to train on (default: where the model is).
        seed: Seeds torch's global RNG (augmentation, dropout) and the shuffling; default: not reproducible.
        num_workers: DataLoader workers for Datasets.
        progress: Show a tqdm progress bar per epoch with loss and accuracy.
        callback: Called after every epoch with the history so far; returning ``True`` stops training.
        recalibrate_bn: After the last epoch, recompute the task's BatchNorm running statistics as plain averages
            over one pass of ``train_data`` with the final weights (train mode, no gradients). The exponential
            moving averages of training lag behind the quickly changing modulated weights, which costs a lot of
            accuracy after short trainings; this costs one forward pass over the training data.

    Returns:
        The ``TrainHistory`` (per-epoch loss, accuracy, validation accuracy, learning rate, time).

    Raises:
        TaskNotFoundError: if the model has no task ``task``.
        TaskError: for the ``'base'`` task, a task without a head, or bad arguments.
        DataError: for empty data, batches that are not ``(image, label)`` pairs or labels out of range.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from tqdm.auto import tqdm

    state = model._task(task)  # TaskNotFoundError naming the model's tasks
    if task == BASE_TASK:
        raise TaskError(f'the {BASE_TASK!r} task is the frozen pretrained model and is not trained; add a task with '
                        f'model.add_task(name, num_classes) and train that')
    num_classes = int(state.num_classes)
    if num_classes < 1 or not model._has_head:
        raise TaskError(f'task {task!r} has no classifier head to train')
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise TaskError(f'epochs must be a non-negative integer, got {epochs!r}')
    for name, v in (('lr', lr), ('head_lr', head_lr)):
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise TaskError(f'{name} must be a positive number, got {v!r}')
    if milestones is None:
        milestones = [epochs // 2] if epochs >= 2 else []
    milestones = sorted(int(m) for m in milestones)
    if any(m < 0 for m in milestones):
        raise TaskError(f'milestones must be non-negative epochs, got {milestones}')
    if sched not in ('step', 'cosine'):
        raise TaskError(f"sched must be 'step' or 'cosine', got {sched!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= max(epochs, 0):
        raise TaskError(f'warmup_epochs must be an integer from 0 to epochs ({epochs}), got {warmup_epochs!r}')

    model.set_task(task)
    device = _resolve_device(model, device)
    if seed is not None:
        torch.manual_seed(seed)
    amp = device.type == 'cuda' if amp is None else bool(amp)
    amp_dtype, scaler = _amp_context(device, amp)
    train_loader = _loader(train_data, batch_size, True, seed, num_workers, device, 'train_data')
    val_loader = None
    if val_data is not None:
        val_loader = _loader(val_data, batch_size, False, None, num_workers, device, 'val_data')

    head_params = list(state.head.parameters())
    head_ids = {id(p) for p in head_params}
    mod_params = [p for p in model.task_parameters(task) if id(p) not in head_ids]
    groups = [{'params': head_params, 'lr': float(head_lr if head_lr is not None else lr)}]
    if mod_params:
        groups.insert(0, {'params': mod_params, 'lr': float(lr)})
    optimizer = create_optimizer_v2(groups, opt=opt, lr=float(lr), weight_decay=float(weight_decay))
    # timm applies a milestone m at schedule index m - 1; +1 gives torch's MultiStepLR timing (the paper's recipe)
    # (milestones are absolute epochs; a cosine decays over the epochs after the warm-up)
    cosine = sched == 'cosine'
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine' if cosine else 'multistep',
        num_epochs=max(epochs - warmup_epochs, 1) if cosine else max(epochs, 1),
        decay_milestones=[m + 1 for m in milestones] or [max(epochs, 1) + 1], decay_rate=gamma,
        warmup_epochs=warmup_epochs, warmup_lr=float(lr) * 1e-5, warmup_prefix=cosine, min_lr=0.0)
    params = [p for g in groups for p in g['params']]
    model_dtype = _model_dtype(model)

    history = TrainHistory(task=task)
    was_training = model.training
    try:
        for epoch in range(epochs):
            scheduler.step(epoch)
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(train_loader, desc=f'{task} {epoch + 1}/{epochs}', disable=not progress, leave=True,
                       dynamic_ncols=True)
            for batch in bar:
                x, y = _unpack(batch, 'train_data')
                y = torch.as_tensor(y)
                _check_labels(y, num_classes, task)
                x = x.to(device, non_blocking=True)
                if x.is_floating_point():
                    x = x.to(model_dtype)
                y = y.to(device, non_blocking=True).long()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise TaskError(f'task {task!r}: loss became {loss.item()} in epoch {epoch + 1}; lower the '
                                    f'learning rate')
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    optimizer.step()
                n = y.shape[0]
                loss_sum += loss.item() * n
                correct += int((logits.argmax(1) == y).sum())
                seen += n
                bar.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{correct / seen:.3f}')
            bar.close()
            if seen == 0:
                raise DataError('train_data yielded no batches')
            val_acc = None
            if val_loader is not None:
                val_acc = evaluate(model, val_loader, device=device)
            history.train_loss.append(loss_sum / seen)
            history.train_acc.append(correct / seen)
            history.val_acc.append(val_acc)
            history.lr.append(float(optimizer.param_groups[0]['lr']))
            history.head_lr.append(float(optimizer.param_groups[-1]['lr']))
            history.epoch_time_s.append(time.perf_counter() - t0)
            if progress:
                msg = (f'{task} epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f}, '
                       f'train acc {100 * history.train_acc[-1]:.1f}%')
                if val_acc is not None:
                    msg += f', val acc {100 * val_acc:.1f}%'
                tqdm.write(msg)
            if callback is not None and callback(history):
                history.stopped_early = epoch + 1 < epochs
                break
        if recalibrate_bn and history.epochs:
            _recalibrate_bn(model, train_loader, device, model_dtype, progress, task)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return history


def _recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype,
                    progress: bool, task: str) -> None:
    """Recompute the active task's BN running statistics as cumulative averages over one pass of ``loader``."""
    from tqdm.auto import tqdm
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    model.train()
    seen = 0
    try:
        for bn in bns:
            bn.reset_running_stats()  # in place: the active task's own statistics tensors
            bn.momentum = None        # cumulative moving average
        with torch.no_grad():
            for batch in tqdm(loader, desc=f'{task} BN statistics', disable=not progress, leave=False):
                x, _ = _unpack(batch, 'train_data')
                if x.shape[0] < 2:
                    continue
                x = x.to(device, non_blocking=True)
                model(x.to(dtype) if x.is_floating_point() else x)
                seen += x.shape[0]
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        if seen == 0:  # nothing to average: keep the statistics of training
            with torch.no_grad():
                for bn, (mean, var, n) in zip(bns, saved):
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(n)


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def _run(model: nn.Module, data: DataLike, task: Optional[str], batch_size: int, device, num_workers: int, fn):
    device = _resolve_device(model, device)
    loader = _loader(data, batch_size, False, None, num_workers, device, 'data')
    model_dtype = _model_dtype(model)
    was_training = model.training
    active = model.active_task
    model.eval()
    try:
        if task is not None:
            model.set_task(task)
        for batch in loader:
            fn(model, batch, device, model_dtype)
    finally:
        model.set_task(active)
        model.train(was_training)


def evaluate(
        model: nn.Module,
        data: DataLike,
        task: Optional[str] = None,
        *,
        batch_size: int = 64,
        device=None,
        num_workers: int = 0,
) -> float:
    """Top-1 accuracy of a task (default: the active one) on a Dataset or DataLoader of ``(image, label)``.

    Runs in eval mode under ``torch.inference_mode``; the active task and train/eval mode are restored afterwards.

    Raises:
        TaskNotFoundError: for an unknown task.
        DataError: for empty data or labels out of the task's range.
    """
    name = model.active_task if task is None else task
    stats = {'correct': 0, 'seen': 0}

    def step(m, batch, device, dtype):
        x, y = _unpack(batch, 'data')
        y = torch.as_tensor(y)
        _check_labels(y, int(m.num_classes), name)
        x = x.to(device)
        if x.is_floating_point():
            x = x.to(dtype)
        pred = m(x).argmax(1).cpu()
        stats['correct'] += int((pred == y.long()).sum())
        stats['seen'] += int(y.shape[0])

    _run(model, data, task, batch_size, device, num_workers, step)
    if stats['seen'] == 0:
        raise DataError('data yielded no samples')
    return stats['correct'] / stats['seen']


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
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    out: List[List[tuple]] = []

    def step(m, batch, device, dtype):
        probs = m(batch[0].to(device, dtype)).float().softmax(1).cpu()
        names = m.tasks[m.active_task].class_names
        k = max(1, min(int(topk), probs.shape[1]))
        p, idx = probs.topk(k, dim=1)
        for pi, ii in zip(p.tolist(), idx.tolist()):
            out.append([(c, None if names is None else names[c], q) for c, q in zip(ii, pi)])

    from torch.utils.data import TensorDataset
    _run(model, TensorDataset(images, torch.zeros(images.shape[0])), task, 64, device, 0, step)
    return out
