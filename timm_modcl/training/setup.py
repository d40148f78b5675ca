"""Set-up of one ``train_task`` run: ``plan`` (devices, DDP, parameter groups; changes nothing), ``set_up`` (the task
bound and moved, loaders, optimizer, schedule) and ``start`` (seeding, then the resumed state or DDP's first
broadcast). ``TrainRun`` holds what the parts share."""
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import distributed as _dist
from ..errors import DistributedError, TaskError
from .batchnorm import task_bn_stats
from .guard import TaskSnapshot, seed_everything
from .history import TrainHistory
from .loaders import DataLike, loader_len, make_loader, model_device, model_dtype, target_device
from .options import TrainOptions
from .precision import Stepper, amp_enabled, amp_settings
from .resume import RunCheckpoint

__all__ = ['TrainRun', 'plan', 'set_up', 'start', 'param_groups', 'build_optimizer', 'build_scheduler']


@dataclass
class TrainRun:
    """What the parts of one ``train_task`` run share; ``comm`` is where collectives run (``None``: no DDP)."""
    model: nn.Module
    task: str
    opts: TrainOptions
    num_classes: int
    device: torch.device
    comm: Optional[torch.device]
    rank: int
    sync_bn: bool
    amp: bool
    groups: List[Dict[str, Any]]
    checkpoint: Optional[RunCheckpoint]
    snapshot: Optional[TaskSnapshot] = None
    train_loader: Optional[DataLoader] = None
    val_loader: Optional[DataLoader] = None
    shuffle_seed: Optional[int] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    scaler: Any = None
    amp_dtype: Optional[torch.dtype] = None
    dtype: torch.dtype = torch.float32
    stepper: Optional[Stepper] = None
    history: TrainHistory = field(default_factory=lambda: TrainHistory(task=''))
    start_epoch: int = 0
    done: bool = False

    @property
    def ddp(self) -> bool:
        return self.comm is not None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def show(self) -> bool:
        """Whether this process shows progress (rank 0, ``progress=True``)."""
        return bool(self.opts.progress) and self.main

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The training loader's generator (shuffling or, under DDP, worker seeds)."""
        return getattr(self.train_loader, 'generator', None)


def param_groups(model: nn.Module, task: str, lr: float, head_lr: Optional[float]) -> List[Dict[str, Any]]:
    """The optimizer's groups: the task's modulators (and norm affine) at ``lr``, its head at ``head_lr``."""
    head_ids = {id(t) for k, t in model.task_tensors(task).items() if k.startswith('head.')}
    params = model.task_parameters(task)
    head_params = [p for p in params if id(p) in head_ids]
    mod_params = [p for p in params if id(p) not in head_ids]
    groups = [{'params': head_params, 'lr': float(head_lr if head_lr is not None else lr)}]
    if mod_params:
        groups.insert(0, {'params': mod_params, 'lr': float(lr)})
    return groups


def plan(model: nn.Module, task: str, num_classes: int, opts: TrainOptions, train_data: DataLike) -> TrainRun:
    """Decide devices, DDP (joining torchrun's process group when needed) and parameter groups.

    Raises:
        DistributedError: DDP asked for without a process group, SyncBatchNorm on the CPU or with BN layers it
            cannot convert, NCCL with a CPU model. TaskError: a CUDA device without CUDA.
    """
    ddp = _dist.resolve_distributed(opts.distributed, opts.device if opts.device is not None else model_device(model))
    target = target_device(model, opts.device, ddp)
    rank, world = (_dist.get_rank(), _dist.get_world_size()) if ddp else (0, 1)
    comm = _dist.comm_device(target) if ddp else None
    sync_bn = bool(opts.sync_bn) and ddp
    if sync_bn:
        if target.type == 'cpu':
            raise DistributedError('sync_bn=True needs CUDA: torch\'s SyncBatchNorm synchronises GPU tensors only; '
                                   'train on CPU without sync_bn (the BN statistics are averaged across processes '
                                   'after every epoch)')
        with _dist.sync_batchnorm(model):  # raises for BN types without a synchronised counterpart, changes nothing
            pass
    amp = amp_enabled(opts.amp, target)
    groups = param_groups(model, task, opts.lr, opts.head_lr)
    record = opts.run_record(amp, world, sync_bn, train_data)
    checkpoint = None if opts.checkpoint is None else RunCheckpoint(opts.checkpoint, task, record, comm, rank)
    return TrainRun(model=model, task=task, opts=opts, num_classes=num_classes, device=target, comm=comm,
                    rank=rank, sync_bn=sync_bn, amp=amp, groups=groups, checkpoint=checkpoint,
                    history=TrainHistory(task=task))


def build_optimizer(groups: List[Dict[str, Any]], opts: TrainOptions) -> torch.optim.Optimizer:
    """timm's optimizer ``opts.opt`` over the groups.

    Raises:
        TaskError: an optimizer timm cannot build.
    """
    from timm.optim import create_optimizer_v2
    try:
        return create_optimizer_v2(groups, opt=opts.opt, lr=float(opts.lr), weight_decay=float(opts.weight_decay))
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise TaskError(f'cannot build the optimizer {opts.opt!r}: {e}') from None


def build_scheduler(optimizer: torch.optim.Optimizer, opts: TrainOptions) -> Any:
    """timm's cosine or step schedule of the run, stepped once per epoch."""
    from timm.scheduler import create_scheduler_v2
    # timm applies a milestone m at schedule index m - 1; +1 gives torch's MultiStepLR timing (the paper's recipe)
    # (milestones are absolute epochs; a cosine decays over the epochs after the warm-up)
    cosine, epochs = opts.sched == 'cosine', opts.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine' if cosine else 'multistep',
        num_epochs=max(epochs - opts.warmup_epochs, 1) if cosine else max(epochs, 1),
        decay_milestones=[m + 1 for m in opts.milestones] or [max(epochs, 1) + 1], decay_rate=opts.gamma,
        warmup_epochs=opts.warmup_epochs, warmup_lr=float(opts.lr) * 1e-5, warmup_prefix=cosine, min_lr=0.0)
    return scheduler


def _loaders(run: TrainRun, train_data: DataLike, val_data: Optional[DataLike]) -> None:
    o = run.opts
    run.train_loader = make_loader(train_data, o.batch_size, True, run.shuffle_seed, o.num_workers, run.device,
                                   'train_data', shard=run.ddp)
    if val_data is not None:
        run.val_loader = make_loader(val_data, o.batch_size, False, None, o.num_workers, run.device, 'val_data',
                                     shard=run.ddp)
    if run.ddp:
        if isinstance(train_data, DataLoader) and not isinstance(train_data.sampler, DistributedSampler) \
                and run.main:
            warnings.warn(f'train_data is a DataLoader without a DistributedSampler: each of the '
                          f'{_dist.get_world_size()} processes trains on all of it (pass a Dataset to have it '
                          f'sharded)', stacklevel=5)
        _dist.check_same_batches(loader_len(run.train_loader), run.comm, 'train_data')


def set_up(run: TrainRun, train_data: DataLike, val_data: Optional[DataLike]) -> None:
    """Bind the task (before any DDP wrapping: DDP keeps the Parameter objects bound now), move the model, build the
    loaders, optimizer and schedule. Nothing is seeded yet.

    Raises:
        DataError, DistributedError, TaskError: bad data, backbones or batch counts that differ between the
            processes, an optimizer timm cannot build.
    """
    model = run.model
    model.set_task(run.task)
    model.to(run.device)
    run.shuffle_seed = run.opts.seed
    if run.ddp:
        _dist.check_same_backbone(model, run.comm)
        run.shuffle_seed = _dist.rng_seed_for_run(run.opts.seed, run.comm)
        if run.checkpoint is not None:
            run.shuffle_seed = run.checkpoint.shuffle_seed(run.shuffle_seed)
    run.amp_dtype, run.scaler = amp_settings(run.device, run.amp)
    _loaders(run, train_data, val_data)
    run.optimizer = build_optimizer(run.groups, run.opts)
    run.scheduler = build_scheduler(run.optimizer, run.opts)
    run.stepper = Stepper(run.optimizer, [p for g in run.groups for p in g['params']], run.scaler,
                          run.opts.grad_clip)
    run.dtype = model_dtype(model)


def start(run: TrainRun, resumed: bool) -> None:
    """Check a resumed state against the run (before any reseeding), seed (``seed + rank``), then restore the resumed
    state, or under DDP give every process rank 0's BN statistics (buffers DDP does not broadcast).

    Raises:
        CheckpointError: optimizer, scheduler or scaler state that does not fit this run.
    """
    from tqdm.auto import tqdm
    if resumed:
        run.checkpoint.check_state(run.optimizer, run.scheduler, run.scaler)
    if run.opts.seed is not None:
        seed_everything(run.opts.seed + run.rank)
    if resumed:
        run.history, run.start_epoch, run.done = run.checkpoint.restore(
            run.model, run.optimizer, run.scheduler, run.scaler, run.generator, run.device)
        if run.show:
            tqdm.write(f'{run.task}: resuming from {run.opts.checkpoint} after epoch {run.start_epoch}/'
                       f'{run.opts.epochs}')
    elif run.ddp:
        kinds = ('running_mean', 'running_var', 'num_batches_tracked')
        _dist.broadcast_tensors_(task_bn_stats(run.model, run.task, kinds=kinds), run.comm)
