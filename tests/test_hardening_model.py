"""Hardening 3 (issue 20), the model / statistics / input component: ``modulate``'s head and wrapper checks (item 7),
prototype statistics validated at load and skipped when unusable at predict time, non-finite inputs (item 8), the
global random states on the evaluation error paths (item 9) and the last untyped errors (item 10). Also the model
findings of the first hardening review: task heads, pooling and resolutions (``add_task``, ``reset_classifier``),
batches of one and inputs of another dtype. Every bad input gets a typed ``ModCLError`` and leaves the model, its files
and the global random states as they were."""
import contextlib
import io
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader, TensorDataset

import timm
import timm_modcl
from timm_modcl import (
    AdapterError, AdapterFormatError, InputError, ModCLError, StateDictError, StatisticsError, TaskError,
    UnsupportedModelError, compute_task_statistics, evaluate,
)
from timm_modcl.adapter import adapter_bytes, read_adapter
from timm_modcl.serving import PROTOTYPE_STATS
from _hardening import assert_same_state as _assert_same, model_state as _state_and_rng

SIZE = 32


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('modcl_mobilenetv2_050').eval()


def _x(n=4, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _state(model):
    """Cheap fingerprint of everything a failed call must leave alone."""
    tensors = [t for task in model.modcl_tasks.values() for t in task.tensors().values()]
    tensors += list(model.frozen_tensors().values())
    return (list(model.tasks), model.active_task, [m.training for m in model.modules()],
            [(id(t), t._version) for t in tensors])


def _rng():
    return torch.random.get_rng_state(), np.random.get_state(), random.getstate()


def _assert_rng(before):
    now = _rng()
    assert torch.equal(now[0], before[0]), 'the torch random state moved'
    assert now[1][0] == before[1][0] and np.array_equal(now[1][1], before[1][1]) and now[1][2:] == before[1][2:], \
        'the NumPy random state moved'
    assert now[2] == before[2], 'the Python random state moved'


def _data(num_classes, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % num_classes


@pytest.fixture(scope='module')
def served():
    """A model with two small tasks, both with prototype statistics, and t1's adapter bytes."""
    model = _model()
    for i, (name, k) in enumerate((('t1', 3), ('t2', 2))):
        model.add_task(name, k, (8, 8))
        compute_task_statistics(model, name, _data(k, seed=i))
    return model, adapter_bytes(model, 't1')


# ---------------------------------------------------------------- item 7: modulate's head and wrappers
@pytest.mark.parametrize('name, head, kwargs', [
    ('mobilenetv2_050', 'conv_head', {}),                 # the Conv2d before the pooling: 0.2 accepted it
    ('mobilenetv2_050', 'blocks.6.0.conv_pwl', {}),
    ('resnet18', 'layer4.1.conv2', {}),
    ('vit_tiny_patch16_224', 'blocks.11.mlp.fc2', dict(img_size=SIZE)),  # a Linear, but not the classifier
    ('convnext_atto', 'head.norm', {}),
])
def test_modulate_refuses_a_head_that_is_not_the_classifier(name, head, kwargs):
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    trainable = [n for n, p in plain.named_parameters() if p.requires_grad]
    with pytest.raises(UnsupportedModelError, match="not the model's classifier"):
        timm_modcl.modulate(plain, head=head)
    assert type(plain).__module__.startswith('timm.') and not hasattr(plain, '_modcl')
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == trainable
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize('head', ['auto', 'classifier', None])
def test_modulate_accepted_heads_never_change_base(head):
    """The forgetting 0.2 allowed with head='conv_head', checked for every head option that is accepted."""
    torch.manual_seed(0)
    plain = timm.create_model('mobilenetv2_050').eval()
    x = _x(2)
    with torch.no_grad():
        expected = plain(x)
    model = timm_modcl.modulate(plain, head=head)
    model.add_task('t', 0 if head is None else 3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad(), model.use_task('base'):
        assert torch.equal(model(x), expected)
    with torch.no_grad():
        assert not torch.equal(model(x), expected) if head is None else model(x).shape == (2, 3)


def test_modulate_refuses_compiled_and_scripted_models():
    torch.manual_seed(0)
    plain = timm.create_model('mobilenetv2_050').eval()
    compiled = torch.compile(plain, backend='eager')
    with pytest.raises(UnsupportedModelError, match='modulate the plain model first'):
        timm_modcl.modulate(compiled)
    assert not hasattr(plain, '_modcl') and not hasattr(compiled, '_modcl')
    assert type(compiled).__name__ == 'OptimizedModule'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(timm.create_model('resnet18').eval())
    with pytest.raises(UnsupportedModelError, match='modulate the plain model first'):
        timm_modcl.modulate(scripted)
    with pytest.raises(UnsupportedModelError, match='head must be'):
        timm_modcl.modulate(timm.create_model('resnet18'), head=3)
    # the plain model still modulates after the refusals
    assert timm_modcl.is_modcl_model(timm_modcl.modulate(plain))


# ---------------------------------------------------------------- task heads, pooling and resolutions
def test_huge_num_classes_and_resolutions_that_modulate_nothing():
    model = _model()
    before = _state_and_rng(model)
    with pytest.raises(TaskError, match='num_classes'):
        model.add_task('h', 10 ** 9)
    with pytest.raises(timm_modcl.ResolutionError, match='leaves every layer unmodulated'):
        model.add_task('r', 3, (1000, 1000))
    _assert_same(model, before)
    info = model.add_task('none', 3, None)  # explicitly no modulators: norm state and head only
    assert info.num_modulator_params == 0 and info.resolution is None


def test_reset_classifier_checks_num_classes_and_keeps_shared_pooling():
    model = _model()
    for bad in ('x', 2.5, -1, True):
        with pytest.raises(TaskError, match='num_classes'):
            model.reset_classifier(bad)
    assert model.num_classes == 1000
    model.add_task('a', 3)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.use_task('base'):
        base = model(x)
    with pytest.raises(TaskError, match='pooling of every task'):
        model.reset_classifier(5, global_pool='max')
    model.reset_classifier(5)  # the active task's head, pooling as it was
    assert model.modcl_tasks['a'].num_classes == 5
    with torch.no_grad(), model.use_task('base'):
        assert torch.equal(model(x), base)


def test_adding_a_task_keeps_hooks_on_the_pooling():
    model = _model()
    calls = []
    model.global_pool.register_forward_hook(lambda *a: calls.append(1))
    pool = model.global_pool
    model.add_task('a', 3)
    assert model.global_pool is pool
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_a_layer_resolution_callable_is_applied_to_every_layer():
    model = _model()
    model.add_task('a', 3, layer_resolution=lambda name, shape: (4, 4))
    config = model.modcl_tasks['a'].config
    assert {config.layer(n) for n in model.modulated_layers} == {(4, 4)}


# ---------------------------------------------------------------- item 8: prototype statistics at load
def _rewrite(data, stats=None, drop=(), tensors=None):
    meta, ts = read_adapter(data)
    ts = dict(ts)
    for k in drop:
        ts.pop(f'stats.{k}')
    ts.update({f'stats.{k}': v.contiguous() for k, v in (stats or {}).items()})
    ts.update(tensors or {})
    return st_save(ts, metadata=meta)


def _hostile_stats(s):
    """(label, replaced stats, dropped stats) of statistics that must be refused, from a task's valid ``s``."""
    mean, prior, basis = s['proto_mean'], s['proto_prior'], s['proto_basis']
    log_scale, log_noise, power = s['proto_log_scale'], s['proto_log_noise'], s['proto_power']
    c = mean.shape[0]
    k = basis.shape[1]
    out = [(f'missing {name}', {}, (name,)) for name in PROTOTYPE_STATS]            # 6
    out += [
        ('unknown proto_ name', {'proto_extra': torch.zeros(3)}, ()),
        ('mean rank 1', {'proto_mean': mean.flatten()}, ()),
        ('mean rank 3', {'proto_mean': mean[None]}, ()),
        ('no classes', {'proto_mean': mean[:0], 'proto_prior': prior[:0]}, ()),
        ('feature size +1, consistent', {'proto_mean': torch.cat([mean, mean[:, :1]], 1),
                                         'proto_basis': torch.cat([basis, torch.zeros(1, k)]),
                                         'proto_log_noise': torch.cat([log_noise, log_noise[:1]])}, ()),
        ('feature size 8, consistent', {'proto_mean': mean[:, :8], 'proto_basis': torch.zeros(8, 0),
                                        'proto_log_scale': torch.zeros(0), 'proto_log_noise': log_noise[:8]}, ()),
        ('one class more', {'proto_mean': torch.cat([mean, mean[:1]]),
                            'proto_prior': torch.full((c + 1,), 1 / (c + 1))}, ()),
        ('one class less', {'proto_mean': mean[:-1], 'proto_prior': torch.full((c - 1,), 1 / (c - 1))}, ()),
        ('prior length', {'proto_prior': prior[:-1]}, ()),
        ('prior 2-D', {'proto_prior': prior[None]}, ()),
        ('prior negative', {'proto_prior': torch.tensor([1.5, -0.5] + [0.0] * (c - 2))}, ()),
        ('prior zero', {'proto_prior': torch.zeros(c)}, ()),
        ('prior not summing to 1', {'proto_prior': torch.full((c,), 0.9)}, ()),
        ('prior 1e30', {'proto_prior': torch.full((c,), 1e30)}, ()),
        ('basis 1-D', {'proto_basis': basis.flatten()}, ()),
        ('basis rows', {'proto_basis': basis[:-1]}, ()),
        ('basis columns vs log_scale', {'proto_basis': basis[:, :-1]}, ()),
        ('basis 1e30', {'proto_basis': basis * 1e30}, ()),
        ('basis not unit', {'proto_basis': basis * 3}, ()),
        ('log_scale length', {'proto_log_scale': log_scale[:-1]}, ()),
        ('log_scale 1e30', {'proto_log_scale': torch.full_like(log_scale, 1e30)}, ()),
        ('log_scale -1e30', {'proto_log_scale': torch.full_like(log_scale, -1e30)}, ()),
        ('log_noise length', {'proto_log_noise': log_noise[:-1]}, ()),
        ('log_noise 2-D', {'proto_log_noise': log_noise[None]}, ()),
        ('log_noise 1e30', {'proto_log_noise': torch.full_like(log_noise, 1e30)}, ()),
        ('log_noise -1e30', {'proto_log_noise': torch.full_like(log_noise, -1e30)}, ()),
        ('log_noise -1000', {'proto_log_noise': torch.full_like(log_noise, -1000.0)}, ()),
        ('power 0', {'proto_power': torch.tensor(0.0)}, ()),
        ('power -1', {'proto_power': torch.tensor(-1.0)}, ()),
        ('power 5', {'proto_power': torch.tensor(5.0)}, ()),
        ('power 1-D', {'proto_power': power[None]}, ()),
        ('power NaN', {'proto_power': torch.tensor(float('nan'))}, ()),
        ('mean Inf', {'proto_mean': mean.clone().fill_(float('inf'))}, ()),
        ('mean 1e30', {'proto_mean': mean * 0 + 1e30}, ()),
        ('mean 3e38', {'proto_mean': torch.full_like(mean, 3e38)}, ()),
        ('log_noise -Inf', {'proto_log_noise': torch.full_like(log_noise, -float('inf'))}, ()),
        ('mean int64', {'proto_mean': mean.to(torch.int64)}, ()),
        ('power int32', {'proto_power': torch.tensor(1, dtype=torch.int32)}, ()),
        ('prior bool', {'proto_prior': torch.ones(c, dtype=torch.bool)}, ()),
        ('float64 log_scale 1e300', {'proto_log_scale': torch.full((k,), 1e300, dtype=torch.float64)}, ()),
        ('basis of zero vectors', {'proto_basis': torch.zeros_like(basis)}, ()),
        ('log_noise just beyond the bound', {'proto_log_noise': torch.full_like(log_noise, -80.5)}, ()),
        ('mean NaN', {'proto_mean': mean.clone().fill_(float('nan'))}, ()),
    ]
    return out


def test_hostile_statistics_are_refused_at_load(served):
    model, data = served
    good = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    variants = _hostile_stats(good)
    assert len(variants) >= 37
    victim = _model()
    victim.load_task(adapter_bytes(model, 't2'))
    before = _state(victim)
    refused = []
    for label, rep, drop in variants:
        bad = _rewrite(data, rep, drop)
        with pytest.raises(ModCLError) as info:
            victim.load_task(bad)
        assert isinstance(info.value, AdapterFormatError), (label, info.value)
        assert 'statistic' in str(info.value) or 'stats.' in str(info.value), (label, str(info.value))
        assert _state(victim) == before, label
        refused.append(label)
    assert len(refused) == len(variants)
    # the good file still loads, and both tasks are predicted
    victim.load_task(data)
    pred = victim.predict_task_agnostic(_x())
    assert set(pred.candidates) == {'t1', 't2'} and torch.isfinite(pred.task_scores).all()


def test_hostile_statistics_are_refused_in_state_dicts(served):
    model, _ = served
    good = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    fresh = _model(seed=1)
    before = _state(fresh)
    count = 0
    for label, rep, drop in _hostile_stats(good):
        sd = model.state_dict()
        for k in drop:
            sd.pop(f'modcl_tasks.t1.stats.{k}')
        sd.update({f'modcl_tasks.t1.stats.{k}': v for k, v in rep.items()})
        with pytest.raises(StateDictError):
            fresh.load_state_dict(sd)
        assert _state(fresh) == before, label
        count += 1
    fresh.load_state_dict(model.state_dict())
    assert list(fresh.tasks) == ['base', 't1', 't2']
    assert count >= 37


def test_statistics_fuzz(served):
    """Randomly mutated ``stats.*`` tensors of an adapter file: no untyped error, no state change on refusal, and
    the other task is still predicted whether the mutant was refused or accepted."""
    model, data = served
    good = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    victim = _model()
    victim.load_task(adapter_bytes(model, 't2'))
    rng = random.Random(0)
    x = _x()
    extremes = [float('nan'), float('inf'), -float('inf'), 0.0, -1.0, 1e38, -1e38, 1e-45, 1e6, -80.5, 4.5]
    counts = {'refused': 0, 'accepted': 0}
    for i in range(300):
        stats = {k: v.clone() for k, v in good.items()}
        key = rng.choice(list(PROTOTYPE_STATS))
        t = stats[key]
        op = rng.randrange(9)
        if op == 0 and t.numel():
            t.view(-1)[rng.randrange(t.numel())] = rng.choice(extremes)
        elif op == 1:
            stats[key] = t * 10.0 ** rng.randint(-40, 40)
        elif op == 2:
            stats[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8]))
        elif op == 3 and t.ndim:
            dim = rng.randrange(t.ndim)
            stats[key] = t.narrow(dim, 0, rng.randrange(t.shape[dim] + 1)).clone()
        elif op == 4 and t.ndim:
            stats[key] = torch.cat([t, t], rng.randrange(t.ndim))
        elif op == 5:
            stats[key] = t.reshape(-1) if t.ndim != 1 else t[None]
        elif op == 6:
            del stats[key]
        elif op == 7:
            stats[key] = torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * rng.choice([1, 100])
        else:
            stats[key] = -t
        bad = _rewrite(data, drop=PROTOTYPE_STATS, stats=stats)
        before = _state(victim)
        try:
            victim.load_task(bad, name='f')
        except ModCLError:
            counts['refused'] += 1
            assert _state(victim) == before, (i, key, op)
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f'mutant {i} ({key}, op {op}): untyped {type(e).__name__}: {e}')
        else:
            counts['accepted'] += 1
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                pred = victim.predict_task_agnostic(x)
            assert 't2' in pred.candidates and torch.isfinite(pred.task_scores[:, pred.candidates.index('t2')]).all()
            victim.remove_task('f')
    assert counts['refused'] > 150 and counts['accepted'] > 10, counts


def test_unusable_statistics_are_skipped_at_predict_time(served):
    """Statistics broken after loading (here, by hand) skip that task with a warning; the others are predicted."""
    model, data = served
    fresh = _model()
    fresh.load_task(data)
    fresh.load_task(adapter_bytes(model, 't2'))
    x = _x()
    ref = fresh.predict_task_agnostic(x, tasks=['t2'])
    for breakage in ({'proto_power': torch.tensor(-1.0)}, {'proto_mean': torch.zeros(3, 7)},
                     {'proto_log_noise': torch.full((1280,), -1e30)}):
        fresh.modcl_tasks['t1'].stats.update(breakage)
        before = _state(fresh)
        with pytest.warns(RuntimeWarning, match="task 't1'.*skipped"):
            pred = fresh.predict_task_agnostic(x)
        assert pred.candidates == ('t2',) and pred.tasks == ['t2'] * 4
        assert torch.equal(pred.task_scores, ref.task_scores)
        assert _state(fresh) == before
        with pytest.raises(StatisticsError, match='no candidate task has usable'):
            fresh.predict_task_agnostic(x, tasks=['t1'])
        fresh.modcl_tasks['t1'].stats.update({k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()})
    del fresh.modcl_tasks['t1'].stats['proto_mean']  # missing (not broken) statistics: still a clear error, as documented
    with pytest.raises(StatisticsError, match='no prototype statistics'):
        fresh.predict_task_agnostic(x)


def test_compute_task_statistics_never_stores_statistics_that_would_not_load(served, monkeypatch):
    """A degenerate fit (here forced: scales beyond the bounds) is a DataError, and the task keeps its statistics."""
    from timm_modcl import DataError
    from timm_modcl.serving import prototypes
    model, _ = served
    finish = prototypes._Moments.finish

    def degenerate(self, *args):
        out = finish(self, *args)
        out['proto_log_noise'] = out['proto_log_noise'] - 200.0
        return out

    monkeypatch.setattr(prototypes._Moments, 'finish', degenerate)
    saved = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    rng = _rng()
    with pytest.raises(DataError, match='unusable prototype statistics'):
        compute_task_statistics(model, 't1', _data(3))
    _assert_rng(rng)
    assert all(torch.equal(v, model.modcl_tasks['t1'].stats[k]) for k, v in saved.items())


# ---------------------------------------------------------------- item 8: non-finite input
@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_images_get_an_input_error_everywhere(served, value):
    model, _ = served
    x = _x()
    x[1, 2, 3, 4] = value
    before = _state(model)
    calls = {
        'forward (eval)': lambda: model(x),
        'forward_tasks': lambda: model.forward_tasks(x, ['t1', 't2', 't1', 't2']),
        'predict_task_agnostic': lambda: model.predict_task_agnostic(x),
        'predict_task_agnostic energy': lambda: model.predict_task_agnostic(x, scorer='energy'),
        'prototype_features': lambda: model.prototype_features(x),
        'evaluate': lambda: evaluate(model, TensorDataset(x, torch.tensor([0, 1, 2, 0])), 't1'),
        'compute_task_statistics': lambda: compute_task_statistics(model, 't1', (x, torch.tensor([0, 1, 2, 0]))),
        'predict': lambda: timm_modcl.train.predict(model, x, 't1'),
    }
    stats = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    for label, call in calls.items():
        rng = _rng()
        with pytest.raises(InputError, match='NaN or Inf'):
            call()
        assert _state(model) == before, label
        _assert_rng(rng)
    assert all(torch.equal(v, model.modcl_tasks['t1'].stats[k]) for k, v in stats.items())


def test_the_finite_check_is_exact_when_a_sum_would_overflow():
    """The input check sums the batch (fast) and only then runs the exact test: huge but finite values are accepted,
    +Inf and -Inf together (their sum is NaN) and a NaN in half precision are refused."""
    from timm_modcl.layers.inputs import _all_finite
    assert _all_finite(torch.full((2, 3, 4, 4), 3e38))            # its sum overflows to inf; every value is finite
    assert _all_finite(torch.full((64, 3, 8, 8), 60000.0, dtype=torch.float16))   # a float16 sum would overflow
    both = torch.zeros(2, 3, 4, 4)
    both[0, 0, 0, 0], both[1, 0, 0, 0] = float('inf'), -float('inf')
    assert not _all_finite(both)
    half = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    half[1, 2, 3, 3] = float('nan')
    assert not _all_finite(half)
    assert not _all_finite(torch.tensor([float('inf')], dtype=torch.float64))


def test_nan_batch_in_train_mode_leaves_the_bn_statistics():
    model = _model()
    model.add_task('t', 3)
    model.train()
    bn = {n: {k: v.clone() for k, v in s.items()} for n, s in model.modcl_tasks['t'].norm_stats.items()}
    x = _x()
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(InputError, match='NaN or Inf'):
        model(x)
    for n, s in model.modcl_tasks['t'].norm_stats.items():
        for k, v in s.items():
            assert torch.equal(v, bn[n][k]), (n, k)
    assert model.training
    model(_x())  # a finite batch still trains the statistics
    assert not torch.equal(next(iter(model.modcl_tasks['t'].norm_stats.values()))['running_mean'],
                           next(iter(bn.values()))['running_mean'])


# ---------------------------------------------------------------- input: batches of one and other dtypes
def test_single_sample_batch_in_train_mode_changes_nothing():
    model = _model()
    model.add_task('b', 3)
    model.train()
    x = torch.randn(1, 3, 32, 32)
    before = _state_and_rng(model)
    stats = {k: v.clone() for k, v in model.modcl_tasks['b'].tensors().items() if k.startswith('bn.')}
    with pytest.raises(InputError, match='batch of 1'):
        model(x)
    assert all(torch.equal(v, model.modcl_tasks['b'].tensors()[k]) for k, v in stats.items())
    _assert_same(model, before)
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64])
def test_input_of_another_dtype(dtype):
    model = _model()
    x = torch.randn(2, 3, 32, 32).to(dtype)
    with pytest.raises(InputError, match='float32|floating-point'):
        model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # mixed precision stays allowed
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


# ---------------------------------------------------------------- item 9: random states on the evaluation error paths
def test_evaluation_errors_leave_every_random_state(served, tmp_path):
    model, _ = served
    bad_labels = (_x(), torch.tensor([0, 1, 2, 7]))
    cases = {
        'evaluate, labels out of range': lambda: evaluate(model, TensorDataset(*bad_labels), 't1'),
        'evaluate, float labels': lambda: evaluate(model, TensorDataset(_x(), torch.zeros(4)), 't1'),
        'evaluate, a shuffling DataLoader': lambda: evaluate(
            model, DataLoader(TensorDataset(*bad_labels), shuffle=True), 't1'),
        'compute_task_statistics, labels': lambda: compute_task_statistics(model, 't1', bad_labels),
        'create_model, missing adapters': lambda: timm.create_model('modcl_mobilenetv2_050',
                                                                    adapters=tmp_path / 'missing'),
        'create_model, adapters=3': lambda: timm.create_model('modcl_mobilenetv2_050', adapters=3),
        'create_model, empty folder': lambda: timm.create_model('modcl_mobilenetv2_050', adapters=tmp_path),
    }
    stats = {k: v.clone() for k, v in model.modcl_tasks['t1'].stats.items()}
    before = _state(model)
    for label, call in cases.items():
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        rng = _rng()
        with pytest.raises(ModCLError):
            call()
        _assert_rng(rng)
        assert _state(model) == before, label
    assert all(torch.equal(v, model.modcl_tasks['t1'].stats[k]) for k, v in stats.items())


# ---------------------------------------------------------------- item 10: the last untyped errors
def test_load_task_of_no_path_is_typed(served):
    model, _ = served
    before = _state(model)
    for source in (None, 123, 1.5, object(), ['a.safetensors']):
        with pytest.raises(AdapterError, match='file path or the bytes'):
            model.load_task(source)
        assert _state(model) == before


@pytest.mark.parametrize('shape', [(2, 3, 0, 0), (2, 3, 0, SIZE), (2, 3, SIZE, 0)])
def test_empty_images_are_input_errors(served, shape):
    model, _ = served
    before = _state(model)
    x = torch.zeros(shape)
    for call in (lambda: model(x), lambda: model.forward_tasks(x, ['t1', 't2']),
                 lambda: model.predict_task_agnostic(x), lambda: model.prototype_features(x)):
        with pytest.raises(InputError, match='empty dimension'):
            call()
        assert _state(model) == before


def test_meta_inputs_are_input_errors(served):
    model, _ = served
    x = torch.empty(2, 3, SIZE, SIZE, device='meta')
    before = _state(model)
    for call in (lambda: model(x), lambda: model.forward_tasks(x, ['t1', 't2']),
                 lambda: model.predict_task_agnostic(x)):
        with pytest.raises(InputError, match='meta'):
            call()
        assert _state(model) == before


def test_nested_task_lists_are_typed(served):
    model, _ = served
    x = _x(1)
    before = _state(model)
    for call in (lambda: model.forward_tasks(x, [['t1']]),
                 lambda: model.predict_task_agnostic(x, tasks=[['t1']]),
                 lambda: model.predict_task_agnostic(x, scorer='energy', tasks=[{'t1': 1}]),
                 lambda: model.predict_task_agnostic(x, tasks=['t1', None])):
        with pytest.raises(TaskError):
            call()
        assert _state(model) == before


def test_cli_predict_a_folder(served, tmp_path):
    from PIL import Image

    from timm_modcl.cli import main
    model, _ = served
    out = tmp_path / 'adapters'
    model.save_tasks(out)
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ('b.png', 'a.jpg', 'c.PNG'):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(photos / name)
    (photos / 'notes.txt').write_text('not an image')
    (photos / 'sub').mkdir()

    def run(*argv):
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main([str(a) for a in argv])
        return rc, o.getvalue(), e.getvalue()

    rc, o, e = run('predict', photos, '--out', out, '--task', 't1', '--topk', '1')
    assert rc == 0, e
    headers = [line for line in o.splitlines() if not line.startswith(' ')]
    assert headers == ['a.jpg (t1):', 'b.png (t1):', 'c.PNG (t1):']
    rc, o, e = run('predict', photos, photos / 'a.jpg', '--out', out, '--topk', '1')   # task chosen per image
    assert rc == 0, e
    assert [h.split()[0] for h in o.splitlines() if not h.startswith(' ')] == ['a.jpg', 'b.png', 'c.PNG', 'a.jpg']
    rc, o, e = run('predict', photos / 'sub', '--out', out, '--task', 't1')
    assert rc == 2 and 'folder without image files' in e and len(e.strip().splitlines()) == 1
