"""Hostile input, checkpoint and training component (issue 20, items 2, 3, 9 and 10): checkpoint restore is all or
nothing for the *contents* (optimizer moments and hyper-parameters, scheduler, history, random states, epoch, task
tensors), non-finite tensors are never saved, a NaN loss ends with a typed error and the task put back, a failing
``train_task(seed=...)`` leaves the global random states alone, and a resume of a finished ``modcl train`` exits 0.
Also the training-data finding of the first hardening review: an image that fails to decode is named. Ends with a fuzz
run of hundreds of checkpoints mutated in their values."""
import contextlib
import io
import json
import random
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import timm
import timm_modcl  # noqa: F401  (registers the models)
from timm_modcl import AdapterError, CheckpointError, DataError, ModCLError, NonFiniteLossError, TaskError
from timm_modcl.checkpoint import checkpoint_info
from timm_modcl.checkpoint.encoding import _load, _save
from timm_modcl.train import train_task

SIZE = 24
ARGS = dict(epochs=2, batch_size=4, lr=0.01, seed=0, progress=False)
TASKS = ('other', 't')


def _model():
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_050')
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


class _Reads(Dataset):
    """The same samples; after ``after`` reads, ``then`` happens: an interruption, or an image that makes the loss
    NaN."""

    def __init__(self, data, after, then='interrupt'):
        self.data, self.after, self.then, self.reads = data, after, then, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        x, y = self.data[i]
        if self.reads > self.after:
            if self.then == 'interrupt':
                raise _Interrupt()
            # finite, so the model's input check lets it in (a NaN image is an InputError before the forward), but
            # it overflows float32 in the first convolution: the loss is NaN
            x = torch.full_like(x, 3e38)
        return x, y


def _rng_states():
    return torch.get_rng_state(), np.random.get_state(legacy=True), random.getstate()


def _same_rng(a, b):
    return (torch.equal(a[0], b[0]) and a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1])
            and a[1][2:] == b[1][2:] and a[2] == b[2])


def _snapshot(model, tasks=None):
    """Everything a refused call must leave alone: the tensors of every task (or of ``tasks``), the active task and
    mode, the RNGs."""
    return ({t: {k: v.detach().clone() for k, v in model.modcl_tasks[t].tensors().items()} for t in tasks or model.tasks},
            model.active_task, model.training, _rng_states())


def _changes(model, before):
    """What differs from ``before`` (an empty list: nothing)."""
    tensors, active, training, rng = before
    now = _snapshot(model, list(tensors))
    out = []
    if set(model.tasks) < set(tensors):
        out.append(f'tasks {sorted(model.tasks)}')
    for t, ts in tensors.items():
        got = now[0].get(t, {})
        if set(got) != set(ts) or not all(torch.equal(v, got[k]) for k, v in ts.items()):
            out.append(f'tensors of {t!r}')
    if now[1] != active or now[2] != training:
        out.append('active task or mode')
    if not _same_rng(now[3], rng):
        out.append('random state')
    return out


def _unfinished(folder, n):
    """The bytes of a checkpoint after epoch 1 of 2 on ``n`` samples (the run was interrupted in epoch 2)."""
    path = folder / 'ck.safetensors'
    with pytest.raises(_Interrupt):
        train_task(_model(), 't', _Reads(_data(n), after=n + 2), checkpoint=path, **ARGS)
    assert checkpoint_info(path)['epoch'] == 1
    return path.read_bytes()


@pytest.fixture(scope='module')
def unfinished(tmp_path_factory):
    return _unfinished(tmp_path_factory.mktemp('ck'), 14)


def _parts(data):
    tensors, meta = _load(data, 'ck')
    return dict(tensors), json.loads(meta['state']), meta


_NESTED = '__nested__'


def _build(tensors, state, meta):
    """Checkpoint bytes; a value ``_NESTED`` in the state becomes 100,000 nested lists (too deep for ``json``)."""
    text = json.dumps(state).replace(json.dumps(_NESTED), '[' * 100_000 + ']' * 100_000)
    return _save(tensors, dict(meta, state=text))


def _rng_blob(tensors, rank=0, meta_update=None, tensor_update=None):
    rt, rm = _load(tensors[f'rng.{rank}'].numpy().tobytes(), 'rng')
    rt, rm = dict(rt, **(tensor_update or {})), dict(rm, **(meta_update or {}))
    return torch.frombuffer(bytearray(_save(rt, rm)), dtype=torch.uint8)


def _first(tensors, suffix):
    return sorted((k for k in tensors if k.endswith(suffix)), key=lambda k: int(k.split('.')[1]))[0]


def _set_tensor(suffix, fn):
    def change(t, s):
        k = _first(t, suffix)
        t[k] = fn(t[k].clone())
    return change


def _group(i, key, value):
    return lambda t, s: s['optimizer']['param_groups'][i].__setitem__(key, value)


def _modulator(fn):
    def change(t, s):
        k = sorted(k for k in t if k.startswith('task.modulator.'))[0]
        t[k] = fn(t[k].clone())
    return change


HOSTILE = {
    # optimizer state: moments, steps, shapes, parameter ids
    'exp_avg_nan': _set_tensor('.exp_avg', lambda v: v.fill_(float('nan'))),
    'exp_avg_inf': _set_tensor('.exp_avg', lambda v: v.fill_(float('inf'))),
    'exp_avg_huge': _set_tensor('.exp_avg', lambda v: v.fill_(1e30)),  # finite, but no gradients give it
    'exp_avg_sq_negative': _set_tensor('.exp_avg_sq', lambda v: v.fill_(-1.0)),
    'exp_avg_sq_nan': _set_tensor('.exp_avg_sq', lambda v: v.fill_(float('nan'))),
    'exp_avg_scalar': _set_tensor('.exp_avg', lambda v: torch.tensor(0.5)),
    'exp_avg_int': _set_tensor('.exp_avg', lambda v: v.long()),
    'step_negative': _set_tensor('.step', lambda v: v.fill_(-1.0)),
    'step_fraction': _set_tensor('.step', lambda v: v.fill_(1.5)),
    'step_nan': _set_tensor('.step', lambda v: v.fill_(float('nan'))),
    'step_vector': _set_tensor('.step', lambda v: torch.ones(3)),
    'step_as_json_scalar': lambda t, s: (t.pop(_first(t, '.step')),
                                         s['optimizer'].__setitem__('scalars', {'0': {'step': -1}})),
    'scalar_unknown_key': lambda t, s: s['optimizer'].__setitem__('scalars', {'0': {'foo': 1}}),
    'scalar_string': lambda t, s: s['optimizer'].__setitem__('scalars', {'0': {'step': 'x'}}),
    'unknown_state_key': lambda t, s: t.__setitem__('optimizer.0.foo', t[_first(t, '.exp_avg')].clone()),
    'missing_moment': lambda t, s: t.pop(_first(t, '.exp_avg_sq')),
    'permuted_param_ids': lambda t, s: s['optimizer']['param_groups'][0].__setitem__(
        'params', list(reversed(s['optimizer']['param_groups'][0]['params']))),
    'shifted_param_ids': lambda t, s: s['optimizer']['param_groups'][0].__setitem__(
        'params', [i + 1 for i in s['optimizer']['param_groups'][0]['params']]),
    'param_ids_strings': _group(1, 'params', ['157']),
    'groups_swapped': lambda t, s: s['optimizer'].__setitem__('param_groups',
                                                              s['optimizer']['param_groups'][::-1]),
    # optimizer hyper-parameters
    'weight_decay_nan': _group(0, 'weight_decay', float('nan')),
    'weight_decay_huge': _group(0, 'weight_decay', 1e30),
    'weight_decay_string': _group(1, 'weight_decay', 'x'),
    'betas_string': _group(0, 'betas', 'x'),
    'betas_nan': _group(0, 'betas', {'__tuple__': [float('nan'), 0.999]}),
    'betas_one_value': _group(0, 'betas', {'__tuple__': [0.9]}),
    'eps_negative': _group(0, 'eps', -1.0),
    'eps_inf': _group(1, 'eps', float('inf')),
    'lr_nan': _group(0, 'lr', float('nan')),
    'lr_negative': _group(0, 'lr', -0.5),
    'lr_string': _group(1, 'lr', '0.1'),
    'lr_huge': _group(0, 'lr', 1e30),
    'amsgrad_string': _group(0, 'amsgrad', 'yes'),
    'maximize_flipped': _group(0, 'maximize', True),
    'foreign_group_key': _group(0, 'foo', 1),
    'group_missing_key': lambda t, s: s['optimizer']['param_groups'][0].pop('eps'),
    'group_not_a_dict': lambda t, s: s['optimizer']['param_groups'].__setitem__(1, [157]),
    # scheduler
    'scheduler_optimizer_key': lambda t, s: s['scheduler'].__setitem__('optimizer', 1),
    'scheduler_t_initial_string': lambda t, s: s['scheduler'].__setitem__('t_initial', 'x'),
    'scheduler_nan': lambda t, s: s['scheduler'].__setitem__('lr_min', float('nan')),
    'scheduler_base_values_nan': lambda t, s: s['scheduler'].__setitem__('base_values', [float('nan')] * 2),
    'scheduler_missing_key': lambda t, s: s['scheduler'].pop('t_initial'),
    'scheduler_none': lambda t, s: s.__setitem__('scheduler', None),
    'scheduler_list': lambda t, s: s.__setitem__('scheduler', [1, 2]),
    # history, epoch, flags
    'history_train_loss_string': lambda t, s: s['history'].__setitem__('train_loss', 'abc'),
    'history_train_loss_nan': lambda t, s: s['history'].__setitem__('train_loss', [float('nan')]),
    'history_too_long': lambda t, s: s['history'].__setitem__('train_loss', [0.5, 0.5, 0.5]),
    'history_acc_above_one': lambda t, s: s['history'].__setitem__('train_acc', [7.0]),
    'history_val_acc_string': lambda t, s: s['history'].__setitem__('val_acc', ['x']),
    'history_unknown_key': lambda t, s: s['history'].__setitem__('foo', []),
    'history_other_task': lambda t, s: s['history'].__setitem__('task', 'other'),
    'history_stopped_early_string': lambda t, s: s['history'].__setitem__('stopped_early', 'no'),
    'epoch_beyond_epochs': lambda t, s: s.__setitem__('epoch', 99),
    'epoch_float': lambda t, s: s.__setitem__('epoch', 1.0),
    'done_string': lambda t, s: s.__setitem__('done', 'false'),
    'shuffle_seed_string': lambda t, s: s.__setitem__('shuffle_seed', 'x'),
    'scaler_string': lambda t, s: s.__setitem__('scaler', 'x'),
    'deeply_nested_history': lambda t, s: s['history'].__setitem__('lr', _NESTED),
    # random states
    'numpy_rng_garbage': lambda t, s: t.__setitem__('rng.0', _rng_blob(
        t, meta_update={'numpy': json.dumps(['MT19937', [1, 2], 0, 0, 0.0])})),
    'numpy_rng_not_json': lambda t, s: t.__setitem__('rng.0', _rng_blob(t, meta_update={'numpy': '{'})),
    'numpy_rng_huge_keys': lambda t, s: t.__setitem__('rng.0', _rng_blob(
        t, meta_update={'numpy': json.dumps(['MT19937', [2 ** 40] * 624, 0, 0, 0.0])})),
    'numpy_rng_wrong_name': lambda t, s: t.__setitem__('rng.0', _rng_blob(
        t, meta_update={'numpy': json.dumps(['PCG64', [1] * 624, 0, 0, 0.0])})),
    'python_rng_garbage': lambda t, s: t.__setitem__('rng.0', _rng_blob(
        t, meta_update={'python': json.dumps({'__tuple__': [3, [1, 2], None]})})),
    'python_rng_string': lambda t, s: t.__setitem__('rng.0', _rng_blob(t, meta_update={'python': '"abc"'})),
    'torch_rng_float': lambda t, s: t.__setitem__('rng.0', _rng_blob(
        t, tensor_update={'torch': torch.zeros(5056)})),
    # task tensors: what the adapter loader refuses
    'modulator_1e30': _modulator(lambda v: v.fill_(1e30)),
    'modulator_beyond_loader_bound': _modulator(lambda v: v.fill_(2e6)),
    'modulator_nan': _modulator(lambda v: v.fill_(float('nan'))),
    'running_var_negative': lambda t, s: t.__setitem__(
        sorted(k for k in t if k.endswith('.running_var'))[0],
        -torch.ones_like(t[sorted(k for k in t if k.endswith('.running_var'))[0]])),
    'head_inf': lambda t, s: t.__setitem__('task.head.weight', torch.full_like(t['task.head.weight'], float('inf'))),
    'num_batches_tracked_float': lambda t, s: t.__setitem__(
        sorted(k for k in t if k.endswith('.num_batches_tracked'))[0], torch.tensor(1.5)),
}


@pytest.mark.parametrize('case', sorted(HOSTILE))
def test_hostile_checkpoint_contents_are_refused_before_anything_changes(case, unfinished, tmp_path):
    tensors, state, meta = _parts(unfinished)
    HOSTILE[case](tensors, state)
    path = tmp_path / 'hostile.safetensors'
    path.write_bytes(_build(tensors, state, meta))
    written = path.read_bytes()
    model = _model()
    random.seed(5)
    np.random.seed(6)
    before = _snapshot(model)
    with pytest.raises(CheckpointError):
        train_task(model, 't', _data(), checkpoint=path, resume=True, **ARGS)
    assert _changes(model, before) == []
    assert path.read_bytes() == written


def test_the_unmodified_checkpoint_resumes(unfinished, tmp_path):
    """The cases above are refused for what they change: the same bytes without the change resume."""
    tensors, state, meta = _parts(unfinished)
    path = tmp_path / 'ck.safetensors'
    path.write_bytes(_build(tensors, state, meta))
    history = train_task(_model(), 't', _data(), checkpoint=path, resume=True, **ARGS)
    assert history.epochs == 2 and checkpoint_info(path)['done']


def test_checkpoint_path_that_is_a_folder_fails_before_any_training(tmp_path):
    data = _Reads(_data(), after=10 ** 9)
    for kw in ({}, {'resume': True}):
        model = _model()
        before = _snapshot(model)
        with pytest.raises(CheckpointError, match='folder'):
            train_task(model, 't', data, checkpoint=tmp_path, **dict(ARGS, **kw))
        assert data.reads == 0, kw
        assert _changes(model, before) == []
    (tmp_path / 'file').write_text('x')
    with pytest.raises(CheckpointError, match='not a folder'):
        train_task(_model(), 't', data, checkpoint=tmp_path / 'file' / 'ck.safetensors', **ARGS)
    assert data.reads == 0
    with pytest.raises(CheckpointError, match='path'):
        train_task(_model(), 't', data, checkpoint=123, **ARGS)


# ------------------------------------------------------------------------------------------ item 3: NaN
def _poison(model, task, key_suffix):
    k = next(k for k in model.modcl_tasks[task].tensors() if k.endswith(key_suffix))
    with torch.no_grad():
        model.modcl_tasks[task].tensors()[k].view(-1)[0] = float('nan')
    return k


@pytest.mark.parametrize('suffix', ['head.weight', '.running_mean', '.running_var'])
def test_save_task_and_save_tasks_refuse_non_finite_tensors(suffix, tmp_path):
    model = _model()
    _poison(model, 't', suffix)
    with pytest.raises(AdapterError, match='NaN or Inf'):
        model.save_task('t', tmp_path / 't.safetensors')
    assert list(tmp_path.iterdir()) == []
    model.save_tasks(tmp_path / 'folder', names=['other'])
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    index = (tmp_path / 'folder' / 'modcl_index.json').read_bytes()
    with pytest.raises(AdapterError, match='NaN or Inf'):
        model.save_tasks(tmp_path / 'folder')  # 'other' is fine, 't' is not: nothing is written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == listing
    assert (tmp_path / 'folder' / 'modcl_index.json').read_bytes() == index


def test_save_task_refuses_an_infinite_modulator(tmp_path):
    model = _model()
    k = next(k for k in model.modcl_tasks['t'].tensors() if k.startswith('modulator.'))
    with torch.no_grad():
        model.modcl_tasks['t'].tensors()[k].view(-1)[0] = float('inf')
    with pytest.raises(AdapterError):
        model.save_task('t', tmp_path / 't.safetensors')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('epoch', [1, 2])
def test_nan_loss_ends_with_a_typed_error_and_puts_the_task_back(epoch, tmp_path):
    """An image that makes the loss NaN in epoch ``epoch``: NonFiniteLossError, the task (BN statistics included) as the failing epoch
    found it, the checkpoint of the last good epoch untouched, no NaN anywhere, the random states as before."""
    data = _data()
    ck = tmp_path / 'ck.safetensors'
    model = _model()
    before = _snapshot(model)
    poisoned = _Reads(data, after=14 * (epoch - 1) + 5, then='nan')  # a NaN image in the 2nd batch
    with pytest.raises(NonFiniteLossError, match=f'epoch {epoch}'):
        train_task(model, 't', poisoned, checkpoint=ck, **dict(ARGS, prototypes=False, recalibrate_bn=False))
    if epoch == 1:
        assert not ck.exists()
        assert _changes(model, before) == []
    else:
        assert checkpoint_info(ck)['epoch'] == 1
        want = {k[len('task.'):]: v for k, v in _load(ck.read_bytes(), 'ck')[0].items() if k.startswith('task.')}
        got = model.modcl_tasks['t'].tensors(stats=False)
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(v, got[k]), k  # as epoch 2 began: epoch 1's checkpoint
        assert model.active_task == 'other' and _same_rng(_rng_states(), before[3])
    assert all(torch.isfinite(v).all() for v in model.modcl_tasks['t'].tensors().values() if v.is_floating_point())
    assert all(torch.equal(v, model.modcl_tasks['other'].tensors()[k]) for k, v in before[0]['other'].items())


def test_typed_nan_error_is_still_a_task_error():
    assert issubclass(NonFiniteLossError, TaskError) and issubclass(NonFiniteLossError, ModCLError)


# ------------------------------------------------------------------------------------------ item 9: global state
class _Stream(IterableDataset):
    def __iter__(self):
        yield from _data()


class _BadLabels(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(3, SIZE, SIZE), 7  # the task has 2 classes


RNG_ERRORS = {
    'iterable_dataset': (dict(train_data=_Stream()), DataError),
    'empty_dataset': (dict(train_data=TensorDataset(torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0).long())),
                      DataError),
    'batch_size_zero': (dict(batch_size=0), DataError),
    'not_a_dataset': (dict(train_data=[1, 2, 3]), DataError),
    'val_not_a_dataset': (dict(val_data='x'), DataError),
    'unknown_optimizer': (dict(opt='no_such_optimizer'), TaskError),
    'labels_out_of_range': (dict(train_data=_BadLabels()), DataError),
    'checkpoint_folder': (dict(checkpoint='FOLDER'), CheckpointError),
    'hostile_checkpoint': (dict(checkpoint='HOSTILE', resume=True), CheckpointError),
    'nan_loss': (dict(train_data=_Reads(_data(), after=5, then='nan')), NonFiniteLossError),
    'bad_lr': (dict(lr='x'), TaskError),
}


@pytest.mark.parametrize('case', sorted(RNG_ERRORS))
def test_typed_errors_of_train_task_leave_the_global_random_states(case, unfinished, tmp_path):
    kw, error = RNG_ERRORS[case]
    kw = dict(kw)
    if kw.get('checkpoint') == 'FOLDER':
        kw['checkpoint'] = tmp_path
    elif kw.get('checkpoint') == 'HOSTILE':
        tensors, state, meta = _parts(unfinished)
        HOSTILE['scheduler_optimizer_key'](tensors, state)
        kw['checkpoint'] = tmp_path / 'hostile.safetensors'
        kw['checkpoint'].write_bytes(_build(tensors, state, meta))
    args = dict(ARGS, seed=123, train_data=_data())
    args.update(kw)
    model = _model()
    torch.manual_seed(77)
    random.seed(78)
    np.random.seed(79)
    before = _rng_states()
    with pytest.raises(error):
        train_task(model, 't', **args)
    assert _same_rng(_rng_states(), before)
    assert model.active_task == 'other'


def test_an_iterable_dataset_is_refused_with_a_typed_error_before_anything_changes():
    model = _model()
    before = _snapshot(model)
    with pytest.raises(DataError, match='IterableDataset'):
        train_task(model, 't', _Stream(), **ARGS)
    assert _changes(model, before) == []


# ------------------------------------------------------------------------------------------ item 10: CLI resume
def _main(args):
    from timm_modcl.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def _image_folder(root):
    rng = np.random.default_rng(0)
    for c, colour in (('red', (220, 40, 40)), ('blue', (40, 40, 220))):
        (root / c).mkdir(parents=True)
        for i in range(5):
            a = (np.array(colour)[None, None] + rng.integers(-40, 40, (20, 20, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f'{i}.png')
    return root


@pytest.mark.timeout(300)
def test_modcl_train_resume_of_a_finished_run_says_so_and_exits_0(tmp_path):
    """A kill after the adapter was saved (before or after its history): the documented ``--resume`` rerun says
    the run is finished, exits 0, changes no adapter and writes a missing history."""
    from timm_modcl import cli
    model = cli._create('modcl_mobilenetv2_050')
    model.add_task('first', 3)
    model.save_tasks(tmp_path / 'out')
    ck = tmp_path / 'second.ckpt.safetensors'
    run = ['train', '--task', 'second', '--epochs', '1', '--data', _image_folder(tmp_path / 'data'),
           '--input-size', '20', '--batch-size', '4', '--no-progress', '--out', tmp_path / 'out', '--checkpoint', ck]
    code, out = _main(run)
    assert code == 0, out
    adapter = tmp_path / 'out' / 'second' / 'adapter_model.safetensors'
    saved, history = adapter.read_bytes(), (tmp_path / 'out' / 'second' / 'train_history.json').read_bytes()

    code, out = _main(run + ['--resume'])
    assert code == 0, out
    assert 'finished' in out and 'already' in out
    assert adapter.read_bytes() == saved
    (tmp_path / 'out' / 'second' / 'train_history.json').unlink()  # the kill landed between adapter and history
    code, out = _main(run + ['--resume'])
    assert code == 0, out
    assert (tmp_path / 'out' / 'second' / 'train_history.json').read_bytes() == history
    assert adapter.read_bytes() == saved

    # not this run's adapter (another training under that name): still "already exists"
    code, out = _main(run[:run.index('--checkpoint')] + ['--checkpoint', tmp_path / 'other.ckpt', '--resume'])
    assert code == 2 and 'already exists' in out
    tensors, state, meta = _parts(ck.read_bytes())
    k = sorted(k for k in tensors if k.startswith('task.modulator.'))[0]
    tensors[k] = tensors[k] + 1
    ck.write_bytes(_build(tensors, state, meta))
    code, out = _main(run + ['--resume'])
    assert code == 2 and 'already exists' in out
    assert adapter.read_bytes() == saved


# ---------------------------------------------------------------------------- training data: images that fail to decode
def test_image_that_fails_to_decode_is_named(tmp_path):
    from timm_modcl.data import image_folder_datasets
    for c in 'ab':
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray((np.random.rand(64, 64, 3) * 255).astype('uint8')).save(tmp_path / c / f'{i}.jpg')
    broken = tmp_path / 'a' / '1.jpg'
    broken.write_bytes(broken.read_bytes()[:-200])  # truncated at the end: passes PIL's up-front verify()
    data = image_folder_datasets(tmp_path, input_size=16, val_fraction=0)
    with pytest.warns(UserWarning, match=f'cannot decode image {broken}.*truncated'):
        items = [data.train[i] for i in range(len(data.train))]
    assert data.train.decode_failures == [str(broken)] and len(items) == 6


# ------------------------------------------------------------------------------------------ fuzz
_VALUES = [None, True, False, 0, -1, 1, 2, 99, 10 ** 12, -(10 ** 12), 0.5, -0.5, 1e30, -1e30, float('nan'),
           float('inf'), float('-inf'), '', 'x', 'abc', [], [1], [float('nan')], {}, {'a': 1}, {'__tuple__': [1]},
           {'__tuple__': 'x'}]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(tensors, state, rng):
    kind = rng.randrange(4)
    if kind <= 1:  # a value of the JSON state (not the huge random states, which are tensors anyway)
        paths = [p for p, _ in _paths(state) if p and p[0] not in ('run', 'task_meta')]
        path = rng.choice(paths)
        parent = state
        for k in path[:-1]:
            parent = parent[k]
        if kind == 0 or isinstance(parent, list) and rng.random() < 0.5:
            parent[path[-1]] = rng.choice(_VALUES)
        else:
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
    elif kind == 2:  # the values of a tensor
        k = rng.choice([k for k in tensors if not k.startswith('rng.')])
        v = tensors[k].clone()
        value = rng.choice([float('nan'), float('inf'), -1.0, -1e30, 1e30, 2e6, 0.5, 3.0])
        if v.is_floating_point() and v.numel():
            v.view(-1)[rng.randrange(v.numel())] = value
        elif v.numel():
            v.view(-1)[rng.randrange(v.numel())] = rng.choice([-1, 10 ** 12, 0])
        tensors[k] = v if rng.random() < 0.8 else v.reshape(-1)[:1].reshape(())
    else:  # a random state
        which = rng.choice(['numpy', 'python', 'torch'])
        if which == 'torch':
            tensors['rng.0'] = _rng_blob(tensors, tensor_update={'torch': torch.randint(
                0, 255, (rng.choice([10, 5056]),), dtype=torch.uint8)})
        else:
            _, rm = _load(tensors['rng.0'].numpy().tobytes(), 'rng')
            value = json.loads(rm[which])
            for p, v in list(_paths(value))[1:]:
                if rng.random() < 0.01 or not isinstance(v, (list, dict)) and rng.random() < 0.002:
                    parent = value
                    for k in p[:-1]:
                        parent = parent[k]
                    parent[p[-1]] = rng.choice(_VALUES)
                    break
            else:
                value = rng.choice(_VALUES)
            tensors['rng.0'] = _rng_blob(tensors, meta_update={which: json.dumps(value)})


def _quick_build(header, body, tensors0, tensors, state, meta):
    """``_build`` without serialising every tensor again: the header is rewritten, and tensors changed in their
    values only are patched in place (the fuzz's time goes to train_task, not to writing files)."""
    changed = [k for k in tensors if tensors[k] is not tensors0.get(k)]
    if set(tensors) != set(tensors0) or any(tensors[k].shape != tensors0[k].shape
                                            or tensors[k].dtype != tensors0[k].dtype for k in changed):
        return _build(tensors, state, meta)
    body = bytearray(body)
    for k in changed:
        start, end = header[k]['data_offsets']
        body[start:end] = tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    h = dict(header, __metadata__=dict(meta, state=json.dumps(state)))
    text = json.dumps(h).encode()
    text += b' ' * (-len(text) % 8)
    return len(text).to_bytes(8, 'little') + text + bytes(body)


@pytest.mark.timeout(600)
def test_fuzz_hundreds_of_checkpoints_mutated_in_their_values(tmp_path):
    """300 checkpoints with one value changed (a JSON state value: NaN, negative, another type, deleted; a tensor
    value: NaN, Inf, huge, negative, a scalar; a random state): each resumes, or raises a ModCLError leaving
    everything as it was; a resumed task is finite."""
    good = _unfinished(tmp_path, 4)  # 4 samples: 1 batch per epoch
    tensors0, state0, meta = _parts(good)
    header_len = int.from_bytes(good[:8], 'little')
    header, body = json.loads(good[8:8 + header_len]), good[8 + header_len:]
    rng = random.Random(0)
    counts = {'resumed': 0, 'refused': 0, 'unwritable': 0}
    foreign = []
    path = tmp_path / 'fuzzed.safetensors'
    model = _model()
    pristine = {k: v.detach().clone() for k, v in model.modcl_tasks['t'].tensors().items()}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for i in range(300):
            tensors, state = dict(tensors0), json.loads(json.dumps(state0))
            _mutate(tensors, state, rng)
            try:
                path.write_bytes(_quick_build(header, body, tensors0, tensors, state, meta))
            except Exception:  # noqa: BLE001 - a mutation safetensors cannot even write
                counts['unwritable'] += 1
                continue
            before = _snapshot(model, TASKS)
            try:
                train_task(model, 't', _data(4), checkpoint=path, resume=True,
                           **dict(ARGS, prototypes=False, recalibrate_bn=False))
            except ModCLError as e:
                counts['refused'] += 1
                changed = _changes(model, before)
                if changed:
                    foreign.append((i, f'state changed: {changed} ({type(e).__name__}: {str(e)[:300]})'))
            except Exception as e:  # noqa: BLE001 - what the test counts
                foreign.append((i, f'{type(e).__name__}: {e}'[:200]))
            else:
                counts['resumed'] += 1
                bad = [k for k, v in model.modcl_tasks['t'].tensors().items() if v.is_floating_point()
                       and not torch.isfinite(v).all()]
                if bad:
                    foreign.append((i, f'resumed into non-finite {bad[:3]}'))
                with torch.no_grad():  # the next case starts from the same model (cheaper than a new one)
                    for k, v in model.modcl_tasks['t'].tensors().items():
                        v.copy_(pristine[k])
                model.set_task('other')
    elapsed = time.perf_counter() - t0
    print(f'checkpoint fuzz: {counts}, {len(foreign)} foreign errors or state changes, {elapsed:.1f} s')
    assert not foreign, foreign[:5]
    assert counts['refused'] > 150
