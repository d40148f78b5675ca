"""``modcl tasks``, ``modcl info`` and ``modcl predict``: what an adapter folder holds, and its predictions."""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..multisize import predict_images_task_agnostic
from ..multisize import task_input_size as _task_input_size
from ._common import UsageError, _load_adapters, _pct, _require_index, _say


def _adapter_summaries(out: Path, index: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per task, what its adapter file says, validated as loading would (read without building a model)."""
    from ..adapter import ADAPTER_FILE, describe_adapter
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


def _print_top(header: str, top) -> None:
    _say(header)
    w = max(len(str(name if name is not None else c)) for c, name, _ in top)
    for rank, (c, name, p) in enumerate(top, 1):
        _say(f'  {rank}. {str(name if name is not None else c).ljust(w)}  {100 * p:6.2f}%')


def cmd_predict(args: argparse.Namespace) -> int:
    from ..data import eval_transform, image_files, read_rgb_image
    from ..train import predict

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
    images = [(p, read_rgb_image(p)) for p in image_files(args.image)]
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
    model, index, _ = _load_adapters(args, out)
    if args.device is not None:
        model.to(args.device)
    choices = predict_images_task_agnostic(model, [img for _, img in images], tasks=list(index['tasks']),
                                           scorer=args.scorer, device=args.device)
    for (image, _), choice in zip(images, choices):
        probs = choice.logits.softmax(0)
        p, idx = probs.topk(min(args.topk, probs.numel()))
        class_names = model.tasks[choice.task].class_names
        top = [(c, None if class_names is None else class_names[c], q) for c, q in zip(idx.tolist(), p.tolist())]
        _print_top(f'{image.name} (task {choice.task}, {100 * choice.task_prob:.2f}% by the {choice.scorer} '
                   f'scorer):', top)
    return 0
