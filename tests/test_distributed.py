"""Training under torch.distributed: DDP with 2 gloo processes against single-process references, SyncBatchNorm
swapping, DDP-wrapped models, sharded evaluation."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import timm
import timm_modcl
from timm_modcl import DistributedError, load_tasks
from timm_modcl import distributed as D
from timm_modcl.checkpoint import checkpoint_info
from timm_modcl.layers import TaskNorm
from timm_modcl.train import evaluate, predict, train_task

import ddp_worker as W

ROOT = Path(__file__).resolve().parents[1]
#: Tolerance of the DDP runs against the single-process references (float32; observed differences are ~1e-7, from
#: the order of the gradient averaging: DDP sums g/2 over ranks, the reference computes (g0 + g1) / 2, or sums the
#: loss over 8 samples at once; Adam then amplifies nothing beyond that).
RTOL, ATOL = 1e-4, 1e-5


def run_bounded(cmd, timeout, env=None, cwd=None):
    """Run a command in its own process group; on timeout kill that group (no stray workers) and fail."""
    env = dict(os.environ if env is None else env)
    env.setdefault('OMP_NUM_THREADS', '1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'{cmd[:6]} ... did not finish in {timeout} s:\n{out[-4000:]}')
    return proc.returncode, out


def torchrun(args, timeout=240, env=None, cwd=None):
    return run_bounded([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
                       + list(args), timeout, env=env, cwd=cwd)


# ------------------------------------------------------------------------------------------ single-process references
def rank_batches(epoch: int, ds, world: int = 2, batch: int = 4):
    """Per rank, the index batches train_task's DistributedSampler gives in ``epoch``."""
    out = []
    for r in range(world):
        s = DistributedSampler(ds, num_replicas=world, rank=r, shuffle=True, seed=W.TRAIN['seed'])
        s.set_epoch(epoch)
        idx = list(s)
        out.append([idx[i:i + batch] for i in range(0, len(idx), batch)])
    return out


def task_optimizer(model, task='t'):
    state = model._task(task)
    head = list(state.head.parameters())
    ids = {id(p) for p in head}
    mods = [p for p in model.task_parameters(task) if id(p) not in ids]
    return torch.optim.Adam([{'params': mods}, {'params': head}], lr=W.TRAIN['lr'])


def reference_layernorm(ds):
    """One process, plain loop, each step on the global batch (both ranks' shares together)."""
    model = W.make_model(W.LN_ARCH)
    model.set_task('t')
    model.train()
    opt = task_optimizer(model)
    for epoch in range(W.TRAIN['epochs']):
        b0, b1 = rank_batches(epoch, ds)
        for i0, i1 in zip(b0, b1):
            x, y = ds[i0 + i1]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def reference_batchnorm(ds):
    """Two replicas on the two ranks' shares, gradients averaged by hand, BN statistics averaged after each epoch;
    then the recalibration as one cumulative average over both shares' batches."""
    reps = [W.make_model(W.BN_ARCH) for _ in range(2)]
    opts = []
    for m in reps:
        m.set_task('t')
        m.train()
        opts.append(task_optimizer(m))
    for epoch in range(W.TRAIN['epochs']):
        shares = rank_batches(epoch, ds)
        for step in range(len(shares[0])):
            for m, o, share in zip(reps, opts, shares):
                x, y = ds[share[step]]
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
            for p0, p1 in zip(reps[0].parameters(), reps[1].parameters()):
                g = (p0.grad + p1.grad) / 2
                p0.grad, p1.grad = g, g.clone()
            for o in opts:
                o.step()
        with torch.no_grad():
            for s0, s1 in zip(reps[0]._task('t').norm_stats.values(), reps[1]._task('t').norm_stats.values()):
                for k in ('running_mean', 'running_var'):
                    avg = (s0[k] + s1[k]) / 2
                    s0[k].copy_(avg)
                    s1[k].copy_(avg)
    after_epochs = {k: v.detach().clone() for k, v in reps[0]._task('t').tensors().items()}
    model = reps[0]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for share in rank_batches(W.TRAIN['epochs'] - 1, ds):
            for idx in share:
                model(ds[idx][0])
    for bn in bns:
        bn.momentum = 0.1
    return after_epochs, {k: v.detach().clone() for k, v in model._task('t').tensors().items()}


def assert_close(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m: f'{what} {k}: {m}')
        else:
            assert torch.equal(got[k], want[k]), f'{what} {k}'


# ------------------------------------------------------------------------------------------ 2 gloo processes
@pytest.mark.timeout(300)
def test_ddp_two_gloo_processes_match_single_process_references(tmp_path):
    from safetensors.torch import load_file
    code, out = torchrun([str(ROOT / 'tests' / 'ddp_worker.py'), str(tmp_path)])
    assert code == 0, out[-4000:]
    reports = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    got = [load_file(str(tmp_path / f'rank{r}.safetensors')) for r in range(2)]
    ds = W.dataset(W.N_TRAIN, 0)

    for rep in reports:
        assert rep['ln_distributed']
        # zero forgetting under DDP: the other task's tensors and outputs are bit-identical on every rank
        assert rep['ln_other_unchanged'] and rep['bn_other_unchanged']
        # validation over all ranks' shards, each sample once: equal to evaluating the whole set in one process
        assert 0 < rep['ln_eval_local'] < 1  # so counting the padded sample twice would show
        assert rep['ln_eval_distributed'] == rep['ln_eval_local']
        assert rep['ln_history']['val_acc'][-1] == rep['ln_eval_local']
        # SyncBatchNorm on CPU: a clear error, and the model untouched
        assert 'sync_bn=True needs CUDA' in rep['sync_bn_cpu_error']
        assert rep['sync_bn_model_unchanged']
    assert reports[0]['ln_history']['train_loss'] == reports[1]['ln_history']['train_loss']
    # every rank ends with the same task (DDP all-reduced gradients, BN statistics averaged)
    assert set(got[0]) == set(got[1])
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k

    # LayerNorm model == one process on the global batch
    ref = reference_layernorm(ds)
    want = {k: v.detach() for k, v in ref._task('t').tensors().items()}
    assert_close({k[3:]: v for k, v in got[0].items() if k.startswith('ln.')}, want, 'layernorm')
    assert any(not torch.equal(v, W.make_model(W.LN_ARCH)._task('t').tensors()[k]) for k, v in want.items()
               if k.startswith('modulator.'))  # it did train

    # BatchNorm model == two replicas with averaged gradients (and averaged BN statistics after each epoch), and
    # the recalibrated statistics == the average over both ranks' batches
    after_epochs, recalibrated = reference_batchnorm(ds)
    assert_close({k[len('bn_epoch.'):]: v for k, v in got[0].items() if k.startswith('bn_epoch.')}, after_epochs,
                 'batchnorm after the epochs')
    assert_close({k[3:]: v for k, v in got[0].items() if k.startswith('bn.')}, recalibrated,
                 'batchnorm recalibrated')

    # the adapter rank 0 saved loads into a fresh single-process model with identical outputs
    fresh = W.make_model(W.LN_ARCH, tasks=False)
    load_tasks(fresh, tmp_path / 'ln_adapters')
    assert torch.equal(W.logits(fresh, 't'), got[0]['ln_logits'])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('ln_adapters')) == ['ln_adapters']

    info = checkpoint_info(tmp_path / 'ln.ckpt.safetensors')
    assert info['epoch'] == 2 and info['done'] and info['world_size'] == 2
    assert {'rng.0', 'rng.1'} <= set(info['tensors'])
