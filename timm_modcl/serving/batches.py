"""Mixed-task batches (``MixedBatchMixin``): eval mode without autograd for a call, the checked batch grouped by task,
``forward_tasks`` and ``forward_task``.
"""

import contextlib
from collections import OrderedDict
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import InputError, UnsupportedModelError
from ..layers import validate_input


# ---------------------------------------------------------------------------------------------------- mixin
class MixedBatchMixin:
    """Mixed-task batches of modcl models: eval mode without autograd (``inference_scope``), the checked batch and
    its task groups, ``forward_tasks`` and ``forward_task``."""

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
            from ..errors import TaskNotFoundError
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
        if st.head is not None and not callable(getattr(st.plain_class, 'forward_head', None)):
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


def _restore_modes(modes: Sequence[Tuple[nn.Module, bool]]) -> None:
    for m, flag in modes:
        m.training = flag
