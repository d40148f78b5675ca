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

from .prototypes import (
    DEFAULT_PROTOTYPE_POWER, DEFAULT_PROTOTYPE_RANK, DEFAULT_PROTOTYPE_SHRINKAGE, HEAD_SCORERS, MAX_PROTOTYPE_LOG_SCALE,
    MAX_PROTOTYPE_MEAN, PROTOTYPE_STATS, SCORERS, check_prototype_statistics, has_prototypes, prototype_dim,
    prototype_statistics, score_prototypes,
)
from .statistics import compute_task_statistics
from .batches import MixedBatchMixin
from .agnostic import TaskAgnosticMixin, TaskPrediction, head_score

__all__ = [
    'ServingMixin', 'TaskPrediction', 'SCORERS', 'PROTOTYPE_STATS', 'DEFAULT_PROTOTYPE_RANK',
    'DEFAULT_PROTOTYPE_POWER', 'DEFAULT_PROTOTYPE_SHRINKAGE', 'compute_task_statistics', 'prototype_statistics',
    'has_prototypes', 'score_prototypes', 'prototype_dim', 'check_prototype_statistics', 'MAX_PROTOTYPE_LOG_SCALE',
    'MAX_PROTOTYPE_MEAN', 'HEAD_SCORERS', 'head_score',
]


class ServingMixin(TaskAgnosticMixin):
    """Multi-task inference methods of modcl models: ``forward_tasks``, ``predict_task_agnostic``,
    ``prototype_features``, ``compute_task_statistics`` (see the module docstring)."""
