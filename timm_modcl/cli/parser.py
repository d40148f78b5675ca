"""The ``modcl`` argument parser: one subcommand per command, with the functions that run them."""
import argparse

from ._common import DEFAULT_MODEL, DEMO_OUT, PROG
from .serve import cmd_serve
from .share import cmd_merge, cmd_pull, cmd_push
from .tasks import cmd_info, cmd_predict, cmd_tasks
from .train import cmd_demo, cmd_eval, cmd_train


def _add_backbone_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument('--weights', metavar='FILE',
                   help='local backbone checkpoint (default: $MODCL_WEIGHTS, else timm\'s pretrained weights)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='use timm\'s pretrained weights (downloaded once) / a seeded random backbone'
                        + ('' if train else '; default: whichever the adapters were trained on'))


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    """The dataset arguments of timm's train.py (for a --data of hfds/NAME, torch/NAME or wds/NAME)."""
    g = p.add_argument_group('datasets other than image folders (timm\'s create_dataset)')
    g.add_argument('--data-dir', metavar='DIR', default=None,
                   help='where the dataset is: torch/: its root (required); wds/: the folder of the shards and their '
                        '_info.json (required); hfds/: the datasets cache (default: the Hugging Face cache)')
    g.add_argument('--train-split', default='train', metavar='NAME', help='training split (default: train)')
    g.add_argument('--val-split', default='validation', metavar='NAME',
                   help='validation split (default: validation); without it, --val-fraction of the training split '
                        'is held out; "" for none')
    g.add_argument('--class-map', metavar='FILE', default=None,
                   help='text file of class names, one per line, in label order (the classes and their order)')
    g.add_argument('--num-classes', type=_positive_int, default=None, metavar='N',
                   help='number of classes of a wds/ dataset without --class-map')
    g.add_argument('--dataset-download', action='store_true',
                   help='download hfds/ or torch/ datasets that have no local copy (default: local copies only)')


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
    from ..config import DEFAULT_CONFIG
    from ..layers import MODULATION_VARIANTS
    DEFAULT_VARIANT = DEFAULT_CONFIG.variant
    from ..version import __version__

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
    p.add_argument('--data', required=True, metavar='DATA',
                   help='the task\'s data: an image folder, or hfds/NAME, torch/NAME, wds/NAME (as timm\'s train.py)')
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
    _add_dataset_args(p)
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
    p.add_argument('--data', required=True, metavar='DATA',
                   help='image folder (or one subfolder per task), or hfds/NAME, torch/NAME, wds/NAME as for train')
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
    _add_dataset_args(p)
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
