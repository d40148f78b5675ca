"""Serving many tasks: mixed-task batches, task-agnostic prediction, prototype statistics and the weight cache."""
import copy
import math
import pickle

import pytest
import torch

import timm
import timm_modcl
from timm_modcl import (
    InputError, ModCLError, StatisticsError, TaskError, TaskNotFoundError,
)
from timm_modcl.adapter import describe_adapter, read_adapter
from timm_modcl.serving import (
    PROTOTYPE_STATS, TaskPrediction, compute_task_statistics, has_prototypes, prototype_statistics,
    score_prototypes,
)

SIZE = 32


def _image_tasks(n_per_class: int, seed: int):
    """Three visually distinct synthetic tasks: stripes (horizontal / vertical), blobs (red / green / blue) and
    noise (low / high contrast), as ``{task: (images, labels)}``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, SIZE)
    yy, xx = torch.meshgrid(grid, grid, indexing='ij')
    out = {}
    xs, ys = [], []
    for c in range(2):
        for _ in range(n_per_class):
            f = 3 + 5 * torch.rand((), generator=g)
            phase = 6.28 * torch.rand((), generator=g)
            wave = torch.sin(6.28 * f * (yy if c == 0 else xx) + phase)
            xs.append(wave.expand(3, SIZE, SIZE) * 1.5)
            ys.append(c)
    out['stripes'] = (torch.stack(xs), torch.tensor(ys))
    xs, ys = [], []
    for c in range(3):
        for _ in range(n_per_class):
            cy, cx = 0.2 + 0.6 * torch.rand(2, generator=g)
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
            img = torch.full((3, SIZE, SIZE), -1.5)
            img[c] += 3.5 * blob
            xs.append(img)
            ys.append(c)
    out['blobs'] = (torch.stack(xs), torch.tensor(ys))
    xs, ys = [], []
    for c in range(2):
        for _ in range(n_per_class):
            xs.append((0.3 if c == 0 else 1.5) * torch.randn(3, SIZE, SIZE, generator=g))
            ys.append(c)
    out['noise'] = (torch.stack(xs), torch.tensor(ys))
    return out


CLASSES = {'stripes': ['horizontal', 'vertical'], 'blobs': ['red', 'green', 'blue'], 'noise': ['low', 'high']}


def _perturb(model, name: str, seed: int) -> None:
    """Make a task's modulators, head and BN statistics differ from the others' (as training would)."""
    g = torch.Generator().manual_seed(seed)
    task = model.modcl_tasks[name]
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for stats in task.norm_stats.values():
            stats['running_mean'].add_(0.05 * torch.randn(stats['running_mean'].shape, generator=g))


@pytest.fixture(scope='module')
def served(pretrained_model_factory):
    """The offline ImageNet MobileNetV2 with three tasks (different head sizes, perturbed state) and their
    prototype statistics, plus held-out data of each task."""
    model = pretrained_model_factory()
    train = _image_tasks(24, seed=0)
    test = _image_tasks(8, seed=1)
    for i, (name, (x, y)) in enumerate(train.items()):
        model.add_task(name, len(CLASSES[name]), class_names=CLASSES[name], variant='paper')
        _perturb(model, name, seed=i)
        compute_task_statistics(model, name, (x, y))
    model.set_task('base')
    model.eval()
    return model, train, test


def _snapshot(model):
    return (model.active_task, [m.training for m in model.modules()], model.weight_cache.cached_tasks(),
            model.weight_cache.bytes, {n: {k: v.clone() for k, v in model.modcl_tasks[n].stats.items()}
                                        for n in model.tasks})


def _assert_unchanged(model, before, cache=True):
    """Active task, train/eval flags, statistics and (after an error) the cache are as they were."""
    active, modes, cached, nbytes, stats = before
    assert model.active_task == active
    assert [m.training for m in model.modules()] == modes
    if cache == 'contents':  # errors found while running (bad labels) may reorder the LRU list, not change it
        assert set(model.weight_cache.cached_tasks()) == set(cached) and model.weight_cache.bytes == nbytes
    elif cache:
        assert model.weight_cache.cached_tasks() == cached and model.weight_cache.bytes == nbytes
    assert list(model.tasks) == list(stats)
    for n, s in stats.items():
        now = model.modcl_tasks[n].stats
        assert set(now) == set(s) and all(torch.equal(now[k], v) for k, v in s.items()), n


# ---------------------------------------------------------------------------------------------------- mixed batches
def test_forward_tasks_equals_per_task_batches_exactly_and_single_samples_closely(served):
    model, _, test = served
    x = torch.cat([test['stripes'][0][:3], test['blobs'][0][:3], test['noise'][0][:2]])
    tasks = ['blobs', 'stripes', 'noise', 'blobs', 'base', 'stripes', 'noise', 'blobs']
    model.set_task('noise')
    model.train()
    model.blocks[2].eval()  # a mixed train/eval state
    modes = [m.training for m in model.modules()]
    out = model.forward_tasks(x, tasks)
    assert model.active_task == 'noise' and [m.training for m in model.modules()] == modes
    model.eval()
    assert [o.shape for o in out] == [(model.tasks[t].num_classes,) for t in tasks]
    worst = 0.0
    for t in set(tasks):
        idx = [i for i, s in enumerate(tasks) if s == t]
        with torch.no_grad(), model.use_task(t):
            group = model(x[idx])
            for j, i in enumerate(idx):
                assert torch.equal(out[i], group[j]), (t, i)          # the same computation: bit-identical
                alone = model(x[i:i + 1])[0]                          # another batch size: other CPU kernels
                torch.testing.assert_close(out[i], alone, rtol=1e-4, atol=1e-4)
                worst = max(worst, float((out[i] - alone).abs().max()))
    assert worst < 1e-4
    model.set_task('base')


def test_forward_tasks_uses_the_cache_for_hot_tasks(served):
    model, _, test = served
    x = test['blobs'][0][:6]
    tasks = ['stripes', 'blobs', 'noise'] * 2
    first = model.forward_tasks(x, tasks)
    misses = model.weight_cache.misses
    second = model.forward_tasks(x, tasks)
    assert model.weight_cache.misses == misses  # every weight came from the cache
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert set(model.weight_cache.cached_tasks()) >= {'stripes', 'blobs', 'noise'}


@pytest.mark.parametrize('tasks, error, match', [
    (['stripes', 'birds', 'noise'], TaskNotFoundError, r"'birds' \(sample 1\)"),
    (['stripes', 'noise'], InputError, '2 task names for a batch of 3'),
    (['stripes'] * 4, InputError, '4 task names'),
    ('stripes', InputError, 'list of task names'),
    (None, InputError, 'list of task names'),
    (['stripes', 3, 'noise'], TaskNotFoundError, r'3 \(sample 1\)'),
])
def test_forward_tasks_bad_tasks_leave_the_model_unchanged(served, tasks, error, match):
    model, _, test = served
    model.set_task('blobs')
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        model.forward_tasks(test['noise'][0][:3], tasks)
    _assert_unchanged(model, before)
    assert issubclass(error, ModCLError)
    model.set_task('base')


def test_forward_tasks_bad_input_and_failing_forward_restore_the_model(served):
    model, _, test = served
    model.set_task('blobs')
    model.train()
    before = _snapshot(model)
    with pytest.raises(InputError, match='3, H, W'):
        model.forward_tasks(torch.zeros(2, 1, SIZE, SIZE), ['noise', 'blobs'])
    with pytest.raises(InputError, match='batch tensor'):
        model.forward_tasks([1, 2], ['noise', 'blobs'])
    _assert_unchanged(model, before)
    calls = []

    def failing_head(*args, **kwargs):  # the second group's forward fails half-way
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('boom')
        return type(model).forward_head(model, *args, **kwargs)

    model.forward_head = failing_head
    try:
        with pytest.raises(RuntimeError, match='boom'):
            model.forward_tasks(test['noise'][0][:2], ['noise', 'stripes'])
    finally:
        del model.forward_head
    assert model.active_task == 'blobs' and [m.training for m in model.modules()] == before[1]
    model.eval()
    model.set_task('base')


def test_forward_tasks_empty_batch(served):
    model, _, _ = served
    assert model.forward_tasks(torch.zeros(0, 3, SIZE, SIZE), []) == []


# ---------------------------------------------------------------------------------------------------- statistics
def _dense_log_likelihood(f, stats):
    """Reference: the same Gaussian mixture with a dense covariance and torch.distributions."""
    power = float(stats['proto_power'])
    f = f.double().sign() * f.double().abs().pow(power)
    basis, scale = stats['proto_basis'].double(), stats['proto_log_scale'].double().exp()
    cov = torch.diag(stats['proto_log_noise'].double().exp()) + basis @ torch.diag(scale) @ basis.t()
    prior = stats['proto_prior'].double()
    lls = []
    for c in range(stats['proto_mean'].shape[0]):
        mvn = torch.distributions.MultivariateNormal(stats['proto_mean'][c].double(), covariance_matrix=cov)
        lls.append(mvn.log_prob(f) + prior[c].log())
    return torch.stack(lls, 1).logsumexp(1)


@pytest.mark.parametrize('rank, power, shrinkage', [(0, 1.0, 0.0), (3, 0.5, 0.0), (5, 1.0, 0.5), (12, 0.5, 0.9)])
def test_prototype_scores_equal_a_dense_gaussian(rank, power, shrinkage):
    g = torch.Generator().manual_seed(0)
    d = 12
    mix = torch.randn(d, d, generator=g)
    stats = []
    for t in range(3):
        y = torch.arange(40) % (t + 2)
        f = (torch.randn(40, d, generator=g) @ mix + 3 * torch.randn(t + 2, d, generator=g)[y]).abs()
        stats.append(prototype_statistics(f, y, t + 2, rank=rank, power=power, shrinkage=shrinkage))
        assert stats[-1]['proto_basis'].shape == (d, min(rank, d))
    query = (torch.randn(7, d, generator=g) @ mix).abs()
    scores, posts = score_prototypes(query, stats)
    dense = torch.stack([_dense_log_likelihood(query, s) for s in stats], 1)
    torch.testing.assert_close(scores, dense, rtol=1e-5, atol=1e-4)
    assert [p.shape for p in posts] == [(7, 2), (7, 3), (7, 4)]
    torch.testing.assert_close(posts[1].exp().sum(1), torch.ones(7, dtype=torch.float64))


def test_prototype_statistics_with_full_rank_recover_the_within_class_covariance():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)
    y = torch.arange(200) % 4
    s = prototype_statistics(f, y, 4, rank=6, power=1.0)
    means = torch.stack([f[y == c].mean(0) for c in range(4)])
    centred = (f - means[y]).double()
    cov = centred.t() @ centred / (200 - 4)
    basis = s['proto_basis'].double()
    approx = basis @ torch.diag(s['proto_log_scale'].double().exp()) @ basis.t()
    torch.testing.assert_close(approx, cov, rtol=1e-4, atol=1e-4)   # all of it in the low-rank part
    torch.testing.assert_close(s['proto_mean'], means, rtol=1e-5, atol=1e-5)
    assert torch.equal(s['proto_prior'], torch.full((4,), 0.25))
    assert float(s['proto_power']) == 1.0


@pytest.mark.parametrize('failures', [1, 2, 3])
def test_prototype_statistics_when_lapack_eigh_does_not_converge(monkeypatch, failures):
    """torch's eigh can fail to converge on a rank-deficient covariance (features that are always 0, fewer samples
    than features, as on small inputs); it is retried with a tiny ridge (same statistics up to rounding), and a
    covariance that still fails gives a StatisticsError, not LAPACK's error."""
    g = torch.Generator().manual_seed(2)
    f = torch.relu(torch.randn(30, 40, generator=g))
    f[:, :10] = 0  # dead channels: zero rows and columns in the covariance
    y = torch.arange(30) % 3
    want = prototype_statistics(f, y, 3, rank=8, power=0.5)
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError('linalg.eigh: The algorithm failed to converge')
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, 'eigh', flaky)
    if failures == 3:
        with pytest.raises(StatisticsError, match='could not be decomposed'):
            prototype_statistics(f, y, 3, rank=8, power=0.5)
        return
    got = prototype_statistics(f, y, 3, rank=8, power=0.5)
    assert len(calls) == failures + 1 and set(got) == set(want)
    for k in want:
        if k == 'proto_basis':  # eigenvectors are defined up to sign
            torch.testing.assert_close(got[k].abs(), want[k].abs(), rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_prototype_statistics_bad_input():
    f = torch.randn(10, 4)
    with pytest.raises(timm_modcl.DataError, match='out of range'):
        prototype_statistics(f, torch.arange(10), 3)
    with pytest.raises(timm_modcl.DataError, match='labels'):
        prototype_statistics(f, torch.arange(9) % 3, 3)
    with pytest.raises(timm_modcl.DataError, match='NaN'):
        prototype_statistics(f.masked_fill(torch.eye(10, 4, dtype=torch.bool), math.nan), torch.arange(10) % 3, 3)
    with pytest.raises(TaskError, match='rank'):
        prototype_statistics(f, torch.arange(10) % 3, 3, rank=-1)
    with pytest.raises(TaskError, match='power'):
        prototype_statistics(f, torch.arange(10) % 3, 3, power=0)
    with pytest.raises(TaskError, match='shrinkage'):
        prototype_statistics(f, torch.arange(10) % 3, 3, shrinkage=2)


def test_compute_task_statistics_changes_nothing_but_the_statistics(served):
    model, train, _ = served
    x, y = train['noise']
    model.set_task('stripes')
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not k.startswith('modcl.') and not k.startswith('modcl_tasks.noise.stats.')}
    old = {k: v.clone() for k, v in model.modcl_tasks['noise'].stats.items()}
    model.modcl_tasks['noise'].stats['user_note'] = torch.ones(2)
    stats = model.compute_task_statistics('noise', torch.utils.data.TensorDataset(x, y), batch_size=7)
    assert model.active_task == 'stripes' and all(m.training for m in model.modules())
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert list(stats) == list(PROTOTYPE_STATS) and torch.equal(model.modcl_tasks['noise'].stats['user_note'], torch.ones(2))
    for k in PROTOTYPE_STATS:  # batch size 7 or the whole set: the same statistics up to rounding
        torch.testing.assert_close(stats[k], old[k], rtol=1e-3, atol=1e-3)
    del model.modcl_tasks['noise'].stats['user_note']
    model.eval()
    model.set_task('base')


def test_compute_task_statistics_bad_input(served):
    model, train, _ = served
    x, y = train['noise']
    before = _snapshot(model)
    with pytest.raises(TaskNotFoundError):
        compute_task_statistics(model, 'birds', (x, y))
    with pytest.raises(timm_modcl.DataError, match='out of range'):
        compute_task_statistics(model, 'noise', (x, y + 1))
    _assert_unchanged(model, before, cache='contents')
    before = _snapshot(model)
    with pytest.raises(timm_modcl.DataError, match='pair'):
        compute_task_statistics(model, 'noise', [1, 2, 3])
    with pytest.raises(timm_modcl.DataError, match='labels'):
        compute_task_statistics(model, 'noise', (x, y[:-1]))
    with pytest.raises(TaskError, match='rank'):
        compute_task_statistics(model, 'noise', (x, y), rank=1.5)
    with pytest.raises(TaskError, match='num_classes'):
        compute_task_statistics(model, 'noise', (x, y), num_classes=5)
    with pytest.raises(TaskError, match='process group'):
        compute_task_statistics(model, 'noise', (x, y), all_reduce=True)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------- prediction
def test_prototype_scorer_identifies_tasks_and_classifies_with_the_chosen_head(served):
    model, _, test = served
    x = torch.cat([v[0] for v in test.values()])
    truth = [name for name, v in test.items() for _ in range(len(v[1]))]
    model.set_task('blobs')
    before = _snapshot(model)
    pred = model.predict_task_agnostic(x)
    _assert_unchanged(model, before, cache=False)  # a prediction may cache the weights of the tasks it ran
    assert isinstance(pred, TaskPrediction) and len(pred) == len(x)
    assert pred.scorer == 'prototype' and pred.candidates == ('stripes', 'blobs', 'noise')
    accuracy = sum(p == t for p, t in zip(pred.tasks, truth)) / len(truth)
    assert accuracy >= 0.9, accuracy  # chance: 1/3
    # the class comes from the chosen task's head, exactly as forward_tasks computes it
    logits = model.forward_tasks(x, pred.tasks)
    for i, z in enumerate(logits):
        assert torch.equal(pred.logits[i], z)
        assert int(pred.labels[i]) == int(z.argmax())
        assert pred.class_names[i] == CLASSES[pred.tasks[i]][int(pred.labels[i])]
        torch.testing.assert_close(pred.class_probs[i], z.softmax(0).max())
    # scores are the Gaussian log-likelihoods of the base task's features
    feats = model.prototype_features(x)
    expected, _ = score_prototypes(feats, [model.modcl_tasks[n].stats for n in pred.candidates])
    # the model scores in float32 (the factors are kept on its device and dtype), the model-free call in float64
    torch.testing.assert_close(pred.task_scores, expected.float(), rtol=2e-4, atol=1e-3)
    torch.testing.assert_close(pred.task_probs.sum(1), torch.ones(len(x)))
    row = pred.to_list()[0]
    assert set(row) == {'task', 'label', 'class_name', 'task_prob', 'class_prob'} and 0 <= row['task_prob'] <= 1
    model.set_task('base')


@pytest.mark.parametrize('scorer', ['energy', 'max_softmax'])
def test_head_scorers_are_the_normalised_confidence_of_each_head(served, scorer):
    model, _, test = served
    x = torch.cat([test['blobs'][0][:3], test['noise'][0][:3]])
    pred = model.predict_task_agnostic(x, scorer=scorer, tasks=['noise', 'blobs', 'stripes'])
    assert pred.candidates == ('noise', 'blobs', 'stripes')
    for j, name in enumerate(pred.candidates):
        with torch.no_grad(), model.use_task(name):
            z = model(x)
        k = z.shape[1]
        if scorer == 'energy':
            expected = z.logsumexp(1) - math.log(k)
        else:
            expected = (z.softmax(1).amax(1) - 1 / k) / (1 - 1 / k)
        torch.testing.assert_close(pred.task_scores[:, j], expected)
        for i in range(len(x)):
            if pred.tasks[i] == name:
                assert torch.equal(pred.logits[i], z[i])
    assert pred.tasks == [pred.candidates[int(i)] for i in pred.task_scores.argmax(1)]


def test_predict_task_agnostic_bad_input_leaves_the_model_unchanged(served, pretrained_model_factory):
    model, train, test = served
    x = test['noise'][0][:2]
    model.set_task('stripes')
    model.train()
    before = _snapshot(model)
    saved = model.modcl_tasks['noise'].stats
    cases = [
        (dict(scorer='knn'), TaskError, 'unknown scorer'),
        (dict(tasks=['noise', 'birds']), TaskNotFoundError, 'birds'),
        (dict(tasks=[]), TaskError, 'empty'),
        (dict(tasks='noise'), TaskError, 'list of task names'),
        (dict(tasks=['base']), StatisticsError, "'base' have no prototype statistics"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            model.predict_task_agnostic(x, **kwargs)
        _assert_unchanged(model, before)
    with pytest.raises(InputError):
        model.predict_task_agnostic(torch.zeros(2, 4, SIZE, SIZE))
    _assert_unchanged(model, before)
    try:
        model.modcl_tasks['noise'].stats = {k: v for k, v in saved.items() if k != 'proto_basis'}
        with pytest.raises(StatisticsError, match="'noise' have no prototype statistics"):
            model.predict_task_agnostic(x)
        bad = dict(saved, proto_prior=saved['proto_prior'][:1])
        model.modcl_tasks['noise'].stats = bad
        with pytest.warns(RuntimeWarning, match="'noise'.*inconsistent shapes.*skipped"):  # the others still work
            assert 'noise' not in model.predict_task_agnostic(x).candidates
        before = _snapshot(model)
        with pytest.raises(StatisticsError, match="'noise'.*inconsistent shapes"):
            model.predict_task_agnostic(x, tasks=['noise'])
        _assert_unchanged(model, before)
        model.modcl_tasks['noise'].stats = dict(saved, proto_mean=saved['proto_mean'][:, :10],
                                          proto_basis=saved['proto_basis'][:10], proto_log_noise=saved['proto_log_noise'][:10])
        with pytest.raises(StatisticsError, match='size 10'):
            model.predict_task_agnostic(x, tasks=['noise'])
        assert model.active_task == 'stripes' and [m.training for m in model.modules()] == before[1]
    finally:
        model.modcl_tasks['noise'].stats = saved
    model.eval()
    model.set_task('base')

    fresh = pretrained_model_factory()
    with pytest.raises(TaskError, match='no learned tasks'):
        fresh.predict_task_agnostic(x)


def _headless(pretrained_model_factory):
    """The pretrained backbone as a plain timm feature extractor made task-aware without a head."""
    return timm_modcl.modulate(pretrained_model_factory(num_classes=0).export_task('base'), head=None)


def test_headless_task_is_classified_by_its_prototypes(pretrained_model_factory):
    model = _headless(pretrained_model_factory)
    data = _image_tasks(12, seed=2)
    for name in ('stripes', 'blobs'):
        model.add_task(name, 0, activate=False)
        with pytest.raises(TaskError, match='num_classes'):
            compute_task_statistics(model, name, data[name])
        compute_task_statistics(model, name, data[name], num_classes=len(CLASSES[name]))
    x = torch.cat([data['stripes'][0][:4], data['blobs'][0][:4]])
    pred = model.predict_task_agnostic(x)
    assert pred.tasks == ['stripes'] * 4 + ['blobs'] * 4
    assert [z.shape for z in pred.logits] == [(2,)] * 4 + [(3,)] * 4
    assert pred.labels[4:].tolist() == data['blobs'][1][:4].tolist()
    assert pred.class_names == [None] * 8
    with pytest.raises(TaskError, match='no head'):
        model.predict_task_agnostic(x, scorer='energy')


# ---------------------------------------------------------------------------------------------------- persistence
def test_prototype_statistics_survive_adapter_files_folders_and_fp16(served, pretrained_model_factory, tmp_path):
    model, _, test = served
    x = torch.cat([v[0][:4] for v in test.values()])
    ref = model.predict_task_agnostic(x)
    path = model.save_task('blobs', tmp_path / 'blobs.safetensors')
    meta, tensors = read_adapter(path)
    assert meta['has_stats'] == 'true' and describe_adapter(path)['has_stats']
    assert {k for k in tensors if k.startswith('stats.')} == {f'stats.{k}' for k in PROTOTYPE_STATS}
    assert describe_adapter(path)['num_stats_values'] == sum(model.modcl_tasks['blobs'].stats[k].numel()
                                                             for k in PROTOTYPE_STATS)
    model.save_tasks(tmp_path / 'folder')
    fresh = pretrained_model_factory()
    fresh.load_tasks(tmp_path / 'folder')
    for n in ('stripes', 'blobs', 'noise'):
        assert all(torch.equal(fresh.modcl_tasks[n].stats[k], model.modcl_tasks[n].stats[k]) for k in PROTOTYPE_STATS)
    got = fresh.eval().predict_task_agnostic(x)
    assert got.tasks == ref.tasks and torch.equal(got.task_scores, ref.task_scores)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))

    half = pretrained_model_factory()
    for n in ('stripes', 'blobs', 'noise'):
        half.load_task(model.save_task(n, tmp_path / f'{n}16.safetensors', dtype=torch.float16))
    got = half.eval().predict_task_agnostic(x)
    assert got.tasks == ref.tasks
    torch.testing.assert_close(got.task_scores, ref.task_scores, rtol=1e-2, atol=2.0)


def test_adapters_without_statistics_keep_loading(served, pretrained_model_factory, tmp_path):
    model, _, test = served
    path = model.save_task('noise', tmp_path / 'plain.safetensors', include_stats=False)
    meta, tensors = read_adapter(path)
    assert meta['has_stats'] == 'false' and not any(k.startswith('stats.') for k in tensors)
    fresh = pretrained_model_factory()
    fresh.load_task(path)
    assert not has_prototypes(fresh, 'noise') and fresh.tasks['noise'].num_stats_values == 0
    with pytest.raises(StatisticsError, match='compute_task_statistics'):
        fresh.predict_task_agnostic(test['noise'][0][:2])
    pred = fresh.eval().predict_task_agnostic(test['noise'][0][:2], scorer='energy')
    assert pred.tasks == ['noise', 'noise']


def test_prototype_statistics_survive_the_hub(hub, served, pretrained_model_factory, tmp_path):
    model, _, test = served
    model.push_tasks_to_hub('alice/served', ['stripes', 'blobs', 'noise'], token=hub.alice, endpoint=hub.url)
    fresh = pretrained_model_factory()
    assert fresh.load_tasks_from_hub('alice/served', endpoint=hub.url, cache_dir=tmp_path / 'c') == \
        ['stripes', 'blobs', 'noise']
    for n in ('stripes', 'blobs', 'noise'):
        assert all(torch.equal(fresh.modcl_tasks[n].stats[k], model.modcl_tasks[n].stats[k]) for k in PROTOTYPE_STATS)
    x = torch.cat([v[0][:3] for v in test.values()])
    a, b = model.predict_task_agnostic(x), fresh.eval().predict_task_agnostic(x)
    assert a.tasks == b.tasks and torch.equal(a.task_scores, b.task_scores)


def test_statistics_follow_state_dicts_and_dtype_moves(served, pretrained_model_factory):
    model, _, test = served
    x = test['stripes'][0][:3]
    fresh = pretrained_model_factory()
    fresh.load_state_dict(model.state_dict())
    assert all(has_prototypes(fresh, n) for n in ('stripes', 'blobs', 'noise'))
    ref = model.predict_task_agnostic(x)
    assert torch.equal(fresh.eval().predict_task_agnostic(x).task_scores, ref.task_scores)
    fresh.to(torch.float64)
    assert fresh.modcl_tasks['blobs'].stats['proto_mean'].dtype == torch.float64
    got = fresh.predict_task_agnostic(x.double())
    assert got.tasks == ref.tasks
    torch.testing.assert_close(got.task_scores, ref.task_scores, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------------------------------- weight cache
@pytest.fixture
def small():
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_050').eval()
    for i, name in enumerate(('a', 'b', 'c')):
        model.add_task(name, 3 + i, variant='paper')
    return model


def _fresh_logits(model, x, task):
    """The same model without anything cached: a deep copy starts with an empty cache."""
    clone = copy.deepcopy(model)
    assert clone.weight_cache.bytes == 0 and not clone.weight_cache.cached_tasks()
    with torch.no_grad(), clone.use_task(task):
        return clone.eval()(x)


def _logits(model, x, task):
    with torch.no_grad(), model.use_task(task):
        return model.eval()(x)


def test_cache_is_never_stale_after_training_steps_and_train_task(small):
    x = torch.randn(4, 3, SIZE, SIZE)
    before = _logits(small, x, 'a')
    small.set_task('a')
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(small(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    after = _logits(small, x, 'a')
    assert not torch.equal(after, before) and torch.equal(after, _fresh_logits(small, x, 'a'))
    with torch.no_grad():  # an in-place edit of a cached task that is not active
        next(iter(small.modcl_tasks['b'].modulators.values())).mul_(3)
    assert torch.equal(_logits(small, x, 'b'), _fresh_logits(small, x, 'b'))
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3, SIZE, SIZE), torch.arange(8) % 5)
    _logits(small, x, 'c')
    timm_modcl.train_task(small, 'c', ds, epochs=1, batch_size=4, progress=False, seed=0)
    assert torch.equal(_logits(small, x, 'c'), _fresh_logits(small, x, 'c'))


def test_cache_is_never_stale_after_load_replace_remove_rename_and_dtype_moves(small, tmp_path):
    x = torch.randn(2, 3, SIZE, SIZE)
    for t in small.tasks:
        _logits(small, x, t)  # everything cached
    # replace a cached, inactive task by another adapter of the same name
    other = copy.deepcopy(small)
    with torch.no_grad():
        for p in other.task_parameters('b'):
            p.add_(0.1)
    other.save_task('b', tmp_path / 'b.safetensors')
    small.load_task(tmp_path / 'b.safetensors', replace=True)
    assert torch.equal(_logits(small, x, 'b'), _logits(other, x, 'b'))
    # ... and the active one
    small.set_task('b')
    small.load_task(tmp_path / 'b.safetensors', replace=True)
    with torch.no_grad():
        assert torch.equal(small(x), _logits(other, x, 'b'))
    # remove, then a new task of the same name
    small.set_task('a')
    small.remove_task('c')
    assert 'c' not in small.weight_cache.cached_tasks()
    small.add_task('c', 5, variant='paper')
    assert torch.equal(_logits(small, x, 'c'), _fresh_logits(small, x, 'c'))
    # rename keeps the right weights under the new name
    want = _logits(small, x, 'c')
    small.rename_task('c', 'd')
    assert 'c' not in small.weight_cache.cached_tasks() and 'd' in small.weight_cache.cached_tasks()
    assert torch.equal(_logits(small, x, 'd'), want)
    # a whole state dict loaded over the model
    small.load_state_dict(other.state_dict())
    for t in other.tasks:
        assert torch.equal(_logits(small, x, t), _logits(other, x, t)), t
    # dtype moves (all tasks' tensors are converted; cached weights would be float32)
    small.to(torch.float64)
    for t in small.tasks:
        assert _logits(small, x.double(), t).dtype == torch.float64
        assert torch.equal(_logits(small, x.double(), t), _fresh_logits(small, x.double(), t)), t
    small.to(torch.float32)
    for t in other.tasks:
        assert torch.equal(_logits(small, x, t), _logits(other, x, t)), t


def test_cache_evicts_least_recently_used_tasks_within_the_limit(small):
    with torch.no_grad():  # eval mode without autograd: what the cache serves
        x = torch.randn(1, 3, SIZE, SIZE)
        cache = small.weight_cache
        _logits(small, x, 'a')
        small.set_task('a')
        small(x)
        per_task = cache.bytes
        assert per_task > 0 and cache.cached_tasks() == ('a',)
        small.set_weight_cache_limit(2 * per_task + per_task // 2)  # room for two tasks
        for t in ('b', 'c'):
            small.set_task(t)
            small(x)
        assert cache.cached_tasks() == ('b', 'c') and cache.bytes <= cache.max_bytes   # 'a' was least recently used
        small.set_task('b')   # b is now the most recent: c goes first
        small.set_task('a')
        small(x)
        assert cache.cached_tasks() == ('b', 'a')
        misses = cache.misses
        small(x)
        assert cache.misses == misses  # served from the cache
        small.set_weight_cache_limit(0)   # the active task's weights stay: it is what the model computes now
        assert cache.cached_tasks() == ('a',) and cache.bytes == per_task
        small.set_task('b')
        assert cache.cached_tasks() == () and cache.bytes == 0
        small(x)
        assert cache.cached_tasks() == ('b',)
        for bad in (-1, 1.5, True, '10'):
            with pytest.raises(TaskError, match='non-negative'):
                small.set_weight_cache_limit(bad)


def test_cache_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv('MODCL_WEIGHT_CACHE_BYTES', '12345')
    assert timm.create_model('modcl_mobilenetv2_050').weight_cache.max_bytes == 12345
    monkeypatch.setenv('MODCL_WEIGHT_CACHE_BYTES', 'lots')
    with pytest.raises(ModCLError, match='MODCL_WEIGHT_CACHE_BYTES'):
        timm.create_model('modcl_mobilenetv2_050')
    monkeypatch.delenv('MODCL_WEIGHT_CACHE_BYTES')
    assert timm.create_model('modcl_mobilenetv2_050').weight_cache.max_bytes == 256 * 2 ** 20


def test_copies_and_pickles_start_with_an_empty_cache(small):
    x = torch.randn(1, 3, SIZE, SIZE)
    for t in small.tasks:
        _logits(small, x, t)
    assert small.weight_cache.bytes > 0
    for clone in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        cache = clone.weight_cache
        assert cache is not small.weight_cache and cache.bytes == 0 and not cache.cached_tasks()
        assert all(m.modcl_cache is cache for m in clone.modules() if hasattr(m, 'modcl_cache'))
        for t in small.tasks:
            assert torch.equal(_logits(clone, x, t), _logits(small, x, t))
    assert 'task(s)' in repr(small.weight_cache)


def test_prepared_prototypes_are_kept_until_the_statistics_change(served):
    """The factorised Gaussian of a task is built once and reused, and rebuilt when its statistics change."""
    import timm_modcl.serving as serving
    from timm_modcl.serving import prototypes
    model = served[0]
    names = [n for n in model.tasks if n != 'base' and serving.has_prototypes(model, n)]
    built = []
    original = prototypes._TaskGaussian.__init__

    def counting(self, name, *args, **kwargs):
        built.append(name)
        original(self, name, *args, **kwargs)
    first = model._gaussians(names)                          # built now or by an earlier test
    prototypes._TaskGaussian.__init__ = counting
    try:
        again = model._gaussians(names)
        assert built == [] and all(a is b for a, b in zip(first, again))
        stats = model.modcl_tasks[names[0]].stats
        with torch.no_grad():
            stats['proto_mean'].add_(0.0)                     # an in-place edit bumps the version
        model._gaussians(names)
        assert built == [names[0]]
    finally:
        prototypes._TaskGaussian.__init__ = original
