"""Task-agnostic prediction over tasks trained at different input sizes.

``predict_task_agnostic`` scores a batch that is preprocessed one way. Tasks learned at different input sizes (the
``input_size`` of their metadata) each see an image as they were trained on it: the tasks are grouped by size, each
group scores its own preprocessing of the images, and the scores of all groups are compared as one (a softmax over
every candidate task).

    choices = predict_images_task_agnostic(model, [Image.open('rose.jpg')], scorer='auto')
    choices[0].task, choices[0].task_prob, choices[0].logits.softmax(0)
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .errors import TaskError

__all__ = ['TaskChoice', 'task_input_size', 'auto_scorer', 'group_tasks_by_input_size', 'predict_images_task_agnostic']


class TaskChoice(NamedTuple):
    """The task chosen for one image, and its head's output.

    Attributes:
        task: The chosen task.
        task_prob: Its probability: the softmax of the task scores over every candidate task (of all sizes).
        scorer: The scorer that chose it.
        logits: The chosen task's logits for the image (1-D, CPU, float32).
    """
    task: str
    task_prob: float
    scorer: str
    logits: torch.Tensor


def task_input_size(model, task: str) -> Optional[int]:
    """The input size (pixels) a task records in its metadata (``input_size``); ``None`` if it records none or a
    value that is not an integer.

    Raises:
        TaskNotFoundError: ``task`` is not a task of ``model``.
    """
    v = model.tasks[task].metadata.get('input_size')
    try:
        return int(v) if v else None
    except ValueError:
        return None


def auto_scorer(model, tasks: Sequence[str]) -> str:
    """The scorer ``'auto'`` means for these tasks: ``ranpac`` when every task has its statistics, else
    ``prototype`` when every task has those, else ``energy`` (head confidence; needs no statistics)."""
    from .scorers import has_ranpac
    from .serving import has_prototypes
    if all(has_ranpac(model, n) for n in tasks):
        return 'ranpac'
    if all(has_prototypes(model, n) for n in tasks):
        return 'prototype'
    return 'energy'


def group_tasks_by_input_size(model, tasks: Sequence[str]) -> Dict[Optional[int], List[str]]:
    """The tasks grouped by ``task_input_size`` (``None``: the model's own size), in first-seen order."""
    groups: Dict[Optional[int], List[str]] = {}
    for n in tasks:
        groups.setdefault(task_input_size(model, n), []).append(n)
    return groups


def predict_images_task_agnostic(
        model,
        images: Sequence,
        *,
        tasks: Optional[Sequence[str]] = None,
        scorer: str = 'auto',
        device=None,
        batch_size: int = 32,
) -> List[TaskChoice]:
    """Choose the task of each image among ``tasks`` and classify it with that task, each task seeing the image
    preprocessed at its own input size (timm's evaluation transform of the model at ``task_input_size``).

    Args:
        model: A modcl model with the tasks (on ``device``).
        images: PIL images (any mode; converted as the transform does).
        tasks: Candidate tasks (default: every task of the model but ``base``).
        scorer: A scorer of ``predict_task_agnostic``, or ``'auto'`` (see ``auto_scorer``).
        device: Where the batches go (default: CPU).
        batch_size: Images per forward.

    Returns:
        One ``TaskChoice`` per image.

    Raises:
        TaskError: no candidate tasks, or a ``batch_size`` below 1; and what ``predict_task_agnostic`` raises
            (unknown scorer or task, missing statistics). The model is unchanged.
    """
    from .data import eval_transform
    from .task import BASE_TASK
    names = [n for n in model.tasks if n != BASE_TASK] if tasks is None else list(tasks)
    if not names:
        raise TaskError('no tasks to choose from')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f'batch_size must be a positive integer, got {batch_size!r}')
    if scorer == 'auto':
        scorer = auto_scorer(model, names)
    groups = group_tasks_by_input_size(model, names)
    transforms = {size: eval_transform(model, size) for size in groups}
    choices: List[TaskChoice] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        preds = []
        for size, group in groups.items():
            x = torch.stack([transforms[size](img) for img in chunk])
            if device is not None:
                x = x.to(device)
            preds.append(model.predict_task_agnostic(x, scorer=scorer, tasks=group))
        scores = torch.cat([p.task_scores.float() for p in preds], 1)  # (N, every candidate of every size)
        probs = scores.softmax(1)
        widths = [p.task_scores.shape[1] for p in preds]
        for i in range(len(chunk)):
            best = int(scores[i].argmax())
            g, offset = 0, 0
            while best >= offset + widths[g]:
                offset += widths[g]
                g += 1
            choices.append(TaskChoice(preds[g].tasks[i], float(probs[i, best]), scorer,
                                      preds[g].logits[i].detach().float().cpu()))
    return choices
