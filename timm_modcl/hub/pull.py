"""Pulling adapters from the Hub into a folder (``pull_folder``) or a model (``pull_tasks``), checked against the index
before anything is written or loaded.
"""

import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from huggingface_hub import hf_hub_download

from .._io import atomic_write_bytes
from ..adapter import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE, adapter_config_bytes, check_adapters, index_bytes, load_tasks,
    merge_adapter_folders, read_index, task_names,
)
from ..errors import AdapterError, AdapterFormatError, FingerprintMismatchError, HubError, TaskExistsError
from ..version import __version__
from .remote import LIBRARY_NAME, _deadline, _fetch_index, _join, _within


def pull_folder(
        repo_id: str,
        folder,
        *,
        tasks: Optional[Iterable[str]] = None,
        replace: bool = False,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[str] = None,
        endpoint: Optional[str] = None,
        local_files_only: bool = False,
        timeout: Optional[float] = None,
        architecture: Optional[str] = None,
) -> List[str]:
    """Download tasks of a Hub repo (default: all it lists) into an adapter folder, without a model.

    Downloads go through the huggingface_hub cache (``revision`` pins them; ``local_files_only`` or
    ``HF_HUB_OFFLINE=1`` use cached files) within one ``timeout`` (default ``MODCL_HUB_TIMEOUT`` or 120). Every
    adapter is validated against the repo's index (architecture, backbone fingerprint and, when recorded, its layer
    table) before anything is written; the folder is then updated as ``merge_adapter_folders`` does (created if
    missing, all or nothing, its own tasks kept first).

    Args:
        repo_id: ``namespace/name`` of the model repo.
        folder: The adapter folder to write into.
        tasks: Tasks to pull.
        replace: Overwrite tasks the folder already holds instead of raising.
        revision, subfolder, token, cache_dir, endpoint, local_files_only, timeout: As ``pull_tasks``.
        architecture: Refuse a repo of another architecture (``None``: any).

    Returns:
        The pulled task names.

    Raises:
        HubError: repo, revision, task or file not found; private repo without a valid token; not cached while
            offline; connection refused or broken; no answer within ``timeout``.
        AdapterFormatError: a corrupt index or adapter, or an adapter that does not fit the repo's index; a repo of
            another ``architecture`` or of another architecture than the folder.
        FingerprintMismatchError: the folder holds adapters of other backbone weights.
        TaskExistsError: the folder already holds a pulled task (unless ``replace``).
        AdapterError: the folder cannot be read or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapterError(f'{str(folder)!r} is a file, not a folder')
    local = read_index(folder) if (folder / INDEX_FILE).exists() or (folder / INDEX_FILE).is_symlink() else None
    deadline = _deadline(timeout)
    wanted = None if tasks is None else task_names(tasks)
    kw: Dict[str, Any] = dict(
        revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only,
        library_name=LIBRARY_NAME, library_version=__version__)
    index = _fetch_index(deadline, repo_id, subfolder, kw)
    if architecture is not None and index['architecture'] != architecture:
        raise AdapterFormatError(f'{repo_id!r} holds adapters of {index["architecture"]}, not {architecture}')
    if local is not None:
        if local['architecture'] != index['architecture']:
            raise AdapterFormatError(f'{repo_id!r} holds adapters of {index["architecture"]}, {str(folder)!r} of '
                                     f'{local["architecture"]}; pull into another folder')
        if local['backbone_fingerprint'] != index['backbone_fingerprint']:
            raise FingerprintMismatchError(
                f'{repo_id!r} holds adapters of other backbone weights (fingerprint '
                f'{index["backbone_fingerprint"][:12]}...) than {str(folder)!r} '
                f'({local["backbone_fingerprint"][:12]}...); pull into another folder')
    wanted = list(index['tasks']) if wanted is None else wanted
    missing = [n for n in wanted if n not in index['tasks']]
    if missing:
        raise HubError(f'{repo_id!r} has no task(s) {missing}; it has {index["tasks"]}')
    clash = [n for n in wanted if local is not None and n in local['tasks']]
    if clash and not replace:
        raise TaskExistsError(f'task {clash[0]!r} already exists in {str(folder)!r}; pass replace=True (--replace) '
                              f'to overwrite it')
    paths = {}
    for n in wanted:
        paths[n] = _within(deadline, lambda n=n: hf_hub_download(repo_id, _join(subfolder, f'{n}/{ADAPTER_FILE}'), **kw),
                           f'adapter file of task {n!r}', repo_id, revision)
    files = check_adapters(index, paths, repo_id)  # everything validated before the folder is touched
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / 'pulled'
        for n, data in files.items():
            atomic_write_bytes(staged / n / ADAPTER_FILE, data)
            atomic_write_bytes(staged / n / ADAPTER_CONFIG_FILE, adapter_config_bytes(data))
        atomic_write_bytes(staged / INDEX_FILE, index_bytes(index, list(files)))
        merge_adapter_folders([staged], folder, replace=replace)
    return list(files)


def pull_tasks(
        model,
        repo_id: str,
        names: Optional[Iterable[str]] = None,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[str] = None,
        endpoint: Optional[str] = None,
        local_files_only: bool = False,
        replace: bool = False,
        allow_fingerprint_mismatch: bool = False,
        timeout: Optional[float] = None,
) -> List[str]:
    """Add tasks from a Hub repo to ``model`` (default: all it lists), all or nothing: ``pull_folder`` into a
    temporary folder, then ``load_tasks``.

    Downloads go through the huggingface_hub cache: a ``revision`` (branch, tag or commit) pins them, and with
    ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` cached files are used without network.

    Every download finishes (into the cache) before the model is touched, and the whole pull is bounded by
    ``timeout`` seconds (default ``MODCL_HUB_TIMEOUT`` or 120): a server that stops answering ends in a ``HubError``
    with nothing loaded.

    Returns:
        The loaded task names.

    Raises:
        HubError: repo, revision or file not found; private repo without a valid token; not cached while offline;
            connection refused or broken; no answer within ``timeout``.
        AdapterFormatError, FingerprintMismatchError, TaskExistsError: as ``timm_modcl.adapter.load_task``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'pulled'
        pulled = pull_folder(repo_id, folder, tasks=names, revision=revision, subfolder=subfolder, token=token,
                             cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only,
                             timeout=timeout)
        return load_tasks(model, folder, names=pulled, replace=replace,
                          allow_fingerprint_mismatch=allow_fingerprint_mismatch)
