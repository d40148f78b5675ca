"""The task lifecycle of a modulated timm model (``ModCLMixin``), for any backbone.

``timm_modcl.modulate(model)`` mixes ``ModCLMixin`` into a timm model's class. The mixin finds the layers once
(``layers.modulate_layer`` on every conv/linear and norm layer, the head from timm's ``pretrained_cfg['classifier']``),
freezes everything else that holds a parameter (a module type it does not know raises ``UnsupportedModelError``
instead of staying shared and trainable), and keeps the tasks.

Tasks live in the module tree: ``model.modcl_tasks`` is an ``nn.ModuleDict`` of ``TaskState`` modules (modulators,
norm affine, BatchNorm statistics, prototype statistics, head), so ``.to()``, ``state_dict``, ``deepcopy``, pickling
and any wrapper that captures ``parameters()`` (DDP, an optimizer) see every task through PyTorch's own machinery.
The layers read the tensors of the task of the call (a ``task_scope``'s, else the bound task's) on every forward;
binding a task (``set_task``) only moves its head to the model's head path and makes its tensors, and only its,
require grad, so an optimizer step can never change another task.

A fresh model's ``base`` task is the checkpoint as a task: its head, its norm statistics (the layers' own buffers),
zero ``identity`` modulators and its own copy of the LayerNorm/GroupNorm affine, so it computes exactly the pretrained
model, and is trainable like any task (as timm's model tests expect). New tasks start from the base task's norm
statistics and the pretrained affine.
"""
import contextlib
import copy
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._io import load_json
from ._settings import weight_cache_bytes
from .config import DEFAULT_CONFIG, LayerResolution, TaskConfig
from .methods import method_of
from .errors import (
    FrozenBackboneError, PayloadError, ResolutionError, StateDictError, TaskError, TaskExistsError, TaskNotFoundError,
    UnsupportedModelError,
)
from .layers import (
    WeightCache, check_input, frozen_names, is_norm_layer, is_weight_layer, modulate_layer,
    scoped_task, task_scope, unmodulate_layer,
)
from .payload import MAX_CLASSES, MAX_MODULATOR, LayerTable, TaskPayload, modulator_shapes
from .task import BASE_TASK, BN_STATS, TaskDict, TaskInfo, TaskState, table_key, table_name, validate_metadata, validate_task_name

__all__ = [
    'ModCLMixin', 'MAX_CLASSES', 'MAX_MODULATOR', 'STATE_DICT_FORMAT', 'register_frozen_parameters', 'frozen_parameter_names',
]

#: Version of the ``state_dict`` layout: PyTorch's own over the module tree (timm's keys for the backbone, the base
#: task's BatchNorm statistics and the bound task's head; ``modcl_tasks.<name>.<table>.<key>`` for every task's tensors)
#: plus ``modcl.meta``, a uint8 tensor holding the JSON task list. Format 2 (0.2: the active task under timm's keys,
#: the others under ``modcl.tasks.<name>.<flat name>``) still loads.
STATE_DICT_FORMAT = 3
_META_KEY = 'modcl.meta'
_TASKS_PREFIX = 'modcl.tasks.'   # format 2's task section
#: The model's child module holding the tasks (an ``nn.ModuleDict`` of ``TaskState``).
TASKS_MODULE = 'modcl_tasks'
_MAX_META_BYTES = 64 * 1024 * 1024

#: Fused projections modulated per chunk (leaf name -> number of chunks): q, k and v are never blended.
CHUNKED_LAYERS: Dict[str, int] = {'qkv': 3, 'kv': 2}

# Parameters that stay frozen and shared, by the (qualified) class owning them directly.
_FROZEN_PARAMETERS: Dict[str, Tuple[str, ...]] = {
    'timm.models.vision_transformer.VisionTransformer': ('cls_token', 'reg_token', 'pos_embed', 'dist_token'),
    'timm.layers.layer_scale.LayerScale': ('gamma',),
    'timm.layers.layer_scale.LayerScale2d': ('gamma',),
    'timm.models.convnext.ConvNeXtBlock': ('gamma',),
}


def register_frozen_parameters(cls, names: Sequence[str]) -> None:
    """Declare that parameters ``names`` owned directly by modules of class ``cls`` (a class or its qualified name)
    stay frozen and shared by all tasks (like ViT's position embedding), so ``modulate`` accepts such modules."""
    key = cls if isinstance(cls, str) else f'{cls.__module__}.{cls.__qualname__}'
    _FROZEN_PARAMETERS[key] = tuple(_FROZEN_PARAMETERS.get(key, ())) + tuple(names)


def frozen_parameter_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of the parameters of ``module`` known to stay frozen and shared (see ``register_frozen_parameters``)."""
    out: Tuple[str, ...] = ()
    for c in type(module).__mro__:
        out += _FROZEN_PARAMETERS.get(f'{c.__module__}.{c.__qualname__}', ())
    return out


def _fx_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class _FrozenTensor(nn.Module):
    """Serves one of the model's root-level frozen tensors (a non-persistent reference) as a torch.fx leaf call."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('tensor', tensor, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.tensor


def _register_fx_leaf() -> None:
    from timm.models._features_fx import register_notrace_module
    register_notrace_module(_FrozenTensor)
    register_notrace_module(TaskDict)   # traced as one call, so a traced model (GraphModule) holds the tasks


_register_fx_leaf()


def _check_head(head: nn.Module, path: str) -> None:
    """A task head is a single layer with a ``weight`` (and ``bias``) whose first dimension is the class count."""
    if isinstance(head, nn.Identity):
        return
    names = set(head._parameters)
    if list(head.children()) or not names or not names <= {'weight', 'bias'} or head._parameters.get('weight') is None:
        raise UnsupportedModelError(
            f'the classifier {path!r} is a {type(head).__name__}; timm_modcl gives each task its own head and supports '
            f'single-layer classifiers (Linear, 1x1 conv) or Identity: pass head= to modulate() to pick another')


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


class _State:
    """Everything the mixin keeps about a model, in one attribute (``model._modcl``)."""

    def __init__(self, base: type, head: Optional[str], freeze: Tuple[str, ...], cache: WeightCache,
                 task_dict: nn.ModuleDict) -> None:
        self.base = base
        self.head = head
        self.freeze = freeze
        self.cache = cache
        self.task_dict = task_dict   # the model's ``modcl_tasks``: the tasks, in the module tree
        self.active = BASE_TASK
        self.weight_layers: 'OrderedDict[str, nn.Module]' = OrderedDict()
        self.norm_layers: 'OrderedDict[str, nn.Module]' = OrderedDict()
        self.extra_frozen: List[Tuple[str, str]] = []
        self.head_template: Optional[Dict[str, Tuple[int, ...]]] = None
        self.fingerprint: Optional[Tuple[tuple, str]] = None
        # held by calls that must change shared state to run (a task_scope on a model in train mode flips it to eval)
        self.lock = threading.RLock()
        self.module_list: Optional[List[nn.Module]] = None   # the module tree, flat (see ModCLMixin._all_modules)
        self.prototype_cache: Dict[str, tuple] = {}          # prepared prototype Gaussians (ServingMixin._gaussian)

    @property
    def tasks(self) -> 'OrderedDict[str, TaskState]':
        """The tasks by name, in the order they were added (the ``modcl_tasks`` ModuleDict's own dict)."""
        return self.task_dict._modules

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state['lock']
        state['module_list'] = None
        state['prototype_cache'] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()
        self.__dict__.setdefault('prototype_cache', {})


def _json_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8).clone()


def _read_json_tensor(t: Any) -> Any:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 1 or t.numel() > _MAX_META_BYTES:
        raise StateDictError(f'{_META_KEY!r} must be a 1-D uint8 tensor of JSON text')
    return load_json(bytes(t.cpu().numpy().tobytes()), StateDictError, f'{_META_KEY!r}')


def attach(model: nn.Module, *, head: Optional[str], base: type, freeze: Sequence[str] = (),
           cache_bytes: Optional[int] = None) -> None:
    """Set up a model whose class already mixes in ``ModCLMixin`` (what ``timm_modcl.modulate`` does after changing
    its class): find and freeze the layers, then create the ``base`` task.

    Raises:
        UnsupportedModelError: a classifier or parameter the mixin cannot handle (nothing of the model changed).
    """
    model._modcl_setup(head, base, freeze, cache_bytes)


def _prepare_compiled_call(model: nn.Module, args) -> None:
    """Forward pre-hook of every modcl model: nothing in eager mode; under torch.compile, ``_modcl_prepare``."""
    if torch.compiler.is_compiling():
        model._modcl_prepare()


def _affine_norm(module: nn.Module) -> bool:
    """Norm layers whose affine is always per task: those without running statistics (LayerNorm, GroupNorm, ...)."""
    return not isinstance(module, nn.modules.batchnorm._BatchNorm)


def _tracks_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


class ModCLMixin:
    """Task lifecycle of a timm model made task-aware by ``timm_modcl.modulate`` (see the module docstring)."""

    _modcl: _State

    # ------------------------------------------------------------------ setup
    def _modcl_setup(self, head: Optional[str], base: type, freeze: Sequence[str] = (),
                     cache_bytes: Optional[int] = None) -> None:
        """Find and freeze the layers, then create the ``base`` task. Raises before changing anything."""
        cache = WeightCache(weight_cache_bytes() if cache_bytes is None else cache_bytes)
        self._modcl = _State(base, head, tuple(freeze), cache, TaskDict())
        if head is not None:
            _check_head(self.get_submodule(head), head)
        self._modcl_scan()
        base_task = self._modcl_base_task()
        self._modules[TASKS_MODULE] = self._modcl.task_dict
        self._modcl.task_dict[BASE_TASK] = base_task
        self._bind(BASE_TASK)
        self.register_forward_pre_hook(_prepare_compiled_call)  # last: nothing above may fail after it

    def _modcl_plan_scan(self) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module, str]]]:
        """Classify every module (nothing changes): layers to modulate, and parameters to freeze. Raises
        ``UnsupportedModelError`` naming every parameter that would otherwise stay shared and trainable."""
        import fnmatch
        st = self._modcl
        head = st.head
        layers, freeze, problems = [], [], []
        for name, module in self.named_modules():
            if head is not None and (name == head or name.startswith(head + '.')):
                continue
            if name == TASKS_MODULE or name.startswith(TASKS_MODULE + '.'):
                continue
            if is_weight_layer(module) or is_norm_layer(module):
                layers.append((name, module))
                continue
            known = frozen_parameter_names(module)
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                full = f'{name}.{pname}' if name else pname
                if pname in known or any(fnmatch.fnmatchcase(full, pat) for pat in st.freeze):
                    freeze.append((name, module, pname))
                else:
                    owner = st.base if module is self else type(module)
                    problems.append((full, owner.__name__))
        if problems:
            listed = ', '.join(f'{full} ({owner})' for full, owner in problems[:8])
            raise UnsupportedModelError(
                f'{len(problems)} parameter(s) belong to module types timm_modcl does not know, so they would stay '
                f'shared and trainable across tasks: {listed}{" ..." if len(problems) > 8 else ""}. To keep them '
                f'frozen and shared, pass their names or fnmatch patterns to modulate(), e.g. '
                f'freeze={[full for full, _ in problems[:3]]!r}, or declare the module type once with '
                f'timm_modcl.register_frozen_parameters(cls, names)')
        return layers, freeze

    def _modcl_scan(self) -> None:
        """(Re)discover the layers after construction or a structural change (reset_classifier, pruning, resizing)."""
        st = self._modcl
        layers, freeze = self._modcl_plan_scan()
        for name, module, pname in freeze:
            p = module._parameters.pop(pname)
            module._buffers[pname] = p.detach().requires_grad_(False)
            if (name, pname) not in st.extra_frozen:
                st.extra_frozen.append((name, pname))
        weight_layers, norm_layers = OrderedDict(), OrderedDict()
        keys = {}
        for name, module in layers:
            if keys.setdefault(table_key(name), name) != name:
                raise UnsupportedModelError(f'layers {keys[table_key(name)]!r} and {name!r} would share a key in the '
                                            f'tasks\' tables; rename one of them')
        for name, module in layers:
            kind = modulate_layer(module)
            module.modcl_name = name
            module.modcl_key = table_key(name)
            module.modcl_cache = st.cache
            if kind == 'weight':
                chunks = CHUNKED_LAYERS.get(name.rsplit('.', 1)[-1], 1)
                module.modcl_chunks = chunks if module._buffers['weight'].shape[0] % chunks == 0 else 1
                weight_layers[name] = module
            else:
                norm_layers[name] = module
        st.weight_layers, st.norm_layers = weight_layers, norm_layers
        for task in st.tasks.values():  # layers removed by a structural change: the (base) task forgets them
            task.forget_layers(list(weight_layers), list(norm_layers))
        st.extra_frozen = [(n, p) for n, p in st.extra_frozen if self._has_buffer(n, p)]
        if weight_layers:
            first = next(iter(weight_layers.values()))
            if check_input not in first._forward_pre_hooks.values():
                first.register_forward_pre_hook(check_input)
            first.modcl_bn_guard = any(_tracks_stats(m) for m in norm_layers.values())
        st.fingerprint = None
        st.head_template = None
        st.module_list = None
        root_frozen = [k for n, k in st.extra_frozen if not n]
        if root_frozen:
            holders = nn.ModuleDict({k: _FrozenTensor(self._buffers[k]) for k in root_frozen})
            self._modules['_modcl_frozen'] = holders.train(self.training)
        if st.tasks:
            self._bind(st.active)

    def _modcl_forward_head(self, x, *args, **kwargs):
        """timm's ``forward_head``; inside a ``task_scope`` of another task than the bound one, its head classifies
        the pre-logits features (every timm head computes ``classifier(forward_head(x, pre_logits=True))``)."""
        if not torch.compiler.is_compiling() and not torch.jit.is_scripting():
            task = scoped_task(self._modcl.cache)
            if (task is not None and self._modcl.head is not None and task.head is not self._get_head()
                    and not (args and args[0]) and not kwargs.get('pre_logits', False)):
                return task.head(self._modcl.base.forward_head(self, x, *args, **dict(kwargs, pre_logits=True)))
        if _fx_tracing():  # an identity call: the traced graph module then holds the tasks its layers read
            x = self._modules[TASKS_MODULE](x)
        return self._modcl.base.forward_head(self, x, *args, **kwargs)

    def _modcl_group_matcher(self, coarse: bool = False):
        """timm's ``group_matcher`` (layer-wise learning-rate decay, ``group_parameters``) for task tensors: each
        is grouped with the layer it belongs to (``modcl_tasks.<task>.modulator.blocks/0/0/conv`` with
        ``blocks.0.0.conv.weight``), by a matcher callable."""
        from timm.models._manipulate import group_with_matcher
        st = self._modcl
        matcher = st.base.group_matcher(self, coarse=coarse)
        natural = {n: self._natural_param_name(n) for n, _ in self.named_parameters(remove_duplicate=False)}
        natural.update((n, n) for n, _ in self.named_buffers(remove_duplicate=False))
        ids = group_with_matcher(((n, None) for n in dict.fromkeys(natural.values())), matcher, reverse=True)
        last = max(ids.values(), default=0) + 1
        return lambda name: ids.get(natural.get(name, name), last)

    def _natural_param_name(self, name: str) -> str:
        """The timm name of the layer tensor a task tensor belongs to (other names unchanged)."""
        if not name.startswith(TASKS_MODULE + '.'):
            return name
        _, _, rest = name.partition('.')
        _, _, rest = rest.partition('.')           # the task name
        table, _, key = rest.partition('.')
        if table == 'modulator':
            return table_name(key) + '.weight'
        if table in ('norm', 'bn'):
            return table_name(key)
        if table == 'head' and self._modcl.head is not None:
            return f'{self._modcl.head}.{key}'
        return name

    @torch.compiler.disable
    def _modcl_prepare(self) -> None:
        """Under ``torch.compile`` (a forward pre-hook, ``_prepare_compiled_call``): take the bound task's effective
        weights from the weight cache, eagerly, so the compiled graph uses them as inputs instead of recomputing
        them per call."""
        st = self._modcl
        if scoped_task(st.cache) is not None:
            raise UnsupportedModelError(
                'a compiled modcl model computes its bound task only: use set_task() before calling it, or run '
                'task_scope / forward_task / forward_tasks on the model itself (eagerly)')
        cached = not torch.is_grad_enabled()
        for layer in st.weight_layers.values():
            eff = None
            if cached and not layer.training and layer.modulator is not None:
                eff = layer.weight  # eager: the weight cache's entry, refreshed if the task's tensors changed
            layer.__dict__['_modcl_eff'] = eff

    def __getattr__(self, name: str):
        # torch.fx does not proxy buffers, so a frozen tensor the model's own code reads (ViT's cls token) would be
        # traced as a constant, which fails for e.g. `cls_token.expand(x.shape[0], -1, -1)`: serve it through a
        # leaf module call while tracing
        if _fx_tracing():
            holders = self.__dict__['_modules'].get('_modcl_frozen')
            if holders is not None and name in holders:
                return holders[name]()
        return super().__getattr__(name)

    def _all_modules(self) -> List[nn.Module]:
        """``list(self.modules())``, kept between calls (per-call serving reads every module's train flag; walking
        the tree each time cost 2-3 % of a batch-1 forward). Refreshed when a task is bound (its head) or the layers
        are rescanned."""
        st = self._modcl
        if st.module_list is None:
            st.module_list = list(self.modules())
        return st.module_list

    def _has_buffer(self, module_name: str, name: str) -> bool:
        try:
            return name in self.get_submodule(module_name)._buffers
        except AttributeError:
            return False

    def _modcl_base_task(self) -> TaskState:
        st = self._modcl
        config = TaskConfig(resolution=DEFAULT_CONFIG.resolution, variant='identity',
                            layer_resolution=DEFAULT_CONFIG.layer_resolution)
        ref = self._ref_tensor()
        modulators = OrderedDict(
            (layer, nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype)))
            for layer, shape in self._modulator_shapes(config).items())
        layer_stats = OrderedDict((n, m) for n, m in st.norm_layers.items() if _tracks_stats(m))
        head = self._get_head() if st.head is not None else nn.Identity()
        return TaskState(BASE_TASK, int(getattr(self, 'num_classes', 0) or 0) if st.head else 0, head, config,
                         modulators=modulators, norm_affine=self._fresh_affine(config), layer_stats=layer_stats)

    def _ref_tensor(self) -> torch.Tensor:
        st = self._modcl
        for m in st.weight_layers.values():
            return m._buffers['weight']
        for t in self.buffers():
            if t.is_floating_point():
                return t
        return torch.empty(0)

    def _get_head(self) -> nn.Module:
        return self.get_submodule(self._modcl.head)

    def _set_head(self, module: nn.Module) -> None:
        parent, _, leaf = self._modcl.head.rpartition('.')
        setattr(self.get_submodule(parent) if parent else self, leaf, module)

    @property
    def _has_head(self) -> bool:
        return self._modcl.head is not None

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
        if not callable(getattr(st.base, 'reset_classifier', None)):  # not a timm model: a head like the base task's
            return _like(st.tasks[BASE_TASK].head if st.tasks else old, num_classes, st.head)
        # timm's reset_classifier may also replace modules beside the head (a new global_pool): put them back, so
        # making a head changes nothing of the live model (hooks on the pooling stay)
        parent = st.head.rpartition('.')[0]
        saved = [(m, OrderedDict(m._modules)) for m in {id(m): m for m in (
            self, self.get_submodule(parent) if parent else self)}.values()]
        try:
            st.base.reset_classifier(self, num_classes)
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

    # ------------------------------------------------------------------ timm methods that change the structure
    def _modcl_reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, *args, **kwargs) -> None:
        """timm's head reset, applied to the active task's head.

        Raises:
            TaskError: for a bad ``num_classes``, or a new ``global_pool`` once the model has tasks beside ``'base'``
                (the pooling is shared by every task: changing it would change their outputs).
        """
        st = self._modcl
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= MAX_CLASSES:
            raise TaskError(f'num_classes must be an integer from 0 to {MAX_CLASSES:,}, got {num_classes!r}')
        if global_pool is not None and len(st.tasks) > 1:
            raise TaskError(f'reset_classifier(global_pool={global_pool!r}) would change the pooling of every task '
                            f'({", ".join(st.tasks)}); choose the pooling before adding tasks')
        if global_pool is None:  # keep the class's own default (timm keeps the current pooling)
            st.base.reset_classifier(self, num_classes, *args, **kwargs)
        else:
            st.base.reset_classifier(self, num_classes, global_pool, *args, **kwargs)
        task = st.tasks[st.active]
        if st.head is not None:
            head = self._get_head()
            _check_head(head, st.head)
            task.head = head
            task.num_classes = int(num_classes)
            if task.class_names is not None and len(task.class_names) != num_classes:
                task.class_names = None
        self._modcl_scan()

    def _refuse_structural_change(self, what: str) -> None:
        st = self._modcl
        learned = [n for n in st.tasks if n != BASE_TASK]
        if learned:
            raise FrozenBackboneError(
                f'{what} would change the layers that the tasks {", ".join(map(repr, learned[:5]))} were learned on '
                f'(their modulators and norm state describe the current layers); call it before adding tasks, or on '
                f'a plain model from export_task(name)')

    def _modcl_set_input_size(self, *args, **kwargs):
        """timm's ``set_input_size``. A new input size resamples the frozen, shared position embedding and is allowed
        at any time; a new ``patch_size`` resamples a modulated weight and is refused once tasks exist.

        Raises:
            FrozenBackboneError: ``patch_size`` given once tasks beside ``'base'`` exist (nothing changes).
        """
        patch_size = kwargs.get('patch_size', args[1] if len(args) > 1 else None)
        if patch_size is not None:
            self._refuse_structural_change(f'set_input_size(patch_size={patch_size!r})')
        out = self._modcl.base.set_input_size(self, *args, **kwargs)
        self._modcl_scan()  # a resized position embedding is a new Parameter: freeze it again
        return out

    def _modcl_prune_intermediate_layers(self, *args, **kwargs):
        """timm's ``prune_intermediate_layers``, before tasks exist.

        Raises:
            FrozenBackboneError: once tasks beside ``'base'`` exist (nothing changes).
        """
        self._refuse_structural_change('prune_intermediate_layers()')
        out = self._modcl.base.prune_intermediate_layers(self, *args, **kwargs)
        st = self._modcl
        if st.head is not None and (not self._has_module(st.head) or isinstance(self._get_head(), nn.Identity)):
            st.head = None  # the head was pruned: the model is a feature extractor now, for every task
            for task in st.tasks.values():
                task.head, task.num_classes = nn.Identity(), 0
        self._modcl_scan()
        return out

    def _modcl_no_weight_decay(self):
        """timm's no-weight-decay names, restricted to what is still a parameter (frozen tensors are buffers)."""
        names = {n for n, _ in self.named_parameters()}
        import fnmatch
        return {p for p in self._modcl.base.no_weight_decay(self) if any(fnmatch.fnmatch(n, p) for n in names)}

    def _has_module(self, path: str) -> bool:
        try:
            self.get_submodule(path)
            return True
        except AttributeError:
            return False

    # ------------------------------------------------------------------ fingerprint
    def backbone_fingerprint(self) -> str:
        """SHA-256 over the frozen backbone tensors (weights and biases of the weight layers, pretrained norm affine,
        other frozen parameters), in a fixed order.

        Two models have the same fingerprint exactly when task adapters trained on one apply unchanged to the other.
        """
        st = self._modcl
        frozen = self._frozen_tensors()
        key = tuple((id(t), t._version) for t in frozen.values())
        if st.fingerprint is not None and st.fingerprint[0] == key:
            return st.fingerprint[1]
        h = hashlib.sha256()
        for name, t in frozen.items():
            t = t.detach().to('cpu', torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        st.fingerprint = (key, h.hexdigest())
        return st.fingerprint[1]

    def _frozen_tensors(self) -> 'OrderedDict[str, torch.Tensor]':
        st = self._modcl
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        for layers in (st.weight_layers, st.norm_layers):
            for layer, module in layers.items():
                for k in frozen_names(module):
                    t = module._buffers.get(k)
                    if t is not None:
                        out[f'{layer}.{k}'] = t
        for module_name, k in st.extra_frozen:
            out[f'{module_name}.{k}' if module_name else k] = self.get_submodule(module_name)._buffers[k]
        return out

    # ------------------------------------------------------------------ payloads: tasks as values
    @property
    def has_head(self) -> bool:
        """Whether the model has a classifier head (``False``: a feature extractor, tasks have 0 classes)."""
        return self._modcl.head is not None

    def layer_table(self) -> LayerTable:
        """The layers a task's tensors describe (weight, norm and head shapes, feature size): what payloads are
        checked against, and what adapter folders record so they can be checked without a model."""
        from .serving import prototype_dim
        st = self._modcl
        bn, affine = OrderedDict(), OrderedDict()
        for layer, m in st.norm_layers.items():
            if _tracks_stats(m):
                bn[layer] = tuple(m._buffers['running_mean'].shape)
            shapes = {k: tuple(m._buffers[k].shape) for k in ('weight', 'bias') if m._buffers.get(k) is not None}
            if shapes:
                affine[layer] = (shapes, _affine_norm(m))
        head = None
        if st.head is not None:
            head = {k: s[1:] for k, s in self._head_shapes(1).items()}
        return LayerTable(weights=self._weight_table(), bn_stats=bn, affine=affine, head=head,
                          feature_dim=prototype_dim(self))

    def task_payload(self, name: Optional[str] = None, *, head: bool = True, stats: bool = True) -> TaskPayload:
        """A task (default: the active one) as a ``TaskPayload``: its description and its tensors by flat name.

        The tensors are the task's own, detached (no copy): copy them before changing them.

        Args:
            name: The task.
            head: Include the head's tensors (only a Linear head is stored; other heads are made by the model).
            stats: Include the task's statistics (class prototypes).

        Raises:
            TaskNotFoundError: no such task.
            PayloadError: a tensor a loader would refuse (NaN or Inf values, negative variances, modulators beyond
                ``MAX_MODULATOR``).
        """
        task = self._task(self._modcl.active if name is None else name)
        keep_head = head and isinstance(task.head, nn.Linear)
        tensors = OrderedDict((k, v.detach()) for k, v in task.tensors(stats=stats).items()
                              if keep_head or not k.startswith('head.'))
        return TaskPayload(task.name, task.num_classes, task.config, tensors, task.class_names, task.metadata,
                           headless=task.num_classes > 0 and not keep_head)

    def task_info(self, name: Optional[str] = None) -> TaskInfo:
        """The ``TaskInfo`` of one task (default: the active one); ``model.tasks[name]`` without building the others'.

        Raises:
            TaskNotFoundError: no such task.
        """
        return self._task(self._modcl.active if name is None else name).info()

    def task_tensors(self, name: Optional[str] = None, *, stats: bool = False) -> 'OrderedDict[str, torch.Tensor]':
        """The live tensors of a task (default: the active one) by flat name, for in-place updates (restoring a
        checkpoint, broadcasting across processes): changing them changes the task.

        Raises:
            TaskNotFoundError: no such task.
        """
        return self._task(self._modcl.active if name is None else name).tensors(stats=stats)

    def task_statistics(self, name: Optional[str] = None) -> 'OrderedDict[str, torch.Tensor]':
        """A task's statistics (class prototypes, RanPAC moments, ...) by name: the live tensors (do not change
        them in place; use ``update_task_statistics``).

        Raises:
            TaskNotFoundError: no such task.
        """
        return OrderedDict(self._task(self._modcl.active if name is None else name).stats)

    def update_task_statistics(self, name: str, stats: Mapping[str, torch.Tensor], drop: Iterable[str] = ()) -> None:
        """Add or replace statistics of a task (and remove those named in ``drop``), validated as loading them from an
        adapter would (names, dtypes, finite values, prototype statistics complete and of this model's feature size);
        kept in their dtype, on the model's device.

        Raises:
            TaskNotFoundError: no such task.
            PayloadError: statistics a loader would refuse (the task is unchanged).
        """
        task = self._task(name)
        drop = [k for k in drop if k not in stats]
        merged = {k: v for k, v in dict(task.stats, **stats).items() if k not in drop}
        payload = TaskPayload(task.name, task.num_classes, task.config,
                              OrderedDict((f'stats.{k}', v.detach()) for k, v in merged.items()), task.class_names,
                              task.metadata)
        payload.check_statistics(self.layer_table().feature_dim)
        device = self._ref_tensor().device
        for k in drop:
            task.stats.pop(k, None)
        for k, v in stats.items():
            task.stats[k] = v.detach().to(device)

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The floating dtype of the frozen backbone (what task tensors are stored in)."""
        return self._ref_tensor().dtype

    @property
    def backbone_device(self) -> torch.device:
        """The device of the frozen backbone (where task tensors live)."""
        return self._ref_tensor().device

    def update_task_metadata(self, name: str, metadata: Mapping[str, Any]) -> Dict[str, str]:
        """Add or change entries of a task's free-form metadata (numbers and booleans stored as strings).

        Returns:
            The task's whole metadata.

        Raises:
            TaskNotFoundError: no such task.
            TaskError: metadata that ``add_task`` would refuse (the task is unchanged).
        """
        task = self._task(name)
        merged = validate_metadata(dict(task.metadata, **validate_metadata(metadata)))
        task.metadata = merged
        return dict(merged)

    def check_payload(self, payload: TaskPayload) -> None:
        """Check that ``payload`` fits this model exactly as ``load_payloads`` would, changing nothing.

        Raises:
            PayloadError: naming the problem.
        """
        self._task_from_payload(payload, fresh_head=False)

    def load_payloads(self, payloads: Sequence[TaskPayload], *, replace: bool = False, activate: bool = False
                      ) -> List[str]:
        """Add tasks from payloads, all or nothing: every payload is checked and built before the first is added.

        A headless payload (``payload.headless``) gets a fresh, untrained head.

        Args:
            payloads: The tasks.
            replace: Replace tasks of the same names instead of raising.
            activate: Make the last one the active task.

        Returns:
            The added task names.

        Raises:
            PayloadError: a payload that does not fit (missing, extra or wrongly shaped tensors, weights that
                overflow, statistics of another feature size), or ``base`` among the names.
            TaskExistsError: a task of that name exists (unless ``replace``), or a name given twice.
        """
        built: 'OrderedDict[str, TaskState]' = OrderedDict()
        for payload in payloads:
            if not isinstance(payload, TaskPayload):
                raise PayloadError(f'expected a TaskPayload, got {type(payload).__name__}')
            if payload.name == BASE_TASK:
                raise PayloadError(f'a task named {BASE_TASK!r} cannot be added (the name is reserved)')
            if payload.name in built or (payload.name in self._modcl.tasks and not replace):
                raise TaskExistsError(f'task {payload.name!r} already exists (pass replace=True, or load it under '
                                      f'another name)')
            built[payload.name] = self._task_from_payload(payload)
        for i, task in enumerate(built.values()):
            self._insert_task(task, activate=activate and i == len(built) - 1)
        return list(built)

    def _task_from_payload(self, payload: TaskPayload, fresh_head: bool = True) -> TaskState:
        """Build (but do not insert) a task from a payload checked against this model; nothing of the model (or the
        global random state) changes. The tensors are copied to the model's device and dtype.

        Raises:
            PayloadError: naming the problem.
        """
        payload.check(self.layer_table())
        name, config, tensors = payload.name, payload.config, payload.tensors
        ref = self._ref_tensor()

        def take(k: str) -> torch.Tensor:
            t = tensors[k].detach()
            if k.endswith('.num_batches_tracked'):
                return t.to(device=ref.device, dtype=torch.long).clone()
            return t.to(device=ref.device, dtype=ref.dtype).clone()

        modulators = OrderedDict((layer, nn.Parameter(take(f'modulator.{layer}'))) for layer in payload.modulators)
        with torch.no_grad():
            for layer, m in modulators.items():
                if not torch.isfinite(method_of(config).weight(self._modcl.weight_layers[layer], m)).all():
                    raise PayloadError(f'task {name!r}: modulator.{layer} makes the layer\'s weights overflow '
                                       f'{ref.dtype} (values up to {float(m.abs().max()):.3g})')
        norm_stats = OrderedDict((layer, {k: take(f'bn.{layer}.{k}') for k in s})
                                 for layer, s in payload.norm_stats.items())
        norm_affine = OrderedDict((layer, {k: nn.Parameter(take(f'norm.{layer}.{k}')) for k in a})
                                  for layer, a in payload.norm_affine.items())
        stats = OrderedDict((k, take(f'stats.{k}')) for k in payload.stats)
        head: nn.Module = nn.Identity()
        if self._modcl.head is not None and payload.num_classes > 0 and (fresh_head or not payload.headless):
            with torch.random.fork_rng(devices=[]):  # initialised (then overwritten): leave the global RNG alone
                head = self._new_head(payload.num_classes)
            if not payload.headless:
                with torch.no_grad():
                    for k, v in head.state_dict(keep_vars=True).items():
                        v.copy_(take(f'head.{k}'))
        return TaskState(name, payload.num_classes, head, config, modulators=modulators, norm_stats=norm_stats,
                         norm_affine=norm_affine, stats=stats, class_names=payload.class_names,
                         metadata=payload.metadata)

    # ------------------------------------------------------------------ state dict
    def _natural_task_keys(self, task_meta: Mapping[str, Any], config: TaskConfig, prefix: str = ''
                           ) -> 'OrderedDict[str, str]':
        """Module-tree keys under which a task's tensors appear when it is active, mapped to its flat names."""
        st = self._modcl
        out: 'OrderedDict[str, str]' = OrderedDict()
        num_classes = task_meta.get('num_classes')
        num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else 0
        for flat in self.layer_table().expected(config, max(num_classes, 0)):
            kind, _, rest = flat.partition('.')
            if kind == 'modulator':
                out[f'{prefix}{rest}.modulator'] = flat
            elif kind == 'bn':
                out[f'{prefix}{rest}'] = flat
            elif kind == 'norm':
                layer, _, which = rest.rpartition('.')
                out[f'{prefix}{layer}.task_{which}'] = flat
            elif kind == 'head':
                out[f'{prefix}{st.head}.{rest}'] = flat
        return out

    def _natural_keys(self, prefix: str = '') -> 'OrderedDict[str, str]':
        """Keys of the module tree that hold task state outside ``modcl_tasks``, mapped to flat names: the bound
        task's head (at the model's head path) and the BatchNorm statistics (the layers' own: the base task's)."""
        st = self._modcl
        out: 'OrderedDict[str, str]' = OrderedDict()
        for layer, m in st.norm_layers.items():
            if _tracks_stats(m):
                for k in BN_STATS:
                    out[f'{prefix}{layer}.{k}'] = f'bn.{layer}.{k}'
        if st.head is not None:
            for k in self._get_head().state_dict():
                out[f'{prefix}{st.head}.{k}'] = f'head.{k}'
        return out

    def state_dict(self, *args, destination=None, prefix: str = '', keep_vars: bool = False):
        """PyTorch's state dict of the module tree (the frozen backbone and the base task's BatchNorm statistics under
        timm's keys, the bound task's head at the head path, every task's tensors under
        ``modcl_tasks.<name>.<table>.<key>``), plus ``modcl.meta`` (a uint8 tensor of JSON describing the tasks).

        Tensors only, and no tensor appears twice, so ``safetensors.torch.save_file`` works. ``load_state_dict``
        recreates the tasks from it."""
        st = self._modcl
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        sd[prefix + _META_KEY] = _json_tensor({
            'format': STATE_DICT_FORMAT,
            'active': st.active,
            'tasks': [t.meta() for t in st.tasks.values()],
        })
        return sd

    def _plan_load(self, state_dict: Mapping[str, Any], prefix: str = ''
                   ) -> Optional[Tuple['OrderedDict[str, TaskState]', str, List[str]]]:
        """Validate the task section of a state dict (format 3, or format 2 of timm_modcl 0.2) and build its tasks,
        changing nothing.

        Returns ``None`` for a plain timm state dict (no task section), else ``(tasks, active name, keys of the
        state dict outside the task section that belong to tasks)``.
        """
        if prefix + _META_KEY not in state_dict:
            if any(k.startswith((prefix + _TASKS_PREFIX, prefix + TASKS_MODULE + '.')) for k in state_dict):
                raise StateDictError(f'state dict has task tensors but no {_META_KEY!r} entry')
            return None
        meta = _read_json_tensor(state_dict[prefix + _META_KEY])
        fmt = meta.get('format') if isinstance(meta, Mapping) else None
        if fmt not in (2, STATE_DICT_FORMAT):
            raise StateDictError(f'unsupported {_META_KEY!r} entry (expected format 2 or {STATE_DICT_FORMAT})')
        metas = meta.get('tasks')
        if not isinstance(metas, list) or not metas or not all(isinstance(m, Mapping) for m in metas):
            raise StateDictError(f'{_META_KEY!r} lists no tasks')
        names = [m.get('name') for m in metas]
        if names[0] != BASE_TASK or len(set(map(str, names))) != len(names):
            raise StateDictError(f'state dict tasks {names!r} must start with {BASE_TASK!r} and be unique')
        active = meta.get('active')
        if active not in names:
            raise StateDictError(f'active task {active!r} is not among the state dict tasks')
        grouped: Dict[str, Dict[str, Any]] = {n: {} for n in names}
        section = prefix + (TASKS_MODULE + '.' if fmt == STATE_DICT_FORMAT else _TASKS_PREFIX)
        for k, v in state_dict.items():
            if k.startswith(section):
                tname, _, rest = k[len(section):].partition('.')
                if tname not in grouped:
                    raise StateDictError(f'state dict has tensors of task {tname!r}, which {_META_KEY!r} does not list')
                if fmt == STATE_DICT_FORMAT:
                    table, _, key = rest.partition('.')
                    rest = rest if table == 'head' else f'{table}.{table_name(key)}'
                elif tname == active and not rest.startswith('stats.'):
                    raise StateDictError(f'the active task {tname!r} must be stored under the natural keys, found {k!r}')
                grouped[tname][rest] = v
        if fmt == STATE_DICT_FORMAT:
            natural = self._natural_keys(prefix)
            for key, flat in natural.items():
                owner = active if flat.startswith('head.') else BASE_TASK
                if key in state_dict:
                    grouped[owner][flat] = state_dict[key]
        else:
            active_meta = metas[names.index(active)]
            try:
                active_config = TaskConfig.from_dict(active_meta.get('config'))
            except TaskError as e:
                raise StateDictError(f'task {active!r}: {e}') from None
            natural = self._natural_task_keys(active_meta, active_config, prefix)
            for key, flat in natural.items():
                if key in state_dict:
                    grouped[active][flat] = state_dict[key]
        plan: 'OrderedDict[str, TaskState]' = OrderedDict()
        for m in metas:
            try:
                plan[m['name']] = self._task_from_payload(TaskPayload.from_meta(m, grouped[m['name']]))
            except PayloadError as e:
                raise StateDictError(str(e)) from None
        return plan, active, list(natural)

    def _install_tasks(self, tasks: 'OrderedDict[str, TaskState]', active: str) -> None:
        """Replace every task by ``tasks`` (built and checked by ``_plan_load``) and bind ``active``."""
        st = self._modcl
        base = tasks[BASE_TASK]
        layer_stats = OrderedDict((n, m) for n, m in st.norm_layers.items() if _tracks_stats(m))
        with torch.no_grad():
            for layer, s in base.norm_stats.items():   # the base task's statistics live in the layers
                for k, v in s.items():
                    layer_stats[layer]._buffers[k].copy_(v)
        base.bn.clear()
        base.__dict__['layer_stats'] = layer_stats
        st.tasks.clear()
        for name, task in tasks.items():
            task.set_trainable(False)
            task.train(self.training)
            st.task_dict[name] = task
        st.cache.clear()
        st.cache.bound = None
        self._bind(active)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state dict written by ``state_dict()`` (format 3, or format 2 of timm_modcl 0.2: replacing all tasks
        by the saved ones and binding the saved active task), or a plain timm state dict of the same architecture
        (loaded into the frozen backbone and the bound task's norm statistics, affine and head; its modulators are
        kept).

        Everything is validated first: on error nothing changes.

        Raises:
            StateDictError: if the state dict does not fit (other width or architecture, bad task section, missing
                or unexpected keys when ``strict``).
        """
        if assign:
            raise StateDictError('load_state_dict(assign=True) is not supported by modcl models')
        if not isinstance(state_dict, Mapping):
            raise StateDictError(f'expected a mapping of names to tensors, got {type(state_dict).__name__}')
        st = self._modcl
        own = super().state_dict(keep_vars=True)
        natural = self._natural_keys()
        task_keys = {k for k in own if k.startswith(TASKS_MODULE + '.')}
        frozen_keys = set(own) - task_keys - set(natural)
        # the backbone first: the clearest message for another width
        self._check_shapes(state_dict, {k: own[k] for k in frozen_keys})
        plan = self._plan_load(state_dict)
        given = {k for k in state_dict if not k.startswith(('modcl.', TASKS_MODULE + '.'))}
        if plan is not None:
            expected = frozen_keys | set(plan[2])
        else:
            self._check_shapes(state_dict, own)
            expected = frozen_keys | set(natural)
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if strict and (missing or unexpected):
            raise StateDictError(f'state dict keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}')
        if plan is not None:
            self._install_tasks(plan[0], plan[1])
            rest = {k: v for k, v in state_dict.items() if k in frozen_keys}
        else:
            rest = {k: v for k, v in state_dict.items() if k in frozen_keys or k in natural}
            bound = st.tasks[st.active]
            if st.active != BASE_TASK:  # the statistics of a plain model are the bound task's
                live = bound.tensors(stats=False)
                with torch.no_grad():
                    for key, flat in natural.items():
                        if flat.startswith('bn.') and key in rest:
                            live[flat].copy_(rest.pop(key))
        self.__dict__['_modcl_loading'] = True
        try:
            super().load_state_dict(rest, strict=False)
        finally:
            del self.__dict__['_modcl_loading']
        if plan is None:  # a plain model's affine is the task's affine: give it to the bound task
            with torch.no_grad():
                for layer, affine in st.tasks[st.active].norm_affine.items():
                    for k, p in affine.items():
                        if f'{layer}.{k}' in state_dict:
                            p.copy_(st.norm_layers[layer]._buffers[k])
        from torch.nn.modules.module import _IncompatibleKeys
        return _IncompatibleKeys(missing, unexpected)

    def _check_shapes(self, state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> None:
        mismatched = []
        for k, v in state_dict.items():
            if k in own and own[k] is not None:
                if not isinstance(v, torch.Tensor):
                    raise StateDictError(f'{k!r} is not a tensor')
                if tuple(v.shape) != tuple(own[k].shape):
                    mismatched.append(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}')
        if mismatched:
            raise StateDictError(
                f'state dict does not fit this model ({len(mismatched)} shape mismatches, e.g. a different width): '
                + '; '.join(mismatched[:3]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # loaded as part of a parent module (our own load_state_dict has done the tasks): build and install them here
        if not self.__dict__.get('_modcl_loading'):
            plan = self._plan_load(state_dict, prefix)
            if plan is not None:
                self._install_tasks(plan[0], plan[1])
                for k in plan[2]:
                    state_dict.pop(k, None)
                for k in [k for k in state_dict if k.startswith(prefix + TASKS_MODULE + '.')]:
                    del state_dict[k]
        for k in [k for k in state_dict if k.startswith(prefix + 'modcl.')]:
            del state_dict[k]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ export
    def export_task(self, name: Optional[str] = None) -> nn.Module:
        """A plain timm model (the original class, no timm_modcl needed) computing one task (default: the active one).

        The task's modulation is folded into ordinary weights, its norm statistics and affine become the norm
        layers' own, and its head becomes the classifier; every tensor is a trainable parameter again. Outputs are
        equal to the task's (up to float rounding); the copy is independent of this model.

        Raises:
            TaskNotFoundError: if there is no such task.
        """
        st = self._modcl
        task = self._task(st.active if name is None else name)
        with self.use_task(task.name):
            memo = {id(st): None, id(st.cache): None, id(st.task_dict): None}
            for layer in list(st.weight_layers.values()) + list(st.norm_layers.values()):
                memo[id(layer)] = unmodulate_layer(layer, copy=True)   # the task folded in, a plain layer
            plain = copy.deepcopy(self, memo)
        for k in [k for k, h in plain._forward_pre_hooks.items() if h is _prepare_compiled_call]:
            del plain._forward_pre_hooks[k]
        for module_name, k in st.extra_frozen:
            module = plain.get_submodule(module_name)
            module._parameters[k] = nn.Parameter(module._buffers.pop(k))
        del plain.__dict__['_modcl']
        plain._modules.pop('_modcl_frozen', None)
        plain._modules.pop(TASKS_MODULE, None)
        plain.__class__ = st.base
        for p in plain.parameters():
            p.requires_grad_(True)
        cfg = getattr(plain, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            arch = str(cfg.get('architecture', ''))
            plain.pretrained_cfg = dict(cfg, architecture=arch[len('modcl_'):] if arch.startswith('modcl_') else arch,
                                        modcl_task=task.name)
            if hasattr(plain, 'default_cfg'):
                plain.default_cfg = plain.pretrained_cfg
        return plain

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(model)`` scripts the active task as a plain timm model (``export_task``)."""
        return self.export_task()

    # ------------------------------------------------------------------ device / dtype moves
    def _apply(self, fn, recurse: bool = True):
        """PyTorch's ``_apply`` (every task's tensors are in the module tree); then the weight cache and the
        fingerprint, which describe the old tensors, are cleared."""
        super()._apply(fn, recurse)
        if not recurse:
            return self
        st = self._modcl
        holders = self._modules.get('_modcl_frozen')
        if holders is not None:
            for k, holder in holders.items():
                holder._buffers['tensor'] = self._buffers[k]
        st.cache.clear()
        st.fingerprint = None
        return self
