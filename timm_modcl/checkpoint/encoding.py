"""The encoding of a training checkpoint file: its format names, JSON values with non-finite numbers, the
safetensors container, and the random-state blobs of each process (``rng_state_bytes``, ``restore_rng_state``).
"""

import json
import os
import random
from typing import Any, Mapping, Optional, Union

import torch

from ..errors import CheckpointError, PayloadError
from ..payload import read_safetensors

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
