"""timm_modcl: continual learning with zero forgetting on a frozen timm backbone (Adaptive Weight Modulation).

Importing the package registers the ``modcl_*`` models in timm (``timm.list_models('modcl_*')``);
``timm_modcl.modulate(model)`` makes any other timm model task-aware.
"""
from .version import __version__
from .errors import *  # noqa: F401,F403
from .layers import MODULATION_VARIANTS, ModulatedWeight, TaskNorm, WeightCache, modulator_shape, upsample_modulator
from .methods import METHODS, LayerMethod, LoRA, Modulation
from .config import DEFAULT_CONFIG, TaskConfig
from .task import BASE_TASK, TaskInfo, TaskState, validate_task_name
from .core import ModCLMixin, register_frozen_parameters
from .adapter import load_task, load_tasks, merge_adapter_folders, save_task, save_tasks
from .hub import pull_tasks, push_tasks
from .serving import TaskPrediction, compute_task_statistics, prototype_statistics
from .model import is_modcl_model, modcl_class, modulate
from . import models  # noqa: F401  (registers the modcl_* models)
from .models import checkpoint_filter_fn
from .metrics import AccuracyMatrix
from .train import TrainHistory, evaluate, predict, train_task

DEFAULT_VARIANT = DEFAULT_CONFIG.variant
