"""``TrainHistory``: what ``train_task`` returns and checkpoints, one list entry per finished epoch."""
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .._io import atomic_write_json
from ..errors import DataError

__all__ = ['TrainHistory']


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
