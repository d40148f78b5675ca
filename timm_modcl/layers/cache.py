"""Effective-weight cache and per-call task scopes: ``WeightCache`` (one per model: the effective weights of its
recent tasks, least recently used first out, and the bound task) and the ``task_scope`` context variable that runs a
model's layers on a task in the current thread or asyncio task only.
"""
import contextlib
import contextvars
import threading
from collections import OrderedDict
from typing import Dict, Iterator, Optional, Tuple

import torch.nn as nn

#: The task of the current thread / asyncio task, per model: ``(the model's WeightCache, TaskState, cache slot)``.
_SCOPED: 'contextvars.ContextVar[Optional[tuple]]' = contextvars.ContextVar('timm_modcl_task', default=None)


@contextlib.contextmanager
def task_scope(cache: 'WeightCache', task) -> Iterator[None]:
    """Run the layers bound to ``cache`` (one model's) on ``task`` (a ``TaskState``) in this thread / asyncio task
    only. Nothing shared changes; nesting restores the outer scope. The model's ``task_scope(name)`` is the public
    entry point."""
    token = _SCOPED.set((cache, task, cache.use(task.name)))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def scoped_task(cache: 'WeightCache'):
    """The ``TaskState`` that ``task_scope`` set for the model owning ``cache`` in this context, or ``None``."""
    call = _SCOPED.get()
    return call[1] if call is not None and call[0] is cache else None


class WeightCache:
    """Effective weights of several tasks, least recently used first out, under a memory limit in bytes.

    Entries are grouped per task; the active task is never evicted (it is what the model computes now), so a model
    always runs at the plain model's eval cost, and switching between a few hot tasks recomputes nothing while they
    fit. Every entry records the identity and version counter of the modulator and of the frozen weight it was made
    from, so a stale weight is never served after an optimizer step, an in-place edit or a load. The cache also knows
    the model's bound task (``bound``, with its slot): what every layer computes outside a ``task_scope``, which
    carries the slot of its own task. The cache is safe to use from several threads (one lock around its
    bookkeeping).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.active: Optional[str] = None
        self.bound = None                      # the bound task (a TaskState): what unscoped calls compute
        self.bound_slot: Dict[nn.Module, tuple] = {}
        self._tasks: 'OrderedDict[str, Dict[nn.Module, tuple]]' = OrderedDict()
        self.bytes = 0
        self.misses = 0
        self._lock = threading.RLock()

    def activate(self, task: str) -> Dict[nn.Module, tuple]:
        """Make ``task`` the active (never evicted) and most recently used one and return its slot."""
        with self._lock:
            self.active = task
            return self.use(task)

    def bind(self, task) -> None:
        """Make ``task`` (a ``TaskState``) the one every layer of the model computes outside a ``task_scope``."""
        with self._lock:
            self.bound_slot = self.activate(task.name)
            self.bound = task

    def use(self, task: str) -> Dict[nn.Module, tuple]:
        """Make ``task`` the most recently used one and return its slot (the active task is unchanged)."""
        with self._lock:
            slot = self._tasks.setdefault(task, {})
            self._tasks.move_to_end(task)
            self._evict()
            return slot

    def put(self, task: str, slot: Dict[nn.Module, tuple], layer: nn.Module, entry: tuple) -> None:
        """Store a layer's entry (whose last item is its size in bytes) in ``task``'s slot; nothing is stored when
        the slot was evicted or dropped meanwhile (another thread's call), so the byte count stays exact."""
        with self._lock:
            self.misses += 1
            if self._tasks.get(task) is not slot:
                return
            old = slot.get(layer)
            if old is not None:
                self.bytes -= old[-1]
            slot[layer] = entry
            self.bytes += entry[-1]
            self._evict()

    def _evict(self) -> None:
        # never the active task, nor the most recently used one (the task of the call that is filling the cache)
        while self.bytes > self.max_bytes:
            keep = (self.active, next(reversed(self._tasks), None))
            victim = next((t for t in self._tasks if t not in keep), None)
            if victim is None:
                break
            self.drop(victim)

    def drop(self, task: str) -> None:
        """Forget the cached weights of one task (removed, replaced or reloaded)."""
        with self._lock:
            slot = self._tasks.get(task)
            if slot is None:
                return
            self.bytes -= sum(e[-1] for e in slot.values())
            if task == self.active:
                slot.clear()  # in place: the layers hold this dict
            else:
                del self._tasks[task]

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if old in self._tasks:
                self._tasks = OrderedDict((new if k == old else k, v) for k, v in self._tasks.items())
            if self.active == old:
                self.active = new

    def clear(self) -> None:
        with self._lock:
            for task in list(self._tasks):
                self.drop(task)

    def set_limit(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def cached_tasks(self) -> Tuple[str, ...]:
        """Tasks with cached weights, least recently used first."""
        with self._lock:
            return tuple(t for t, slot in self._tasks.items() if slot)

    def __getstate__(self) -> dict:
        # a pickled or deep-copied model starts with an empty cache: the entries are keyed on the identity of this
        # model's tensors, so a copy could never use them, and they would hold up to max_bytes of memory (and file)
        state = self.__dict__.copy()
        state['_tasks'] = OrderedDict()
        state['bytes'] = 0
        state['bound_slot'] = {}
        del state['_lock']
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        if self.active is not None:
            self._tasks[self.active] = self.bound_slot

    def __repr__(self) -> str:
        return (f'WeightCache({len(self.cached_tasks())} task(s), {self.bytes / 2 ** 20:.1f} of '
                f'{self.max_bytes / 2 ** 20:.1f} MiB, misses={self.misses})')
