"""RanPAC statistics of a task: class moments, the ``stats.ranpac_*`` tensors (``ranpac_statistics``), their checks,
exact merging across shards or processes, and ``compute_ranpac_statistics``.
"""

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..data import check_labels
from ..errors import DataError, StatisticsError, TaskError
from .features import (
    DEFAULT_RANPAC_DIM, DEFAULT_RANPAC_LAYERS, DEFAULT_RANPAC_RIDGE, DEFAULT_RANPAC_SEED, PRE_LOGITS,
    RANPAC_OPTIONAL_STATS, RANPAC_STATS, _MAX_INPUT_SIZE, _MAX_LAYER, _MAX_SEED, _MIN_INPUT_SIZE, _check_dim_seed,
    _check_ridge, check_all_reduce, check_input_size, check_layers, for_each_base_feature, random_features,
)


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
