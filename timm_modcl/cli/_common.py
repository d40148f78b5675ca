"""What the ``modcl`` commands share: messages, exit codes, threads, the backbone of the arguments, adapter folders."""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..backbone import check_model_name as _check_model_name
from ..backbone import resolve_backbone
from ..errors import ModCLError

PROG = 'modcl'
DEFAULT_MODEL = 'modcl_mobilenetv2_100'
DEMO_OUT = 'modcl_demo'
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ModCLError, ValueError):
    """A command-line argument cannot be used."""


def _say(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def _err(msg: str) -> None:
    print(f'{PROG}: {msg}', file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) and e.filename:
        msg = f'{e.strerror or type(e).__name__}: {e.filename}'
    return ' '.join(msg.split())


def _idle_cpus() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        load = 0.0
    return max(1, min(cpus, int(cpus - load + 0.5)))


def _configure_threads(requested: Optional[int]) -> Optional[int]:
    """Set torch's CPU threads; returns the previous count to restore, or ``None`` if unchanged.

    ``--threads N`` wins. Otherwise, unless ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` say how many, use the CPU
    cores that are idle (from the load average), at most torch's default: OpenMP threads that compete with other
    busy processes for the same cores slow small convolutions down many times over.
    """
    import torch
    previous = torch.get_num_threads()
    if requested is None:
        if os.environ.get('OMP_NUM_THREADS') or os.environ.get('MKL_NUM_THREADS'):
            return None
        requested = min(previous, _idle_cpus())
    if requested == previous:
        return None
    torch.set_num_threads(requested)
    return previous


def _backbone(
        name: str,
        args: argparse.Namespace,
        fingerprint: Optional[str] = None,
        *,
        fallback_random: bool = False,
        what: str = 'the adapters',
):
    """``(model, source description)``: ``resolve_backbone`` with ``--weights`` / ``--[no-]pretrained``; says so
    when ``fallback_random`` falls back to the random backbone."""
    model, source, fallback = resolve_backbone(
        name, file=getattr(args, 'weights', None), pretrained=getattr(args, 'pretrained', None),
        fingerprint=fingerprint, fallback_random=fallback_random, what=what)
    if fallback is not None:
        _say(f'could not download pretrained weights ({fallback}); falling back to random initialisation')
    return model, source


def _read_index_if_any(out: Path) -> Optional[Dict[str, Any]]:
    from ..adapter import INDEX_FILE, read_index
    if out.exists() and not out.is_dir():
        raise UsageError(f'--out {str(out)!r} is a file, not a folder')
    if (out / INDEX_FILE).is_file():
        return read_index(out)
    return None


def _require_index(out: Path) -> Dict[str, Any]:
    if not out.exists():
        raise UsageError(f'adapter folder {str(out)!r} does not exist (train a task first: modcl train ... --out '
                         f'{out})')
    index = _read_index_if_any(out)
    if index is None:
        raise UsageError(f'{str(out)!r} is not a folder of timm_modcl adapters (it has no modcl_index.json)')
    return index


def _load_adapters(args: argparse.Namespace, out: Path, names: Optional[Sequence[str]] = None):
    """Model with the backbone the adapters in ``out`` were trained on and (some of) their tasks."""
    from ..adapter import load_tasks
    index = _require_index(out)
    if names is not None:
        missing = [n for n in names if n not in index['tasks']]
        if missing:
            raise UsageError(f'{str(out)!r} has no task {missing[0]!r}; it has: {", ".join(index["tasks"]) or "none"}')
    arch = index['architecture']
    _check_model_name(arch)
    model, source = _backbone(arch, args, index['backbone_fingerprint'], what=f'the adapters in {str(out)!r}')
    load_tasks(model, out, names=names)
    return model, index, source


def _progress(args) -> bool:
    return not getattr(args, 'no_progress', False) and sys.stderr.isatty()


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{100 * v:.1f}%'


def _quiet(*args, **kwargs) -> None:
    pass
