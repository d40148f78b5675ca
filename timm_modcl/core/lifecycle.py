"""The task lifecycle (``TaskLifecycleMixin``): queries (tasks, layers, the weight cache), ``add_task`` and its
configuration, fresh norm affine and heads, ``set_task`` / ``task_scope`` / ``use_task``, ``remove_task``,
``rename_task`` and binding a task into the model.
"""
import contextlib
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..config import DEFAULT_CONFIG, LayerResolution, TaskConfig
from ..errors import ResolutionError, TaskError, TaskExistsError, TaskNotFoundError, UnsupportedModelError
from ..layers import WeightCache, task_scope
from ..methods import method_of
from ..payload import MAX_CLASSES, modulator_shapes
from ..task import BASE_TASK, TaskInfo, TaskState, validate_metadata, validate_task_name
from .state import _affine_norm, _check_head, _State


def _like(head: nn.Module, num_classes: int, path: str) -> nn.Module:
    """A new ``num_classes`` Linear / 1x1-conv head shaped like ``head`` (for models without ``reset_classifier``)."""
    w = head._parameters.get('weight') if isinstance(head, (nn.Linear, nn.Conv2d)) else None
    if w is None:
        raise UnsupportedModelError(
            f'cannot make a new head: the model has no reset_classifier() and its classifier {path!r} is a '
            f'{type(head).__name__}, not a Linear or Conv2d layer')
    kw = dict(bias=head.bias is not None, device=w.device, dtype=w.dtype)
    if isinstance(head, nn.Linear):
        return nn.Linear(head.in_features, num_classes, **kw)
    return nn.Conv2d(head.in_channels, num_classes, head.kernel_size, **kw)


class TaskLifecycleMixin:
    """Adding, binding, scoping, renaming and removing tasks, and the queries about them (see the package
    docstring)."""

    _modcl: _State

    # ------------------------------------------------------------------ queries
    @property
    def active_task(self) -> str:
        """Name of the task the model currently computes."""
        return self._modcl.active

    @property
    def tasks(self) -> 'OrderedDict[str, TaskInfo]':
        """All tasks in the order they were added, with their configuration, metadata and sizes."""
        return OrderedDict((n, t.info()) for n, t in self._modcl.tasks.items())

    @property
    def modulated_layers(self) -> List[str]:
        """Names of the weight layers (convs, linears) that tasks can modulate."""
        return list(self._modcl.weight_layers)

    @property
    def head_name(self) -> Optional[str]:
        """Path of the per-task classifier (``'classifier'``, ``'head.fc'``, ...); ``None`` for a model without one."""
        return self._modcl.head

    @property
    def norm_layers(self) -> List[str]:
        """Names of the normalisation layers with per-task state."""
        return list(self._modcl.norm_layers)

    @property
    def weight_cache(self) -> WeightCache:
        """The model's cache of effective weights (``set_weight_cache_limit`` bounds its memory)."""
        return self._modcl.cache

    def set_weight_cache_limit(self, max_bytes: int) -> None:
        """Bound the memory of cached effective weights (least recently used tasks go first; the active task's
        weights are always kept).

        Raises:
            TaskError: for a negative or non-integer limit.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise TaskError(f'the cache limit must be a non-negative number of bytes, got {max_bytes!r}')
        self._modcl.cache.set_limit(max_bytes)

    def _task(self, name: str) -> TaskState:
        try:
            return self._modcl.tasks[name]
        except (KeyError, TypeError):
            raise TaskNotFoundError(
                f'unknown task {name!r}; the model has tasks: {", ".join(map(repr, self._modcl.tasks))}') from None

    def task_parameters(self, name: Optional[str] = None) -> List[nn.Parameter]:
        """Trainable tensors of a task (default: the active one). For the active task, exactly the parameters of
        ``parameters()`` that require grad (the other tasks' do not)."""
        return self._task(self._modcl.active if name is None else name).trainable()

    def _modulator_shapes(self, config: TaskConfig) -> 'OrderedDict[str, Tuple[int, ...]]':
        return modulator_shapes(self._weight_table(), config)

    def _weight_table(self) -> 'OrderedDict[str, Tuple[Tuple[int, ...], int]]':
        return OrderedDict((n, (tuple(m._buffers['weight'].shape), m.modcl_chunks))
                           for n, m in self._modcl.weight_layers.items())

    def modulator_shapes(self, resolution=(4, 4), layer_resolution: Optional[LayerResolution] = None,
                         ) -> 'OrderedDict[str, Tuple[int, ...]]':
        """Modulator shape of each weight layer at a resolution (unmodulated layers left out).

        Raises:
            ResolutionError: if a resolution is not a pair of positive integers.
        """
        config = TaskConfig(resolution=resolution).with_layers(layer_resolution, self._weight_shapes())
        return self._modulator_shapes(config)

    def _weight_shapes(self) -> 'OrderedDict[str, Tuple[int, ...]]':
        return OrderedDict((n, tuple(m._buffers['weight'].shape)) for n, m in self._modcl.weight_layers.items())

    # ------------------------------------------------------------------ lifecycle
    def add_task(
            self,
            name: str,
            num_classes: int,
            resolution: Any = 'default',
            *,
            variant: Optional[str] = None,
            layer_resolution: Optional[LayerResolution] = None,
            bn_affine: Optional[bool] = None,
            method: Optional[str] = None,
            rank: Optional[int] = None,
            config: Optional[TaskConfig] = None,
            class_names: Optional[Sequence[str]] = None,
            metadata: Optional[Mapping[str, Any]] = None,
            activate: bool = True,
            replace: bool = False,
    ) -> TaskInfo:
        """Add a task with fresh modulators, norm statistics copied from the base task, and a new head.

        Args:
            name: Task name (see ``validate_task_name``).
            num_classes: Number of classes of the task's head (1 to ``MAX_CLASSES``).
            resolution: Modulation resolution ``(m1, m2)`` of every weight layer (an int ``m`` means ``(m, m)``;
                ``None``: no modulators, only norm state and head). Default: ``DEFAULT_CONFIG``'s.
            variant: ``"identity"`` (``W * (1 + M)``, ``M = 0``: starts exactly at the pretrained weights) or
                ``"paper"`` (``W * (1 - M)``, kaiming-normal M).
            layer_resolution: Per-layer override, a mapping ``{layer name or fnmatch pattern: (m1, m2) or None}``
                or a callable ``(layer_name, weight_shape) -> (m1, m2) | None``; ``None`` leaves a layer unmodulated.
                A callable is evaluated now and stored as the mapping it produced.
            bn_affine: Give the task its own BatchNorm affine (gamma, beta).
            method: ``"modulation"`` (default) or ``"lora"`` (a per-task low-rank update of the same layers; see
                ``timm_modcl.methods``).
            rank: LoRA rank (``method="lora"``).
            config: A whole ``TaskConfig`` to start from (the arguments above override its fields).
            class_names: Optional class names, one per class.
            metadata: Optional free-form metadata; numbers and booleans are stored as strings.
            activate: Make the new task the active one (default).
            replace: Replace an existing task of that name instead of raising.

        Returns:
            The new task's ``TaskInfo``.

        Raises:
            InvalidTaskNameError, TaskExistsError, ResolutionError, TaskError: on bad arguments; the model is
            unchanged then.
        """
        st = self._modcl
        validate_task_name(name)
        if name == BASE_TASK:
            raise TaskExistsError(f'{BASE_TASK!r} is reserved for the task that comes with the backbone')
        if name in st.tasks and not replace:
            raise TaskExistsError(f'task {name!r} already exists (pass replace=True to replace it)')
        low = 1 if self._has_head else 0
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not low <= num_classes <= MAX_CLASSES:
            raise TaskError(f'num_classes must be an integer from {low} to {MAX_CLASSES:,}, got {num_classes!r}')
        if num_classes and not self._has_head:
            raise TaskError('this model has no classifier head (a feature extractor): add its tasks with '
                            'num_classes=0')
        if class_names is not None:
            if isinstance(class_names, str):
                raise TaskError('class_names must be a sequence of names, not one string')
            class_names = [str(c) for c in class_names]
            if len(class_names) != num_classes:
                raise TaskError(f'got {len(class_names)} class names for {num_classes} classes')
        metadata = validate_metadata(metadata)
        if config is not None and not isinstance(config, TaskConfig):
            raise TaskError(f'config must be a TaskConfig, got {type(config).__name__}')
        config = self._make_config(config, resolution, variant, layer_resolution, bn_affine, method, rank)

        ref = self._ref_tensor()
        shapes = self._modulator_shapes(config)
        modulators: Dict[str, nn.Parameter] = OrderedDict()
        method = method_of(config)
        try:
            for layer, shape in shapes.items():
                m = torch.empty(shape, device=ref.device, dtype=ref.dtype)
                method.init_(m, tuple(st.weight_layers[layer]._buffers['weight'].shape))
                modulators[layer] = nn.Parameter(m)
            head = self._new_head(num_classes)
        except RuntimeError as e:  # allocation failure: say what was asked
            raise TaskError(f'could not allocate task {name!r} ({num_classes:,} classes): {e}') from None
        norm_stats = OrderedDict(
            (n, {k: v.detach().clone() for k, v in s.items()}) for n, s in st.tasks[BASE_TASK].norm_stats.items())
        for s in norm_stats.values():
            s['num_batches_tracked'].zero_()
        task = TaskState(name, num_classes, head, config, modulators=modulators, norm_stats=norm_stats,
                         norm_affine=self._fresh_affine(config), class_names=class_names, metadata=metadata)
        self._insert_task(task, activate=activate)
        return task.info()

    def _make_config(self, config, resolution, variant, layer_resolution, bn_affine, method=None, rank=None
                     ) -> TaskConfig:
        from dataclasses import replace as dc_replace
        config = config or DEFAULT_CONFIG
        changes: Dict[str, Any] = {}
        if not (isinstance(resolution, str) and resolution == 'default'):
            changes['resolution'] = resolution
        if variant is not None:
            changes['variant'] = variant
        if bn_affine is not None:
            changes['bn_affine'] = bn_affine
        if method is not None:
            changes['method'] = method
        if rank is not None:
            changes['rank'] = rank
        if changes:
            if 'resolution' in changes and 'layer_resolution' not in changes and config is DEFAULT_CONFIG:
                changes['layer_resolution'] = ()  # an explicit resolution replaces the default per-layer profile
            config = dc_replace(config, **changes)
        config = config.with_layers(layer_resolution, self._weight_shapes())
        if isinstance(layer_resolution, Mapping):
            names = list(self._modcl.weight_layers)
            import fnmatch
            unused = [p for p in layer_resolution if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unused:
                raise ResolutionError(f'layer_resolution names no layer of this model: {unused[:5]} (see '
                                      f'model.modulated_layers)')
        if config.resolution is not None and not self._modulator_shapes(config) and self._modcl.weight_layers:
            raise ResolutionError(
                f'resolution {config.resolution} leaves every layer unmodulated (each modulator dimension would be 0); '
                f'use a smaller resolution, or resolution=None for a task without modulators')
        return config

    def _fresh_affine(self, config: TaskConfig) -> 'OrderedDict[str, Dict[str, nn.Parameter]]':
        """Per-task affine copied from the frozen pretrained one, for the norm layers that have one per task."""
        out: 'OrderedDict[str, Dict[str, nn.Parameter]]' = OrderedDict()
        for n, m in self._modcl.norm_layers.items():
            if not (_affine_norm(m) or config.bn_affine):
                continue
            affine = {k: nn.Parameter(m._buffers[k].detach().clone()) for k in ('weight', 'bias')
                      if m._buffers.get(k) is not None}
            if affine:
                out[n] = affine
        return out

    def _new_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised head for ``num_classes`` made by the timm model's own ``reset_classifier``."""
        st = self._modcl
        if st.head is None or num_classes == 0:
            return nn.Identity()
        old, old_num = self._get_head(), getattr(self, 'num_classes', None)
        if not callable(getattr(st.plain_class, 'reset_classifier', None)):  # not a timm model: a head like the base task's
            return _like(st.tasks[BASE_TASK].head if st.tasks else old, num_classes, st.head)
        # timm's reset_classifier may also replace modules beside the head (a new global_pool): put them back, so
        # making a head changes nothing of the live model (hooks on the pooling stay)
        parent = st.head.rpartition('.')[0]
        saved = [(m, OrderedDict(m._modules)) for m in {id(m): m for m in (
            self, self.get_submodule(parent) if parent else self)}.values()]
        try:
            st.plain_class.reset_classifier(self, num_classes)
            head = self._get_head()
        finally:
            for m, modules in saved:
                m._modules.clear()
                m._modules.update(modules)
            self._set_head(old)
            if old_num is not None:
                self.num_classes = old_num
        _check_head(head, st.head)
        return head

    def _head_shapes(self, num_classes: int) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the tensors of a ``num_classes`` head (as the model's own ``reset_classifier`` makes it)."""
        st = self._modcl
        if st.head_template is None:
            with torch.random.fork_rng(devices=[]):  # no side effect on the global random state
                template = self._new_head(1)
            st.head_template = {k: tuple(v.shape[1:]) for k, v in template.state_dict().items()}
        return {k: (num_classes,) + s for k, s in st.head_template.items()}

    def _insert_task(self, task: TaskState, activate: bool) -> None:
        """Add (or replace) a fully built task; the only place tasks enter the model."""
        st = self._modcl
        replacing_active = task.name == st.active
        st.cache.drop(task.name)
        task.set_trainable(False)
        task.train(self.training)   # its head follows the model's mode (serving checks every module's flag)
        st.task_dict[task.name] = task
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
    def task_scope(self, name: str) -> Iterator[None]:
        """Run this model on task ``name`` in the current thread (or asyncio task) only; thread-safe.

        ``set_task`` / ``use_task`` bind a task into the model for every caller (global state: two threads using them
        at once get each other's task). Inside a task scope, every layer reads the task's modulators, norm affine,
        BatchNorm statistics and head from a context variable instead, so any number of threads (or asyncio tasks)
        can run different tasks on one model at the same time, and nothing shared changes. ``model(x)``,
        ``forward_features`` and every other forward compute ``name`` inside the scope (the head too, through timm's
        ``forward_head``; a model without ``forward_head`` keeps its bound head in ``model(x)``); ``active_task`` and
        which tensors require grad still describe the bound task (so a scope trains nothing). Scopes nest. For serving, keep the model in eval mode (in train
        mode, BatchNorm updates the scoped task's own statistics, and threads must not change modes concurrently);
        ``forward_task`` / ``forward_tasks`` do that for you.

            model.eval()
            with torch.no_grad(), model.task_scope('flowers'):
                logits = model(x)

        Raises:
            TaskNotFoundError: if there is no such task.
        """
        task = self._task(name)
        with task_scope(self._modcl.cache, task):
            yield

    @contextlib.contextmanager
    def use_task(self, name: str) -> Iterator[None]:
        """Context manager that binds ``name`` and restores the previously active task afterwards.

        Like ``set_task``, this changes the model for every caller and is not thread-safe: use ``task_scope`` (or
        ``forward_task`` / ``forward_tasks``) to run tasks from several threads."""
        previous = self._modcl.active
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
        if name == self._modcl.active:
            raise TaskError(f'task {name!r} is active; set another task before removing it')
        del self._modcl.task_dict[name]
        self._modcl.cache.drop(name)

    def rename_task(self, name: str, new_name: str) -> None:
        """Rename a task.

        Raises:
            TaskNotFoundError, InvalidTaskNameError, TaskExistsError, TaskError: on bad names.
        """
        st = self._modcl
        task = self._task(name)
        validate_task_name(new_name)
        if BASE_TASK in (name, new_name):
            raise TaskError(f'the {BASE_TASK!r} task cannot be renamed')
        if new_name in st.tasks:
            raise TaskExistsError(f'task {new_name!r} already exists')
        renamed = [(new_name if n == name else n, t) for n, t in st.tasks.items()]
        st.tasks.clear()
        st.tasks.update(renamed)
        task.name = new_name
        st.cache.rename(name, new_name)
        if st.active == name:
            st.active = new_name

    def _bind(self, name: str) -> None:
        """Make ``name`` the task unscoped calls compute: the layers read it through the weight cache, its tensors
        (and only its) require grad, and its head moves to the model's head path."""
        st = self._modcl
        task = st.tasks[name]
        previous = st.cache.bound
        if previous is not task:   # (re-binding the bound task after a rescan keeps the user's requires_grad flags)
            if previous is not None:
                previous.set_trainable(False)
                previous.bind_head(False)
            task.set_trainable(True)
        task.bind_head(True)
        st.cache.bind(task)
        if st.head is not None:
            self._set_head(task.head)
            self.num_classes = task.num_classes
        st.active = name
        st.module_list = None
