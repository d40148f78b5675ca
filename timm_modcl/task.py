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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import TaskConfig
from .errors import InvalidTaskNameError, TaskError
from .methods import method_of

__all__ = ['BASE_TASK', 'TaskDict', 'TaskInfo', 'TaskState', 'TaskTable', 'table_key', 'validate_task_name', 'validate_metadata']

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


def table_key(name: str) -> str:
    """The key of a layer's (or a flat name's) entry in a task's tables: dots become ``/`` (module attributes cannot
    hold dots), so ``modcl_tasks.<task>.<table>.<key>`` in a state dict reads as the flat name with slashes."""
    return name.replace('.', '/')


def table_name(key: str) -> str:
    """The layer (or flat) name of a table key (``table_key`` reversed)."""
    return key.replace('/', '.')


class TaskTable(nn.Module):
    """One kind of a task's tensors (parameters or buffers) keyed by layer name, a mutable mapping.

    The tensors live in the module's own ``_parameters`` / ``_buffers`` under ``table_key(name)``, so ``.to()``,
    ``state_dict``, ``deepcopy``, pickling and DDP see them through PyTorch's own machinery.
    """

    def __init__(self, items: Optional[Mapping[str, torch.Tensor]] = None, *, parameters: bool) -> None:
        super().__init__()
        self.holds_parameters = parameters
        for k, v in (items or {}).items():
            self[k] = v

    @property
    def store(self) -> Dict[str, Optional[torch.Tensor]]:
        """The dict the tensors live in, by table key (what the layers read on every forward)."""
        return self._parameters if self.holds_parameters else self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.store.get(table_key(name))
        if t is None:
            raise KeyError(name)
        return t

    def get(self, name: str, default=None):
        t = self.store.get(table_key(name))
        return default if t is None else t

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        key = table_key(name)
        if self.holds_parameters:
            self._parameters[key] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        else:
            self._buffers[key] = value

    def __delitem__(self, name: str) -> None:
        del self.store[table_key(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and table_key(name) in self.store

    def __iter__(self):
        return (table_name(k) for k in list(self.store))

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return list(iter(self))

    def values(self):
        return list(self.store.values())

    def items(self):
        return [(table_name(k), v) for k, v in self.store.items()]

    def pop(self, name: str, *default):
        return self.store.pop(table_key(name), *default)

    def update(self, other: Mapping[str, torch.Tensor] = (), **kw) -> None:
        for k, v in dict(other, **kw).items():
            self[k] = v

    def clear(self) -> None:
        self.store.clear()

    def extra_repr(self) -> str:
        return f'{len(self)} {"parameters" if self.holds_parameters else "buffers"}'


def _grouped(table: TaskTable) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
    out: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
    for key, t in table.store.items():
        layer, _, k = key.rpartition('/')
        out.setdefault(table_name(layer), {})[k] = t
    return out


class TaskDict(nn.ModuleDict):
    """A model's tasks (``model.modcl_tasks``): an ``nn.ModuleDict`` of ``TaskState`` by name, in the order added.

    Calling it passes the input through unchanged, so wrappers that call every child of a model in order (timm's
    ``FeatureDictNet`` for ``features_only=True``) see no extra layer.
    """

    _is_impure = True   # torch.fx: never removed from a traced graph as dead code

    def forward(self, x):
        return x

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript gets an identity: scripted layers have their task folded in and read no task."""
        return nn.Identity()


class TaskState(nn.Module):
    """Everything one task owns: modulators, norm statistics and affine, head, statistics and metadata.

    A module: a model holds its tasks in ``model.modcl_tasks`` (an ``nn.ModuleDict`` keyed by task name), so every
    task's tensors are in the model's module tree. Tables (``TaskTable``): ``modulator`` (one parameter per modulated
    layer), ``norm`` (per-task norm affine, ``<layer>.weight|bias``), ``bn`` (BatchNorm running statistics,
    ``<layer>.running_mean|...``; the base task's are the layers' own buffers), ``stats`` (prototype statistics,
    buffers). The head is a submodule while the task is not bound; the bound task's head sits at the model's head
    (timm's classifier path) instead, so no tensor appears twice in the module tree.

    ``tensors()`` gives the flat naming used in adapter files (see the module docstring).
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
            layer_stats: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.config = config
        self.modulator = TaskTable(modulators, parameters=True)
        self.norm = TaskTable(OrderedDict((f'{layer}.{k}', p) for layer, a in (norm_affine or {}).items()
                                          for k, p in a.items()), parameters=True)
        self.bn = TaskTable(OrderedDict((f'{layer}.{k}', t) for layer, s in (norm_stats or {}).items()
                                        for k, t in s.items()), parameters=False)
        self._modules['stats'] = TaskTable(stats, parameters=False)   # direct: `stats` is a property
        # what the layers read on every forward (the tables' own dicts: live across .to(), copies and pickling)
        self.__dict__['modulator_store'] = self.modulator._parameters
        self.__dict__['norm_store'] = self.norm._parameters
        self.__dict__['bn_store'] = self.bn._buffers
        # the base task's BatchNorm statistics are the layers' own buffers (the checkpoint's): a plain reference
        self.__dict__['layer_stats'] = OrderedDict(layer_stats or {})
        self.__dict__['head_module'] = head
        self._modules['head'] = head
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.metadata: Dict[str, str] = dict(metadata or {})

    # ---------------------------------------------------------------- views
    @property
    def head(self) -> nn.Module:
        return self.__dict__['head_module']

    @property
    def stats(self) -> TaskTable:
        """The task's statistics by name (a mutable mapping of buffers)."""
        return self._modules['stats']

    def __setattr__(self, name: str, value) -> None:
        if name == 'head':
            bound = 'head' not in self._modules
            self.__dict__['head_module'] = value
            if not bound:
                self._modules['head'] = value
        elif name == 'stats':   # a new table, as assigning a dict would (an earlier reference keeps the old one)
            self._modules['stats'] = TaskTable(value, parameters=False)
        else:
            super().__setattr__(name, value)

    def bind_head(self, bound: bool) -> None:
        """Take the head out of this module while the model holds it at its head path (``bound``), or put it back."""
        if bound:
            self._modules.pop('head', None)
        else:
            self._modules['head'] = self.__dict__['head_module']

    @property
    def modulators(self) -> TaskTable:
        """Modulators by layer name."""
        return self.modulator

    @property
    def norm_stats(self) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
        """BatchNorm running statistics by layer name (the live tensors)."""
        layers = self.__dict__['layer_stats']
        if layers:
            return OrderedDict((n, {k: m._buffers[k] for k in BN_STATS}) for n, m in layers.items())
        return _grouped(self.bn)

    @property
    def norm_affine(self) -> 'OrderedDict[str, Dict[str, nn.Parameter]]':
        """Per-task norm affine by layer name (the live parameters)."""
        return _grouped(self.norm)

    def move_stats_to_layers(self, layers: Mapping[str, nn.Module]) -> None:
        """Copy the task's BatchNorm statistics into the layers' own buffers and read them from there from now on
        (what the base task does: its statistics are the checkpoint's, under timm's keys)."""
        with torch.no_grad():
            for layer, s in self.norm_stats.items():
                for k, v in s.items():
                    layers[layer]._buffers[k].copy_(v)
        self.bn.clear()
        self.__dict__['layer_stats'] = OrderedDict(layers)

    def forget_layers(self, weights: Sequence[str], norms: Sequence[str]) -> None:
        """Drop the entries of layers that are no longer in the model (after a structural change)."""
        weights, norms = set(weights), set(norms)
        for layer in [n for n in self.modulator if n not in weights]:
            del self.modulator[layer]
        for table in (self.norm, self.bn):
            for key in [k for k in table.store if table_name(k.rpartition('/')[0]) not in norms]:
                del table.store[key]
        layers = self.__dict__['layer_stats']
        for layer in [n for n in layers if n not in norms]:
            del layers[layer]

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
        for layer, p in self.modulator.items():
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

    def trainable(self) -> List[nn.Parameter]:
        """What an optimizer trains for this task: its modulators, its own norm affine and its head."""
        return list(self.modulator.values()) + list(self.norm.values()) + list(self.head.parameters())

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The task's trainable tensors (``trainable()``), its head included wherever the model holds it."""
        return iter(self.trainable())

    def set_trainable(self, flag: bool) -> None:
        """Let autograd (and so any optimizer) reach this task's tensors, or not: only the bound task's require
        grad. Switching off also drops their gradients, so no optimizer step can change them."""
        for p in self.trainable():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    def meta(self) -> Dict[str, Any]:
        """JSON-serialisable description of the task (everything but the tensors)."""
        return task_meta(self.name, self.num_classes, self.class_names, self.config, self.metadata)

    def info(self) -> TaskInfo:
        affine = sum(p.numel() for p in self.norm.values())
        return TaskInfo(
            name=self.name,
            num_classes=self.num_classes,
            class_names=self.class_names,
            config=self.config,
            num_modulator_params=sum(p.numel() for p in self.modulator.values()),
            num_head_params=sum(p.numel() for p in self.head.parameters()),
            num_norm_values=affine + sum(v.numel() for s in self.norm_stats.values() for k, v in s.items()
                                         if k != 'num_batches_tracked'),
            num_norm_affine=affine,
            num_stats_values=sum(v.numel() for v in self.stats.values()),
            metadata=dict(self.metadata),
        )

    def extra_repr(self) -> str:
        return f'name={self.name!r}, num_classes={self.num_classes}, method={self.config.method!r}'
