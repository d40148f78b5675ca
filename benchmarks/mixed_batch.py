"""A mixed-task batch: one forward per task group (``forward_tasks``) against one traversal with per-layer grouping.

    python benchmarks/mixed_batch.py            # a few minutes on 2 CPU cores
    python benchmarks/mixed_batch.py --quick    # smoke run

``forward_tasks`` groups the samples of a batch by task and runs the whole network once per group. The alternative
(PEFT's ``adapter_names`` shape) runs the network once: the batch is sorted by task, and every task-aware layer
(modulated convolutions and per-task norms) runs each contiguous task slice under that slice's task and concatenates
the slices; layers without task state (activations, pooling, residual adds) run once on the whole batch; the
per-task heads then run per slice. The arithmetic is the same; the difference is the per-module Python and kernel
launch overhead saved on the task-free layers, against one concatenation per task-aware layer.

This script builds the one-traversal forward *outside* the library (instance-level ``forward`` overrides on the
task-aware layers, each slice under ``model.task_scope``) to decide whether it pays before it enters the library's
hot path. Outputs are checked equal to ``forward_tasks`` (up to float rounding: kernels see other batch sizes).
Timings: medians of interleaved repeats, 1 torch thread, ratios one traversal / per-group forwards, side by side in
one run. Writes ``benchmarks/results/mixed_batch.json``.
"""
import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

import timm
import timm_modcl  # noqa: F401
from timm_modcl.layers import _SCOPED, ModulatedWeight, TaskNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import interleaved  # noqa: E402  (medians of alternating repeats)

RESULTS = Path(__file__).resolve().parent / 'results'


@contextlib.contextmanager
def one_traversal(model: torch.nn.Module, bounds: Sequence[Tuple[str, int, int]]) -> Iterator[None]:
    """While active, every task-aware layer of ``model`` runs slice ``[s, e)`` of its input under task ``t`` for
    each ``(t, s, e)`` of ``bounds`` and concatenates the results."""
    layers = [m for m in model.modules() if isinstance(m, (ModulatedWeight, TaskNorm))]
    # the scope values of each slice made once per call (what a library implementation would do), so each layer
    # pays one context-variable set/reset per slice and nothing else
    scopes = []
    for t, s, e in bounds:
        with model.task_scope(t):
            scopes.append((_SCOPED.get(), s, e))

    def grouped(module):
        plain = type(module).forward

        def forward(x, *args, **kwargs):
            parts = []
            for value, s, e in scopes:
                token = _SCOPED.set(value)
                try:
                    parts.append(plain(module, x[s:e], *args, **kwargs))
                finally:
                    _SCOPED.reset(token)
            return torch.cat(parts, 0)
        return forward

    for m in layers:
        m.forward = grouped(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def mixed_forward(model: torch.nn.Module, x: torch.Tensor, tasks: Sequence[str]) -> List[torch.Tensor]:
    """Sample ``i`` under ``tasks[i]`` in one traversal of the backbone (eval, no autograd)."""
    order = sorted(range(len(tasks)), key=lambda i: tasks[i])
    xs = x[torch.tensor(order)]
    bounds, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or tasks[order[i]] != tasks[order[start]]:
            bounds.append((tasks[order[start]], start, i))
            start = i
    with torch.no_grad(), one_traversal(model, bounds):
        feats = model.forward_features(xs)
    out: List[torch.Tensor] = [None] * len(tasks)  # type: ignore[list-item]
    with torch.no_grad():
        for t, s, e in bounds:
            with model.task_scope(t):
                y = model.forward_head(feats[s:e])
            for j, i in enumerate(order[s:e]):
                out[i] = y[j]
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--model', default='modcl_mobilenetv2_100')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    names = [f't{k}' for k in range(8)]
    for k, n in enumerate(names):
        model.add_task(n, num_classes=5 + k)  # modulators start at kaiming-normal values: every task differs
    model.eval()
    sizes = [64] if args.quick else [64, 224]
    cases = [(8, 2), (8, 8)] if args.quick else [(8, 2), (8, 8), (32, 4), (32, 8)]
    repeats = 3 if args.quick else 15
    rows = []
    for size in sizes:
        for batch, ntasks in cases:
            if size == 224 and batch == 32 and not args.quick:
                reps = max(5, repeats // 3)
            else:
                reps = repeats
            g = torch.Generator().manual_seed(batch * 100 + ntasks)
            x = torch.randn(batch, 3, size, size, generator=g)
            tasks = [names[int(i)] for i in torch.randint(0, ntasks, (batch,), generator=g)]
            a = model.forward_tasks(x, tasks)
            b = mixed_forward(model, x, tasks)
            err = max(float((u - v).abs().max()) for u, v in zip(a, b))
            scale = max(float(u.abs().max()) for u in a)
            if not err <= 1e-4 * max(scale, 1.0):
                raise SystemExit(f'one traversal differs from forward_tasks: max |diff| {err:g} (scale {scale:g})')
            t = interleaved({'per_group': lambda: model.forward_tasks(x, tasks),
                             'one_traversal': lambda: mixed_forward(model, x, tasks)}, reps)
            row = {'input_px': size, 'batch': batch, 'tasks_in_batch': len(set(tasks)),
                   'per_group_ms': round(t['per_group'] * 1e3, 3), 'one_traversal_ms': round(t['one_traversal'] * 1e3, 3),
                   'ratio_one_traversal_over_per_group': round(t['one_traversal'] / t['per_group'], 3),
                   'max_abs_diff': err}
            rows.append(row)
            print(f"{size:>3} px  batch {batch:>2}  {row['tasks_in_batch']} tasks:  per-group {row['per_group_ms']:8.2f} ms"
                  f"  one traversal {row['one_traversal_ms']:8.2f} ms  ratio {row['ratio_one_traversal_over_per_group']:.3f}",
                  flush=True)
    out = {'model': args.model, 'threads': 1, 'repeats': repeats, 'quick': args.quick,
           'torch': torch.__version__, 'timm': timm.__version__, 'machine': platform.processor() or platform.machine(),
           'rows': rows}
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / 'mixed_batch.json').write_text(json.dumps(out, indent=1) + '\n')
    return out


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
