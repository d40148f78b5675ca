"""Class-incremental prediction over all candidate tasks' classes (``predict_classes``) and choosing the ridge on
held-out data (``select_ridge``).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import unpack_batch
from ..errors import DataError, TaskError
from ..task import BASE_TASK
from .features import BASE_SCORERS, RIDGE_GRID, _batches, _check_ridge, base_features
from .decoding import _Decoded, _task_scores, check_candidates, decoded


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
