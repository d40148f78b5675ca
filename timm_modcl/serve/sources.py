"""Where the adapter of an add-task request comes from: the server's adapter folder or a Hub repo
(``download_hub_adapters``).
"""

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import HubError, ModCLError, TaskNotFoundError
from .config import ServeError
from .server import ModelServer


def _fetch_adapter(server: ModelServer, task: str, body: Dict[str, Any]) -> Any:
    """The adapter file a JSON add request points at: the server's folder or a Hub repo (downloaded first)."""
    from ..adapter import ADAPTER_FILE, read_index
    cfg = server.config
    source = body.get('source', 'hub' if 'repo_id' in body else 'folder')
    name = body.get('name', task)
    if not isinstance(name, str):
        raise ServeError('"name" must be a task name')
    if source == 'folder':
        if not cfg.adapters_dir:
            raise ServeError('the server was started without an adapter folder (--out); upload the adapter file '
                             'or name a Hub repo')
        index = read_index(cfg.adapters_dir)
        if name not in index['tasks']:
            raise TaskNotFoundError(f'the adapter folder has no task {name!r}; it has: '
                                    f'{", ".join(index["tasks"]) or "none"}')
        return Path(cfg.adapters_dir) / name / ADAPTER_FILE
    if source == 'hub':
        repo_id, revision, subfolder = body.get('repo_id'), body.get('revision'), body.get('subfolder')
        if not isinstance(repo_id, str) or not all(isinstance(s, (str, type(None))) for s in (revision, subfolder)):
            raise ServeError('"repo_id" (and optional "revision", "subfolder") must be strings')
        return download_hub_adapters(repo_id, [name], revision=revision, subfolder=subfolder,
                                     endpoint=cfg.hub_endpoint, token=cfg.hub_token, cache_dir=cfg.hub_cache_dir,
                                     timeout=cfg.hub_timeout)[1][name]
    raise ServeError(f'unknown source {source!r}; use "folder" or "hub"')


def download_hub_adapters(repo_id: str, names: Optional[Sequence[str]] = None, *, revision: Optional[str] = None,
                          subfolder: Optional[str] = None, endpoint: Optional[str] = None,
                          token: Optional[str] = None, cache_dir: Optional[str] = None,
                          timeout: Optional[float] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Download (into the huggingface_hub cache) the index and adapter files of a Hub repo.

    Returns:
        ``(index, {task: local path})``: the repo's ``modcl_index.json`` (architecture, fingerprint, tasks).

    Raises:
        HubError: repo, revision, index or task not found, or the Hub did not answer.
        AdapterFormatError: the index is malformed.
    """
    from huggingface_hub import hf_hub_download
    from ..adapter import ADAPTER_FILE, INDEX_FILE, read_index_file

    def join(p: str) -> str:
        return f'{subfolder.strip("/")}/{p}' if subfolder else p

    kw = dict(revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir,
              etag_timeout=timeout or 30)
    try:
        index = read_index_file(hf_hub_download(repo_id, join(INDEX_FILE), **kw), f'{repo_id}/{INDEX_FILE}')
        wanted = list(index['tasks']) if names is None else list(names)
        missing = [n for n in wanted if n not in index['tasks']]
        if missing:
            raise HubError(f'{repo_id!r} has no task(s) {missing}; it has {index["tasks"]}')
        return index, {n: hf_hub_download(repo_id, join(f'{n}/{ADAPTER_FILE}'), **kw) for n in wanted}
    except ModCLError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub's and the transport's errors
        first = str(e).splitlines()[0] if str(e) else ''
        raise HubError(f'could not download from {repo_id!r} (revision {revision or "main"}): '
                       f'{type(e).__name__}: {first}') from None
