"""Reading a training checkpoint: the file (``read_checkpoint_bytes``), its parsed, structurally checked form
(``parse_checkpoint``, ``TrainCheckpoint``) validated against a run before anything is restored, and
``checkpoint_info``.
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .._io import load_json
from ..adapter import read_file
from ..errors import AdapterError, CheckpointError, PayloadError
from ..payload import TaskPayload
from .encoding import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, _PathLike, _check_rng_blob, _decode, _encode, _load
from .values import (
    _NON_NEGATIVE_STATE, _adam_bound, _check_history, _finite_number, _normalised, _same, _state_template,
)


# ---------------------------------------------------------------------------------------------------- read
def read_checkpoint_bytes(path: _PathLike) -> Optional[bytes]:
    """The bytes of a checkpoint file, or ``None`` if it does not exist.

    Raises:
        CheckpointError: the path is a folder, not a regular file (a device, FIFO), or unreadable.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return read_file(path, what='checkpoint file')
    except AdapterError as e:
        raise CheckpointError(str(e)) from None


class TrainCheckpoint:
    """A parsed, structurally checked checkpoint (``parse_checkpoint``); ``validate`` checks it against a run."""

    def __init__(self, label: str, tensors: Dict[str, torch.Tensor], state: Dict[str, Any]) -> None:
        self.label = label
        self.tensors = tensors
        self.state = state

    @property
    def epoch(self) -> int:
        return int(self.state['epoch'])

    @property
    def done(self) -> bool:
        return bool(self.state['done'])

    @property
    def history(self) -> Dict[str, Any]:
        return self.state['history']

    @property
    def world_size(self) -> int:
        return int(self.state['world_size'])

    @property
    def shuffle_seed(self) -> Optional[int]:
        """The seed of the DistributedSampler's shuffling of the run (drawn by rank 0 when no seed was given)."""
        v = self.state.get('shuffle_seed')
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    def rng(self, rank: int) -> bytes:
        return bytes(self.tensors[f'rng.{rank}'].numpy().tobytes())

    # -------------------------------------------------------------- validation (changes nothing)
    def validate(self, model: nn.Module, task: str, run: Mapping[str, Any], groups: Sequence[Sequence[nn.Parameter]]
                 ) -> None:
        """Check that this checkpoint belongs to this model, task, run and optimizer layout.

        Raises:
            CheckpointError: naming what differs.
        """
        label, st = self.label, self.state
        if st['task'] != task:
            raise CheckpointError(f'{label} is a checkpoint of task {st["task"]!r}, not {task!r}')
        if st['backbone_fingerprint'] != model.backbone_fingerprint():
            raise CheckpointError(f'{label} was written with other backbone weights (fingerprint '
                                  f'{str(st["backbone_fingerprint"])[:12]}...) than this model has')
        mine = model.task_info(task).meta()
        theirs = st['task_meta'] if isinstance(st['task_meta'], dict) else {}
        for key in ('num_classes', 'config'):
            if theirs.get(key) != _decode(json.loads(json.dumps(_encode(mine.get(key))))):
                raise CheckpointError(f'{label}: task {task!r} has another {key} ({theirs.get(key)!r}) than the '
                                      f'model\'s ({mine.get(key)!r})')
        saved_run = st['run'] if isinstance(st['run'], dict) else {}
        norm = _decode(json.loads(json.dumps(_encode(dict(run)))))
        diff = [k for k in sorted(set(saved_run) | set(norm)) if saved_run.get(k) != norm.get(k)]
        if diff:
            listed = ', '.join(f'{k}={saved_run.get(k)!r} (now {norm.get(k)!r})' for k in diff[:6])
            raise CheckpointError(f'{label} was written by a run with other arguments: {listed}; resume with the '
                                  f'same arguments, or start again without resume')
        # task tensors: exactly the task's names, shapes and kinds of dtype
        expected = model.task_tensors(task)
        given = {k[len('task.'):]: v for k, v in self.tensors.items() if k.startswith('task.')}
        if set(given) != set(expected):
            missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
            raise CheckpointError(f'{label}: task tensors do not match the task (missing {missing[:3]}, '
                                  f'unexpected {extra[:3]})')
        for k, t in expected.items():
            g = given[k]
            if tuple(g.shape) != tuple(t.shape):
                raise CheckpointError(f'{label}: {k} has shape {tuple(g.shape)}, the task {tuple(t.shape)}')
            if g.is_floating_point() != t.is_floating_point():
                raise CheckpointError(f'{label}: {k} has dtype {g.dtype}, the task {t.dtype}')
            if g.is_floating_point() and not torch.isfinite(g).all():
                raise CheckpointError(f'{label}: {k} has non-finite values')
        # optimizer layout
        opt = st['optimizer'] if isinstance(st['optimizer'], dict) else {}
        pgs = opt.get('param_groups')
        params = [p for g in groups for p in g]
        listed = isinstance(pgs, list) and all(isinstance(g, dict) and isinstance(g.get('params'), list) for g in pgs)
        if not listed or [len(g['params']) for g in pgs] != [len(g) for g in groups]:
            raise CheckpointError(f'{label}: the optimizer state does not fit the task\'s parameter groups')
        for k, v in self.tensors.items():
            if not k.startswith('optimizer.'):
                continue
            idx, _, key = k[len('optimizer.'):].partition('.')
            if not idx.isdigit() or int(idx) >= len(params) or not key:
                raise CheckpointError(f'{label}: unexpected optimizer tensor {k!r}')
            p = params[int(idx)]
            if v.ndim > 0 and tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(f'{label}: optimizer tensor {k!r} has shape {tuple(v.shape)}, its parameter '
                                      f'{tuple(p.shape)}')
        for r in range(self.world_size):
            _check_rng_blob(self.rng(r), f'{label} (random state of rank {r})')
        # values: every task tensor as the adapter loader checks it (finite, modulators within +-MAX_MODULATOR,
        # non-negative variances, weights that do not overflow), the epoch, the history, the optimizer scalars
        try:
            model.check_payload(TaskPayload.from_meta(mine, given))
        except PayloadError as e:
            raise CheckpointError(f'{label}: {e}') from None
        epochs = run.get('epochs')
        if isinstance(epochs, int) and self.epoch > epochs:
            raise CheckpointError(f'{label}: {self.epoch} epochs finished, but the run has {epochs}')
        _check_history(self.history, task, self.epoch, label)
        scalars = opt.get('scalars', {})
        if not isinstance(scalars, dict):
            raise CheckpointError(f'{label}: corrupt optimizer scalars')
        for idx, values in scalars.items():
            if not idx.isdigit() or int(idx) >= len(params) or not isinstance(values, dict):
                raise CheckpointError(f'{label}: unexpected optimizer scalars for parameter {idx!r}')
            for key, v in values.items():
                if f'optimizer.{idx}.{key}' in self.tensors or not _finite_number(v):
                    raise CheckpointError(f'{label}: optimizer scalar {key!r} of parameter {idx} is {v!r}')

    def check_state(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
        """Check the optimizer, scheduler and gradient-scaler state against the ones this run just built (changes
        nothing): the same parameter groups and settings (only the learning rate moves, from 0 to its initial
        value), per parameter the state the optimizer keeps after a step (same keys, tensor shapes and dtypes;
        finite; steps whole and non-negative; second moments non-negative), the same scheduler state.

        Raises:
            CheckpointError: naming the first value that does not fit.
        """
        try:
            self._check_state(optimizer, scheduler, scaler)
        except RecursionError:
            raise CheckpointError(f'{self.label}: corrupt state (nested too deeply)') from None

    def _check_state(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
        label, opt = self.label, self.state['optimizer']
        fresh_groups = _normalised(optimizer.state_dict()['param_groups'])
        saved_groups = opt['param_groups']
        if len(saved_groups) != len(fresh_groups) or not all(isinstance(g, dict) for g in saved_groups):
            raise CheckpointError(f'{label}: the optimizer state does not fit the task\'s parameter groups')
        for i, (g, f) in enumerate(zip(saved_groups, fresh_groups)):
            if set(g) != set(f):
                odd = sorted(set(g) ^ set(f))
                raise CheckpointError(f'{label}: optimizer group {i} has other settings than the run\'s optimizer '
                                      f'({odd[:4]})')
            for key, v0 in f.items():
                v = g[key]
                if key == 'lr':
                    top = max([x for x in (f.get('initial_lr'), v0) if _finite_number(x)] or [0.0])
                    ok, want = _finite_number(v) and 0 <= v <= top, f'a number from 0 to {top:g}'
                elif key == 'step' and _finite_number(v0):  # optimizers that count steps per group
                    ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= 0, 'a whole number >= 0'
                else:
                    ok, want = _same(v, v0), repr(v0)
                if not ok:
                    shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + '...'
                    want = want if len(want) <= 60 else want[:57] + '...'
                    raise CheckpointError(f'{label}: optimizer group {i} has {key}={shown}; this run has {want}')
        params = [p for group in optimizer.param_groups for p in group['params']]
        group_of = [i for i, group in enumerate(optimizer.param_groups) for _ in group['params']]
        state: Dict[int, Dict[str, Any]] = {}
        for k, v in self.tensors.items():
            if k.startswith('optimizer.'):
                idx, _, key = k[len('optimizer.'):].partition('.')
                state.setdefault(int(idx), {})[key] = v
        for idx, values in opt.get('scalars', {}).items():
            state.setdefault(int(idx), {}).update(values)
        template = _state_template(optimizer)
        for idx, st in sorted(state.items()):
            p, want = params[idx], None if template is None else template.get(idx)
            if want is not None and set(st) != set(want):
                raise CheckpointError(f'{label}: the optimizer state of parameter {idx} has {sorted(st)}; this '
                                      f'optimizer keeps {sorted(want)}')
            for key, v in st.items():
                w = None if want is None else want[key]
                name = f'optimizer state {key!r} of parameter {idx}'
                if isinstance(v, torch.Tensor):
                    if isinstance(w, torch.Tensor):
                        if tuple(v.shape) != tuple(w.shape) or v.dtype != w.dtype:
                            raise CheckpointError(f'{label}: {name} is a {v.dtype} tensor of shape {tuple(v.shape)}; '
                                                  f'this optimizer keeps {w.dtype} {tuple(w.shape)}')
                    elif w is not None:
                        raise CheckpointError(f'{label}: {name} is a tensor; this optimizer keeps a number')
                    elif tuple(v.shape) != tuple(p.shape) and not (key == 'step' and v.ndim == 0):
                        raise CheckpointError(f'{label}: {name} has shape {tuple(v.shape)}, its parameter '
                                              f'{tuple(p.shape)}')
                    if v.dtype == torch.bool or v.is_complex():
                        raise CheckpointError(f'{label}: {name} has dtype {v.dtype}')
                    t = v.detach().to('cpu', torch.float64)
                    if not torch.isfinite(t).all():
                        raise CheckpointError(f'{label}: {name} has NaN or Inf values')
                else:
                    if isinstance(w, torch.Tensor):
                        raise CheckpointError(f'{label}: {name} is a number; this optimizer keeps a tensor')
                    if not _finite_number(v):
                        raise CheckpointError(f'{label}: {name} is {v!r}, not a finite number')
                    t = torch.tensor(float(v), dtype=torch.float64)
                if key == 'step' and not ((t >= 0) & (t == t.round())).all():
                    raise CheckpointError(f'{label}: {name} must be a whole number >= 0')
                if _NON_NEGATIVE_STATE.search(key) and (t < 0).any():
                    raise CheckpointError(f'{label}: {name} has negative values')
            bound = _adam_bound(optimizer, group_of[idx])
            if bound is not None and isinstance(st.get('exp_avg'), torch.Tensor) and \
                    isinstance(st.get('exp_avg_sq'), torch.Tensor):
                m, v = st['exp_avg'].to(torch.float64), st['exp_avg_sq'].to(torch.float64)
                if (m * m > bound * v * 1.01 + 1e-30).any():
                    raise CheckpointError(f'{label}: the first moment (exp_avg) of parameter {idx} is larger than '
                                          f'its second moment (exp_avg_sq) allows: no gradients give such a state')
        if scheduler is not None:
            saved, fresh = self.state.get('scheduler'), _normalised(scheduler.state_dict())
            if not _same(saved, fresh):
                odd = (sorted(k for k in set(saved) | set(fresh) if not _same(saved.get(k), fresh.get(k)))
                       if isinstance(saved, dict) else ['(all)'])
                raise CheckpointError(f'{label}: the scheduler state differs from this run\'s in {odd[:4]}')
        saved = self.state.get('scaler')
        if scaler is not None and saved is not None:
            fresh = _normalised(scaler.state_dict())
            if set(saved) != set(fresh):
                raise CheckpointError(f'{label}: the gradient-scaler state has other fields than this run\'s')
            for key, v0 in fresh.items():
                v = saved[key]
                if key == 'scale':
                    ok = _finite_number(v) and v > 0
                elif key == '_growth_tracker':
                    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
                else:
                    ok = _same(v, v0)
                if not ok:
                    raise CheckpointError(f'{label}: the gradient-scaler state has {key}={v!r}')

    # -------------------------------------------------------------- restore
    def restore(self, model: nn.Module, task: str, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any) -> None:
        """Restore the optimizer, scheduler and scaler, then copy the task tensors into the task (in place).

        All or nothing: a part that does not load puts the others back as they were and raises CheckpointError
        before any task tensor changes.
        """
        parts = [(o, sd) for o, sd in ((optimizer, None), (scheduler, 'scheduler'), (scaler, 'scaler'))
                 if o is not None and (sd is None or self.state.get(sd) is not None)]
        before = [(o, copy.deepcopy(o.state_dict())) for o, _ in parts]
        try:
            state: Dict[int, Dict[str, Any]] = {}
            for k, v in self.tensors.items():
                if k.startswith('optimizer.'):
                    idx, _, key = k[len('optimizer.'):].partition('.')
                    state.setdefault(int(idx), {})[key] = v.clone()
            opt = self.state['optimizer']
            for idx, scalars in opt.get('scalars', {}).items():
                state.setdefault(int(idx), {}).update(scalars)
            optimizer.load_state_dict({'state': state, 'param_groups': [dict(g) for g in opt['param_groups']]})
            for o, key in parts[1:]:
                o.load_state_dict(dict(self.state[key]))
        except Exception as e:  # noqa: BLE001 - any malformed part of a foreign or corrupt checkpoint
            for o, sd in before:
                o.load_state_dict(sd)
            raise CheckpointError(f'{self.label}: the optimizer, scheduler or scaler state does not load '
                                  f'({type(e).__name__}: {e})') from None
        current = model.task_tensors(task)
        with torch.no_grad():
            for k, t in current.items():
                t.copy_(self.tensors[f'task.{k}'])


def parse_checkpoint(data: bytes, label: str = 'checkpoint') -> TrainCheckpoint:
    """Parse and structurally check checkpoint bytes.

    Raises:
        CheckpointError: not a timm_modcl training checkpoint, another format version, or corrupt.
    """
    tensors, meta = _load(data, label)
    if meta.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{label} is not a timm_modcl training checkpoint')
    if meta.get('format_version') != str(CHECKPOINT_FORMAT_VERSION):
        raise CheckpointError(f'{label} has unknown checkpoint format version {meta.get("format_version")!r}')
    state = load_json(meta.get('state', ''), CheckpointError, f'the state of {label}')  # nesting bounded
    try:
        state = _decode(state)
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f'{label}: corrupt state ({type(e).__name__}: {str(e)[:200]})') from None
    required = {'task': str, 'task_meta': dict, 'backbone_fingerprint': str, 'epoch': int, 'done': bool,
                'run': dict, 'history': dict, 'optimizer': dict, 'world_size': int}
    if not isinstance(state, dict):
        raise CheckpointError(f'{label}: corrupt state')
    for k, kind in required.items():
        if not isinstance(state.get(k), kind) or (kind is int and isinstance(state.get(k), bool)):
            raise CheckpointError(f'{label}: corrupt state ({k!r} missing or not a {kind.__name__})')
    for k in ('scheduler', 'scaler'):
        if state.get(k) is not None and not isinstance(state[k], dict):
            raise CheckpointError(f'{label}: corrupt state ({k!r} is not a mapping)')
    seed = state.get('shuffle_seed')
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64):
        raise CheckpointError(f'{label}: corrupt state (shuffle_seed {seed!r})')
    if state['epoch'] < 0 or state['world_size'] < 1:
        raise CheckpointError(f'{label}: corrupt state (epoch {state["epoch"]}, world size {state["world_size"]})')
    for r in range(state['world_size']):
        t = tensors.get(f'rng.{r}')
        if t is None or t.dtype != torch.uint8 or t.ndim != 1:
            raise CheckpointError(f'{label}: the random state of rank {r} is missing')
    return TrainCheckpoint(label, tensors, state)


def checkpoint_info(path: _PathLike) -> Dict[str, Any]:
    """Task, finished epochs, processes and history of a checkpoint file (for tools and tests).

    Raises:
        CheckpointError: no such file, or not a valid checkpoint.
    """
    data = read_checkpoint_bytes(path)
    if data is None:
        raise CheckpointError(f'no checkpoint at {str(path)!r}')
    ck = parse_checkpoint(data, repr(str(path)))
    return {'task': ck.state['task'], 'epoch': ck.epoch, 'done': ck.done, 'world_size': ck.world_size,
            'history': ck.history, 'run': ck.state['run'], 'tensors': sorted(ck.tensors)}
