"""Decoding candidate tasks' statistics into ridge (``'ranpac'``) or class-mean (``'ncm'``) weights, cached per
model and candidate set, and the task and class scores of a batch (``score``, ``score_ranpac``).
"""

import math
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import StatisticsError, TaskError
from ..task import BASE_TASK
from .features import (
    BASE_SCORERS, RANPAC_OPTIONAL_STATS, RANPAC_STATS, _CACHE_ENTRIES, _lock, base_features, count_cache,
    random_features, score_dtype,
)
from .statistics import _unpack, has_ranpac, input_size_of, layers_of


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
