"""MobileNetV2 and EfficientNet with Adaptive Weight Modulation for continual learning (``modcl_*``).

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

Built by timm's own ``efficientnet`` builders (same blocks, same pretrained weights and tags), then made task-aware
by ``timm_modcl.modulate``: a frozen backbone, and per task a low-resolution multiplicative modulator per conv, its
BatchNorm running statistics and its head. ``tf_`` variants use timm's ``Conv2dSame`` (TensorFlow 'SAME' padding),
which is modulated like any conv. MobileNetV2 also loads torchvision's ImageNet weights (the paper's), remapped by
``checkpoint_filter_fn``.

    import timm, timm_modcl
    model = timm.create_model('modcl_mobilenetv2_100', pretrained=True)
    model.add_task('flowers', num_classes=102)   # becomes the active task
    ...train model.parameters()...
    model.set_task('base')                       # the ImageNet task, exactly as the pretrained model
"""
from collections import OrderedDict
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..errors import StateDictError
from ._builder import create_modcl, modcl_cfgs

__all__ = ['checkpoint_filter_fn']


def _module_groups(state_dict: Dict[str, torch.Tensor]) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
    groups: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
    for k, v in state_dict.items():
        module, _, leaf = k.rpartition('.')
        groups.setdefault(module, {})[leaf] = v
    return groups


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a MobileNetV2 checkpoint to timm's layout.

    Accepts timm's layout (``conv_stem``, ``blocks.*``, ...) and torchvision's (``features.N.*``, including the older
    ``features.N.conv.K`` variant). torchvision-layout conv and BN modules are matched to the model's in order,
    with every shape checked. A checkpoint without classifier keeps the model's initialised head.

    Raises:
        StateDictError: if a torchvision-layout checkpoint does not map onto the model.
    """
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith('features.') for k in sd):
        src = _module_groups({k: v for k, v in sd.items() if k.startswith('features.')})
        targets = [n for n, m in model.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
        if len(src) != len(targets):
            raise StateDictError(
                f'torchvision-layout checkpoint has {len(src)} conv/BN modules, the model {len(targets)}: '
                f'is it a MobileNetV2 of this width?')
        out: Dict[str, torch.Tensor] = OrderedDict()
        for (src_name, leaves), tgt_name in zip(src.items(), targets):
            tgt = model.get_submodule(tgt_name)
            for leaf, v in leaves.items():
                ref = getattr(tgt, leaf, None)
                if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != tuple(v.shape):
                    raise StateDictError(
                        f'torchvision-layout tensor {src_name}.{leaf} {tuple(v.shape)} does not fit '
                        f'{tgt_name}.{leaf} {None if ref is None else tuple(ref.shape)}')
                out[f'{tgt_name}.{leaf}'] = v
        for k in ('weight', 'bias'):  # torchvision: classifier = Sequential(Dropout, Linear)
            for src_key in (f'classifier.1.{k}', f'classifier.{k}'):
                if src_key in sd:
                    out[f'classifier.{k}'] = sd[src_key]
                    break
        sd = out
    classifier = getattr(model, 'classifier', None)
    if isinstance(classifier, nn.Module):
        for k, v in classifier.state_dict().items():
            sd.setdefault(f'classifier.{k}', v)
    return sd


def _create(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    filter_fn = checkpoint_filter_fn if variant.startswith('modcl_mobilenetv2') else None
    return create_modcl(variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)


def _tv_cfg(url: str, **kwargs) -> Dict[str, Any]:
    return dict(dict(url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                     interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     first_conv='conv_stem', classifier='classifier', license='bsd-3-clause',
                     origin_url='https://github.com/pytorch/vision'), **kwargs)


default_cfgs = generate_default_cfgs({
    **modcl_cfgs('mobilenetv2_050'),
    **modcl_cfgs('mobilenetv2_075'),
    # torchvision's ImageNet weights (the ones the paper used), remapped by checkpoint_filter_fn
    **modcl_cfgs('mobilenetv2_100', tv_in1k=_tv_cfg('https://download.pytorch.org/models/mobilenet_v2-b0353104.pth'),
                 tv2_in1k=_tv_cfg('https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth', crop_pct=0.965)),
    **modcl_cfgs('mobilenetv2_140'),
    **modcl_cfgs('efficientnet_b0'),
    **modcl_cfgs('tf_efficientnet_b0'),
})


@register_model
def modcl_mobilenetv2_050(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet V2 w/ 0.5 channel multiplier, per-task weight modulation."""
    return _create('modcl_mobilenetv2_050', pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_075(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet V2 w/ 0.75 channel multiplier, per-task weight modulation."""
    return _create('modcl_mobilenetv2_075', pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet V2 w/ 1.0 channel multiplier, per-task weight modulation."""
    return _create('modcl_mobilenetv2_100', pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_140(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet V2 w/ 1.4 channel multiplier, per-task weight modulation."""
    return _create('modcl_mobilenetv2_140', pretrained, **kwargs)


@register_model
def modcl_efficientnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0, per-task weight modulation."""
    return _create('modcl_efficientnet_b0', pretrained, **kwargs)


@register_model
def modcl_tf_efficientnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 ported from TensorFlow ('SAME' padding convs), per-task weight modulation."""
    return _create('modcl_tf_efficientnet_b0', pretrained, **kwargs)
