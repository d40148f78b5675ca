"""Atomic file writes: a temporary file in the target folder, fsync, then a rename over the target.

The written file gets the permissions an ordinary ``open(path, 'w')`` would give it (``0o666`` minus the umask), or
keeps those of the file it replaces.
"""
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Union

_PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: _PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    An interrupted write leaves the previous file (if any) intact and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), else set and restored."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: _PathLike, obj: Any) -> Path:
    """``atomic_write_bytes`` of ``obj`` as indented JSON with a trailing newline."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + '\n').encode('utf-8'))
