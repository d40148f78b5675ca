"""timm_modcl: continual learning with zero forgetting on a frozen timm backbone (Adaptive Weight Modulation).

Importing the package registers the ``modcl_mobilenetv2_*`` models in timm.
"""
from .version import __version__
from .errors import *  # noqa: F401,F403
from .layer import MODULATION_VARIANTS, ModulatedConv2d, modulator_shape, upsample_modulator
from .task import BASE_TASK, DEFAULT_VARIANT, TaskInfo, TaskState, validate_task_name
from .modcl_mobilenetv2 import ModCLMobileNetV2, ModCLMobileNetV2Features, checkpoint_filter_fn
from .adapter import load_task, load_tasks, save_task, save_tasks
from .hub import pull_tasks, push_tasks
from .metrics import AccuracyMatrix
from .train import TrainHistory, evaluate, predict, train_task
