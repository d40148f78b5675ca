"""MobileNetV3 with Adaptive Weight Modulation for continual learning (``modcl_mobilenetv3_*``).

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

Built by timm's own ``mobilenetv3`` builder (same weights and tags), then made task-aware by
``timm_modcl.modulate``: every conv (squeeze-excitation convs included) and the pre-logits conv get per-task
modulators, BatchNorm layers per-task running statistics; the head is per task.
"""
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import create_modcl, modcl_cfgs

__all__ = []

default_cfgs = generate_default_cfgs({
    **modcl_cfgs('mobilenetv3_large_100'),
})


@register_model
def modcl_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet V3 Large 1.0, per-task weight modulation."""
    return create_modcl('modcl_mobilenetv3_large_100', pretrained, **kwargs)
