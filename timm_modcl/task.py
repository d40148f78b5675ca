"""Per-task state: everything one task owns, under the flat tensor names adapter files and state dicts use.

A task owns one modulator per modulated weight layer, its BatchNorm running statistics, its own affine for the norm
layers that have one per task (LayerNorm / GroupNorm always, BatchNorm with ``TaskConfig.bn_affine``), its head, and
optional statistics (class prototypes for task-agnostic prediction). Flat names:
``modulator.<layer>``, ``bn.<layer>.running_mean|running_var|num_batches_tracked``, ``norm.<layer>.weight|bias``,
``head.weight|bias`` and ``stats.<name>``.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import TaskConfig
from .errors import InvalidTaskNameError, TaskError
from .methods import method_of

__all__ = ['BASE_TASK', 'TaskInfo', 'TaskState', 'validate_task_name', 'validate_metadata']

#: Name of the task that comes with the backbone checkpoint (its head, its norm statistics, zero modulators).
BASE_TASK = 'base'

_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_\-]*')
_MAX_NAME_LEN = 64
_MAX_METADATA = 256
_MAX_METADATA_CHARS = 64 * 1024
BN_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def validate_task_name(name: Any) -> str:
    """Return ``name`` if it is a valid task name.

    A task name is 1-64 characters of ASCII letters, digits, ``_`` and ``-``, starting with a letter or digit; it is
    used in file names and state-dict keys, so it cannot contain path separators, dots or whitespace.

    Raises:
        InvalidTaskNameError: if it is not.
    """
    if not isinstance(name, str):
        raise InvalidTaskNameError(f'task name must be a string, got {type(name).__name__}')
    if not name:
        raise InvalidTaskNameError('task name must not be empty')
    if len(name) > _MAX_NAME_LEN:
        raise InvalidTaskNameError(f'task name is {len(name)} characters long, the limit is {_MAX_NAME_LEN}')
    if not _NAME_RE.fullmatch(name):
        raise InvalidTaskNameError(
            f'task name {name!r} may only contain ASCII letters, digits, "_" and "-" and must start with a letter '
            f'or digit (no path separators, dots or whitespace)'
        )
    return name


def validate_metadata(metadata: Any, error=TaskError) -> Dict[str, str]:
    """Check free-form task metadata and return it as a ``{str: str}`` dict.

    Numbers and booleans are converted to strings (``{'acc': 0.9}`` is stored as ``{'acc': '0.9'}``), so what a
    model accepts is exactly what its adapter files and state dicts give back.

    Raises:
        error (TaskError by default): for a non-mapping, non-string keys, values that are not strings, numbers or
            booleans, non-finite numbers, or more than 256 entries / 64 KiB of text.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise error(f'metadata must be a mapping of strings to strings, got {type(metadata).__name__}')
    out: Dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not k:
            raise error(f'metadata keys must be non-empty strings, got {k!r}')
        if isinstance(v, bool):
            v = 'true' if v else 'false'
        elif isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise error(f'metadata value of {k!r} is {v!r}; numbers must be finite')
            v = repr(v)
        elif not isinstance(v, str):
            raise error(f'metadata value of {k!r} must be a string or a number, got {type(v).__name__}')
        out[k] = v
    if len(out) > _MAX_METADATA or sum(len(k) + len(v) for k, v in out.items()) > _MAX_METADATA_CHARS:
        raise error(f'metadata is too large (at most {_MAX_METADATA} entries and {_MAX_METADATA_CHARS} characters)')
    return out


def task_meta(name: str, num_classes: int, class_names: Optional[Sequence[str]], config: Any,
              metadata: Mapping[str, str]) -> Dict[str, Any]:
    """JSON-serialisable description of a task (everything but its tensors), as adapter headers and state dicts
    store it; ``TaskState``, ``TaskInfo`` and ``TaskPayload`` give it through their ``meta()``."""
    return {
        'name': name,
        'num_classes': num_classes,
        'class_names': None if class_names is None else list(class_names),
        'config': config.to_dict() if hasattr(config, 'to_dict') else config,
        'metadata': dict(metadata),
    }


@dataclass(frozen=True)
class TaskInfo:
    """A read-only summary of one task."""
    name: str
    num_classes: int
    class_names: Optional[Tuple[str, ...]]
    config: TaskConfig
    num_modulator_params: int
    num_head_params: int
    num_norm_values: int
    num_norm_affine: int = 0
    num_stats_values: int = 0
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.config.variant

    def meta(self) -> Dict[str, Any]:
        """JSON-serialisable description of the task (as ``TaskState.meta()`` and ``TaskPayload.meta()`` give it)."""
        return task_meta(self.name, self.num_classes, self.class_names, self.config, self.metadata)

    @property
    def resolution(self) -> Optional[Tuple[int, int]]:
        return self.config.resolution

    @property
    def num_trainable_params(self) -> int:
        """Values an optimizer trains for this task: modulators, per-task norm affine and head."""
        return self.num_modulator_params + self.num_head_params + self.num_norm_affine

    @property
    def num_added_params(self) -> int:
        """Values this task stores besides the frozen backbone: modulators, norm statistics and affine, head
        (prototype statistics, if any, are counted separately in ``num_stats_values``)."""
        return self.num_modulator_params + self.num_head_params + self.num_norm_values


class TaskState:
    """Everything one task owns: modulators, norm statistics and affine, head, statistics and metadata.

    ``tensors()`` gives the flat naming used in adapter files and state dicts (see the module docstring).
    """

    def __init__(
            self,
            name: str,
            num_classes: int,
            head: nn.Module,
            config: TaskConfig,
            modulators: Optional[Dict[str, nn.Parameter]] = None,
            norm_stats: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
            norm_affine: Optional[Dict[str, Dict[str, nn.Parameter]]] = None,
            stats: Optional[Dict[str, torch.Tensor]] = None,
            class_names: Optional[Sequence[str]] = None,
            metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.head = head
        self.config = config
        self.modulators: Dict[str, nn.Parameter] = OrderedDict(modulators or {})
        self.norm_stats: Dict[str, Dict[str, torch.Tensor]] = OrderedDict(norm_stats or {})
        self.norm_affine: Dict[str, Dict[str, nn.Parameter]] = OrderedDict(norm_affine or {})
        self.stats: Dict[str, torch.Tensor] = OrderedDict(stats or {})
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.metadata: Dict[str, str] = dict(metadata or {})

    @property
    def sign(self) -> float:
        return self.config.sign

    @property
    def method(self):
        """The task's ``methods.LayerMethod`` (how its tensor of a layer makes the layer's weight)."""
        cached = self.__dict__.get('_method')
        if cached is None or cached[0] is not self.config:  # read per layer per forward: kept for its config
            cached = self.__dict__['_method'] = (self.config, method_of(self.config))
        return cached[1]

    def tensors(self, stats: bool = True) -> 'OrderedDict[str, torch.Tensor]':
        """All tensors of the task under their flat names (the live tensors, not copies)."""
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        for layer, p in self.modulators.items():
            out[f'modulator.{layer}'] = p
        for layer, s in self.norm_stats.items():
            for k, v in s.items():
                out[f'bn.{layer}.{k}'] = v
        for layer, a in self.norm_affine.items():
            for k, v in a.items():
                out[f'norm.{layer}.{k}'] = v
        for k, v in self.head.state_dict(keep_vars=True).items():
            out[f'head.{k}'] = v
        if stats:
            for k, v in self.stats.items():
                out[f'stats.{k}'] = v
        return out

    def parameters(self) -> List[nn.Parameter]:
        """What an optimizer trains for this task: its modulators, its own norm affine and its head."""
        return (list(self.modulators.values()) + [p for a in self.norm_affine.values() for p in a.values()]
                + list(self.head.parameters()))

    def meta(self) -> Dict[str, Any]:
        """JSON-serialisable description of the task (everything but the tensors)."""
        return task_meta(self.name, self.num_classes, self.class_names, self.config, self.metadata)

    def info(self) -> TaskInfo:
        affine = sum(p.numel() for a in self.norm_affine.values() for p in a.values())
        return TaskInfo(
            name=self.name,
            num_classes=self.num_classes,
            class_names=self.class_names,
            config=self.config,
            num_modulator_params=sum(p.numel() for p in self.modulators.values()),
            num_head_params=sum(p.numel() for p in self.head.parameters()),
            num_norm_values=affine + sum(v.numel() for s in self.norm_stats.values() for k, v in s.items()
                                         if k != 'num_batches_tracked'),
            num_norm_affine=affine,
            num_stats_values=sum(v.numel() for v in self.stats.values()),
            metadata=dict(self.metadata),
        )

    def apply_(self, fn) -> None:
        """Apply a tensor conversion (as ``nn.Module._apply`` does) to all tensors of the task, in place."""
        for p in self.modulators.values():
            p.data = fn(p.data)
        for a in self.norm_affine.values():
            for p in a.values():
                p.data = fn(p.data)
        for s in self.norm_stats.values():
            for k in s:
                s[k] = fn(s[k])
        for k in self.stats:
            self.stats[k] = fn(self.stats[k])
        self.head._apply(fn)
