"""What a failing ``train_task`` puts back: the task's last good tensors (a divergence), and the caller's active
task and device (any error; the random states are restored by ``keep_rng_on_error``). Also the seeding."""
import contextlib
import random
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

__all__ = ['TaskSnapshot', 'CallerState', 'seed_everything']


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global RNGs (timm's augmentations draw from Python's ``random``)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover
        pass


class TaskSnapshot:
    """Copies of a task's trained tensors and BN statistics (what an epoch changes; prototype statistics are not
    included): ``take`` after every good epoch, ``put_back`` after a divergence."""

    def __init__(self, model: nn.Module, task: str) -> None:
        self.model, self.task = model, task
        self.tensors: Dict[str, torch.Tensor] = {}
        self.take()

    def _live(self) -> Dict[str, torch.Tensor]:
        return self.model.task_tensors(self.task)

    def take(self) -> None:
        """Copy the task's tensors as they are now."""
        self.tensors = {k: v.detach().clone() for k, v in self._live().items()}

    def put_back(self) -> None:
        """Copy the last taken values back into the task's tensors (in place)."""
        with torch.no_grad():
            for k, v in self._live().items():
                v.copy_(self.tensors[k])

    def non_finite(self) -> List[str]:
        """Names of the task's floating-point tensors that hold NaN or Inf now."""
        return [k for k, v in self._live().items() if v.is_floating_point() and not torch.isfinite(v).all()]


class CallerState:
    """The model's active task and device as the caller gave them; ``restore`` puts them back after an error."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.task, self.device = model, model.active_task, device

    def restore(self, target: torch.device) -> None:
        """Set the caller's active task again and move the model back from ``target`` if it was moved."""
        if self.task in self.model.tasks and self.model.active_task != self.task:
            self.model.set_task(self.task)
        if target != self.device:
            self.model.to(self.device)

    @contextlib.contextmanager
    def restored_on_error(self, target: torch.device) -> Iterator[None]:
        """If the block raises, ``restore`` (then re-raise)."""
        try:
            yield
        except BaseException:
            self.restore(target)
            raise
