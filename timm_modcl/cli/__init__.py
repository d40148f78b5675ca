"""The ``modcl`` command line: learn tasks on image folders, evaluate, inspect, predict, share through the Hub.

    modcl demo                                            # 5 digit tasks, accuracy matrix, zero forgetting
    modcl train --data flowers/ --task flowers --out adapters/
    modcl train --data birds/ --task birds --out adapters/   # adds a second task
    modcl eval --out adapters/ --data flowers/ --task flowers
    modcl info --out adapters/
    modcl predict rose.jpg --out adapters/ --task flowers
    modcl predict rose.jpg sparrow.jpg --out adapters/       # unknown task: chosen among all tasks
    modcl push --out adapters/ --repo-id me/my-adapters
    modcl pull --repo-id me/my-adapters --out adapters/
    modcl merge --out all/ worker0/ worker1/ worker2/          # tasks learned in parallel, one folder
    modcl serve --out adapters/ --port 8000                  # HTTP API, batched across tasks
    torchrun --nproc_per_node 4 -m timm_modcl train --data big/ --task big --out adapters/ --device cuda

Errors in what was asked (missing folders, bad images, unknown model or task, ...) end with one line
``modcl: error: ...`` and exit code 2; ``--verbose`` shows the traceback.

The package: ``parser`` (the arguments), ``train`` (train, eval, demo), ``tasks`` (tasks, info, predict), ``share``
(merge, push, pull), ``serve``; ``_common`` holds what they share. Each command turns its arguments into library calls.
"""
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

# names this module had before it became a package, used by tests and benchmarks (RANDOM_INIT_SEED, _create)
from ..backbone import RANDOM_INIT_SEED, WeightsUnavailableError  # noqa: F401
from ..backbone import check_model_name as _check_model_name  # noqa: F401
from ..backbone import create_backbone as _create  # noqa: F401
from ..errors import ModCLError
from ._common import EXIT_FAILURE, EXIT_USAGE, UsageError, _configure_threads, _err, _one_line  # noqa: F401
from .parser import build_parser

__all__ = ['main', 'build_parser']


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err(f'warning: {" ".join(str(message).split())}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``modcl`` command line; returns the exit code (0: success, 2: error in what was asked, 1: failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # --help, --version, usage errors (argparse printed the message)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if not getattr(args, 'command', None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    verbose = getattr(args, 'verbose', False)
    restore_threads = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            restore_threads = _configure_threads(getattr(args, 'threads', None))
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            _err('interrupted')
            return 130
        except BrokenPipeError:  # e.g. `modcl info ... | head`: the reader is gone, nothing left to say
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return EXIT_FAILURE
        except (ModCLError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                ValueError) as e:
            if verbose:
                traceback.print_exc()
            _err(f'error: {_one_line(e)}')
            return EXIT_USAGE
        except Exception as e:  # noqa: BLE001 - a bug or an environment problem: one line unless --verbose
            if verbose:
                traceback.print_exc()
            _err(f'error: {type(e).__name__}: {_one_line(e)} (run with --verbose for the traceback)')
            return EXIT_FAILURE
        finally:
            if restore_threads is not None:
                import torch
                torch.set_num_threads(restore_threads)
