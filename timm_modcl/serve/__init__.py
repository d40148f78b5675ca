"""``modcl serve``: one frozen backbone serving many task adapters over HTTP (FastAPI + uvicorn).

    from timm_modcl.serve import ServeConfig, create_app, folder_adapters, run
    app = create_app(model, ServeConfig(max_batch=32), initial=folder_adapters('adapters/'))
    run(app, host='127.0.0.1', port=8000)

Needs the ``serve`` extra: ``pip install "timm_modcl[serve]"``.
"""
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ['ServeConfig', 'create_app', 'folder_adapters', 'download_hub_adapters', 'is_loopback', 'run',
           'setup_logging', 'JsonFormatter', 'MISSING_EXTRA']

MISSING_EXTRA = 'modcl serve needs FastAPI, uvicorn, python-multipart and prometheus_client: ' \
                'pip install "timm_modcl[serve]"'

try:
    from .app import ServeConfig, create_app, download_hub_adapters, is_loopback  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised by the CLI test with the packages hidden
    if getattr(_e, 'name', None) and _e.name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'multipart',
                                                                 'python_multipart', 'prometheus_client'):
        raise ImportError(MISSING_EXTRA, name=_e.name) from _e
    raise


def folder_adapters(directory, names: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """``{task: adapter file}`` of an adapter folder written by ``save_tasks`` (default: every task it lists).

    Raises:
        AdapterError, AdapterFormatError: no or malformed index, or a requested task is not in it.
    """
    from ..adapter import ADAPTER_FILE, read_index
    from ..errors import AdapterError
    index = read_index(directory)
    wanted = list(index['tasks']) if names is None else list(names)
    for n in wanted:
        if n not in index['tasks']:
            raise AdapterError(f'{str(directory)!r} has no task {n!r}; it has {index["tasks"]}')
    return {n: Path(directory) / n / ADAPTER_FILE for n in wanted}


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, message and the record's ``extra`` fields."""

    _skip = set(vars(logging.LogRecord('', 0, '', 0, '', None, None))) | {'message', 'asctime', 'color_message'}

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {'time': round(record.created, 3), 'level': record.levelname.lower(),
                               'logger': record.name, 'msg': record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out['exc'] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = 'info') -> None:
    """Structured (JSON lines) logs of the server on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ('timm_modcl.serve', 'uvicorn', 'uvicorn.error'):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def run(app, host: str = '127.0.0.1', port: int = 8000, log_level: str = 'info', sockets=None) -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT / SIGTERM shut it down gracefully)."""
    import uvicorn
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=sockets)
