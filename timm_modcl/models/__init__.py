"""The ``modcl_*`` models registered in timm, one module per timm family (named like timm's own, so
``timm.list_models('modcl_*', module='resnet')`` and timm's own model tests select them as family members)."""
from .convnext import *  # noqa: F401,F403
from .efficientnet import *  # noqa: F401,F403
from .efficientnet import checkpoint_filter_fn  # noqa: F401
from .mobilenetv3 import *  # noqa: F401,F403
from .resnet import *  # noqa: F401,F403
from .vision_transformer import *  # noqa: F401,F403
