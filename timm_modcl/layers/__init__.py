"""The layer kinds of Adaptive Weight Modulation (arXiv 2311.15276), for any timm model.

A frozen weight ``W`` of shape ``(O, I, *kernel)`` (every ``nn.Conv1d/2d/3d`` and ``nn.Linear``, and their subclasses
that read ``self.weight`` such as timm's ``Conv2dSame`` or ``StdConv2d``) is multiplied element-wise by a task-specific
modulator learnt at a low channel resolution ``(o, i, *kernel)`` and bicubically interpolated over the two channel
dimensions up to ``(O, I)``::

    W_task = W * (1 + sign * upsample(M))

``sign = -1`` with a kaiming-normal ``M`` is the author's formulation ``W * (1 - M)`` (variant ``"paper"``);
``sign = +1`` with ``M = 0`` starts exactly at the pretrained weights (variant ``"identity"``). A fused projection
(ViT's ``qkv``) is modulated per chunk, so q, k and v are never blended by the interpolation.

Layers are modulated *in place*: their class is swapped for a subclass that adds a ``weight`` property (the frozen
tensor stays a buffer under the same state-dict key), so every forward of the original class, and every reference timm
keeps to the module, keeps working. Normalisation layers get the same treatment for their affine (a task's own affine
in front of the frozen one) and their BatchNorm running statistics (the task's own; the layer's buffers are the base
task's). The tensors themselves live in the model's tasks (``TaskState`` modules); a layer reads those of the task of
the call on every forward.

In eval mode without autograd the effective weight is cached in the model's ``WeightCache`` and reused until the
modulator or the weight changes (tensor version counters), so inference costs what the plain layer costs.

**Tasks per call.** Besides the task the model binds into its layers (``set_task``, one per model: global state), a
computation can name its task for the current thread or asyncio task only: ``task_scope`` sets a context variable that
every layer of that model reads (modulator, norm affine, BatchNorm statistics), so any number of threads can run
different tasks on one model at once without changing anything shared.

The package has one module per job: ``cache`` (``WeightCache`` and the ``task_scope`` context variable), ``weight``
(``ModulatedWeight`` and the interpolation of modulators), ``norm`` (``TaskNorm`` and BatchNorm statistics),
``factory`` (the task-aware classes and their frozen-tensor guard, ``modulate_layer`` / ``unmodulate_layer``) and
``inputs`` (input validation).
"""
from ..methods import LayerMethod, Modulation, modulator_shape  # noqa: F401
# private names stay importable here: pickled layers name ``_new_layer`` and ``_LayerParameters`` as
# ``timm_modcl.layers.<name>`` (written before the split into this package)
from .cache import _SCOPED, WeightCache, scoped_task, task_scope  # noqa: F401
from .weight import (  # noqa: F401
    MODULATION_VARIANTS, ModulatedWeight, interpolation_matrix, upsample_modulator, validate_resolution,
)
from .norm import TaskNorm
from .inputs import check_input, validate_input  # noqa: F401
from .factory import (  # noqa: F401
    _LayerParameters, _new_layer, frozen_names, is_norm_layer, is_weight_layer, modulate_layer, plain_class,
    task_aware_class, unmodulate_layer,
)

__all__ = [
    'MODULATION_VARIANTS',
    'frozen_names',
    'plain_class',
    'task_aware_class',
    'task_scope',
    'scoped_task',
    'ModulatedWeight',
    'TaskNorm',
    'WeightCache',
    'modulator_shape',
    'upsample_modulator',
    'interpolation_matrix',
    'validate_resolution',
    'is_weight_layer',
    'is_norm_layer',
    'modulate_layer',
    'unmodulate_layer',
]
