"""Serving many tasks: mixed-task batches and task-agnostic prediction (``ServingMixin``).

    logits = model.forward_tasks(x, ['flowers', 'birds', 'flowers'])   # one task per sample: a list of tensors
    pred = model.predict_task_agnostic(x)                              # task unknown: task, class and scores
    pred.tasks, pred.labels, pred.class_names, pred.task_probs

**Mixed-task batches.** ``forward_tasks`` groups the samples by task, runs each group as one batch under its task in
eval mode without autograd, and returns each sample's output in input order. Heads differ in size, so the result is a
*list* of tensors (sample ``i``'s logits for its own task), not a padded tensor. A sample's output is bit-identical
(``torch.equal``) to running that task's samples of the batch as one batch under ``use_task``. It equals running the
sample *alone* only up to float rounding: PyTorch's CPU convolutions and matrix products pick their kernels by batch
size, so a batch of 1 and a batch of 8 differ in the last bits (measured: up to ~1e-5 on MobileNetV2 logits; we test
``allclose(rtol=1e-4, atol=1e-4)``). Running the per-sample path with oneDNN disabled was not bit-exact either and
3x slower, so there is no cheap exact mode. The effective weights of every task in the batch come from the model's
``WeightCache`` (least recently used tasks out, under a byte limit), so switching between hot tasks is free.

**Task-agnostic prediction.** ``predict_task_agnostic(x, scorer=...)`` scores every candidate task (default: all
learned tasks), picks the best per sample, and classifies the sample with that task's head. Scores are comparable
across tasks, higher is better:

* ``'prototype'`` (default): a rehearsal-free Gaussian model of each task in the feature space of the frozen,
  unmodulated backbone (the ``base`` task's pre-logits features). Each task stores its class means, class priors and
  one covariance shared by its classes, as low-rank plus diagonal ``Sigma = diag(psi) + V diag(a) V^T`` (the top
  ``rank`` eigenvectors of the within-class covariance, and the rest of its diagonal); the score is the log-likelihood
  ``log sum_c pi_c N(f; mu_c, Sigma)`` including the log-determinant, computed with the Woodbury identity in
  O(D * rank) per class; the factors are validated and factorised once per task in float64 and kept on the model's
  device in float32 (float64 for a float64 model) until the statistics change. Cost: one forward of the base task
  for all tasks together, plus one grouped forward for the class (``forward_tasks``), whatever the number of tasks.
  The statistics are computed from a task's training data by ``compute_task_statistics`` (``train_task(...,
  prototypes=True)`` calls it) and stored as ``stats.proto_*`` tensors in the task's adapter file (statistics,
  never images).
* ``'ranpac'`` / ``'ncm'``: a ridge classifier (or nearest class mean) on fixed random features of the base features,
  over the union of all candidate tasks' classes; a task scores its best class (``timm_modcl.scorers``; statistics
  from ``model.compute_task_statistics(task, data, scorer='ranpac')``). ``model.predict_classes(x)`` gives the
  class-incremental prediction (one label space over all tasks' classes) from the same statistics.
* Head evidence: ``predict_task_agnostic(x, scorer='ranpac', head_weight=w, head_scorer='energy')`` adds ``w`` times
  each candidate's own head score (``'energy'``, ``'max_softmax'`` or ``'entropy'``, as SupSup) to the statistics
  scorer's task score; ``w`` is calibrated on validation data. It costs one forward per candidate task.
* ``'energy'``: the free energy of each task's head normalised by its class count, ``logsumexp(z) - log K`` (the log
  of the mean exponentiated logit). One forward per candidate task.
* ``'max_softmax'``: the largest softmax probability rescaled to [0, 1] by the head size,
  ``(max p - 1/K) / (1 - 1/K)``. One forward per candidate task.

Every method validates its arguments before it changes anything and restores the active task and the train/eval mode
of every module afterwards, also when the forward raises.
"""
import contextlib
import copy
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import scorers as _scorers
from ._rng import keep_rng_on_error
from .errors import DataError, InputError, StatisticsError, TaskError, UnsupportedModelError
from .layers import validate_input
from .task import BASE_TASK

__all__ = [
    'ServingMixin', 'TaskPrediction', 'SCORERS', 'PROTOTYPE_STATS', 'DEFAULT_PROTOTYPE_RANK',
    'DEFAULT_PROTOTYPE_POWER', 'DEFAULT_PROTOTYPE_SHRINKAGE', 'compute_task_statistics', 'prototype_statistics',
    'has_prototypes', 'score_prototypes', 'prototype_dim', 'check_prototype_statistics', 'MAX_PROTOTYPE_LOG_SCALE',
    'MAX_PROTOTYPE_MEAN', 'HEAD_SCORERS', 'head_score',
]

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


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class TaskPrediction:
    """What ``predict_task_agnostic`` returns for a batch of ``N`` images.

    Attributes:
        scorer: The scorer used.
        candidates: The tasks that were scored (the columns of ``task_scores``).
        task_scores: ``(N, T)`` float32 scores, higher is more likely; comparable across tasks (see the scorer).
        task_index: ``(N,)`` index of the predicted task in ``candidates``.
        tasks: Predicted task name per sample.
        labels: ``(N,)`` predicted class index within the predicted task.
        class_names: Predicted class name per sample (``None`` when the task has no class names).
        class_probs: ``(N,)`` probability of the predicted class (softmax of the predicted task's head; for a task
            without head, the prototype posterior).
        logits: Per sample, the predicted task's logits (a list: heads differ in size).
    """
    scorer: str
    candidates: Tuple[str, ...]
    task_scores: torch.Tensor
    task_index: torch.Tensor
    tasks: List[str]
    labels: torch.Tensor
    class_names: List[Optional[str]]
    class_probs: torch.Tensor
    logits: List[torch.Tensor]

    @property
    def task_probs(self) -> torch.Tensor:
        """``(N, T)`` softmax of ``task_scores`` over the candidates (for ``'prototype'``: the posterior of the task
        under equal task priors)."""
        return self.task_scores.softmax(1)

    def __len__(self) -> int:
        return len(self.tasks)

    def to_list(self) -> List[Dict[str, Any]]:
        """One dict per sample: ``task``, ``label``, ``class_name``, ``task_prob``, ``class_prob``."""
        probs = self.task_probs
        return [{'task': t, 'label': int(self.labels[i]), 'class_name': self.class_names[i],
                 'task_prob': float(probs[i, self.task_index[i]]), 'class_prob': float(self.class_probs[i])}
                for i, t in enumerate(self.tasks)]


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


# ---------------------------------------------------------------------------------------------------- data
@keep_rng_on_error()
def compute_task_statistics(
        model: nn.Module,
        task: str,
        data,
        *,
        rank: int = DEFAULT_PROTOTYPE_RANK,
        power: float = DEFAULT_PROTOTYPE_POWER,
        shrinkage: float = DEFAULT_PROTOTYPE_SHRINKAGE,
        num_classes: Optional[int] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = False,
        all_reduce: bool = False,
) -> 'OrderedDict[str, torch.Tensor]':
    """Compute a task's prototype statistics from its training data and store them in the task.

    Runs the frozen, unmodulated backbone (the ``base`` task, eval mode, no autograd) over ``data`` and fits the
    Gaussian model of ``prototype_statistics`` to its pre-logits features. The statistics are stored as the task's
    ``proto_*`` statistics (saved in its adapter file; other statistics of the task are kept). The model is otherwise
    unchanged: its active task, train/eval modes, parameters and BatchNorm statistics stay as they were. Evaluation
    transforms give the best statistics; training augmentation is tolerated.

    Args:
        model: A modcl model with a timm ``forward_features`` / ``forward_head``.
        task: The task the data belongs to.
        data: A Dataset or DataLoader of ``(image, label)`` (images preprocessed as for the task), or a pair of
            tensors ``(images, labels)``.
        rank, power, shrinkage: See ``prototype_statistics``.
        num_classes: Number of classes (default: the task's; needed for a task without head).
        batch_size, num_workers: For the DataLoader made from a Dataset.
        progress: Show a tqdm progress bar.
        all_reduce: Sum the statistics over the processes of the default ``torch.distributed`` group (every
            process must call this with its shard of the data).

    Returns:
        The new statistics (the task's own tensors).

    Raises:
        TaskNotFoundError: for an unknown task.
        TaskError: bad hyper-parameters, or a task without classes and no ``num_classes``.
        DataError: for unusable data (not image/label pairs, labels out of range, no samples, statistics that
            would not load again).
        UnsupportedModelError: for a model without ``forward_features`` / ``forward_head(pre_logits=True)``.
        InputError: images the model cannot take (NaN/Inf values, wrong shape or dtype).
        On error the task's statistics and the global random states (torch, NumPy, Python) are as they were.
    """
    state = model.task_info(task)
    _check_hyper(rank, power, shrinkage)
    if num_classes is None:
        num_classes = int(state.num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TaskError(f'task {task!r} has no classes: pass num_classes= for its prototype statistics')
    if state.num_classes and num_classes != state.num_classes:
        raise TaskError(f'task {task!r} has {state.num_classes} classes, got num_classes={num_classes}')
    _scorers.check_all_reduce(all_reduce)
    moments: Optional[_Moments] = None

    def add(f: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal moments
        if moments is None:
            moments = _Moments(num_classes, f.shape[1])
        moments.add(_power(f.to(torch.float64), float(power)), y)
    _scorers.for_each_base_feature(model, task, data, num_classes, add, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress, desc='prototypes')
    dtype = model.backbone_dtype
    if moments is None:
        moments = _Moments(num_classes, 1)
    if all_reduce:
        moments.all_reduce()
    stats = moments.finish(rank, float(power), float(shrinkage))
    stats = OrderedDict((k, v.to(model.backbone_device, dtype if dtype.is_floating_point else torch.float32))
                        for k, v in stats.items())
    try:  # what is stored must load again (adapter files validate the statistics)
        check_prototype_statistics(stats, num_classes, None, task)
    except StatisticsError as e:
        raise DataError(f'the data gave unusable prototype statistics ({e}); use more varied samples or rank=0') \
            from None
    model.update_task_statistics(task, stats)
    return stats


# ---------------------------------------------------------------------------------------------------- mixin
class ServingMixin:
    """Multi-task inference methods of modcl models: ``forward_tasks``, ``predict_task_agnostic``,
    ``prototype_features``, ``compute_task_statistics`` (see the module docstring)."""

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """Eval mode without autograd, for the calls that take their task per call (``task_scope``).

        A model in eval mode is not changed at all, so any number of threads can serve from it at once. A module in
        train mode is switched to eval for the call and back afterwards, under the model's lock (such calls run one
        at a time)."""
        with contextlib.ExitStack() as stack:
            if any(m.training for m in self._all_modules()):
                stack.enter_context(self._modcl.lock)
                modes = [(m, m.training) for m in self.modules()]
                stack.callback(_restore_modes, modes)
                self.eval()
            stack.enter_context(torch.no_grad())
            yield

    @contextlib.contextmanager
    def inference_scope(self, task: Optional[str] = None) -> Iterator[None]:
        """Eval mode without autograd, with ``task`` (default: the active one) computed per call (``task_scope``).

        A model in eval mode is not changed at all, so threads can run different tasks at once; a model in train
        mode is switched to eval for the call and back afterwards, under the model's lock (one such call at a time).

            with model.inference_scope('flowers'):
                logits = model(x)

        Raises:
            TaskNotFoundError: if there is no such task.
        """
        with self._serving(), self.task_scope(self.active_task if task is None else task):
            yield

    def _check_batch(self, x: Any) -> int:
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise InputError(f'expected a batch tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else "a scalar"}')
        layers = self._modcl.weight_layers
        if layers:  # serving runs in eval mode
            validate_input(next(iter(layers.values())), x, training=False)
        return int(x.shape[0])

    def _task_groups(self, tasks: Any, n: int) -> 'OrderedDict[str, List[int]]':
        if isinstance(tasks, str) or not isinstance(tasks, Iterable):
            raise InputError(f'tasks must be a list of task names, one per sample, got {type(tasks).__name__}')
        names = list(tasks)
        if len(names) != n:
            raise InputError(f'got {len(names)} task names for a batch of {n} samples (one name per sample)')
        known = self._modcl.tasks
        unknown = [(i, t) for i, t in enumerate(names) if not isinstance(t, str) or t not in known]
        if unknown:
            from .errors import TaskNotFoundError
            shown = ', '.join(f'{t!r} (sample {i})' for i, t in unknown[:5])
            raise TaskNotFoundError(f'unknown task(s) {shown}{" ..." if len(unknown) > 5 else ""}; the model has '
                                    f'tasks: {", ".join(map(repr, known))}')
        groups: 'OrderedDict[str, List[int]]' = OrderedDict()
        for i, t in enumerate(names):
            groups.setdefault(t, []).append(i)
        return groups

    def _schedule(self, names: Iterable[str]) -> List[str]:
        """Order tasks so the cache serves as many as it can: cached ones first (before uncached tasks can evict
        them), then the others, and the active task last (no switch back afterwards)."""
        names = list(names)
        st = self._modcl
        cached = [t for t in st.cache.cached_tasks() if t in names and t != st.active]
        rest = [t for t in names if t not in cached and t != st.active]
        return cached + rest + ([st.active] if st.active in names else [])

    def forward_tasks(self, x: torch.Tensor, tasks: Sequence[str]) -> List[torch.Tensor]:
        """Run a batch whose samples belong to different tasks: sample ``i`` under task ``tasks[i]``.

        The samples are grouped by task and each group runs as one batch under its task, in eval mode without
        autograd. Outputs are bit-identical to running each task's samples (in batch order) as one batch under
        ``use_task`` in eval mode; to running a sample alone they are equal up to float rounding (CPU kernels depend
        on the batch size). The active task and all train/eval flags are restored afterwards.

        Args:
            x: Input batch ``(N, ...)`` as the model takes it.
            tasks: ``N`` task names, one per sample.

        Returns:
            A list of ``N`` tensors, in input order: sample ``i``'s output (logits, or features for a task without
            head) for its own task. Heads differ in size, so the outputs are not stacked.

        Raises:
            InputError: ``x`` is not a batch the model takes (channels, dtype), or ``tasks`` is not a list of ``N``
                names.
            TaskNotFoundError: a name is not a task of the model.
            UnsupportedModelError: the model's forward does not return one tensor.
            The model is unchanged on error.
        """
        n = self._check_batch(x)
        groups = self._task_groups(tasks, n)
        out: List[Optional[torch.Tensor]] = [None] * n
        with self._serving():
            for name in self._schedule(groups):
                idx = groups[name]
                y = self._scoped_forward(x if len(idx) == n else x[torch.tensor(idx, device=x.device)], name)
                for j, i in enumerate(idx):
                    out[i] = y[j]
        return out  # type: ignore[return-value]

    def forward_task(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """The output of task ``task`` for a batch, in eval mode without autograd; thread-safe.

        Equal (``torch.equal``) to ``model(x)`` under ``use_task(task)`` in eval mode, but the model is not changed
        (no task is bound), so threads can call it with different tasks at once.

        Raises:
            InputError: ``x`` is not a batch the model takes.
            TaskNotFoundError: ``task`` is not a task of the model.
        """
        self._check_batch(x)
        self._task(task)
        with self._serving():
            return self._scoped_forward(x, task)

    def _scoped_forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        st = self._modcl
        if st.head is not None and not callable(getattr(st.base, 'forward_head', None)):
            # not a timm model: its head is only switched by binding the task (one call at a time)
            with st.lock, self.use_task(task):
                y = self(x)
        else:
            with self.task_scope(task):
                y = self(x)
        if not isinstance(y, torch.Tensor):
            raise UnsupportedModelError(f'forward_tasks needs a model whose forward returns one tensor, '
                                        f'got {type(y).__name__}')
        return y

    def prototype_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of the frozen, unmodulated backbone (the ``base`` task, eval mode): what the prototype
        statistics describe. ``(N, D)``; the model is unchanged afterwards.

        Raises:
            InputError: ``x`` is not a batch the model takes.
            UnsupportedModelError: the model has no ``forward_features`` / ``forward_head(pre_logits=True)``.
        """
        self._check_batch(x)
        _scorers.check_feature_model(self)
        with self._serving(), self.task_scope(BASE_TASK):
            return _scorers.pre_logit_features(self, x)

    def compute_task_statistics(self, task: str, data, scorer: str = 'prototype',
                                **kwargs) -> 'OrderedDict[str, torch.Tensor]':
        """Compute and store a task's statistics for ``scorer``: ``'prototype'`` (``serving.compute_task_statistics``)
        or ``'ranpac'`` / ``'ncm'`` (``scorers.compute_ranpac_statistics``; ``kwargs`` go to that function)."""
        if scorer in _scorers.BASE_SCORERS:
            return _scorers.compute_ranpac_statistics(self, task, data, **kwargs)
        if scorer != 'prototype':
            raise TaskError(f'scorer {scorer!r} has no statistics; choose prototype, ranpac or ncm')
        return compute_task_statistics(self, task, data, **kwargs)

    def predict_classes(self, x: torch.Tensor, scorer: str = 'ranpac',
                        tasks: Optional[Sequence[str]] = None) -> '_scorers.ClassPrediction':
        """Class-incremental prediction over all classes of all tasks; see ``timm_modcl.scorers.predict_classes``."""
        return _scorers.predict_classes(self, x, scorer, tasks)

    def _candidates(self, tasks: Optional[Sequence[str]], scorer: str) -> List[str]:
        st = self._modcl
        if scorer not in SCORERS:
            raise TaskError(f'unknown scorer {scorer!r}; choose one of {", ".join(SCORERS)}')
        if tasks is None:
            names = [n for n in st.tasks if n != BASE_TASK]
            if not names:
                raise TaskError('the model has no learned tasks to choose from (only the base task); add and train '
                                'tasks first')
        else:
            if isinstance(tasks, str) or not isinstance(tasks, Iterable):
                raise TaskError(f'tasks must be a list of task names, got {type(tasks).__name__}')
            tasks = list(tasks)
            bad = [t for t in tasks if not isinstance(t, str)]
            if bad:
                raise TaskError(f'tasks must be a list of task names (strings), got {bad[0]!r}')
            names = list(dict.fromkeys(tasks))
            if not names:
                raise TaskError('tasks is empty: give at least one task to choose from')
            for n in names:
                self._task(n)
        if scorer == 'prototype':
            missing = [n for n in names if not has_prototypes(self, n)]
            if missing:
                raise StatisticsError(
                    f'task(s) {", ".join(map(repr, missing[:5]))} have no prototype statistics; compute them with '
                    f'compute_task_statistics(model, task, train_data) (or train with train_task(..., '
                    f'prototypes=True)), or use scorer="energy"')
            _scorers.check_feature_model(self)
            names = self._usable_prototype_tasks(names)
        elif scorer in _scorers.BASE_SCORERS:
            _scorers.check_feature_model(self)
            _scorers.check_candidates(self, names)
        else:
            headless = [n for n in names if st.tasks[n].num_classes < 1]
            if headless:
                raise TaskError(f'task(s) {", ".join(map(repr, headless[:5]))} have no head; the {scorer!r} scorer '
                                f'scores heads (use scorer="prototype")')
        return names

    def _usable_prototype_tasks(self, names: List[str]) -> List[str]:
        """The tasks whose prototype statistics can score this model's features; the others are skipped with a
        warning (statistics changed after loading, or not fitting the model), so one bad task does not stop the
        prediction of the others. Raises ``StatisticsError`` when none is usable."""
        dim = prototype_dim(self)
        usable, problems = [], []
        for n in names:
            try:
                self._gaussian(n, dim)
            except StatisticsError as e:
                problems.append(str(e))
            else:
                usable.append(n)
        if not usable:
            raise StatisticsError('no candidate task has usable prototype statistics: ' + ' | '.join(problems[:5]))
        for problem in problems:
            warnings.warn(f'{problem}; the task is skipped', RuntimeWarning, stacklevel=4)
        return usable

    def predict_task_agnostic(
            self, x: torch.Tensor, scorer: str = 'prototype', tasks: Optional[Sequence[str]] = None,
            head_weight: float = 0.0, head_scorer: str = 'energy',
    ) -> TaskPrediction:
        """Predict task and class of images whose task is unknown.

        Scores every candidate task with ``scorer`` (see the module docstring), picks the best task per sample and
        classifies the sample with that task's head (eval mode, no autograd).

        Args:
            x: Input batch ``(N, C, H, W)``, preprocessed as the tasks expect (for ``'prototype'``: as the data the
                statistics were computed from).
            scorer: ``'prototype'`` (one base forward for all tasks, then one grouped forward), ``'energy'`` or
                ``'max_softmax'`` (one forward per candidate task).
            tasks: Candidate tasks (default: every task but ``base``).
            head_weight: With a statistics scorer (``'prototype'``, ``'ranpac'``, ``'ncm'``), add this multiple of
                each candidate's head evidence (``head_scorer`` of its own modulated head, as SupSup) to its score;
                calibrate it on validation data (``benchmarks/taskid.py``). Any value above 0 costs one forward per
                candidate task (the chosen task's logits come from those forwards); 0 (default): no head evidence.
            head_scorer: ``'energy'`` (``logsumexp(z) - log K``), ``'max_softmax'`` (rescaled to [0, 1]) or
                ``'entropy'`` (``1 - H(softmax(z)) / log K``).

        Returns:
            A ``TaskPrediction`` (tasks, labels, class names, probabilities, task scores).

        Raises:
            TaskError: unknown scorer or head scorer, a bad ``head_weight``, no learned tasks, an empty candidate
                list, or (head scorers, head evidence) a task without head.
            TaskNotFoundError: a candidate is not a task of the model.
            StatisticsError: (``'prototype'``) a candidate has no prototype statistics, or none has usable ones (a
                task whose statistics are unusable is skipped with a ``RuntimeWarning``).
            InputError: ``x`` is not a batch the model takes.
            The model is unchanged on error.
        """
        n = self._check_batch(x)
        if isinstance(head_weight, bool) or not isinstance(head_weight, (int, float)) or \
                not 0 <= head_weight < math.inf:
            raise TaskError(f'head_weight must be a non-negative finite number, got {head_weight!r}')
        if head_scorer not in HEAD_SCORERS:
            raise TaskError(f'unknown head_scorer {head_scorer!r}; choose one of {", ".join(HEAD_SCORERS)}')
        names = self._candidates(tasks, scorer)
        evidence = head_weight > 0 and (scorer == 'prototype' or scorer in _scorers.BASE_SCORERS)
        if evidence:
            headless = [t for t in names if self._modcl.tasks[t].num_classes < 1]
            if headless:
                raise TaskError(f'task(s) {", ".join(map(repr, headless[:5]))} have no head: no head evidence '
                                f'(use head_weight=0)')
        gaussians = self._gaussians(names) if scorer == 'prototype' else []
        st = self._modcl
        with self._serving():
            if scorer == 'prototype' or scorer in _scorers.BASE_SCORERS:
                task_scores, class_post = (self._prototype_scores(x, gaussians) if scorer == 'prototype'
                                           else _scorers.score(self, x, names, scorer))
                if evidence:
                    outputs = {name: self._scoped_forward(x, name) for name in self._schedule(names)}
                    task_scores = task_scores + head_weight * torch.stack(
                        [head_score(outputs[nm].float(), head_scorer).to(task_scores) for nm in names], 1)
                best = task_scores.argmax(1)
                chosen = [names[i] for i in best.tolist()]
                heads = [i for i in range(n) if st.tasks[chosen[i]].num_classes > 0]
                logits: List[torch.Tensor] = [class_post[t][i] for i, t in enumerate(best.tolist())]
                if evidence:
                    logits = [outputs[chosen[i]][i] for i in range(n)]
                elif heads:
                    sub = self.forward_tasks(x[torch.tensor(heads, device=x.device)], [chosen[i] for i in heads])
                    for j, i in enumerate(heads):
                        logits[i] = sub[j]
            else:
                per_task = []
                for name in self._schedule(names):
                    per_task.append((name, self._scoped_forward(x, name)))
                order = {name: z for name, z in per_task}
                task_scores = torch.stack([head_score(order[nm].float(), scorer) for nm in names], 1)
                best = task_scores.argmax(1)
                chosen = [names[i] for i in best.tolist()]
                logits = [order[chosen[i]][i] for i in range(n)]
        labels, class_names, probs = [], [], []
        for i, z in enumerate(logits):
            p = z.float().softmax(0)
            c = int(p.argmax())
            labels.append(c)
            probs.append(float(p[c]))
            cn = st.tasks[chosen[i]].class_names
            class_names.append(None if cn is None or c >= len(cn) else cn[c])
        return TaskPrediction(
            scorer=scorer, candidates=tuple(names), task_scores=task_scores.float().cpu(), task_index=best.cpu(),
            tasks=chosen, labels=torch.tensor(labels, dtype=torch.long), class_names=class_names,
            class_probs=torch.tensor(probs, dtype=torch.float32), logits=logits)

    def _gaussians(self, names: List[str]) -> List[_TaskGaussian]:
        dim = prototype_dim(self)
        return [self._gaussian(n, dim) for n in names]

    def _gaussian(self, name: str, dim: Optional[int]) -> _TaskGaussian:
        """A task's prepared (validated, factorised) Gaussian on the model's device in ``scorers.score_dtype``
        (float32 unless the model is float64), kept per task until its statistics change (keyed on the identity and
        version counter of every statistics tensor) or the model moves, so a prediction does not redo the float64
        Cholesky factorisation of any candidate (hits and misses: ``scorers.cache_info``)."""
        st = self._modcl
        task = st.tasks[name]
        device, dtype = _scorers.score_dtype(self)
        # the objects themselves (not their ids, which a new tensor may reuse) and their versions
        key = (task, task.num_classes, dim, (str(device), dtype),
               tuple((k, v, getattr(v, '_version', None)) for k, v in task.stats.items() if k in PROTOTYPE_STATS))
        entry = st.prototype_cache.get(name)
        if entry is not None and _same_stats_key(entry[0], key):
            _scorers.count_cache(self, 'prototype_hits')
            return entry[1]
        _scorers.count_cache(self, 'prototype_misses')
        gaussian = _TaskGaussian(name, task.stats, task.num_classes, dim).to(device, dtype)   # raises StatisticsError
        for stale in [n for n in st.prototype_cache if n not in st.tasks]:
            del st.prototype_cache[stale]
        st.prototype_cache[name] = (key, gaussian)
        return gaussian

    def _prototype_scores(self, x: torch.Tensor, gaussians: List[_TaskGaussian]
                          ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Task log-likelihoods ``(N, T)`` and, per task, the class log-posterior within the task ``(N, C_t)``."""
        with self.task_scope(BASE_TASK):
            f = _scorers.pre_logit_features(self, x)
        return _score(f, gaussians)


def _same_stats_key(a: tuple, b: tuple) -> bool:
    return (a[0] is b[0] and a[1:4] == b[1:4] and len(a[4]) == len(b[4])
            and all(x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a[4], b[4])))


def _restore_modes(modes: Sequence[Tuple[nn.Module, bool]]) -> None:
    for m, flag in modes:
        m.training = flag


def head_score(z: torch.Tensor, scorer: str) -> torch.Tensor:
    """Confidence of a head's logits ``(N, K)``, normalised for the head size ``K`` (higher is more confident):
    ``scorer`` one of ``HEAD_SCORERS`` (see ``predict_task_agnostic``); the head evidence the task-agnostic
    prediction adds, for computing it outside a model (benchmarks)."""
    k = z.shape[1]
    if scorer == 'energy':
        return z.logsumexp(1) - math.log(k)
    if scorer == 'entropy':
        if k < 2:
            return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        logp = z.log_softmax(1)
        return 1 + (logp.exp() * logp).sum(1) / math.log(k)
    p = z.softmax(1).amax(1)
    return (p - 1.0 / k) / (1.0 - 1.0 / k) if k > 1 else torch.zeros_like(p)
