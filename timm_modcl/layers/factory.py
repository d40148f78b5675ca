"""Making layers task-aware and back: the task-aware classes (``task_aware_class``, the frozen-tensor guard in
front of every one), which layers qualify (``is_weight_layer``, ``is_norm_layer``), ``modulate_layer`` (the class
swapped in place, parameters frozen into buffers) and ``unmodulate_layer`` (the bound task folded into a plain layer).
"""
from collections import OrderedDict
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn

from ..errors import FrozenBackboneError
from .inputs import check_input
from .norm import _TASK_STATS, _TASK_TENSORS, TaskNorm, _TaskStats, stats_mixin
from .weight import ModulatedWeight


class _FrozenGuard:
    """Refuses module surgery on a layer's frozen tensors (every task shares them): assigning or deleting them
    (``conv.weight = ...``, ``del conv.weight``), registering new parameters (``torch.nn.utils.prune``), or
    reparametrizing them (``torch.nn.utils.parametrizations.weight_norm``). Each raises ``FrozenBackboneError``
    before anything changes, naming the supported way."""

    _modcl_plain: Type[nn.Module]               # the plain class the task-aware one was made from (task_aware_class)
    _modcl_trainable: Tuple[str, ...] = ()     # the views of the bound task's tensors (``modulator``, ...)

    def _modcl_refuse(self, what: str) -> None:
        raise FrozenBackboneError(
            f'{what} on {type(self).__name__} {self.modcl_name!r}: its frozen tensors are shared by every task, so '
            f'changing them would change the outputs of every task. Train a task (add_task) to adapt the layer; to '
            f'edit, prune or reparametrize weights, work on a plain model: model.export_task(name)')

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get('_modcl_frozen', ()):
            self._modcl_refuse(f'assigning .{name}')
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get('_modcl_frozen', ()) or name in type(self)._modcl_trainable:
            self._modcl_refuse(f'deleting .{name}')
        super().__delattr__(name)

    def register_parameter(self, name: str, param) -> None:
        self._modcl_refuse(f'registering a new parameter {name!r}')


class _LayerParameters(OrderedDict):
    """The ``_parameters`` of a task-aware layer: deleting a frozen tensor from it (as the deprecated
    ``torch.nn.utils.weight_norm`` does) is refused like the other surgery, with nothing changed."""

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise FrozenBackboneError(
                f'deleting parameter {key!r} of a task-aware layer: its frozen tensors are buffers shared by every '
                f'task; to edit, prune or reparametrize weights, work on a plain model: model.export_task(name)')
        super().__delitem__(key)


_CLASSES: Dict[Tuple[type, type], type] = {}


def task_aware_class(mixin: type, base: type) -> type:
    """The (cached) subclass of ``base`` with ``mixin`` in front, registered as a torch.fx leaf."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        from timm.models._features_fx import register_notrace_module
        prefix = 'Modulated' if mixin is ModulatedWeight else 'Task'
        mixins = (stats_mixin(base), mixin) if mixin is TaskNorm and issubclass(base, nn.modules.batchnorm._BatchNorm) \
            else (mixin,)
        task_views = ('modulator',) if mixin is ModulatedWeight else ('task_weight', 'task_bias')
        # '__module__': the package, timm_modcl.layers (as before it was split into modules), not this module
        cls = type(f'{prefix}{base.__name__}', (_FrozenGuard,) + mixins + (base,),
                   {'__module__': __package__, '_modcl_plain': base, '_modcl_trainable': task_views})
        register_notrace_module(cls)  # its caching is Python-side logic: a leaf for feature extraction
        _CLASSES[(mixin, base)] = cls
    return cls


def plain_class(module: nn.Module) -> type:
    """The plain class a task-aware layer was made from (``nn.Conv2d``, timm's ``BatchNormAct2d``, ...)."""
    return type(module)._modcl_plain


def _new_layer(mixin: type, base: type) -> nn.Module:
    """Unpickling helper: an empty instance of the modulated subclass of ``base``."""
    return object.__new__(task_aware_class(mixin, base))


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose weight ``(O, I, *kernel)`` can be modulated (convs and linears)."""
    if isinstance(module, (ModulatedWeight, TaskNorm)):
        return isinstance(module, ModulatedWeight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return not module.transposed and isinstance(module._parameters.get('weight'), torch.Tensor)
    return isinstance(module, nn.Linear) and isinstance(module._parameters.get('weight'), torch.Tensor)


#: Normalisation layers whose affine becomes per-task (timm's own are subclasses of these, or listed by name).
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_NORM_NAMES = {'timm.layers.norm.RmsNorm', 'timm.layers.norm.RmsNorm2d', 'timm.layers.norm.SimpleNorm',
               'timm.layers.norm.SimpleNorm2d', 'timm.layers.fast_norm.RmsNorm'}


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with per-task state (BatchNorm, LayerNorm, GroupNorm, RmsNorm)."""
    if isinstance(module, TaskNorm):
        return True
    if isinstance(module, _NORM_TYPES):
        return True
    return any(f'{c.__module__}.{c.__qualname__}' in _NORM_NAMES for c in type(module).__mro__)


def _freeze(module: nn.Module) -> Tuple[str, ...]:
    """Turn every parameter of ``module`` into a frozen buffer under the same name; returns their names."""
    names = tuple(module._parameters)
    for name in names:
        p = module._parameters.pop(name)
        module._buffers[name] = None if p is None else p.detach().requires_grad_(False)
    return names


def modulate_layer(module: nn.Module) -> str:
    """Swap a weight or norm layer's class in place for its task-aware subclass and freeze its parameters.

    Returns ``'weight'`` or ``'norm'``. Already modulated layers are left as they are.

    Raises:
        TypeError: if the module is neither kind.
    """
    if isinstance(module, ModulatedWeight):
        return 'weight'
    if isinstance(module, TaskNorm):
        return 'norm'
    base = type(module)
    if is_weight_layer(module):
        module._modcl_frozen = _freeze(module)            # weight, bias (and a gain): frozen buffers
        module.__class__ = task_aware_class(ModulatedWeight, base)
        module._parameters = _LayerParameters(module._parameters)
        module.modcl_chunks = 1
        module.modcl_cache = None
        module._modcl_interp = {}
        return 'weight'
    if is_norm_layer(module):
        frozen = _freeze(module)
        for name in ('weight', 'bias'):                   # a norm without affine still answers .weight (None)
            module._buffers.setdefault(name, None)
        module._modcl_frozen = frozen
        module.__class__ = task_aware_class(TaskNorm, base)
        module._parameters = _LayerParameters(module._parameters)
        return 'norm'
    raise TypeError(f'{base.__name__} is neither a weight layer (conv, linear) nor a normalisation layer')


_LAYER_ATTRS = ('modcl_chunks', 'modcl_cache', '_modcl_interp', '_modcl_frozen', 'modcl_bn_guard', 'modcl_name',
                'modcl_key', '_modcl_eff', '_modcl_key') + tuple('_modcl_key_' + n for n in _TASK_TENSORS)


def frozen_names(module: nn.Module) -> Tuple[str, ...]:
    """Names of the frozen, shared tensors (buffers) of a layer made task-aware by ``modulate_layer`` (its weight,
    bias, ...); empty for any other module."""
    return tuple(module.__dict__.get('_modcl_frozen', ()))


def unmodulate_layer(module: nn.Module, copy: bool = False) -> nn.Module:
    """Turn a modulated layer back into its plain class with the active task folded in (trainable parameters).

    The effective weight (or the task's affine) and the other frozen tensors become parameters again, and the
    running statistics bound now stay as buffers. With ``copy=True`` the original is left untouched and a new
    module (sharing nothing but child modules) is returned.
    """
    if not isinstance(module, (ModulatedWeight, TaskNorm)):
        return module
    current = {'weight': module.weight, 'bias': module.bias} if isinstance(module, TaskNorm) else {
        'weight': module.weight}
    frozen_names = module._modcl_frozen
    params = OrderedDict()
    for name in frozen_names:
        t = current.get(name, module._buffers.get(name))
        params[name] = None if t is None else nn.Parameter(t.detach().clone())
    buffers = OrderedDict()
    for n, b in module._buffers.items():
        if n not in frozen_names and n not in ('weight', 'bias'):
            if isinstance(module, _TaskStats) and n in _TASK_STATS:
                b = getattr(module, n)   # the bound task's statistics
            buffers[n] = b.detach().clone() if copy and b is not None else b
    if copy:
        out = object.__new__(module._modcl_plain)
        out.__dict__ = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    else:
        out = module
    for attr in _LAYER_ATTRS:
        out.__dict__.pop(attr, None)
    out.__class__ = module._modcl_plain
    out._parameters = params
    out._buffers = buffers
    out._non_persistent_buffers_set = {n for n in out._non_persistent_buffers_set if n in buffers}
    for hooks in (out._forward_pre_hooks,):
        for k in [k for k, h in hooks.items() if h is check_input]:
            del hooks[k]
    return out
