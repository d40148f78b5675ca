"""The exception family of timm_modcl: every error the library raises on bad input derives from ``ModCLError``."""

__all__ = [
    'ModCLError',
    'TaskError',
    'TaskNotFoundError',
    'TaskExistsError',
    'InvalidTaskNameError',
    'StatisticsError',
    'ResolutionError',
    'InputError',
    'StateDictError',
    'AdapterError',
    'AdapterFormatError',
    'FingerprintMismatchError',
    'HubError',
    'DataError',
    'UnsupportedModelError',
    'FrozenBackboneError',
    'DistributedError',
    'CheckpointError',
    'TrainingError',
    'NonFiniteLossError',
    'PayloadError',
]


class ModCLError(Exception):
    """Base class of all timm_modcl errors."""


class TaskError(ModCLError, ValueError):
    """A task operation was given bad arguments."""


class TaskNotFoundError(TaskError, KeyError):
    """The named task does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ''


class TaskExistsError(TaskError):
    """A task of that name already exists."""


class InvalidTaskNameError(TaskError):
    """A task name is empty, too long, or contains characters that are not allowed."""


class StatisticsError(TaskError):
    """A task lacks the statistics an operation needs (e.g. the class prototypes of task-agnostic prediction), or
    its statistics do not fit the model."""


class ResolutionError(TaskError):
    """A modulation resolution is not a pair of positive integers."""


class InputError(ModCLError, ValueError):
    """A forward input does not fit the model (e.g. wrong channel count)."""


class StateDictError(ModCLError, RuntimeError):
    """A state dict does not fit the model (different architecture, width or tasks)."""


class AdapterError(ModCLError):
    """A task adapter file could not be read, written or applied."""


class AdapterFormatError(AdapterError, ValueError):
    """An adapter file is corrupt, truncated, not an adapter, or has unexpected tensors, shapes or values."""


class FingerprintMismatchError(AdapterError):
    """An adapter was trained on different frozen backbone weights than the model has."""


class HubError(ModCLError):
    """Pushing to or pulling from the Hugging Face Hub failed."""


class DataError(ModCLError, ValueError):
    """A dataset cannot be used: missing or empty folder, class folders without images, bad labels."""


class UnsupportedModelError(ModCLError, TypeError):
    """A model cannot be made task-aware as it is: a module type the core does not know holds a parameter (which
    would otherwise stay shared and trainable), or its classifier is not a single Linear layer."""


class FrozenBackboneError(UnsupportedModelError):
    """An operation would change the frozen backbone that every task shares (assigning, deleting, pruning or
    reparametrizing a frozen weight, or a structural change once tasks exist); nothing was changed."""


class DistributedError(ModCLError, RuntimeError):
    """Distributed training was asked for but cannot run as configured (no process group, CPU SyncBatchNorm, ...)."""


class CheckpointError(ModCLError, ValueError):
    """A training checkpoint is corrupt, not a checkpoint, or was written by a different run (other task, backbone,
    arguments or number of processes) than the one asked to resume from it."""


class TrainingError(ModCLError, RuntimeError):
    """Training failed while it ran (not because of its arguments): e.g. it diverged."""


class NonFiniteLossError(TrainingError, TaskError):
    """The training loss (or the trained tensors) became NaN or Inf; the task is put back to where the failing epoch
    began and nothing is stored. (Also a ``TaskError``, which ``train_task`` raised for this before.)"""


class PayloadError(ModCLError, ValueError):
    """A task's tensors or description are not valid, or do not fit the architecture (``timm_modcl.payload``).
    File and state-dict readers report it as their own error (``AdapterFormatError``, ``CheckpointError``,
    ``StateDictError``) naming the source."""
