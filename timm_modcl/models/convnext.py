"""ConvNeXt with Adaptive Weight Modulation for continual learning (``modcl_convnext_*``).

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

Built by timm's own ``convnext`` builder (same weights and tags), then made task-aware by ``timm_modcl.modulate``:
the depthwise and stem/downsample convs and the MLP linears get per-task modulators, every LayerNorm (``LayerNorm2d``
included, the head's too) a per-task affine, and ``head.fc`` is per task. The layer-scale gammas stay frozen and
shared.
"""
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import create_modcl, modcl_cfgs

__all__ = []

default_cfgs = generate_default_cfgs({
    **modcl_cfgs('convnext_atto'),
    **modcl_cfgs('convnext_tiny'),
})


@register_model
def modcl_convnext_atto(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Atto, per-task weight modulation."""
    return create_modcl('modcl_convnext_atto', pretrained, **kwargs)


@register_model
def modcl_convnext_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Tiny, per-task weight modulation."""
    return create_modcl('modcl_convnext_tiny', pretrained, **kwargs)
