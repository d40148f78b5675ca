"""Task adapters: one task (modulators, BN running statistics, head, metadata) as one small safetensors file.

File format (``format_version`` 1): a safetensors file whose tensors use the flat task naming
(``modulator.<conv>``, ``bn.<bn>.running_mean|running_var|num_batches_tracked``, ``head.weight``, ``head.bias``) and
whose header metadata holds ``format``, ``format_version``, ``timm_modcl_version``, ``architecture``,
``pretrained_tag``, ``backbone_fingerprint`` (SHA-256 of the frozen backbone tensors), ``dtype``, ``has_head`` and
``task`` (JSON: name, num_classes, class_names, variant, resolution, metadata).

A folder of adapters (``save_tasks``) holds ``modcl_index.json`` and one ``<task>/adapter_model.safetensors`` plus a
human-readable ``<task>/adapter_config.json`` per task, as PEFT lays out its adapters.

Reading never unpickles anything; every write goes to a temporary file that is renamed into place.
"""
import json
import os
import struct
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._io import atomic_write_bytes
from .errors import AdapterError, AdapterFormatError, FingerprintMismatchError, TaskExistsError
from .task import BASE_TASK, TaskInfo, TaskState, validate_task_name
from .version import __version__

__all__ = [
    'ADAPTER_FORMAT', 'ADAPTER_FORMAT_VERSION', 'ADAPTER_FILE', 'ADAPTER_CONFIG_FILE', 'INDEX_FILE',
    'save_task', 'load_task', 'save_tasks', 'load_tasks', 'read_adapter', 'read_index', 'write_index', 'adapter_metadata',
    'atomic_write_bytes', 'load_task_files', 'AdapterMixin',
]

ADAPTER_FORMAT = 'timm_modcl.adapter'
ADAPTER_FORMAT_VERSION = 1
ADAPTER_FILE = 'adapter_model.safetensors'
ADAPTER_CONFIG_FILE = 'adapter_config.json'
INDEX_FILE = 'modcl_index.json'
INDEX_FORMAT = 'timm_modcl.adapters'

_MAX_HEADER = 16 * 1024 * 1024
_PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------- file helpers
def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + '\n').encode()


def _architecture(model) -> Tuple[str, str]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return str(cfg.get('architecture', type(model).__name__)), str(cfg.get('tag', '') or '')


# ---------------------------------------------------------------------------------------------------- single task
def adapter_metadata(model, task: TaskState, dtype: torch.dtype, has_head: bool) -> Dict[str, str]:
    """The safetensors header metadata of a task adapter (all values are strings)."""
    arch, tag = _architecture(model)
    return {
        'format': ADAPTER_FORMAT,
        'format_version': str(ADAPTER_FORMAT_VERSION),
        'timm_modcl_version': __version__,
        'architecture': arch,
        'pretrained_tag': tag,
        'backbone_fingerprint': model.backbone_fingerprint(),
        'dtype': str(dtype).replace('torch.', ''),
        'has_head': 'true' if has_head else 'false',
        'task': json.dumps(task.meta()),
    }


def adapter_bytes(model, name: str, dtype: Optional[torch.dtype] = None, include_head: bool = True) -> bytes:
    """Serialise one task of ``model`` as adapter file content.

    Raises:
        TaskNotFoundError: if the model has no such task.
        AdapterError: for an unsupported dtype.
    """
    task = model._task(name)
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f'adapters are stored as float32, float16 or bfloat16, not {dtype}')
    has_head = include_head and isinstance(task.head, torch.nn.Linear)
    tensors: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in task.tensors().items():
        if k.startswith('head.') and not has_head:
            continue
        v = v.detach()
        if v.is_floating_point() and v.dtype != dtype:
            v = v.to(dtype)
            if not torch.isfinite(v).all():
                raise AdapterError(f'task {name!r}: {k} overflows {dtype}; save it as float32 or bfloat16')
        tensors[k] = v.to('cpu').contiguous()
    return st_save(tensors, metadata=adapter_metadata(model, task, dtype, has_head))


def save_task(
        model, name: str, path: _PathLike, dtype: Optional[torch.dtype] = None, include_head: bool = True,
) -> Path:
    """Save one task of ``model`` as a safetensors adapter file (atomically).

    Args:
        model: A modcl model.
        name: The task to save.
        path: Target file (``.safetensors``), or an existing folder to write ``<folder>/<name>.safetensors`` into.
        dtype: Storage dtype for floating tensors: ``torch.float32`` (default, bit-exact), ``float16`` or
            ``bfloat16`` (half the size).
        include_head: Store the classifier head (default) or only the modulators and BN statistics.

    Returns:
        The written file's path.

    Raises:
        TaskNotFoundError: if the model has no such task.
        AdapterError: for an unsupported dtype or an unwritable path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / f'{name}.safetensors'
    data = adapter_bytes(model, name, dtype=dtype, include_head=include_head)
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise AdapterError(f'could not write adapter {str(path)!r}: {e}') from e


def _read_header(data: bytes, source: str) -> Dict[str, Any]:
    if data[:2] in (b'PK', b'\x80\x02', b'\x80\x03', b'\x80\x04', b'\x80\x05'):
        raise AdapterFormatError(
            f'{source} looks like a pickle / torch.save file; timm_modcl only reads safetensors adapters and never '
            f'unpickles files')
    if len(data) < 8:
        raise AdapterFormatError(f'{source} is not a safetensors file (only {len(data)} bytes)')
    (n,) = struct.unpack('<Q', data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise AdapterFormatError(f'{source} is truncated or not a safetensors file (header length {n})')
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterFormatError(f'{source} has a corrupt safetensors header: {e}') from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f'{source} has a corrupt safetensors header')
    return header


def read_adapter(source: Union[_PathLike, bytes], name: str = 'adapter') -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """Read an adapter file (path or bytes) into ``(metadata, tensors)``, checking the format but not the model fit.

    Raises:
        AdapterFormatError: if it is not a readable timm_modcl adapter (corrupt, truncated, pickle, other
            safetensors file, unknown format version).
        AdapterError: if the file cannot be read.
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except IsADirectoryError:
            raise AdapterError(f'{name!r} is a folder; use load_tasks() for a folder of adapters') from None
        except OSError as e:
            raise AdapterError(f'could not read adapter {name!r}: {e}') from e
    header = _read_header(data, repr(name))
    meta = header.get('__metadata__')
    if not isinstance(meta, dict) or meta.get('format') != ADAPTER_FORMAT:
        raise AdapterFormatError(f'{name!r} is a safetensors file but not a timm_modcl task adapter')
    if meta.get('format_version') != str(ADAPTER_FORMAT_VERSION):
        raise AdapterFormatError(
            f'{name!r} has adapter format version {meta.get("format_version")!r}; this timm_modcl '
            f'({__version__}) reads version {ADAPTER_FORMAT_VERSION}')
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise AdapterFormatError(f'{name!r} is corrupt: {e}') from None
    return {str(k): str(v) for k, v in meta.items()}, tensors


def _task_meta(meta: Mapping[str, str], source: str) -> Dict[str, Any]:
    try:
        task_meta = json.loads(meta.get('task', ''))
    except ValueError:
        raise AdapterFormatError(f'{source} has corrupt task metadata') from None
    if not isinstance(task_meta, dict):
        raise AdapterFormatError(f'{source} has corrupt task metadata')
    return task_meta


def _check_fit(model, meta: Mapping[str, str], source: str, allow_fingerprint_mismatch: bool) -> None:
    arch, _ = _architecture(model)
    if meta.get('architecture') and meta['architecture'] != arch:
        raise AdapterFormatError(f'{source} was made for {meta["architecture"]}, the model is {arch}')
    theirs, ours = meta.get('backbone_fingerprint', ''), model.backbone_fingerprint()
    if theirs != ours:
        msg = (f'{source} was trained on other backbone weights (fingerprint {theirs[:12] or "missing"}..., '
               f'model {ours[:12]}...)')
        if not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(msg + '; pass allow_fingerprint_mismatch=True to load it anyway')
        warnings.warn(msg + '; loading anyway because allow_fingerprint_mismatch=True', stacklevel=3)


def build_task(
        model, source: Union[_PathLike, bytes], name: Optional[str] = None, allow_fingerprint_mismatch: bool = False,
        label: Optional[str] = None,
) -> TaskState:
    """Read and validate an adapter and build its task for ``model`` without adding it (the model is unchanged).

    Raises:
        AdapterFormatError, FingerprintMismatchError, AdapterError, InvalidTaskNameError: see ``load_task``.
    """
    label = label or (repr(str(source)) if not isinstance(source, (bytes, bytearray)) else 'adapter')
    meta, tensors = read_adapter(source, label.strip("'"))
    task_meta = _task_meta(meta, label)
    _check_fit(model, meta, label, allow_fingerprint_mismatch)
    if name is not None:
        task_meta['name'] = validate_task_name(name)
    if meta.get('has_head') == 'false' and model._has_head and task_meta.get('num_classes'):
        fresh = model._new_head(int(task_meta['num_classes']))  # headless adapter: a new, untrained head
        tensors.update({f'head.{k}': v for k, v in fresh.state_dict().items()})
        warnings.warn(f'{label} has no head; task {task_meta.get("name")!r} gets a new, untrained head', stacklevel=3)
    task = model._task_from_tensors(task_meta, tensors, error=AdapterFormatError)
    if task.name == BASE_TASK:
        raise AdapterFormatError(f'{label} is named {BASE_TASK!r}, which is reserved; load it under another name')
    return task


def load_task(
        model, path: Union[_PathLike, bytes], name: Optional[str] = None, replace: bool = False,
        allow_fingerprint_mismatch: bool = False, activate: bool = False,
) -> TaskInfo:
    """Add the task stored in an adapter file to ``model``.

    Everything is read and validated before the model is touched: on any error the model is unchanged.

    Args:
        model: A modcl model with the same architecture (and backbone weights) the adapter was trained on.
        path: The adapter file (or its bytes).
        name: Load under this name instead of the stored one.
        replace: Replace an existing task of that name instead of raising.
        allow_fingerprint_mismatch: Load even if the adapter was trained on other backbone weights (warns).
        activate: Make the loaded task the active one.

    Returns:
        The loaded task's ``TaskInfo``.

    Raises:
        AdapterFormatError: corrupt or truncated file, not an adapter, pickle file, unknown format version,
            missing / extra tensors, wrong shapes, NaN/Inf values, other architecture.
        FingerprintMismatchError: trained on other backbone weights (unless allowed).
        TaskExistsError: a task of that name exists (unless ``replace``).
        InvalidTaskNameError: bad ``name``.
        AdapterError: the file cannot be read.
    """
    task = build_task(model, path, name=name, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
    if task.name in model._tasks and not replace:
        raise TaskExistsError(f'task {task.name!r} already exists (pass replace=True, or load it under another name)')
    model._insert_task(task, activate=activate)
    return task.info()


# ---------------------------------------------------------------------------------------------------- folders
def _task_file(directory: Path, name: str) -> Path:
    validate_task_name(name)
    return directory / name / ADAPTER_FILE


def save_tasks(
        model, directory: _PathLike, names: Optional[Iterable[str]] = None, dtype: Optional[torch.dtype] = None,
        include_head: bool = True,
) -> Path:
    """Save tasks of ``model`` (default: all but ``base``) into a folder with one adapter per task and an index.

    Tasks already in the folder's index that are not saved now stay listed (their files are kept).

    Returns:
        The folder.

    Raises:
        TaskNotFoundError: if a named task does not exist.
        AdapterError: if the folder cannot be written.
    """
    directory = Path(directory)
    names = [n for n in model._tasks if n != BASE_TASK] if names is None else list(names)
    for n in names:
        model._task(n)
    arch, tag = _architecture(model)
    fingerprint = model.backbone_fingerprint()
    index_tasks: List[str] = []
    if (directory / INDEX_FILE).is_file():
        old = read_index(directory)
        if old.get('architecture') == arch and old.get('backbone_fingerprint') == fingerprint:
            index_tasks = [t for t in old.get('tasks', []) if (directory / t / ADAPTER_FILE).is_file()]
    try:
        for n in names:
            data = adapter_bytes(model, n, dtype=dtype, include_head=include_head)
            atomic_write_bytes(_task_file(directory, n), data)
            config = dict(model._task(n).meta(), architecture=arch, pretrained_tag=tag,
                          backbone_fingerprint=fingerprint, timm_modcl_version=__version__,
                          format=ADAPTER_FORMAT, format_version=ADAPTER_FORMAT_VERSION,
                          dtype=str(dtype or torch.float32).replace('torch.', ''))
            atomic_write_bytes(directory / n / ADAPTER_CONFIG_FILE, _json_bytes(config))
            if n not in index_tasks:
                index_tasks.append(n)
        write_index(model, directory, index_tasks)
    except OSError as e:
        raise AdapterError(f'could not write adapters to {str(directory)!r}: {e}') from e
    return directory


def write_index(model, directory: _PathLike, tasks: List[str]) -> Path:
    """Write a folder's ``modcl_index.json`` listing ``tasks`` of ``model``'s architecture and backbone."""
    arch, tag = _architecture(model)
    index = {
        'format': INDEX_FORMAT,
        'format_version': ADAPTER_FORMAT_VERSION,
        'timm_modcl_version': __version__,
        'architecture': arch,
        'pretrained_tag': tag,
        'backbone_fingerprint': model.backbone_fingerprint(),
        'tasks': list(tasks),
    }
    return atomic_write_bytes(Path(directory) / INDEX_FILE, _json_bytes(index))


def read_index(directory: _PathLike) -> Dict[str, Any]:
    """Read and check a folder's ``modcl_index.json``.

    Raises:
        AdapterError: if the folder or its index is missing.
        AdapterFormatError: if the index is corrupt or lists invalid task names.
    """
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise AdapterError(f'{str(directory)!r} has no {INDEX_FILE}: not a folder of timm_modcl adapters')
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterFormatError(f'{str(path)!r} is corrupt: {e}') from None
    if not isinstance(index, dict) or index.get('format') != INDEX_FORMAT:
        raise AdapterFormatError(f'{str(path)!r} is not a timm_modcl adapter index')
    if index.get('format_version') != ADAPTER_FORMAT_VERSION:
        raise AdapterFormatError(f'{str(path)!r} has unknown format version {index.get("format_version")!r}')
    tasks = index.get('tasks')
    if not isinstance(tasks, list):
        raise AdapterFormatError(f'{str(path)!r} lists no tasks')
    for t in tasks:
        try:
            validate_task_name(t)
        except Exception as e:
            raise AdapterFormatError(f'{str(path)!r} lists an invalid task name: {e}') from None
    return index


def load_tasks(
        model, directory: _PathLike, names: Optional[Iterable[str]] = None, replace: bool = False,
        allow_fingerprint_mismatch: bool = False,
) -> List[str]:
    """Add the tasks of an adapter folder (default: all it lists) to ``model``, all or nothing.

    Returns:
        The loaded task names, in index order.

    Raises:
        AdapterError, AdapterFormatError, FingerprintMismatchError, TaskExistsError, TaskNotFoundError: as
        ``load_task``, or when a requested task is not in the folder. On error the model is unchanged.
    """
    directory = Path(directory)
    index = read_index(directory)
    wanted = list(index['tasks']) if names is None else list(names)
    for n in wanted:
        if n not in index['tasks']:
            raise AdapterError(f'{str(directory)!r} has no task {n!r}; it has {index["tasks"]}')
    return load_task_files(
        model, {n: _task_file(directory, n) for n in wanted}, replace=replace,
        allow_fingerprint_mismatch=allow_fingerprint_mismatch, label=str(directory))


def load_task_files(
        model, files: Mapping[str, Union[_PathLike, bytes]], replace: bool = False,
        allow_fingerprint_mismatch: bool = False, label: str = 'adapters',
) -> List[str]:
    """Add several adapters ``{task name: file}`` to ``model``, all or nothing (see ``load_tasks``)."""
    built: 'OrderedDict[str, TaskState]' = OrderedDict()
    for n, source in files.items():
        task = build_task(model, source, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
        if task.name != n:
            raise AdapterFormatError(f'{label!r}: the adapter of task {n!r} is named {task.name!r}')
        if n in model._tasks and not replace:
            raise TaskExistsError(f'task {n!r} already exists (pass replace=True)')
        built[n] = task
    for task in built.values():
        model._insert_task(task, activate=False)
    return list(built)


class AdapterMixin:
    """Adapter file methods of modcl models (see the module functions for the details)."""

    def save_task(self, name: str, path: _PathLike, dtype: Optional[torch.dtype] = None,
                  include_head: bool = True) -> Path:
        """Save one task as a safetensors adapter file; see ``timm_modcl.adapter.save_task``."""
        return save_task(self, name, path, dtype=dtype, include_head=include_head)

    def load_task(self, path: Union[_PathLike, bytes], name: Optional[str] = None, replace: bool = False,
                  allow_fingerprint_mismatch: bool = False, activate: bool = False) -> TaskInfo:
        """Add the task of an adapter file; see ``timm_modcl.adapter.load_task``."""
        return load_task(self, path, name=name, replace=replace,
                         allow_fingerprint_mismatch=allow_fingerprint_mismatch, activate=activate)

    def save_tasks(self, directory: _PathLike, names: Optional[Iterable[str]] = None,
                   dtype: Optional[torch.dtype] = None, include_head: bool = True) -> Path:
        """Save tasks into an adapter folder with an index; see ``timm_modcl.adapter.save_tasks``."""
        return save_tasks(self, directory, names=names, dtype=dtype, include_head=include_head)

    def load_tasks(self, directory: _PathLike, names: Optional[Iterable[str]] = None, replace: bool = False,
                   allow_fingerprint_mismatch: bool = False) -> List[str]:
        """Add the tasks of an adapter folder, all or nothing; see ``timm_modcl.adapter.load_tasks``."""
        return load_tasks(self, directory, names=names, replace=replace,
                          allow_fingerprint_mismatch=allow_fingerprint_mismatch)
