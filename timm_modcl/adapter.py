"""Task adapters: one task (modulators, norm statistics and affine, head, metadata) as one small safetensors file.

File format (``format_version`` 2): a safetensors file whose tensors use the flat task naming of ``TaskState``
(``modulator.<layer>``, ``bn.<layer>.running_mean|running_var|num_batches_tracked``, ``norm.<layer>.weight|bias``,
``head.weight|bias``, and ``stats.<name>`` when the task has statistics such as class prototypes) and whose header
metadata holds ``format``, ``format_version``, ``timm_modcl_version``, ``architecture``, ``pretrained_tag``,
``backbone_fingerprint`` (SHA-256 of the frozen backbone tensors), ``dtype``, ``has_head``, ``has_stats`` and ``task``
(JSON: name, num_classes, class_names, config, metadata). The header is written with sorted keys, so the same task
always gives the same bytes.

Version 1 files (timm_modcl 0.1) still load: they had no config, so it is rebuilt from the recorded resolution and
variant and the modulator shapes present (a layer without modulator is unmodulated; a layer whose modulator has another
shape gets the per-layer resolution that produces it).

A folder of adapters (``save_tasks``) holds ``modcl_index.json`` and one ``<task>/adapter_model.safetensors`` plus a
human-readable ``<task>/adapter_config.json`` per task, as PEFT lays out its adapters. The index records the
architecture, the backbone fingerprint and (since 0.3) its ``layers`` (``payload.LayerTable``), so folders are
validated, merged, pushed and pulled without building a backbone (``read_folder``, ``check_adapters``).

Every adapter is read into a ``payload.TaskPayload``, the one place where a task's tensors are validated.

Reading never unpickles anything and reads only regular files (inside an adapter folder: no links); every write goes
to a temporary file that is renamed into place.
"""
import contextlib
import errno
import json
import os
import shutil
import stat
import struct
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import save as st_save

from ._io import _umask, atomic_write_bytes, folder_lock, load_json
from .config import TaskConfig
from .errors import (
    AdapterError, AdapterFormatError, FingerprintMismatchError, PayloadError, TaskError, TaskExistsError,
)
from .layers import modulator_shape
from .payload import LayerTable, TaskPayload, read_safetensors
from .task import BASE_TASK, TaskInfo, validate_task_name
from .version import __version__

__all__ = [
    'ADAPTER_FORMAT', 'ADAPTER_FORMAT_VERSION', 'ADAPTER_FILE', 'ADAPTER_CONFIG_FILE', 'INDEX_FILE',
    'save_task', 'load_task', 'save_tasks', 'load_tasks', 'read_adapter', 'read_index', 'read_index_file', 'parse_index', 'write_index',
    'adapter_metadata', 'adapter_bytes', 'describe_adapter', 'load_task_files', 'merge_adapter_folders',
    'read_file', 'AdapterMixin', 'payload_bytes', 'adapter_payload', 'read_payload', 'read_folder', 'check_adapters',
    'index_bytes', 'index_layer_table', 'adapter_config_bytes', 'model_architecture',
]

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


def read_adapter(source: Union[_PathLike, bytes], name: str = 'adapter', inside: Optional[_PathLike] = None,
                 ) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """Read an adapter file (path or bytes) into ``(metadata, tensors)``, checking the format but not the model fit.

    Raises:
        AdapterFormatError: if it is not a readable timm_modcl adapter (corrupt, truncated, pickle, other
            safetensors file, unknown format version).
        AdapterError: if the file cannot be read (missing, a folder, a link inside an adapter folder, a device).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        name = str(source)
        if Path(source).is_dir():
            raise AdapterError(f'{name!r} is a folder; use load_tasks() for a folder of adapters')
        data = read_file(source, inside=inside, what='adapter file')
    try:
        meta, tensors = read_safetensors(data, repr(name), max_header=_MAX_HEADER)
    except PayloadError as e:
        raise AdapterFormatError(str(e)) from None
    if meta.get('format') != ADAPTER_FORMAT:
        raise AdapterFormatError(f'{name!r} is a safetensors file but not a timm_modcl task adapter')
    if meta.get('format_version') not in _READABLE_VERSIONS:
        raise AdapterFormatError(
            f'{name!r} has adapter format version {meta.get("format_version")!r}; this timm_modcl '
            f'({__version__}) reads versions {", ".join(_READABLE_VERSIONS)}')
    return meta, tensors


def _v1_config(weights: Optional[Mapping[str, Tuple[Tuple[int, ...], int]]], task_meta: Mapping[str, Any],
               tensors: Mapping[str, torch.Tensor], source: str) -> TaskConfig:
    """The config a version-1 (timm_modcl 0.1) adapter was built with, rebuilt from its resolution and, given the
    architecture's weight layers ``{layer: (weight shape, chunks)}``, the modulator shapes it holds."""
    res = task_meta.get('resolution')
    variant = task_meta.get('variant') or 'identity'
    try:
        base = TaskConfig(resolution=None if res is None else tuple(res), variant=variant)
    except (TaskError, TypeError) as e:
        raise AdapterFormatError(f'{source}: {e}') from None
    overrides = []
    for layer, (shape, _) in (weights or {}).items():
        expected = None if base.resolution is None else modulator_shape(shape, base.resolution)
        t = tensors.get(f'modulator.{layer}')
        if t is None:
            if expected is not None:
                overrides.append((layer, None))
            continue
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else None
        if got == expected:
            continue
        match = next((r for r in _V1_RESOLUTIONS if got is not None and modulator_shape(shape, r) == got), None)
        if match is None:
            raise AdapterFormatError(f'{source}: modulator.{layer} has shape {got}, which no resolution gives for '
                                     f'the layer weight {shape}')
        overrides.append((layer, match))
    return TaskConfig(resolution=base.resolution, variant=variant, layer_resolution=tuple(overrides))


def _task_json(meta: Mapping[str, str], source: str) -> Dict[str, Any]:
    """The ``task`` entry of an adapter header, as a dict."""
    task_meta = load_json(meta.get('task', ''), AdapterFormatError, f'the task metadata of {source}')
    if not isinstance(task_meta, dict):
        raise AdapterFormatError(f'{source} has corrupt task metadata')
    return task_meta


def adapter_payload(
        meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], label: str = 'adapter', *,
        table: Optional[LayerTable] = None, name: Optional[str] = None,
) -> TaskPayload:
    """The validated ``TaskPayload`` of an adapter read by ``read_adapter``; with the architecture's ``table``, also
    checked against its layers (and a version-1 config rebuilt from them).

    Raises:
        AdapterFormatError: malformed task description or tensors, or (with ``table``) tensors that do not fit.
        InvalidTaskNameError: a bad ``name``.
    """
    task_meta = _task_json(meta, label)
    if meta.get('format_version') == '1':
        task_meta = dict(task_meta, config=_v1_config(None if table is None else table.weights, task_meta, tensors,
                                                      label).to_dict())
        task_meta.pop('variant', None)
        task_meta.pop('resolution', None)
    if name is not None:
        task_meta['name'] = validate_task_name(name)
    headless = meta.get('has_head') == 'false' and not any(k.startswith('head.') for k in tensors)
    max_fresh_head = max(_FRESH_HEAD_FACTOR * sum(t.numel() for t in tensors.values()), 1_000_000)
    try:
        if headless and table is not None:  # before anything else is looked at: the largest allocation asked for
            table.check_fresh_head(task_meta.get('name'), task_meta.get('num_classes'), max_fresh_head)
        payload = TaskPayload.from_meta(task_meta, tensors, headless=headless and bool(task_meta.get('num_classes')))
        if table is not None:
            payload.check(table, max_fresh_head=max_fresh_head)
    except PayloadError as e:
        raise AdapterFormatError(f'{label}: {e}') from None
    return payload


def _check_fit(model, meta: Mapping[str, str], source: str, allow_fingerprint_mismatch: bool) -> None:
    arch, _ = model_architecture(model)
    if meta.get('architecture') and meta['architecture'] != arch:
        raise AdapterFormatError(f'{source} was made for {meta["architecture"]}, the model is {arch}')
    theirs, ours = meta.get('backbone_fingerprint', ''), model.backbone_fingerprint()
    if theirs != ours:
        msg = (f'{source} was trained on other backbone weights (fingerprint {theirs[:12] or "missing"}..., '
               f'model {ours[:12]}...)')
        if not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(msg + '; pass allow_fingerprint_mismatch=True to load it anyway')
        warnings.warn(msg + '; loading anyway because allow_fingerprint_mismatch=True', stacklevel=4)


def read_payload(
        model, source: Union[_PathLike, bytes], name: Optional[str] = None, allow_fingerprint_mismatch: bool = False,
        label: Optional[str] = None, inside: Optional[_PathLike] = None,
) -> TaskPayload:
    """Read an adapter and validate it for ``model`` (architecture, fingerprint, every tensor against the model's
    layers) without adding it: the model is unchanged.

    Raises:
        AdapterFormatError, FingerprintMismatchError, AdapterError, InvalidTaskNameError: see ``load_task``.
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise AdapterError(f'an adapter is a file path or the bytes of a file, got {type(source).__name__}')
    label = label or (repr(str(source)) if not isinstance(source, (bytes, bytearray)) else 'adapter')
    meta, tensors = read_adapter(source, label.strip("'"), inside=inside)
    _check_fit(model, meta, label, allow_fingerprint_mismatch)
    payload = adapter_payload(meta, tensors, label, table=model.layer_table(), name=name)
    if payload.name == BASE_TASK:
        raise AdapterFormatError(f'{label} is named {BASE_TASK!r}, which is reserved; load it under another name')
    try:
        model.check_payload(payload)
    except PayloadError as e:
        raise AdapterFormatError(f'{label}: {e}') from None
    return payload


def _add_payloads(model, payloads: Mapping[str, TaskPayload], replace: bool, activate: bool) -> List[str]:
    """``model.load_payloads`` with its errors as adapter errors, warning about tasks that get a fresh head."""
    try:
        names = model.load_payloads(list(payloads.values()), replace=replace, activate=activate)
    except PayloadError as e:
        raise AdapterFormatError(str(e)) from None
    for label, p in payloads.items():
        if p.headless:
            warnings.warn(f'{label} has no head; task {p.name!r} gets a new, untrained head', stacklevel=4)
    return names


def load_task(
        model, path: Union[_PathLike, bytes], name: Optional[str] = None, replace: bool = False,
        allow_fingerprint_mismatch: bool = False, activate: bool = False,
) -> TaskInfo:
    """Add the task stored in an adapter file to ``model``.

    Everything is read and validated before the model is touched: on any error the model (and the global random
    state) is unchanged.

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
            missing / extra tensors (every tensor the task's config needs must be there), wrong shapes or dtypes,
            NaN/Inf or out-of-range values, other architecture.
        FingerprintMismatchError: trained on other backbone weights (unless allowed).
        TaskExistsError: a task of that name exists (unless ``replace``).
        InvalidTaskNameError: bad ``name``.
        AdapterError: the file cannot be read (missing, a folder, a device or FIFO), or ``path`` is neither a path
            nor bytes.
    """
    payload = read_payload(model, path, name=name, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
    label = repr(str(path)) if not isinstance(path, (bytes, bytearray)) else 'adapter'
    (n,) = _add_payloads(model, {label: payload}, replace=replace, activate=activate)
    return model.task_info(n)


def describe_adapter(source: Union[_PathLike, bytes], inside: Optional[_PathLike] = None) -> Dict[str, Any]:
    """A validated summary of an adapter file without a model: format, architecture, fingerprint, dtype, task name,
    classes, config and sizes (what ``modcl info`` prints).

    Raises:
        AdapterFormatError, AdapterError: as ``read_adapter``, or when the task metadata or a tensor is malformed.
    """
    label = 'adapter' if isinstance(source, (bytes, bytearray)) else repr(str(source))
    meta, tensors = read_adapter(source, label.strip("'"), inside=inside)
    payload = adapter_payload(meta, tensors, label)
    return dict(
        payload.describe(),
        name=payload.name,
        num_classes=payload.num_classes,
        class_names=None if payload.class_names is None else list(payload.class_names),
        config=payload.config,
        format_version=int(meta['format_version']),
        architecture=meta.get('architecture', ''),
        pretrained_tag=meta.get('pretrained_tag', ''),
        backbone_fingerprint=meta.get('backbone_fingerprint', ''),
        dtype=meta.get('dtype', ''),
        has_head=meta.get('has_head') != 'false',
        has_stats=bool(payload.stats),
        timm_modcl_version=meta.get('timm_modcl_version', ''),
        metadata=dict(payload.metadata),
    )


# ---------------------------------------------------------------------------------------------------- folders
def _task_file(directory: Path, name: str) -> Path:
    validate_task_name(name)
    return directory / name / ADAPTER_FILE


def save_tasks(
        model, directory: _PathLike, names: Optional[Iterable[str]] = None, dtype: Optional[torch.dtype] = None,
        include_head: bool = True,
) -> Path:
    """Save tasks of ``model`` (default: all but ``base``) into a folder with one adapter per task and an index.

    Tasks already in the folder's index that are not saved now stay listed (their files are kept). Writers of one
    folder, in any process, serialise on an OS lock of the folder, under which the index is re-read and updated, so
    concurrent saves and merges lose no task.

    Returns:
        The folder.

    Raises:
        TaskNotFoundError: if a named task does not exist.
        AdapterError: if the folder cannot be written, a task's folder or file in it is a symbolic link, another
            writer held the folder for over two minutes, or a task has a tensor the loader would refuse (NaN or Inf
            values, ...): then nothing is written.
    """
    directory = _path(directory, 'the adapter folder')
    names = [n for n in model.tasks if n != BASE_TASK] if names is None else task_names(names)
    for n in names:
        model.task_tensors(n)  # TaskNotFoundError before anything is written
    arch, tag = model_architecture(model)
    fingerprint = model.backbone_fingerprint()
    # every task serialised first: one that cannot be (an fp16 overflow) fails before any file is written
    files = {}
    for n in names:
        data = adapter_bytes(model, n, dtype=dtype, include_head=include_head)
        files[n] = (data, adapter_config_bytes(data))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterError(f'could not create the adapter folder {str(directory)!r}: {e}') from e
    # writers of one folder (in any process) serialise, and the index is read, changed and written under the lock:
    # a task another writer listed meanwhile stays listed
    with folder_lock(directory, AdapterError):
        _finish_interrupted(directory)
        _check_task_folders(directory, files)
        index_tasks: List[str] = []
        if (directory / INDEX_FILE).is_file():
            old = read_index(directory)
            if old.get('architecture') == arch and old.get('backbone_fingerprint') == fingerprint:
                index_tasks = [t for t in old.get('tasks', []) if (directory / t / ADAPTER_FILE).is_file()]
        try:
            for n, (data, config) in files.items():
                atomic_write_bytes(_task_file(directory, n), data)
                atomic_write_bytes(directory / n / ADAPTER_CONFIG_FILE, config)
                if n not in index_tasks:
                    index_tasks.append(n)
            write_index(model, directory, index_tasks)
        except OSError as e:
            raise AdapterError(f'could not write adapters to {str(directory)!r}: {e}') from e
    return directory


def adapter_config_bytes(data: bytes) -> bytes:
    """The human-readable ``adapter_config.json`` of an adapter: its task description and header fields.

    Raises:
        AdapterFormatError: not a readable adapter.
    """
    meta, _ = read_adapter(data)
    config = dict(_task_json(meta, 'adapter'))
    config.update({k: meta.get(k, '') for k in ('architecture', 'pretrained_tag', 'backbone_fingerprint',
                                                 'timm_modcl_version', 'format', 'dtype')})
    config['format_version'] = int(meta['format_version'])
    return _json_bytes(config)


def _check_task_folders(directory: Path, names: Iterable[str]) -> None:
    """Refuse to write a task whose folder (or file) in ``directory`` is a link or not a folder: writing through it
    would put files outside the adapter folder.

    Raises:
        AdapterError: naming the first such task.
    """
    for n in names:
        for path, kind in ((directory / n, 'folder'), (directory / n / ADAPTER_FILE, 'file'),
                           (directory / n / ADAPTER_CONFIG_FILE, 'file')):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError as e:
                raise AdapterError(f'cannot check {str(path)!r}: {e.strerror or e}') from None
            if stat.S_ISLNK(mode):
                raise AdapterError(f'{str(path)!r} is a symbolic link; adapter folders are written without following '
                                   f'links (remove it first); nothing was written')
            if kind == 'folder' and not stat.S_ISDIR(mode) or kind == 'file' and not stat.S_ISREG(mode):
                raise AdapterError(f'{str(path)!r} is not a {kind}; nothing was written')


def _index(arch: str, tag: str, fingerprint: str, tasks: List[str], layers: Optional[Mapping[str, Any]] = None
           ) -> Dict[str, Any]:
    index = {
        'format': INDEX_FORMAT,
        'format_version': INDEX_FORMAT_VERSION,
        'timm_modcl_version': __version__,
        'architecture': arch,
        'pretrained_tag': tag,
        'backbone_fingerprint': fingerprint,
        'tasks': list(tasks),
    }
    if layers is not None:
        index['layers'] = layers
    return index


def index_bytes(index: Mapping[str, Any], tasks: List[str]) -> bytes:
    """The bytes of an index like ``index`` (a checked one: same architecture, backbone and layer table) listing
    ``tasks``."""
    return _json_bytes(_index(index['architecture'], index.get('pretrained_tag', ''), index['backbone_fingerprint'],
                              list(tasks), index.get('layers')))


def index_layer_table(index: Mapping[str, Any]) -> Optional[LayerTable]:
    """The layer table a checked index records (``None`` for an index written before timm_modcl 0.3)."""
    layers = index.get('layers')
    return None if layers is None else LayerTable.from_dict(layers)


def write_index(model, directory: _PathLike, tasks: List[str]) -> Path:
    """Write a folder's ``modcl_index.json`` listing ``tasks`` of ``model``'s architecture, backbone and layers."""
    arch, tag = model_architecture(model)
    return atomic_write_bytes(Path(directory) / INDEX_FILE, _json_bytes(
        _index(arch, tag, model.backbone_fingerprint(), tasks, model.layer_table().to_dict())))


def read_index(directory: _PathLike) -> Dict[str, Any]:
    """Read and check a folder's ``modcl_index.json``.

    Raises:
        AdapterError: if the folder or its index is missing, or the index is not a regular file.
        AdapterFormatError: if the index is corrupt or lists invalid task names.
    """
    path = Path(directory) / INDEX_FILE
    if not path.exists() and not path.is_symlink():
        raise AdapterError(f'{str(directory)!r} has no {INDEX_FILE}: not a folder of timm_modcl adapters')
    return parse_index(read_file(path, inside=directory, max_bytes=_MAX_JSON_FILE, what='adapter index'), str(path))


def read_index_file(path: _PathLike, label: Optional[str] = None) -> Dict[str, Any]:
    """Read and check one ``modcl_index.json`` file (links followed: e.g. a Hub cache entry); see ``read_index``."""
    return parse_index(read_file(path, max_bytes=_MAX_JSON_FILE, what='adapter index'), label or str(path))


def parse_index(data: bytes, label: str) -> Dict[str, Any]:
    """Check the content of a ``modcl_index.json`` (see ``read_index``)."""
    index = load_json(data, AdapterFormatError, repr(label))
    if not isinstance(index, dict) or index.get('format') != INDEX_FORMAT:
        raise AdapterFormatError(f'{label!r} is not a timm_modcl adapter index')
    if index.get('format_version') != INDEX_FORMAT_VERSION:
        raise AdapterFormatError(f'{label!r} has unknown format version {index.get("format_version")!r}')
    tasks = index.get('tasks')
    if not isinstance(tasks, list):
        raise AdapterFormatError(f'{label!r} lists no tasks')
    for t in tasks:
        try:
            validate_task_name(t)
        except TaskError as e:
            raise AdapterFormatError(f'{label!r} lists an invalid task name: {e}') from None
    if len(set(tasks)) != len(tasks):
        raise AdapterFormatError(f'{label!r} lists a task twice')
    for key in ('architecture', 'backbone_fingerprint'):
        if not isinstance(index.get(key), str):
            raise AdapterFormatError(f'{label!r} has no valid {key!r}')
    if index.get('layers') is not None:
        try:
            LayerTable.from_dict(index['layers'])
        except PayloadError as e:
            raise AdapterFormatError(f'{label!r}: {e}') from None
    return index


def task_names(names: Iterable[str]) -> List[str]:
    """A list of task names; one string is one name (not its characters)."""
    if isinstance(names, str):
        return [names]
    try:
        return list(names)
    except TypeError:
        raise TaskError(f'names must be a task name or a list of task names, got {type(names).__name__}') from None


def load_tasks(
        model, directory: _PathLike, names: Optional[Iterable[str]] = None, replace: bool = False,
        allow_fingerprint_mismatch: bool = False,
) -> List[str]:
    """Add the tasks of an adapter folder (default: all it lists) to ``model``, all or nothing.

    Only regular files inside the folder are read (links, devices and FIFOs are refused).

    Returns:
        The loaded task names, in index order.

    Raises:
        AdapterError, AdapterFormatError, FingerprintMismatchError, TaskExistsError: as ``load_task``, or when a
        requested task is not in the folder. On error the model is unchanged.
    """
    directory = _path(directory, 'the adapter folder')
    index = read_index(directory)
    wanted = list(index['tasks']) if names is None else task_names(names)
    for n in wanted:
        if n not in index['tasks']:
            raise AdapterError(f'{str(directory)!r} has no task {n!r}; it has {index["tasks"]}')
    return load_task_files(
        model, {n: _task_file(directory, n) for n in wanted}, replace=replace,
        allow_fingerprint_mismatch=allow_fingerprint_mismatch, label=str(directory), inside=directory)


def load_task_files(
        model, files: Mapping[str, Union[_PathLike, bytes]], replace: bool = False,
        allow_fingerprint_mismatch: bool = False, label: str = 'adapters', inside: Optional[_PathLike] = None,
) -> List[str]:
    """Add several adapters ``{task name: file}`` to ``model``, all or nothing (see ``load_tasks``)."""
    built: 'OrderedDict[str, TaskPayload]' = OrderedDict()
    existing = model.tasks
    for n, source in files.items():
        payload = read_payload(model, source, allow_fingerprint_mismatch=allow_fingerprint_mismatch, inside=inside)
        if payload.name != n:
            raise AdapterFormatError(f'{label!r}: the adapter of task {n!r} is named {payload.name!r}')
        if n in existing and not replace:
            raise TaskExistsError(f'task {n!r} already exists (pass replace=True)')
        built[repr(str(source)) if not isinstance(source, (bytes, bytearray)) else n] = payload
    return _add_payloads(model, built, replace=replace, activate=False)


def merge_adapter_folders(sources: Iterable[_PathLike], destination: _PathLike, replace: bool = False) -> List[str]:
    """Merge adapter folders written from the same backbone (e.g. by workers that each learned some tasks) into one.

    Every source index and adapter is validated first, each adapter as the loader would (header, every tensor's
    shape against the task's config and the architecture, finiteness, value bounds), and all must share the
    architecture and the backbone fingerprint; nothing is written unless all of them pass. The adapter files are
    copied byte for byte, so each merged task is bit-identical to its worker's. ``destination`` may already hold
    adapters of the same backbone (they stay listed, first); a folder named twice, or the destination named as a
    source, is read once.

    Writers of one folder serialise (an OS lock on the folder), and the destination's index is re-read under the
    lock, so concurrent merges and saves lose no task. New files are staged in a hidden folder of the destination,
    then a commit record is written, then they are renamed into place, the index last: a merge killed before the
    record leaves the destination as it was; one killed after it (in the last renames) leaves the old index, whose
    files are all whole, and the next writer of the folder (a save or merge) finishes it. A new destination is built
    beside its final name and renamed into place whole, so an interrupted merge leaves no new destination at all.
    Task folders or files in the destination that are symbolic links are refused, not followed.

    Returns:
        The task names of the merged index, in order.

    Raises:
        FingerprintMismatchError: sources (or the destination) come from different backbone weights.
        AdapterFormatError: a different architecture, a corrupt index or adapter (wrong shapes, NaN/Inf or
            out-of-range values, malformed metadata), an adapter whose header does not match its index.
        TaskExistsError: two sources (or a source and the destination) hold the same task name (unless ``replace``,
            where the later source wins).
        AdapterError: no source, a folder that is not an adapter folder, one that cannot be read or written, a
            symbolic link in the destination.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    destination = _path(destination, 'the merge destination')
    if destination.exists() and not destination.is_dir():
        raise AdapterError(f'destination {str(destination)!r} is a file, not a folder')
    dest_key = destination.resolve()
    sources = [_path(s, 'a merge source') for s in sources]
    if not sources:
        raise AdapterError('merge_adapter_folders needs at least one source folder')
    folders: List[Path] = []
    seen = {dest_key}
    for src in sources:
        key = src.resolve()
        if key not in seen:
            seen.add(key)
            folders.append(src)
    read = [(s, *_read_folder(s)) for s in folders]  # sources: validated before any lock or write
    if not destination.exists() and not destination.is_symlink():
        if not read:
            raise AdapterError(f'{str(destination)!r} has no {INDEX_FILE}: not a folder of timm_modcl adapters')
        try:
            return _merge_into_new(read, destination, replace)
        except FileExistsError:
            pass  # another writer created it meanwhile: merge into it as an existing folder
    with folder_lock(destination, AdapterError):
        _finish_interrupted(destination)
        if (destination / INDEX_FILE).exists() or (destination / INDEX_FILE).is_symlink():
            read.insert(0, (destination, *_read_folder(destination)))
        if not read:
            raise AdapterError(f'{str(destination)!r} has no {INDEX_FILE}: not a folder of timm_modcl adapters')
        ref, files, origin = _combine(read, replace)
        new = [n for n in files if origin[n] != destination]
        _check_task_folders(destination, new)
        staging = destination / f'{_STAGING}{os.getpid()}-{os.urandom(4).hex()}'
        try:
            _write_tasks(staging, {n: files[n] for n in new})  # kill here: the destination is as it was
            commit = {'tasks': new, 'configs': [n for n in new if files[n][1]],
                      'index': _merged_index(ref, files).decode()}
            atomic_write_bytes(staging / _COMMIT, _json_bytes(commit))  # the merge is decided: kill after here,
            _apply_staging(destination, staging)  # and the next writer of the folder finishes these renames
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise AdapterError(f'could not write adapters to {str(destination)!r}: {e}') from e
    return list(files)


_STAGING = '.modcl-staging-'
_COMMIT = 'COMMIT.json'


def _apply_staging(folder: Path, staging: Path) -> None:
    """Move a committed merge's staged files into ``folder`` (files first, the index last) and remove the staging
    folder. Each step can be repeated, so a merge killed half-way is finished by running this again.

    Raises:
        OSError: a file cannot be moved. AdapterFormatError: a corrupt commit record. AdapterError: a symbolic link.
    """
    commit = load_json(read_file(staging / _COMMIT, inside=folder, max_bytes=_MAX_JSON_FILE), AdapterFormatError,
                       repr(str(staging / _COMMIT)))
    if not isinstance(commit, dict) or not isinstance(commit.get('tasks'), list) or \
            not isinstance(commit.get('configs'), list) or not isinstance(commit.get('index'), str):
        raise AdapterFormatError(f'{str(staging / _COMMIT)!r} is not a merge record')
    tasks = [validate_task_name(n) for n in commit['tasks']]
    index = commit['index'].encode()
    parse_index(index, str(staging / _COMMIT))
    _check_task_folders(folder, tasks)
    for n in tasks:
        (folder / n).mkdir(exist_ok=True)
        for f in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
            if os.path.lexists(staging / n / f):
                os.replace(staging / n / f, folder / n / f)
            elif f == ADAPTER_CONFIG_FILE and n not in commit['configs'] and os.path.lexists(folder / n / f):
                (folder / n / f).unlink()  # a stale description of another adapter
    atomic_write_bytes(folder / INDEX_FILE, index)
    shutil.rmtree(staging, ignore_errors=True)


def _finish_interrupted(folder: Path) -> None:
    """Under the folder's lock: finish the merges that were killed after deciding (they left a commit record), and
    remove what killed writers left staged or half-written (no other writer of the folder can be running).

    Raises:
        AdapterError: a committed merge cannot be finished (its record is corrupt, a task folder became a link).
    """
    try:
        stale = [p for p in folder.iterdir() if p.name.startswith(_STAGING) and not p.is_symlink() and p.is_dir()]
    except OSError:
        return
    for p in stale:
        if os.path.lexists(p / _COMMIT):
            try:
                _apply_staging(folder, p)
            except OSError as e:
                raise AdapterError(f'could not finish an interrupted merge into {str(folder)!r}: {e}') from e
            except AdapterError as e:
                raise AdapterError(f'could not finish an interrupted merge into {str(folder)!r}: {e}') from None
        else:
            shutil.rmtree(p, ignore_errors=True)
    leftovers = list(folder.glob(f'.{INDEX_FILE}.*.tmp'))  # the temporary files of atomic_write_bytes
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
        leftovers += folder.glob(f'[!.]*/.{name}.*.tmp')
    for p in leftovers:
        with contextlib.suppress(OSError):
            if not p.is_symlink() and folder.resolve() in (p.parent.resolve(), p.parent.resolve().parent):
                p.unlink()


def _merge_into_new(read, destination: Path, replace: bool) -> List[str]:
    """Build a new merged folder beside ``destination`` and rename it into place whole.

    Raises:
        FileExistsError: ``destination`` appeared meanwhile (the caller merges into it instead).
    """
    ref, files, _ = _combine(read, replace)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{destination.name}{_STAGING}', dir=destination.parent))
    except OSError as e:
        raise AdapterError(f'could not create {str(destination)!r}: {e}') from e
    try:
        _write_tasks(staging, files)
        atomic_write_bytes(staging / INDEX_FILE, _merged_index(ref, files))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a folder made by mkdir would not be
        if destination.exists() or destination.is_symlink():
            raise FileExistsError(str(destination))
        os.rename(staging, destination)  # fails if another writer filled it meanwhile
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(str(destination)) from None
        raise AdapterError(f'could not write adapters to {str(destination)!r}: {e}') from e
    return list(files)


def _write_tasks(folder: Path, files: Mapping[str, Tuple[bytes, bytes]]) -> None:
    for n, (data, config) in files.items():
        atomic_write_bytes(_task_file(folder, n), data)
        if config:
            atomic_write_bytes(folder / n / ADAPTER_CONFIG_FILE, config)


def _merged_index(ref: Mapping[str, Any], files: Mapping[str, Any]) -> bytes:
    return index_bytes(ref, list(files))


def _combine(read, replace: bool):
    """``(reference index, {task: (adapter, config)}, {task: folder})`` of validated folders, first one first."""
    ref_dir, ref, _ = read[0]
    files: 'OrderedDict[str, Tuple[bytes, bytes]]' = OrderedDict()
    origin: Dict[str, Path] = {}
    for folder, index, tasks in read:
        if index['architecture'] != ref['architecture']:
            raise AdapterFormatError(f'{str(folder)!r} holds adapters of {index["architecture"]}, '
                                     f'{str(ref_dir)!r} of {ref["architecture"]}')
        if index['backbone_fingerprint'] != ref['backbone_fingerprint']:
            raise FingerprintMismatchError(
                f'{str(folder)!r} was trained on other backbone weights (fingerprint '
                f'{index["backbone_fingerprint"][:12]}...) than {str(ref_dir)!r} '
                f'({ref["backbone_fingerprint"][:12]}...); only adapters of the same backbone can be merged')
        for n, content in tasks.items():
            if n in files and not replace:
                raise TaskExistsError(f'task {n!r} is in both {str(origin[n])!r} and {str(folder)!r} (pass '
                                      f'replace=True / --replace to keep the later one)')
            files[n] = content  # with replace, the later source wins (in the first one's position)
            origin[n] = folder
    layers = next((index['layers'] for _, index, _ in read if index.get('layers') is not None), None)
    if layers is not None:  # an index written before 0.3 has no layer table: take a source's
        ref = dict(ref, layers=layers)
    return ref, files, origin


def _read_folder(folder: Path, checkers: Optional[Dict[str, Any]] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, Tuple[bytes, bytes]]]:
    """A folder's index and ``{task: (adapter bytes, config bytes)}``, every adapter validated without a backbone
    (see ``read_folder``).

    Raises:
        AdapterError, AdapterFormatError: as ``merge_adapter_folders``.
    """
    index = read_index(folder)
    tasks = check_adapters(index, {n: _task_file(folder, n) for n in index['tasks']}, str(folder), inside=folder)
    out: Dict[str, Tuple[bytes, bytes]] = {}
    for n, data in tasks.items():
        config_path = folder / n / ADAPTER_CONFIG_FILE
        config = b''
        if config_path.exists() or config_path.is_symlink():
            config = read_file(config_path, inside=folder, max_bytes=_MAX_JSON_FILE)
            if not isinstance(load_json(config, AdapterFormatError, repr(str(config_path))), dict):
                raise AdapterFormatError(f'{str(config_path)!r} is not a JSON object')
        out[n] = (data, config)
    return index, out


def check_adapters(index: Mapping[str, Any], files: Mapping[str, Union[_PathLike, bytes]], label: str,
                   inside: Optional[_PathLike] = None) -> 'OrderedDict[str, bytes]':
    """Read and validate adapters ``{task: file or bytes}`` against a checked index, without a backbone: each one's
    header names the index's architecture and backbone fingerprint and the task it is listed as, and its payload is
    valid (names, dtypes, finite values, bounds) and, when the index records the layer table, fits it exactly (every
    tensor its config needs, each of the right shape) as loading into a model would check.

    Returns:
        ``{task: adapter bytes}``.

    Raises:
        AdapterFormatError: an adapter that is corrupt, does not match the index or does not fit its layers.
        AdapterError: a file that cannot be read.
    """
    table = index_layer_table(index)
    out: 'OrderedDict[str, bytes]' = OrderedDict()
    for n, source in files.items():
        path_label = f'{label}/{n}/{ADAPTER_FILE}'
        data = source if isinstance(source, (bytes, bytearray)) else read_file(source, inside=inside,
                                                                               what='adapter file')
        meta, tensors = read_adapter(data, path_label)
        if meta.get('backbone_fingerprint') != index['backbone_fingerprint'] or \
                meta.get('architecture') != index['architecture']:
            raise AdapterFormatError(f'{label!r}: the adapter of task {n!r} does not match its index')
        payload = adapter_payload(meta, tensors, repr(path_label), table=table)
        if payload.name != n:
            raise AdapterFormatError(f'{label!r}: the adapter of task {n!r} is named otherwise')
        out[n] = bytes(data)
    return out


def read_folder(folder: _PathLike) -> Tuple[Dict[str, Any], 'OrderedDict[str, TaskPayload]']:
    """The checked index and the validated payloads of an adapter folder, without a model (see ``check_adapters``).

    Raises:
        AdapterError, AdapterFormatError: as ``merge_adapter_folders``.
    """
    folder = _path(folder, 'the adapter folder')
    index, files = _read_folder(folder)
    table = index_layer_table(index)
    payloads: 'OrderedDict[str, TaskPayload]' = OrderedDict()
    for n, (data, _) in files.items():
        meta, tensors = read_adapter(data, f'{folder}/{n}/{ADAPTER_FILE}')
        payloads[n] = adapter_payload(meta, tensors, n, table=table)
    return index, payloads


class AdapterMixin:
    """Adapter file methods of modcl models (see the module functions for the details)."""

    def save_task(self, name: str, path: _PathLike, dtype: Optional[torch.dtype] = None,
                  include_head: bool = True, include_stats: bool = True) -> Path:
        """Save one task as a safetensors adapter file; see ``timm_modcl.adapter.save_task``."""
        return save_task(self, name, path, dtype=dtype, include_head=include_head, include_stats=include_stats)

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
