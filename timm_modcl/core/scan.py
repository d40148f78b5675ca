"""The layers of a modulated model (``LayerScanMixin``): setting a model up (``attach``), finding the layers to
modulate and the parameters to freeze, the ``base`` task, the head path, the frozen tensors and their fingerprint, the
effective weights prepared for a compiled call.
"""
import hashlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._settings import weight_cache_bytes
from ..config import DEFAULT_CONFIG, TaskConfig
from ..errors import UnsupportedModelError
from ..layers import WeightCache, check_input, frozen_names, is_norm_layer, is_weight_layer, modulate_layer, scoped_task
from ..task import BASE_TASK, TaskDict, TaskState, table_key
from .state import TASKS_MODULE, _check_head, _fx_tracing, _State, _tracks_stats

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


class LayerScanMixin:
    """Setting up a modcl model: its layers, frozen tensors, base task and head path (see the package docstring)."""

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
                    owner = st.plain_class if module is self else type(module)
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
        head = self._get_head() if st.head is not None else nn.Identity()
        return TaskState(BASE_TASK, int(getattr(self, 'num_classes', 0) or 0) if st.head else 0, head, config,
                         modulators=modulators, norm_affine=self._fresh_affine(config),
                         layer_stats=self._stat_layers())

    def _stat_layers(self) -> 'OrderedDict[str, nn.Module]':
        """The BatchNorm layers that track running statistics, by name (their buffers are the base task's)."""
        return OrderedDict((n, m) for n, m in self._modcl.norm_layers.items() if _tracks_stats(m))

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

    # ------------------------------------------------------------------ fingerprint
    def backbone_fingerprint(self) -> str:
        """SHA-256 over the frozen backbone tensors (weights and biases of the weight layers, pretrained norm affine,
        other frozen parameters), in a fixed order.

        Two models have the same fingerprint exactly when task adapters trained on one apply unchanged to the other.
        """
        st = self._modcl
        frozen = self.frozen_tensors()
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

    def frozen_tensors(self) -> 'OrderedDict[str, torch.Tensor]':
        """The frozen backbone tensors every task shares, by their timm names (weights and biases of the weight
        layers, the pretrained norm affine, other frozen parameters): no task may change them."""
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
