"""Checkpoint and resume of one ``train_task`` run (the file format and its checks are ``timm_modcl.checkpoint``):
read and validate before anything changes, restore after the run's optimizer is built, write after every epoch."""
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import distributed as _dist
from ..checkpoint import (TrainCheckpoint, checkpoint_bytes, parse_checkpoint, read_checkpoint_bytes,
                          restore_rng_state, rng_state_bytes, write_checkpoint)
from ..errors import CheckpointError
from .history import TrainHistory

if TYPE_CHECKING:  # pragma: no cover
    from .setup import TrainRun

__all__ = ['check_checkpoint_path', 'RunCheckpoint']


def check_checkpoint_path(checkpoint: Any, task: str) -> None:
    """A path a checkpoint can be written to: not a folder, under folders (checked before any training).

    Raises:
        CheckpointError: naming what is wrong with the path.
    """
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


class RunCheckpoint:
    """The checkpoint file of one run: ``load`` (rank 0 reads, every process gets the same bytes) and validate,
    ``check_state`` / ``restore`` once the run's optimizer is built, ``save`` after every epoch (rank 0 writes).

    Args:
        path: The checkpoint file.
        task: The trained task.
        record: The run's arguments a resume must find equal (``TrainOptions.run_record``).
        comm: Where collectives run under DDP; ``None``: this process alone.
        rank: This process's rank (0 without DDP).
    """

    def __init__(self, path: Union[str, os.PathLike], task: str, record: Dict[str, Any],
                 comm: Optional[torch.device], rank: int) -> None:
        self.path, self.task, self.record, self.comm, self.rank = path, task, record, comm, rank
        self.loaded: Optional[TrainCheckpoint] = None
        self.history: Optional[TrainHistory] = None

    def load(self, model: nn.Module, groups: List[List[nn.Parameter]]) -> bool:
        """Read the checkpoint, if there is one, and validate it against the model, task, run and parameter
        groups (nothing changes). Returns whether there was one.

        Raises:
            CheckpointError: corrupt, of another run, written by another number of processes.
        """
        data = read_checkpoint_bytes(self.path) if self.rank == 0 else None
        data = _dist.broadcast_bytes(data, self.comm) if self.comm is not None else data
        if data is None:
            return False
        ck = parse_checkpoint(data, repr(str(self.path)))
        world = self.record['world_size']
        if ck.world_size != world:
            raise CheckpointError(f'{str(self.path)!r} was written by {ck.world_size} process(es); resume it '
                                  f'with the same number (now {world})')
        ck.validate(model, self.task, self.record, groups)
        self.history = TrainHistory.from_dict(ck.history)
        self.loaded = ck
        return True

    def shuffle_seed(self, seed: Optional[int]) -> Optional[int]:
        """The interrupted run's DDP shuffling seed (drawn when no seed was given), else ``seed``."""
        if self.loaded is not None and self.loaded.shuffle_seed is not None:
            return self.loaded.shuffle_seed
        return seed

    def check_state(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
        """Check the loaded optimizer, scheduler and scaler state against this run's (``TrainCheckpoint``)."""
        self.loaded.check_state(optimizer, scheduler, scaler)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                generator: Optional[torch.Generator], device: torch.device) -> Tuple[TrainHistory, int, bool]:
        """Restore the task's tensors, the optimizer, scheduler, scaler and this rank's random states. Returns the
        history, the epochs finished and whether the run was finished."""
        ck = self.loaded
        ck.restore(model, self.task, optimizer, scheduler, scaler)
        restore_rng_state(ck.rng(self.rank), generator, device)
        return self.history, ck.epoch, ck.done

    def save(self, run: 'TrainRun', epochs_done: int, finished: bool) -> None:
        """Write the checkpoint after ``epochs_done`` epochs (every process's random states; rank 0 writes).

        Raises:
            CheckpointError: it cannot be written.
        """
        blob = rng_state_bytes(run.generator, run.device)
        blobs = _dist.all_gather_bytes(blob, self.comm) if self.comm is not None else [blob]
        if self.rank == 0:
            write_checkpoint(self.path, checkpoint_bytes(
                run.model, self.task, epoch=epochs_done, done=finished, history=run.history.to_dict(),
                optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler, run=self.record, rng=blobs,
                shuffle_seed=run.shuffle_seed if self.comm is not None else None))
