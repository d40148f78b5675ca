"""Adapter folders: the index file (``modcl_index.json``), ``save_tasks`` / ``load_tasks`` and loading chosen task
files.
"""

import contextlib
import os
import shutil
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from .._io import atomic_write_bytes, folder_lock, load_json
from ..errors import AdapterError, AdapterFormatError, PayloadError, TaskError, TaskExistsError
from ..payload import LayerTable, TaskPayload
from ..task import BASE_TASK, validate_task_name
from ..version import __version__
from .files import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION, _MAX_JSON_FILE, _PathLike,
    _json_bytes, _path, adapter_bytes, model_architecture, read_file,
)
from .loading import _add_payloads, _task_json, read_adapter, read_payload


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
