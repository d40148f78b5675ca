"""Training under torch.distributed: DDP with 2 gloo processes against single-process references, SyncBatchNorm
swapping, DDP-wrapped models, sharded evaluation."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

import timm
import timm_modcl
from timm_modcl import DistributedError, load_tasks

from _subproc import run_bounded
from timm_modcl import distributed as D
from timm_modcl.distributed import ddp
from timm_modcl.checkpoint import checkpoint_info
from timm_modcl.layers import TaskNorm
from timm_modcl.serving import compute_task_statistics
from timm_modcl.train import evaluate, predict, train_task

import ddp_worker as W

ROOT = Path(__file__).resolve().parents[1]
#: Tolerance of the DDP runs against the single-process references (float32; observed differences are ~1e-7, from
#: the order of the gradient averaging: DDP sums g/2 over ranks, the reference computes (g0 + g1) / 2, or sums the
#: loss over 8 samples at once; Adam then amplifies nothing beyond that).
RTOL, ATOL = 1e-4, 1e-5


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
    state = model.modcl_tasks[task]
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
            for p0, p1 in zip(reps[0].task_parameters('t'), reps[1].task_parameters('t')):
                g = (p0.grad + p1.grad) / 2
                p0.grad, p1.grad = g, g.clone()
            for o in opts:
                o.step()
        with torch.no_grad():
            for s0, s1 in zip(reps[0].modcl_tasks['t'].norm_stats.values(), reps[1].modcl_tasks['t'].norm_stats.values()):
                for k in ('running_mean', 'running_var'):
                    avg = (s0[k] + s1[k]) / 2
                    s0[k].copy_(avg)
                    s1[k].copy_(avg)
    after_epochs = {k: v.detach().clone() for k, v in reps[0].modcl_tasks['t'].tensors().items()}
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
    compute_task_statistics(model, 't', ds)  # prototypes over all the data: what the ranks' all-reduce must give
    return after_epochs, {k: v.detach().clone() for k, v in model.modcl_tasks['t'].tensors().items()}


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
        assert 'rank(s) [1] differ from rank 0' in rep['backbone_error']
        # interrupted after its first epoch's checkpoint and resumed: the same task, bit for bit, as without a break
        assert rep['ln_interrupted'] and rep['ln_resumed_equal']
        for k in ('train_loss', 'train_acc', 'val_acc', 'lr'):
            assert rep['ln_resumed_history'][k] == rep['ln_history'][k]
    assert reports[0]['ln_history']['train_loss'] == reports[1]['ln_history']['train_loss']
    # every rank ends with the same task (DDP all-reduced gradients, BN statistics averaged)
    assert set(got[0]) == set(got[1])
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k

    # LayerNorm model == one process on the global batch
    ref = reference_layernorm(ds)
    compute_task_statistics(ref, 't', ds)  # prototypes over all the data: what the ranks' all-reduce must give
    want = {k: v.detach() for k, v in ref.modcl_tasks['t'].tensors().items()}
    assert any(k.startswith('stats.proto_') for k in want)
    assert_close({k[3:]: v for k, v in got[0].items() if k.startswith('ln.')}, want, 'layernorm')
    assert any(not torch.equal(v, W.make_model(W.LN_ARCH).modcl_tasks['t'].tensors()[k]) for k, v in want.items()
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
    # a checkpoint of 2 processes is not resumed by one (the data order would differ)
    with pytest.raises(timm_modcl.CheckpointError, match='written by 2 process'):
        train_task(W.make_model(W.LN_ARCH), 't', ds, checkpoint=tmp_path / 'ln.ckpt.safetensors', resume=True,
                   **W.TRAIN)


@pytest.mark.timeout(300)
def test_modcl_train_under_torchrun_prints_and_saves_once(tmp_path):
    """``torchrun --nproc_per_node 2 -m timm_modcl train``: one task trained by 2 processes, rank 0 reports and saves;
    the saved task loads into a single-process model."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, colour in (('red', (220, 40, 40)), ('blue', (40, 40, 220))):
        (tmp_path / 'data' / c).mkdir(parents=True)
        for i in range(5):
            a = (np.array(colour)[None, None] + rng.integers(-30, 30, (16, 16, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / 'data' / c / f'{i}.png')
    out = tmp_path / 'ad'
    code, log = torchrun(['-m', 'timm_modcl', 'train', '--data', str(tmp_path / 'data'), '--task', 'colours',
                          '--out', str(out), '--model', 'modcl_mobilenetv2_050', '--no-pretrained', '--input-size',
                          '16', '--epochs', '2', '--batch-size', '2', '--no-progress', '--checkpoint',
                          str(tmp_path / 'ck.safetensors')])
    assert code == 0, log[-4000:]
    assert log.count('2 processes (DistributedDataParallel)') == 1, log[-4000:]
    assert log.count('saved 1 task(s)') == 1, log[-4000:]
    index = json.loads((out / 'modcl_index.json').read_text())
    assert index['tasks'] == ['colours']
    assert checkpoint_info(tmp_path / 'ck.safetensors')['world_size'] == 2
    torch.manual_seed(0)  # the CLI's seeded random backbone
    model = timm.create_model('modcl_mobilenetv2_050')
    assert load_tasks(model, out) == ['colours']


# ------------------------------------------------------------------------------------------ in one process
@pytest.fixture
def world_of_one():
    """A gloo process group of one process (an in-memory store: no ports), destroyed afterwards."""
    import torch.distributed as dist
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _toy(n=12, seed=0):
    return W.dataset(n, seed)


def test_train_task_unwraps_a_ddp_made_before_set_task(world_of_one):
    model = W.make_model(W.BN_ARCH)  # 'other' is active: a DDP made now holds other's tensors
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    other = {k: v.clone() for k, v in model.modcl_tasks['other'].tensors().items()}
    t0 = {k: v.clone() for k, v in model.modcl_tasks['t'].tensors().items()}
    hist = train_task(wrapped, 't', _toy(), _toy(6, 1), epochs=1, batch_size=4, seed=0, progress=False,
                      distributed=True)
    assert hist.epochs == 1 and model.active_task == 't'
    assert all(torch.equal(v, model.modcl_tasks['other'].tensors()[k]) for k, v in other.items())
    changed = [k for k, v in t0.items() if not torch.equal(v, model.modcl_tasks['t'].tensors()[k])]
    assert any(k.startswith('modulator.') for k in changed) and any(k.startswith('head.') for k in changed)
    # nothing of the DDP wrapping stays on the model: training again in one process works
    from timm_modcl.core import _prepare_compiled_call  # the model's own (torch.compile) hook stays
    assert not model._forward_hooks
    assert all(h is _prepare_compiled_call for h in model._forward_pre_hooks.values())
    train_task(model, 't', _toy(), epochs=1, batch_size=4, seed=0, progress=False, distributed=False)
    # evaluate / predict accept the wrapped model as well, and the sharded evaluation of one process is the plain one
    x = _toy(6, 1)
    assert evaluate(wrapped, x, 't', distributed=True) == evaluate(model, x, 't')
    assert len(predict(wrapped, x.tensors[0][:2], 't', topk=2)) == 2


def test_distributed_true_without_a_process_group_is_a_clear_error(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    model = W.make_model(W.BN_ARCH)
    with pytest.raises(DistributedError, match='no process group'):
        train_task(model, 't', _toy(), epochs=1, progress=False, distributed=True)
    assert model.active_task == 'other'
    with pytest.raises(timm_modcl.TaskError, match='modcl model'):
        train_task(timm.create_model('mobilenetv2_050'), 't', _toy(), epochs=1, progress=False)


def test_torchrun_environment_without_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    for var in ('MASTER_ADDR', 'MASTER_PORT', 'RANK'):
        monkeypatch.delenv(var, raising=False)
    model = W.make_model(W.BN_ARCH)
    with pytest.raises(DistributedError, match='launch with torchrun'):
        train_task(model, 't', _toy(), epochs=1, progress=False)
    assert model.active_task == 'other' and not D.is_distributed()


def test_sync_batchnorm_swaps_classes_in_place_and_back():
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    model = W.make_model(W.BN_ARCH)
    model.set_task('t')
    x = _toy(4).tensors[0]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    classes = [type(m) for m in bns]
    buffers = [dict(m._buffers) for m in bns]
    keys = list(model.state_dict())
    model.train()
    with torch.no_grad():
        want = model(x)
    for m, b in zip(bns, buffers):  # undo the statistics update of that forward
        for k in ('running_mean', 'running_var', 'num_batches_tracked'):
            m._buffers[k] = b[k]
    with D.sync_batchnorm(model) as n:
        assert n == len(bns) > 0
        for m, cls in zip(bns, classes):
            assert isinstance(m, TaskNorm) and isinstance(m, torch.nn.SyncBatchNorm)
            assert isinstance(m, SyncBatchNormAct) == issubclass(cls._modcl_plain, BatchNormAct2d)
        # the same module objects, buffers and task bindings; without a process group SyncBatchNorm is plain BN
        assert [dict(m._buffers) for m in bns] == buffers
        with torch.no_grad():
            got = model(x)
    assert torch.equal(got, want)
    assert [type(m) for m in bns] == classes and not any(hasattr(m, 'process_group') for m in bns)
    assert list(model.state_dict()) == keys

    class OddNorm(torch.nn.BatchNorm2d):
        pass

    with pytest.raises(DistributedError, match='OddNorm'):
        ddp._sync_base(OddNorm)


def test_padding_mask_marks_the_samples_a_distributed_sampler_repeats():
    ds = _toy(5)
    masks = []
    for r in range(2):
        s = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)
        assert len(list(s)) == 3
        masks.append(D.padding_mask(s, 0, 3).tolist())
    assert masks == [[True, True, True], [True, True, False]]
    assert D.padding_mask(DistributedSampler(ds, num_replicas=2, rank=1), 2, 1).tolist() == [False]
    assert D.padding_mask(None, 0, 3) is None


_CUDA_SCRIPT = '''
import json, os, sys
import torch
import ddp_worker as W
from timm_modcl import train_task
from timm_modcl import distributed as D
model = W.make_model(W.BN_ARCH)
other = {k: v.clone() for k, v in model.modcl_tasks['other'].tensors().items()}
classes = [type(m) for m in model.modules()]
hist = train_task(model, 't', W.dataset(W.N_TRAIN, 0), W.dataset(W.N_VAL, 1), device='cuda', distributed=True,
                  sync_bn=True, **W.TRAIN)
ok = {
    'device': str(next(model.parameters()).device),
    'other_unchanged': all(torch.equal(v.cpu(), model.modcl_tasks['other'].tensors()[k].cpu()) for k, v in other.items()),
    'classes_restored': classes == [type(m) for m in model.modules()],
    'finite': all(torch.isfinite(v).all().item() for v in model.modcl_tasks['t'].tensors().values()
                  if v.is_floating_point()),
    'val_acc': hist.val_acc[-1],
}
with open(os.path.join(sys.argv[1], f'rank{D.get_rank()}.json'), 'w') as f:
    json.dump(ok, f)
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (run on a GPU machine)')
@pytest.mark.timeout(300)
def test_ddp_on_cuda_with_sync_batchnorm(tmp_path):
    """On GPUs: NCCL, cuda:LOCAL_RANK, SyncBatchNorm swapped in and out, bf16 autocast; 2 processes with 2 GPUs (real
    synchronisation), else 1 process (DDP and the SyncBatchNorm layers built, no synchronisation needed)."""
    nproc = min(2, torch.cuda.device_count())
    script = tmp_path / 'cuda_worker.py'
    script.write_text(_CUDA_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), os.environ.get('PYTHONPATH', '')]))
    code, out = run_bounded([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                             str(nproc), str(script), str(tmp_path)], 240, env=env)
    assert code == 0, out[-4000:]
    for r in range(nproc):
        rep = json.loads((tmp_path / f'rank{r}.json').read_text())
        assert rep['device'] == f'cuda:{r}'
        assert rep['other_unchanged'] and rep['classes_restored'] and rep['finite'], rep


@pytest.mark.parametrize('mode, error', [('label', 'DataError'), ('nan', 'NonFiniteLossError')])
def test_an_error_on_one_rank_ends_every_rank_with_the_same_typed_error(tmp_path, mode, error):
    """A bad label or a NaN loss in rank 1's shard: both processes end with the same ModCLError (rank 0 names
    rank 1) instead of rank 0 waiting for gloo's timeout ("Connection closed by peer"); a NaN loss puts the task back
    on both."""
    code, out = torchrun([str(ROOT / 'tests' / 'ddp_fail_worker.py'), str(tmp_path), mode], timeout=180,
                         cwd=str(ROOT / 'tests'))
    assert code == 0, out[-3000:]
    reports = [json.loads((tmp_path / f'{r}.json').read_text()) for r in (0, 1)]
    assert [r['error'] for r in reports] == [error, error] and all(r['modcl'] for r in reports), reports
    assert reports[0]['message'].startswith('process 1 failed: ')
    assert reports[0]['message'][len('process 1 failed: '):] == reports[1]['message']
    assert all(r['seconds'] < 60 for r in reports), reports
    if mode == 'nan':
        assert all(r['unchanged'] for r in reports)   # epoch 1: put back to the start on both ranks
