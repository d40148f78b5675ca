"""``modulate(model)``: make any timm model task-aware, with zero forgetting by construction.

    import timm, timm_modcl
    model = timm_modcl.modulate(timm.create_model('resnet50', pretrained=True))
    model.add_task('flowers', num_classes=102)      # new modulators, norm state and head; now active
    ...train model.parameters()...                   # every task's tensors; only the active task's require grad
    model.set_task('base')                           # the pretrained model, bit-identical

The model keeps its class's behaviour (forward, ``forward_features``, ``forward_intermediates``, grad checkpointing,
feature extraction): its class is swapped in place for a subclass that mixes in the task lifecycle
(``core.ModCLMixin``), adapter files (``adapter.AdapterMixin``), the Hub (``hub.HubMixin``) and multi-task serving
(``serving.ServingMixin``).
"""
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .adapter import AdapterMixin
from .core import ModCLMixin, attach
from .errors import UnsupportedModelError
from .hub import HubMixin
from .serving import ServingMixin

__all__ = ['modulate', 'modcl_class', 'is_modcl_model']

_MODEL_CLASSES: Dict[type, type] = {}
# timm methods wrapped (when the class has them) to keep the task state in step with the structure or the names
_STRUCTURAL = ('reset_classifier', 'set_input_size', 'prune_intermediate_layers', 'no_weight_decay', 'group_matcher')


def _new_model(base: type) -> nn.Module:
    """Unpickling helper: an empty instance of the task-aware subclass of ``base``."""
    return object.__new__(modcl_class(base))


def _reduce_ex(self, protocol):
    return _new_model, (self._modcl.plain_class,), self.__dict__


def modcl_class(base: type) -> type:
    """The (cached) task-aware subclass of a timm model class, e.g. ``ModCLEfficientNet`` for ``EfficientNet``."""
    if issubclass(base, ModCLMixin):
        return base
    cls = _MODEL_CLASSES.get(base)
    if cls is None:
        ns = {'__module__': __name__, '__reduce_ex__': _reduce_ex,
              '__doc__': f'timm {base.__name__} with per-task weight modulation (timm_modcl).'}
        for name in _STRUCTURAL + ('forward_head',):
            if callable(getattr(base, name, None)):
                ns[name] = getattr(ModCLMixin, f'_modcl_{name}')
        cls = type(f'ModCL{base.__name__}', (HubMixin, AdapterMixin, ServingMixin, ModCLMixin, base), ns)
        _MODEL_CLASSES[base] = cls
    return cls


def is_modcl_model(model) -> bool:
    """Whether ``model`` is task-aware (made by ``modulate`` or a ``modcl_*`` model)."""
    return isinstance(model, ModCLMixin)


def _classifier_path(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    classifier = cfg.get('classifier') if isinstance(cfg, dict) else None
    if not classifier:
        return None
    if isinstance(classifier, (list, tuple)):
        if len(classifier) != 1:
            raise UnsupportedModelError(
                f'the model has {len(classifier)} classifier heads {tuple(classifier)} (a distilled model?); '
                f'timm_modcl gives each task one head: pass head= with the one to use')
        classifier = classifier[0]
    try:
        model.get_submodule(classifier)
    except AttributeError:
        return None  # e.g. a feature extractor built from a model with a classifier
    return classifier


def _known_classifiers(model: nn.Module) -> List[nn.Module]:
    """The model's own classifier module(s): timm's ``pretrained_cfg['classifier']`` paths and ``get_classifier()``."""
    out: List[nn.Module] = []
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    paths = cfg.get('classifier') if isinstance(cfg, dict) else None
    for path in ((paths,) if isinstance(paths, str) else tuple(paths or ())):
        try:
            out.append(model.get_submodule(path))
        except AttributeError:
            pass
    get = getattr(model, 'get_classifier', None)
    if callable(get):
        try:
            found = get()
        except Exception:  # noqa: BLE001 - a model whose get_classifier() fails just has no known classifier
            found = None
        for m in (found if isinstance(found, (tuple, list)) else (found,)):
            if isinstance(m, nn.Module):
                out.append(m)
    return out


def _check_plain_module(model: Any) -> None:
    """Refuse what ``modulate`` cannot make task-aware in place: non-modules, wrappers, compiled and scripted models."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f'modulate() takes a torch module, got {type(model).__name__}')
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            'modulate() cannot change a TorchScript module (torch.jit.script / trace): modulate the plain model '
            'first; torch.jit.script(modulated_model) then scripts its active task')
    if isinstance(getattr(model, '_orig_mod', None), nn.Module):
        raise UnsupportedModelError(
            f'modulate() cannot change a torch.compile()d model ({type(model).__name__}): modulate the plain model '
            f'first (here model._orig_mod), then compile the result')
    wrapped = getattr(model, 'module', None)
    if isinstance(wrapped, nn.Module) and type(model).__name__ in ('DistributedDataParallel', 'DataParallel'):
        raise UnsupportedModelError(f'modulate() the model itself, not its {type(model).__name__} wrapper')


def _check_head_path(model: nn.Module, head: str) -> None:
    """An explicit ``head=`` must name a module, and, when the model knows its classifier, be that classifier: timm's
    ``reset_classifier`` makes each task's head, so any other module would stay shared by every task."""
    if not isinstance(head, str):
        raise UnsupportedModelError(f'head must be a module path (str), \'auto\' or None, got {type(head).__name__}')
    try:
        module = model.get_submodule(head)
    except AttributeError:
        raise UnsupportedModelError(f'the model has no module {head!r} to use as head') from None
    known = _known_classifiers(model)
    if known and not any(module is k for k in known):
        names = {n for n, m in model.named_modules() if any(m is k for k in known)}
        raise UnsupportedModelError(
            f'{head!r} is not the model\'s classifier ({", ".join(map(repr, sorted(names))) or "unnamed"}): new tasks '
            f'get their head from the model\'s reset_classifier(), so {head!r} would stay shared by every task and '
            f'training one would change the others; pass head=\'auto\' (the classifier) or head=None (no per-task '
            f'head)')


def modulate(
        model: nn.Module,
        *,
        head: Optional[str] = 'auto',
        freeze: Sequence[str] = (),
        cache_bytes: Optional[int] = None,
) -> nn.Module:
    """Make a timm model task-aware in place (and return it): frozen backbone, per-task modulation and state.

    Every conv and linear layer (except the head) gets a per-task modulator slot; BatchNorm layers get per-task
    running statistics, LayerNorm / GroupNorm / RmsNorm layers a per-task affine; the head (found from timm's
    ``pretrained_cfg['classifier']``) is per task; every other parameter is frozen and shared. The model's current
    weights become the ``base`` task, which computes exactly what the model computed before.

    Args:
        model: A timm model (``timm.create_model(...)``, pretrained or not, ``features_only`` too) or any module
            built from the layer kinds above.
        head: Dotted path of the classifier; ``'auto'`` (default) reads timm's ``pretrained_cfg``; ``None``: no head.
            An explicit path must be the model's classifier when the model names one (other models: any layer).
        freeze: Names or fnmatch patterns of other parameters to keep frozen and shared, for module types timm_modcl
            does not know (it raises instead of leaving them trainable).
        cache_bytes: Memory limit of the effective-weight cache (default ``MODCL_WEIGHT_CACHE_BYTES`` or 256 MiB).

    Returns:
        The same model object, now task-aware (``add_task``, ``set_task``, ``save_task``, ``push_tasks_to_hub``, ...).

    Raises:
        UnsupportedModelError: a parameter of an unknown module type would stay shared and trainable, the
            classifier is not a single Linear layer, ``head`` names a module that is not the model's classifier
            (timm's ``pretrained_cfg['classifier']`` / ``get_classifier()``), or ``model`` is a torch.compile()d,
            TorchScript or DDP-wrapped model. The model is unchanged then.
    """
    if isinstance(model, ModCLMixin):
        return model
    _check_plain_module(model)
    if head == 'auto':
        head = _classifier_path(model)
    elif head is not None:
        _check_head_path(model, head)
    base = type(model)
    model.__class__ = modcl_class(base)
    try:
        attach(model, head=head, base=base, freeze=tuple(freeze), cache_bytes=cache_bytes)
    except BaseException:
        model.__class__ = base
        model.__dict__.pop('_modcl', None)
        raise
    return model
