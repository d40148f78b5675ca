"""Task lifecycle, zero forgetting (bit-identical outputs), caching, export and bad input."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import timm
import timm_modcl
from timm_modcl import (
    BASE_TASK, InputError, InvalidTaskNameError, ResolutionError, StateDictError, TaskError, TaskExistsError,
    TaskNotFoundError,
)


def _model(name='modcl_mobilenetv2_050', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


def _logits(model, x, task=None):
    was = model.training
    model.eval()
    with torch.no_grad():
        if task is None:
            out = model(x)
        else:
            with model.use_task(task):
                out = model(x)
    model.train(was)
    return out


def _train_steps(model, x, steps=3, lr=0.05):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    y = torch.arange(x.shape[0]) % model.num_classes
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- modulator shapes
@pytest.mark.parametrize('res, expected', [((4, 4), 136_860)])
def test_modulator_count_mobilenetv2_100(res, expected):
    model = _model('modcl_mobilenetv2_100')
    info = model.add_task('t', 10, res)
    assert info.num_modulator_params == expected
    assert len(model.modulated_layers) == 52


def test_modulator_shape_rules():
    from timm_modcl import modulator_shape
    assert modulator_shape((96, 16, 1, 1), (4, 4)) == (24, 4, 1, 1)
    assert modulator_shape((96, 1, 3, 3), (4, 4)) == (6, 1, 3, 3)  # depthwise: I < m2
    assert modulator_shape((32, 3, 3, 3), (4, 4)) == (2, 3, 3, 3)  # stem
    assert modulator_shape((2, 64, 1, 1), (4, 4)) == (2, 4, 1, 1)  # O < m1
    assert modulator_shape((8, 1, 3, 3), (4, 4)) is None           # 8 // 16 == 0: unmodulated


@pytest.mark.parametrize('layer, mshape, chunks', [
    (torch.nn.Conv2d(40, 96, 3), (24, 10, 3, 3), 1),
    (torch.nn.Conv2d(96, 96, 3, groups=96), (6, 1, 3, 3), 1),     # depthwise
    (torch.nn.Linear(48, 144), (36, 12), 3),                        # fused qkv: one modulator per chunk
    (torch.nn.Conv1d(8, 16, 5), (4, 2, 5), 1),
])
def test_upsample_matches_interpolate_reference(layer, mshape, chunks):
    from timm_modcl.layers import modulate_layer, upsample_modulator
    layer = layer.double()
    modulate_layer(layer)
    layer.modcl_chunks = chunks
    m = torch.randn(mshape, dtype=torch.float64)
    out_ch, in_ch = layer._buffers['weight'].shape[:2]
    fast = layer.modulation(m, 1.0) - 1.0
    assert torch.allclose(fast, upsample_modulator(m, out_ch, in_ch, chunks), atol=1e-12)
    if chunks > 1:  # chunk c of the upsampled modulator depends on chunk c of the modulator only
        m2 = m.clone()
        m2[: mshape[0] // chunks] += 1.0
        diff = (layer.modulation(m2, 1.0) - layer.modulation(m, 1.0)).abs().sum(1)
        assert diff[out_ch // chunks:].max() == 0 and diff[: out_ch // chunks].min() > 0


def test_per_layer_resolution_mapping_and_callable():
    model = _model()
    full = model.modulator_shapes((4, 4))
    info = model.add_task('a', 3, (4, 4), layer_resolution={'conv_stem': None, 'blocks.*.conv_dw': (2, 2)})
    a = model.modcl_tasks['a']
    assert 'conv_stem' not in a.modulators
    assert a.modulators['blocks.1.0.conv_dw'].shape[0] == model.blocks[1][0].conv_dw.out_channels // 4
    assert info.num_modulator_params != sum(torch.Size(s).numel() for s in full.values())
    model.add_task('b', 3, (4, 4), layer_resolution=lambda name, shape: None if 'conv_pwl' in name else (8, 8))
    assert not any('conv_pwl' in k for k in model.modcl_tasks['b'].modulators)


# ---------------------------------------------------------------- lifecycle API
def test_add_set_remove_tasks_and_metadata():
    model = _model()
    assert model.active_task == BASE_TASK and list(model.tasks) == [BASE_TASK]
    info = model.add_task('cars', 5, class_names=list('abcde'), metadata={'source': 'test'})
    assert model.active_task == 'cars' and info.class_names == tuple('abcde')
    model.add_task('cub', 7, activate=False)
    assert model.active_task == 'cars'
    assert list(model.tasks) == [BASE_TASK, 'cars', 'cub']
    assert model.tasks['cub'].num_added_params == (
        model.tasks['cub'].num_modulator_params + model.tasks['cub'].num_head_params + model.tasks['cub'].num_norm_values)
    model.set_task('cub')
    assert model.num_classes == 7 and model.classifier.out_features == 7
    with model.use_task('cars'):
        assert model.active_task == 'cars'
    assert model.active_task == 'cub'
    model.set_task('cars')
    model.remove_task('cub')
    assert list(model.tasks) == [BASE_TASK, 'cars']
    model.rename_task('cars', 'cars2')
    assert model.active_task == 'cars2'


def test_only_the_active_task_requires_grad():
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 4)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.task_parameters('b')}
    assert not trainable & {id(p) for p in model.task_parameters('a')}
    # every task's tensors are in the module tree (what .to(), DDP and optimizers see), only the active one trains
    every = {id(p) for p in model.parameters()}
    assert every >= {id(p) for t in model.tasks for p in model.task_parameters(t)}
    model.set_task(BASE_TASK)  # the base task is trainable too: zero identity modulators and the pretrained head
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert 'classifier.weight' in names and 'classifier.bias' in names
    mods = [n for n in names if '.modulator.' in n]
    assert mods and all(n.startswith('modcl_tasks.base.modulator.') for n in mods)
    assert not any(p.any() for n, p in model.named_parameters() if n.startswith('modcl_tasks.base.modulator.'))


@pytest.mark.parametrize('make_opt', [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5),
    lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.5),
], ids=['adamw', 'sgd', 'adam'])
def test_optimizer_over_all_parameters_changes_only_the_active_task(make_opt, x_small):
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 4)
    before = {t: {k: v.detach().clone() for k, v in model.task_tensors(t).items()} for t in model.tasks}
    frozen = {k: v.clone() for k, v in model.frozen_tensors().items()}
    opt = make_opt(model.parameters())   # weight decay over everything: must still never touch another task
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x_small).logsumexp(1).mean().backward()
        opt.step()
    model.set_task('a')   # switching tasks with the same optimizer: no stale gradient reaches 'b' either
    opt.step()
    for t in ('base', 'a'):
        assert all(torch.equal(v, model.task_tensors(t)[k]) for k, v in before[t].items()), t
    assert any(not torch.equal(v, model.task_tensors('b')[k]) for k, v in before['b'].items())
    assert all(torch.equal(v, model.frozen_tensors()[k]) for k, v in frozen.items())


def test_backbone_never_gets_gradients(x_small):
    model = _model()
    model.add_task('a', 3)
    frozen = model.frozen_tensors()
    model.train()
    model(x_small).sum().backward()
    assert all(not t.requires_grad and t.grad is None for t in frozen.values())


def test_variants_identity_starts_at_pretrained(x_small):
    model = _model()
    base = _logits(model, x_small)
    model.add_task('id', 1000, variant='identity')
    model.classifier.load_state_dict(model.modcl_tasks[BASE_TASK].head.state_dict())
    assert torch.allclose(_logits(model, x_small), base, atol=1e-5)
    model.add_task('paper', 1000, variant='paper')
    model.classifier.load_state_dict(model.modcl_tasks[BASE_TASK].head.state_dict())
    assert not torch.allclose(_logits(model, x_small), base, atol=1e-3)


def test_train_mode_updates_only_active_bn_stats(x_small):
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 3)
    before_a = {k: v.clone() for k, v in model.modcl_tasks['a'].tensors().items()}
    before_base = {k: v.clone() for k, v in model.modcl_tasks[BASE_TASK].tensors().items()}
    model.train()
    model(x_small)
    after_b = model.modcl_tasks['b'].tensors()
    assert not torch.equal(after_b['bn.bn1.running_mean'], model.modcl_tasks['a'].tensors()['bn.bn1.running_mean'])
    assert all(torch.equal(v, model.modcl_tasks['a'].tensors()[k]) for k, v in before_a.items())
    assert all(torch.equal(v, model.modcl_tasks[BASE_TASK].tensors()[k]) for k, v in before_base.items())


# ---------------------------------------------------------------- zero forgetting
def test_zero_forgetting_bit_identical(x_small):
    model = _model()
    model.add_task('a', 3)
    _train_steps(model, x_small)
    ref_a = _logits(model, x_small)
    ref_base = _logits(model, x_small, BASE_TASK)

    model.add_task('b', 5, variant='identity')
    _train_steps(model, x_small)
    assert torch.equal(_logits(model, x_small, 'a'), ref_a)
    model.add_task('c', 2, (2, 2))
    _train_steps(model, x_small)
    for name in ['a', 'b', 'c', 'a', BASE_TASK, 'b', 'a']:
        model.set_task(name)
    model.remove_task('c')
    assert torch.equal(_logits(model, x_small, 'a'), ref_a)
    assert torch.equal(_logits(model, x_small, BASE_TASK), ref_base)

    restored = _model()
    restored.load_state_dict(model.state_dict())
    assert list(restored.tasks) == list(model.tasks)
    assert torch.equal(_logits(restored, x_small, 'a'), ref_a)
    assert torch.equal(_logits(restored, x_small, BASE_TASK), ref_base)


def test_base_task_reproduces_plain_timm(x_small):
    plain = timm.create_model('mobilenetv2_050', pretrained=False).eval()
    model = _model()
    model.load_state_dict(plain.state_dict())
    model.add_task('a', 3)
    _train_steps(model, x_small)
    assert torch.equal(_logits(model, x_small, BASE_TASK), _logits(plain, x_small))


def test_restore_in_fresh_process(tmp_path, x_small):
    model = _model()
    model.add_task('a', 3)
    _train_steps(model, x_small)
    model.add_task('b', 4, (8, 8))
    torch.save(model.state_dict(), tmp_path / 'sd.pt')
    torch.save(x_small, tmp_path / 'x.pt')
    torch.save({t: _logits(model, x_small, t) for t in model.tasks}, tmp_path / 'ref.pt')
    code = f'''
import torch, timm, timm_modcl
m = timm.create_model("modcl_mobilenetv2_050")
m.load_state_dict(torch.load(r"{tmp_path / 'sd.pt'}", weights_only=True))
m.eval()
x = torch.load(r"{tmp_path / 'x.pt'}", weights_only=True)
ref = torch.load(r"{tmp_path / 'ref.pt'}", weights_only=True)
assert list(m.tasks) == list(ref), list(m.tasks)
for t, r in ref.items():
    with torch.no_grad(), m.use_task(t):
        assert torch.equal(m(x), r), t
print("OK", m.active_task)
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'OK b'


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just('add'), st.sampled_from(['paper', 'identity']), st.sampled_from([2, 4, 8])),
        st.tuples(st.just('train'), st.integers(1, 2)),
        st.tuples(st.just('switch'), st.integers(0, 10)),
        st.tuples(st.just('remove'), st.integers(0, 10)),
        st.tuples(st.just('roundtrip')),
        st.tuples(st.just('eval_other'), st.integers(0, 10)),
    ),
    min_size=1, max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_property_random_operation_sequences_never_change_frozen_tasks(ops):
    """Random add / train / switch / remove / state-dict round trips: every earlier task's logits stay identical."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model('modcl_mobilenetv2_050')
    refs = {BASE_TASK: _logits(model, x)}
    counter = 0
    for op in ops:
        kind = op[0]
        if kind == 'add':
            counter += 1
            name = f't{counter}'
            model.add_task(name, 3, op[2], variant=op[1])
            refs[name] = _logits(model, x)
        elif kind == 'train':
            active = model.active_task
            _train_steps(model, x, steps=op[1])
            refs[active] = _logits(model, x)  # the trained task legitimately changes; nothing else may
        elif kind == 'switch':
            model.set_task(list(refs)[op[1] % len(refs)])
        elif kind == 'remove':
            victims = [t for t in refs if t not in (BASE_TASK, model.active_task)]
            if victims:
                victim = victims[op[1] % len(victims)]
                model.remove_task(victim)
                del refs[victim]
        elif kind == 'roundtrip':
            fresh = _model('modcl_mobilenetv2_050')
            fresh.load_state_dict(model.state_dict())
            model = fresh
        elif kind == 'eval_other':
            _logits(model, x, list(refs)[op[1] % len(refs)])
        for name, ref in refs.items():
            assert torch.equal(_logits(model, x, name), ref), (name, ops)


# ---------------------------------------------------------------- eval cache
def test_eval_cache_never_stale(x_small):
    model = _model()
    model.add_task('a', 3)
    model.eval()
    with torch.no_grad():
        first = model(x_small)
        misses = model.weight_cache.misses
        again = model(x_small)
    assert model.weight_cache.misses == misses > 0  # the second forward recomputes nothing
    assert torch.equal(first, again)
    # a parameter update (optimizer step on the modulator) must show up in eval
    with torch.no_grad():
        model.conv_stem.modulator.add_(0.5)
        changed = model(x_small)
    assert not torch.equal(changed, first)
    uncached = copy.deepcopy(model)
    uncached.weight_cache.clear()
    with torch.no_grad():
        assert torch.equal(uncached(x_small), changed)
    # load_state_dict copies in place: the cache must follow
    model2 = _model()
    model2.add_task('a', 3)
    model2.eval()
    with torch.no_grad():
        model2(x_small)
        model2.load_state_dict(model.state_dict())
        assert torch.equal(model2(x_small), changed)
    # grad-enabled eval uses fresh weights so gradients reach the modulators
    out = model(x_small)
    out.sum().backward()
    assert model.conv_stem.modulator.grad is not None


def test_weight_cache_keeps_hot_tasks_within_its_limit(x_small):
    model = _model()
    for name in ('a', 'b', 'c'):
        model.add_task(name, 3, variant='paper')  # non-zero modulators: every layer's weight is cached
    model.eval()
    with torch.no_grad(), model.use_task('a'):
        model(x_small)
    per_task = model.weight_cache.bytes
    assert per_task > 0
    model.set_weight_cache_limit(int(2.5 * per_task))  # room for two tasks
    with torch.no_grad():
        for name in ('a', 'b', 'c'):
            with model.use_task(name):
                model(x_small)
    assert model.weight_cache.cached_tasks()[-2:] == ('b', 'c') and 'a' not in model.weight_cache.cached_tasks()
    assert model.weight_cache.bytes <= 2.5 * per_task
    misses = model.weight_cache.misses
    with torch.no_grad(), model.use_task('b'):  # warm: nothing recomputed
        model(x_small)
    assert model.weight_cache.misses == misses
    with torch.no_grad(), model.use_task('a'):  # cold: recomputed, and the least recently used task goes (b:
        model(x_small)                          # leaving use_task('b') re-activated c)
    assert model.weight_cache.misses > misses
    assert model.weight_cache.cached_tasks() == ('a', 'c')  # c is active again, so the most recent
    model.set_weight_cache_limit(0)  # the active task's weights always stay
    assert model.weight_cache.cached_tasks() == (model.active_task,) or model.weight_cache.cached_tasks() == ()
    with pytest.raises(TaskError):
        model.set_weight_cache_limit(-1)


# ---------------------------------------------------------------- export
def test_export_task_plain_timm_model(x_small):
    model = _model()
    model.add_task('a', 3, variant='paper')
    _train_steps(model, x_small)
    ref = _logits(model, x_small)
    plain = model.export_task('a').eval()
    assert type(plain) is timm.models.efficientnet.EfficientNet
    assert not any(isinstance(m, (timm_modcl.ModulatedWeight, timm_modcl.TaskNorm)) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(x_small), ref, atol=1e-5)
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)  # loadable by plain timm without timm_modcl
    buf.seek(0)
    fresh = timm.create_model('mobilenetv2_050', num_classes=3).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.allclose(fresh(x_small), ref, atol=1e-5)


# ---------------------------------------------------------------- pretrained loading
def test_pretrained_torchvision_layout_file(pretrained_model_factory, backbone_file, x_small):
    model = pretrained_model_factory()
    sd = torch.load(backbone_file, weights_only=True)
    assert torch.equal(model.conv_stem.weight, sd['features.0.0.weight'])
    assert torch.equal(model.bn2.running_var, sd['features.18.1.running_var'])
    plain = timm.create_model('mobilenetv2_100', num_classes=0).eval()
    keys = [k for k in plain.state_dict() if 'num_batches' not in k]
    src = [v for k, v in sd.items() if 'num_batches' not in k]
    plain.load_state_dict(dict(zip(keys, src)), strict=False)
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model.eval()(x_small), plain(x_small))


def test_pretrained_timm_layout_file_and_headless(tmp_path, x_small):
    from safetensors.torch import save_file
    plain = timm.create_model('mobilenetv2_100', num_classes=1000).eval()
    save_file(plain.state_dict(), str(tmp_path / 'timm.safetensors'))
    model = timm.create_model('modcl_mobilenetv2_100', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'timm.safetensors'))).eval()
    with torch.no_grad():
        assert torch.equal(model(x_small), plain(x_small))
    headless = {k: v for k, v in plain.state_dict().items() if not k.startswith('classifier')}
    save_file(headless, str(tmp_path / 'headless.safetensors'))
    model = timm.create_model('modcl_mobilenetv2_100', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'headless.safetensors')))
    assert torch.equal(model.conv_head.weight, plain.conv_head.weight)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('name', ['', 'a/b', '..', 'a.b', 'x' * 65, ' lead', 'a\\b', None, 3])
def test_bad_task_names(name):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(InvalidTaskNameError):
        model.add_task(name, 3)
    assert list(model.tasks) == [BASE_TASK]
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


@pytest.mark.parametrize('res', [(0, 4), (4, -1), (2.5, 2), '44', (4,), (4, 4, 4), (True, 2), (1000, 1000)])
def test_bad_resolution(res):
    model = _model()
    with pytest.raises(ResolutionError):
        model.add_task('a', 3, res)
    assert list(model.tasks) == [BASE_TASK] and model.active_task == BASE_TASK


@pytest.mark.parametrize('n', [0, -1, 2.0, True, '3'])
def test_bad_num_classes(n):
    model = _model()
    with pytest.raises(TaskError):
        model.add_task('a', n)
    assert list(model.tasks) == [BASE_TASK]


def test_duplicate_unknown_and_protected_tasks():
    model = _model()
    model.add_task('a', 3)
    with pytest.raises(TaskExistsError):
        model.add_task('a', 3)
    with pytest.raises(TaskExistsError):
        model.add_task(BASE_TASK, 3)
    with pytest.raises(TaskNotFoundError, match="unknown task 'zz'"):
        model.set_task('zz')
    assert model.active_task == 'a'
    with pytest.raises(TaskNotFoundError):
        model.remove_task('zz')
    with pytest.raises(TaskError):
        model.remove_task(BASE_TASK)
    with pytest.raises(TaskError):
        model.remove_task('a')  # active
    with pytest.raises(TaskError):
        model.add_task('b', 3, variant='nope')
    with pytest.raises(TaskError):
        model.add_task('b', 3, class_names=['x'])
    assert list(model.tasks) == [BASE_TASK, 'a']
    model.add_task('a', 4, replace=True)
    assert model.tasks['a'].num_classes == 4 and model.classifier.out_features == 4


def test_wrong_input_channels():
    model = _model().eval()
    with pytest.raises(InputError, match=r'\(N, 3, H, W\)'):
        model(torch.randn(1, 1, 32, 32))


def test_state_dict_from_other_width_changes_nothing(x_small):
    model = _model('modcl_mobilenetv2_050')
    model.add_task('a', 3)
    ref = _logits(model, x_small)
    before = _snapshot(model)
    other = timm.create_model('modcl_mobilenetv2_075')
    with pytest.raises(StateDictError, match='shape mismatch'):
        model.load_state_dict(other.state_dict())
    with pytest.raises(StateDictError):
        model.load_state_dict(timm.create_model('mobilenetv2_100').state_dict())
    with pytest.raises(StateDictError):
        model.load_state_dict({'conv_stem.weight': model.conv_stem.weight})  # missing keys, strict
    assert list(model.tasks) == [BASE_TASK, 'a'] and model.active_task == 'a'
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())
    assert torch.equal(_logits(model, x_small), ref)


def test_device_dtype_moves_keep_all_tasks(x_small):
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 3)
    model.double()
    assert all(t.dtype == torch.float64 for t in model.modcl_tasks['a'].tensors().values() if t.is_floating_point())
    assert model.classifier is model.modcl_tasks['b'].head
    model.float()
    model.set_task('a')
    assert model.conv_stem.modulator is model.modcl_tasks['a'].modulators['conv_stem']
    _train_steps(model, x_small, steps=1)



# ---------------------------------------------------------------------------------------------------- module tree
DATA = __import__('pathlib').Path(__file__).parent / 'data'


def test_a_format_2_state_dict_of_timm_modcl_0_2_still_loads():
    """A state dict written by timm_modcl 0.2 (format 2: the active task under timm's keys, the others under
    ``modcl.tasks.<name>.``), stored with the outputs it gave: the same outputs for every task, and it saves again as
    format 3."""
    from safetensors.torch import load_file
    sd = load_file(DATA / 'modcl_0.2_state_dict_test_efficientnet.safetensors')
    expected = load_file(DATA / 'modcl_0.2_state_dict_test_efficientnet.expected.safetensors')
    assert any(k.startswith('modcl.tasks.b.') for k in sd) and 'blocks.0.0.conv.modulator' in sd
    model = timm_modcl.modulate(timm.create_model('test_efficientnet', num_classes=4)).eval()
    model.load_state_dict(sd)
    assert list(model.tasks) == ['base', 'a', 'b'] and model.active_task == 'a'
    with torch.no_grad():
        for t in ('base', 'a', 'b'):
            torch.testing.assert_close(model.forward_task(expected['input'], t), expected[f'expected.{t}'])
    again = timm_modcl.modulate(timm.create_model('test_efficientnet', num_classes=4)).eval()
    sd3 = model.state_dict()
    assert not any(k.startswith('modcl.tasks.') for k in sd3) and any(k.startswith('modcl_tasks.b.') for k in sd3)
    again.load_state_dict(sd3)
    with torch.no_grad():
        for t in ('base', 'a', 'b'):
            assert torch.equal(again.forward_task(expected['input'], t), model.forward_task(expected['input'], t))


def test_every_task_is_in_the_module_tree_once(x_small):
    """Tasks are modules (``model.modcl_tasks``): state_dict holds each tensor once, and PyTorch's own .to(),
    deepcopy and pickling carry every task without a hand-written override."""
    import pickle
    from safetensors.torch import load, save
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 4, activate=False, variant='paper')
    model.eval()
    assert isinstance(model.modcl_tasks, torch.nn.ModuleDict) and list(model.modcl_tasks) == list(model.tasks)
    sd = model.state_dict()
    ptrs = [v.data_ptr() for v in sd.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))   # no tensor twice (safetensors' save refuses shared tensors)
    assert 'classifier.weight' in sd and 'modcl_tasks.b.head.weight' in sd and 'modcl_tasks.a.head.weight' not in sd
    restored = _model()
    restored.load_state_dict(load(save({k: v.contiguous() for k, v in sd.items()})))
    with torch.no_grad():
        ref = {t: model.forward_task(x_small, t) for t in model.tasks}
        for clone in (restored, copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).double()):
            for t, y in ref.items():
                got = clone.forward_task(x_small.to(clone.backbone_dtype), t)
                torch.testing.assert_close(got.float(), y, rtol=1e-5, atol=1e-5)
    doubled = copy.deepcopy(model).double()
    assert all(v.dtype == torch.float64 for t in doubled.tasks for v in doubled.task_tensors(t).values()
               if v.is_floating_point()) and doubled.task_tensors("b")["modulator.conv_stem"].dtype == torch.float64


def test_ddp_style_capture_sees_every_task_and_trains_only_the_bound_one(x_small):
    """A wrapper that captures ``parameters()`` once (DDP, accelerate, an optimizer) sees every task's tensors, and
    a later ``set_task`` decides which of them train: nothing else can change."""
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 3, activate=False)
    captured = list(model.parameters())
    opt = torch.optim.SGD(captured, lr=0.5, weight_decay=0.1)
    model.train()
    for task in ('a', 'b'):
        model.set_task(task)
        before = {t: {k: v.clone() for k, v in model.task_tensors(t).items()} for t in model.tasks}
        opt.zero_grad()
        model(x_small).logsumexp(1).mean().backward()
        opt.step()
        for t in model.tasks:
            changed = any(not torch.equal(v, model.task_tensors(t)[k]) for k, v in before[t].items())
            assert changed == (t == task), (task, t)
