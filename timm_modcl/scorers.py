"""Random-feature scorers for task-agnostic and class-incremental prediction (``'ranpac'``, ``'ncm'``).

    model.compute_task_statistics('flowers', train_data, scorer='ranpac')   # statistics, never images
    pred = model.predict_task_agnostic(x, scorer='ranpac')                  # task (and class with the task's head)
    pred = model.predict_classes(x)                                         # one label space over all tasks' classes

**Features.** Each image's pre-logits features ``f`` of the frozen, unmodulated backbone (the ``base`` task) are
L2-normalised and sent through a fixed random projection followed by a ReLU, ``h = relu(W^T f / |f|)`` with ``W``
``(D, M)`` standard normal drawn from ``torch.Generator().manual_seed(seed)`` on the CPU: every process and every task
with the same ``seed`` and size ``M`` uses the same projection (RanPAC, McDonnell et al., NeurIPS 2023).
``layers=`` (``compute_task_statistics(..., layers=[4, 5])``, stored as ``ranpac_layers``) makes ``f`` from earlier
layers instead: each layer's output globally average-pooled and L2-normalised, concatenated (``base_features``); a
set without the pre-logits layer (-1) stops the base forward after its deepest layer, so scoring costs less than a
full forward. ``input_size=S`` (``compute_task_statistics(..., input_size=112)``, stored as ``ranpac_input_size``)
makes ``f`` from a downscaled copy of each batch (shorter side resized to ``S`` px, bilinear with antialiasing,
``scaled_input``): the base forward then costs about ``(S / H)^2`` of a full-size one, for statistics and scoring alike.

**Statistics per task** (``stats.ranpac_*`` tensors in the task's adapter file): ``ranpac_gram``, the upper triangle
(row-major, ``M (M + 1) / 2`` values) of the mean outer product ``H^T H / n`` of the task's random features;
``ranpac_mean``, the ``(C, M)`` class means of ``h``; ``ranpac_count``, the ``(C,)`` class counts; ``ranpac_seed``,
the projection seed (an integer below 256, exact in every float dtype); ``ranpac_ridge``, the relative ridge
regulariser. They are accumulated in float64 and stored as means, so the values stay near 1 and a float16 adapter
does not overflow. Sums are recovered as ``mean * count``: statistics of the same task from several shards or
processes merge exactly (``merge_ranpac_statistics``, ``all_reduce=True``), and the statistics of tasks learned in
separate processes combine at prediction time by summing, whatever process computed them.

**Decoding.** For a set of candidate tasks, ``G = sum_t n_t G_t`` and ``Q = [S_1 ... S_T]`` (the class sums of all
candidate tasks, one column per class) give the ridge classifier ``B = (G + lambda I)^-1 Q`` over the union of their
classes, ``lambda = ridge * trace(G) / M`` (``ridge``: the geometric mean of the candidates' ``ranpac_ridge``).
The class scores are ``h B``; a task's score is its best class score; the class-incremental prediction is the best
class over all tasks. ``'ncm'`` (nearest class mean) scores classes by the cosine similarity of ``h`` to each class
mean instead. The decoded weights are cached per model and candidate set, on the model's device in float32 (float64
for a float64 model; ``score_dtype``), and recomputed only when a task's statistics change (keyed on each statistics
tensor's identity and in-place version) or the model moves (``cache_info`` counts hits and misses).

Cost of a prediction: one forward of the base task for all candidate tasks together (truncated with ``layers``, on a
downscaled copy with ``input_size``), one ``(N, D) x (D, M)`` and one ``(N, M) x (M, C)`` product (plus, in
``predict_task_agnostic``, one grouped forward for the chosen tasks' heads, or one forward per candidate with
``head_weight > 0``).
"""
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import check_labels, unpack_batch
from .errors import DataError, ModCLError, StatisticsError, TaskError, UnsupportedModelError
from .task import BASE_TASK

__all__ = [
    'select_ridge', 'RIDGE_GRID', 'BASE_SCORERS', 'RANPAC_STATS', 'DEFAULT_RANPAC_DIM', 'DEFAULT_RANPAC_RIDGE', 'DEFAULT_RANPAC_SEED',
    'ClassPrediction', 'random_features', 'ranpac_statistics', 'merge_ranpac_statistics', 'has_ranpac',
    'score_ranpac', 'compute_ranpac_statistics', 'predict_classes', 'PRE_LOGITS', 'base_features', 'cache_info',
    'score_dtype', 'scaled_input', 'check_input_size',
]

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


# ---------------------------------------------------------------------------------------------------- statistics
class ClassMoments:
    """Float64 sums of features per class: counts, class sums and the sum of outer products (Gram matrix), added
    batch by batch and summed over processes; the statistics of the ``ranpac`` / ``ncm`` scorers and of the
    ``prototype`` scorer (``serving``) are made from them."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        f = f.detach().to('cpu', torch.float64)
        y = y.to('cpu', torch.long)
        self.count.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        self.sum.index_add_(0, y, f)
        self.outer.addmm_(f.t(), f)

    def all_reduce(self) -> None:
        """Sum over the processes of the default ``torch.distributed`` group (through the GPU under NCCL)."""
        import torch.distributed as dist
        for t in (self.count, self.sum, self.outer):
            if dist.get_backend() == 'nccl':
                buf = t.to(torch.device('cuda', torch.cuda.current_device()))
                dist.all_reduce(buf)
                t.copy_(buf.cpu())
            else:
                dist.all_reduce(t)


class _Sums(ClassMoments):
    """One task's random-feature sums, and their ``ranpac_*`` statistics."""

    def add_stats(self, stats: Dict[str, torch.Tensor], name: str) -> None:
        count, mean, gram = _unpack(stats, name)
        if mean.shape != self.sum.shape:
            raise StatisticsError(f'task {name!r}: cannot merge random-feature statistics of shape '
                                  f'{tuple(mean.shape)} into {tuple(self.sum.shape)}')
        self.count += count
        self.sum += mean * count[:, None]
        self.outer += gram * float(count.sum())

    def finish(self, seed: int, ridge: float, layers: Optional[Tuple[int, ...]] = None,
               input_size: Optional[int] = None) -> 'OrderedDict[str, torch.Tensor]':
        n = float(self.count.sum())
        if n < 1:
            raise DataError('no samples to compute random-feature statistics from')
        dim = self.outer.shape[0]
        iu = torch.triu_indices(dim, dim)
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        out['ranpac_gram'] = (self.outer[iu[0], iu[1]] / n).float()
        out['ranpac_mean'] = (self.sum / self.count.clamp_min(1)[:, None]).float()
        out['ranpac_count'] = self.count.float()
        out['ranpac_seed'] = torch.tensor(float(seed))
        out['ranpac_ridge'] = torch.tensor(float(ridge))
        if layers is not None:
            out['ranpac_layers'] = torch.tensor([float(v) for v in layers])
        if input_size is not None:
            out['ranpac_input_size'] = torch.tensor(float(input_size))
        return out


def layers_of(stats: Dict[str, torch.Tensor], name: str) -> Optional[Tuple[int, ...]]:
    """The layers a task's random-feature statistics were made from (``ranpac_layers``; absent: ``None``, the
    pre-logits features).

    Raises:
        StatisticsError: a malformed ``ranpac_layers``.
    """
    v = stats.get('ranpac_layers')
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim != 1 or not len(v) or \
            not torch.isfinite(v).all() or not torch.equal(v, v.round()):
        raise _bad(name, 'ranpac_layers must be a non-empty 1-D tensor of integer layer indices')
    layers = [int(i) for i in v.tolist()]
    try:
        checked = check_layers(layers)
    except TaskError:
        checked = ()
    if checked is None or checked != tuple(layers):
        raise _bad(name, f'ranpac_layers {layers} must be distinct sorted indices in [{PRE_LOGITS}, {_MAX_LAYER}]')
    return checked


def input_size_of(stats: Dict[str, torch.Tensor], name: str) -> Optional[int]:
    """The scorer input size of a task's random-feature statistics (``ranpac_input_size``; absent: ``None``).

    Raises:
        StatisticsError: a malformed ``ranpac_input_size``.
    """
    v = stats.get('ranpac_input_size')
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim != 0 or not torch.isfinite(v) or \
            float(v) != round(float(v)) or not _MIN_INPUT_SIZE <= float(v) <= _MAX_INPUT_SIZE:
        raise _bad(name, f'ranpac_input_size must be a scalar integer in [{_MIN_INPUT_SIZE}, {_MAX_INPUT_SIZE}]')
    return int(float(v))


def _bad(name: str, msg: str) -> StatisticsError:
    return StatisticsError(f'task {name!r}: random-feature statistics {msg}; recompute them with '
                           f'compute_task_statistics({name!r}, train_data, scorer="ranpac")')


def _unpack(stats: Dict[str, torch.Tensor], name: str, num_classes: int = 0
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated float64 ``(count (C,), mean (C, M), gram (M, M) full symmetric)`` of a task's statistics."""
    missing = [k for k in RANPAC_STATS if k not in stats]
    if missing:
        raise StatisticsError(f'task {name!r} has no random-feature statistics ({", ".join(missing)} missing); '
                              f'compute them with compute_task_statistics({name!r}, train_data, scorer="ranpac")')
    t = {}
    for k in RANPAC_STATS:
        v = stats[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise _bad(name, f'{k} is not a floating-point tensor')
        v = v.detach().to('cpu', torch.float64)
        if not torch.isfinite(v).all():
            raise _bad(name, f'{k} contains NaN or Inf values')
        t[k] = v
    count, mean, packed = t['ranpac_count'], t['ranpac_mean'], t['ranpac_gram']
    if mean.ndim != 2 or mean.shape[0] < 1 or mean.shape[1] < 1:
        raise _bad(name, f'ranpac_mean has shape {tuple(mean.shape)}, expected (classes, dim)')
    c, dim = mean.shape
    if num_classes and c != num_classes:
        raise _bad(name, f'describe {c} classes, the task has {num_classes}')
    if count.shape != (c,) or (count < 0).any() or float(count.sum()) < 1 or \
            not torch.equal(count, count.round()):
        raise _bad(name, f'ranpac_count must hold {c} non-negative integer class counts (not all zero)')
    if packed.shape != (dim * (dim + 1) // 2,):
        raise _bad(name, f'ranpac_gram has shape {tuple(packed.shape)}, expected ({dim * (dim + 1) // 2},) (the '
                         f'upper triangle of a {dim} x {dim} matrix)')
    for k in ('ranpac_seed', 'ranpac_ridge'):
        if t[k].ndim != 0:
            raise _bad(name, f'{k} must be a scalar')
    seed = float(t['ranpac_seed'])
    if not (seed == int(seed) and 0 <= seed < _MAX_SEED):
        raise _bad(name, f'ranpac_seed must be an integer in [0, {_MAX_SEED}), got {seed}')
    if not float(t['ranpac_ridge']) > 0:
        raise _bad(name, 'ranpac_ridge must be positive')
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    iu = torch.triu_indices(dim, dim)
    gram[iu[0], iu[1]] = packed
    gram = gram + gram.triu(1).t()
    if (gram.diagonal() < 0).any():
        raise _bad(name, 'ranpac_gram has a negative diagonal')
    return count, mean, gram


def check_features_and_labels(features: Any, labels: Any, num_classes: int) -> torch.Tensor:
    """``labels`` as a tensor, after checking a ``(N, D)`` finite floating-point feature batch and its ``N`` labels
    in ``[0, num_classes)``.

    Raises:
        DataError: naming what does not fit.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise DataError('features must be a 2-D floating-point tensor (N, D)')
    labels = torch.as_tensor(labels)
    if labels.shape != features.shape[:1]:
        raise DataError(f'got {labels.shape[0] if labels.ndim else "no"} labels for {features.shape[0]} features')
    check_labels(labels, num_classes, images=features.shape[0])
    if not torch.isfinite(features).all():
        raise DataError('features contain NaN or Inf values')
    return labels


def ranpac_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                      dim: int = DEFAULT_RANPAC_DIM, seed: int = DEFAULT_RANPAC_SEED,
                      ridge: float = DEFAULT_RANPAC_RIDGE, layers: Optional[Sequence[int]] = None,
                      input_size: Optional[int] = None) -> 'OrderedDict[str, torch.Tensor]':
    """Random-feature statistics (the ``ranpac_*`` tensors) of a task from its base features, without a model.

    Args:
        features: ``(N, D)`` features of the base task: pre-logits (``model.prototype_features(x)``), or
            ``scorers.base_features(model, x, layers)`` with the ``layers`` recorded here.
        labels: ``(N,)`` class indices in ``[0, num_classes)``.
        num_classes: Number of classes of the task.
        dim, seed: Size and seed of the random projection.
        ridge: Relative ridge regulariser stored with the statistics.
        layers: The layers ``features`` come from (stored as ``ranpac_layers``; ``None``: pre-logits).
        input_size: The side ``features``' images were resized to (``base_features(..., input_size)``; stored as
            ``ranpac_input_size``; ``None``: not resized).

    Raises:
        DataError: mismatched shapes, labels out of range, non-finite features or no samples.
        TaskError: bad ``dim``, ``seed``, ``ridge``, ``layers`` or ``input_size``.
    """
    _check_dim_seed(dim, seed)
    _check_ridge(ridge)
    layers = check_layers(layers)
    input_size = check_input_size(input_size)
    labels = check_features_and_labels(features, labels, num_classes)
    sums = _Sums(num_classes, dim)
    sums.add(random_features(features.float(), dim, seed), labels)
    return sums.finish(seed, float(ridge), layers, input_size)


def merge_ranpac_statistics(*stats: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Statistics of the union of the data of several shards of *one* task (sums of counts, class sums and Gram).

    Raises:
        StatisticsError: no statistics, malformed ones, or shards with different classes, size, seed, ridge, layers
            or input size.
    """
    if not stats:
        raise StatisticsError('merge_ranpac_statistics needs at least one set of statistics')
    seeds = {float(s['ranpac_seed']) for s in stats if 'ranpac_seed' in s}
    ridges = {float(s['ranpac_ridge']) for s in stats if 'ranpac_ridge' in s}
    if len(seeds) > 1 or len(ridges) > 1:
        raise StatisticsError(f'cannot merge statistics with different seeds {sorted(seeds)} or ridges '
                              f'{sorted(ridges)}')
    layers = {layers_of(s, f'#{i}') for i, s in enumerate(stats)}
    if len(layers) > 1:
        raise StatisticsError(f'cannot merge statistics of different layers {sorted(map(str, layers))}')
    sizes = {input_size_of(s, f'#{i}') for i, s in enumerate(stats)}
    if len(sizes) > 1:
        raise StatisticsError(f'cannot merge statistics of different input sizes {sorted(map(str, sizes))}')
    first = _unpack(stats[0], '#0')
    sums = _Sums(*first[1].shape)
    for i, s in enumerate(stats):
        sums.add_stats(s, f'#{i}')
    return sums.finish(int(seeds.pop()), ridges.pop(), layers.pop(), sizes.pop())


def has_ranpac(model, name: str) -> bool:
    """Whether task ``name`` of ``model`` has the statistics of the ``'ranpac'`` and ``'ncm'`` scorers."""
    stats = model.task_statistics(name)
    return all(k in stats for k in RANPAC_STATS)


def compute_ranpac_statistics(
        model, task: str, data, *, dim: int = DEFAULT_RANPAC_DIM, seed: int = DEFAULT_RANPAC_SEED,
        ridge: float = DEFAULT_RANPAC_RIDGE, num_classes: Optional[int] = None, accumulate: bool = False,
        batch_size: int = 64, num_workers: int = 0, progress: bool = False, all_reduce: bool = False,
        layers: Optional[Sequence[int]] = DEFAULT_RANPAC_LAYERS, input_size: Optional[int] = None,
) -> 'OrderedDict[str, torch.Tensor]':
    """Compute and store a task's random-feature statistics (``model.compute_task_statistics(..., scorer='ranpac')``).

    Runs the frozen base task (eval mode, no autograd) over ``data``; the model is otherwise unchanged.

    Args:
        model: A modcl model with a timm ``forward_features`` / ``forward_head``.
        task: The task the data belongs to.
        data: A Dataset or DataLoader of ``(image, label)``, or a pair of tensors ``(images, labels)``.
        dim, seed, ridge: See ``ranpac_statistics``.
        num_classes: Number of classes (default: the task's; needed for a task without head).
        accumulate: Add ``data`` to the task's existing statistics (same classes, size, seed) instead of replacing
            them: the result equals statistics of all the data at once, up to the float32 rounding of the stored
            means.
        batch_size, num_workers, progress: For the data loader.
        all_reduce: Sum the statistics over the processes of the default ``torch.distributed`` group (each process
            passes its shard; the sums are exact float64 sums).
        layers: The base model's layers the features come from (``base_features``; ``None``: the pre-logits
            features). Every candidate of one prediction must use the same layers.
        input_size: Make the features from a copy of each batch resized to this side in px (``scaled_input``;
            stored as ``ranpac_input_size``; ``None``: full size). Predictions then resize the same way, so the
            scorer's base forward costs about ``(input_size / H)^2`` of a full one. Every candidate of one
            prediction must use the same size.

    Returns:
        The task's new ``ranpac_*`` statistics.

    Raises:
        TaskNotFoundError: unknown task.
        TaskError: bad ``dim``, ``seed``, ``ridge``, ``num_classes``, ``layers``, ``input_size``, or
            ``all_reduce`` without a process group.
        StatisticsError: ``accumulate=True`` onto statistics of other classes, size, seed, layers or input size.
        DataError: unusable data.
        UnsupportedModelError: a model without ``forward_features`` / ``forward_head(pre_logits=True)`` (or, with
            ``layers``, without ``forward_intermediates`` or those layers).
    """
    info, current = model.task_info(task), model.task_statistics(task)
    _check_dim_seed(dim, seed)
    _check_ridge(ridge)
    layers = check_layers(layers)
    input_size = check_input_size(input_size)
    if num_classes is None:
        num_classes = int(info.num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TaskError(f'task {task!r} has no classes: pass num_classes= for its statistics')
    if info.num_classes and num_classes != info.num_classes:
        raise TaskError(f'task {task!r} has {info.num_classes} classes, got num_classes={num_classes}')
    check_all_reduce(all_reduce)
    sums = _Sums(num_classes, dim)
    if accumulate and has_ranpac(model, task):
        if float(current['ranpac_seed']) != seed:
            raise StatisticsError(f'task {task!r}: accumulate=True with seed {seed}, the statistics have seed '
                                  f'{float(current["ranpac_seed"]):g}')
        if layers_of(current, task) != layers:
            raise StatisticsError(f'task {task!r}: accumulate=True with layers {layers}, the statistics have layers '
                                  f'{layers_of(current, task)}')
        if input_size_of(current, task) != input_size:
            raise StatisticsError(f'task {task!r}: accumulate=True with input_size {input_size}, the statistics have '
                                  f'input size {input_size_of(current, task)}')
        sums.add_stats(current, task)
    for_each_base_feature(model, task, data, num_classes,
                          lambda f, y: sums.add(random_features(f.float(), dim, seed), y),
                          batch_size=batch_size, num_workers=num_workers, progress=progress, desc='random features',
                          layers=layers, input_size=input_size)
    if all_reduce:
        sums.all_reduce()
    stats = sums.finish(seed, float(ridge), layers, input_size)   # float32 whatever the model's dtype: counts exact
    stats = OrderedDict((k, v.to(model.backbone_device)) for k, v in stats.items())
    model.update_task_statistics(task, stats, drop=RANPAC_OPTIONAL_STATS)
    return stats


# ---------------------------------------------------------------------------------------------------- decoding
class _Decoded:
    """Decoded ridge (or class-mean) weights of a candidate set, on one device and dtype."""

    def __init__(self, names: Sequence[str], stats: Sequence[Dict[str, torch.Tensor]], num_classes: Sequence[int],
                 method: str, device: torch.device, dtype: torch.dtype, ridge: Optional[float] = None) -> None:
        counts, means, grams = [], [], []
        for n, s, c in zip(names, stats, num_classes):
            count, mean, gram = _unpack(s, n, c)
            counts.append(count)
            means.append(mean)
            grams.append(gram)
        dims = {m.shape[1] for m in means}
        seeds = {float(s['ranpac_seed']) for s in stats}
        if len(dims) > 1 or len(seeds) > 1:
            raise StatisticsError(f'tasks {", ".join(map(repr, names))} have random-feature statistics of different '
                                  f'sizes {sorted(dims)} or seeds {sorted(seeds)}; recompute them with one dim and '
                                  f'seed')
        layers = {layers_of(s, n) for n, s in zip(names, stats)}
        if len(layers) > 1:
            raise StatisticsError(f'tasks {", ".join(map(repr, names))} have random-feature statistics of different '
                                  f'layers {sorted(map(str, layers))}; recompute them with the same layers')
        self.layers: Optional[Tuple[int, ...]] = layers.pop()
        sizes = {input_size_of(s, n) for n, s in zip(names, stats)}
        if len(sizes) > 1:
            raise StatisticsError(f'tasks {", ".join(map(repr, names))} have random-feature statistics of different '
                                  f'input sizes {sorted(map(str, sizes))}; recompute them with the same input_size')
        self.input_size: Optional[int] = sizes.pop()
        self.dim, self.seed = dims.pop(), int(seeds.pop())
        self.sizes = [m.shape[0] for m in means]
        self.offsets = [0]
        for k in self.sizes:
            self.offsets.append(self.offsets[-1] + k)
        present = torch.cat(counts) > 0
        if method == 'ranpac':
            gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
            for count, g in zip(counts, grams):  # in candidate order: the same sums in every process
                gram += g * float(count.sum())
            q = torch.cat([m * c[:, None] for m, c in zip(means, counts)]).t()    # (M, C) class sums
            if ridge is None:
                ridge = math.exp(sum(math.log(float(s['ranpac_ridge'])) for s in stats) / len(stats))
            lam = ridge * float(gram.diagonal().sum()) / self.dim
            gram.diagonal().add_(max(lam, 1e-12))
            try:
                chol = torch.linalg.cholesky(gram)
            except RuntimeError:
                raise StatisticsError(f'tasks {", ".join(map(repr, names))}: the random-feature Gram matrix is not '
                                      f'positive definite; recompute the statistics') from None
            weights = torch.cholesky_solve(q, chol)
        else:
            weights = torch.nn.functional.normalize(torch.cat(means), dim=1).t()
        self.ncm = method == 'ncm'
        self.bias = torch.where(present, torch.zeros(()), torch.full((), -math.inf)).to(device, dtype)
        self.weights = weights.to(device, dtype)

    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C_total)`` class scores of base features (a class without samples scores -inf)."""
        h = random_features(features.to(self.weights.dtype), self.dim, self.seed)
        if self.ncm:
            h = torch.nn.functional.normalize(h, dim=1)
        return h @ self.weights + self.bias


_decoded: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _key(t: torch.Tensor) -> Tuple:
    return (id(t), t._version, t.data_ptr(), t.dtype, str(t.device), tuple(t.shape))


def _decode(names, stats, num_classes, method, device, dtype) -> _Decoded:
    return _Decoded(names, stats, num_classes, method, device, dtype)


def decoded(model, names: Sequence[str], method: str = 'ranpac') -> _Decoded:
    """The cached decoded weights of ``names`` on the model's device and ``score_dtype`` (float32 unless the model
    is float64), decoded again only when a candidate's statistics change (counted by ``cache_info``).

    Raises:
        StatisticsError: missing, malformed or incompatible statistics.
    """
    if method not in BASE_SCORERS:
        raise TaskError(f'unknown scorer {method!r}; choose one of {", ".join(BASE_SCORERS)}')
    device, dtype = score_dtype(model)
    tasks = [model._task(n) for n in names]
    for n, t in zip(names, tasks):
        if not all(k in t.stats for k in RANPAC_STATS):
            _unpack(t.stats, n)  # raises the missing-statistics error
    key = (tuple(names), method, str(device), dtype,
           tuple(tuple((k, _key(t.stats[k])) for k in RANPAC_STATS + RANPAC_OPTIONAL_STATS if k in t.stats)
                 + (t.num_classes,) for t in tasks))
    with _lock:
        per_model = _decoded.setdefault(model, OrderedDict())
        hit = per_model.get(key)
        if hit is not None:
            per_model.move_to_end(key)
    if hit is not None:
        count_cache(model, 'ranpac_hits')
        return hit
    count_cache(model, 'ranpac_misses')
    d = _decode(list(names), [t.stats for t in tasks], [t.num_classes for t in tasks], method, device, dtype)
    with _lock:
        per_model[key] = d
        while len(per_model) > _CACHE_ENTRIES:
            per_model.popitem(last=False)
    return d


def check_candidates(model, names: Sequence[str]) -> None:
    """Raise ``StatisticsError`` unless every candidate has usable, mutually compatible random-feature statistics."""
    missing = [n for n in names if not has_ranpac(model, n)]
    if missing:
        raise StatisticsError(
            f'task(s) {", ".join(map(repr, missing[:5]))} have no random-feature statistics; compute them with '
            f'compute_task_statistics(task, train_data, scorer="ranpac"), or use scorer="prototype"')
    decoded(model, names)


def _task_scores(scores: torch.Tensor, d: _Decoded) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    per_task = [scores[:, a:b] for a, b in zip(d.offsets[:-1], d.offsets[1:])]
    return torch.stack([s.amax(1) for s in per_task], 1), per_task


def score(model, x: torch.Tensor, names: Sequence[str], method: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Task scores ``(N, T)`` and per task its class scores ``(N, C_t)``, for a model already in serving mode."""
    d = decoded(model, names, method)
    with model.task_scope(BASE_TASK):
        f = base_features(model, x, d.layers, d.input_size)
    return _task_scores(d.class_scores(f), d)


def score_ranpac(features: torch.Tensor, stats: Sequence[Dict[str, torch.Tensor]], method: str = 'ranpac'
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Score base features against several tasks' statistics, without a model (no cache).

    Returns:
        ``(task_scores (N, T), [class_scores (N, C_t) per task])``, float32.

    Raises:
        StatisticsError: missing, malformed or incompatible statistics.
        TaskError: unknown ``method``.
    """
    if method not in BASE_SCORERS:
        raise TaskError(f'unknown scorer {method!r}; choose one of {", ".join(BASE_SCORERS)}')
    d = _decode([f'#{i}' for i in range(len(stats))], stats, [0] * len(stats), method, features.device,
                torch.float32)
    return _task_scores(d.class_scores(features.float()), d)


# ---------------------------------------------------------------------------------------------------- class-incremental
@dataclass
class ClassPrediction:
    """What ``predict_classes`` returns for ``N`` images: one label space over all candidate tasks' classes.

    Attributes:
        scorer: ``'ranpac'`` or ``'ncm'``.
        candidates: The candidate tasks, in the order of the label space.
        offsets: ``offsets[t]`` is the global label of class 0 of ``candidates[t]`` (``T + 1`` entries).
        class_scores: ``(N, C_total)`` float32 scores of every class of every candidate.
        global_labels: ``(N,)`` predicted class in the joint label space.
        task_index: ``(N,)`` index of the predicted class's task in ``candidates``.
        tasks: Predicted task name per sample.
        labels: ``(N,)`` predicted class within its task.
        class_names: Predicted class name per sample (``None`` when the task has no class names).
    """
    scorer: str
    candidates: Tuple[str, ...]
    offsets: Tuple[int, ...]
    class_scores: torch.Tensor
    global_labels: torch.Tensor
    task_index: torch.Tensor
    tasks: List[str]
    labels: torch.Tensor
    class_names: List[Optional[str]]

    def __len__(self) -> int:
        return len(self.tasks)


def predict_classes(model, x: torch.Tensor, scorer: str = 'ranpac',
                    tasks: Optional[Sequence[str]] = None) -> ClassPrediction:
    """Class-incremental prediction: the best class over all classes of all candidate tasks.

    One base forward and the decoded (cached) ridge or class-mean weights; no task head is run.

    Args:
        model: A modcl model whose candidate tasks have ``ranpac_*`` statistics.
        x: Input batch ``(N, C, H, W)`` preprocessed as the statistics' data.
        scorer: ``'ranpac'`` (ridge over the union of classes) or ``'ncm'`` (nearest class mean, cosine).
        tasks: Candidate tasks (default: every task but ``base``).

    Returns:
        A ``ClassPrediction``.

    Raises:
        TaskError: unknown scorer, no learned tasks or an empty candidate list.
        TaskNotFoundError: a candidate is not a task of the model.
        StatisticsError: a candidate has no, malformed or incompatible statistics.
        InputError: ``x`` is not a batch the model takes.
        The model is unchanged on error.
    """
    if scorer not in BASE_SCORERS:
        raise TaskError(f'unknown scorer {scorer!r} for predict_classes; choose one of {", ".join(BASE_SCORERS)}')
    model._check_batch(x)
    names = model._candidates(tasks, scorer)
    with model.inference_scope(BASE_TASK):
        d = decoded(model, names, scorer)
        scores = d.class_scores(base_features(model, x, d.layers, d.input_size)).float().cpu()
    glob = scores.argmax(1)
    offsets = torch.tensor(d.offsets)
    t_idx = torch.bucketize(glob, offsets[1:], right=True)
    labels = glob - offsets[t_idx]
    chosen = [names[i] for i in t_idx.tolist()]
    cnames = []
    for t, c in zip(chosen, labels.tolist()):
        cn = model._modcl.tasks[t].class_names
        cnames.append(None if cn is None or c >= len(cn) else cn[c])
    return ClassPrediction(scorer=scorer, candidates=tuple(names), offsets=tuple(d.offsets), class_scores=scores,
                           global_labels=glob, task_index=t_idx, tasks=chosen, labels=labels, class_names=cnames)


def select_ridge(model, data: Dict[str, Any], grid: Sequence[float] = RIDGE_GRID, batch_size: int = 64
                 ) -> Tuple[float, Dict[float, float]]:
    """Choose the relative ridge on validation images and store it in every task of ``data``.

    ``data`` maps each candidate task to its validation images (a Dataset or DataLoader of ``(image, label)``, or a
    pair ``(images, labels)``; only the images are used). For every ridge of ``grid`` the task-identification
    accuracy over all images is measured (one base forward per image, whatever the grid); the most accurate ridge,
    the largest among ties, is written to each task's ``ranpac_ridge`` (which refreshes the decode cache).

    Returns:
        ``(chosen ridge, {ridge: validation task-identification accuracy})``.

    Raises:
        TaskError: fewer than two tasks, or a bad ridge in ``grid``.
        TaskNotFoundError: a key of ``data`` is not a task.
        StatisticsError: a task lacks usable random-feature statistics.
        DataError: unusable data.
    """
    if not isinstance(data, dict) or len(data) < 2:
        raise TaskError('select_ridge needs validation data of at least two tasks: {task: data}')
    grid = list(grid)
    if not grid:
        raise TaskError('grid is empty')
    for r in grid:
        _check_ridge(r)
    names = list(data)
    check_candidates(model, names)
    stats = [model.task_statistics(n) for n in names]
    num_classes = [model.task_info(n).num_classes for n in names]
    d = decoded(model, names)
    layers, input_size = d.layers, d.input_size
    feats, truth = [], []
    device, dtype = model.backbone_device, model.backbone_dtype
    with model.inference_scope(BASE_TASK):
        for i, n in enumerate(names):
            for batch in _batches(data[n], batch_size, 0, what=f'validation data of {n!r}'):
                x, _ = unpack_batch(batch, 'data')
                if x.is_floating_point():
                    x = x.to(device, dtype)
                feats.append(base_features(model, x, layers, input_size).float())
                truth.append(torch.full((len(x),), i))
    if not feats:
        raise DataError('select_ridge: no validation images')
    f, t = torch.cat(feats), torch.cat(truth).to(feats[0].device)
    accuracy: Dict[float, float] = {}
    for r in grid:
        d = _Decoded(names, stats, num_classes, 'ranpac', f.device, torch.float32, ridge=float(r))
        task_scores, _ = _task_scores(d.class_scores(f), d)
        accuracy[float(r)] = float((task_scores.argmax(1) == t).float().mean())
    best = max(accuracy, key=lambda r: (accuracy[r], r))
    for n, st in zip(names, stats):
        model.update_task_statistics(n, {'ranpac_ridge': torch.tensor(best, dtype=torch.float32,
                                                                      device=st['ranpac_ridge'].device)})
    return best, accuracy
