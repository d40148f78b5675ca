"""Task-agnostic prediction (``TaskAgnosticMixin``): the ``TaskPrediction`` result, candidate tasks, the prepared
Gaussians cached per task, the head evidence (``head_score``) and ``predict_task_agnostic``.
"""

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import scorers as _scorers
from ..errors import StatisticsError, TaskError
from ..task import BASE_TASK
from .prototypes import HEAD_SCORERS, PROTOTYPE_STATS, SCORERS, _TaskGaussian, _score, has_prototypes, prototype_dim
from .statistics import compute_task_statistics
from .batches import MixedBatchMixin


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


class TaskAgnosticMixin(MixedBatchMixin):
    """Task-agnostic prediction of modcl models: ``prototype_features``, ``compute_task_statistics``,
    ``predict_classes`` and ``predict_task_agnostic`` with their candidate tasks and prepared Gaussians."""

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
