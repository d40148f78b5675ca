"""Training checkpoints of ``train_task``: resume an interrupted training where its last finished epoch left it.

    train_task(model, 'flowers', train_ds, epochs=30, checkpoint='flowers.ckpt.safetensors', resume=True)

A checkpoint is one safetensors file, written atomically (temporary file, fsync, rename) at the end of every epoch:

* tensors: the trained task's tensors (``task.<flat name>``, as in adapter files), the optimizer state flattened to
  ``optimizer.<param index>.<key>``, and per process (``rng.<rank>``) a nested safetensors blob with the random
  states (torch CPU / CUDA, the shuffling generator; Python's and NumPy's as JSON metadata);
* metadata ``state``: JSON with the epoch, the history, the optimizer's parameter groups and scalar state, the
  scheduler and gradient-scaler state, the run's arguments, the task's description and the backbone fingerprint.

Nothing is pickled. Resuming validates everything against the model and the run's arguments before any tensor is
touched, and only the trained task's tensors are restored: other tasks are never read or written. The values are
checked too, not only the structure: task tensors as the adapter loader checks them; the optimizer's settings and
per-parameter state against what the run's own optimizer keeps after a step (finite moments, non-negative second
moments, whole non-negative steps; for Adam-type optimizers a first moment its second moment allows); the scheduler
state equal to the run's; the history, epoch and random states well-formed.
"""
import copy
import json
import math
import os
import re
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._io import atomic_write_bytes, load_json
from .adapter import read_file
from .errors import AdapterError, CheckpointError, PayloadError
from .payload import TaskPayload, read_safetensors
from .version import __version__

__all__ = ['CHECKPOINT_FORMAT', 'CHECKPOINT_FORMAT_VERSION', 'TrainCheckpoint', 'checkpoint_bytes',
           'read_checkpoint_bytes', 'parse_checkpoint', 'rng_state_bytes', 'restore_rng_state', 'checkpoint_info']

CHECKPOINT_FORMAT = 'timm_modcl.train_checkpoint'
CHECKPOINT_FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024 * 1024
_PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------- JSON
def _encode(obj: Any) -> Any:
    """JSON-ready copy of ``obj`` that keeps tuples apart from lists (optimizers compare ``betas`` as tuples)."""
    if isinstance(obj, tuple):
        return {'__tuple__': [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f'cannot store a non-string key {k!r} in a checkpoint')
            out[k] = _encode(v)
        return out
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f'cannot store a {type(obj).__name__} in a checkpoint (only numbers, strings, lists, '
                          f'tuples and dicts)')


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {'__tuple__'} and isinstance(obj['__tuple__'], list):
            return tuple(_decode(v) for v in obj['__tuple__'])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------- safetensors
def _save(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=dict(metadata))


def _load(data: bytes, label: str):
    """``(tensors, metadata)`` of safetensors bytes (``payload.read_safetensors``), or a CheckpointError."""
    try:
        meta, tensors = read_safetensors(data, label, max_header=_MAX_HEADER)
    except PayloadError as e:
        raise CheckpointError(f'{e}: not a checkpoint, or a corrupt one') from None
    return tensors, meta


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state_bytes(generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> bytes:
    """This process's random states (torch CPU, CUDA of ``device``, ``generator``, Python, NumPy) as bytes."""
    tensors = {'torch': torch.get_rng_state()}
    if generator is not None:
        tensors['generator'] = generator.get_state()
    if device is not None and device.type == 'cuda':
        tensors['cuda'] = torch.cuda.get_rng_state(device)
    meta = {'python': json.dumps(_encode(random.getstate()))}
    try:
        import numpy as np
        name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        meta['numpy'] = json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(gauss)])
    except ImportError:  # pragma: no cover - numpy is optional for torch
        pass
    return _save(tensors, meta)


def restore_rng_state(data: bytes, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> None:
    """Restore what ``rng_state_bytes`` captured (parts missing from ``data`` are left alone)."""
    tensors, meta = _load(data, 'the random state')
    torch.set_rng_state(tensors['torch'])
    if generator is not None and 'generator' in tensors:
        generator.set_state(tensors['generator'])
    if device is not None and device.type == 'cuda' and 'cuda' in tensors:
        torch.cuda.set_rng_state(tensors['cuda'], device)
    if 'python' in meta:
        random.setstate(_decode(json.loads(meta['python'])))
    if 'numpy' in meta:
        import numpy as np
        name, keys, pos, has_gauss, gauss = json.loads(meta['numpy'])
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _check_rng_blob(data: bytes, label: str) -> None:
    tensors, meta = _load(data, label)
    t = tensors.get('torch')
    if t is None or t.dtype != torch.uint8 or t.ndim != 1:
        raise CheckpointError(f'{label}: no torch random state')
    try:  # each state is set on a throwaway generator: what restore_rng_state will set cannot fail there
        torch.Generator().set_state(t)
        if 'generator' in tensors:
            torch.Generator().set_state(tensors['generator'])
        if 'python' in meta:
            state = _decode(json.loads(meta['python']))
            random.Random().setstate(state)
        if 'numpy' in meta:
            import numpy as np
            name, keys, pos, has_gauss, gauss = json.loads(meta['numpy'])
            np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    except Exception as e:  # noqa: BLE001 - any malformed state (IndexError, OverflowError, RecursionError, ...)
        raise CheckpointError(f'{label}: bad random state ({type(e).__name__}: {str(e)[:200]})') from None


# ---------------------------------------------------------------------------------------------------- value checks
#: optimizer state keys that hold squares, sums of squares or maxima of magnitudes (Adam's ``exp_avg_sq``,
#: ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``, Adadelta's ``acc_delta``, Adamax's ``exp_inf``)
_NON_NEGATIVE_STATE = re.compile(r'sq|square|^sum$|^acc_delta$|^exp_inf$')


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (``1`` is not ``1.0`` or ``True``; NaN equals nothing)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _normalised(obj: Any) -> Any:
    """``obj`` as a checkpoint stores and reads it back (JSON, tuples kept)."""
    return _decode(json.loads(json.dumps(_encode(obj))))


def _check_history(history: Mapping[str, Any], task: str, epoch: int, label: str) -> None:
    """The history of ``epoch`` finished epochs: the fields of ``TrainHistory``, one finite value per epoch each."""
    from dataclasses import fields

    from .training.history import TrainHistory
    names = {f.name for f in fields(TrainHistory)}
    if set(history) != names:
        odd = sorted(set(history) ^ names)
        raise CheckpointError(f'{label}: the history does not have the fields of a TrainHistory ({odd[:4]})')
    if history['task'] != task:
        raise CheckpointError(f'{label}: the history is of task {history["task"]!r}, not {task!r}')
    if not isinstance(history['stopped_early'], bool):
        raise CheckpointError(f'{label}: the history\'s stopped_early is {history["stopped_early"]!r}, not a bool')
    bounds = {'train_loss': math.inf, 'train_acc': 1.0, 'val_acc': 1.0, 'lr': math.inf, 'head_lr': math.inf,
              'epoch_time_s': math.inf}
    for key, top in bounds.items():
        values = history[key]
        if not isinstance(values, list) or len(values) != epoch:
            raise CheckpointError(f'{label}: the history\'s {key} must list {epoch} value(s), one per finished '
                                  f'epoch')
        for v in values:
            if v is None and key == 'val_acc':
                continue
            if not _finite_number(v) or not 0 <= v <= top:
                raise CheckpointError(f'{label}: the history\'s {key} has the value {v!r} (a number from 0 to '
                                      f'{top:g} expected)')


def _adam_bound(optimizer: torch.optim.Optimizer, group: int) -> Optional[float]:
    """For Adam-type optimizers (exponential averages ``m`` of the gradients and ``v`` of their squares, betas
    ``b1``, ``b2``): the ``c`` with ``m**2 <= c * v`` for every gradient sequence (Cauchy-Schwarz over the two
    averages' weights: ``c = (1 - b1)**2 / ((1 - b2) * (1 - b1**2 / b2))``); ``None`` for other optimizers."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)):
        return None
    betas = optimizer.param_groups[group].get('betas')
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_finite_number(b) for b in betas):
        return None
    b1, b2 = (float(b) for b in betas)
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        return None
    return (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))


def _state_template(optimizer: torch.optim.Optimizer) -> Optional[Dict[int, Dict[str, Any]]]:
    """The per-parameter state ``optimizer`` keeps after a step (keys, tensor shapes and dtypes), from one step of
    a copy on copies of its parameters (the global random state and the parameters are not touched); ``None`` for
    an optimizer that cannot be stepped that way."""
    try:
        with torch.random.fork_rng(devices=[]):
            dry = copy.deepcopy(optimizer)
            for group in dry.param_groups:
                for p in group['params']:
                    p.grad = torch.ones_like(p)
            dry.step()
            state = dry.state_dict()['state']
        return {int(i): dict(st) for i, st in state.items()}
    except Exception:  # noqa: BLE001 - e.g. an optimizer that needs a closure: the generic checks remain
        return None


# ---------------------------------------------------------------------------------------------------- write
def checkpoint_bytes(
        model: nn.Module,
        task: str,
        *,
        epoch: int,
        done: bool,
        history: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        run: Mapping[str, Any],
        rng: Sequence[bytes],
        shuffle_seed: Optional[int] = None,
) -> bytes:
    """The bytes of a checkpoint after ``epoch`` finished epochs (see the module docstring)."""
    state = model.task_info(task)
    tensors: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, v in model.task_tensors(task).items():
        tensors[f'task.{k}'] = v
    sd = optimizer.state_dict()
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, st in sd['state'].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f'optimizer.{idx}.{k}'] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    for r, blob in enumerate(rng):
        tensors[f'rng.{r}'] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    payload = {
        'task': task,
        'task_meta': state.meta(),
        'architecture': str(getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)),
        'backbone_fingerprint': model.backbone_fingerprint(),
        'epoch': int(epoch),
        'done': bool(done),
        'run': dict(run),
        'history': dict(history),
        'optimizer': {'param_groups': sd['param_groups'], 'scalars': scalars},
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'world_size': len(rng),
        'shuffle_seed': shuffle_seed,
        'timm_modcl_version': __version__,
    }
    meta = {'format': CHECKPOINT_FORMAT, 'format_version': str(CHECKPOINT_FORMAT_VERSION),
            'state': json.dumps(_encode(payload))}
    return _save(tensors, meta)


def write_checkpoint(path: _PathLike, data: bytes) -> Path:
    """Write checkpoint bytes atomically (the previous checkpoint stays intact until the rename)."""
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise CheckpointError(f'could not write checkpoint {str(path)!r}: {e}') from e


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
