"""File helpers: atomic writes, a bounded JSON reader, and a lock that serialises the writers of one folder.

Atomic writes go to a temporary file in the target folder, fsync, then a rename over the target. The written file
gets the permissions an ordinary ``open(path, 'w')`` would give it (``0o666`` minus the umask), or keeps those of the
file it replaces.
"""
import contextlib
import errno
import json
import os
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Type, Union

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


#: Deepest nesting of lists / objects that any JSON the library reads may have (real files need fewer than 8).
MAX_JSON_DEPTH = 64


def load_json(data: Union[bytes, str], error: Type[Exception], label: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text from a file, header or the Hub, refusing malformed or too deeply nested content.

    Args:
        data: The JSON text.
        error: The exception class to raise (the reader's own typed error).
        label: What is being read, for the message.
        max_depth: Deepest allowed nesting of lists and objects.

    Raises:
        error: the text is not valid UTF-8 JSON, or nests lists / objects deeper than ``max_depth`` (deep nesting
            would otherwise exhaust the interpreter's recursion limit here or in later processing).
    """
    try:
        obj = json.loads(data)
    except RecursionError:
        raise error(f'{label} is corrupt: its JSON is nested more than {max_depth} levels deep') from None
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise error(f'{label} is corrupt: {e}') from None
    stack = [(obj, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise error(f'{label} is corrupt: its JSON is nested more than {max_depth} levels deep')
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return obj


_NO_LOCKS = {getattr(errno, n) for n in ('ENOLCK', 'EINVAL', 'EOPNOTSUPP', 'ENOTSUP') if hasattr(errno, n)}
#: Seconds a writer waits for another writer of the same folder before giving up.
FOLDER_LOCK_TIMEOUT = 120.0


@contextlib.contextmanager
def folder_lock(folder: _PathLike, error: Type[Exception], timeout: float = FOLDER_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` (which must exist) so that its writers, in any process, serialise.

    On POSIX systems the lock is a ``flock`` on the folder itself (no lock file is left behind; the kernel releases
    it when the holder dies, even by ``kill -9``); elsewhere it is a ``filelock`` lock file ``.modcl.lock`` in it.

    Raises:
        error: the folder cannot be opened, or another writer held it for more than ``timeout`` seconds.
    """
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # Windows
        from filelock import FileLock, Timeout
        try:
            with FileLock(str(folder / '.modcl.lock'), timeout=timeout):
                yield
        except Timeout:
            raise error(f'another process has been writing to {str(folder)!r} for over {timeout:.0f} s') from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        except OSError as e:
            raise error(f'could not open folder {str(folder)!r}: {e.strerror or e}') from None
        try:
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise error(f'another process has been writing to {str(folder)!r} for over '
                                        f'{timeout:.0f} s; nothing was written') from None
                        time.sleep(0.01)
                locked, now = os.fstat(fd), os.stat(folder)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise error(f'could not lock folder {str(folder)!r}: {e.strerror or e}') from None
                # a file system without flock (some network / FUSE mounts): write, but say so
                warnings.warn(f'{str(folder)!r} cannot be locked ({e.strerror}); concurrent writers of it are not '
                              f'serialised', stacklevel=3)
                locked = now = None
            if locked is None or (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino):
                yield
                return
            # the folder was replaced (renamed over) while we waited: lock the one that is there now
        finally:
            os.close(fd)  # releases the lock
