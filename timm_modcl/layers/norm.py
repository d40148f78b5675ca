"""The task-aware normalisation layer (``TaskNorm``): the affine of the task of the call, and (``_TaskStats``, in
front of BatchNorm layers) its running statistics; the layer's own buffers are the base task's.
"""
from typing import Optional, Type

import torch
import torch.nn as nn

from .cache import _SCOPED, WeightCache


class TaskNorm:
    """Mixed into the class of a normalisation layer by ``modulate_layer``.

    ``weight`` / ``bias`` become properties: the active task's own affine (``task_weight`` / ``task_bias``
    parameters) when it has one for this layer, else the frozen pretrained affine (buffers under the usual keys).
    BatchNorm running statistics are plain buffers that the model re-binds per task.
    """

    _modcl_plain: Type[nn.Module]
    modcl_cache: Optional[WeightCache] = None   # the model's cache: identifies the model in a task_scope
    modcl_name: str = ''
    modcl_key: str = ''

    def _modcl_task(self):
        """The task this call computes: the current ``task_scope``'s for this model, else the bound one."""
        cache = self.modcl_cache
        call = _SCOPED.get()
        if call is not None and call[0] is cache:
            return call[1]
        return None if cache is None else cache.bound

    # read on every forward: one context-variable read and one dict lookup. torch.compile traces the read (no graph
    # break) and sees no scope (a scope on a compiled call is refused)
    @property
    def weight(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        own = None if task is None else task.__dict__['norm_store'].get(self.modcl_key + '/weight')
        return self._buffers['weight'] if own is None else own

    @property
    def bias(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        own = None if task is None else task.__dict__['norm_store'].get(self.modcl_key + '/bias')
        return self._buffers['bias'] if own is None else own

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


def _scoped_stat(name: str) -> property:
    suffix = '/' + name

    def get(self) -> Optional[torch.Tensor]:
        task = self._modcl_task()
        if task is not None:
            t = task.__dict__['bn_store'].get(self.modcl_key + suffix)
            if t is not None:
                return t
        return self._buffers[name]   # the base task's statistics are the layer's own buffers (the checkpoint's)
    return property(get, doc=f'The {name} of the task of the current ``task_scope``, else the bound task\'s.')


class _TaskStats:
    """Mixed in front of BatchNorm layers' ``TaskNorm`` class: the running statistics of the task of the call (its
    ``task_scope``'s, else the bound one's); the layer's own buffers are the base task's."""
    running_mean = _scoped_stat('running_mean')
    running_var = _scoped_stat('running_var')
    num_batches_tracked = _scoped_stat('num_batches_tracked')


_TASK_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
