"""Random-feature scorers ('ranpac', 'ncm'): exact statistics, merging, adapter files, the decode cache, typed errors
and class-incremental prediction, on a tiny random MobileNetV2."""
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import timm
import timm_modcl  # noqa: F401  (registers the models)
from timm_modcl import DataError, InputError, StatisticsError, TaskError, TaskNotFoundError
from timm_modcl import scorers
from timm_modcl.scorers import decoding
from timm_modcl.scorers import (
    RANPAC_STATS, ClassPrediction, merge_ranpac_statistics, random_features, ranpac_statistics, score_ranpac,
    select_ridge,
)

from _subproc import run_bounded

SIZE = 32
DIM = 64
RIDGE = 0.01


def _model():
    torch.manual_seed(0)   # the same random backbone in every process
    return timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()


def _data(seed: int, n: int = 12):
    """Two tasks whose images differ in their statistics: 'a' (3 classes, shifted means), 'b' (2 classes, scaled)."""
    g = torch.Generator().manual_seed(seed)
    ya = torch.arange(n) % 3
    xa = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5 + (ya.float() - 1)[:, None, None, None]
    yb = torch.arange(n) % 2
    xb = torch.randn(n, 3, SIZE, SIZE, generator=g) * (0.2 + 2.0 * yb.float())[:, None, None, None] + 3.0
    return {'a': (xa, ya), 'b': (xb, yb)}


@pytest.fixture(scope='module')
def served():
    model = _model()
    data = _data(0)
    model.add_task('a', 3, class_names=['neg', 'zero', 'pos'], activate=False)
    model.add_task('b', 2, activate=False)
    for name, (x, y) in data.items():
        # the library's ridge (100) was chosen on real images; these tiny synthetic tasks on a random backbone need less
        model.compute_task_statistics(name, (x, y), scorer='ranpac', dim=DIM, ridge=RIDGE, batch_size=5)
    return model, data


def _stats(model, name):
    return {k: v.clone() for k, v in model.modcl_tasks[name].stats.items()}


# ---------------------------------------------------------------------------------------------------- statistics
def test_statistics_layout_and_values(served):
    model, data = served
    st = model.modcl_tasks['a'].stats
    assert set(RANPAC_STATS) <= set(st)
    assert st['ranpac_gram'].shape == (DIM * (DIM + 1) // 2,) and st['ranpac_mean'].shape == (3, DIM)
    x, y = data['a']
    h = random_features(model.prototype_features(x), DIM, 0).double()
    gram = h.t() @ h / len(h)
    iu = torch.triu_indices(DIM, DIM)
    torch.testing.assert_close(st['ranpac_gram'].double(), gram[iu[0], iu[1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st['ranpac_mean'][1].double(), h[y == 1].mean(0), rtol=1e-5, atol=1e-6)
    assert st['ranpac_count'].tolist() == [4.0, 4.0, 4.0] and float(st['ranpac_seed']) == 0


def test_incremental_accumulation_equals_one_pass(served):
    model, data = served
    x, y = data['a']
    before = _stats(model, 'a')
    try:
        model.compute_task_statistics('a', (x[:5], y[:5]), scorer='ranpac', dim=DIM, ridge=RIDGE)
        model.compute_task_statistics('a', (x[5:], y[5:]), scorer='ranpac', dim=DIM, ridge=RIDGE,
                                      accumulate=True)
        for k in RANPAC_STATS:   # equal up to float32 rounding (and CPU kernels that depend on the batch size)
            torch.testing.assert_close(model.modcl_tasks['a'].stats[k], before[k], rtol=1e-5, atol=1e-5)
        assert torch.equal(model.modcl_tasks['a'].stats['ranpac_count'], before['ranpac_count'])
        with pytest.raises(StatisticsError, match='seed'):
            model.compute_task_statistics('a', (x, y), scorer='ranpac', dim=DIM, seed=3, accumulate=True)
    finally:
        model.modcl_tasks['a'].stats.update(before)


def test_merging_shards_is_the_statistics_of_the_union():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(40, 16, generator=g).abs()
    y = torch.arange(40) % 4
    whole = ranpac_statistics(f, y, 4, dim=DIM, seed=5)
    merged = merge_ranpac_statistics(ranpac_statistics(f[:13], y[:13], 4, dim=DIM, seed=5),
                                     ranpac_statistics(f[13:], y[13:], 4, dim=DIM, seed=5))
    for k in RANPAC_STATS:
        torch.testing.assert_close(merged[k], whole[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(StatisticsError, match='seeds'):
        merge_ranpac_statistics(whole, ranpac_statistics(f, y, 4, dim=DIM, seed=6))
    with pytest.raises(StatisticsError, match='shape'):
        merge_ranpac_statistics(whole, ranpac_statistics(f, y, 4, dim=DIM // 2, seed=5))


def test_tasks_learned_in_separate_processes_combine_exactly(served, tmp_path):
    """Task 'b' learned in another process and loaded from its adapter file gives bit-identical predictions."""
    model, data = served
    save_file({'x': data['b'][0], 'y': data['b'][1]}, str(tmp_path / 'b.safetensors.in'))
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        import timm, timm_modcl
        from safetensors.torch import load_file
        torch.manual_seed(0)
        m = timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()
        m.add_task('b', 2, activate=False)
        t = load_file({str(tmp_path / 'b.safetensors.in')!r})
        x, y = t['x'], t['y']
        m.compute_task_statistics('b', (x, y), scorer='ranpac', dim={DIM}, ridge={RIDGE}, batch_size=5)
        m.save_task('b', {str(tmp_path / 'b.safetensors')!r})
    """)
    code, out = run_bounded([sys.executable, '-c', script], timeout=300)
    assert code == 0, out
    other = _model()
    other.add_task('a', 3, class_names=['neg', 'zero', 'pos'], activate=False)
    other.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, ridge=RIDGE, batch_size=5)
    other.load_task(tmp_path / 'b.safetensors')
    assert all(torch.equal(other.modcl_tasks['b'].stats[k], model.modcl_tasks['b'].stats[k]) for k in RANPAC_STATS)
    x = torch.cat([data['a'][0][:4], data['b'][0][:4]])
    ref, got = model.predict_classes(x), other.predict_classes(x)
    assert torch.equal(ref.class_scores, got.class_scores) and ref.tasks == got.tasks


# ---------------------------------------------------------------------------------------------------- persistence
def test_statistics_survive_adapter_files_and_fp16(served, tmp_path):
    model, data = served
    x = torch.cat([v[0][:4] for v in data.values()])
    ref = model.predict_classes(x)
    model.save_tasks(tmp_path / 'folder')
    fresh = _model()
    fresh.load_tasks(tmp_path / 'folder')
    for n in ('a', 'b'):
        assert all(torch.equal(fresh.modcl_tasks[n].stats[k], model.modcl_tasks[n].stats[k]) for k in RANPAC_STATS)
    got = fresh.predict_classes(x)
    assert torch.equal(got.class_scores, ref.class_scores) and got.class_names == ref.class_names
    half = _model()
    for n in ('a', 'b'):
        half.load_task(model.save_task(n, tmp_path / f'{n}16.safetensors', dtype=torch.float16))
        assert float(half.modcl_tasks[n].stats['ranpac_seed']) == 0.0
    got = half.predict_classes(x)
    torch.testing.assert_close(got.class_scores, ref.class_scores, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------- cache
def test_decoded_weights_are_cached_and_refreshed_when_statistics_change(served, monkeypatch):
    model, data = served
    calls = []
    real = decoding._decode
    monkeypatch.setattr(decoding, '_decode', lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    decoding._decoded.pop(model, None)
    x = data['a'][0][:4]
    first = model.predict_classes(x)
    model.predict_classes(x)
    model.predict_task_agnostic(x, scorer='ranpac')
    assert len(calls) == 1
    model.predict_classes(x, tasks=['b', 'a'])             # another candidate set: decoded once more
    assert len(calls) == 2
    saved = _stats(model, 'a')
    try:
        model.modcl_tasks['a'].stats['ranpac_mean'].mul_(-1)    # in place: the tensor's version changes
        changed = model.predict_classes(x)
        assert len(calls) == 3 and not torch.equal(changed.class_scores, first.class_scores)
        model.modcl_tasks['a'].stats['ranpac_mean'] = saved['ranpac_mean'].clone()   # a new tensor
        again = model.predict_classes(x)
        assert len(calls) == 4 and torch.equal(again.class_scores, first.class_scores)
    finally:
        model.modcl_tasks['a'].stats.update(saved)


def test_decoded_weights_follow_the_model_dtype(served):
    model, data = served
    x = data['a'][0][:2]
    double = _model()
    for n in ('a', 'b'):
        double.add_task(n, model.tasks[n].num_classes, activate=False)
        double.modcl_tasks[n].stats.update(_stats(model, n))
    double.double()
    d = scorers.decoded(double, ['a', 'b'])
    assert d.weights.dtype == torch.float64
    assert double.predict_classes(x.double()).tasks == model.predict_classes(x).tasks


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize('change, match', [
    (lambda s: s.pop('ranpac_gram'), 'no random-feature statistics'),
    (lambda s: s.update(ranpac_gram=s['ranpac_gram'][:-1]), 'upper triangle'),
    (lambda s: s.update(ranpac_mean=s['ranpac_mean'][:2]), 'classes'),
    (lambda s: s.update(ranpac_count=-s['ranpac_count']), 'ranpac_count'),
    (lambda s: s.update(ranpac_count=s['ranpac_count'] + 0.5), 'ranpac_count'),
    (lambda s: s.update(ranpac_gram=s['ranpac_gram'] * float('nan')), 'NaN'),
    (lambda s: s.update(ranpac_seed=torch.tensor(0.5)), 'seed'),
    (lambda s: s.update(ranpac_seed=torch.tensor(1.0)), 'seeds'),
    (lambda s: s.update(ranpac_ridge=torch.tensor(0.0)), 'ridge'),
    (lambda s: s.update(ranpac_mean=s['ranpac_mean'][:, :DIM // 2]), 'upper triangle'),
])
def test_malformed_statistics_raise_a_typed_error_and_change_nothing(served, change, match):
    model, data = served
    saved = _stats(model, 'a')
    bad = _stats(model, 'a')
    change(bad)
    model.modcl_tasks['a'].stats = bad
    try:
        before = {k: v.clone() for k, v in bad.items()}
        x = data['a'][0][:2]
        for call in (lambda: model.predict_classes(x), lambda: model.predict_task_agnostic(x, scorer='ranpac'),
                     lambda: model.predict_classes(x, scorer='ncm')):
            with pytest.raises(StatisticsError, match=match):
                call()
        assert set(model.modcl_tasks['a'].stats) == set(before)
        for k, v in before.items():
            torch.testing.assert_close(model.modcl_tasks['a'].stats[k], v, rtol=0, atol=0, equal_nan=True)
        assert model.active_task == 'base' and not model.training
    finally:
        model.modcl_tasks['a'].stats = saved


def test_bad_arguments_raise_typed_errors(served):
    model, data = served
    x, y = data['a']
    with pytest.raises(TaskError, match='scorer'):
        model.predict_classes(x[:2], scorer='energy')
    with pytest.raises(TaskNotFoundError):
        model.predict_classes(x[:2], tasks=['nope'])
    with pytest.raises(InputError):
        model.predict_classes(torch.randn(2, 5, SIZE, SIZE))
    with pytest.raises(TaskError, match='scorer'):
        model.compute_task_statistics('a', (x, y), scorer='energy')
    for kw, match in (({'dim': 0}, 'dim'), ({'seed': 256}, 'seed'), ({'ridge': -1.0}, 'ridge'),
                      ({'num_classes': 4}, 'classes')):
        with pytest.raises(TaskError, match=match):
            model.compute_task_statistics('a', (x, y), scorer='ranpac', **kw)
    with pytest.raises(DataError):
        model.compute_task_statistics('a', (x, y + 3), scorer='ranpac', dim=DIM)
    with pytest.raises(DataError):
        ranpac_statistics(torch.randn(4, 8), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(StatisticsError, match='no random-feature'):
        score_ranpac(torch.randn(2, 8), [{}])
    model.add_task('empty', 2, activate=False)
    try:
        with pytest.raises(StatisticsError, match="'empty'"):
            model.predict_classes(x[:2])
    finally:
        model.remove_task('empty')


# ---------------------------------------------------------------------------------------------------- prediction
def test_predict_classes_one_label_space_over_all_tasks(served):
    model, data = served
    x = torch.cat([data['a'][0], data['b'][0]])
    pred = model.predict_classes(x)
    assert isinstance(pred, ClassPrediction) and len(pred) == len(x)
    assert pred.candidates == ('a', 'b') and pred.offsets == (0, 3, 5)
    assert pred.class_scores.shape == (len(x), 5) and pred.class_scores.dtype == torch.float32
    assert torch.equal(pred.global_labels, pred.class_scores.argmax(1))
    assert pred.tasks == [pred.candidates[i] for i in pred.task_index.tolist()]
    assert torch.equal(pred.labels + torch.tensor([pred.offsets[i] for i in pred.task_index]), pred.global_labels)
    assert all(n == ['neg', 'zero', 'pos'][c] if t == 'a' else n is None
               for t, c, n in zip(pred.tasks, pred.labels.tolist(), pred.class_names))
    # the training images are told apart (the tasks differ strongly)
    truth = torch.cat([data['a'][1], data['b'][1] + 3])
    assert (pred.global_labels == truth).float().mean() >= 0.75
    assert pred.tasks[:12] == ['a'] * 12 and pred.tasks[12:] == ['b'] * 12
    # task-agnostic prediction picks the same task (best class score per task)
    agn = model.predict_task_agnostic(x, scorer='ranpac')
    assert agn.tasks == pred.tasks and agn.task_scores.shape == (len(x), 2)
    torch.testing.assert_close(agn.task_scores.amax(1), pred.class_scores.amax(1))
    only_b = model.predict_classes(x, tasks=['b'])
    assert only_b.tasks == ['b'] * len(x) and only_b.class_scores.shape == (len(x), 2)
    ncm = model.predict_classes(x, scorer='ncm')
    assert ncm.class_scores.abs().max() <= 1 + 1e-5     # cosine similarities


def test_model_scores_equal_the_model_free_scores(served):
    model, data = served
    x = data['b'][0][:5]
    f = model.prototype_features(x)
    for method in ('ranpac', 'ncm'):
        task_scores, per_task = score_ranpac(f, [model.modcl_tasks[n].stats for n in ('a', 'b')], method)
        pred = model.predict_classes(x, scorer=method)
        torch.testing.assert_close(torch.cat(per_task, 1), pred.class_scores, rtol=1e-5, atol=1e-5)


def test_all_reduce_sums_the_statistics_of_the_processes(served, tmp_path):
    """With one process, all_reduce=True gives the same statistics (the sums go through torch.distributed)."""
    import torch.distributed as dist
    model, data = served
    saved = _stats(model, 'b')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        got = model.compute_task_statistics('b', data['b'], scorer='ranpac', dim=DIM, ridge=RIDGE, batch_size=5,
                                            all_reduce=True)
    finally:
        dist.destroy_process_group()
        model.modcl_tasks['b'].stats.update(saved)
    assert all(torch.equal(got[k], saved[k]) for k in RANPAC_STATS)
    with pytest.raises(TaskError, match='process group'):
        model.compute_task_statistics('b', data['b'], scorer='ranpac', dim=DIM, all_reduce=True)


def test_select_ridge_stores_the_most_accurate_ridge_and_refreshes_the_cache(served):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    val = _data(7, n=6)
    try:
        x = torch.cat([val['a'][0], val['b'][0]])
        before = model.predict_classes(x)
        best, acc = select_ridge(model, val, grid=(1e-3, 1e3))
        truth = torch.tensor([0] * 6 + [1] * 6)
        for r, a in acc.items():    # the reported accuracy is the task identification with that ridge
            for n in ('a', 'b'):
                model.modcl_tasks[n].stats['ranpac_ridge'] = torch.tensor(r)
            assert (model.predict_classes(x).task_index == truth).float().mean().item() == pytest.approx(a)
        assert best == max(acc, key=lambda r: (acc[r], r))
        for n in ('a', 'b'):
            model.modcl_tasks[n].stats['ranpac_ridge'] = torch.tensor(best)
        assert not torch.equal(model.predict_classes(x).class_scores, before.class_scores)
        with pytest.raises(TaskError, match='two tasks'):
            select_ridge(model, {'a': val['a']})
        with pytest.raises(TaskError, match='ridge'):
            select_ridge(model, val, grid=(0.0,))
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats.update(s)


# ---------------------------------------------------------------------------------------------------- device caches
def _with_prototypes(model, data):
    for name, (x, y) in data.items():
        model.compute_task_statistics(name, (x, y), rank=2)


def test_cache_counts_hits_and_misses_and_a_changed_statistic_refreshes(served):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    try:
        _with_prototypes(model, data)
        x = data['a'][0][:3]
        model.predict_task_agnostic(x, scorer='prototype')      # builds what is missing
        model.predict_classes(x)
        before = scorers.cache_info(model)
        for _ in range(3):
            model.predict_task_agnostic(x, scorer='prototype')
            model.predict_classes(x)
        after = scorers.cache_info(model)
        assert after['prototype_misses'] == before['prototype_misses']
        assert after['ranpac_misses'] == before['ranpac_misses']
        assert after['prototype_hits'] >= before['prototype_hits'] + 6     # two tasks, three calls
        assert after['ranpac_hits'] >= before['ranpac_hits'] + 3
        first = model.predict_task_agnostic(x, scorer='prototype').task_scores
        with torch.no_grad():
            model.modcl_tasks['a'].stats['proto_mean'].add_(0.5)     # in place: only task 'a' is prepared again
        changed = model.predict_task_agnostic(x, scorer='prototype').task_scores
        now = scorers.cache_info(model)
        assert now['prototype_misses'] == after['prototype_misses'] + 1
        assert not torch.equal(changed[:, 0], first[:, 0]) and torch.equal(changed[:, 1], first[:, 1])
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


def test_factors_follow_the_model_device_and_dtype(served):
    model, data = served
    x = data['a'][0][:3]
    other = _model()
    for n in ('a', 'b'):
        other.add_task(n, model.tasks[n].num_classes, activate=False)
        other.modcl_tasks[n].stats.update(_stats(model, n))
    _with_prototypes(other, data)
    names = ['a', 'b']
    ref32 = other.predict_task_agnostic(x, scorer='prototype')
    g32 = other._gaussians(names)
    assert all(g.mean_s.dtype == torch.float32 and g.w.dtype == torch.float32 for g in g32)
    assert all(g.mean_s.device == other.backbone_device for g in g32)
    assert scorers.decoded(other, names).weights.dtype == torch.float32
    misses = scorers.cache_info(other)
    other.double()                                            # the factors follow: built again in float64
    ref64 = other.predict_task_agnostic(x.double(), scorer='prototype')
    assert all(g.mean_s.dtype == torch.float64 and g.w.dtype == torch.float64 for g in other._gaussians(names))
    assert scorers.decoded(other, names).weights.dtype == torch.float64
    now = scorers.cache_info(other)
    assert now['prototype_misses'] == misses['prototype_misses'] + 2
    assert now['ranpac_misses'] == misses['ranpac_misses'] + 1
    assert ref64.tasks == ref32.tasks
    torch.testing.assert_close(ref64.task_scores, ref32.task_scores, rtol=1e-4, atol=1e-3)
    other.float()
    assert all(g.mean_s.dtype == torch.float32 for g in other._gaussians(names))


def test_float32_prototype_scores_match_the_float64_reference(served):
    model, data = served
    from timm_modcl.serving import score_prototypes
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    try:
        _with_prototypes(model, data)
        x = torch.cat([data['a'][0], data['b'][0]])
        pred = model.predict_task_agnostic(x, scorer='prototype')
        ref, _ = score_prototypes(model.prototype_features(x), [model.modcl_tasks[n].stats for n in ('a', 'b')])
        assert ref.dtype == torch.float64
        torch.testing.assert_close(pred.task_scores.double(), ref, rtol=2e-4, atol=1e-3)
        assert torch.equal(pred.task_index, ref.argmax(1))
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


# ---------------------------------------------------------------------------------------------------- layers
def test_statistics_from_earlier_layers_use_a_truncated_forward(served):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    calls = []
    hook = model.conv_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        for name, (x, y) in data.items():
            st = model.compute_task_statistics(name, (x, y), scorer='ranpac', dim=DIM, ridge=RIDGE, layers=[5, 3])
            assert st['ranpac_layers'].tolist() == [3.0, 5.0]
        assert calls == []                                    # the base forward stopped after layer 5
        x, y = data['a']
        with torch.no_grad(), model.task_scope('base'):
            f = scorers.base_features(model, x, (3, 5))
            maps = model.forward_intermediates(x, indices=[3, 5], intermediates_only=True, extra_blocks=True)
        assert f.shape == (len(x), sum(m.shape[1] for m in maps))
        expected = torch.cat([torch.nn.functional.normalize(m.mean((2, 3)), dim=1) for m in maps], 1)
        torch.testing.assert_close(f, expected)
        ref = ranpac_statistics(f, y, 3, dim=DIM, ridge=RIDGE, layers=(3, 5))
        for k in RANPAC_STATS + ('ranpac_layers',):
            torch.testing.assert_close(ref[k], model.modcl_tasks['a'].stats[k], rtol=1e-4, atol=1e-5)
        xs = torch.cat([data['a'][0], data['b'][0]])
        pred = model.predict_classes(xs)
        assert calls == [] and pred.tasks == ['a'] * 12 + ['b'] * 12
        agn = model.predict_task_agnostic(xs, scorer='ranpac')
        assert agn.tasks == pred.tasks
        calls.clear()                                         # (the chosen heads' forwards ran conv_head)
        # pre-logits and an inner layer: one full forward
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, ridge=RIDGE, layers=[-1, 4])
        assert model.modcl_tasks['a'].stats['ranpac_layers'].tolist() == [4.0, -1.0] and len(calls) == 1
        with pytest.raises(StatisticsError, match='layers'):   # candidates made from other layers
            model.predict_classes(xs)
        with pytest.raises(StatisticsError, match='layers'):
            model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, layers=[3], accumulate=True)
        # back to the pre-logits features: the layers statistic goes away
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, ridge=RIDGE, layers=[-1])
        assert 'ranpac_layers' not in model.modcl_tasks['a'].stats
    finally:
        hook.remove()
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


@pytest.mark.parametrize('layers, error', [([], TaskError), ('3', TaskError), ([1.5], TaskError), ([-2], TaskError),
                                           ([True], TaskError), ([40], 'unsupported')])
def test_bad_layers_raise_typed_errors_and_change_nothing(served, layers, error):
    from timm_modcl import UnsupportedModelError
    model, data = served
    saved = _stats(model, 'a')
    with pytest.raises(UnsupportedModelError if error == 'unsupported' else error):
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, layers=layers)
    assert all(torch.equal(model.modcl_tasks['a'].stats[k], saved[k]) for k in saved) and \
        set(model.modcl_tasks['a'].stats) == set(saved)


def test_malformed_layers_statistic_raises(served):
    model, data = served
    saved = _stats(model, 'a')
    try:
        for bad in (torch.tensor([3.5]), torch.tensor([5.0, 3.0]), torch.tensor([[3.0]]), torch.tensor([-3.0])):
            model.modcl_tasks['a'].stats['ranpac_layers'] = bad
            with pytest.raises(StatisticsError, match='ranpac_layers'):
                model.predict_classes(data['a'][0][:2])
    finally:
        model.modcl_tasks['a'].stats = saved


# ---------------------------------------------------------------------------------------------------- head evidence
def test_head_evidence_adds_each_candidates_head_score(served):
    from timm_modcl.serving import head_score
    model, data = served
    x = torch.cat([data['a'][0][:3], data['b'][0][:3]])
    plain = model.predict_task_agnostic(x, scorer='ranpac')
    for head_scorer in ('energy', 'max_softmax', 'entropy'):
        pred = model.predict_task_agnostic(x, scorer='ranpac', head_weight=0.5, head_scorer=head_scorer)
        heads = torch.stack([head_score(model.forward_task(x, n).float(), head_scorer) for n in ('a', 'b')], 1)
        torch.testing.assert_close(pred.task_scores, plain.task_scores + 0.5 * heads, rtol=1e-5, atol=1e-5)
        assert torch.equal(pred.task_index, pred.task_scores.argmax(1))
        for i, t in enumerate(pred.tasks):
            torch.testing.assert_close(pred.logits[i], model.forward_task(x[i:i + 1], t)[0], rtol=1e-4, atol=1e-4)
    # entropy evidence: 1 for a one-hot softmax, 0 for a uniform one
    z = torch.tensor([[100.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(head_score(z, 'entropy'), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    for kw, match in (({'head_weight': -1.0}, 'head_weight'), ({'head_weight': float('nan')}, 'head_weight'),
                      ({'head_weight': 1.0, 'head_scorer': 'logits'}, 'head_scorer')):
        with pytest.raises(TaskError, match=match):
            model.predict_task_agnostic(x, scorer='ranpac', **kw)


def test_layers_travel_in_adapter_files_and_fp16(served, tmp_path):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    try:
        for name, (x, y) in data.items():
            model.compute_task_statistics(name, (x, y), scorer='ranpac', dim=DIM, ridge=RIDGE, layers=[4, 7])
        x = torch.cat([v[0][:4] for v in data.values()])
        ref = model.predict_classes(x)
        model.save_tasks(tmp_path / 'folder')
        fresh = _model()
        fresh.load_tasks(tmp_path / 'folder')
        assert fresh.modcl_tasks['a'].stats['ranpac_layers'].tolist() == [4.0, 7.0]
        assert torch.equal(fresh.predict_classes(x).class_scores, ref.class_scores)
        half = _model()
        half.load_task(model.save_task('a', tmp_path / 'a16.safetensors', dtype=torch.float16))
        half.load_task(model.save_task('b', tmp_path / 'b16.safetensors', dtype=torch.float16))
        assert scorers.decoded(half, ['a', 'b']).layers == (4, 7)
        assert half.predict_classes(x).tasks == ref.tasks
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


# ---------------------------------------------------------------------------------------------------- input size
SMALL = 16   # the scorer's side for SIZE = 32 images: a quarter of the pixels


def _input_sizes(model):
    """Record the spatial size of every input the stem convolution sees."""
    seen = []
    return seen, model.conv_stem.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))


def test_input_size_statistics_equal_the_model_free_statistics_of_resized_inputs(served):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    seen, hook = _input_sizes(model)
    try:
        for name, (x, y) in data.items():
            st = model.compute_task_statistics(name, (x, y), scorer='ranpac', dim=DIM, ridge=RIDGE,
                                               input_size=SMALL, batch_size=5)
            assert float(st['ranpac_input_size']) == SMALL and 'ranpac_layers' not in st
        assert seen and set(seen) == {(SMALL, SMALL)}
        x, y = data['a']
        small = torch.nn.functional.interpolate(x, size=(SMALL, SMALL), mode='bilinear', antialias=True,
                                                align_corners=False)
        f = model.prototype_features(small)
        ref = ranpac_statistics(f, y, 3, dim=DIM, ridge=RIDGE, input_size=SMALL)
        for k in RANPAC_STATS + ('ranpac_input_size',):
            torch.testing.assert_close(ref[k], model.modcl_tasks['a'].stats[k], rtol=1e-4, atol=1e-5)
        # scoring resizes the same way: the model-free scores of the resized batch
        xs = torch.cat([data['a'][0][:4], data['b'][0][:4]])
        small = torch.nn.functional.interpolate(xs, size=(SMALL, SMALL), mode='bilinear', antialias=True,
                                                align_corners=False)
        want, _ = score_ranpac(model.prototype_features(small), [model.modcl_tasks[n].stats for n in ('a', 'b')])
        seen.clear()
        got = model.predict_classes(xs)
        assert seen == [(SMALL, SMALL)]
        torch.testing.assert_close(got.class_scores.view(len(xs), -1).max(1).values, want.max(1).values,
                                   rtol=1e-4, atol=1e-4)
        seen.clear()
        agn = model.predict_task_agnostic(xs, scorer='ranpac')
        assert seen[0] == (SMALL, SMALL) and all(s == (SIZE, SIZE) for s in seen[1:]) and len(seen) >= 2
        torch.testing.assert_close(agn.task_scores, want, rtol=1e-4, atol=1e-4)   # heads still see the full batch
        assert agn.tasks == ['a'] * 4 + ['b'] * 4
        seen.clear()
        select_ridge(model, {n: (v[0][:3], v[1][:3]) for n, v in data.items()}, grid=[RIDGE])
        assert seen and set(seen) == {(SMALL, SMALL)}
        # None (the default): no resize, the full-size batch as before
        assert scorers.scaled_input(xs, None) is xs and scorers.scaled_input(xs, SIZE) is xs
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, ridge=RIDGE)
        assert 'ranpac_input_size' not in model.modcl_tasks['a'].stats
    finally:
        hook.remove()
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


def test_scaled_input_keeps_the_aspect_ratio_and_dtype():
    x = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    y = scorers.scaled_input(x, 16)
    assert y.shape == (2, 3, 16, 24) and y.dtype == torch.float64
    assert scorers.scaled_input(x.transpose(2, 3), 16).shape == (2, 3, 24, 16)
    assert scorers.scaled_input(torch.ones(1, 3, 32, 32), 16).allclose(torch.ones(1, 3, 16, 16))


def test_input_size_travels_in_adapter_files_and_fp16(served, tmp_path):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    try:
        for name, (x, y) in data.items():
            model.compute_task_statistics(name, (x, y), scorer='ranpac', dim=DIM, ridge=RIDGE, input_size=SMALL,
                                          layers=[4, 7])
        x = torch.cat([v[0][:4] for v in data.values()])
        ref = model.predict_classes(x)
        model.save_tasks(tmp_path / 'folder')
        fresh = _model()
        fresh.load_tasks(tmp_path / 'folder')
        assert float(fresh.modcl_tasks['a'].stats['ranpac_input_size']) == SMALL
        d = scorers.decoded(fresh, ['a', 'b'])
        assert (d.input_size, d.layers) == (SMALL, (4, 7))
        assert torch.equal(fresh.predict_classes(x).class_scores, ref.class_scores)
        half = _model()
        half.load_task(model.save_task('a', tmp_path / 'a16.safetensors', dtype=torch.float16))
        half.load_task(model.save_task('b', tmp_path / 'b16.safetensors', dtype=torch.float16))
        assert scorers.decoded(half, ['a', 'b']).input_size == SMALL
        assert half.predict_classes(x).tasks == ref.tasks
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


def test_different_input_sizes_are_refused(served):
    model, data = served
    saved = {n: _stats(model, n) for n in ('a', 'b')}
    x = data['a'][0][:2]
    try:
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, ridge=RIDGE, input_size=SMALL)
        for call in (lambda: model.predict_classes(x), lambda: model.predict_task_agnostic(x, scorer='ranpac'),
                     lambda: model.predict_task_agnostic(x, scorer='ncm')):
            with pytest.raises(StatisticsError, match='input size'):
                call()
        with pytest.raises(StatisticsError, match='input_size'):
            model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, input_size=24, accumulate=True)
        assert float(model.modcl_tasks['a'].stats['ranpac_input_size']) == SMALL
        f = torch.randn(6, 8)
        y = torch.arange(6) % 2
        with pytest.raises(StatisticsError, match='input sizes'):
            merge_ranpac_statistics(ranpac_statistics(f, y, 2, dim=DIM, input_size=SMALL),
                                    ranpac_statistics(f, y, 2, dim=DIM))
        merged = merge_ranpac_statistics(ranpac_statistics(f[:3], y[:3], 2, dim=DIM, input_size=SMALL),
                                         ranpac_statistics(f[3:], y[3:], 2, dim=DIM, input_size=SMALL))
        assert float(merged['ranpac_input_size']) == SMALL
        # accumulating at the same size works and keeps the size
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, input_size=SMALL, accumulate=True)
        assert float(model.modcl_tasks['a'].stats['ranpac_input_size']) == SMALL
    finally:
        for n, s in saved.items():
            model.modcl_tasks[n].stats = s


@pytest.mark.parametrize('size', [0, 7, 4096, 16.0, True, '16'])
def test_bad_input_size_raises_a_typed_error_and_changes_nothing(served, size):
    model, data = served
    saved = _stats(model, 'a')
    with pytest.raises(TaskError, match='input_size'):
        model.compute_task_statistics('a', data['a'], scorer='ranpac', dim=DIM, input_size=size)
    with pytest.raises(TaskError, match='input_size'):
        ranpac_statistics(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), 1, dim=DIM, input_size=size)
    assert all(torch.equal(model.modcl_tasks['a'].stats[k], saved[k]) for k in saved) and \
        set(model.modcl_tasks['a'].stats) == set(saved)


def test_malformed_input_size_statistic_raises(served):
    model, data = served
    saved = _stats(model, 'a')
    try:
        for bad in (torch.tensor(16.5), torch.tensor([16.0]), torch.tensor(4.0), torch.tensor(float('nan')),
                    torch.tensor(16)):
            model.modcl_tasks['a'].stats['ranpac_input_size'] = bad
            with pytest.raises(StatisticsError, match='ranpac_input_size'):
                model.predict_classes(data['a'][0][:2])
    finally:
        model.modcl_tasks['a'].stats = saved


def test_a_model_that_cannot_take_the_resized_copy_raises_a_typed_error_and_keeps_its_statistics():
    from timm_modcl import UnsupportedModelError
    model = timm.create_model('modcl_vit_tiny_patch16_224', pretrained=False, img_size=SIZE).eval()  # fixed size
    model.add_task('a', 2, activate=False)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UnsupportedModelError, match='input_size=16'):
        model.compute_task_statistics('a', (x, y), scorer='ranpac', dim=DIM, input_size=SMALL)
    assert not model.modcl_tasks['a'].stats
    model.compute_task_statistics('a', (x, y), scorer='ranpac', dim=DIM, input_size=SIZE)   # the same size: fine
    assert float(model.modcl_tasks['a'].stats['ranpac_input_size']) == SIZE
