"""The inference worker of ``modcl serve``: one thread that owns the model.

Every model call (forward, task-agnostic prediction, loading and removing tasks) runs on this one thread, so the
server is correct whatever the model's own thread-safety. Requests become jobs (one per image) in a bounded queue;
the worker takes the jobs that arrived within ``max_wait_s`` of the oldest one (up to ``max_batch``), whatever their
tasks, and runs them through ``model.forward_tasks`` (the mixed-task path). Task changes are control operations the
worker runs between batches.

Versions: each task version is loaded under its own internal name (``v<serial>--<task>``). A request resolves the
public name to the current version when it is admitted and holds a reference to it, so a request in flight finishes
on the version it started with; a replaced or removed version is dropped from the model once no job refers to it.
"""
import collections
import concurrent.futures as cf
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import ModCLError, TaskError, TaskNotFoundError
from ..task import validate_task_name

__all__ = ['InferenceWorker', 'TaskVersion', 'QueueFullError', 'NotReadyError', 'Result']

log = logging.getLogger('timm_modcl.serve')

_PathLike = Union[str, 'os.PathLike[str]']


class QueueFullError(ModCLError, RuntimeError):
    """The request queue is full (HTTP 429): retry later."""


class NotReadyError(ModCLError, RuntimeError):
    """The server is starting or shutting down (HTTP 503): retry later."""


@dataclass(eq=False)
class TaskVersion:
    """One loaded version of a public task."""
    name: str
    version: int
    internal: str
    num_classes: int
    class_names: Optional[Tuple[str, ...]]
    input_size: Optional[int]
    prototypes: bool
    refs: int = 0
    retired: bool = False

    def describe(self) -> Dict[str, Any]:
        return dict(name=self.name, version=self.version, num_classes=self.num_classes,
                    class_names=None if self.class_names is None else list(self.class_names),
                    input_size=self.input_size, prototypes=self.prototypes)


@dataclass
class Result:
    """What the worker computed for one image."""
    version: TaskVersion
    logits: torch.Tensor
    task_prob: Optional[float] = None


@dataclass(eq=False)
class _Job:
    x: Union[torch.Tensor, Dict[Optional[int], torch.Tensor]]
    future: cf.Future
    version: Optional[TaskVersion] = None  # a job with a task
    candidates: Optional[Tuple[TaskVersion, ...]] = None  # a task-agnostic job
    scorer: str = 'energy'
    t: float = field(default_factory=time.perf_counter)


class _NullMetrics:
    def batch(self, size: int) -> None: ...
    def queue(self, length: int) -> None: ...
    def cache(self, task: str, hit: bool) -> None: ...
    def evicted(self, task: str) -> None: ...
    def tasks(self, n: int) -> None: ...


def _input_size(info) -> Optional[int]:
    v = info.metadata.get('input_size')
    try:
        return int(v) if v else None
    except ValueError:
        return None


class InferenceWorker:
    """The thread that owns the model: batches jobs across tasks and applies task changes between batches.

    Args:
        model: A modcl model; from now on only this worker may call it.
        max_batch: Most images run in one batch.
        max_wait_s: How long the oldest queued image waits for others to join its batch.
        max_queue: Most images queued; more are refused with ``QueueFullError``.
        device: Device the inputs are moved to (the model must be there already).
        metrics: Receiver of batch sizes, queue lengths and cache hits/evictions (see ``timm_modcl.serve.app``).
    """

    def __init__(self, model, *, max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = 256,
                 device: Optional[Union[str, torch.device]] = None, metrics=None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError('max_batch and max_queue must be positive and max_wait_s non-negative')
        self.model = model
        self.max_batch, self.max_wait_s, self.max_queue = int(max_batch), float(max_wait_s), int(max_queue)
        self.device = None if device is None else torch.device(device)
        self.metrics = metrics or _NullMetrics()
        self._cv = threading.Condition()
        self._jobs: Deque[_Job] = collections.deque()
        self._control: Deque[Tuple[Callable[[], Any], cf.Future]] = collections.deque()
        self._current: Dict[str, TaskVersion] = {}
        self._loaded: Dict[str, TaskVersion] = {}  # internal name -> version, current and retired
        self._versions: Dict[str, int] = {}  # last version number per public name (kept across removals)
        self._serial = 0
        self._closing = False
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name='modcl-inference', daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- state
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def queue_length(self) -> int:
        with self._cv:
            return len(self._jobs)

    def tasks(self) -> List[TaskVersion]:
        """The current version of every public task, in load order."""
        with self._cv:
            return list(self._current.values())

    def loaded_internal(self) -> List[str]:
        """Internal names of every version still in the model (current and retired ones in use)."""
        with self._cv:
            return list(self._loaded)

    # --------------------------------------------------------------------------------------- admission
    def acquire(self, task: str, n: int = 1) -> TaskVersion:
        """Resolve ``task`` to its current version and hold ``n`` references to it (one per image).

        Raises:
            TaskNotFoundError: no such task.
            NotReadyError: the worker is shutting down.
        """
        with self._cv:
            self._check_open()
            v = self._current.get(task) if isinstance(task, str) else None
            if v is None:
                raise TaskNotFoundError(f'unknown task {task!r}; the server has: '
                                        f'{", ".join(map(repr, self._current)) or "no tasks"}')
            v.refs += n
            return v

    def acquire_all(self, names: Optional[Sequence[str]] = None, n: int = 1) -> Tuple[TaskVersion, ...]:
        """Hold ``n`` references to the current version of each of ``names`` (default: every task).

        Raises:
            TaskNotFoundError: a name is not a task; TaskError: no tasks at all.
        """
        with self._cv:
            self._check_open()
            if names is None:
                vs = tuple(self._current.values())
                if not vs:
                    raise TaskError('the server has no tasks to choose from')
            else:
                missing = [t for t in names if t not in self._current]
                if missing:
                    raise TaskNotFoundError(f'unknown task(s) {", ".join(map(repr, missing[:5]))}; the server has: '
                                            f'{", ".join(map(repr, self._current)) or "no tasks"}')
                vs = tuple(self._current[t] for t in dict.fromkeys(names))
                if not vs:
                    raise TaskError('tasks is empty: give at least one task to choose from')
            for v in vs:
                v.refs += n
            return vs

    def release(self, versions: Sequence[TaskVersion], n: int = 1) -> None:
        """Give back references taken by ``acquire`` (for images that will not be submitted)."""
        with self._cv:
            for v in versions:
                v.refs -= n
            self._cv.notify_all()

    def _check_open(self) -> None:
        if self._closing or not self._thread.is_alive():
            raise NotReadyError('the server is shutting down')

    def submit(self, xs: Sequence[Any], version: Optional[TaskVersion] = None,
               candidates: Optional[Sequence[TaskVersion]] = None, scorer: str = 'energy') -> List[cf.Future]:
        """Queue one job per image; the references must have been taken with ``acquire`` / ``acquire_all``.

        Raises:
            QueueFullError: the queue cannot take ``len(xs)`` more images (the references are given back).
            NotReadyError: the worker is shutting down (the references are given back).
        """
        held = [version] if version is not None else list(candidates or ())
        with self._cv:
            try:
                self._check_open()
                if len(self._jobs) + len(xs) > self.max_queue:
                    raise QueueFullError(f'the queue is full ({len(self._jobs)} of {self.max_queue} images '
                                         f'waiting); retry later')
            except ModCLError:
                for v in held:
                    v.refs -= len(xs)
                raise
            futures = []
            cands = None if candidates is None else tuple(candidates)
            for x in xs:
                f: cf.Future = cf.Future()
                self._jobs.append(_Job(x=x, future=f, version=version, candidates=cands, scorer=scorer))
                futures.append(f)
            self.metrics.queue(len(self._jobs))
            self._cv.notify_all()
        return futures

    def call(self, fn: Callable[[], Any]) -> cf.Future:
        """Run ``fn`` on the worker thread between batches (before queued jobs); returns its future."""
        f: cf.Future = cf.Future()
        with self._cv:
            self._check_open()
            self._control.append((fn, f))
            self._cv.notify_all()
        return f

    # ---------------------------------------------------------------------------------------- task changes
    def load(self, sources: Mapping[str, Union[_PathLike, bytes]], timeout: Optional[float] = None
             ) -> List[TaskVersion]:
        """Add or replace tasks ``{public name: adapter file or bytes}``, all or nothing, on the worker thread.

        Each adapter is validated as ``model.load_task`` validates it (nothing is published before every one has
        loaded); a replaced version stays in the model until the jobs that hold it are done.

        Raises:
            InvalidTaskNameError: a bad task name. AdapterFormatError, FingerprintMismatchError, AdapterError: as
            ``model.load_task``. NotReadyError: shutting down.
        """
        for name in sources:
            validate_task_name(name)
        return self.call(lambda: self._load(dict(sources))).result(timeout)

    def remove(self, name: str, timeout: Optional[float] = None) -> TaskVersion:
        """Remove a public task; jobs already admitted on it still finish.

        Raises:
            TaskNotFoundError: no such task. NotReadyError: shutting down.
        """
        return self.call(lambda: self._remove(name)).result(timeout)

    def _load(self, sources: Dict[str, Union[_PathLike, bytes]]) -> List[TaskVersion]:
        model = self.model
        done: List[Tuple[str, str]] = []
        try:
            for name, src in sources.items():
                self._serial += 1
                internal = f'v{self._serial}--{name}'[:64]
                model.load_task(src, name=internal)
                done.append((name, internal))
        except BaseException:
            for _, internal in done:
                model.remove_task(internal)
            raise
        from ..serving import has_prototypes
        out = []
        with self._cv:
            for name, internal in done:
                info = model.tasks[internal]
                self._versions[name] = self._versions.get(name, 0) + 1
                v = TaskVersion(name=name, version=self._versions[name], internal=internal,
                                num_classes=info.num_classes, class_names=info.class_names,
                                input_size=_input_size(info), prototypes=has_prototypes(model, internal))
                old = self._current.get(name)
                self._current[name] = v
                self._loaded[internal] = v
                if old is not None:
                    old.retired = True
                out.append(v)
            self.metrics.tasks(len(self._current))
        self._drop_retired()
        for v in out:
            log.info('task loaded', extra=dict(event='task_loaded', task=v.name, version=v.version))
        return out

    def _remove(self, name: str) -> TaskVersion:
        with self._cv:
            v = self._current.pop(name, None) if isinstance(name, str) else None
            if v is None:
                raise TaskNotFoundError(f'unknown task {name!r}; the server has: '
                                        f'{", ".join(map(repr, self._current)) or "no tasks"}')
            v.retired = True
            self.metrics.tasks(len(self._current))
        self._drop_retired()
        log.info('task removed', extra=dict(event='task_removed', task=v.name, version=v.version))
        return v

    def _drop_retired(self) -> None:
        """Remove from the model the retired versions no job refers to any more (worker thread only)."""
        with self._cv:
            gone = [v for v in self._loaded.values() if v.retired and v.refs <= 0]
            for v in gone:
                del self._loaded[v.internal]
        for v in gone:
            self.model.remove_task(v.internal)

    # ------------------------------------------------------------------------------------------- the loop
    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what is queued, stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> Tuple[Optional[Tuple[Callable[[], Any], cf.Future]], List[_Job]]:
        with self._cv:
            while True:
                if self._control:
                    return self._control.popleft(), []
                if self._jobs:
                    deadline = self._jobs[0].t + self.max_wait_s
                    while len(self._jobs) < self.max_batch and not self._control and not self._closing:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    if self._control:
                        continue
                    n = min(self.max_batch, len(self._jobs))
                    batch = [self._jobs.popleft() for _ in range(n)]
                    self.metrics.queue(len(self._jobs))
                    return None, batch
                if self._closing:
                    return None, []
                self._cv.wait()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            op, batch = self._take()
            if op is not None:
                fn, f = op
                if f.set_running_or_notify_cancel():
                    try:
                        f.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        f.set_exception(e)
                continue
            if not batch:
                break
            try:
                self._run_batch(batch)
            except BaseException as e:  # noqa: BLE001 - a bug: fail these jobs, keep serving
                log.exception('batch failed')
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            finally:
                with self._cv:
                    for j in batch:
                        for v in ([j.version] if j.version is not None else list(j.candidates or ())):
                            v.refs -= 1
                self._drop_retired()
        with self._cv:  # closed: fail anything left (nothing is left unless close timed out)
            left = list(self._jobs) + [f for _, f in self._control]
            self._jobs.clear()
            self._control.clear()
        for item in left:
            fut = item.future if isinstance(item, _Job) else item
            if not fut.done():
                fut.set_exception(NotReadyError('the server is shutting down'))

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None else x.to(self.device, non_blocking=True)

    def _run_batch(self, batch: List[_Job]) -> None:
        self.batches += 1
        self.metrics.batch(len(batch))
        cache = self.model.weight_cache
        before = set(cache.cached_tasks())
        used: Dict[str, TaskVersion] = {}
        with_task = [j for j in batch if j.version is not None]
        agnostic = [j for j in batch if j.version is None]
        groups: Dict[Tuple[int, ...], List[_Job]] = {}
        for j in with_task:
            groups.setdefault(tuple(j.x.shape), []).append(j)
        for group in groups.values():
            try:
                x = self._to(torch.stack([j.x for j in group]))
                outs = self.model.forward_tasks(x, [j.version.internal for j in group])
            except Exception as e:  # noqa: BLE001 - handed to the requests of this group
                for j in group:
                    j.future.set_exception(e)
                continue
            for j, o in zip(group, outs):
                used[j.version.internal] = j.version
                j.future.set_result(Result(version=j.version, logits=o.float().cpu()))
        by_candidates: Dict[Tuple[str, Tuple[str, ...]], List[_Job]] = {}
        for j in agnostic:
            by_candidates.setdefault((j.scorer, tuple(v.internal for v in j.candidates)), []).append(j)
        for (scorer, _), group in by_candidates.items():
            try:
                self._run_agnostic(group, scorer, used)
            except Exception as e:  # noqa: BLE001
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(e)
        after = set(cache.cached_tasks())
        for internal in sorted(set(used)):
            self.metrics.cache(used[internal].name, internal in before)
        for internal in (before | set(used)) - after:  # cached before or during the batch, gone after it
            v = self._loaded.get(internal)
            if v is not None:
                self.metrics.evicted(v.name)

    def _run_agnostic(self, group: List[_Job], scorer: str, used: Dict[str, TaskVersion]) -> None:
        """Task-agnostic prediction; candidates trained at different input sizes each see their own input."""
        cands = group[0].candidates
        by_size: Dict[Optional[int], List[TaskVersion]] = {}
        for v in cands:
            by_size.setdefault(v.input_size, []).append(v)
        scores, preds, owners = [], [], []
        for size, vs in by_size.items():
            x = self._to(torch.stack([j.x[size] for j in group]))
            pred = self.model.predict_task_agnostic(x, scorer=scorer, tasks=[v.internal for v in vs])
            scores.append(pred.task_scores)
            preds.append(pred)
            owners.append(vs)
            for v in vs:
                used[v.internal] = v
        all_scores = torch.cat(scores, 1).float()  # (N, T)
        probs = all_scores.softmax(1)
        offsets = [0]
        for s in scores:
            offsets.append(offsets[-1] + s.shape[1])
        by_internal = {v.internal: v for v in cands}
        for i, j in enumerate(group):
            best = int(all_scores[i].argmax())
            g = max(k for k in range(len(preds)) if offsets[k] <= best)
            v = by_internal[preds[g].tasks[i]]
            j.future.set_result(Result(version=v, logits=preds[g].logits[i].float().cpu(),
                                       task_prob=float(probs[i, best])))
