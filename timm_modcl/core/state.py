"""What the mixin keeps about a model (``_State``, in ``model._modcl``), the module holding the tasks
(``TASKS_MODULE``) and the small helpers the parts of ``ModCLMixin`` share.
"""
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError
from ..layers import WeightCache
from ..task import BASE_TASK, TaskState

#: The model's child module holding the tasks (an ``nn.ModuleDict`` of ``TaskState``).
TASKS_MODULE = 'modcl_tasks'


def _fx_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _check_head(head: nn.Module, path: str) -> None:
    """A task head is a single layer with a ``weight`` (and ``bias``) whose first dimension is the class count."""
    if isinstance(head, nn.Identity):
        return
    names = set(head._parameters)
    if list(head.children()) or not names or not names <= {'weight', 'bias'} or head._parameters.get('weight') is None:
        raise UnsupportedModelError(
            f'the classifier {path!r} is a {type(head).__name__}; timm_modcl gives each task its own head and supports '
            f'single-layer classifiers (Linear, 1x1 conv) or Identity: pass head= to modulate() to pick another')


class _State:
    """Everything the mixin keeps about a model, in one attribute (``model._modcl``)."""

    def __init__(self, base: type, head: Optional[str], freeze: Tuple[str, ...], cache: WeightCache,
                 task_dict: nn.ModuleDict) -> None:
        self.plain_class = base      # the timm class the model was made from (not the "base" task)
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
        if 'base' in state:   # pickled before the name changed
            state['plain_class'] = state.pop('base')
        self.__dict__.update(state)
        self.lock = threading.RLock()
        self.__dict__.setdefault('prototype_cache', {})


def _affine_norm(module: nn.Module) -> bool:
    """Norm layers whose affine is always per task: those without running statistics (LayerNorm, GroupNorm, ...)."""
    return not isinstance(module, nn.modules.batchnorm._BatchNorm)


def _tracks_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
