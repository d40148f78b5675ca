"""MobileNetV2 with Adaptive Weight Modulation for continual learning, registered in timm as ``modcl_mobilenetv2_*``.

Paper: "Adaptive Weight Modulation for Continual Learning" - https://arxiv.org/abs/2311.15276

A frozen pretrained MobileNetV2 (timm's own implementation and builder) learns a sequence of tasks; each task owns a
low-resolution multiplicative modulator per convolution, its BatchNorm running statistics and its head. Nothing a
task depends on is ever changed by another task, so old tasks keep bit-identical outputs.

    import timm, timm_modcl
    model = timm.create_model('modcl_mobilenetv2_100', pretrained=True)
    model.add_task('flowers', num_classes=102)   # becomes the active task
    ...train model.parameters()...
    model.set_task('base')                       # the ImageNet task, exactly as the pretrained model
"""
from collections import OrderedDict
from pathlib import Path
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models._features_fx import register_notrace_module
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures

from .adapter import AdapterMixin
from .errors import StateDictError
from .hub import HubMixin, pull_tasks
from .layer import ModulatedConv2d
from .task import TaskMixin

__all__ = ['ModCLMobileNetV2', 'ModCLMobileNetV2Features', 'checkpoint_filter_fn']

# The modulated conv is a leaf for torch.fx feature extraction: its caching is Python-side logic.
register_notrace_module(ModulatedConv2d)


class ModCLMobileNetV2(HubMixin, AdapterMixin, TaskMixin, EfficientNet):
    """timm's MobileNetV2 (``EfficientNet`` class) with a frozen backbone and per-task modulation.

    Takes the same arguments as ``timm.models.efficientnet.EfficientNet``. ``num_classes`` sizes the head of the
    ``base`` task (the one a pretrained checkpoint comes with); tasks added later have their own heads.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tasks()

    def export_task(self, name: Optional[str] = None) -> EfficientNet:
        """A plain timm ``mobilenetv2_*`` model computing one task (default: the active one).

        The task's modulation is folded into ordinary conv weights, its BN statistics become the BN buffers and its
        head becomes the classifier: the result needs no timm_modcl and gives the same outputs (up to float
        rounding). The copy is independent of this model.

        Raises:
            TaskNotFoundError: if there is no such task.
        """
        import timm  # local: timm.create_model imports the registry, which imports this module

        task = self._task(self._active if name is None else name)
        arch = self.pretrained_cfg.get('architecture', 'modcl_mobilenetv2_100').replace('modcl_', '', 1)
        ref = next(iter(self._conv_layers.values())).weight
        plain = timm.create_model(
            arch, pretrained=False, num_classes=task.num_classes, in_chans=self.in_chans,
            drop_rate=self.drop_rate, global_pool=self.global_pool.pool_type,
        ).to(device=ref.device, dtype=ref.dtype)
        sd: Dict[str, torch.Tensor] = OrderedDict()
        with torch.no_grad():
            for layer, conv in self._conv_layers.items():
                m = task.modulators.get(layer)
                sd[f'{layer}.weight'] = conv.weight if m is None else conv.modulated_weight(m, task.sign)
                if conv.bias is not None:
                    sd[f'{layer}.bias'] = conv.bias
            for layer, bn in self._bn_layers.items():
                sd[f'{layer}.weight'] = bn.weight
                sd[f'{layer}.bias'] = bn.bias
                for k, v in task.bn_stats[layer].items():
                    sd[f'{layer}.{k}'] = v
            for k, v in task.head.state_dict().items():
                sd[f'classifier.{k}'] = v
        plain.load_state_dict(sd, strict=True)
        plain.pretrained_cfg = dict(plain.pretrained_cfg, modcl_task=task.name)
        return plain.train(self.training)


class ModCLMobileNetV2Features(HubMixin, AdapterMixin, TaskMixin, EfficientNetFeatures):
    """Feature-extraction variant (``features_only=True``): per-task modulation and BN statistics, no heads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tasks()


def _module_groups(state_dict: Dict[str, torch.Tensor]) -> 'OrderedDict[str, Dict[str, torch.Tensor]]':
    groups: 'OrderedDict[str, Dict[str, torch.Tensor]]' = OrderedDict()
    for k, v in state_dict.items():
        module, _, leaf = k.rpartition('.')
        groups.setdefault(module, {})[leaf] = v
    return groups


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a MobileNetV2 checkpoint to a modcl model.

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
                   if isinstance(m, (ModulatedConv2d, nn.modules.batchnorm._BatchNorm))]
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
    if hasattr(model, 'classifier'):
        for k, v in model.classifier.state_dict().items():
            sd.setdefault(f'classifier.{k}', v)
    return sd


def _gen_modcl_mobilenet_v2(
        variant: str, channel_multiplier: float = 1.0, depth_multiplier: float = 1.0, pretrained: bool = False,
        **kwargs,
) -> ModCLMobileNetV2:
    """MobileNetV2 block definition as timm's ``_gen_mobilenet_v2``, built with the modcl classes."""
    arch_def = [
        ['ds_r1_k3_s1_c16'],
        ['ir_r2_k3_s2_e6_c24'],
        ['ir_r3_k3_s2_e6_c32'],
        ['ir_r4_k3_s2_e6_c64'],
        ['ir_r3_k3_s1_e6_c96'],
        ['ir_r3_k3_s2_e6_c160'],
        ['ir_r1_k3_s1_e6_c320'],
    ]
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def, depth_multiplier=depth_multiplier),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        **kwargs,
    )
    return _create_modcl(variant, pretrained, **model_kwargs)


def _load_adapters(model: ModCLMobileNetV2, adapters, **kwargs) -> None:
    """``adapters=`` of ``timm.create_model``: an adapter folder, one adapter file, or a Hub repo id."""
    path = Path(adapters)
    if path.is_dir():
        model.load_tasks(path, **kwargs)
    elif path.is_file():
        model.load_task(path, **kwargs)
    else:
        pull_tasks(model, str(adapters), **kwargs)


def _create_modcl(variant: str, pretrained: bool = False, **kwargs) -> ModCLMobileNetV2:
    """Build a modcl model with timm's builder; ``adapters=`` (folder, file or Hub repo id) adds saved tasks and
    ``adapter_kwargs=`` passes options (``names``, ``revision``, ``token``, ...) to the loader."""
    adapters = kwargs.pop('adapters', None)
    adapter_kwargs = kwargs.pop('adapter_kwargs', None) or {}
    model_cls = ModCLMobileNetV2
    kwargs_filter = None
    features_only = kwargs.pop('features_only', False)
    if features_only:
        model_cls = ModCLMobileNetV2Features
        kwargs_filter = ('num_classes', 'num_features', 'head_conv', 'global_pool')
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=not features_only,
        kwargs_filter=kwargs_filter,
        **kwargs,
    )
    if features_only:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    if adapters is not None:
        _load_adapters(model, adapters, **adapter_kwargs)
    return model


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        'paper_ids': 'arXiv:2311.15276', 'paper_name': 'Adaptive Weight Modulation for Continual Learning',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'modcl_mobilenetv2_050.lamb_in1k': _cfg(hf_hub_id='timm/mobilenetv2_050.lamb_in1k', interpolation='bicubic'),
    'modcl_mobilenetv2_075.untrained': _cfg(),
    'modcl_mobilenetv2_100.ra_in1k': _cfg(hf_hub_id='timm/mobilenetv2_100.ra_in1k'),
    # torchvision's ImageNet weights (the ones the paper used), remapped by checkpoint_filter_fn
    'modcl_mobilenetv2_100.tv_in1k': _cfg(
        url='https://download.pytorch.org/models/mobilenet_v2-b0353104.pth', interpolation='bilinear',
        license='bsd-3-clause', origin_url='https://github.com/pytorch/vision'),
    'modcl_mobilenetv2_100.tv2_in1k': _cfg(
        url='https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth', interpolation='bilinear',
        crop_pct=0.965, license='bsd-3-clause', origin_url='https://github.com/pytorch/vision'),
    'modcl_mobilenetv2_140.ra_in1k': _cfg(hf_hub_id='timm/mobilenetv2_140.ra_in1k'),
})


@register_model
def modcl_mobilenetv2_050(pretrained: bool = False, **kwargs) -> ModCLMobileNetV2:
    """MobileNet V2 w/ 0.5 channel multiplier, per-task weight modulation."""
    return _gen_modcl_mobilenet_v2('modcl_mobilenetv2_050', 0.5, pretrained=pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_075(pretrained: bool = False, **kwargs) -> ModCLMobileNetV2:
    """MobileNet V2 w/ 0.75 channel multiplier, per-task weight modulation."""
    return _gen_modcl_mobilenet_v2('modcl_mobilenetv2_075', 0.75, pretrained=pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_100(pretrained: bool = False, **kwargs) -> ModCLMobileNetV2:
    """MobileNet V2 w/ 1.0 channel multiplier, per-task weight modulation."""
    return _gen_modcl_mobilenet_v2('modcl_mobilenetv2_100', 1.0, pretrained=pretrained, **kwargs)


@register_model
def modcl_mobilenetv2_140(pretrained: bool = False, **kwargs) -> ModCLMobileNetV2:
    """MobileNet V2 w/ 1.4 channel multiplier, per-task weight modulation."""
    return _gen_modcl_mobilenet_v2('modcl_mobilenetv2_140', 1.4, pretrained=pretrained, **kwargs)
