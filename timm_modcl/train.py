"""Training and evaluation of one task of a modcl model.

    model.add_task('flowers', num_classes=102)
    history = train_task(model, 'flowers', train_ds, val_ds)   # the benchmark-validated recipe by default
    acc = evaluate(model, test_ds, task='flowers')

Only the trained task's modulators and head are optimised, and only its BatchNorm running statistics are updated
(BN layers run in train mode, as in the paper, which is how each task gets its own statistics). Every other task
keeps bit-identical outputs.

Under torchrun, ``train_task`` trains with ``DistributedDataParallel`` (see ``timm_modcl.distributed``); with
``checkpoint=PATH`` it writes a checkpoint after every epoch, and ``resume=True`` continues from it
(``timm_modcl.checkpoint``).
"""
import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed as _dist
from ._io import atomic_write_json
from ._rng import keep_rng_on_error
from .data import check_labels, unpack_batch
from .errors import CheckpointError, DataError, DistributedError, NonFiniteLossError, TaskError
from .metrics import AccuracyMatrix
from .model import is_modcl_model
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
        """The history ``to_dict`` gave.

        Raises:
            DataError: for a mapping that is not a ``TrainHistory``.
        """
        try:
            return cls(**d)
        except TypeError as e:
            raise DataError(f'not a TrainHistory: {e}') from None

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


def _check_dataset(data: DataLike, batch_size: int, what: str) -> Optional[int]:
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


def _loader(data: DataLike, batch_size: int, shuffle: bool, seed: Optional[int], num_workers: int,
            device: torch.device, what: str, shard: bool = False) -> DataLoader:
    """A DataLoader as given, or one over a Dataset; ``shard``: this process's share (``DistributedSampler``, shuffled
    with ``seed`` when ``shuffle``), the loader's own generator then only seeds worker processes."""
    if isinstance(data, DataLoader):
        return data
    n = _check_dataset(data, batch_size, what)
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
def _target_device(model: nn.Module, device, ddp: bool) -> torch.device:
    """The device to train on: ``device`` or the model's; under DDP a CUDA device without index is this process's."""
    target = _model_device(model) if device is None else torch.device(device)
    if target.type == 'cuda':
        if not torch.cuda.is_available():
            raise TaskError(f'device {target} requested but CUDA is not available')
        if ddp and (device is None or torch.device(device).index is None):
            target = torch.device('cuda', _dist.get_local_rank())
    return target


def _seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global RNGs (timm's augmentations draw from Python's ``random``)."""
    import random
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover
        pass


def _rng_states(device: torch.device) -> tuple:
    """The global random states ``_seed_everything`` and training change: torch (and CUDA of ``device``), Python,
    NumPy."""
    import random
    cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' and torch.cuda.is_initialized() else None
    try:
        import numpy as np
        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        numpy_state = None
    return torch.get_rng_state(), cuda, random.getstate(), numpy_state


def _set_rng_states(states: tuple, device: torch.device) -> None:
    import random
    cpu, cuda, python, numpy_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(python)
    if numpy_state is not None:
        import numpy as np
        np.random.set_state(numpy_state)


def _check_checkpoint_path(checkpoint: Any, task: str) -> None:
    """A path a checkpoint can be written to: not a folder, under folders (checked before any training)."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(f'checkpoint must be a file path, got {type(checkpoint).__name__}')
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(f'checkpoint {str(checkpoint)!r} is a folder; pass the path of a file in it (e.g. '
                              f'{str(path / (task + ".ckpt.safetensors"))!r})')
    for folder in path.absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise CheckpointError(f'checkpoint {str(checkpoint)!r}: {str(folder)!r} is not a folder')
            break


def _task_snapshot(model: nn.Module, task: str) -> Dict[str, torch.Tensor]:
    """Copies of the task's trained tensors and BN statistics (what an epoch changes)."""
    return {k: v.detach().clone() for k, v in model._task(task).tensors(stats=False).items()}


def _put_back(model: nn.Module, task: str, snapshot: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model._task(task).tensors(stats=False).items():
            v.copy_(snapshot[k])


def _non_finite(model: nn.Module, task: str) -> List[str]:
    return [k for k, v in model._task(task).tensors(stats=False).items()
            if v.is_floating_point() and not torch.isfinite(v).all()]


def _data_len(data: DataLike) -> Optional[int]:
    try:
        return len(data.dataset if isinstance(data, DataLoader) else data)
    except TypeError:
        return None


def _loader_len(loader: DataLoader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


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
        distributed: Optional[bool] = None,
        sync_bn: bool = False,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        resume: bool = False,
        prototypes: bool = True,
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

    Several processes (torchrun): every process calls ``train_task`` with the same arguments. The task is bound,
    then the model wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA; a model the caller wrapped in
    DDP is unwrapped first, since a DDP made before the task was bound holds another task's tensors). Datasets are
    sharded with ``DistributedSampler``: ``batch_size`` is per process (the global batch is ``batch_size`` times the
    number of processes). The task's BatchNorm statistics are averaged across processes after every epoch (no
    frozen tensor is broadcast per step), validation accuracy and the history are computed over all processes'
    data, and progress is shown on rank 0 only. Save adapters on rank 0 only
    (``timm_modcl.distributed.is_main_process()``).

    Args:
        model: A modcl model (e.g. ``timm.create_model('modcl_mobilenetv2_100', pretrained=True)``), or a
            ``DistributedDataParallel`` / ``DataParallel`` around one.
        task: Name of the task to train; it must exist (``model.add_task``) and cannot be ``'base'``.
        train_data: A torch ``Dataset`` of ``(image, label)`` or a ``DataLoader`` (used as given; under DDP give it
            a ``DistributedSampler``). A Dataset is wrapped in a shuffling DataLoader (seeded by ``seed``); a last
            batch of a single sample is dropped (BatchNorm cannot train on it).
        val_data: Optional Dataset or DataLoader evaluated after every epoch (``history.val_acc``).
        epochs: Number of epochs (0: only set up).
        batch_size: Batch size of the DataLoaders built from Datasets (per process under DDP).
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
        device: Device to train on (default: where the model is). Under DDP, ``'cuda'`` means this process's GPU
            (``cuda:LOCAL_RANK``).
        seed: Seeds the global RNGs of torch, Python and NumPy (augmentation, dropout; under DDP ``seed + rank``)
            and the shuffling; default: not reproducible.
        num_workers: DataLoader workers for Datasets.
        progress: Show a tqdm progress bar per epoch with loss and accuracy (rank 0 only).
        callback: Called after every epoch with the history so far (on every process); returning ``True`` stops
            training (on all processes if any returns ``True``).
        recalibrate_bn: After the last epoch, recompute the task's BatchNorm running statistics as plain averages
            over one pass of ``train_data`` with the final weights (train mode, no gradients). The exponential
            moving averages of training lag behind the quickly changing modulated weights, which costs a lot of
            accuracy after short trainings; this costs one forward pass over the training data. Under DDP the
            average is over all processes' batches.
        distributed: ``None`` (default): train with DDP when a process group of several processes exists or
            torchrun's environment describes one (it is then initialised, see
            ``timm_modcl.distributed.init_distributed``); ``False``: train in this process alone (e.g. one task per
            process); ``True``: require a process group.
        sync_bn: Under DDP, normalise with BatchNorm statistics computed over the global batch (torch's
            ``SyncBatchNorm``, CUDA only); the layers are converted in place for the training and back afterwards.
            Ignored without DDP.
        checkpoint: Write a training checkpoint to this path after every epoch (atomically; safetensors + JSON):
            the task's tensors, optimizer, scheduler, epoch, random states and history (rank 0 writes).
        resume: Continue from ``checkpoint`` if it exists (else start from scratch): same arguments, same task
            configuration and backbone, same number of processes. The result equals an uninterrupted run (exactly
            on CPU). Only epoch ends are checkpointed: an epoch killed midway is trained again.
        prototypes: After training, store the task's prototype statistics for task-agnostic prediction
            (``timm_modcl.serving.compute_task_statistics`` over ``train_data``: class means and a low-rank shared
            covariance of the frozen backbone's features, never images; under DDP summed over all processes). One
            forward pass of the frozen backbone over the training data.

    Returns:
        The ``TrainHistory`` (per-epoch loss, accuracy, validation accuracy, learning rate, time).

    Raises:
        TaskNotFoundError: if the model has no task ``task``.
        TaskError: for the ``'base'`` task, a task without a head, or bad arguments.
        DataError: for empty data, batches that are not ``(image, label)`` pairs or labels out of range, an
            ``IterableDataset`` (pass a DataLoader over it).
        DistributedError: DDP asked for without a process group, SyncBatchNorm on CPU, NCCL with a CPU model,
            different backbones or batch counts on the processes.
        CheckpointError: a checkpoint path that is a folder; a checkpoint to resume from that is corrupt, from
            another run, or has values no run writes (non-finite or negative optimizer moments, other optimizer or
            scheduler settings, a bad history, random state or epoch, task tensors the adapter loader refuses); or
            it cannot be written.
        NonFiniteLossError: the loss (or a task tensor) became NaN or Inf: the task is put back to its last good
            state (the end of the last finished epoch, or as the call found it) and nothing of the failing epoch
            is saved. A ``TaskError`` too.

    After any error the model's active task and device and the global random states (torch, Python, NumPy) are
    the ones it had before the call; an error raised before the first training step (bad arguments, data,
    checkpoint: all checked before ``seed`` reseeds anything) leaves every task's tensors unchanged too.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from tqdm.auto import tqdm

    from .checkpoint import (checkpoint_bytes, parse_checkpoint, read_checkpoint_bytes, restore_rng_state,
                             rng_state_bytes, write_checkpoint)

    model = _dist.unwrap_model(model)
    if not is_modcl_model(model):
        raise TaskError(f'train_task needs a modcl model (timm.create_model("modcl_...") or timm_modcl.modulate), '
                        f'got {type(model).__name__}')
    state = model._task(task)  # TaskNotFoundError naming the model's tasks
    if task == BASE_TASK:
        raise TaskError(f'the {BASE_TASK!r} task is the frozen pretrained model and is not trained; add a task with '
                        f'model.add_task(name, num_classes) and train that')
    num_classes = int(state.num_classes)
    if num_classes < 1 or not model._has_head:
        raise TaskError(f'task {task!r} has no classifier head to train')
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise TaskError(f'epochs must be a non-negative integer, got {epochs!r}')
    for name, v, ok, expected in (  # (name, value, check, what it must be); None passes where that says so
            ('lr', lr, lambda v: v > 0, 'a positive number'),
            ('head_lr', head_lr, lambda v: v > 0, 'None or a positive number'),
            ('weight_decay', weight_decay, lambda v: v >= 0, 'a non-negative number'),
            ('gamma', gamma, lambda v: v > 0, 'a positive number'),
            ('label_smoothing', label_smoothing, lambda v: 0 <= v < 1, 'a number from 0 to below 1'),
            ('grad_clip', grad_clip, lambda v: v > 0, 'None or a positive number')):
        if v is None and expected.startswith('None'):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise TaskError(f'{name} must be {expected}, got {v!r}')
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise TaskError(f'num_workers must be a non-negative integer, got {num_workers!r}')
    if not isinstance(opt, str):
        raise TaskError(f'opt must be the name of a timm optimizer (e.g. \'adam\'), got {opt!r}')
    if milestones is None:
        milestones = [epochs // 2] if epochs >= 2 else []
    try:
        milestones = sorted(int(m) for m in milestones if not isinstance(m, bool))
    except (TypeError, ValueError):
        raise TaskError(f'milestones must be a list of epochs, got {milestones!r}') from None
    if any(m < 0 for m in milestones):
        raise TaskError(f'milestones must be non-negative epochs, got {milestones}')
    if sched not in ('step', 'cosine'):
        raise TaskError(f"sched must be 'step' or 'cosine', got {sched!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= max(epochs, 0):
        raise TaskError(f'warmup_epochs must be an integer from 0 to epochs ({epochs}), got {warmup_epochs!r}')
    if distributed not in (None, True, False):
        raise TaskError(f'distributed must be None, True or False, got {distributed!r}')
    if resume and checkpoint is None:
        raise TaskError('resume=True needs checkpoint=PATH (the checkpoint to resume from)')
    if checkpoint is not None:
        _check_checkpoint_path(checkpoint, task)
    for what, data in (('train_data', train_data), ('val_data', val_data)):
        if data is not None and not isinstance(data, DataLoader):
            _check_dataset(data, batch_size, what)
    if isinstance(train_data, IterableDataset):
        raise DataError('train_data is an IterableDataset, which train_task can neither shuffle nor shard: pass a '
                        'map-style Dataset, or a DataLoader over it (used as given; a resume then repeats the '
                        'stream\'s order only if the stream does)')

    ddp = _dist.resolve_distributed(distributed, device if device is not None else _model_device(model))
    target = _target_device(model, device, ddp)
    rank, world = (_dist.get_rank(), _dist.get_world_size()) if ddp else (0, 1)
    main = rank == 0
    comm = _dist.comm_device(target) if ddp else torch.device('cpu')
    use_sync_bn = bool(sync_bn) and ddp
    if use_sync_bn:
        if target.type == 'cpu':
            raise DistributedError('sync_bn=True needs CUDA: torch\'s SyncBatchNorm synchronises GPU tensors only; '
                                   'train on CPU without sync_bn (the BN statistics are averaged across processes '
                                   'after every epoch)')
        with _dist.sync_batchnorm(model):  # raises for BN types without a synchronised counterpart, changes nothing
            pass
    amp = target.type == 'cuda' if amp is None else bool(amp)

    head_params = list(state.head.parameters())
    head_ids = {id(p) for p in head_params}
    mod_params = [p for p in model.task_parameters(task) if id(p) not in head_ids]
    groups = [{'params': head_params, 'lr': float(head_lr if head_lr is not None else lr)}]
    if mod_params:
        groups.insert(0, {'params': mod_params, 'lr': float(lr)})
    run = {'epochs': epochs, 'batch_size': batch_size, 'lr': float(lr), 'head_lr': head_lr, 'opt': opt,
           'weight_decay': float(weight_decay), 'milestones': milestones, 'gamma': float(gamma), 'sched': sched,
           'warmup_epochs': warmup_epochs, 'label_smoothing': float(label_smoothing), 'grad_clip': grad_clip,
           'amp': amp, 'seed': seed, 'world_size': world, 'sync_bn': use_sync_bn, 'train_size': _data_len(train_data)}

    ck = None
    if resume:  # rank 0 reads, every process gets the same bytes; validated before anything changes
        data = read_checkpoint_bytes(checkpoint) if main else None
        data = _dist.broadcast_bytes(data, comm) if ddp else data
        if data is not None:
            ck = parse_checkpoint(data, repr(str(checkpoint)))
            if ck.world_size != world:
                raise CheckpointError(f'{str(checkpoint)!r} was written by {ck.world_size} process(es); resume it '
                                      f'with the same number (now {world})')
            ck.validate(model, task, run, [g['params'] for g in groups])
            history_resumed = TrainHistory.from_dict(ck.history)

    previous_task, previous_device = model.active_task, _model_device(model)
    rng_before = _rng_states(target)
    # what a divergence puts back: the task as the call found it (a resumed state that diverges at once is undone
    # with the restore), then the end of the last finished epoch
    last_good = _task_snapshot(model, task)

    def give_back() -> None:
        """After an error: the model's active task and device, and the global random states, as the caller gave
        them."""
        if previous_task in model.tasks and model.active_task != previous_task:
            model.set_task(previous_task)
        if target != previous_device:
            model.to(previous_device)
        _set_rng_states(rng_before, target)

    try:  # set-up: a failure here (bad data, optimizer, checkpoint) leaves the model as it was given
        model.set_task(task)  # before any DDP wrapping: DDP keeps the Parameter objects of the task bound now
        device = target
        model.to(device)
        if ddp:
            _dist.check_same_backbone(model, comm)
            seed_all = _dist.rng_seed_for_run(seed, comm)
            if ck is not None and ck.shuffle_seed is not None:  # the interrupted run's (drawn when seed is None)
                seed_all = ck.shuffle_seed
        else:
            seed_all = seed
        amp_dtype, scaler = _amp_context(device, amp)
        train_loader = _loader(train_data, batch_size, True, seed_all, num_workers, device, 'train_data', shard=ddp)
        generator = train_loader.generator
        val_loader = None
        if val_data is not None:
            val_loader = _loader(val_data, batch_size, False, None, num_workers, device, 'val_data', shard=ddp)
        if ddp:
            if isinstance(train_data, DataLoader) and not isinstance(train_data.sampler, DistributedSampler) and main:
                warnings.warn(f'train_data is a DataLoader without a DistributedSampler: each of the {world} processes '
                              f'trains on all of it (pass a Dataset to have it sharded)', stacklevel=2)
            _dist.check_same_batches(_loader_len(train_loader), comm, 'train_data')

        try:
            optimizer = create_optimizer_v2(groups, opt=opt, lr=float(lr), weight_decay=float(weight_decay))
        except (ValueError, TypeError, KeyError, AssertionError) as e:
            raise TaskError(f'cannot build the optimizer {opt!r}: {e}') from None
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
        start_epoch, done = 0, False
        if ck is not None:  # everything checked (the run's optimizer and scheduler built) before any reseeding
            ck.check_state(optimizer, scheduler, scaler)
        if seed is not None:
            _seed_everything(seed + rank)
        if ck is not None:
            ck.restore(model, task, optimizer, scheduler, scaler)
            restore_rng_state(ck.rng(rank), generator, device)
            history, start_epoch, done = history_resumed, ck.epoch, ck.done
            if main and progress:
                tqdm.write(f'{task}: resuming from {checkpoint} after epoch {start_epoch}/{epochs}')
        elif ddp:  # DDP broadcasts rank 0's parameters; the task's BN statistics are buffers: once, here
            _dist.broadcast_tensors_(_dist.task_bn_stats(model, task, kinds=('running_mean', 'running_var',
                                                                            'num_batches_tracked')), comm)
    except BaseException:
        give_back()
        raise

    def save_checkpoint(epochs_done: int, finished: bool) -> None:
        blob = rng_state_bytes(generator, device)
        blobs = _dist.all_gather_bytes(blob, comm) if ddp else [blob]
        if main:
            write_checkpoint(checkpoint, checkpoint_bytes(
                model, task, epoch=epochs_done, done=finished, history=history.to_dict(), optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, run=run, rng=blobs, shuffle_seed=seed_all if ddp else None))

    show = bool(progress) and main
    was_training = model.training
    net: nn.Module = model
    try:
        # SyncBatchNorm layers first: DDP looks for them when it is built
        with (_dist.sync_batchnorm(model) if use_sync_bn else contextlib.nullcontext()):
            if ddp:
                net = _dist.wrap_ddp(model, device)
            for epoch in range(start_epoch, epochs):
                if done:
                    break
                scheduler.step(epoch)
                if isinstance(getattr(train_loader, 'sampler', None), DistributedSampler):
                    train_loader.sampler.set_epoch(epoch)
                net.train()
                t0 = time.perf_counter()
                loss_sum, correct, seen = 0.0, 0, 0
                bar = tqdm(train_loader, desc=f'{task} {epoch + 1}/{epochs}', disable=not show, leave=True,
                           dynamic_ncols=True)
                batches = iter(bar)
                while True:
                    # an error of one process (a bad sample or label in its shard, a NaN loss) ends every process
                    # with the same typed error before the backward's all-reduce (raise_together)
                    error: Optional[Exception] = None
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except Exception as e:  # noqa: BLE001 (raised below, on every process)
                        error = e
                    if error is None:
                        try:
                            x, y = unpack_batch(batch, 'train_data')
                            check_labels(y, num_classes, task, images=len(x))
                            x = x.to(device, non_blocking=True)
                            if x.is_floating_point():
                                x = x.to(model_dtype)
                            y = y.to(device, non_blocking=True).long()
                            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                                logits = net(x)
                                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                            if not torch.isfinite(loss):
                                raise NonFiniteLossError(
                                    f'task {task!r}: the loss became {loss.item()} in epoch {epoch + 1}; the task is '
                                    f'put back to its last good state and nothing of it was saved (lower the '
                                    f'learning rate, or look for NaN or Inf values in the data)')
                        except Exception as e:  # noqa: BLE001 (raised below, on every process)
                            error = e
                    try:
                        if ddp:
                            _dist.raise_together(error, comm)
                        elif error is not None:
                            raise error
                    except NonFiniteLossError:  # the forward in train mode moved the BN statistics already
                        _put_back(model, task, last_good)
                        raise
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
                if ddp:
                    loss_sum, correct, seen = _dist.all_reduce_numbers([loss_sum, correct, seen], comm)
                    if not use_sync_bn:
                        _dist.average_bn_stats_(model, task, comm)
                if seen == 0:
                    raise DataError('train_data yielded no batches')
                bad = _non_finite(model, task)
                if bad:
                    _put_back(model, task, last_good)
                    raise NonFiniteLossError(
                        f'task {task!r}: {bad[0]} (and {len(bad) - 1} more) became NaN or Inf in epoch {epoch + 1}; '
                        f'the task is put back to its last good state and nothing of it was saved (lower the learning '
                        f'rate)')
                last_good = _task_snapshot(model, task)
                val_acc = None
                if val_loader is not None:
                    val_acc = _accuracy(model, val_loader, None, device, reduce=ddp, comm=comm)
                history.train_loss.append(loss_sum / seen)
                history.train_acc.append(correct / seen)
                history.val_acc.append(val_acc)
                history.lr.append(float(optimizer.param_groups[0]['lr']))
                history.head_lr.append(float(optimizer.param_groups[-1]['lr']))
                history.epoch_time_s.append(time.perf_counter() - t0)
                if show:
                    msg = (f'{task} epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f}, '
                           f'train acc {100 * history.train_acc[-1]:.1f}%')
                    if val_acc is not None:
                        msg += f', val acc {100 * val_acc:.1f}%'
                    tqdm.write(msg)
                stop = bool(callback(history)) if callback is not None else False
                if ddp:
                    stop = _dist.all_reduce_numbers([float(stop)], comm, op='max')[0] > 0
                if stop:
                    history.stopped_early = epoch + 1 < epochs
                    done = True
                if checkpoint is not None:
                    save_checkpoint(epoch + 1, done or epoch + 1 == epochs)
            net = model  # drop the DDP wrapper (and its reducer) before the layers swap back
        if recalibrate_bn and history.epochs:
            _recalibrate_bn(model, train_loader, device, model_dtype, show, task, comm if ddp else None)
        if prototypes and history.epochs:
            from .serving import compute_task_statistics
            compute_task_statistics(model, task, train_loader, num_workers=num_workers, progress=show,
                                    all_reduce=ddp)
    except BaseException:  # what was trained stays in the task
        net = None
        give_back()
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        net = None
        model.train(was_training)
    return history


def _recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype,
                    progress: bool, task: str, comm: Optional[torch.device] = None) -> None:
    """Recompute the active task's BN running statistics as cumulative averages over one pass of ``loader``; with
    ``comm`` (DDP), over all processes' passes, each process weighted by its number of batches."""
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


# ------------------------------------------------------------------------------------------ evaluation
@contextlib.contextmanager
def _eval_mode(model: nn.Module, task: Optional[str]):
    """Eval mode with ``task`` (default: the active one) computed inside, per call (``task_scope``): the model is not
    changed when it is in eval mode already, so threads can evaluate different tasks at once."""
    with model._serving(), model.task_scope(model.active_task if task is None else task):
        yield


@torch.inference_mode()
def _accuracy(model: nn.Module, loader: DataLoader, task: Optional[str], device: torch.device, reduce: bool = False,
              comm: Optional[torch.device] = None) -> float:
    """Top-1 accuracy over ``loader``; ``reduce``: summed over all processes, the padding that a DistributedSampler
    repeats counted out, so every sample counts once."""
    name = model.active_task if task is None else task
    dtype = _model_dtype(model)
    sampler = getattr(loader, 'sampler', None)
    correct = seen = position = 0
    with _eval_mode(model, task):
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
        model._task(task)
    device = _resolve_device(model, device)
    reduce = bool(distributed) and _dist.is_distributed() and _dist.get_world_size() > 1
    comm = _dist.comm_device(device) if reduce else None
    loader = _loader(data, batch_size, False, None, num_workers, device, 'data', shard=reduce)
    return _accuracy(model, loader, task, device, reduce=reduce, comm=comm)


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
    model = _dist.unwrap_model(model)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if task is not None:
        model._task(task)
    device = _resolve_device(model, device)
    dtype = _model_dtype(model)
    out: List[List[tuple]] = []
    with torch.inference_mode(), _eval_mode(model, task):
        names = model.tasks[model.active_task if task is None else task].class_names
        for start in range(0, images.shape[0], 64):
            probs = model(images[start:start + 64].to(device, dtype)).float().softmax(1).cpu()
            k = max(1, min(int(topk), probs.shape[1]))
            p, idx = probs.topk(k, dim=1)
            for pi, ii in zip(p.tolist(), idx.tolist()):
                out.append([(c, None if names is None else names[c], q) for c, q in zip(ii, pi)])
    return out
