"""``modcl train``, ``modcl eval`` and ``modcl demo``: learn and measure tasks."""
import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import TaskExistsError
from ..multisize import task_input_size as _task_input_size
from ._common import (
    DEFAULT_MODEL, EXIT_FAILURE, UsageError, _backbone, _check_model_name, _err, _load_adapters, _pct, _progress,
    _quiet, _read_index_if_any, _require_index, _say,
)


def _check_data(data: str) -> None:
    """A ``--data`` folder must exist (a ``PREFIX/NAME`` dataset is checked when it is read)."""
    from ..data_sources import describe_missing_folder, parse_data
    if parse_data(data).kind == 'folder' and not Path(data).exists():
        raise FileNotFoundError(2, describe_missing_folder(data).replace(f'data folder {data!r} ', 'data folder '),
                                str(data))


def _dataset_kwargs(args: argparse.Namespace, num_classes: bool = True) -> Dict[str, Any]:
    """``task_datasets``'s arguments of a ``PREFIX/NAME`` ``--data`` (timm's train.py names); ``num_classes``:
    with ``--num-classes`` (evaluation takes the task's)."""
    kw = dict(data_dir=args.data_dir, train_split=args.train_split, val_split=args.val_split or None,
              class_map=args.class_map, download=args.dataset_download)
    return dict(kw, num_classes=args.num_classes) if num_classes else kw


def cmd_train(args: argparse.Namespace) -> int:
    from ..adapter import load_tasks, save_tasks
    from ..data_sources import task_datasets
    from ..distributed import get_world_size, init_distributed, is_main_process
    from ..task import validate_task_name
    from ..train import evaluate, train_task

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
    _check_data(args.data)  # fail before building the model

    t0 = time.perf_counter()
    model, source = _backbone(name, args, None if index is None else index['backbone_fingerprint'],
                              what=f'the adapters in {str(out)!r}')
    previous = [t for t in (index or {}).get('tasks', []) if t != args.task]
    if previous:
        load_tasks(model, out, names=previous)
    train_ds, val_ds, classes = task_datasets(
        args.data, model, input_size=args.input_size, val_fraction=args.val_fraction, seed=args.seed,
        augment=not args.no_augment, batch_size=args.batch_size, **_dataset_kwargs(args))
    if len(classes) < 2:
        raise UsageError(f'{args.data!r} has a single class' + (' folder' if Path(args.data).is_dir() else '')
                         + f' ({classes[0]!r}); a task needs at least 2 classes')
    size = (args.input_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1])
    skipped = len(getattr(train_ds, 'skipped_files', ())) + len(getattr(val_ds, 'skipped_files', ()))
    say(f'{args.task}: {len(classes)} classes, {len(train_ds)} training / {len(val_ds) if val_ds else 0} '
        f'validation images at {size}px' + (f' ({skipped} unreadable file(s) skipped)' if skipped else '')
        + f'; {arch}, backbone {source}' + (f', {len(previous)} existing task(s)' if previous else '')
        + (f'; {get_world_size()} processes (DistributedDataParallel)' if ddp else ''))
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the new head's initialisation: --seed makes the whole run reproducible
        model.add_task(
            args.task, len(classes), tuple(args.resolution) if args.resolution else 'default',
            variant=args.variant, class_names=classes,
            metadata={'input_size': str(size), 'backbone': source, 'data': Path(args.data).name,
                      'epochs': str(args.epochs)},
            replace=True)
    head_lr = {} if args.head_lr is None else {'head_lr': args.head_lr}  # else train_task's default
    if isinstance(train_ds, IterableDataset):  # WebDataset shards: streamed, shuffled and split by timm's reader
        train_ds = DataLoader(train_ds, batch_size=args.batch_size, num_workers=args.workers)
    history = train_task(
        model, args.task, train_ds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, **head_lr,
        weight_decay=args.weight_decay, device=args.device, seed=args.seed,
        num_workers=args.workers, progress=_progress(args), sync_bn=args.sync_bn, checkpoint=args.checkpoint,
        resume=args.resume)
    acc = evaluate(model, val_ds, args.task, batch_size=args.batch_size, num_workers=args.workers,
                   distributed=ddp) if val_ds else None
    if not is_main_process():
        return 0
    meta = {'train_images': str(len(train_ds.dataset if isinstance(train_ds, DataLoader) else train_ds))}
    if acc is not None:
        meta.update(metric_val_acc=f'{acc:.4f}', val_images=str(len(val_ds)))
    model.update_task_metadata(args.task, meta)
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

    from ..adapter import ADAPTER_FILE, read_adapter
    from ..checkpoint import parse_checkpoint, read_checkpoint_bytes
    from ..checkpoint.values import _check_history
    from ..train import TrainHistory
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


def _eval_targets(args, model, index) -> List[Tuple[str, Path]]:
    from ..data_sources import parse_data
    if parse_data(args.data).kind != 'folder':  # one dataset: one task
        if args.task or len(index['tasks']) == 1:
            return [(args.task or index['tasks'][0], args.data)]
        raise UsageError(f'{str(args.out)!r} has {len(index["tasks"])} tasks: pass --task NAME')
    _check_data(args.data)
    data = Path(args.data)
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
    from ..data_sources import eval_dataset
    from ..train import evaluate

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
        ds = eval_dataset(folder, model, split=args.split, class_names=info.class_names, num_classes=info.num_classes,
                          input_size=size, val_fraction=args.val_fraction, seed=args.seed,
                          **_dataset_kwargs(args, num_classes=False))
        if ds is None:
            raise UsageError(f'{str(folder)!r} has no validation images; pass --split all to evaluate on every '
                             f'image')
        acc = evaluate(model, ds, task, batch_size=args.batch_size, device=args.device, num_workers=args.workers)
        rows.append((task, info.num_classes, len(ds), acc))
    w = max(4, *(len(r[0]) for r in rows))
    _say(f'{"task".ljust(w)}  classes  images  accuracy')
    for task, k, n, acc in rows:
        _say(f'{task.ljust(w)}  {k:7d}  {n:6d}  {_pct(acc):>8}')
    if args.json:
        payload = {'adapters': str(out), 'split': args.split, 'backbone': source,
                   'results': [{'task': t, 'classes': k, 'images': n, 'accuracy': a} for t, k, n, a in rows]}
        from ..adapter import atomic_write_bytes
        atomic_write_bytes(args.json, (json.dumps(payload, indent=2) + '\n').encode())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..adapter import save_tasks
    from ..data import digits_tasks
    from ..metrics import AccuracyMatrix
    from ..train import evaluate, train_task

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
        model.update_task_metadata(t.name, {'metric_test_acc': f'{row[-1]:.4f}'})
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
