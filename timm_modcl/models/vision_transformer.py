"""Vision Transformer with Adaptive Weight Modulation for continual learning (``modcl_vit_*``).

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

Built by timm's own ``vision_transformer`` builder (same weights and tags), then made task-aware by
``timm_modcl.modulate``: the patch-embedding conv and every Linear get per-task modulators (the fused ``qkv``
projection one per chunk, so q, k and v are never blended by the interpolation), every LayerNorm a per-task affine,
and ``head`` is per task. The class token and position embedding stay frozen and shared.
"""
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import create_modcl, modcl_cfgs

__all__ = []

default_cfgs = generate_default_cfgs({
    **modcl_cfgs('vit_tiny_patch16_224'),
    **modcl_cfgs('vit_small_patch16_224'),
})


@register_model
def modcl_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-Tiny (ViT-Ti/16), per-task weight modulation."""
    return create_modcl('modcl_vit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def modcl_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-Small (ViT-S/16), per-task weight modulation."""
    return create_modcl('modcl_vit_small_patch16_224', pretrained, **kwargs)
