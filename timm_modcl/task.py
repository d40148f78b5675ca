"""Per-task state and the task lifecycle of a modulated model.

A *task* owns everything that differs between tasks: one modulator per modulated convolution, its own BatchNorm
running statistics (the affine gamma/beta stay shared and frozen) and its own classifier head. ``TaskMixin`` keeps
all tasks of a model and binds the active one into the layers, so that ``model.parameters()`` yields exactly what an
optimizer should train for the active task, and nothing of an inactive task can be touched by training.
"""
import contextlib
import fnmatch
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import (
    InvalidTaskNameError, StateDictError, TaskError, TaskExistsError, TaskNotFoundError,
)
from .layer import MODULATION_VARIANTS, LayerResolution, ModulatedConv2d, modulator_shape, validate_resolution

__all__ = ['BASE_TASK', 'DEFAULT_VARIANT', 'TaskInfo', 'TaskState', 'TaskMixin', 'validate_task_name']

#: Name of the task that comes with the backbone checkpoint (its head, unmodulated, its BN statistics).
BASE_TASK = 'base'
#: Modulation variant used when ``add_task`` is not told otherwise (chosen by the benchmarks, see README).
DEFAULT_VARIANT = 'identity'
#: Version of the ``state_dict`` layout written by ``TaskMixin.state_dict``.
STATE_DICT_FORMAT = 1

_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_\-]*$')
_MAX_NAME_LEN = 64
_BN_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
_META_KEY = 'modcl_meta'
_TASKS_PREFIX = 'tasks.'


def validate_task_name(name: Any) -> str:
    """Return ``name`` if it is a valid task name.

    A task name is 1-64 characters of ASCII letters, digits, ``_`` and ``-``, starting with a letter or digit; it is
    used in file names and state-dict keys, so it cannot contain path separators or dots.

    Raises:
        InvalidTaskNameError: if it is not.
    """
    if not isinstance(name, str):
        raise InvalidTaskNameError(f'task name must be a string, got {type(name).__name__}')
    if not name:
        raise InvalidTaskNameError('task name must not be empty')
    if len(name) > _MAX_NAME_LEN:
        raise InvalidTaskNameError(f'task name is {len(name)} characters long, the limit is {_MAX_NAME_LEN}')
    if not _NAME_RE.match(name):
        raise InvalidTaskNameError(
            f'task name {name!r} may only contain ASCII letters, digits, "_" and "-" and must start with a letter '
            f'or digit (no path separators or dots)'
        )
    return name


@dataclass(frozen=True)
class TaskInfo:
    """A read-only summary of one task."""
    name: str
    num_classes: int
    class_names: Optional[Tuple[str, ...]]
    variant: Optional[str]
    resolution: Optional[Tuple[int, int]]
    num_modulator_params: int
    num_head_params: int
    num_bn_stats: int
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def num_added_params(self) -> int:
        """Values this task adds to the frozen backbone: modulators, BN running statistics and head."""
        return self.num_modulator_params + self.num_head_params + self.num_bn_stats


class TaskState:
    """Everything one task owns: modulators, BN running statistics, head and metadata.

    The flat tensor naming of ``tensors()`` is the one used in adapter files and in the model's state dict:
    ``modulator.<conv layer>``, ``bn.<bn layer>.<running stat>``, ``head.weight`` and ``head.bias``.
    """

    def __init__(
            self,
            name: str,
            num_classes: int,
            head: nn.Module,
            modulators: Dict[str, nn.Parameter],
            bn_stats: Dict[str, Dict[str, torch.Tensor]],
            variant: Optional[str] = None,
            resolution: Optional[Tuple[int, int]] = None,
            class_names: Optional[Sequence[str]] = None,
            metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.head = head
        self.modulators = modulators
        self.bn_stats = bn_stats
        self.variant = variant
        self.resolution = resolution
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.metadata: Dict[str, str] = dict(metadata or {})

    @property
    def sign(self) -> float:
        return MODULATION_VARIANTS[self.variant] if self.variant else -1.0

    def tensors(self) -> 'OrderedDict[str, torch.Tensor]':
        """All tensors of the task under their flat names (the live tensors, not copies)."""
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        for layer, p in self.modulators.items():
            out[f'modulator.{layer}'] = p
        for layer, stats in self.bn_stats.items():
            for k, v in stats.items():
                out[f'bn.{layer}.{k}'] = v
        for k, v in self.head.state_dict(keep_vars=True).items():
            out[f'head.{k}'] = v
        return out

    def parameters(self) -> List[nn.Parameter]:
        """What an optimizer trains for this task: its modulators and its head."""
        return list(self.modulators.values()) + list(self.head.parameters())

    def meta(self) -> Dict[str, Any]:
        """JSON-serialisable description of the task (everything but the tensors)."""
        return {
            'name': self.name,
            'num_classes': self.num_classes,
            'class_names': None if self.class_names is None else list(self.class_names),
            'variant': self.variant,
            'resolution': None if self.resolution is None else list(self.resolution),
            'metadata': dict(self.metadata),
        }

    def info(self) -> TaskInfo:
        return TaskInfo(
            name=self.name,
            num_classes=self.num_classes,
            class_names=self.class_names,
            variant=self.variant,
            resolution=self.resolution,
            num_modulator_params=sum(p.numel() for p in self.modulators.values()),
            num_head_params=sum(p.numel() for p in self.head.parameters()),
            num_bn_stats=sum(v.numel() for s in self.bn_stats.values() for k, v in s.items() if k != 'num_batches_tracked'),
            metadata=dict(self.metadata),
        )

    def apply_(self, fn) -> None:
        """Apply a tensor conversion (as ``nn.Module._apply`` does) to all tensors of the task, in place."""
        for p in self.modulators.values():
            p.data = fn(p.data)
        for stats in self.bn_stats.values():
            for k in stats:
                stats[k] = fn(stats[k])
        self.head._apply(fn)


class TaskMixin:
    """Task lifecycle for a timm model whose convolutions were replaced by ``ModulatedConv2d``.

    Expects the host ``nn.Module`` to call ``_init_tasks()`` at the end of its ``__init__``. The host may have a
    ``classifier`` head (bound per task) or none (feature extractors).
    """

    # Python-side task management: never compiled by torch.jit.script
    __jit_unused_properties__ = ['active_task', 'tasks', 'modulated_layers', '_has_head']

    # ------------------------------------------------------------------ setup
    def _init_tasks(self) -> None:
        """Freeze the backbone (conv weights and BN gamma/beta become buffers) and create the base task."""
        self._modulate_modules()
        self._conv_layers: 'OrderedDict[str, ModulatedConv2d]' = OrderedDict(
            (n, m) for n, m in self.named_modules() if isinstance(m, ModulatedConv2d))
        next(iter(self._conv_layers.values())).check_input = True  # the stem: clear error on wrong channels
        self._bn_layers: 'OrderedDict[str, nn.BatchNorm2d]' = OrderedDict(
            (n, m) for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        head = getattr(self, 'classifier', None)
        base = TaskState(
            name=BASE_TASK,
            num_classes=int(getattr(self, 'num_classes', 0)),
            head=head if head is not None else nn.Identity(),
            modulators={},
            bn_stats=OrderedDict((n, {k: getattr(m, k) for k in _BN_STATS}) for n, m in self._bn_layers.items()),
        )
        self._tasks = OrderedDict([(BASE_TASK, base)])
        self._active = BASE_TASK

    def _modulate_modules(self) -> None:
        for parent in list(self.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    setattr(parent, child_name, ModulatedConv2d.from_conv(child))
                elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                    for pname in ('weight', 'bias'):
                        p = child._parameters.pop(pname, None)
                        if p is not None:
                            child.register_buffer(pname, p.detach().requires_grad_(False))

    @property
    def _has_head(self) -> bool:
        return hasattr(self, 'classifier')

    # ------------------------------------------------------------------ queries
    @property
    def active_task(self) -> str:
        """Name of the task the model currently computes."""
        return self._active

    @property
    def tasks(self) -> 'OrderedDict[str, TaskInfo]':
        """All tasks in the order they were added, with their metadata and added parameter counts."""
        return OrderedDict((n, t.info()) for n, t in self._tasks.items())

    @property
    def modulated_layers(self) -> List[str]:
        """Names of the convolutions that tasks can modulate."""
        return list(self._conv_layers)

    def _task(self, name: str) -> TaskState:
        try:
            return self._tasks[name]
        except (KeyError, TypeError):
            raise TaskNotFoundError(
                f'unknown task {name!r}; the model has tasks: {", ".join(map(repr, self._tasks))}') from None

    def task_parameters(self, name: Optional[str] = None) -> List[nn.Parameter]:
        """Trainable tensors of a task (default: the active one). For the active task, equal to ``parameters()``."""
        return self._task(self._active if name is None else name).parameters()

    def modulator_shapes(
            self,
            resolution=(4, 4),
            layer_resolution: Optional[LayerResolution] = None,
    ) -> 'OrderedDict[str, Tuple[int, ...]]':
        """Modulator shape of each conv at a resolution (unmodulated layers left out).

        Raises:
            ResolutionError: if a resolution is not a pair of positive integers.
        """
        resolution = validate_resolution(resolution)
        shapes: 'OrderedDict[str, Tuple[int, ...]]' = OrderedDict()
        for layer, conv in self._conv_layers.items():
            res = _layer_resolution(layer, tuple(conv.weight.shape), resolution, layer_resolution)
            if res is None:
                continue
            shape = modulator_shape(tuple(conv.weight.shape), res)
            if shape is not None:
                shapes[layer] = shape
        return shapes

    # ------------------------------------------------------------------ lifecycle
    def add_task(
            self,
            name: str,
            num_classes: int,
            resolution=(4, 4),
            *,
            variant: Optional[str] = None,
            layer_resolution: Optional[LayerResolution] = None,
            class_names: Optional[Sequence[str]] = None,
            metadata: Optional[Mapping[str, str]] = None,
            activate: bool = True,
            replace: bool = False,
    ) -> TaskInfo:
        """Add a task with fresh modulators, BN statistics copied from the base task, and a new head.

        Args:
            name: Task name (see ``validate_task_name``).
            num_classes: Number of classes of the task's head (>= 1).
            resolution: Modulation resolution ``(m1, m2)`` (an int ``m`` means ``(m, m)``).
            variant: ``"paper"`` (``W * (1 - M)``, kaiming-normal M) or ``"identity"`` (``W * (1 + M)``, M = 0:
                starts exactly at the pretrained weights). Default: ``DEFAULT_VARIANT``.
            layer_resolution: Per-layer override, a mapping ``{layer name or fnmatch pattern: (m1, m2) or None}``
                or a callable ``(layer_name, weight_shape) -> (m1, m2) | None``; ``None`` leaves a layer unmodulated.
            class_names: Optional class names, one per class.
            metadata: Optional free-form string metadata stored with the task (and in its adapter file).
            activate: Make the new task the active one (default).
            replace: Replace an existing task of that name instead of raising.

        Returns:
            The new task's ``TaskInfo``.

        Raises:
            InvalidTaskNameError, TaskExistsError, ResolutionError, TaskError: on bad arguments; the model is
            unchanged then.
        """
        validate_task_name(name)
        if name in self._tasks and not replace:
            raise TaskExistsError(f'task {name!r} already exists (pass replace=True to replace it)')
        if name == BASE_TASK:
            raise TaskExistsError(f'{BASE_TASK!r} is reserved for the task that comes with the backbone')
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TaskError(f'num_classes must be an integer >= 1, got {num_classes!r}')
        variant = DEFAULT_VARIANT if variant is None else variant
        if variant not in MODULATION_VARIANTS:
            raise TaskError(f'unknown modulation variant {variant!r}; choose one of {sorted(MODULATION_VARIANTS)}')
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != num_classes:
                raise TaskError(f'got {len(class_names)} class names for {num_classes} classes')
        shapes = self.modulator_shapes(resolution, layer_resolution)
        resolution = validate_resolution(resolution)

        ref = next(iter(self._conv_layers.values())).weight
        modulators: Dict[str, nn.Parameter] = OrderedDict()
        for layer, shape in shapes.items():
            m = torch.empty(shape, device=ref.device, dtype=ref.dtype)
            if variant == 'paper':
                nn.init.kaiming_normal_(m)
            else:
                nn.init.zeros_(m)
            modulators[layer] = nn.Parameter(m)
        base = self._tasks[BASE_TASK]
        bn_stats = OrderedDict((n, {k: v.detach().clone() for k, v in s.items()}) for n, s in base.bn_stats.items())
        for s in bn_stats.values():
            s['num_batches_tracked'].zero_()
        task = TaskState(
            name, num_classes, self._new_head(num_classes), modulators, bn_stats,
            variant=variant, resolution=resolution, class_names=class_names, metadata=metadata,
        )
        self._insert_task(task, activate=activate)
        return task.info()

    def _new_head(self, num_classes: int) -> nn.Module:
        if not self._has_head or num_classes == 0:
            return nn.Identity()
        ref = next(iter(self._conv_layers.values())).weight
        return nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)

    def _insert_task(self, task: TaskState, activate: bool) -> None:
        """Add (or replace) a fully built task; the only place tasks enter the model."""
        replacing_active = task.name == self._active
        self._tasks[task.name] = task
        if activate or replacing_active:
            self._bind(task.name)

    def set_task(self, name: str) -> None:
        """Make ``name`` the active task.

        Raises:
            TaskNotFoundError: if there is no such task (the active task is unchanged).
        """
        self._task(name)
        self._bind(name)

    @contextlib.contextmanager
    def use_task(self, name: str) -> Iterator[None]:
        """Context manager that runs the model on ``name`` and restores the previously active task afterwards."""
        previous = self._active
        self.set_task(name)
        try:
            yield
        finally:
            self._bind(previous)

    def remove_task(self, name: str) -> None:
        """Delete a task and everything it owns.

        Raises:
            TaskNotFoundError: if there is no such task.
            TaskError: for the base task (it holds the backbone's statistics new tasks start from) and for the
                active task (switch to another task first).
        """
        self._task(name)
        if name == BASE_TASK:
            raise TaskError(f'the {BASE_TASK!r} task holds the backbone statistics new tasks start from; '
                            f'it cannot be removed')
        if name == self._active:
            raise TaskError(f'task {name!r} is active; set another task before removing it')
        del self._tasks[name]

    def rename_task(self, name: str, new_name: str) -> None:
        """Rename a task.

        Raises:
            TaskNotFoundError, InvalidTaskNameError, TaskExistsError, TaskError: on bad names.
        """
        task = self._task(name)
        validate_task_name(new_name)
        if BASE_TASK in (name, new_name):
            raise TaskError(f'the {BASE_TASK!r} task cannot be renamed')
        if new_name in self._tasks:
            raise TaskExistsError(f'task {new_name!r} already exists')
        self._tasks = OrderedDict((new_name if n == name else n, t) for n, t in self._tasks.items())
        task.name = new_name
        if self._active == name:
            self._active = new_name

    def _bind(self, name: str) -> None:
        """Wire a task's tensors into the layers (modulators, BN statistics, head)."""
        task = self._tasks[name]
        for layer, conv in self._conv_layers.items():
            conv.bind(task.modulators.get(layer), task.sign)
        for layer, bn in self._bn_layers.items():
            for k, v in task.bn_stats[layer].items():
                bn._buffers[k] = v
        if self._has_head:
            self.classifier = task.head
            self.num_classes = task.num_classes
        self._active = name

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's head reset, applied to the active task's head."""
        super().reset_classifier(num_classes, global_pool)
        task = self._tasks[self._active]
        task.head = self.classifier
        task.num_classes = num_classes
        if task.class_names is not None and len(task.class_names) != num_classes:
            task.class_names = None

    # ------------------------------------------------------------------ fingerprint
    def backbone_fingerprint(self) -> str:
        """SHA-256 over the frozen backbone tensors (conv weights and biases, BN gamma/beta), in a fixed order.

        Two models have the same fingerprint exactly when task adapters trained on one apply unchanged to the other.
        """
        h = hashlib.sha256()
        for name, t in self._frozen_tensors().items():
            t = t.detach().to('cpu', torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _frozen_tensors(self) -> 'OrderedDict[str, torch.Tensor]':
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        for layer, conv in self._conv_layers.items():
            out[f'{layer}.weight'] = conv.weight
            if conv.bias is not None:
                out[f'{layer}.bias'] = conv.bias
        for layer, bn in self._bn_layers.items():
            for k in ('weight', 'bias'):
                if getattr(bn, k, None) is not None:
                    out[f'{layer}.{k}'] = getattr(bn, k)
        return out

    # ------------------------------------------------------------------ building tasks from tensors
    def _task_from_tensors(
            self,
            meta: Mapping[str, Any],
            tensors: Mapping[str, torch.Tensor],
            error=StateDictError,
    ) -> TaskState:
        """Build (but do not insert) a task from its metadata and flat tensors, validating everything.

        The tensors are copied; nothing of the model changes. Raises ``error`` naming the problem.
        """
        name = meta.get('name')
        try:
            validate_task_name(name)
        except InvalidTaskNameError as e:
            raise error(str(e)) from None
        num_classes = meta.get('num_classes')
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise error(f'task {name!r}: num_classes must be a non-negative integer, got {num_classes!r}')
        variant = meta.get('variant')
        if variant is not None and variant not in MODULATION_VARIANTS:
            raise error(f'task {name!r}: unknown modulation variant {variant!r}')
        resolution = meta.get('resolution')
        if resolution is not None:
            try:
                resolution = validate_resolution(tuple(resolution))
            except (TypeError, TaskError) as e:
                raise error(f'task {name!r}: {e}') from None
        class_names = meta.get('class_names')
        if class_names is not None:
            if not isinstance(class_names, (list, tuple)) or len(class_names) != num_classes or not all(
                    isinstance(c, str) for c in class_names):
                raise error(f'task {name!r}: class_names must be {num_classes} strings')
        metadata = meta.get('metadata') or {}
        if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise error(f'task {name!r}: metadata must map strings to strings')

        ref = next(iter(self._conv_layers.values())).weight
        remaining = dict(tensors)

        def take(key: str, shape: Tuple[int, ...], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
            if key not in remaining:
                raise error(f'task {name!r}: missing tensor {key!r}')
            t = remaining.pop(key)
            if not isinstance(t, torch.Tensor):
                raise error(f'task {name!r}: {key!r} is not a tensor')
            if tuple(t.shape) != tuple(shape):
                raise error(f'task {name!r}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}')
            if dtype is None:
                if not t.is_floating_point():
                    raise error(f'task {name!r}: {key!r} must be floating point, got {t.dtype}')
                if not torch.isfinite(t).all():
                    raise error(f'task {name!r}: {key!r} contains NaN or Inf values')
                return t.detach().to(device=ref.device, dtype=ref.dtype).clone()
            if t.is_floating_point() or t.is_complex():
                raise error(f'task {name!r}: {key!r} must be an integer tensor, got {t.dtype}')
            return t.detach().to(device=ref.device, dtype=dtype).clone()

        modulators: Dict[str, nn.Parameter] = OrderedDict()
        for layer, conv in self._conv_layers.items():
            key = f'modulator.{layer}'
            if key not in remaining:
                continue
            t = remaining[key]
            out_ch, in_ch = conv.weight.shape[:2]
            if (not isinstance(t, torch.Tensor) or t.ndim != 4 or tuple(t.shape[2:]) != tuple(conv.weight.shape[2:])
                    or not (1 <= t.shape[0] <= out_ch) or not (1 <= t.shape[1] <= in_ch)):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise error(f'task {name!r}: {key!r} has shape {shape}, which does not fit the layer weight '
                            f'{tuple(conv.weight.shape)}')
            modulators[layer] = nn.Parameter(take(key, tuple(t.shape)))
        if modulators and variant is None:
            raise error(f'task {name!r} has modulators but no modulation variant')
        bn_stats: Dict[str, Dict[str, torch.Tensor]] = OrderedDict()
        for layer, bn in self._bn_layers.items():
            stats = {}
            for k in _BN_STATS:
                ref_t = getattr(bn, k)
                stats[k] = take(f'bn.{layer}.{k}', tuple(ref_t.shape), None if ref_t.is_floating_point() else ref_t.dtype)
            if (stats['running_var'] < 0).any():
                raise error(f'task {name!r}: bn.{layer}.running_var has negative values')
            bn_stats[layer] = stats
        head = self._new_head(num_classes) if self._has_head else nn.Identity()
        if isinstance(head, nn.Linear):
            with torch.no_grad():
                head.weight.copy_(take('head.weight', tuple(head.weight.shape)))
                head.bias.copy_(take('head.bias', tuple(head.bias.shape)))
        if remaining:
            raise error(f'task {name!r}: unexpected tensors {sorted(remaining)[:5]}')
        return TaskState(
            name, num_classes, head, modulators, bn_stats, variant=variant, resolution=resolution,
            class_names=class_names, metadata=metadata,
        )

    # ------------------------------------------------------------------ state dict
    def state_dict(self, *args, destination=None, prefix: str = '', keep_vars: bool = False):
        """timm's state dict (backbone + active task under the usual keys) plus every task under ``tasks.<name>.``
        and a ``modcl_meta`` entry describing the tasks. ``load_state_dict`` recreates the tasks from it."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for tname, task in self._tasks.items():
            for k, v in task.tensors().items():
                sd[f'{prefix}{_TASKS_PREFIX}{tname}.{k}'] = v if keep_vars else v.detach()
        sd[prefix + _META_KEY] = {
            'format': STATE_DICT_FORMAT,
            'active': self._active,
            'tasks': [t.meta() for t in self._tasks.values()],
        }
        return sd

    def _plan_load(self, state_dict: Mapping[str, Any], prefix: str = '') -> Optional['OrderedDict[str, TaskState]']:
        """Validate a state dict and build the tasks it describes, changing nothing.

        Returns ``None`` for a plain timm state dict (no task section), else the new tasks in order.
        """
        meta = state_dict.get(prefix + _META_KEY)
        if meta is None:
            if any(k.startswith(prefix + _TASKS_PREFIX) for k in state_dict):
                raise StateDictError(f'state dict has task tensors but no {_META_KEY!r} entry')
            return None
        if not isinstance(meta, Mapping) or meta.get('format') != STATE_DICT_FORMAT:
            raise StateDictError(f'unsupported {_META_KEY!r} entry (expected format {STATE_DICT_FORMAT})')
        metas = meta.get('tasks')
        if not isinstance(metas, (list, tuple)) or not metas:
            raise StateDictError(f'{_META_KEY!r} lists no tasks')
        names = [m.get('name') if isinstance(m, Mapping) else None for m in metas]
        if names[0] != BASE_TASK or len(set(names)) != len(names):
            raise StateDictError(f'state dict tasks {names!r} must start with {BASE_TASK!r} and be unique')
        if meta.get('active') not in names:
            raise StateDictError(f'active task {meta.get("active")!r} is not among the state dict tasks')
        grouped: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in names}
        head = prefix + _TASKS_PREFIX
        for k, v in state_dict.items():
            if k.startswith(head):
                tname, _, rest = k[len(head):].partition('.')
                if tname not in grouped:
                    raise StateDictError(f'state dict has tensors of task {tname!r}, which {_META_KEY!r} does not list')
                grouped[tname][rest] = v
        plan: 'OrderedDict[str, TaskState]' = OrderedDict()
        for m in metas:
            plan[m['name']] = self._task_from_tensors(m, grouped[m['name']])
        return plan

    def _natural_task_keys(self, task: TaskState) -> set:
        """Keys under which a task's modulators and head appear in the module tree's own state dict when active."""
        keys = {f'{layer}.modulator' for layer in task.modulators}
        if self._has_head:
            keys |= {f'classifier.{k}' for k in task.head.state_dict()}
        return keys

    def _check_shapes(self, state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor], skip=frozenset()) -> None:
        mismatched = [
            f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state_dict.items()
            if k in own and k not in skip and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
        ]
        if mismatched:
            raise StateDictError(
                f'state dict does not fit this model ({len(mismatched)} shape mismatches, e.g. a different width): '
                + '; '.join(mismatched[:3]))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state dict written by ``state_dict()`` (replacing all tasks by the saved ones and activating the
        saved active task), or a plain timm MobileNetV2 state dict (loaded into the backbone and the active task).

        Everything is validated first: on error nothing changes.

        Raises:
            StateDictError: if the state dict does not fit (other width or architecture, bad task section, missing
                or unexpected keys when ``strict``).
        """
        if assign:
            raise StateDictError('load_state_dict(assign=True) is not supported by modcl models')
        if not isinstance(state_dict, Mapping):
            raise StateDictError(f'expected a mapping of names to tensors, got {type(state_dict).__name__}')
        own = super().state_dict(keep_vars=True)
        # backbone first: the clearest message for another width (a saved task's head may differ from ours)
        skip = self._natural_task_keys(self._tasks[self._active]) if _META_KEY in state_dict else set()
        self._check_shapes(state_dict, own, skip)
        plan = self._plan_load(state_dict)
        if plan is not None:  # the saved active task's modulators and head replace ours
            saved_active = plan[state_dict[_META_KEY]['active']]
            for k in self._natural_task_keys(self._tasks[self._active]):
                del own[k]
            own.update({f'{layer}.modulator': p for layer, p in saved_active.modulators.items()})
            if self._has_head:
                own.update({f'classifier.{k}': v for k, v in saved_active.head.state_dict().items()})
            self._check_shapes(state_dict, own)
        expected = set(own)
        if strict:
            given = {k for k in state_dict if k != _META_KEY and not k.startswith(_TASKS_PREFIX)}
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            if missing or unexpected:
                raise StateDictError(
                    f'state dict keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}')
        self._validated_plan = plan  # used by _load_from_state_dict instead of building the tasks again
        try:
            return super().load_state_dict(state_dict, strict=strict)
        finally:
            self._validated_plan = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        plan = self.__dict__.get('_validated_plan') if not prefix else None
        if plan is None:  # loaded as part of a parent module: validate here
            plan = self._plan_load(state_dict, prefix)
        meta = state_dict.get(prefix + _META_KEY)
        for k in [k for k in state_dict if k == prefix + _META_KEY or k.startswith(prefix + _TASKS_PREFIX)]:
            del state_dict[k]
        if plan is not None:
            self._tasks = plan
            self._bind(meta['active'])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if not recurse:
            return self
        active = self._tasks[self._active]
        # pull back the active task's tensors, which the module tree may have replaced by converted copies
        for layer, conv in self._conv_layers.items():
            if layer in active.modulators:
                active.modulators[layer] = conv.modulator
            conv.invalidate()
        for layer, bn in self._bn_layers.items():
            for k in _BN_STATS:
                active.bn_stats[layer][k] = getattr(bn, k)
        if self._has_head:
            active.head = self.classifier
        for task in self._tasks.values():
            if task is not active:
                task.apply_(fn)
        return self


def _layer_resolution(
        layer: str,
        weight_shape: Tuple[int, ...],
        resolution: Tuple[int, int],
        layer_resolution: Optional[LayerResolution],
) -> Optional[Tuple[int, int]]:
    """Resolution of one layer: the per-layer override if it names the layer, else the task's resolution."""
    if layer_resolution is None:
        return resolution
    if callable(layer_resolution):
        res = layer_resolution(layer, weight_shape)
    elif layer in layer_resolution:  # an exact name wins over patterns
        res = layer_resolution[layer]
    else:
        matches = [p for p in layer_resolution if fnmatch.fnmatchcase(layer, p)]
        if not matches:
            return resolution
        res = layer_resolution[matches[-1]]  # the last matching pattern wins
    return None if res is None else validate_resolution(res, f'resolution of layer {layer!r}')
