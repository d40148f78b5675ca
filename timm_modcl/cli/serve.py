"""``modcl serve``: the tasks of an adapter folder and/or a Hub repo over HTTP (see ``timm_modcl.serve``)."""
import argparse
import os
from pathlib import Path
from typing import Any, Dict

from ._common import UsageError, _backbone, _check_model_name, _require_index, _say


def cmd_serve(args: argparse.Namespace) -> int:
    """``modcl serve``: the tasks of --out and/or --repo-id over HTTP (see ``timm_modcl.serve``)."""
    try:
        from ..serve import ServeConfig, create_app, folder_adapters, is_loopback, run, setup_logging
    except ImportError as e:
        raise UsageError(f'{e}' if 'timm_modcl[serve]' in str(e) else
                         f'modcl serve needs the serve extra ({e}): pip install "timm_modcl[serve]"') from None
    api_key = args.api_key or os.environ.get('MODCL_API_KEY') or None
    if not is_loopback(args.host) and not api_key:
        raise UsageError(f'--host {args.host} accepts connections from other machines: set an API key for the write '
                         f'endpoints (--api-key KEY or MODCL_API_KEY)')
    if args.out is None and args.repo_id is None and args.model is None:
        raise UsageError('give the tasks to serve: --out DIR (an adapter folder) and/or --repo-id ID (a Hub repo), '
                         'or --model NAME to start without tasks')
    initial: Dict[str, Any] = {}
    arch, fingerprint, what = args.model, None, 'the adapters'
    if args.out is not None:
        index = _require_index(Path(args.out))
        arch, fingerprint, what = index['architecture'], index['backbone_fingerprint'], f'the adapters in {args.out!r}'
        initial.update(folder_adapters(args.out, [n for n in index['tasks'] if not args.task or n in args.task]))
        if args.task and args.repo_id is None and len(initial) < len(set(args.task)):
            raise UsageError(f'{args.out!r} has no task {sorted(set(args.task) - set(initial))[0]!r}')
    if args.repo_id is not None:
        from ..hub import download_adapter_files  # bounded by MODCL_HUB_TIMEOUT
        index, files = download_adapter_files(args.repo_id, args.task, revision=args.revision,
                                              subfolder=args.subfolder, endpoint=args.endpoint, token=args.token)
        if arch is None:
            arch, fingerprint, what = index['architecture'], index['backbone_fingerprint'], repr(args.repo_id)
        initial.update(files)
    _check_model_name(arch)
    model, source = _backbone(arch, args, fingerprint, what=what)
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_body_bytes=int(args.max_body_mib * 2 ** 20),
                         max_image_bytes=int(min(args.max_body_mib, 16) * 2 ** 20), max_pixels=args.max_pixels,
                         input_size=args.input_size, api_key=api_key, adapters_dir=args.out,
                         hub_endpoint=args.endpoint, hub_token=args.token, device=args.device)
    if args.cache_mib is not None:
        model.set_weight_cache_limit(int(args.cache_mib * 2 ** 20))
    setup_logging(args.log_level)
    app = create_app(model, config, initial=initial)
    _say(f'serving {len(initial)} task(s) of {arch} ({source}) on http://{args.host}:{args.port} '
         f'(OpenAPI: /openapi.json, page: /)')
    run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
