"""Training and evaluation of one task of a modcl model.

    model.add_task('flowers', num_classes=102)
    history = train_task(model, 'flowers', train_ds, val_ds)   # the benchmark-validated recipe by default
    acc = evaluate(model, test_ds, task='flowers')

Only the trained task's modulators and head are optimised, and only its BatchNorm running statistics are updated
(BN layers run in train mode, as in the paper, which is how each task gets its own statistics). Every other task
keeps bit-identical outputs.

Under torchrun, ``train_task`` trains with ``DistributedDataParallel`` (see ``timm_modcl.distributed``); with
``checkpoint=PATH`` it writes a checkpoint after every epoch, and ``resume=True`` continues from it
(``timm_modcl.checkpoint``). ``train_task`` is a short loop over parts in ``timm_modcl.training`` (options, set-up,
resume, precision, epoch loop, BN recalibration, evaluation).
"""
import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import torch.nn as nn

from . import distributed as _dist
from ._rng import keep_rng_on_error
from .metrics import AccuracyMatrix
from .training.evaluation import evaluate, predict
from .training.guard import CallerState, TaskSnapshot
from .training.history import TrainHistory
from .training.loaders import DataLike, model_device
from .training.loop import finish, train_epochs
from .training.options import TrainOptions, check_task
from .training.setup import TrainRun, plan, set_up, start

__all__ = ['TrainHistory', 'train_task', 'evaluate', 'predict', 'AccuracyMatrix']


@keep_rng_on_error()
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
    model = _dist.unwrap_model(model)
    num_classes = check_task(model, task)
    opts = TrainOptions(
        epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
        milestones=milestones, gamma=gamma, sched=sched, warmup_epochs=warmup_epochs, opt=opt,
        label_smoothing=label_smoothing, grad_clip=grad_clip, amp=amp, device=device, seed=seed,
        num_workers=num_workers, progress=progress, callback=callback, recalibrate_bn=recalibrate_bn,
        distributed=distributed, sync_bn=sync_bn, checkpoint=checkpoint, resume=resume, prototypes=prototypes)
    opts.check(task, train_data, val_data)
    run = plan(model, task, num_classes, opts, train_data)
    # rank 0 reads, every process gets the same bytes; validated before anything changes
    resumed = bool(opts.resume) and run.checkpoint.load(model, [g['params'] for g in run.groups])
    caller = CallerState(model, model_device(model))
    # what a divergence puts back: the task as the call found it (a resumed state that diverges at once is undone
    # with the restore), then the end of the last finished epoch
    run.snapshot = TaskSnapshot(model, task)
    with caller.restored_on_error(run.device):  # a set-up failure leaves the model as it was given
        set_up(run, train_data, val_data)
        start(run, resumed)
    with caller.restored_on_error(run.device), _training(model, run):  # what was trained stays in the task
        train_epochs(run)
        finish(run)
    return run.history


@contextlib.contextmanager
def _training(model: nn.Module, run: TrainRun) -> Iterator[None]:
    """The block trains: afterwards (also after an error) no gradients are held and the model's train/eval mode is
    the caller's."""
    was_training = model.training
    try:
        yield
    finally:
        run.optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
