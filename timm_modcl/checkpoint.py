"""Training checkpoints of ``train_task``: resume an interrupted training where its last finished epoch left it.

    train_task(model, 'flowers', train_ds, epochs=30, checkpoint='flowers.ckpt.safetensors', resume=True)

A checkpoint is one safetensors file, written atomically (temporary file, fsync, rename) at the end of every epoch:

* tensors: the trained task's tensors (``task.<flat name>``, as in adapter files), the optimizer state flattened to
  ``optimizer.<param index>.<key>``, and per process (``rng.<rank>``) a nested safetensors blob with the random
  states (torch CPU / CUDA, the shuffling generator; Python's and NumPy's as JSON metadata);
* metadata ``state``: JSON with the epoch, the history, the optimizer's parameter groups and scalar state, the
  scheduler and gradient-scaler state, the run's arguments, the task's description and the backbone fingerprint.

Nothing is pickled. Resuming validates everything against the model and the run's arguments before any tensor is
touched, and only the trained task's tensors are restored: other tasks are never read or written.
"""
import copy
import json
import os
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._io import atomic_write_bytes, load_json
from .adapter import read_file
from .errors import AdapterError, CheckpointError
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
    """``(tensors, metadata)`` of safetensors bytes, or a CheckpointError."""
    from safetensors.torch import load
    if len(data) < 8:
        raise CheckpointError(f'{label} is not a checkpoint (too short)')
    (n,) = struct.unpack('<Q', data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise CheckpointError(f'{label} is not a checkpoint (bad header length)')
    try:
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any parse error of a foreign or corrupt file
        raise CheckpointError(f'{label} is corrupt or not a safetensors file: {e}') from None
    meta = header.get('__metadata__') if isinstance(header, dict) else None
    return tensors, meta if isinstance(meta, dict) else {}


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
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{label}: bad random state ({e})') from None


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
    state = model._task(task)
    tensors: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, v in state.tensors(stats=False).items():
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
        current = model._task(task)
        mine = current.meta()
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
        expected = current.tensors(stats=False)
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
        if not isinstance(pgs, list) or [len(g.get('params', ())) for g in pgs if isinstance(g, dict)] != \
                [len(g) for g in groups]:
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
        current = model._task(task).tensors(stats=False)
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
    state = _decode(load_json(meta.get('state', ''), CheckpointError, f'the state of {label}'))
    required = {'task': str, 'task_meta': dict, 'backbone_fingerprint': str, 'epoch': int, 'done': bool,
                'run': dict, 'history': dict, 'optimizer': dict, 'world_size': int}
    if not isinstance(state, dict):
        raise CheckpointError(f'{label}: corrupt state')
    for k, kind in required.items():
        if not isinstance(state.get(k), kind) or (kind is int and isinstance(state.get(k), bool)):
            raise CheckpointError(f'{label}: corrupt state ({k!r} missing or not a {kind.__name__})')
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
