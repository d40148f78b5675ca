"""One adapter file on disk: the format's names and limits, the safe regular-file reader, and writing one
task as adapter bytes or an adapter file (``save_task``).
"""

import json
import os
import stat
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import save as st_save

from .._io import atomic_write_bytes
from ..errors import AdapterError, PayloadError
from ..payload import TaskPayload
from ..version import __version__

ADAPTER_FORMAT = 'timm_modcl.adapter'
ADAPTER_FORMAT_VERSION = 2
_READABLE_VERSIONS = ('1', '2')
ADAPTER_FILE = 'adapter_model.safetensors'
ADAPTER_CONFIG_FILE = 'adapter_config.json'
INDEX_FILE = 'modcl_index.json'
INDEX_FORMAT = 'timm_modcl.adapters'
INDEX_FORMAT_VERSION = 1

_MAX_HEADER = 16 * 1024 * 1024
_MAX_FILE = 8 * 1024 ** 3
_MAX_JSON_FILE = 16 * 1024 * 1024
# a headless adapter gets a fresh head: at most this many times the values its file holds (or 1M values)
_FRESH_HEAD_FACTOR = 8
_PathLike = Union[str, os.PathLike]
_V1_RESOLUTIONS = [(a, b) for a in (1, 2, 4, 8, 16, 32, 64) for b in (1, 2, 4, 8, 16, 32, 64)]


# ---------------------------------------------------------------------------------------------------- file helpers
def _path(value: Any, what: str) -> Path:
    """``Path(value)`` for a str or os.PathLike; an ``AdapterError`` naming ``what`` for anything else."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        return Path(value)
    raise AdapterError(f'{what} must be a path (str or os.PathLike), got {type(value).__name__}')


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode()


def read_file(path: _PathLike, inside: Optional[_PathLike] = None, max_bytes: int = _MAX_FILE,
              what: str = 'file') -> bytes:
    """Read a regular file, refusing links, devices, FIFOs and folders (and, with ``inside``, any path component
    between ``inside`` and the file that is a link), so an adapter folder can only ever read its own files.

    Raises:
        AdapterError: the path is missing, not a regular file, a link inside the folder, or larger than ``max_bytes``.
    """
    path = Path(path)
    label = repr(str(path))
    try:
        if inside is not None:
            inside = Path(inside)
            rel = path.relative_to(inside)
            cur = inside
            for part in rel.parts:
                if part in ('..', '.'):
                    raise AdapterError(f'{label} leaves the adapter folder')
                cur = cur / part
                if stat.S_ISLNK(os.lstat(cur).st_mode):
                    raise AdapterError(f'{label} is (or is inside) a symbolic link; adapter folders are read '
                                       f'without following links')
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_NOFOLLOW', 0)
                     if inside is not None else os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    except FileNotFoundError:
        raise AdapterError(f'no such {what}: {label}') from None
    except IsADirectoryError:
        raise AdapterError(f'{label} is a folder, not a {what}') from None
    except ValueError:
        raise AdapterError(f'{label} is not inside {str(inside)!r}') from None
    except OSError as e:
        raise AdapterError(f'could not open {what} {label}: {e.strerror or e}') from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise AdapterError(f'{label} is a folder, not a {what}')
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(f'{label} is not a regular file (a device, FIFO or socket)')
        if info.st_size > max_bytes:
            raise AdapterError(f'{label} is {info.st_size:,} bytes, more than a {what} can be ({max_bytes:,})')
        with os.fdopen(fd, 'rb', closefd=True) as f:
            fd = None
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise AdapterError(f'could not read {what} {label}: {e.strerror or e}') from None
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > max_bytes:
        raise AdapterError(f'{label} is larger than a {what} can be ({max_bytes:,} bytes)')
    return data


def _canonical(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted (its writer orders metadata at random): same task, same bytes."""
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    return struct.pack('<Q', len(text)) + text + data[8 + n:]


def model_architecture(model) -> Tuple[str, str]:
    """``(architecture, pretrained tag)`` of a model, as adapter files and indexes record them: timm's
    ``pretrained_cfg`` (the ``modcl_*`` name of a registered model), else the model's class name and an empty tag.
    The one place the library derives a model's architecture name."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    return str(cfg.get('architecture') or type(model).__name__), str(cfg.get('tag', '') or '')


# ---------------------------------------------------------------------------------------------------- single task
def _header(task_meta: Mapping[str, Any], architecture: str, pretrained_tag: str, fingerprint: str,
            dtype: torch.dtype, has_head: bool, has_stats: bool) -> Dict[str, str]:
    return {
        'format': ADAPTER_FORMAT,
        'format_version': str(ADAPTER_FORMAT_VERSION),
        'timm_modcl_version': __version__,
        'architecture': architecture,
        'pretrained_tag': pretrained_tag,
        'backbone_fingerprint': fingerprint,
        'dtype': str(dtype).replace('torch.', ''),
        'has_head': 'true' if has_head else 'false',
        'has_stats': 'true' if has_stats else 'false',
        'task': json.dumps(task_meta, sort_keys=True),
    }


def adapter_metadata(model, task, dtype: torch.dtype, has_head: bool, has_stats: bool) -> Dict[str, str]:
    """The safetensors header metadata of a task adapter (all values are strings); ``task`` is a ``TaskPayload``
    (or anything with ``meta()``)."""
    arch, tag = model_architecture(model)
    return _header(task.meta(), arch, tag, model.backbone_fingerprint(), dtype, has_head, has_stats)


def payload_bytes(payload: TaskPayload, *, architecture: str, backbone_fingerprint: str, pretrained_tag: str = '',
                  dtype: Optional[torch.dtype] = None) -> bytes:
    """Serialise a payload as adapter file content (deterministic for a given payload), without a model.

    Raises:
        AdapterError: for an unsupported dtype, or a value that overflows it.
    """
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f'adapters are stored as float32, float16 or bfloat16, not {dtype}')
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in payload.tensors.items():
        v = v.detach()
        if v.is_floating_point() and v.dtype != dtype:
            v = v.to(dtype)
            if not torch.isfinite(v).all():
                raise AdapterError(f'task {payload.name!r}: {k} overflows {dtype}; save it as float32 or bfloat16')
        tensors[k] = v.to('cpu').contiguous()
    meta = _header(payload.meta(), architecture, pretrained_tag, backbone_fingerprint, dtype,
                   has_head=bool(payload.head), has_stats=bool(payload.stats))
    return _canonical(st_save(tensors, metadata=meta))


def adapter_bytes(model, name: str, dtype: Optional[torch.dtype] = None, include_head: bool = True,
                  include_stats: bool = True) -> bytes:
    """Serialise one task of ``model`` as adapter file content (deterministic for a given task).

    Raises:
        TaskNotFoundError: if the model has no such task.
        AdapterError: for an unsupported dtype, a value that overflows it, or a tensor the loader would refuse
            (NaN or Inf values, negative BN variances, modulators beyond ``MAX_MODULATOR``).
    """
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f'adapters are stored as float32, float16 or bfloat16, not {dtype}')
    try:
        payload = model.task_payload(name, head=include_head, stats=include_stats)
    except PayloadError as e:
        raise AdapterError(f'{e} (a diverged training run?); such an adapter would be refused when loaded') from None
    arch, tag = model_architecture(model)
    return payload_bytes(payload, architecture=arch, pretrained_tag=tag,
                         backbone_fingerprint=model.backbone_fingerprint(), dtype=dtype)


def save_task(
        model, name: str, path: _PathLike, dtype: Optional[torch.dtype] = None, include_head: bool = True,
        include_stats: bool = True,
) -> Path:
    """Save one task of ``model`` as a safetensors adapter file (atomically; an existing file keeps its mode).

    Args:
        model: A modcl model.
        name: The task to save.
        path: Target file (``.safetensors``), or an existing folder to write ``<folder>/<name>.safetensors`` into.
        dtype: Storage dtype for floating tensors: ``torch.float32`` (default, bit-exact), ``float16`` or
            ``bfloat16`` (half the size).
        include_head: Store the classifier head (default) or only the modulators and norm state.
        include_stats: Store the task's statistics (class prototypes for task-agnostic prediction), if it has any.

    Returns:
        The written file's path.

    Raises:
        TaskNotFoundError: if the model has no such task.
        AdapterError: for an unsupported dtype, an unwritable path, or a tensor the loader would refuse (NaN or
            Inf values, negative BN variances, modulators beyond ``MAX_MODULATOR``): nothing is written.
    """
    path = _path(path, 'the adapter path')
    if path.is_dir():
        path = path / f'{name}.safetensors'
    data = adapter_bytes(model, name, dtype=dtype, include_head=include_head, include_stats=include_stats)
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise AdapterError(f'could not write adapter {str(path)!r}: {e}') from e
