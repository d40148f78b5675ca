"""Learn several tasks at once, one per process, from the same frozen backbone, and merge them into one folder.

    python examples/parallel_tasks.py                  # 3 digit tasks (scikit-learn) in 3 processes
    python examples/parallel_tasks.py --quick          # a few seconds of training
    python examples/parallel_tasks.py --weights FILE   # a local backbone checkpoint instead of a seeded random one

Tasks never share trainable tensors, so they can be learned side by side: each worker builds the same backbone,
learns its task with ``train_task`` (``distributed=False``: one task per process) and saves it to its own adapter
folder; ``timm_modcl.merge_adapter_folders`` (or ``modcl merge``) then combines the folders byte for byte and refuses
folders trained on other backbone weights. The same works with one GPU per worker (``CUDA_VISIBLE_DEVICES``) or one
machine per worker (copy the folders, then merge). This script checks that every merged task computes exactly what
the worker's model computed.

The same with the command line:

    modcl train --data a/ --task a --out work/a &  modcl train --data b/ --task b --out work/b &  wait
    modcl merge --out all/ work/a work/b
"""
import argparse
import sys
from pathlib import Path

import torch

import timm
import timm_modcl
from timm_modcl import FingerprintMismatchError, load_tasks, merge_adapter_folders, save_tasks, train_task
from timm_modcl.data import digits_tasks

NUM_TASKS = 3


def backbone(args) -> torch.nn.Module:
    """Every worker must build the same frozen backbone: a weights file, or a random one from a fixed seed."""
    if args.weights:
        return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(args.model)


def tasks(args):
    return digits_tasks(NUM_TASKS, size=args.size, seed=0, max_train_per_class=20 if args.quick else None)


def learn(index: int, args) -> None:
    """Worker ``index``: learn task ``index`` and save it to ``OUT/worker<index>``, with its outputs on the test set."""
    from safetensors.torch import save_file
    torch.set_num_threads(1)  # one core per worker
    task = tasks(args)[index]
    model = backbone(args)
    torch.manual_seed(index)
    model.add_task(task.name, len(task.class_names), class_names=task.class_names)
    train_task(model, task.name, task.train, epochs=args.epochs, batch_size=32, seed=index, progress=False,
               distributed=False)
    folder = Path(args.out) / f'worker{index}'
    save_tasks(model, folder, names=[task.name])
    model.eval()
    with torch.no_grad():
        logits = model(task.test.tensors[0])
    save_file({'logits': logits.contiguous()}, str(Path(args.out) / f'worker{index}_logits.safetensors'))
    print(f'worker {index}: learned {task.name} ({len(task.train)} images, {args.epochs} epoch(s)) -> {folder}',
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='parallel_tasks_out', help='working folder (default: ./parallel_tasks_out)')
    p.add_argument('--model', default='modcl_mobilenetv2_050')
    p.add_argument('--weights', default=None, help='local backbone checkpoint (default: a seeded random backbone)')
    p.add_argument('--epochs', type=int, default=None, help='epochs per task (default: 3; quick: 1)')
    p.add_argument('--size', type=int, default=32, help='image size (default: 32)')
    p.add_argument('--quick', action='store_true', help='few images, 1 epoch')
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 3
    return args


def merge_and_check(args) -> bool:
    """Merge the workers' folders, load them into one fresh model and compare every task with its worker."""
    from safetensors.torch import load_file
    out = Path(args.out)
    # merge (refusing other backbones), then load everything into one fresh model
    merged = out / 'merged'
    names = merge_adapter_folders([out / f'worker{i}' for i in range(NUM_TASKS)], merged, replace=True)
    print(f'merged {len(names)} tasks into {merged}: {", ".join(names)}')
    model = backbone(args)
    load_tasks(model, merged)
    model.eval()

    # every task computes exactly what its worker computed
    ok = True
    for i, task in enumerate(tasks(args)):
        want = load_file(str(out / f'worker{i}_logits.safetensors'))['logits']
        with torch.no_grad(), model.use_task(task.name):
            got = model(task.test.tensors[0])
        same = torch.equal(got, want)
        acc = (got.argmax(1) == task.test.tensors[1]).float().mean().item()
        print(f'{task.name}: test accuracy {100 * acc:.1f}%, bit-identical to its worker: {"yes" if same else "NO"}')
        ok &= same

    # adapters of another backbone are refused
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = timm.create_model(args.model)
    other.add_task('foreign', 2)
    save_tasks(other, out / 'foreign')
    try:
        merge_adapter_folders([out / 'foreign'], merged)
        print('a folder of another backbone was merged: this is a bug')
        ok = False
    except FingerprintMismatchError as e:
        print(f'refused as expected: {e}'[:160])
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # one process per task (torch.multiprocessing, spawn): each learns and saves its own adapter folder
    torch.multiprocessing.spawn(learn, args=(args,), nprocs=NUM_TASKS, join=True)
    ok = merge_and_check(args)
    assert ok, 'a merged task differs from its worker'
    print(f'timm_modcl {timm_modcl.__version__}: done')
    return 0


if __name__ == '__main__':
    sys.exit(main())
