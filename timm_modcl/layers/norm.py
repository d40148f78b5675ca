"""The task-aware normalisation layer (``TaskNorm``): the affine of the task of the call, and (``_TaskStats``, in
front of BatchNorm layers) its running statistics; the layer's own buffers are the base task's. BatchNorm classes
whose forward is PyTorch's or timm's ``BatchNormAct2d``'s get an eval-mode fast path (``stats_mixin``).
"""
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import _SCOPED, WeightCache


_TASK_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
_TASK_TENSORS = ('weight', 'bias') + _TASK_STATS


def _task_tensor(name: str, store: str) -> property:
    """A property: the tensor ``name`` of the task of the call (its ``task_scope``'s for this model, else the bound
    task's) from its table ``store``, else the layer's own buffer (the frozen affine; the base task's statistics).

    Read on every forward (in training, BatchNorm reads five of these), so kept lean: keys made once."""
    key_attr = '_modcl_key_' + name

    def get(self) -> Optional[torch.Tensor]:
        d = self.__dict__
        task = self._modcl_task()
        if task is not None:
            t = task.__dict__[store].get(d[key_attr])
            if t is not None:
                return t
        return d['_buffers'][name]
    return property(get, doc=f'The {name} of the task of the current ``task_scope``, else the bound task\'s (the '
                             f'layer\'s own buffer when the task has none for this layer).')


class TaskNorm:
    """Mixed into the class of a normalisation layer by ``modulate_layer``.

    ``weight`` / ``bias`` become properties: the affine of the task of the call (its ``task_scope``'s, else the bound
    task's) when it has one for this layer, else the frozen pretrained affine (buffers under the usual keys).
    """

    _modcl_plain: Type[nn.Module]
    modcl_cache: Optional[WeightCache] = None   # the model's cache: identifies the model in a task_scope
    modcl_name: str = ''

    def _modcl_task(self):
        """The task this call computes: the current ``task_scope``'s for this model, else the bound one."""
        cache = self.modcl_cache
        call = _SCOPED.get()
        if call is not None and call[0] is cache:
            return call[1]
        return None if cache is None else cache.bound

    @property
    def modcl_key(self) -> str:
        """The layer's key in a task's tables (``task.table_key`` of its name)."""
        return self.__dict__.get('_modcl_key', '')

    @modcl_key.setter
    def modcl_key(self, key: str) -> None:
        d = self.__dict__
        d['_modcl_key'] = key
        for name in _TASK_TENSORS:   # the tables' keys of this layer's tensors, made once (read on every forward)
            d['_modcl_key_' + name] = f'{key}/{name}'

    # read on every forward: one context-variable read and one dict lookup. torch.compile traces the read (no graph
    # break) and sees no scope (a scope on a compiled call is refused)
    weight = _task_tensor('weight', 'norm_store')
    bias = _task_tensor('bias', 'norm_store')

    @property
    def task_weight(self) -> Optional[torch.Tensor]:
        """The bound task's own affine weight of this layer (``None``: it uses the frozen one)."""
        cache = self.modcl_cache
        return None if cache is None or cache.bound is None else cache.bound.norm.store.get(self.modcl_key + '/weight')

    @property
    def task_bias(self) -> Optional[torch.Tensor]:
        """The bound task's own affine bias of this layer (``None``: it uses the frozen one)."""
        cache = self.modcl_cache
        return None if cache is None or cache.bound is None else cache.bound.norm.store.get(self.modcl_key + '/bias')

    def __prepare_scriptable__(self) -> nn.Module:
        from .factory import unmodulate_layer   # (the factory module imports this one)
        return unmodulate_layer(self, copy=True)

    def __reduce_ex__(self, protocol):
        from .factory import _new_layer   # (the factory module imports this one)
        return _new_layer, (TaskNorm, self._modcl_plain), self.__dict__


class _TaskStats:
    """Mixed in front of BatchNorm layers' ``TaskNorm`` class: the running statistics of the task of the call (its
    ``task_scope``'s, else the bound one's); the layer's own buffers are the base task's."""
    running_mean = _task_tensor('running_mean', 'bn_store')
    running_var = _task_tensor('running_var', 'bn_store')
    num_batches_tracked = _task_tensor('num_batches_tracked', 'bn_store')


class _EvalBatchNorm(_TaskStats):
    """``_TaskStats`` for a BatchNorm class whose forward is exactly PyTorch's ``_BatchNorm.forward`` or timm's
    ``BatchNormAct2d.forward``: in eval mode with running statistics, the task's four tensors are resolved in one
    lookup and ``F.batch_norm`` runs on them, as the plain forward does (the same call, so the same result), instead
    of five property reads; training, and layers without running statistics, take the plain forward. About a 2 % faster
    batch-1 forward of MobileNetV2 at 224 px on a CPU (``benchmarks/speed.py``)."""

    def _modcl_eval_tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        """(running_mean, running_var, weight, bias) of the task of the call, each the layer's own buffer when the task
        has none for this layer."""
        d = self.__dict__
        b = d['_buffers']
        task = self._modcl_task()
        if task is None:
            return b['running_mean'], b['running_var'], b['weight'], b['bias']
        td = task.__dict__
        bn, norm = td['bn_store'], td['norm_store']
        rm, rv = bn.get(d['_modcl_key_running_mean']), bn.get(d['_modcl_key_running_var'])
        w, bias = norm.get(d['_modcl_key_weight']), norm.get(d['_modcl_key_bias'])
        return (b['running_mean'] if rm is None else rm, b['running_var'] if rv is None else rv,
                b['weight'] if w is None else w, b['bias'] if bias is None else bias)

    def _modcl_batch_norm(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The eval-mode batch norm of ``x`` with the task's tensors; ``None`` where the plain forward must run."""
        if self.training:
            return None
        rm, rv, w, b = self._modcl_eval_tensors()
        if rm is None or rv is None:
            return None
        return F.batch_norm(x, rm, rv, w, b, False, 0.0 if self.momentum is None else self.momentum, self.eps)


class _EvalTorchBatchNorm(_EvalBatchNorm):
    """For ``nn.BatchNorm1d/2d/3d`` (``_BatchNorm.forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self._check_input_dim(x)
        y = self._modcl_batch_norm(x)
        return super().forward(x) if y is None else y


class _EvalBatchNormAct2d(_EvalBatchNorm):
    """For timm's ``BatchNormAct2d`` (batch norm, then its ``drop`` and ``act``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and x.ndim != 4:
            raise AssertionError(f'expected 4D input (got {x.ndim}D input)')   # timm's check, as its _assert raises
        y = self._modcl_batch_norm(x)
        return super().forward(x) if y is None else self.act(self.drop(y))


def stats_mixin(base: type) -> type:
    """The running-statistics mixin for a BatchNorm class ``base``: an eval fast path when its forward is one this
    module reproduces exactly, else ``_TaskStats``."""
    from timm.layers.norm_act import BatchNormAct2d
    if base.forward is nn.modules.batchnorm._BatchNorm.forward:
        return _EvalTorchBatchNorm
    if base.forward is BatchNormAct2d.forward:
        return _EvalBatchNormAct2d
    return _TaskStats
