"""Merging adapter folders (``merge_adapter_folders``, crash-safe through a staging folder) and validating a folder
without a model (``read_folder``, ``check_adapters``).
"""

import errno
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .._io import _umask, atomic_write_bytes, folder_lock, load_json
from ..errors import AdapterError, AdapterFormatError, FingerprintMismatchError, TaskExistsError
from ..payload import TaskPayload
from .files import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE, _MAX_JSON_FILE, _PathLike, _json_bytes, _path, read_file,
)
from .loading import adapter_payload, read_adapter
from .folders import (
    _COMMIT, _STAGING, _apply_staging, _check_task_folders, _finish_interrupted, _task_file, index_bytes,
    index_layer_table, read_index,
)


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
