"""The scorers' names and defaults, their per-model cache counters, and the base features they score: the fixed
random projection, checked arguments, features of the pre-logits or of chosen layers (optionally of a downscaled
copy), and one pass over a task's data (``for_each_base_feature``).
"""

import math
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data import check_labels, unpack_batch
from ..errors import DataError, ModCLError, TaskError, UnsupportedModelError
from ..task import BASE_TASK


#: Scorers of this module (both read the ``ranpac_*`` statistics).
BASE_SCORERS = ('ranpac', 'ncm')
#: Names of the statistics in ``TaskState.stats`` (``stats.<name>`` tensors in adapter files).
RANPAC_STATS = ('ranpac_gram', 'ranpac_mean', 'ranpac_count', 'ranpac_seed', 'ranpac_ridge')
#: Optional statistics: ``ranpac_layers``, the layers the features come from (absent: the pre-logits features);
#: ``ranpac_input_size``, the side in px the scorer's copy of each batch is resized to (absent: no resize).
RANPAC_OPTIONAL_STATS = ('ranpac_layers', 'ranpac_input_size')
#: Size ``M`` of the random projection (chosen on validation data by ``benchmarks/taskid.py``).
DEFAULT_RANPAC_DIM = 1024
#: Relative ridge regulariser ``lambda / (trace(G) / M)`` (chosen on validation data by ``benchmarks/taskid.py``).
DEFAULT_RANPAC_RIDGE = 100.0
#: Seed of the random projection.
DEFAULT_RANPAC_SEED = 0
#: Relative ridges tried by ``select_ridge``.
RIDGE_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
#: Layer index of the pre-logits features in ``layers`` (the other indices are timm ``forward_intermediates``
#: indices with ``extra_blocks=True``: 0 the stem, ``i`` the output of block stage ``i - 1``).
PRE_LOGITS = -1
#: Layers the random features are made from by default (``None``: the pre-logits features only).
DEFAULT_RANPAC_LAYERS: Optional[Tuple[int, ...]] = None
_MAX_LAYER = 255
_MIN_INPUT_SIZE, _MAX_INPUT_SIZE = 8, 2048   # sizes up to 2048 are exact integers in float16
_MAX_SEED = 256          # seeds below this are exact integers in float16 and bfloat16
_MAX_DIM = 16384
_CACHE_ENTRIES = 8       # decoded candidate sets kept per model


# ---------------------------------------------------------------------------------------------------- caches
_counters: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def count_cache(model, what: str) -> None:
    """Count a cache hit or miss of ``model`` (``what``: e.g. ``'ranpac_hits'``); see ``cache_info``."""
    with _lock:
        c = _counters.setdefault(model, {})
        c[what] = c.get(what, 0) + 1


def cache_info(model) -> Dict[str, int]:
    """Hits and misses of the scorer caches of ``model`` since it was created: ``ranpac_hits`` / ``ranpac_misses``
    (decoded ridge or class-mean weights per candidate set) and ``prototype_hits`` / ``prototype_misses`` (prepared
    Gaussians per task). A miss builds (and validates) the factors again: after a statistics change or a
    ``model.to(...)``."""
    with _lock:
        c = dict(_counters.get(model, {}))
    return {k: c.get(k, 0) for k in ('ranpac_hits', 'ranpac_misses', 'prototype_hits', 'prototype_misses')}


def score_dtype(model) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype the scorers' factors and scores use for ``model``: the model's device; float64 for a float64
    model, else float32 (half-precision factors would lose the scores' resolution)."""
    return model.backbone_device, (torch.float64 if model.backbone_dtype == torch.float64 else torch.float32)


# ---------------------------------------------------------------------------------------------------- features
_projections: 'OrderedDict[Tuple, torch.Tensor]' = OrderedDict()
_lock = threading.Lock()


def _projection(in_dim: int, dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``(in_dim, dim)`` standard normal projection of ``seed`` (drawn on the CPU, so identical everywhere)."""
    key = (in_dim, dim, seed, str(device), dtype)
    with _lock:
        w = _projections.get(key)
        if w is not None:
            _projections.move_to_end(key)
            return w
    w = torch.randn(in_dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    w = w.to(device, dtype)
    with _lock:
        _projections[key] = w
        while len(_projections) > 8:
            _projections.popitem(last=False)
    return w


def random_features(features: torch.Tensor, dim: int = DEFAULT_RANPAC_DIM,
                    seed: int = DEFAULT_RANPAC_SEED) -> torch.Tensor:
    """``relu(W^T f / |f|)``: the ``(N, dim)`` random features of ``(N, D)`` base features, in their device/dtype.

    Raises:
        DataError: ``features`` is not a 2-D floating-point tensor.
        TaskError: bad ``dim`` or ``seed``.
    """
    _check_dim_seed(dim, seed)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise DataError('features must be a 2-D floating-point tensor (N, D)')
    f = torch.nn.functional.normalize(features, dim=1)
    return torch.relu(f @ _projection(f.shape[1], dim, seed, f.device, f.dtype))


def _check_dim_seed(dim: Any, seed: Any) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_DIM:
        raise TaskError(f'dim must be an integer in [1, {_MAX_DIM}], got {dim!r}')
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise TaskError(f'seed must be an integer in [0, {_MAX_SEED}), got {seed!r}')


def _check_ridge(ridge: Any) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < math.inf:
        raise TaskError(f'ridge must be a positive finite number, got {ridge!r}')


# ---------------------------------------------------------------------------------------------------- data
def _batches(data, batch_size: int, num_workers: int, what: str = 'data') -> Iterable:
    """A DataLoader over ``data``: a Dataset or DataLoader of ``(image, label)``, or a pair of tensors."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if data[0].shape[:1] != data[1].shape[:1]:
            raise DataError(f'{what}: {data[0].shape[0]} images but {data[1].shape[0]} labels')
        data = TensorDataset(*data)
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise DataError(f'{what} must be a torch Dataset or DataLoader of (image, label), or a pair of tensors, '
                        f'got {type(data).__name__}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f'batch_size must be a positive integer, got {batch_size!r}')
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def check_feature_model(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless ``model`` has timm's ``forward_features`` / ``forward_head``."""
    if not (callable(getattr(model, 'forward_features', None)) and callable(getattr(model, 'forward_head', None))):
        raise UnsupportedModelError(
            f'{type(model).__name__} has no forward_features / forward_head(pre_logits=True): task statistics need '
            f'the pre-logits features of a timm classification model')


def check_layers(layers: Any) -> Optional[Tuple[int, ...]]:
    """``layers`` as a sorted tuple of distinct layer indices (``None``: the pre-logits features only).

    Raises:
        TaskError: not ``None`` nor a non-empty list of integers in ``[-1, 255]``.
    """
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TaskError(f'layers must be None or a list of layer indices, got {type(layers).__name__}')
    out = list(layers)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or not PRE_LOGITS <= v <= _MAX_LAYER
                      for v in out):
        raise TaskError(f'layers must be a non-empty list of integers in [{PRE_LOGITS}, {_MAX_LAYER}] '
                        f'({PRE_LOGITS}: the pre-logits features), got {layers!r}')
    out = sorted(set(out), key=lambda v: (v == PRE_LOGITS, v))
    return None if out == [PRE_LOGITS] else tuple(out)


def check_input_size(input_size: Any) -> Optional[int]:
    """``input_size`` checked: ``None`` (no resize) or the scorer's input side in px.

    Raises:
        TaskError: not ``None`` nor an integer in ``[8, 2048]``.
    """
    if input_size is None:
        return None
    if isinstance(input_size, bool) or not isinstance(input_size, int) or \
            not _MIN_INPUT_SIZE <= input_size <= _MAX_INPUT_SIZE:
        raise TaskError(f'input_size must be None or an integer in [{_MIN_INPUT_SIZE}, {_MAX_INPUT_SIZE}] (px), '
                        f'got {input_size!r}')
    return input_size


def scaled_input(x: torch.Tensor, input_size: Optional[int]) -> torch.Tensor:
    """The scorer's copy of a batch ``(N, C, H, W)``: its shorter side resized to ``input_size`` px, keeping the
    aspect ratio (bilinear, antialiased when downscaling), in ``x``'s dtype; ``x`` itself when ``input_size`` is
    ``None`` or already the size."""
    if input_size is None or x.ndim != 4:
        return x
    h, w = x.shape[-2:]
    if min(h, w) == input_size:
        return x
    size = (input_size, max(1, round(w * input_size / h))) if h <= w else \
        (max(1, round(h * input_size / w)), input_size)
    y = torch.nn.functional.interpolate(x.float(), size=size, mode='bilinear', align_corners=False,
                                        antialias=input_size < min(h, w))
    return y.to(x.dtype) if x.is_floating_point() else y


def base_features(model, x: torch.Tensor, layers: Optional[Sequence[int]] = None,
                  input_size: Optional[int] = None) -> torch.Tensor:
    """Features of the frozen base model the scorers use, for a model already in serving mode under the ``base``
    task: ``layers=None``, the pre-logits features ``(N, D)``; else each layer's output globally average-pooled and
    L2-normalised, concatenated in ``layers`` order. Layers are timm ``forward_intermediates(..., extra_blocks=True)``
    indices and ``PRE_LOGITS`` (-1); without the pre-logits layer the forward stops after the deepest layer asked
    for (a truncated base forward: cheaper). ``input_size``: the forward runs on ``scaled_input(x, input_size)``
    (``None``: on ``x``).

    Raises:
        UnsupportedModelError: the model has no ``forward_intermediates`` or not the layers asked for, or does not
            take the resized copy (e.g. a ViT with a fixed input size).
    """
    small = scaled_input(x, input_size)
    if small is x:
        return _layer_features(model, x, layers)
    try:
        return _layer_features(model, small, layers)
    except ModCLError:
        raise
    except (AssertionError, RuntimeError) as e:
        raise UnsupportedModelError(f'{type(model).__name__} cannot take the scorer\'s {tuple(small.shape[-2:])} copy '
                                    f'of the batch (input_size={input_size}): {e}') from None


def pre_logit_features(model, x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` pre-logits features of ``model`` for ``x`` under the current task scope (timm's
    ``forward_head(forward_features(x), pre_logits=True)``).

    Raises:
        UnsupportedModelError: the model does not give ``(N, D)`` features.
    """
    f = model.forward_head(model.forward_features(x), pre_logits=True)
    if not isinstance(f, torch.Tensor) or f.ndim != 2:
        raise UnsupportedModelError(f'forward_head(pre_logits=True) must give (N, D) features, got '
                                    f'{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}')
    return f


def _layer_features(model, x: torch.Tensor, layers: Optional[Sequence[int]]) -> torch.Tensor:
    if layers is None:
        return pre_logit_features(model, x)
    fi = getattr(model, 'forward_intermediates', None)
    if not callable(fi):
        raise UnsupportedModelError(f'{type(model).__name__} has no forward_intermediates: its statistics can only '
                                    f'use the pre-logits features (layers=None)')
    inner = [v for v in layers if v != PRE_LOGITS]
    try:
        if PRE_LOGITS in layers:
            final, maps = fi(x, indices=inner, extra_blocks=True) if inner else (model.forward_features(x), [])
        else:
            final, maps = None, fi(x, indices=inner, intermediates_only=True, stop_early=True, extra_blocks=True)
    except (AssertionError, IndexError, TypeError) as e:
        raise UnsupportedModelError(f'{type(model).__name__} cannot give the features of layers {list(layers)}: '
                                    f'{e}') from None
    by_layer = {v: m.mean((2, 3)) if m.ndim == 4 else m.flatten(1) for v, m in zip(inner, maps)}
    if final is not None:
        by_layer[PRE_LOGITS] = model.forward_head(final, pre_logits=True)
    return torch.cat([torch.nn.functional.normalize(by_layer[v].float(), dim=1) for v in layers], 1)


def check_all_reduce(all_reduce: bool) -> None:
    """``all_reduce=True`` of the statistics functions needs a process group.

    Raises:
        TaskError: without an initialised ``torch.distributed`` group.
    """
    if all_reduce:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise TaskError('all_reduce=True needs an initialised torch.distributed process group')


def for_each_base_feature(model, task: str, data, num_classes: int, fn: Callable[[torch.Tensor, torch.Tensor], None],
                          *, batch_size: int, num_workers: int, progress: bool, desc: str,
                          layers: Optional[Sequence[int]] = None, input_size: Optional[int] = None) -> None:
    """Run the frozen base model (eval, no autograd, per-call ``base`` task) over ``data`` and call ``fn(features,
    labels)`` per batch: what every scorer's statistics are made from (``layers``, ``input_size``: see
    ``base_features``).

    Raises:
        DataError: unusable data, labels out of ``task``'s range, or non-finite features.
        UnsupportedModelError: a model without ``forward_features`` / ``forward_head(pre_logits=True)``.
    """
    from tqdm.auto import tqdm
    check_feature_model(model)
    loader = _batches(data, batch_size, num_workers)
    device, dtype = model.backbone_device, model.backbone_dtype
    with model.inference_scope(BASE_TASK):
        for batch in tqdm(loader, desc=f'{task} {desc}', disable=not progress, leave=False):
            x, y = unpack_batch(batch, 'data')
            check_labels(y, num_classes, task, images=len(x))
            if x.is_floating_point():
                x = x.to(device, dtype)
            f = base_features(model, x, layers, input_size)
            if not torch.isfinite(f).all():
                raise DataError('the backbone gave NaN or Inf features for the data')
            fn(f, y)
