"""ResNet with Adaptive Weight Modulation for continual learning (``modcl_resnet*``).

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

Built by timm's own ``resnet`` builder (same weights and tags, torchvision's included), then made task-aware by
``timm_modcl.modulate``: every conv gets per-task modulators, BatchNorm layers per-task running statistics, and the
``fc`` head is per task.
"""
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import create_modcl, modcl_cfgs

__all__ = []

default_cfgs = generate_default_cfgs({
    **modcl_cfgs('resnet18'),
    **modcl_cfgs('resnet50'),
})


@register_model
def modcl_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18, per-task weight modulation."""
    return create_modcl('modcl_resnet18', pretrained, **kwargs)


@register_model
def modcl_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50, per-task weight modulation."""
    return create_modcl('modcl_resnet50', pretrained, **kwargs)
