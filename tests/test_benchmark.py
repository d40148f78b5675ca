"""The accuracy benchmark's methods, counting, statistics and search on tiny synthetic data (random-init backbone).

The benchmark itself (benchmarks/accuracy.py) is not a unit test; these check that every method trains end to end in
its smallest configuration, stores what it claims, never drifts on old tasks when it should not, and that the
benchmark's own training loop is the one ``train_task`` runs.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCH))

import _fetch  # noqa: E402
import _stats  # noqa: E402
import accuracy  # noqa: E402
import baselines as B  # noqa: E402

BN_VALUES = 34_112  # MobileNetV2's BatchNorm channels x 2 (gamma + beta, or mean + var)
HEAD = 1280 * 3 + 3


def _splits(seed: int, n: int = 12) -> _fetch.TaskSplits:
    """A 3-class task of 8x8 images whose class is the brightness of one quadrant (learnable in a few steps)."""
    rng = np.random.default_rng(seed)

    def make(k):
        y = np.arange(k) % 3
        x = rng.integers(0, 60, size=(k, 8, 8)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 180
        return x, y.astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = make(n), make(6), make(6)
    return _fetch.TaskSplits('synthetic', ['a', 'b', 'c'], xt, yt, xv, yv, xs, ys, n)


CTX = B.Context(weights=None, size=32)
RECIPE = B.Recipe(epochs=1, batch_size=4, lr=1e-2, head_lr=1e-2)


@pytest.mark.parametrize('name', B.FORGETTING_FREE)
def test_method_trains_two_tasks_without_drift_and_counts_its_bytes(name):
    torch.manual_seed(0)
    hp = {'rank': 2} if name == 'lora' else {}
    method = B.build_method(name, CTX, hp)
    probes = {}
    for t in range(2):
        sp = _splits(t)
        loader, train_eval = B._train_loaders(sp, CTX, RECIPE, seed=t)
        hist = method.fit_task(t, sp.num_classes, loader, train_eval, RECIPE, seed=t)
        assert len(hist['train_loss']) == 1 and math.isfinite(hist['train_loss'][0])
        probe = B._eval_loaders(sp, CTX)['val']
        x = next(iter(probe))[0]
        with torch.inference_mode():
            probes[t] = (x, method.predict(t, x).clone())
    x0, before = probes[0]
    with torch.inference_mode():
        after = method.predict(0, x0)
    assert torch.equal(before, after), f'{name}: task 0 changed after training task 1'

    c = method.counts(1)
    assert c['values'] == c['trainable'] + c['bn_stats']
    assert c['bytes'] == 4 * c['values'] + math.ceil(c['mask_bits'] / 8)
    per_task_bn = name not in ('linear_probe',)
    assert c['bn_stats'] == (BN_VALUES if per_task_bn else 0)
    if name == 'linear_probe':
        assert c['trainable'] == HEAD
    elif name == 'bn_head':
        assert c['trainable'] == BN_VALUES + HEAD
    elif name == 'lora':
        base = B.plain_backbone(None)
        per_rank = B.lora_params_per_rank(base, B.lora_target_modules(base))
        assert c['parts']['lora'] == 2 * per_rank and c['rank'] == 2 and c['layers'] == 35
        assert c['trainable'] == 2 * per_rank + BN_VALUES + HEAD
    elif name == 'ia3':
        base = B.plain_backbone(None)
        inputs = sum(m.in_channels for n, m in base.named_modules() if n in B.lora_target_modules(base))
        assert c['parts']['ia3'] == inputs
    elif name == 'piggyback':
        assert c['mask_bits'] == 2_189_760 and c['trainable'] == BN_VALUES + HEAD
    elif name == 'full_finetune':
        assert c['trainable'] == 2_223_872 + HEAD
    elif name == 'modcl':
        info = method.model.tasks['task1']
        assert c['trainable'] == info.num_trainable_params and c['parts']['modulators'] == info.num_modulator_params


def test_sequential_methods_give_accuracy_matrices_and_forget():
    tasks = [_splits(0), _splits(1)]
    for name in ('seq_finetune', 'lwf'):
        r = B.run_sequence_cell(name, {}, RECIPE, tasks, [0, 1], 0, CTX, ('val', 'test'))
        assert r['val_matrix'][0][1] is None and all(0 <= v <= 1 for v in r['val_matrix'][1])
        assert len(r['test_correct']) == 2 and r['counts'][0]['values'] == HEAD
        assert r['counts'][0]['shared_values'] > 2_000_000


def test_piggyback_masks_learn():
    torch.manual_seed(0)
    sp = _splits(0)
    r = B.run_task_cell('piggyback', {}, B.Recipe(epochs=2, batch_size=4, lr=3e-2), sp, 0, 0, CTX, ('val',))
    frac = r['counts']['mask_zero_fraction']
    assert 0.001 < frac < 0.9, frac


@pytest.mark.parametrize('sched,warmup', [('step', 0), ('cosine', 1)])
def test_benchmark_loop_is_train_task(sched, warmup):
    """modcl trained by the benchmark's generic loop (which trains every baseline) and by ``train_task`` ends with the
    same tensors: same optimizer groups, rates, schedule and BN recalibration.

    The loader does not shuffle: ``train_task`` draws a shuffled DataLoader's order differently (tqdm creates an
    extra iterator per epoch, which advances the loader's generator), so only a fixed order can match bit for bit.
    """
    sp = _splits(0)
    recipe = B.Recipe(epochs=3, batch_size=4, lr=1e-2, head_lr=3e-2, sched=sched, warmup_epochs=warmup)
    states = []
    for use in (True, False):
        torch.manual_seed(0)
        m = B.build_method('modcl', CTX, {'config': {'resolution': [4, 4], 'variant': 'identity',
                                                     'layer_resolution': [], 'bn_affine': True}})
        m.use_train_task = use
        loader = B.make_loader(B.ImageSet(sp.x_train, sp.y_train), CTX.size, recipe.batch_size, shuffle=False)
        m.fit_task(0, 3, loader, loader, recipe, seed=5)
        states.append({k: v.detach().clone() for k, v in m.model.modcl_tasks['task0'].tensors().items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert not torch.equal(states[0]['modulator.conv_head'], torch.zeros_like(states[0]['modulator.conv_head']))


def test_plain_backbone_is_modcl_base_task():
    torch.manual_seed(0)
    model = B.modcl_model(None)
    plain = model.export_task('base')
    plain.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), plain(x), atol=1e-5)
    assert type(plain).__name__ == 'EfficientNet' and plain.pretrained_cfg['architecture'] == 'mobilenetv2_100'


def test_lora_rank_reaches_budget():
    base = B.plain_backbone(None)
    per_rank = B.lora_params_per_rank(base, B.lora_target_modules(base))
    assert B.lora_rank_for_budget(base, per_rank * 7) == 7
    assert B.lora_rank_for_budget(base, per_rank * 7 + 1) == 8


def test_splits_are_disjoint_balanced_and_resampled():
    y = np.repeat(np.arange(4), 100)
    ids = np.arange(400)  # the "images" are their own indices
    raw = (ids.reshape(400, 1, 1), y, ids[:40].reshape(40, 1, 1), y[:40], ['a', 'b', 'c', 'd'])
    s0 = _fetch.task_splits('t', 40, 0, raw=raw, val_n=60)
    s1 = _fetch.task_splits('t', 40, 1, raw=raw, val_n=60)
    assert len(s0.y_val) == 60 and np.bincount(s0.y_val).tolist() == [15] * 4
    assert np.bincount(s0.y_train).tolist() == [10] * 4
    assert not set(s0.x_train.ravel()) & set(s0.x_val.ravel())
    assert np.array_equal(s0.x_val, s1.x_val) and not np.array_equal(s0.x_train, s1.x_train)
    assert len(s0.y_test) == 40


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    b = {s: [rng.random(400) < 0.7, rng.random(300) < 0.6] for s in range(3)}
    a = {s: [v | (rng.random(v.size) < 0.3) for v in b[s]] for s in range(3)}  # a is right wherever b is, and more
    r = _stats.paired_bootstrap(a, b, replicates=300)
    assert r['ci'][0] > 0 and r['ci'][0] <= r['diff'] <= r['ci'][1]
    assert _stats.verdict(r['ci'], 'a', 'b') == 'a'
    same = _stats.paired_bootstrap(b, b, replicates=100)
    assert same['diff'] == 0 and same['ci'] == [0.0, 0.0] and _stats.verdict(same['ci']) is None


def test_library_defaults_are_what_the_benchmark_chose():
    """``DEFAULT_CONFIG`` and ``train_task``'s defaults are the modcl setting chosen on validation by the committed
    benchmark run (the per-layer patterns may be spelt differently but must give the same modulators)."""
    import inspect
    import json

    import timm
    from timm_modcl import DEFAULT_CONFIG, TaskConfig
    from timm_modcl.train import train_task
    chosen = json.loads((BENCH / 'results' / 'accuracy.json').read_text())['methods']['modcl']['chosen']
    cfg = TaskConfig.from_dict(chosen['hp']['config'])
    assert (cfg.variant, cfg.bn_affine) == (DEFAULT_CONFIG.variant, DEFAULT_CONFIG.bn_affine)
    model = timm.create_model('modcl_mobilenetv2_100')
    assert model._modulator_shapes(cfg) == model._modulator_shapes(DEFAULT_CONFIG)
    d = {k: p.default for k, p in inspect.signature(train_task).parameters.items()}
    assert (d['lr'], d['head_lr'], d['sched'], d['warmup_epochs']) == (
        chosen['lr'], chosen['head_lr'], chosen['sched'], chosen['warmup_epochs'])
