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
"""
import argparse
import difflib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import FingerprintMismatchError, ModCLError, TaskExistsError

__all__ = ['main', 'build_parser']

PROG = 'modcl'
DEFAULT_MODEL = 'modcl_mobilenetv2_100'
#: Seed of the random backbone of ``--no-pretrained``: the same seed gives the same backbone (and fingerprint), so
#: adapters trained on a random backbone can be evaluated and extended later.
RANDOM_INIT_SEED = 0
DEMO_OUT = 'modcl_demo'
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ModCLError, ValueError):
    """A command-line argument cannot be used."""


class WeightsUnavailableError(ModCLError, RuntimeError):
    """Pretrained backbone weights could not be downloaded or read."""


def _say(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def _err(msg: str) -> None:
    print(f'{PROG}: {msg}', file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) and e.filename:
        msg = f'{e.strerror or type(e).__name__}: {e.filename}'
    return ' '.join(msg.split())


# ---------------------------------------------------------------------------------------------------- threads
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


# ---------------------------------------------------------------------------------------------------- backbone
def _check_model_name(name: str) -> Tuple[str, Optional[str]]:
    """``(architecture, tag or None)`` of a modcl model name, or a UsageError suggesting the known names."""
    import timm
    import timm_modcl  # noqa: F401  (registers the models)
    from timm.models import split_model_name_tag
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('modcl_*')
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        what = 'is a timm model but not a modcl model' if timm.is_model(arch) else 'is not a known model'
        raise UsageError(f'{name!r} {what}; {hint}choose one of: {", ".join(known)}')
    if tag and name not in timm.list_pretrained(f'{arch}.*'):
        raise UsageError(f'{name!r}: {arch} has no pretrained tag {tag!r}; known: '
                         f'{", ".join(timm.list_pretrained(f"{arch}.*"))}')
    return arch, tag or None


def _create(name: str, file: Optional[str] = None, pretrained: bool = False):
    import timm
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # random parts (and --no-pretrained backbones) are reproducible
        if file is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        return timm.create_model(name, pretrained=pretrained)


def _from_file(name: str, file: str):
    path = Path(file).expanduser()
    if not path.exists():
        raise FileNotFoundError(2, 'weights file does not exist', str(path))
    if path.is_dir():
        raise UsageError(f'weights file {str(path)!r} is a folder; pass the checkpoint file')
    try:
        return _create(name, file=str(path))
    except ModCLError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error of a foreign checkpoint
        raise WeightsUnavailableError(f'could not load weights file {str(path)!r}: {_one_line(e)}') from e


def _cached_weights(name: str) -> Optional[str]:
    """A pretrained checkpoint of ``name`` already in the Hugging Face or torch hub cache, if any."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            for fname in ('model.safetensors', 'pytorch_model.bin'):
                hit = try_to_load_from_cache(cfg.hf_hub_id.split('@')[0], fname)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # noqa: BLE001 - cache lookup is best effort
            return None
    if cfg.url:
        import torch.hub
        hit = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(cfg.url))
        if os.path.isfile(hit):
            return hit
    return None


def _reachable(name: str, timeout: float = 3.0) -> Optional[str]:
    """``None`` if the host serving ``name``'s pretrained weights answers, else why not (a quick check, so an
    offline machine fails in seconds instead of after the download client's retries)."""
    import socket
    from urllib.parse import urlparse
    from timm.models import get_pretrained_cfg
    from ._settings import hub_offline
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f'{name} has no pretrained weights to download'
    if cfg.hf_hub_id:
        if hub_offline():
            return 'HF_HUB_OFFLINE is set'
        from huggingface_hub import constants
        url = constants.ENDPOINT
    else:
        url = cfg.url
    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f'cannot reach {host}: {e.strerror or e}'
    return None


def _from_hub(name: str):
    cached = _cached_weights(name)
    if cached is not None:
        try:
            return _create(name, file=cached)
        except Exception:  # noqa: BLE001 - a broken cache entry: try a download
            pass
    why = _reachable(name)
    if why is not None:
        raise WeightsUnavailableError(why)
    try:
        return _create(name, pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(_one_line(e)) from e


def _describe_source(kind: str, name: str, file: Optional[str] = None) -> str:
    if kind == 'file':
        return f'file:{Path(file).name}'
    if kind == 'random':
        return f'random-init(seed={RANDOM_INIT_SEED})'
    return f'hub:{name}'


def _backbone(
        name: str,
        args: argparse.Namespace,
        fingerprint: Optional[str] = None,
        *,
        fallback_random: bool = False,
        what: str = 'the adapters',
):
    """Build the modcl model ``name`` with the backbone weights the arguments ask for.

    ``--weights FILE``: that checkpoint. ``--no-pretrained``: the seeded random backbone. ``--pretrained``: the
    pretrained weights of timm (downloaded, or from the cache). Neither: with a known ``fingerprint`` (adapters
    exist), the first of ``MODCL_WEIGHTS``, the random backbone and the pretrained weights that matches it; without,
    ``MODCL_WEIGHTS`` or the pretrained weights, and with ``fallback_random`` the random backbone when they cannot
    be had. Returns ``(model, source description)``.
    """
    from ._settings import weights_file
    weights = getattr(args, 'weights', None)
    pretrained = getattr(args, 'pretrained', None)
    if weights is not None:
        candidates = [('file', weights)]
    elif pretrained is False:
        candidates = [('random', None)]
    elif pretrained is True:
        candidates = [('hub', None)]
    else:
        env = weights_file()
        if fingerprint is not None:
            candidates = ([('file', env)] if env else []) + [('random', None), ('hub', None)]
        else:
            candidates = [('file', env)] if env else [('hub', None)]
    explicit = weights is not None or pretrained is not None
    tried: List[str] = []
    for kind, file in candidates:
        source = _describe_source(kind, name, file)
        try:
            if kind == 'file':
                model = _from_file(name, file)
            elif kind == 'random':
                model = _create(name)
            else:
                model = _from_hub(name)
        except WeightsUnavailableError as e:
            if explicit or fingerprint is None:
                if fallback_random and kind == 'hub':
                    _say(f'could not download pretrained weights ({e}); falling back to random initialisation')
                    return _create(name), _describe_source('random', name)
                raise WeightsUnavailableError(
                    f'could not get pretrained weights for {name} ({e}); pass --weights FILE (a local checkpoint, '
                    f'or set MODCL_WEIGHTS) or --no-pretrained') from None
            tried.append(f'{source} ({e})')
            continue
        if fingerprint is None or model.backbone_fingerprint() == fingerprint:
            return model, source
        tried.append(source)
        if explicit:
            break
    raise FingerprintMismatchError(
        f'{what} were trained on other backbone weights (fingerprint {fingerprint[:12]}...) than '
        f'{" / ".join(tried)}; pass --weights FILE with the checkpoint they were trained on'
        + ('' if explicit else ' (or --pretrained / --no-pretrained)'))


def _read_index_if_any(out: Path) -> Optional[Dict[str, Any]]:
    from .adapter import INDEX_FILE, read_index
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
    from .adapter import load_tasks
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


def _task_input_size(model, task: str) -> Optional[int]:
    v = model.tasks[task].metadata.get('input_size')
    try:
        return int(v) if v else None
    except ValueError:
        return None


def _progress(args) -> bool:
    return not getattr(args, 'no_progress', False) and sys.stderr.isatty()


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{100 * v:.1f}%'


# ---------------------------------------------------------------------------------------------------- commands
def _quiet(*args, **kwargs) -> None:
    pass


def cmd_train(args: argparse.Namespace) -> int:
    from .adapter import load_tasks, save_tasks
    from .data import image_folder_datasets
    from .distributed import get_world_size, init_distributed, is_main_process
    from .task import validate_task_name
    from .train import evaluate, train_task

    if args.resume and not args.checkpoint:
        raise UsageError('--resume needs --checkpoint PATH (the checkpoint to resume from)')
    # under torchrun (WORLD_SIZE > 1): join the process group; rank 0 prints and saves
    ddp = init_distributed(args.device)
    say = _say if is_main_process() else _quiet
    out = Path(args.out)
    validate_task_name(args.task)
    index = _read_index_if_any(out)
    if index is not None and args.task in index['tasks'] and not args.replace and args.resume:
        finished = _finished_run(out, args, write=is_main_process())
        if finished is not None:
            say(finished)
            return 0
    if index is not None and args.task in index['tasks'] and not args.replace:
        raise TaskExistsError(f'task {args.task!r} already exists in {str(out)!r}; pass --replace to train it again '
                              f'(or choose another --task name)')
    if index is not None:
        arch = index['architecture']
        if args.model is not None and _check_model_name(args.model)[0] != arch:
            raise UsageError(f'{str(out)!r} holds adapters of {arch}, not {args.model}; use another --out folder')
        name = args.model or arch
    else:
        name = args.model or DEFAULT_MODEL
    arch, _ = _check_model_name(name)
    if not Path(args.data).exists():  # fail before building the model
        raise FileNotFoundError(2, 'data folder does not exist', str(args.data))

    t0 = time.perf_counter()
    model, source = _backbone(name, args, None if index is None else index['backbone_fingerprint'],
                              what=f'the adapters in {str(out)!r}')
    previous = [t for t in (index or {}).get('tasks', []) if t != args.task]
    if previous:
        load_tasks(model, out, names=previous)
    train_ds, val_ds, classes = image_folder_datasets(
        args.data, model, input_size=args.input_size, val_fraction=args.val_fraction, seed=args.seed,
        augment=not args.no_augment)
    if len(classes) < 2:
        raise UsageError(f'{args.data!r} has a single class folder ({classes[0]!r}); a task needs at least 2 classes')
    size = (args.input_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1])
    skipped = len(train_ds.skipped_files) + (len(val_ds.skipped_files) if val_ds is not None else 0)
    say(f'{args.task}: {len(classes)} classes, {len(train_ds)} training / {len(val_ds) if val_ds else 0} '
        f'validation images at {size}px' + (f' ({skipped} unreadable file(s) skipped)' if skipped else '')
        + f'; {arch}, backbone {source}' + (f', {len(previous)} existing task(s)' if previous else '')
        + (f'; {get_world_size()} processes (DistributedDataParallel)' if ddp else ''))
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the new head's initialisation: --seed makes the whole run reproducible
        model.add_task(
            args.task, len(classes), tuple(args.resolution) if args.resolution else 'default',
            variant=args.variant, class_names=classes,
            metadata={'input_size': str(size), 'backbone': source, 'data': Path(args.data).name,
                      'epochs': str(args.epochs)},
            replace=True)
    head_lr = {} if args.head_lr is None else {'head_lr': args.head_lr}  # else train_task's default
    history = train_task(
        model, args.task, train_ds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, **head_lr,
        weight_decay=args.weight_decay, device=args.device, seed=args.seed,
        num_workers=args.workers, progress=_progress(args), sync_bn=args.sync_bn, checkpoint=args.checkpoint,
        resume=args.resume)
    acc = evaluate(model, val_ds, args.task, batch_size=args.batch_size, num_workers=args.workers,
                   distributed=ddp) if val_ds else None
    if not is_main_process():
        return 0
    meta = model._task(args.task).metadata
    meta['train_images'] = str(len(train_ds))
    if acc is not None:
        meta['metric_val_acc'] = f'{acc:.4f}'
        meta['val_images'] = str(len(val_ds))
    model.to('cpu')
    save_tasks(model, out, names=[args.task])
    history.to_json(out / args.task / 'train_history.json')
    n_tasks = len(previous) + 1
    say(f'{args.task}: ' + (f'validation accuracy {_pct(acc)} ({len(val_ds)} images)' if acc is not None
                            else 'no validation images')
        + (f'; final training loss {history.train_loss[-1]:.4f}' if history.epochs else '')
        + f'; saved {n_tasks} task(s) to {out} in {time.perf_counter() - t0:.1f} s')
    return 0


def _finished_run(out: Path, args: argparse.Namespace, write: bool = True) -> Optional[str]:
    """What to say when ``--resume`` finds its run finished and its adapter saved in ``out`` (a kill after the save):
    the checkpoint is done, of this task and number of epochs, and the saved adapter holds its trained tensors
    (modulators, norm affine, head). Writes the history if the kill came before it (``write``: this process
    writes). ``None``: not this run's.

    Raises:
        CheckpointError: an unreadable or corrupt checkpoint.
        AdapterError: an unreadable adapter.
    """
    import torch

    from .adapter import ADAPTER_FILE, read_adapter
    from .checkpoint import _check_history, parse_checkpoint, read_checkpoint_bytes
    from .train import TrainHistory
    data = read_checkpoint_bytes(args.checkpoint)
    if data is None:
        return None
    ck = parse_checkpoint(data, repr(str(args.checkpoint)))
    if not ck.done or ck.state['task'] != args.task or ck.state['run'].get('epochs') != args.epochs:
        return None
    _, saved = read_adapter(out / args.task / ADAPTER_FILE, inside=out)
    trained = {k[len('task.'):]: v for k, v in ck.tensors.items()
               if k.startswith(('task.modulator.', 'task.norm.', 'task.head.'))}
    if set(trained) != {k for k in saved if k.startswith(('modulator.', 'norm.', 'head.'))} or not all(
            saved[k].dtype == v.dtype and saved[k].shape == v.shape and torch.equal(saved[k], v)
            for k, v in trained.items()):
        return None
    history = out / args.task / 'train_history.json'
    if write and not history.is_file():
        _check_history(ck.history, args.task, ck.epoch, repr(str(args.checkpoint)))
        TrainHistory.from_dict(ck.history).to_json(history)
    return (f'{args.task}: the run of {args.checkpoint} finished and its adapter is already saved in {out}; '
            f'nothing to resume (pass --replace to train it again)')


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapter import merge_adapter_folders
    out = Path(args.out)
    names = merge_adapter_folders(args.sources, out, replace=args.replace)
    _say(f'{out}: {len(names)} task(s) from {len(args.sources)} folder(s): {", ".join(names)}')
    return 0


def _eval_targets(args, model, index) -> List[Tuple[str, Path]]:
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(2, 'data folder does not exist', str(data))
    if args.task:
        # a folder with one subfolder per task works with --task too (unless the task has a class of that name)
        if (data / args.task).is_dir() and args.task not in (model.tasks[args.task].class_names or ()):
            return [(args.task, data / args.task)]
        return [(args.task, data)]
    per_task = [(t, data / t) for t in index['tasks'] if (data / t).is_dir()]
    if per_task:
        return per_task
    if len(index['tasks']) == 1:
        return [(index['tasks'][0], data)]
    raise UsageError(f'{str(args.out)!r} has {len(index["tasks"])} tasks: pass --task NAME, or a --data folder with '
                     f'one subfolder per task ({", ".join(index["tasks"][:3])}, ...)')


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import eval_transform, image_folder_datasets
    from .train import evaluate

    out = Path(args.out)
    index = _require_index(out)
    if args.task and args.task not in index['tasks']:
        raise UsageError(f'{str(out)!r} has no task {args.task!r}; it has: {", ".join(index["tasks"]) or "none"}')
    model, index, source = _load_adapters(args, out, [args.task] if args.task else None)
    targets = _eval_targets(args, model, index)
    rows = []
    for task, folder in targets:
        info = model.tasks[task]
        size = _task_input_size(model, task)
        if args.split == 'all':
            ds, _, _ = image_folder_datasets(folder, model, input_size=size, class_names=info.class_names,
                                             val_fraction=0.0)
            ds.transform = eval_transform(model, size)
        else:
            _, ds, _ = image_folder_datasets(folder, model, input_size=size, class_names=info.class_names,
                                             val_fraction=args.val_fraction, seed=args.seed)
            if ds is None:
                raise UsageError(f'{str(folder)!r} has no validation images; pass --split all to evaluate on every '
                                 f'image')
        if info.class_names is None and len(ds.class_names) != info.num_classes:
            raise UsageError(f'task {task!r} has {info.num_classes} classes, {str(folder)!r} has '
                             f'{len(ds.class_names)} class folders')
        acc = evaluate(model, ds, task, batch_size=args.batch_size, device=args.device, num_workers=args.workers)
        rows.append((task, info.num_classes, len(ds), acc))
    w = max(4, *(len(r[0]) for r in rows))
    _say(f'{"task".ljust(w)}  classes  images  accuracy')
    for task, k, n, acc in rows:
        _say(f'{task.ljust(w)}  {k:7d}  {n:6d}  {_pct(acc):>8}')
    if args.json:
        payload = {'adapters': str(out), 'split': args.split, 'backbone': source,
                   'results': [{'task': t, 'classes': k, 'images': n, 'accuracy': a} for t, k, n, a in rows]}
        from .adapter import atomic_write_bytes
        atomic_write_bytes(args.json, (json.dumps(payload, indent=2) + '\n').encode())
    return 0


def _adapter_summaries(out: Path, index: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per task, what its adapter file says, validated as loading would (read without building a model)."""
    from .adapter import ADAPTER_FILE, describe_adapter
    rows = []
    for t in index['tasks']:
        f = out / t / ADAPTER_FILE
        d = describe_adapter(f, inside=out)
        d['file_bytes'] = f.stat().st_size
        d['num_added_values'] = d['num_modulator_params'] + d['num_head_params'] + d['num_norm_values']
        rows.append(d)
    return rows


def _float_or_none(s: str) -> Optional[float]:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if 0.0 <= v <= 1.0 else None


def _classes_str(names: Optional[Sequence[str]], k: Optional[int], limit: int = 6) -> str:
    if not names:
        return f'{k} classes'
    shown = ', '.join(names[:limit]) + (', ...' if len(names) > limit else '')
    return f'{len(names)} classes: {shown}'


def cmd_tasks(args: argparse.Namespace) -> int:
    out = Path(args.out)
    index = _require_index(out)
    rows = _adapter_summaries(out, index)
    if not rows:
        _say(f'{out}: no tasks')
    w = max([4] + [len(r['name']) for r in rows])
    for r in rows:
        _say(f'{r["name"].ljust(w)}  {_classes_str(r["class_names"], r["num_classes"])}')
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    out = Path(args.out)
    index = _require_index(out)
    rows = _adapter_summaries(out, index)
    total = sum(r['file_bytes'] for r in rows)
    sources = sorted({r['metadata'].get('backbone') or '' for r in rows})
    if not rows or '' in sources or any(x.startswith('hub:') for x in sources):  # timm's pretrained weights
        sources = [x for x in sources if x] + [f'pretrained tag {index.get("pretrained_tag") or "?"}']
    _say(f'adapters:     {out}')
    _say(f'architecture: {index["architecture"]}')
    _say(f'backbone:     {", ".join(dict.fromkeys(sources))}')
    _say(f'fingerprint:  {index["backbone_fingerprint"]}')
    _say(f'tasks:        {len(rows)} ({total / 1024:.1f} KiB in all)')
    for r in rows:
        meta = r['metadata']
        _say(f'\n  {r["name"]}')
        _say(f'    classes:    {_classes_str(r["class_names"], r["num_classes"], limit=10)}')
        config = r['config']
        res = config.resolution
        layers = f', {len(config.layer_resolution)} per-layer override(s)' if config.layer_resolution else ''
        if config.method == 'lora':
            _say(f'    method:     lora, rank {config.rank}' + (f', alpha {config.alpha:g}' if config.alpha else '')
                 + layers if res else f'    method:     none{layers}')
        else:
            _say(f'    modulation: {config.variant}, resolution {res[0]}x{res[1]}{layers}' if res else
                 f'    modulation: none{layers}')
        stats = f' + {r["num_stats_values"]:,} statistics values' if r['num_stats_values'] else ''
        what = 'LoRA factors' if config.method == 'lora' else 'modulators'
        _say(f'    values:     {r["num_added_values"]:,} ({r["num_modulator_params"]:,} in {what}){stats}')
        # bytes counted from the same tensors: all of the file's (BatchNorm counters as int64) plus its JSON header
        _say(f'    file:       {r["num_values"]:,} values = {r["tensor_bytes"] / 1024:.1f} KiB of tensors '
             f'({r["dtype"]}) + {(r["file_bytes"] - r["tensor_bytes"]) / 1024:.1f} KiB header = '
             f'{r["file_bytes"] / 1024:.1f} KiB')
        if meta.get('input_size'):
            _say(f'    input size: {meta["input_size"]}px')
        if meta.get('metric_val_acc'):
            _say(f'    validation accuracy: {_pct(_float_or_none(meta["metric_val_acc"]))}')
        if meta.get('backbone'):
            _say(f'    backbone:   {meta["backbone"]}')
        if r['backbone_fingerprint'] != index['backbone_fingerprint']:
            _say('    WARNING: trained on another backbone than the index names')
    return 0


def _read_image(image: Path):
    from PIL import Image, UnidentifiedImageError
    if not image.is_file():
        raise FileNotFoundError(2, 'image does not exist', str(image))
    try:
        with Image.open(image) as im:
            return im.convert('RGB')
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f'cannot read image {str(image)!r}: {_one_line(e)}') from None


def _image_paths(paths) -> List[Path]:
    """``modcl predict``'s images: files as given, and every image file of a folder (sorted, not recursive)."""
    from .data import _image_extensions
    out: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            out.append(path)
            continue
        exts = _image_extensions()
        found = sorted(f for f in path.iterdir() if f.suffix.lower() in exts and f.is_file())
        if not found:
            raise UsageError(f'{str(path)!r} is a folder without image files (extensions: {", ".join(sorted(exts))})')
        out.extend(found)
    return out


def _print_top(header: str, top) -> None:
    _say(header)
    w = max(len(str(name if name is not None else c)) for c, name, _ in top)
    for rank, (c, name, p) in enumerate(top, 1):
        _say(f'  {rank}. {str(name if name is not None else c).ljust(w)}  {100 * p:6.2f}%')


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import eval_transform
    from .train import predict

    out = Path(args.out)
    index = _require_index(out)
    if args.topk < 1:
        raise UsageError('--topk must be at least 1')
    task = args.task
    if task is None and len(index['tasks']) == 1:
        task = index['tasks'][0]
    if task is None and not index['tasks']:
        raise UsageError(f'{str(out)!r} has no tasks (train one first: modcl train ... --out {out})')
    if args.task is not None and args.scorer != 'auto':
        raise UsageError('--scorer chooses the task of an image; it cannot be combined with --task')
    images = [(p, _read_image(p)) for p in _image_paths(args.image)]
    if task is not None:
        model, _, _ = _load_adapters(args, out, [task])
        transform = eval_transform(model, _task_input_size(model, task))
        for image, img in images:
            top = predict(model, transform(img), task, topk=args.topk, device=args.device)[0]
            _print_top(f'{image.name} ({task}):', top)
        return 0
    return _predict_task_agnostic(args, out, images)


def _predict_task_agnostic(args: argparse.Namespace, out: Path, images) -> int:
    """``modcl predict`` without ``--task``: score every task, print the chosen task and its top classes."""
    import torch

    from .data import eval_transform
    from .scorers import has_ranpac
    from .serving import has_prototypes

    model, index, _ = _load_adapters(args, out)
    names = list(index['tasks'])
    scorer = args.scorer
    if scorer == 'auto':
        scorer = ('ranpac' if all(has_ranpac(model, n) for n in names) else
                  'prototype' if all(has_prototypes(model, n) for n in names) else 'energy')
    if args.device is not None:
        model.to(args.device)
    # tasks trained at different input sizes see the image as they were trained on it: score each size group
    groups: Dict[Optional[int], List[str]] = {}
    for n in names:
        groups.setdefault(_task_input_size(model, n), []).append(n)
    transforms = {size: eval_transform(model, size) for size in groups}
    for image, img in images:
        scores, preds = [], []
        for size, group in groups.items():
            x = transforms[size](img).unsqueeze(0)
            if args.device is not None:
                x = x.to(args.device)
            pred = model.predict_task_agnostic(x, scorer=scorer, tasks=group)
            preds.append(pred)
            scores.append(pred.task_scores[0])
        all_scores = torch.cat(scores)
        task_probs = all_scores.softmax(0)
        best = int(all_scores.argmax())
        offsets = [0]
        for s in scores:
            offsets.append(offsets[-1] + len(s))
        g = max(i for i in range(len(preds)) if offsets[i] <= best)
        pred = preds[g]
        name = pred.tasks[0]
        probs = pred.logits[0].float().softmax(0)
        k = min(args.topk, probs.numel())
        p, idx = probs.topk(k)
        class_names = model.tasks[name].class_names
        top = [(c, None if class_names is None else class_names[c], q) for c, q in zip(idx.tolist(), p.tolist())]
        _print_top(f'{image.name} (task {name}, {100 * float(task_probs[best]):.2f}% by the {scorer} scorer):', top)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder
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


def _remote_index(args, timeout: float) -> Dict[str, Any]:
    """The repo's checked index (architecture, fingerprint, tasks), fetched by the library within ``timeout``."""
    from .hub import remote_index
    return remote_index(args.repo_id, revision=args.revision, subfolder=args.subfolder, token=args.token,
                        endpoint=args.endpoint, timeout=timeout)


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull_folder
    out = Path(args.out)
    _read_index_if_any(out)  # a file, or a corrupt index: refused before the Hub is asked
    pulled = pull_folder(args.repo_id, out, tasks=args.task, replace=args.replace, revision=args.revision,
                         subfolder=args.subfolder, token=args.token, endpoint=args.endpoint,
                         architecture=None if args.model is None else _check_model_name(args.model)[0])
    _say(f'pulled {len(pulled)} task(s) ({", ".join(pulled)}) from {args.repo_id} into {out}')
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .adapter import save_tasks
    from .data import digits_tasks
    from .metrics import AccuracyMatrix
    from .train import evaluate, train_task

    t_start = time.perf_counter()
    quick = args.quick
    num_tasks = args.tasks or (2 if quick else 5)
    if num_tasks > 10:
        raise UsageError(f'--tasks {num_tasks}: the ten digits make at most 10 tasks')
    size = args.input_size or (32 if quick else 48)
    epochs = args.epochs if args.epochs is not None else (1 if quick else 5)
    name = args.model
    arch, _ = _check_model_name(name)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f'--out {str(out)!r} is a file, not a folder')

    _say(f'modcl demo: learning {num_tasks} tasks of handwritten digits (scikit-learn) one after another with '
         f'{arch} at {size}px, {epochs} epoch(s) per task, {torch.get_num_threads()} CPU thread(s)')
    model, source = _backbone(name, args, fallback_random=True)
    _say(f'backbone: {source}' + ('  (without pretrained weights the accuracies are lower; zero forgetting holds '
                                  'all the same)' if source.startswith('random') else ''))
    device = torch.device(args.device) if args.device else torch.device('cpu')
    model.to(device)
    if quick:  # the first two-class tasks, few images
        tasks = digits_tasks(max(5, num_tasks), size, seed=args.seed, max_train_per_class=24)[:num_tasks]
    else:
        tasks = digits_tasks(num_tasks, size, seed=args.seed)
    if quick:  # a small test set as well
        from torch.utils.data import Subset
        tasks = [t._replace(test=Subset(t.test, list(range(0, len(t.test), 4)))) for t in tasks]

    matrix = AccuracyMatrix([t.name for t in tasks])
    reference: Dict[str, torch.Tensor] = {}

    def logits(task, ds):
        model.eval()
        with torch.inference_mode(), model.use_task(task):
            return torch.cat([model(x.to(device)) for x, _ in torch.utils.data.DataLoader(ds, batch_size=128)])

    for i, t in enumerate(tasks):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + i)  # each new head's initialisation: --seed makes the demo reproducible
            model.add_task(t.name, len(t.class_names), class_names=t.class_names,
                           metadata={'input_size': str(size), 'backbone': source, 'data': 'sklearn-digits'})
        train_task(model, t.name, t.train, epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   device=device, progress=_progress(args))
        row = [evaluate(model, tasks[j].test, tasks[j].name, device=device) for j in range(i + 1)]
        matrix.add_row(row)
        reference[t.name] = logits(t.name, t.test)
        model._task(t.name).metadata['metric_test_acc'] = f'{row[-1]:.4f}'
        _say(f'[{i + 1}/{len(tasks)}] {t.name}: {len(t.train)} training images, {time.perf_counter() - t0:.1f} s; '
             f'accuracy on tasks so far: ' + ' '.join(f'{100 * a:.1f}' for a in row))

    unchanged = all(torch.equal(logits(t.name, t.test), reference[t.name]) for t in tasks)
    _say('')
    _say('accuracy (%) on each task (columns) after learning each task (rows):')
    _say(matrix.format_table())
    if matrix.forgetting:  # exact values (repr), not rounded: zero means zero
        _say('forgetting per task (fraction): ' + ', '.join(f'{k} {v!r}' for k, v in matrix.forgetting.items()))
    _say(f'outputs of every task bit-identical at the end to right after it was learned: {"yes" if unchanged else "NO"}')
    save_tasks(model, out)
    matrix.to_json(out / 'accuracy_matrix.json')
    size_kib = sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 1024
    _say(f'saved {len(tasks)} task adapters ({size_kib:.0f} KiB) and accuracy_matrix.json to {out}; '
         f'try: modcl info --out {out}')
    _say(f'wall time: {time.perf_counter() - t_start:.1f} s')
    if matrix.max_forgetting != 0.0 or not unchanged:
        _err('error: forgetting is not zero - this is a bug, please report it')
        return EXIT_FAILURE
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def cmd_serve(args: argparse.Namespace) -> int:
    """``modcl serve``: the tasks of --out and/or --repo-id over HTTP (see ``timm_modcl.serve``)."""
    try:
        from .serve import ServeConfig, create_app, download_hub_adapters, folder_adapters, is_loopback, run, \
            setup_logging
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
        index, files = download_hub_adapters(args.repo_id, args.task, revision=args.revision,
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


def _add_backbone_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument('--weights', metavar='FILE',
                   help='local backbone checkpoint (default: $MODCL_WEIGHTS, else timm\'s pretrained weights)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='use timm\'s pretrained weights (downloaded once) / a seeded random backbone'
                        + ('' if train else '; default: whichever the adapters were trained on'))


def _add_common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    p.add_argument('--verbose', '-v', action='store_true', default=argparse.SUPPRESS,
                   help='show tracebacks of errors')
    if threads:
        p.add_argument('--threads', type=_positive_int, default=None, metavar='N',
                       help='CPU threads (default: $OMP_NUM_THREADS, else the idle CPU cores)')


def _number_type(cast, ok, expected: str):
    """An argparse ``type=`` that casts with ``cast`` and accepts values for which ``ok(value)`` holds."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {expected}, got {s!r}') from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {s!r}')
        return v
    return parse


_positive_int = _number_type(int, lambda v: v >= 1, 'a positive integer')
_non_negative_int = _number_type(int, lambda v: v >= 0, 'a non-negative integer')
_fraction = _number_type(float, lambda v: 0.0 <= v < 1.0, 'a number in [0, 1)')
_non_negative_float = _number_type(float, lambda v: v >= 0.0, 'a non-negative number')


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {s!r}') from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {s!r}')
    return v


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_CONFIG
    from .layers import MODULATION_VARIANTS
    DEFAULT_VARIANT = DEFAULT_CONFIG.variant
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Continual learning with zero forgetting on a frozen timm backbone (Adaptive Weight '
                    'Modulation): every task gets its own small adapter, and learning a new task never changes '
                    'an old one.',
        epilog='Start with "modcl demo". Run "modcl COMMAND --help" for the options of a command.')
    parser.add_argument('--version', action='version', version=f'%(prog)s (timm_modcl) {__version__}')
    parser.add_argument('--verbose', '-v', action='store_true', help='show tracebacks of errors')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    p = sub.add_parser('train', help='learn a task from an image folder and add it to an adapter folder',
                       description='Learn a new task from an image folder (one subfolder per class, or train/ and '
                                   'val/ with class subfolders) and save it with the tasks already in --out.')
    p.add_argument('--data', required=True, metavar='DIR', help='image folder of the task')
    p.add_argument('--task', required=True, metavar='NAME', help='name of the new task')
    p.add_argument('--out', required=True, metavar='DIR', help='adapter folder (created, or extended)')
    p.add_argument('--model', metavar='NAME', default=None,
                   help=f'modcl model (default: the one of the adapters in --out, else {DEFAULT_MODEL})')
    p.add_argument('--resolution', type=_positive_int, nargs=2, default=None, metavar=('M1', 'M2'),
                   help='one modulation resolution for every layer (default: the library\'s per-layer default '
                        'configuration, timm_modcl.DEFAULT_CONFIG)')
    p.add_argument('--variant', choices=sorted(MODULATION_VARIANTS), default=DEFAULT_VARIANT,
                   help=f'modulation variant (default: {DEFAULT_VARIANT})')
    p.add_argument('--epochs', type=_non_negative_int, default=30, help='epochs (default: 30, as the paper)')
    p.add_argument('--batch-size', type=_positive_int, default=32, help='batch size (default: 32)')
    p.add_argument('--lr', type=_positive_float, default=0.01, help='learning rate (Adam; default: 0.01)')
    p.add_argument('--head-lr', type=_positive_float, default=None,
                   help='learning rate of the head (default: 3e-4, as train_task)')
    p.add_argument('--weight-decay', type=float, default=0.0, help='weight decay (default: 0)')
    p.add_argument('--input-size', type=_positive_int, default=None, metavar='PX',
                   help='input size in pixels (default: the model\'s, 224)')
    p.add_argument('--val-fraction', type=_fraction, default=0.2,
                   help='share of each class held out for validation without a val/ folder (default: 0.2)')
    p.add_argument('--no-augment', action='store_true', help='no training augmentation')
    p.add_argument('--replace', action='store_true', help='retrain a task that already exists in --out')
    p.add_argument('--seed', type=int, default=0, help='seed (default: 0)')
    p.add_argument('--device', default=None, help='device, e.g. cuda (default: cpu)')
    p.add_argument('--workers', type=_non_negative_int, default=0, help='data loading workers (default: 0)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--checkpoint', metavar='PATH', default=None,
                   help='write a training checkpoint here after every epoch (safetensors; atomic)')
    p.add_argument('--resume', action='store_true',
                   help='continue from --checkpoint if it exists (same arguments), else start from scratch')
    p.add_argument('--sync-bn', action='store_true',
                   help='under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)')
    _add_backbone_args(p, train=True)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('merge', help='merge adapter folders trained on the same backbone into one',
                       description='Merge the adapter folders of workers that each learned some tasks from the same '
                                   'backbone into --out (created, or extended). Folders of other backbone weights '
                                   'or architectures are refused; the adapter files are copied byte for byte.')
    p.add_argument('sources', nargs='+', metavar='SRC', help='adapter folders to merge')
    p.add_argument('--out', required=True, metavar='DEST', help='merged adapter folder')
    p.add_argument('--replace', action='store_true', help='a task in several folders: keep the last one')
    _add_common(p, threads=False)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser('eval', help='accuracy of tasks on image folders',
                       description='Accuracy of one task (--task) on --data, or of every task that has a '
                                   'subfolder of that name in --data.')
    p.add_argument('--out', required=True, metavar='DIR', help='adapter folder')
    p.add_argument('--data', required=True, metavar='DIR', help='image folder')
    p.add_argument('--task', metavar='NAME', help='task to evaluate (default: all tasks with data)')
    p.add_argument('--split', choices=['val', 'all'], default='val',
                   help='"val": the validation split (val/ folder, or the held-out share as in training); '
                        '"all": every image (default: val)')
    p.add_argument('--val-fraction', type=_fraction, default=0.2, help='as for train (default: 0.2)')
    p.add_argument('--seed', type=int, default=0, help='as for train (default: 0)')
    p.add_argument('--batch-size', type=_positive_int, default=64)
    p.add_argument('--device', default=None)
    p.add_argument('--workers', type=_non_negative_int, default=0)
    p.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    _add_backbone_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    for cmd, helptext, fn in (('tasks', 'list the tasks of an adapter folder', cmd_tasks),
                              ('info', 'describe an adapter folder: backbone, tasks, classes, sizes', cmd_info)):
        p = sub.add_parser(cmd, help=helptext, description=helptext[0].upper() + helptext[1:] + '.')
        p.add_argument('--out', required=True, metavar='DIR', help='adapter folder')
        _add_common(p, threads=False)
        p.set_defaults(func=fn)

    p = sub.add_parser('predict', help='classify images, with a given task or finding the task',
                       description='Top-k classes of images under one task (--task, or the only task of --out); '
                                   'without --task, the task of each image is chosen among all tasks of --out '
                                   '(task-agnostic prediction) and printed with its probability.')
    p.add_argument('image', metavar='IMAGE', nargs='+', help='image files, or folders (every image file in them)')
    p.add_argument('--out', required=True, metavar='DIR', help='adapter folder')
    p.add_argument('--task', metavar='NAME', help='task of the images (default: the only one; with several tasks, '
                                                  'chosen per image)')
    p.add_argument('--scorer', choices=['auto', 'ranpac', 'ncm', 'prototype', 'energy', 'max_softmax'],
                   default='auto',
                   help='how the task is chosen without --task: "ranpac" or "ncm" (random-feature statistics stored '
                        'with the tasks by compute_task_statistics(..., scorer="ranpac")), "prototype" (Gaussian class '
                        'statistics; one extra forward), "energy" or "max_softmax" (confidence of each task\'s head; '
                        'one forward per task); default "auto": ranpac when every task has its statistics, else '
                        'prototype when every task has those, else energy')
    p.add_argument('--topk', type=int, default=5, help='number of classes shown (default: 5)')
    p.add_argument('--device', default=None)
    _add_backbone_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser('push', help='push tasks to a Hugging Face Hub repo',
                       description='Push the task adapters of --out to a Hub model repo (created if needed).')
    p.add_argument('--out', required=True, metavar='DIR', help='adapter folder')
    p.add_argument('--repo-id', required=True, metavar='ID', help='namespace/name of the repo')
    p.add_argument('--task', action='append', metavar='NAME', help='task to push (repeatable; default: all)')
    p.add_argument('--private', action='store_true', default=None, help='create the repo as private')
    p.add_argument('--revision', help='branch to push to')
    p.add_argument('--subfolder', help='folder inside the repo')
    p.add_argument('--token', help='Hub token (default: saved login or $HF_TOKEN)')
    p.add_argument('--commit-message')
    p.add_argument('--endpoint', help='Hub endpoint (default: $HF_ENDPOINT or huggingface.co)')
    _add_backbone_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser('pull', help='pull tasks from a Hugging Face Hub repo into an adapter folder',
                       description='Download task adapters from a Hub repo and add them to --out.')
    p.add_argument('--repo-id', required=True, metavar='ID')
    p.add_argument('--out', required=True, metavar='DIR', help='adapter folder (created, or extended)')
    p.add_argument('--task', action='append', metavar='NAME', help='task to pull (repeatable; default: all)')
    p.add_argument('--revision', help='branch, tag or commit')
    p.add_argument('--subfolder', help='folder inside the repo')
    p.add_argument('--token')
    p.add_argument('--endpoint')
    p.add_argument('--replace', action='store_true', help='overwrite tasks that exist in --out')
    p.add_argument('--model', metavar='NAME', default=None, help='modcl model (default: the repo\'s)')
    _add_backbone_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser('demo', help='learn a sequence of digit tasks and show that nothing is forgotten',
                       description='Learns tasks of scikit-learn\'s handwritten digits one after another, prints '
                                   'the accuracy matrix and the forgetting (exactly 0), and saves the adapters.')
    p.add_argument('--out', default=DEMO_OUT, metavar='DIR', help=f'adapter folder (default: ./{DEMO_OUT})')
    p.add_argument('--model', default=DEFAULT_MODEL, metavar='NAME', help=f'(default: {DEFAULT_MODEL})')
    p.add_argument('--epochs', type=_non_negative_int, default=None, help='epochs per task (default: 5; quick: 1)')
    p.add_argument('--tasks', type=_positive_int, default=None,
                   help='number of tasks, 1-10: the digits 0-9 split into that many groups (default: 5 tasks of 2 '
                        'digits; quick: the first 2 of them)')
    p.add_argument('--input-size', type=_positive_int, default=None, metavar='PX',
                   help='image size (default: 48; quick: 32)')
    p.add_argument('--batch-size', type=_positive_int, default=32)
    p.add_argument('--lr', type=_positive_float, default=0.01)
    p.add_argument('--seed', type=int, default=0, help='seed of the split, the heads and the training (default: 0)')
    p.add_argument('--device', default=None)
    p.add_argument('--quick', action='store_true', help='a tiny run (a few seconds): 2 tasks, few images, 1 epoch')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_backbone_args(p, train=True)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser('serve', help='serve the tasks over HTTP (batched across tasks, tasks added while serving)',
                       description='Serve the tasks of an adapter folder and/or a Hub repo over HTTP on one backbone: '
                                   'POST /v1/tasks/{task}/predict, POST /v1/predict (task chosen), PUT/DELETE '
                                   '/v1/tasks/{task}, /healthz, /readyz, /metrics, OpenAPI at /openapi.json, a page '
                                   'at /. Needs pip install "timm_modcl[serve]".')
    p.add_argument('--out', metavar='DIR', help='adapter folder to serve (also the source of {"source": "folder"} '
                                                'task additions)')
    p.add_argument('--repo-id', metavar='ID', help='Hub repo whose tasks are served')
    p.add_argument('--revision', help='branch, tag or commit of --repo-id')
    p.add_argument('--subfolder', help='folder inside --repo-id')
    p.add_argument('--token', help='Hub token')
    p.add_argument('--endpoint', help='Hub endpoint (default: $HF_ENDPOINT or huggingface.co)')
    p.add_argument('--task', action='append', metavar='NAME', help='serve only this task (repeatable)')
    p.add_argument('--model', metavar='NAME', help='modcl model when no adapters give it (start without tasks)')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default: 127.0.0.1)')
    p.add_argument('--port', type=_non_negative_int, default=8000, help='port (default: 8000)')
    p.add_argument('--api-key', default=None, metavar='KEY',
                   help='key the write endpoints (PUT/DELETE /v1/tasks/...) require (default: $MODCL_API_KEY; '
                        'required unless --host is a loopback address)')
    p.add_argument('--device', default=None, help='device, e.g. cuda (default: cpu)')
    p.add_argument('--input-size', type=_positive_int, default=None, metavar='PX',
                   help='input size of tasks that do not record one (default: the model\'s)')
    p.add_argument('--max-batch', type=_positive_int, default=32, help='most images per batch (default: 32)')
    p.add_argument('--max-wait-ms', type=_non_negative_float, default=5.0,
                   help='how long an image waits for others to join its batch (default: 5)')
    p.add_argument('--max-queue', type=_positive_int, default=256,
                   help='most images waiting; more get 429 with Retry-After (default: 256)')
    p.add_argument('--max-body-mib', type=_positive_float, default=32.0, help='largest request body (default: 32)')
    p.add_argument('--max-pixels', type=_positive_int, default=40_000_000,
                   help='largest image in pixels (default: 40,000,000)')
    p.add_argument('--cache-mib', type=_positive_float, default=None,
                   help='memory for the effective weights of recently used tasks (default: the model\'s, 256)')
    p.add_argument('--log-level', choices=['debug', 'info', 'warning', 'error'], default='info')
    _add_backbone_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_serve)
    return parser


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


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
