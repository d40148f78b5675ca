"""The ``'prototype'`` scorer's maths and the scorer names: the ``stats.proto_*`` statistics of a task
(``prototype_statistics``), their checks, and each task's validated, factorised Gaussian scoring features
(``score_prototypes``).
"""

import copy
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import scorers as _scorers
from ..errors import DataError, StatisticsError, TaskError
from ..task import BASE_TASK


#: Head evidence added to a statistics scorer's task scores (``predict_task_agnostic(head_weight=...)``).
HEAD_SCORERS = ('energy', 'max_softmax', 'entropy')
#: Task scorers of ``predict_task_agnostic``.
SCORERS = ('prototype', 'energy', 'max_softmax') + _scorers.BASE_SCORERS
#: Names of the prototype statistics in ``TaskState.stats`` (``stats.<name>`` tensors in adapter files).
PROTOTYPE_STATS = ('proto_mean', 'proto_prior', 'proto_basis', 'proto_log_scale', 'proto_log_noise', 'proto_power')
#: Rank of the low-rank part of the shared covariance (chosen on validation data by ``benchmarks/serving.py``).
DEFAULT_PROTOTYPE_RANK = 16
#: Features are transformed by ``sign(f) * |f| ** power`` before the Gaussian fit (chosen on validation data).
DEFAULT_PROTOTYPE_POWER = 0.5
#: The residual diagonal ``psi`` is shrunk towards its mean by this fraction (chosen on validation data).
DEFAULT_PROTOTYPE_SHRINKAGE = 0.9
_NOISE_FLOOR = 1e-4          # psi >= this fraction of the mean feature variance (and >= 1e-12)


def _eigh(cov: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a covariance; LAPACK can fail to converge on a rank-deficient one (fewer samples than
    features), so a failure is retried with a small multiple of the identity added (1e-10, then 1e-7 of ``scale``,
    the mean variance), which moves every eigenvalue by that much and leaves the eigenvectors a valid basis."""
    try:
        return torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for rel in (1e-10, 1e-7):
        try:
            evals, evecs = torch.linalg.eigh(cov + eye * (rel * max(scale, 1e-12)))
        except torch.linalg.LinAlgError:
            continue
        return evals - rel * max(scale, 1e-12), evecs
    raise StatisticsError('prototype statistics: the feature covariance could not be decomposed (LAPACK eigh did '
                          'not converge); use more samples or rank=0')
_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------- statistics
def _power(f: torch.Tensor, power: float) -> torch.Tensor:
    return f if power == 1.0 else f.sign() * f.abs().pow(power)


def _check_hyper(rank: Any, power: Any, shrinkage: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise TaskError(f'rank must be a non-negative integer, got {rank!r}')
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power <= 4 or power != power:
        raise TaskError(f'power must be a number in (0, 4], got {power!r}')
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise TaskError(f'shrinkage must be a number in [0, 1], got {shrinkage!r}')


class _Moments(_scorers.ClassMoments):
    """Sufficient statistics of (transformed) features per class, and the prototype statistics made from them."""

    def finish(self, rank: int, power: float, shrinkage: float) -> 'OrderedDict[str, torch.Tensor]':
        n = float(self.count.sum())
        present = self.count > 0
        if n < 1:
            raise DataError('no samples to compute prototype statistics from')
        mean = torch.where(present[:, None], self.sum / self.count.clamp_min(1)[:, None], torch.zeros(()))
        scatter = self.outer - (mean * self.count[:, None]).t() @ mean
        dof = max(n - int(present.sum()), 1.0)
        cov = (scatter + scatter.t()) / (2 * dof)
        var = cov.diagonal().clamp_min(0)
        floor = max(_NOISE_FLOOR * float(var.mean()), 1e-12)
        k = min(rank, cov.shape[0])
        if k:
            evals, evecs = _eigh(cov, float(var.mean()))
            evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
            keep = evals > max(float(evals[0]) if len(evals) else 0.0, 0.0) * 1e-9
            evals, evecs = evals[keep], evecs[:, keep]
            psi = var - (evecs.pow(2) * evals).sum(1)
        else:
            evals, evecs = torch.zeros(0, dtype=torch.float64), torch.zeros(cov.shape[0], 0, dtype=torch.float64)
            psi = var
        psi = psi.clamp_min(floor)
        psi = (1 - shrinkage) * psi + shrinkage * psi.mean()
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        out['proto_mean'] = mean.float()
        out['proto_prior'] = (self.count / n).float()
        out['proto_basis'] = evecs.float()
        out['proto_log_scale'] = evals.log().float()
        out['proto_log_noise'] = psi.log().float()
        out['proto_power'] = torch.tensor(float(power), dtype=torch.float32)
        return out


def prototype_statistics(
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        *,
        rank: int = DEFAULT_PROTOTYPE_RANK,
        power: float = DEFAULT_PROTOTYPE_POWER,
        shrinkage: float = DEFAULT_PROTOTYPE_SHRINKAGE,
) -> 'OrderedDict[str, torch.Tensor]':
    """Prototype statistics (the ``proto_*`` tensors) of a task from its training features, without a model.

    ``features`` are ``(N, D)`` pre-logits features of the base task (``model.prototype_features(x)``); ``labels``
    ``(N,)`` class indices in ``[0, num_classes)``. Features are transformed by ``sign(f) * |f| ** power``; the
    statistics are the class means, the class priors, and the within-class covariance as the top-``rank``
    eigenvectors (``proto_basis``, ``(D, rank)``) with their eigenvalues (``proto_log_scale``) plus the rest of its
    diagonal (``proto_log_noise``, floored at 1e-4 of the mean variance and shrunk towards its mean by
    ``shrinkage``). Scales are stored as logarithms, so they stay positive in any float dtype.

    Raises:
        DataError: for mismatched shapes, labels out of range, non-finite features or no samples.
        TaskError: for bad ``rank``, ``power`` or ``shrinkage``.
    """
    _check_hyper(rank, power, shrinkage)
    labels = _scorers.check_features_and_labels(features, labels, num_classes)
    moments = _Moments(num_classes, features.shape[1])
    moments.add(_power(features.to(torch.float64), float(power)), labels)
    return moments.finish(rank, float(power), float(shrinkage))


def has_prototypes(model, name: str) -> bool:
    """Whether task ``name`` of ``model`` has the prototype statistics of the ``'prototype'`` scorer."""
    stats = model.task_statistics(name)
    return all(k in stats for k in PROTOTYPE_STATS)


#: Bounds of usable prototype statistics (far outside what ``compute_task_statistics`` gives; beyond them scores
#: overflow): |log| of the covariance scales, |class means| of the transformed features, and how far the priors may
#: be from a probability vector and the basis columns from unit length (rounding of fp16/bf16 files).
MAX_PROTOTYPE_LOG_SCALE = 80.0
MAX_PROTOTYPE_MEAN = 1e12
_PROTOTYPE_TOLERANCE = 1e-2


def check_prototype_statistics(stats: Dict[str, torch.Tensor], num_classes: int, dim: Optional[int] = None,
                               name: str = 'task') -> None:
    """Validate a task's ``proto_*`` statistics (what loading an adapter or a state dict checks): the complete set,
    floating-point and finite, shapes consistent with each other, ``num_classes`` (0: any) and the feature size
    ``dim`` (``None``: any), power in (0, 4], priors a probability vector, scales and means within bounds, a positive
    definite covariance and finite scores. Other statistics names (not ``proto_*``) are left to their owner.

    Raises:
        StatisticsError: naming the problem.
    """
    unknown = sorted(k for k in stats if k.startswith('proto_') and k not in PROTOTYPE_STATS)
    if unknown:
        raise StatisticsError(f'task {name!r}: unknown prototype statistics {unknown[:5]} (known: '
                              f'{", ".join(PROTOTYPE_STATS)})')
    if any(k in stats for k in PROTOTYPE_STATS):
        _TaskGaussian(name, stats, num_classes, dim)


def prototype_dim(model) -> Optional[int]:
    """Size of the pre-logits features the prototype statistics of ``model``'s tasks describe, when the model says
    (timm's ``head_hidden_size``, else the in-features of the base task's Linear head); ``None`` when unknown."""
    size = getattr(model, 'head_hidden_size', None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    tasks = model._modcl.tasks  # read per prediction: model.tasks would build every task's TaskInfo
    head = tasks[BASE_TASK].head if BASE_TASK in tasks else None
    if isinstance(head, nn.Linear):
        return int(head.in_features)
    return None


class _TaskGaussian:
    """A task's prototype statistics prepared for scoring (float64): class log-likelihoods by the Woodbury identity.

    Building one validates the statistics: the complete set of ``PROTOTYPE_STATS``, floating-point and finite,
    shapes consistent with each other, with the task's class count and (``dim``) the model's feature size, power in
    (0, 4], priors a probability vector, scales within ``MAX_PROTOTYPE_LOG_SCALE``, means within
    ``MAX_PROTOTYPE_MEAN``, a positive definite covariance and finite scores at the class means.

    Raises:
        StatisticsError: naming the problem.
    """

    def __init__(self, name: str, stats: Dict[str, torch.Tensor], num_classes: int, dim: Optional[int] = None
                 ) -> None:
        self.name = name

        def bad(msg: str) -> StatisticsError:
            return StatisticsError(f'task {name!r}: prototype statistics {msg}; recompute them with '
                                   f'compute_task_statistics(model, {name!r}, train_data)')

        missing = [k for k in PROTOTYPE_STATS if k not in stats]
        if missing:
            raise bad(f'lack {", ".join(missing)}')
        for k in PROTOTYPE_STATS:
            if not isinstance(stats[k], torch.Tensor) or not stats[k].is_floating_point():
                raise bad(f'have a {k} that is not a floating-point tensor')
            if stats[k].device.type == 'meta':
                raise bad(f'have a {k} without data (a meta tensor)')
        t = {k: stats[k].detach().to('cpu', torch.float64) for k in PROTOTYPE_STATS}
        if not all(bool(torch.isfinite(v).all()) for v in t.values()):
            raise bad('contain NaN or Inf values')
        mean, prior, basis = t['proto_mean'], t['proto_prior'], t['proto_basis']
        log_scale, log_noise, power = t['proto_log_scale'], t['proto_log_noise'], t['proto_power']
        if mean.ndim != 2 or mean.shape[0] < 1 or mean.shape[1] < 1:
            raise bad(f'have class means of shape {tuple(mean.shape)}, expected (classes, features)')
        c, dim_ = mean.shape
        self.dim = dim_
        if dim is not None and dim_ != dim:
            raise bad(f'describe features of size {dim_}, the model\'s features have size {dim}')
        if num_classes and c != num_classes:
            raise bad(f'have {c} classes, the task has {num_classes}')
        k = basis.shape[1] if basis.ndim == 2 else -1
        if (prior.shape != (c,) or basis.ndim != 2 or basis.shape[0] != dim_ or log_scale.shape != (k,)
                or log_noise.shape != (dim_,) or power.ndim != 0 or k > dim_):
            raise bad(f'have inconsistent shapes (mean {tuple(mean.shape)}, prior {tuple(prior.shape)}, basis '
                      f'{tuple(basis.shape)}, log_scale {tuple(log_scale.shape)}, log_noise {tuple(log_noise.shape)}, '
                      f'power {tuple(power.shape)})')
        tol = _PROTOTYPE_TOLERANCE
        if not 0 < float(power) <= 4:
            raise bad(f'have power {float(power):g}, which must be in (0, 4]')
        if (prior < 0).any() or (prior > 1 + tol).any() or abs(float(prior.sum()) - 1) > tol:
            raise bad('have class priors that are not probabilities (non-negative, summing to 1)')
        scales = torch.cat([log_scale, log_noise])
        if float(scales.abs().max()) > MAX_PROTOTYPE_LOG_SCALE:
            raise bad(f'have log scales up to {float(scales.abs().max()):.3g} (beyond +-{MAX_PROTOTYPE_LOG_SCALE:g})')
        if float(mean.abs().max()) > MAX_PROTOTYPE_MEAN:
            raise bad(f'have class means up to {float(mean.abs().max()):.3g} (beyond +-{MAX_PROTOTYPE_MEAN:g})')
        if k and float((basis.norm(dim=0) - 1).abs().max()) > tol:
            raise bad('have a basis that is not made of unit vectors')
        self.power = float(power)
        self.num_classes = c
        psi_inv_sqrt = (-0.5 * log_noise).exp()
        self.psi_inv_sqrt = psi_inv_sqrt
        self.mean_s = mean * psi_inv_sqrt
        self.mean_sq = self.mean_s.pow(2).sum(1)
        logdet = float(log_noise.sum())
        self.k = k
        if k:
            b = (basis * (psi_inv_sqrt ** 2)[:, None]).t()                  # V^T Psi^-1, (k, D)
            m = torch.diag((-log_scale).exp()) + b @ basis                  # A^-1 + V^T Psi^-1 V, (k, k)
            try:
                chol = torch.linalg.cholesky(m)
            except RuntimeError:
                raise bad('are not positive definite') from None
            logdet += float(log_scale.sum()) + 2 * float(chol.diagonal().log().sum())
            self.w = torch.linalg.solve_triangular(chol, b, upper=False)    # L^-1 V^T Psi^-1, (k, D)
            self.u_mean = mean @ self.w.t()                                 # (C, k)
            self.u_mean_sq = self.u_mean.pow(2).sum(1)
        self.log_prior = torch.where(prior > 0, (prior / prior.sum()).log(), torch.full_like(prior, -math.inf))
        self.const = -0.5 * (logdet + dim_ * _LOG_2PI)
        if not math.isfinite(self.const) or not bool(torch.isfinite(self.class_log_likelihood(mean)).all()):
            raise bad('give non-finite scores')

    _FACTORS = ('psi_inv_sqrt', 'mean_s', 'mean_sq', 'w', 'u_mean', 'u_mean_sq', 'log_prior')

    def to(self, device: torch.device, dtype: torch.dtype) -> '_TaskGaussian':
        """A copy whose factors (validated and factorised in float64 on the CPU) are on ``device`` in ``dtype``."""
        out = copy.copy(self)
        for k in self._FACTORS:
            if hasattr(self, k):
                setattr(out, k, getattr(self, k).to(device, dtype))
        out.device, out.dtype = torch.device(device), dtype
        return out

    device = torch.device('cpu')
    dtype = torch.float64

    def class_log_likelihood(self, f: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` log N(f; mu_c, Sigma) for transformed features ``f`` ``(N, D)`` on the factors' device and
        dtype."""
        fs = f * self.psi_inv_sqrt
        q = fs.pow(2).sum(1, keepdim=True) - 2 * fs @ self.mean_s.t() + self.mean_sq
        if self.k:
            u = f @ self.w.t()
            q = q - (u.pow(2).sum(1, keepdim=True) - 2 * u @ self.u_mean.t() + self.u_mean_sq)
        return -0.5 * q.clamp_min(0) + self.const

    def scores(self, f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Task log-likelihood ``(N,)`` and class log-posterior ``(N, C)`` (within the task)."""
        joint = self.class_log_likelihood(f) + self.log_prior
        total = joint.logsumexp(1)
        return total, joint - total[:, None]


def score_prototypes(features: torch.Tensor, stats: Sequence[Dict[str, torch.Tensor]]
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Score base-task features against the prototype statistics of several tasks, without a model.

    Args:
        features: ``(N, D)`` pre-logits features of the base task (``model.prototype_features(x)``).
        stats: One mapping of ``proto_*`` tensors per task (``prototype_statistics`` output, or a task's ``stats``).

    Returns:
        ``(scores, class_log_posteriors)``: ``(N, T)`` float64 task log-likelihoods ``log p(f | task)``, and per task
        the ``(N, C_t)`` log-posterior of its classes.

    Raises:
        StatisticsError: for missing or inconsistent statistics, or a feature size that does not match.
    """
    gaussians = []
    for i, s in enumerate(stats):
        missing = [k for k in PROTOTYPE_STATS if k not in s]
        if missing:
            raise StatisticsError(f'statistics #{i} lack {missing}')
        gaussians.append(_TaskGaussian(f'#{i}', s, 0))
    return _score(features.detach().to('cpu', torch.float64), gaussians)


def _score(feats: torch.Tensor, gaussians: Sequence['_TaskGaussian']) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    transformed: Dict[tuple, torch.Tensor] = {}
    scores, posts = [], []
    for g in gaussians:
        if g.dim != feats.shape[1]:
            raise StatisticsError(f'task {g.name!r}: prototype statistics have features of size {g.dim}, the '
                                  f'features have size {feats.shape[1]}')
        key = (g.power, g.device, g.dtype)
        f = transformed.get(key)
        if f is None:
            f = transformed[key] = _power(feats.to(g.device, g.dtype), g.power)
        s, post = g.scores(f)
        scores.append(s)
        posts.append(post)
    return torch.stack(scores, 1), posts
