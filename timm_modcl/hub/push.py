"""Pushing adapter folders (``push_folder``) and a model's tasks (``push_tasks``) to the Hub: one commit that adds
tasks to what the repo lists, with its index and model card.
"""

import tempfile
from pathlib import Path
from typing import Iterable, Optional

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from ..adapter import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE, check_adapters, describe_adapter, index_bytes, read_file, read_index,
    read_index_file, save_tasks, task_names,
)
from ..errors import AdapterError, HubError
from ..task import BASE_TASK
from ..version import __version__
from .remote import LIBRARY_NAME, _deadline, _join, _within
from .cards import _base_model_id, _card, _registry_base_model

_AUTO = 'auto'


def push_folder(
        folder,
        repo_id: str,
        *,
        tasks: Optional[Iterable[str]] = None,
        private: Optional[bool] = None,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
        base_model: Optional[str] = _AUTO,
) -> str:
    """Push tasks of an adapter folder (default: all it lists) to a Hub repo in one commit, without a model.

    Every adapter is validated first against the folder's index (architecture, backbone fingerprint and, when
    recorded, its layer table), so bad input fails before the Hub changes. The files go up byte for byte; tasks the
    repo already lists (same architecture and backbone) stay listed in its index.

    Args:
        folder: An adapter folder (``save_tasks`` / ``modcl train --out``).
        repo_id: ``namespace/name`` of the model repo (created if needed).
        tasks: Tasks to push.
        private: Visibility for a repo that is created now (existing repos keep theirs).
        revision: Branch to commit to (created from the default branch if missing).
        subfolder: Folder inside the repo.
        token: Hub token (default: the saved login / ``HF_TOKEN``).
        commit_message: Commit message.
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` or huggingface.co).
        timeout: Seconds the whole push may take (default ``MODCL_HUB_TIMEOUT`` or 120).
        base_model: Hub id of the backbone's weights for the model card; default: timm's pretrained weights of the
            index's architecture and tag, unless the tasks record another backbone (a local file, a random one).

    Returns:
        The commit URL.

    Raises:
        AdapterError, AdapterFormatError: the folder is not an adapter folder, lacks a task, or holds an adapter
            that does not fit its index.
        HubError: the repo holds adapters of another backbone, cannot be created or written (missing/invalid token,
            no permission, network), or the push did not finish within ``timeout``.
    """
    folder = Path(folder)
    index = read_index(folder)
    names = list(index['tasks']) if tasks is None else task_names(tasks)
    missing = [n for n in names if n not in index['tasks']]
    if missing:
        raise AdapterError(f'{str(folder)!r} has no task {missing[0]!r}; it has {index["tasks"]}')
    files = check_adapters(index, {n: folder / n / ADAPTER_FILE for n in names}, str(folder), inside=folder)
    configs = {}
    for n in names:
        path = folder / n / ADAPTER_CONFIG_FILE
        configs[n] = read_file(path, inside=folder, max_bytes=16 * 1024 * 1024) if path.is_file() else None
    rows = {n: describe_adapter(data) for n, data in files.items()}
    if base_model == _AUTO:
        sources = {r['metadata'].get('backbone', 'hub:') for r in rows.values()}
        base_model = (_registry_base_model(index['architecture'], index.get('pretrained_tag', ''))
                      if all(s.startswith('hub:') for s in sources) else None)
    deadline = _deadline(timeout)
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)

    def create() -> None:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)

    _within(deadline, create, 'repository', repo_id, revision)
    listed = list(names)
    with tempfile.TemporaryDirectory() as tmp:
        def old_index() -> Optional[str]:  # keep the tasks the repo already lists
            try:
                return hf_hub_download(
                    repo_id, _join(subfolder, INDEX_FILE), revision=revision, token=token, endpoint=endpoint,
                    cache_dir=Path(tmp) / '.cache', library_name=LIBRARY_NAME, library_version=__version__)
            except EntryNotFoundError:
                return None

        old_path = _within(deadline, old_index, INDEX_FILE, repo_id, revision)
        old = None if old_path is None else read_index_file(old_path, f'{repo_id}/{INDEX_FILE}')
    if old is not None:
        if (old['architecture'], old['backbone_fingerprint']) != (index['architecture'], index['backbone_fingerprint']):
            raise HubError(f'{repo_id!r} holds adapters of another backbone ({old["architecture"]}, fingerprint '
                           f'{old["backbone_fingerprint"][:12]}...); push to another repo or subfolder')
        listed = [t for t in old['tasks'] if t not in listed] + listed
    sizes = {n: len(data) for n, data in files.items()}
    card = _card(index['architecture'], index['backbone_fingerprint'], base_model, rows, repo_id, sizes)
    uploads = {INDEX_FILE: index_bytes(index, listed), 'README.md': card.content.encode()}
    for n in names:
        uploads[f'{n}/{ADAPTER_FILE}'] = files[n]
        if configs[n] is not None:
            uploads[f'{n}/{ADAPTER_CONFIG_FILE}'] = configs[n]
    ops = [CommitOperationAdd(path_in_repo=_join(subfolder, f), path_or_fileobj=data) for f, data in uploads.items()]
    info = _within(
        deadline, lambda: api.create_commit(
            repo_id, ops, revision=revision,
            commit_message=commit_message or f'Add timm_modcl task adapter(s): {", ".join(names)}'),
        'commit', repo_id, revision,
        late=' here, but the commit may still land if the server finishes it: check the repo before retrying')
    return str(info.commit_url)


def push_tasks(
        model,
        repo_id: str,
        names: Optional[Iterable[str]] = None,
        *,
        private: Optional[bool] = None,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        endpoint: Optional[str] = None,
        dtype=None,
        timeout: Optional[float] = None,
) -> str:
    """Push tasks of ``model`` (default: all but ``base``) to a Hub repo in one commit, creating the repo if needed:
    ``save_tasks`` into a temporary folder, then ``push_folder``.

    Tasks the repo already lists (same architecture and backbone) stay listed in the index.

    Args:
        model: A modcl model.
        repo_id: ``namespace/name`` of the model repo.
        names: Tasks to push.
        private, revision, subfolder, token, commit_message, endpoint, timeout: As ``push_folder``.
        dtype: Storage dtype (``torch.float16`` halves the size; default float32).

    Returns:
        The commit URL.

    Raises:
        TaskNotFoundError: a named task does not exist.
        AdapterError: a task that cannot be saved (an unsupported dtype, NaN values, ...): nothing is sent.
        HubError: as ``push_folder``.
    """
    names = [n for n in model.tasks if n != BASE_TASK] if names is None else task_names(names)
    for n in names:
        model.task_info(n)  # TaskNotFoundError before anything is sent
    with tempfile.TemporaryDirectory() as tmp:
        out = save_tasks(model, Path(tmp) / 'out', names=names, dtype=dtype)  # bad input fails before the Hub
        return push_folder(out, repo_id, tasks=names, private=private, revision=revision, subfolder=subfolder,
                           token=token, commit_message=commit_message, endpoint=endpoint, timeout=timeout,
                           base_model=_base_model_id(model))
