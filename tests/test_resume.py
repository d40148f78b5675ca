"""Training checkpoints: a training interrupted mid-epoch (in process, and a ``modcl train`` killed with SIGKILL)
resumes from its last checkpoint and ends with exactly the task an uninterrupted run gives; bad checkpoints are
refused before anything changes."""
import json
import os
import random
import signal
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

import timm
import timm_modcl  # noqa: F401
from timm_modcl import CheckpointError, TaskError
from timm_modcl.checkpoint import checkpoint_info
from timm_modcl.train import train_task

from _subproc import run_bounded

SIZE = 24
ARGS = dict(epochs=3, batch_size=4, lr=0.01, seed=0, progress=False)  # milestones: the default [1]


def _model():
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_050', drop_rate=0.3)  # dropout: the global RNG matters too
    model.add_task('other', 3)
    model.add_task('t', 2)
    model.set_task('other')
    return model


def _data(n=14):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    x[y == 1, 0] += 1.0
    return TensorDataset(x, y)


class _Interrupt(Exception):
    pass


class _InterruptAfter(Dataset):
    """The same samples; raises after ``after`` reads (a crash in the middle of an epoch)."""

    def __init__(self, data, after):
        self.data, self.after, self.reads = data, after, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.after:
            raise _Interrupt()
        return self.data[i]


def _tensors(model, task='t'):
    return {k: v.detach().clone() for k, v in model.modcl_tasks[task].tensors().items()}


def _same_history(a, b):
    for k in ('train_loss', 'train_acc', 'val_acc', 'lr', 'head_lr', 'stopped_early'):
        assert getattr(a, k) == getattr(b, k), k


def test_interrupted_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    data, val = _data(), _data(6)
    plain = _model()
    want = train_task(plain, 't', data, val, **ARGS)
    with_ck = _model()
    train_task(with_ck, 't', data, val, checkpoint=tmp_path / 'a.safetensors', **ARGS)
    assert all(torch.equal(v, _tensors(with_ck)[k]) for k, v in _tensors(plain).items())  # checkpoints change nothing

    crashed = _model()
    other = _tensors(crashed, 'other')
    ck = tmp_path / 'b.safetensors'
    with pytest.raises(_Interrupt):  # 14 samples = 4 batches of 4, 4, 4, 2 per epoch: dies in epoch 2
        train_task(crashed, 't', _InterruptAfter(data, after=14 + 6), val, checkpoint=ck, **ARGS)
    assert checkpoint_info(ck)['epoch'] == 1 and not checkpoint_info(ck)['done']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary file left

    resumed = _model()  # a new process: other random states
    torch.manual_seed(12345)
    random.seed(1)
    np.random.seed(2)
    got = train_task(resumed, 't', data, val, checkpoint=ck, resume=True, **ARGS)
    _same_history(got, want)
    for k, v in _tensors(plain).items():
        assert torch.equal(v, _tensors(resumed)[k]), k  # tolerance: none (bit-identical on the CPU)
    assert all(torch.equal(v, _tensors(resumed, 'other')[k]) for k, v in other.items())
    assert checkpoint_info(ck)['epoch'] == 3 and checkpoint_info(ck)['done']

    # resuming a finished checkpoint trains nothing more and gives the same task again
    again = _model()
    hist = train_task(again, 't', data, val, checkpoint=ck, resume=True, **ARGS)
    _same_history(hist, want)
    assert all(torch.equal(v, _tensors(again)[k]) for k, v in _tensors(plain).items())


def test_resume_without_a_checkpoint_file_starts_from_scratch(tmp_path):
    data = _data()
    a, b = _model(), _model()
    train_task(a, 't', data, **ARGS)
    train_task(b, 't', data, checkpoint=tmp_path / 'new.safetensors', resume=True, **ARGS)
    assert all(torch.equal(v, _tensors(b)[k]) for k, v in _tensors(a).items())
    with pytest.raises(TaskError, match='needs checkpoint'):
        train_task(b, 't', data, resume=True, **ARGS)


def test_bad_checkpoints_are_refused_before_anything_changes(tmp_path):
    data = _data()
    ck = tmp_path / 'ck.safetensors'
    train_task(_model(), 't', data, checkpoint=ck, **dict(ARGS, epochs=1))

    def refused(path, match, model=None, **kw):
        model = model or _model()
        before = {t: _tensors(model, t) for t in ('other', 't')}
        with pytest.raises(CheckpointError, match=match):
            train_task(model, 't', data, checkpoint=path, resume=True, **dict(ARGS, epochs=1, **kw))
        assert model.active_task == 'other'
        for t, tensors in before.items():
            assert all(torch.equal(v, _tensors(model, t)[k]) for k, v in tensors.items())

    refused(ck, r'other arguments: lr=0\.01 \(now 0\.02\)', lr=0.02)
    other_size = _model()
    with pytest.raises(CheckpointError, match=r'train_size=14 \(now 10\)'):
        train_task(other_size, 't', _data(10), checkpoint=ck, resume=True, **dict(ARGS, epochs=1))
    assert other_size.active_task == 'other'

    model = _model()
    model.add_task('t', 2, resolution=(8, 8), replace=True, activate=False)
    refused(ck, 'another config', model=model)
    moved = _model()
    with torch.no_grad():
        moved.frozen_tensors()[moved.modulated_layers[0] + '.weight'].mul_(2)
    refused(ck, 'other backbone weights', model=moved)

    data_bytes = ck.read_bytes()
    (tmp_path / 'short.safetensors').write_bytes(data_bytes[:len(data_bytes) // 2])
    refused(tmp_path / 'short.safetensors', 'corrupt')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a checkpoint at all')
    refused(tmp_path / 'junk.safetensors', 'not a checkpoint|corrupt')
    model = _model()
    model.save_task('t', tmp_path / 'adapter.safetensors')
    refused(tmp_path / 'adapter.safetensors', 'not a timm_modcl training checkpoint')
    refused(tmp_path, 'is a folder')


def test_checkpoints_with_malformed_optimizer_scheduler_or_random_state_change_nothing(tmp_path):
    """Parts that only fail when loaded (optimizer scalars, scheduler, random states) are refused before any task
    tensor, the optimizer or the active task changes."""
    from timm_modcl.checkpoint.encoding import _load, _save
    data = _data()
    ck = tmp_path / 'ck.safetensors'
    train_task(_model(), 't', data, checkpoint=ck, **dict(ARGS, epochs=1))
    tensors, meta = _load(ck.read_bytes(), 'ck')

    def rng_with(key, value):
        rt, rm = _load(tensors['rng.0'].numpy().tobytes(), 'rng')
        rt = dict(rt, **{key: value})
        return torch.frombuffer(bytearray(_save(rt, rm)), dtype=torch.uint8)

    cases = {
        'scalars': lambda t, s: s['optimizer'].__setitem__('scalars', {'abc': {}}),
        'scalars_list': lambda t, s: s['optimizer'].__setitem__('scalars', [1]),
        'scheduler': lambda t, s: s.__setitem__('scheduler', [1, 2]),
        'param_groups': lambda t, s: s['optimizer'].__setitem__('param_groups', s['optimizer']['param_groups'] + [7]),
        'torch_rng': lambda t, s: t.__setitem__('rng.0', rng_with('torch', torch.zeros(10, dtype=torch.uint8))),
        'generator': lambda t, s: t.__setitem__('rng.0', rng_with('generator', torch.zeros(3))),
    }
    for name, change in cases.items():
        t2, s2 = dict(tensors), json.loads(meta['state'])
        change(t2, s2)
        path = tmp_path / f'{name}.safetensors'
        path.write_bytes(_save(t2, dict(meta, state=json.dumps(s2))))
        model = _model()
        before = {t: _tensors(model, t) for t in ('other', 't')}
        with pytest.raises(CheckpointError):
            train_task(model, 't', data, checkpoint=path, resume=True, **dict(ARGS, epochs=1))
        assert model.active_task == 'other', name
        for t, ts in before.items():
            assert all(torch.equal(v, _tensors(model, t)[k]) for k, v in ts.items()), (name, t)


# ------------------------------------------------------------------------------------------ modcl train, killed
_KILLER = textwrap.dedent('''
    import os, signal, sys
    import torch
    steps = [0]
    step = torch.optim.Adam.step
    def counting_step(self, *a, **k):
        steps[0] += 1
        if steps[0] == int(os.environ['KILL_AT_STEP']):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash or an OOM kill
        return step(self, *a, **k)
    torch.optim.Adam.step = counting_step
    from timm_modcl.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _cli(args, kill_at=None, timeout=180):
    env = dict(os.environ)
    cmd = [sys.executable, '-m', 'timm_modcl'] if kill_at is None else [sys.executable, '-c', _KILLER]
    if kill_at is not None:
        env['KILL_AT_STEP'] = str(kill_at)
    return run_bounded(cmd + list(args), timeout, env=env)


def _main(args):
    import contextlib
    import io
    from timm_modcl.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.mark.timeout(300)
def test_modcl_train_killed_mid_epoch_resumes_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file
    from timm_modcl import cli
    rng = np.random.default_rng(0)
    for c, colour in (('red', (220, 40, 40)), ('blue', (40, 40, 220))):
        (tmp_path / 'data' / c).mkdir(parents=True)
        for i in range(6):
            a = (np.array(colour)[None, None] + rng.integers(-40, 40, (20, 20, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / 'data' / c / f'{i}.png')
    # two copies of an adapter folder with a first task on the CLI's seeded random backbone: it must not change
    model = cli._create('modcl_mobilenetv2_050')
    model.add_task('first', 3)
    for name in ('plain', 'killed'):
        model.save_tasks(tmp_path / name)
    first = (tmp_path / 'plain' / 'first' / 'adapter_model.safetensors').read_bytes()
    run = ['train', '--task', 'second', '--epochs', '3', '--data', tmp_path / 'data', '--input-size', '20',
           '--batch-size', '4', '--no-progress']

    code, out = _main(run + ['--out', tmp_path / 'plain'])
    assert code == 0, out
    # 10 training images (augmented), batches of 4: 3 steps per epoch; SIGKILL at step 5, inside epoch 2
    ck = tmp_path / 'second.ckpt.safetensors'
    code, out = _cli(run + ['--out', tmp_path / 'killed', '--checkpoint', ck], kill_at=5)
    assert code == -signal.SIGKILL, out
    assert checkpoint_info(ck)['epoch'] == 1
    assert json.loads((tmp_path / 'killed' / 'modcl_index.json').read_text())['tasks'] == ['first']
    code, out = _main(run + ['--out', tmp_path / 'killed', '--checkpoint', ck, '--resume'])
    assert code == 0, out

    want = load_file(str(tmp_path / 'plain' / 'second' / 'adapter_model.safetensors'))
    got = load_file(str(tmp_path / 'killed' / 'second' / 'adapter_model.safetensors'))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # tolerance: none (CPU)
    for name in ('plain', 'killed'):
        assert (tmp_path / name / 'first' / 'adapter_model.safetensors').read_bytes() == first
    hist = [json.loads((tmp_path / n / 'second' / 'train_history.json').read_text()) for n in ('plain', 'killed')]
    assert hist[0]['train_loss'] == hist[1]['train_loss'] and len(hist[1]['train_loss']) == 3

    code, out = _main(run + ['--out', tmp_path / 'other', '--resume'])
    assert code == 2 and '--resume needs --checkpoint' in out
