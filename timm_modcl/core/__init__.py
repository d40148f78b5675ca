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

The mixin is assembled from one mixin per job: ``scan`` (``LayerScanMixin``: set-up, layers, frozen tensors and their
fingerprint, the base task, the head path), ``structure`` (``TimmStructureMixin``: timm's ``forward_head``,
``group_matcher`` and structural methods), ``lifecycle`` (``TaskLifecycleMixin``: queries, adding, binding, scoping,
renaming and removing tasks), ``payloads`` (``PayloadMixin``: tasks as ``TaskPayload`` values) and ``state_dict``
(``StateDictMixin``: the state dict, ``export_task``, device moves); ``state`` holds ``_State`` and shared helpers.
"""
from ..payload import MAX_CLASSES, MAX_MODULATOR
# ``_State``, ``_FrozenTensor`` and ``_prepare_compiled_call`` stay importable here: pickled models name them
# ``timm_modcl.core.<name>`` (written before the split into this package)
from .state import TASKS_MODULE, _State  # noqa: F401
from .scan import (  # noqa: F401
    CHUNKED_LAYERS, LayerScanMixin, _FrozenTensor, _prepare_compiled_call, attach, frozen_parameter_names,
    register_frozen_parameters,
)
from .structure import TimmStructureMixin
from .lifecycle import TaskLifecycleMixin
from .payloads import PayloadMixin
from .state_dict import STATE_DICT_FORMAT, StateDictMixin

__all__ = [
    'ModCLMixin', 'MAX_CLASSES', 'MAX_MODULATOR', 'STATE_DICT_FORMAT', 'register_frozen_parameters', 'frozen_parameter_names',
]


class ModCLMixin(StateDictMixin, PayloadMixin, TaskLifecycleMixin, TimmStructureMixin, LayerScanMixin):
    """Task lifecycle of a timm model made task-aware by ``timm_modcl.modulate`` (see the module docstring)."""

    _modcl: _State
