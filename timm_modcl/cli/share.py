"""``modcl merge``, ``modcl push`` and ``modcl pull``: adapter folders and the Hub, file to file (no backbone)."""
import argparse
from pathlib import Path

from ._common import UsageError, _check_model_name, _read_index_if_any, _require_index, _say


def cmd_merge(args: argparse.Namespace) -> int:
    from ..adapter import merge_adapter_folders
    out = Path(args.out)
    names = merge_adapter_folders(args.sources, out, replace=args.replace)
    _say(f'{out}: {len(names)} task(s) from {len(args.sources)} folder(s): {", ".join(names)}')
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import push_folder
    out = Path(args.out)
    index = _require_index(out)
    names = args.task or list(index['tasks'])
    if not names:
        raise UsageError(f'{str(out)!r} has no tasks to push')
    missing = [n for n in names if n not in index['tasks']]
    if missing:
        raise UsageError(f'{str(out)!r} has no task {missing[0]!r}; it has: {", ".join(index["tasks"]) or "none"}')
    url = push_folder(out, args.repo_id, tasks=names, private=args.private, revision=args.revision,
                      subfolder=args.subfolder, token=args.token, commit_message=args.commit_message,
                      endpoint=args.endpoint)
    _say(f'pushed {len(names)} task(s) ({", ".join(names)}) to {args.repo_id}: {url}')
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ..hub import pull_folder
    out = Path(args.out)
    _read_index_if_any(out)  # a file, or a corrupt index: refused before the Hub is asked
    pulled = pull_folder(args.repo_id, out, tasks=args.task, replace=args.replace, revision=args.revision,
                         subfolder=args.subfolder, token=args.token, endpoint=args.endpoint,
                         architecture=None if args.model is None else _check_model_name(args.model)[0])
    _say(f'pulled {len(pulled)} task(s) ({", ".join(pulled)}) from {args.repo_id} into {out}')
    return 0
