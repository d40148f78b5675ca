"""Worker of tests/test_distributed.py, run by torchrun with 2 gloo processes on the CPU:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT

Trains a tiny LayerNorm model (ConvNeXt-atto) and a tiny BatchNorm model (MobileNetV2-0.5) with ``train_task`` under
DDP and writes, per rank, what it trained and saw (safetensors + JSON) for the test to compare with single-process
references built by the same helpers.
"""
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import timm
import timm_modcl  # noqa: F401

SIZE = 32
LN_ARCH = 'modcl_convnext_atto'
BN_ARCH = 'modcl_mobilenetv2_050'
TRAIN = dict(epochs=2, batch_size=4, lr=0.01, head_lr=None, sched='step', milestones=[], seed=0,
             progress=False)  # one constant rate, as the hand-written references
N_TRAIN, N_VAL = 16, 7  # 7 validation samples on 2 processes: the DistributedSampler pads one


def make_model(arch: str, tasks: bool = True):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    if tasks:
        model.add_task('other', 3)
        model.add_task('t', 3)
        model.set_task('other')
    return model


def dataset(n: int, seed: int, noisy: bool = False) -> TensorDataset:
    """Three colour classes; ``noisy``: every other label shifted, so accuracy stays strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    for c in range(3):
        x[y == c, c] += 1.0
    if noisy:
        y = torch.where(torch.arange(n) % 2 == 1, (y + 1) % 3, y)
    return TensorDataset(x, y)


def probe() -> torch.Tensor:
    return torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))


def logits(model, task: str) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad(), model.use_task(task):
        out = model(probe())
    model.train(was)
    return out


def snapshot(model, task: str):
    return {k: v.detach().clone() for k, v in model.modcl_tasks[task].tensors().items()}


class Interrupted(Exception):
    pass


class Interrupting(torch.utils.data.Dataset):
    """``data``, raising ``Interrupted`` when this process reads more than ``after`` samples."""

    def __init__(self, data, after: int) -> None:
        self.data, self.after, self.reads = data, after, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.after:
            raise Interrupted()
        return self.data[i]


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from timm_modcl import DistributedError, evaluate, save_tasks, train_task
    from timm_modcl import distributed as D

    torch.set_num_threads(1)
    train, val = dataset(N_TRAIN, 0), dataset(N_VAL, 1, noisy=True)
    rank = int(os.environ['RANK'])
    report = {}
    tensors = {}

    # ---- LayerNorm model: compared with a single-process run on the global batch
    model = make_model(LN_ARCH)
    other_before, other_logits = snapshot(model, 'other'), logits(model, 'other')
    hist = train_task(model, 't', train, val, checkpoint=out / 'ln.ckpt.safetensors', **TRAIN)
    report['ln_distributed'] = D.is_distributed() and D.get_world_size() == 2
    report['ln_history'] = hist.to_dict()
    report['ln_other_unchanged'] = (all(torch.equal(v, snapshot(model, 'other')[k]) for k, v in other_before.items())
                                    and torch.equal(other_logits, logits(model, 'other')))
    report['ln_eval_distributed'] = evaluate(model, val, 't', batch_size=2, distributed=True)
    report['ln_eval_local'] = evaluate(model, val, 't', batch_size=2)
    for k, v in snapshot(model, 't').items():
        tensors[f'ln.{k}'] = v
    tensors['ln_logits'] = logits(model, 't')
    if D.is_main_process():
        save_tasks(model, out / 'ln_adapters', names=['t'])

    # ---- the same run interrupted at the start of epoch 2 (after its first checkpoint), then resumed
    interrupted = make_model(LN_ARCH)
    try:
        train_task(interrupted, 't', Interrupting(train, after=len(train) // 2), val,
                   checkpoint=out / 'ln_b.ckpt.safetensors', **TRAIN)
        report['ln_interrupted'] = False
    except Interrupted:
        report['ln_interrupted'] = True
    resumed = make_model(LN_ARCH)
    torch.manual_seed(1000 + rank)  # another random state than the interrupted process had
    hist = train_task(resumed, 't', train, val, checkpoint=out / 'ln_b.ckpt.safetensors', resume=True, **TRAIN)
    report['ln_resumed_history'] = hist.to_dict()
    report['ln_resumed_equal'] = all(torch.equal(v, snapshot(resumed, 't')[k])
                                     for k, v in snapshot(model, 't').items())

    # ---- different backbones on the ranks: refused on every rank before training
    model = make_model(LN_ARCH)
    if rank == 1:
        with torch.no_grad():
            model.frozen_tensors()[model.modulated_layers[0] + '.weight'].add_(1e-3)
    try:
        train_task(model, 't', train, **TRAIN)
        report['backbone_error'] = None
    except DistributedError as e:
        report['backbone_error'] = str(e)

    # ---- BatchNorm model: compared with two replicas whose gradients are averaged by hand
    model = make_model(BN_ARCH)
    other_before, other_logits = snapshot(model, 'other'), logits(model, 'other')
    classes = [type(m) for m in model.modules()]
    try:
        train_task(model, 't', train, sync_bn=True, **TRAIN)
        report['sync_bn_cpu_error'] = None
    except DistributedError as e:
        report['sync_bn_cpu_error'] = str(e)
    report['sync_bn_model_unchanged'] = (classes == [type(m) for m in model.modules()]
                                         and model.active_task == 'other')
    last_epoch = {}

    def keep(history):  # after the last epoch: BN statistics averaged across ranks, before the recalibration
        if history.epochs == TRAIN['epochs']:
            last_epoch.update({f'bn_epoch.{k}': v for k, v in snapshot(model, 't').items()})

    hist = train_task(model, 't', train, callback=keep, recalibrate_bn=True, **TRAIN)
    report['bn_history'] = hist.to_dict()
    report['bn_other_unchanged'] = (all(torch.equal(v, snapshot(model, 'other')[k]) for k, v in other_before.items())
                                    and torch.equal(other_logits, logits(model, 'other')))
    tensors.update(last_epoch)
    for k, v in snapshot(model, 't').items():
        tensors[f'bn.{k}'] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f'rank{rank}.safetensors'))
    (out / f'rank{rank}.json').write_text(json.dumps(report))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
