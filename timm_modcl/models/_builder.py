"""Shared builder of the ``modcl_*`` models: timm's own builder for the plain architecture, then ``modulate``."""
import dataclasses
import re
from pathlib import Path
from typing import Any, Dict

import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._registry import _model_default_cfgs, model_entrypoint

from ..errors import AdapterError
from ..model import modulate

__all__ = ['create_modcl', 'modcl_cfgs', 'PAPER']

#: Pretrained-config fields every ``modcl_*`` model adds to the plain model's.
PAPER = dict(paper_ids='arXiv:2311.15276', paper_name='Adaptive Weight Modulation for Continual Learning')
_REPO_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*')


def modcl_cfgs(plain: str, **overrides: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Pretrained configs of ``modcl_<plain>``: every tag timm registers for ``<plain>`` (same weights, default tag
    first), with the paper fields added; ``overrides`` adds or changes tags (``{tag: cfg dict}``)."""
    out: Dict[str, Dict[str, Any]] = {}
    for tag in _model_default_cfgs[plain].tags:
        cfg = dataclasses.asdict(get_pretrained_cfg(f'{plain}.{tag}'))
        cfg.pop('architecture', None)
        cfg.pop('tag', None)
        out[f'modcl_{plain}.{tag}'] = dict(cfg, **PAPER)
    for tag, cfg in overrides.items():
        out[f'modcl_{plain}.{tag}'] = dict(cfg, **PAPER)
    return out


def _load_adapters(model: nn.Module, adapters, **kwargs) -> None:
    """``adapters=`` of ``timm.create_model``: an adapter folder, one adapter file, or a Hub repo id."""
    from ..hub import pull_tasks
    path = Path(adapters)
    if path.is_dir():
        model.load_tasks(path, **kwargs)
    elif path.exists():
        model.load_task(path, **kwargs)
    elif isinstance(adapters, str) and _REPO_ID.fullmatch(adapters) and '..' not in adapters:
        pull_tasks(model, adapters, **kwargs)
    else:
        raise AdapterError(f'adapters={str(adapters)!r}: no such file or folder, and not a Hub repo id '
                           f'("namespace/name")')


def create_modcl(variant: str, pretrained: bool = False, pretrained_filter_fn=None, **kwargs) -> nn.Module:
    """Build ``modcl_<name>`` with timm's own entrypoint and builder for ``<name>`` (its pretrained weights, features
    modes, device/dtype handling), with ``modcl_<name>``'s pretrained config, then make it task-aware.

    Extra keyword arguments: ``adapters=`` (folder, file or Hub repo id) adds saved tasks, ``adapter_kwargs=``
    passes options (``names``, ``revision``, ``token``, ...) to the loader, ``freeze=`` is passed to ``modulate``.
    """
    plain = variant[len('modcl_'):]
    adapters = kwargs.pop('adapters', None)
    adapter_kwargs = kwargs.pop('adapter_kwargs', None) or {}
    freeze = kwargs.pop('freeze', ())
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None))
    if pretrained_filter_fn is not None:
        kwargs['pretrained_filter_fn'] = pretrained_filter_fn
    model = model_entrypoint(plain)(pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    model = modulate(model, freeze=freeze)
    if adapters is not None:
        _load_adapters(model, adapters, **adapter_kwargs)
    return model
