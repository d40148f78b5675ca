"""``modcl merge``, ``modcl push`` and ``modcl pull``: adapter folders and the Hub."""
import argparse
import time
from pathlib import Path
from typing import Any, Dict

from ..errors import TaskExistsError
from ._common import DEFAULT_MODEL, UsageError, _backbone, _check_model_name, _load_adapters, _read_index_if_any, _say


def cmd_merge(args: argparse.Namespace) -> int:
    from ..adapter import merge_adapter_folders
    out = Path(args.out)
    names = merge_adapter_folders(args.sources, out, replace=args.replace)
    _say(f'{out}: {len(names)} task(s) from {len(args.sources)} folder(s): {", ".join(names)}')
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import push_tasks
    out = Path(args.out)
    model, index, _ = _load_adapters(args, out, args.task)
    names = args.task or list(index['tasks'])
    if not names:
        raise UsageError(f'{str(out)!r} has no tasks to push')
    url = push_tasks(model, args.repo_id, names, private=args.private, revision=args.revision,
                     subfolder=args.subfolder, token=args.token, commit_message=args.commit_message,
                     endpoint=args.endpoint)
    _say(f'pushed {len(names)} task(s) ({", ".join(names)}) to {args.repo_id}: {url}')
    return 0


def _remote_index(args, timeout: float) -> Dict[str, Any]:
    """The repo's checked index (architecture, fingerprint, tasks), fetched by the library within ``timeout``."""
    from ..hub import remote_index
    return remote_index(args.repo_id, revision=args.revision, subfolder=args.subfolder, token=args.token,
                        endpoint=args.endpoint, timeout=timeout)


def cmd_pull(args: argparse.Namespace) -> int:
    from .._settings import hub_timeout
    from ..adapter import load_tasks, save_tasks
    from ..hub import pull_tasks
    out = Path(args.out)
    local = _read_index_if_any(out)
    timeout, t0 = hub_timeout(), time.monotonic()  # one MODCL_HUB_TIMEOUT for all the Hub steps of the pull
    remote = _remote_index(args, timeout)
    hub_time = time.monotonic() - t0
    ref = local or remote
    if args.model is not None:
        name = args.model
    elif ref is not None:
        name = ref['architecture']
    else:
        name = DEFAULT_MODEL
    arch, _ = _check_model_name(name)
    if local is not None and remote is not None and (
            (local['architecture'], local['backbone_fingerprint'])
            != (remote['architecture'], remote['backbone_fingerprint'])):
        raise UsageError(f'{args.repo_id!r} holds adapters of another backbone than {str(out)!r}; pull into another '
                         f'--out folder')
    model, source = _backbone(name, args, None if ref is None else ref['backbone_fingerprint'],
                              what=f'the adapters of {args.repo_id!r}')
    existing = list(local['tasks']) if local else []
    if existing:
        load_tasks(model, out)
    clash = [t for t in (args.task or (remote or {}).get('tasks', [])) if t in existing]
    if clash and not args.replace:
        raise TaskExistsError(f'task {clash[0]!r} already exists in {str(out)!r}; pass --replace to overwrite it')
    pulled = pull_tasks(model, args.repo_id, args.task, revision=args.revision, subfolder=args.subfolder,
                        token=args.token, endpoint=args.endpoint, replace=args.replace,
                        timeout=max(timeout - hub_time, 0.001))
    save_tasks(model, out, names=pulled)
    _say(f'pulled {len(pulled)} task(s) ({", ".join(pulled)}) from {args.repo_id} into {out}')
    return 0
