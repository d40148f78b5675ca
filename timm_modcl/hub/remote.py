"""Talking to the Hub: typed errors that never name the token, one time bound per Hub step, refusing answers whose
ETag would name a file outside the cache, and downloading the index (``remote_index``) and chosen adapter files
(``download_adapter_files``).
"""

import math
import re
import threading
import time
from typing import Any, Dict, Iterable, Optional, Tuple

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError,
)

from ..adapter import ADAPTER_FILE, INDEX_FILE, read_index_file, task_names
from .._settings import hub_timeout
from ..errors import HubError
from ..version import __version__

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
