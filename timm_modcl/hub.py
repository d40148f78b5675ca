"""Share task adapters through the Hugging Face Hub.

A Hub repo (or a ``subfolder`` of one) holds the same layout as ``save_tasks`` writes: ``modcl_index.json`` and
``<task>/adapter_model.safetensors`` + ``<task>/adapter_config.json``, plus a model card ``README.md``. Pushing adds
tasks to what the repo already lists; pulling downloads only the index and the requested tasks' adapter files (no
code, no full checkpoint) through the huggingface_hub cache, so pinned revisions and ``HF_HUB_OFFLINE=1`` work.
``push_folder`` / ``pull_folder`` work on adapter folders without building a backbone (adapters are checked against
the index's architecture, fingerprint and layer table); ``push_tasks`` / ``pull_tasks`` build on them for a model.
Every Hub step runs within one time bound (``timeout=`` / ``MODCL_HUB_TIMEOUT``), and answers whose ETag would name
a file outside the cache are refused (see ``_check_response``).
"""
import math
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError,
)

from ._io import atomic_write_bytes
from .adapter import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, INDEX_FILE, adapter_config_bytes, check_adapters, describe_adapter,
    index_bytes, load_tasks, merge_adapter_folders, model_architecture, read_file, read_index, read_index_file,
    save_tasks, task_names,
)
from ._settings import hub_timeout
from .errors import AdapterError, AdapterFormatError, FingerprintMismatchError, HubError, TaskExistsError
from .task import BASE_TASK
from .version import __version__

__all__ = ['push_folder', 'pull_folder', 'push_tasks', 'pull_tasks', 'remote_index', 'download_adapter_files',
           'task_model_card', 'HubMixin']

LIBRARY_NAME = 'timm_modcl'


def _join(subfolder: Optional[str], name: str) -> str:
    return f'{subfolder.strip("/")}/{name}' if subfolder else name


def _hub_error(e: Exception, repo_id: str, revision: Optional[str], what: str) -> HubError:
    """A library error naming the problem (never the token)."""
    rev = f' at revision {revision!r}' if revision else ''
    if isinstance(e, GatedRepoError):
        msg = f'{repo_id!r} is gated: accept its conditions on the Hub and pass a token'
    elif isinstance(e, RepositoryNotFoundError):
        msg = f'repository {repo_id!r} not found, or it is private and no valid token was given'
    elif isinstance(e, RevisionNotFoundError):
        msg = f'repository {repo_id!r} has no revision {revision!r}'
    elif isinstance(e, LocalEntryNotFoundError):
        msg = (f'{what} of {repo_id!r}{rev} is not in the local cache and the Hub cannot be reached: check the '
               f'endpoint (HF_ENDPOINT) and the network, or pull once while online')
    elif isinstance(e, EntryNotFoundError):
        msg = f'{repo_id!r}{rev} has no {what}'
    elif isinstance(e, OfflineModeIsEnabled):
        msg = f'cannot reach {repo_id!r}: offline mode is enabled (HF_HUB_OFFLINE)'
    elif isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        if status in (401, 403):
            msg = f'access to {repo_id!r} was refused (HTTP {status}): is the token valid and allowed to do this?'
        else:
            msg = f'Hub request for {repo_id!r} failed (HTTP {status}) while getting the {what}'
    elif _is_transport_error(e):
        kind = type(e).__name__
        if 'Connect' in kind or isinstance(e, ConnectionRefusedError):
            msg = (f'could not connect to the Hub ({kind}) to get the {what} of {repo_id!r}: check the endpoint '
                   f'(HF_ENDPOINT) and the network, or set HF_HUB_OFFLINE=1 to use cached files')
        else:
            msg = (f'the connection to the Hub broke ({kind}: {e}) while getting the {what} of {repo_id!r}; nothing '
                   f'was loaded: retry, or check the endpoint (HF_ENDPOINT) and the network')
    else:
        msg = f'Hub request for {repo_id!r} failed while getting the {what}: {type(e).__name__}'
    err = HubError(msg)
    err.__cause__ = None
    return err


def _is_transport_error(e: BaseException) -> bool:
    """Network-level failures (httpx's transport errors, socket errors), as opposed to HTTP answers."""
    return isinstance(e, OSError) or any(
        c.__module__.startswith(('httpx', 'httpcore', 'requests', 'urllib3', 'h11')) for c in type(e).__mro__)


def _deadline(timeout: Optional[float]) -> float:
    timeout = hub_timeout() if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise HubError(f'timeout must be a positive, finite number of seconds, got {timeout!r}')
    return time.monotonic() + float(timeout)


def _within(deadline: float, fn, what: str, repo_id: str, revision: Optional[str], late: str = ''):
    """Run the network step ``fn()`` in a daemon thread and wait until ``deadline`` at most.

    huggingface_hub retries with its own per-request timeouts, so a server that stops answering could keep a call
    busy for minutes; this bounds the total time. Library errors are mapped to ``HubError``.
    """
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box['value'] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box['error'] = e

    def guarded() -> None:
        _install_response_check()
        _GUARD.active = True  # this thread is the library's: its Hub answers are checked (see _check_response)
        target()

    thread = threading.Thread(target=guarded, name='timm_modcl-hub', daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(min(max(0.0, deadline - started), threading.TIMEOUT_MAX))
    if thread.is_alive():
        raise HubError(f'the Hub did not answer in time while getting the {what} of {repo_id!r} (gave up after '
                       f'{time.monotonic() - started:.0f} s); nothing was loaded{late}. Retry later, or allow more '
                       f'time with timeout= (or MODCL_HUB_TIMEOUT)')
    if 'error' in box:
        e = box['error']
        if isinstance(e, HubError):
            raise e
        if isinstance(e, Exception):
            raise _hub_error(e, repo_id, revision, what)
        raise e
    return box.get('value')


#: what huggingface_hub may turn into a file name in its cache: a plain identifier (real ETags are hex digests)
_SAFE_NAME = re.compile(r'[0-9A-Za-z_-][0-9A-Za-z._-]{0,199}')
_GUARD = threading.local()
_HOOK_LOCK = threading.Lock()


def _check_response(response, *args, **kwargs) -> None:
    """HTTP response hook (httpx or requests), active only in the library's own Hub threads: refuse an answer whose
    ETag (or commit id) huggingface_hub would turn into a path outside its cache.

    huggingface_hub (2.4.0, the newest release) names a downloaded blob after the server's ETag without checking
    it, so a hostile endpoint answering ``ETag: "../../x"`` or ``"/home/me/.bashrc"`` makes it write there.
    """
    if not getattr(_GUARD, 'active', False):
        return
    request = response.request
    path = getattr(request.url, 'path', None) or getattr(request, 'path_url', '')  # httpx, requests
    if request.method != 'HEAD' and 'resolve' not in path:
        return  # only file answers carry the ETag that names a cache file
    for key in ('X-Linked-Etag', 'ETag', 'X-Repo-Commit'):
        value = response.headers.get(key)
        if value is None:
            continue
        name = value if key == 'X-Repo-Commit' else value.lstrip('W/').strip('"')  # as huggingface_hub reads it
        if not _SAFE_NAME.fullmatch(name):
            raise HubError(f'the Hub answered a malformed {key} header ({value[:60]!r}), which would name a file '
                           f'outside the download cache; refusing it (is HF_ENDPOINT a trusted server?)')


def _install_response_check() -> None:
    """Add ``_check_response`` to huggingface_hub's HTTP client (httpx in huggingface_hub >= 1.0, a requests session
    before), once per client."""
    try:
        from huggingface_hub.utils import get_session
        session = get_session()
        hooks = session.event_hooks['response'] if hasattr(session, 'event_hooks') else session.hooks['response']
    except (ImportError, AttributeError, KeyError, TypeError):  # an unknown client: nothing to hook
        return
    with _HOOK_LOCK:
        if _check_response not in hooks:
            hooks.append(_check_response)


def _fetch_index(deadline: float, repo_id: str, subfolder: Optional[str], kw: Dict[str, Any]) -> Dict[str, Any]:
    path = _within(deadline, lambda: hf_hub_download(repo_id, _join(subfolder, INDEX_FILE), **kw),
                   f'{INDEX_FILE} (is it a timm_modcl adapter repo?)', repo_id, kw.get('revision'))
    return read_index_file(path, f'{repo_id}/{INDEX_FILE}')


def remote_index(
        repo_id: str,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[str] = None,
        endpoint: Optional[str] = None,
        local_files_only: bool = False,
        timeout: Optional[float] = None,
) -> Dict[str, Any]:
    """The checked ``modcl_index.json`` of a Hub repo (architecture, backbone fingerprint, task names), downloaded
    through the huggingface_hub cache as ``pull_tasks`` does, within ``timeout`` seconds (default
    ``MODCL_HUB_TIMEOUT`` or 120).

    Raises:
        HubError: as ``pull_tasks`` (not found, not cached while offline, network, no answer within ``timeout``).
        AdapterFormatError: the index is corrupt.
    """
    deadline = _deadline(timeout)
    kw: Dict[str, Any] = dict(
        revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only,
        library_name=LIBRARY_NAME, library_version=__version__)
    return _fetch_index(deadline, repo_id, subfolder, kw)


def download_adapter_files(
        repo_id: str,
        names: Optional[Iterable[str]] = None,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[str] = None,
        endpoint: Optional[str] = None,
        local_files_only: bool = False,
        timeout: Optional[float] = None,
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Download a Hub repo's checked index and the adapter files of some tasks (default: all it lists) into the
    huggingface_hub cache, all within ``timeout`` seconds (default ``MODCL_HUB_TIMEOUT`` or 120), without building
    a model (e.g. for ``modcl serve --repo-id``).

    Returns:
        ``(index, {task: local path of its adapter file})``; the files are read (and checked) by whoever loads them.

    Raises:
        HubError: as ``pull_tasks`` (not found, a task the repo does not list, not cached while offline, network,
            no answer within ``timeout``).
        AdapterFormatError: the index is corrupt.
    """
    deadline = _deadline(timeout)
    wanted = None if names is None else task_names(names)
    kw: Dict[str, Any] = dict(
        revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only,
        library_name=LIBRARY_NAME, library_version=__version__)
    index = _fetch_index(deadline, repo_id, subfolder, kw)
    wanted = list(index['tasks']) if wanted is None else wanted
    missing = [n for n in wanted if n not in index['tasks']]
    if missing:
        raise HubError(f'{repo_id!r} has no task(s) {missing}; it has {index["tasks"]}')
    files = {n: _within(deadline, lambda n=n: hf_hub_download(repo_id, _join(subfolder, f'{n}/{ADAPTER_FILE}'), **kw),
                        f'adapter file of task {n!r}', repo_id, revision) for n in wanted}
    return index, files


def _base_model_id(model) -> Optional[str]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('hf_hub_id') or None


def task_model_card(model, names: List[str], repo_id: str, sizes: Dict[str, int]) -> ModelCard:
    """A model card for a repo of task adapters, with the Hub metadata of an adapter of a timm backbone."""
    arch, _ = model_architecture(model)
    infos = model.tasks
    rows = {n: dict(num_classes=infos[n].num_classes, class_names=infos[n].class_names, config=infos[n].config,
                    num_added_values=infos[n].num_added_params, metadata=infos[n].metadata) for n in names}
    return _card(arch, model.backbone_fingerprint(), _base_model_id(model), rows, repo_id, sizes)


def _registry_base_model(architecture: str, tag: str) -> Optional[str]:
    """The Hub id of timm's pretrained weights for ``architecture.tag``, from timm's registry (no model is built)."""
    if not tag:
        return None
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(f'{architecture}.{tag}')
    except Exception:  # noqa: BLE001 - an unknown architecture or tag: no base model recorded
        return None
    return getattr(cfg, 'hf_hub_id', None) or None


def _card(arch: str, fingerprint: str, base: Optional[str], rows: Dict[str, Dict[str, Any]], repo_id: str,
          sizes: Dict[str, int]) -> ModelCard:
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        pipeline_tag='image-classification',
        license='apache-2.0',
        tags=['continual-learning', 'timm', 'timm_modcl', 'image-classification', 'adapter',
              'weight-modulation'],
        base_model_relation='adapter' if base else None,
    )
    lines = []
    for n, r in rows.items():
        classes = ', '.join(r['class_names']) if r['class_names'] else f'{r["num_classes"]} classes'
        metrics = ', '.join(f'{k}={v}' for k, v in r['metadata'].items() if k.startswith('metric')) or '-'
        lines.append(f'| `{n}` | {r["num_classes"]} | {classes} | {r["config"].variant} | {r["config"].resolution} | '
                     f'{r["num_added_values"]:,} | {sizes.get(n, 0) / 1024:.1f} KiB | {metrics} |')
    first = next(iter(rows), 'TASK')
    body = f"""
# {repo_id.split('/')[-1]}: timm_modcl task adapters

Task adapters for continual learning on a frozen `{arch}` backbone with Adaptive Weight Modulation
([arXiv 2311.15276](https://arxiv.org/abs/2311.15276)). Each adapter holds one task's low-resolution weight
modulators, its BatchNorm running statistics and its classifier head; adding it to a model changes no other task.

Backbone fingerprint (SHA-256 of the frozen weights): `{fingerprint}`
{'' if base else chr(10) + 'Backbone weights: loaded from a local file (no Hub id recorded).' + chr(10)}
| task | classes | class names | variant | resolution | added values | file size | metrics |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

## How to use

```python
import timm, timm_modcl

model = timm.create_model("{arch}", pretrained=True)
model.load_tasks_from_hub("{repo_id}")        # or: timm.create_model(..., adapters="{repo_id}")
model.set_task("{first}")
model.eval()
```

Or from the shell: `modcl pull --repo-id {repo_id} --out adapters/`.
"""
    return ModelCard(f'---\n{data.to_yaml()}\n---\n{body}')


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


class HubMixin:
    """Hub methods of modcl models (see ``push_tasks`` / ``pull_tasks``)."""

    def push_tasks_to_hub(self, repo_id: str, names: Optional[Iterable[str]] = None, **kwargs) -> str:
        """Push tasks to a Hub repo; see ``timm_modcl.hub.push_tasks``."""
        return push_tasks(self, repo_id, names, **kwargs)

    def load_tasks_from_hub(self, repo_id: str, names: Optional[Iterable[str]] = None, **kwargs) -> List[str]:
        """Add tasks from a Hub repo; see ``timm_modcl.hub.pull_tasks``."""
        return pull_tasks(self, repo_id, names, **kwargs)
