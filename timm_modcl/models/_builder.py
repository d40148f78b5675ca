"""Shared builder of the ``modcl_*`` models: timm's own builder for the plain architecture, then ``modulate``."""
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Dict

import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._registry import _model_default_cfgs, model_entrypoint

from .._rng import keep_rng_on_error
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


def _adapters_kind(adapters) -> str:
    """What ``adapters=`` names, checked before the model is built: ``'folder'``, ``'file'`` or ``'hub'``.

    Raises:
        AdapterError: not a path or repo id, or a path that does not exist and is not a Hub repo id either.
    """
    if not isinstance(adapters, (str, os.PathLike)):
        raise AdapterError(f'adapters= must be an adapter folder, an adapter file or a Hub repo id, got '
                           f'{type(adapters).__name__}')
    path = Path(adapters)
    if path.is_dir():
        return 'folder'
    if path.exists():
        return 'file'
    if isinstance(adapters, str) and _REPO_ID.fullmatch(adapters) and '..' not in adapters:
        return 'hub'
    raise AdapterError(f'adapters={str(adapters)!r}: no such file or folder, and not a Hub repo id '
                       f'("namespace/name")')


def _load_adapters(model: nn.Module, adapters, **kwargs) -> None:
    """``adapters=`` of ``timm.create_model``: an adapter folder, one adapter file, or a Hub repo id."""
    from ..hub import pull_tasks
    kind = _adapters_kind(adapters)
    if kind == 'folder':
        model.load_tasks(Path(adapters), **kwargs)
    elif kind == 'file':
        model.load_task(Path(adapters), **kwargs)
    else:
        pull_tasks(model, adapters, **kwargs)


def create_modcl(variant: str, pretrained: bool = False, pretrained_filter_fn=None, **kwargs) -> nn.Module:
    """Build ``modcl_<name>`` with timm's own entrypoint and builder for ``<name>`` (its pretrained weights, features
    modes, device/dtype handling), with ``modcl_<name>``'s pretrained config, then make it task-aware.

    Extra keyword arguments: ``adapters=`` (folder, file or Hub repo id) adds saved tasks, ``adapter_kwargs=``
    passes options (``names``, ``revision``, ``token``, ...) to the loader, ``freeze=`` is passed to ``modulate``.

    Raises:
        AdapterError: ``adapters=`` names nothing that exists (checked before the model is built), or its adapters
            do not load (``AdapterFormatError``, ``FingerprintMismatchError``, ``HubError``, ...). On any error the
            global random states (torch, NumPy, Python) are as they were.
    """
    plain = variant[len('modcl_'):]
    adapters = kwargs.pop('adapters', None)
    adapter_kwargs = kwargs.pop('adapter_kwargs', None) or {}
    freeze = kwargs.pop('freeze', ())
    if adapters is not None:
        _adapters_kind(adapters)  # a bad argument fails before the weights are initialised from the global RNG
    with keep_rng_on_error():  # an error after that (a bad adapter, the Hub) puts the random states back
        return _build(variant, plain, pretrained, pretrained_filter_fn, adapters, adapter_kwargs, freeze, kwargs)


def _build(variant: str, plain: str, pretrained: bool, pretrained_filter_fn, adapters, adapter_kwargs, freeze,
           kwargs: Dict[str, Any]) -> nn.Module:
    """The body of ``create_modcl``: timm's builder, ``modulate``, then the adapters."""
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
