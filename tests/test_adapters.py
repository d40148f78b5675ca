"""Task adapters as safetensors files: round trips, sizes, bad input, fuzzing, atomic saves."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save as st_save, save_file

import timm
import timm_modcl
from timm_modcl import (
    AdapterError, AdapterFormatError, FingerprintMismatchError, InvalidTaskNameError, ModCLError, TaskExistsError,
)
from timm_modcl.adapter import ADAPTER_FILE, INDEX_FILE, read_adapter

from modcl_tester import ModCLTester


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A model with one trained task, its adapter bytes and reference logits."""
    rt = ModCLTester()
    model = rt.trained_model()
    path = tmp_path_factory.mktemp('saved') / 'alpha.safetensors'
    model.save_task('alpha', path)
    return rt, model, path.read_bytes()


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            list(model.tasks), model.active_task)


def _assert_unchanged(model, before):
    tensors, tasks, active = before
    now = model.state_dict()
    assert list(model.tasks) == tasks and model.active_task == active
    assert set(now) == set(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items())


def test_adapter_metadata_and_contents(saved):
    rt, model, data = saved
    meta, tensors = read_adapter(data)
    assert meta['format'] == 'timm_modcl.adapter' and meta['format_version'] == '2'
    assert meta['architecture'] == 'modcl_mobilenetv2_050'
    assert meta['backbone_fingerprint'] == model.backbone_fingerprint()
    task = json.loads(meta['task'])
    assert task['name'] == 'alpha' and task['class_names'] == ['a', 'b', 'c']
    assert timm_modcl.TaskConfig.from_dict(task['config']) == timm_modcl.DEFAULT_CONFIG and meta['timm_modcl_version']
    assert set(k.split('.')[0] for k in tensors) == {'modulator', 'bn', 'norm', 'head'}  # default: BN affine per task
    assert sum(v.numel() for k, v in tensors.items() if k.startswith('modulator.')) == \
        model.tasks['alpha'].num_modulator_params


def test_adapter_sizes_mobilenetv2_100(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_100')
    plain = timm.create_model('mobilenetv2_100')
    save_file(plain.state_dict(), str(tmp_path / 'full.safetensors'))
    full = os.path.getsize(tmp_path / 'full.safetensors')
    model.add_task('t', 10, (4, 4), bn_affine=False)
    no_head = os.path.getsize(model.save_task('t', tmp_path / 'a.safetensors', include_head=False))
    no_head16 = os.path.getsize(model.save_task('t', tmp_path / 'b.safetensors', include_head=False,
                                                dtype=torch.float16))
    assert no_head < 0.05 * full
    assert no_head16 < 0.026 * full
    fresh = timm.create_model('modcl_mobilenetv2_100')
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match='no head'):
        fresh.load_task(tmp_path / 'b.safetensors', name='t16')
    assert fresh.tasks['t16'].num_modulator_params == 136_860


def test_fp16_adapter_is_close_not_exact(saved, tmp_path):
    rt, model, _ = saved
    model.save_task('alpha', tmp_path / 'h.safetensors', dtype=torch.float16)
    fresh = rt.make_model()
    fresh.load_task(tmp_path / 'h.safetensors')
    x = rt.x()
    half, full = rt.logits(fresh, x, 'alpha'), rt.logits(model, x, 'alpha')
    assert not torch.equal(half, full)
    assert torch.allclose(half, full, rtol=0.1)  # random backbone: large activations, fp16 rounding compounds


# ------------------------------------------------------------------------------------------------ bad input
def _rewrite(data: bytes, tensors=None, meta_update=None, drop=None):
    meta, ts = read_adapter(data)
    if tensors:
        ts.update(tensors)
    for k in drop or ():
        ts.pop(k)
    meta.update(meta_update or {})
    return st_save(ts, metadata=meta)


def _bad_inputs(data: bytes, tmp_path):
    meta, ts = read_adapter(data)
    some_mod = next(k for k in ts if k.startswith('modulator.'))
    task = json.loads(meta['task'])
    pickle_path = tmp_path / 'evil.pt'
    torch.save({'a': torch.zeros(1)}, pickle_path)
    return {
        'truncated': data[: len(data) // 2],
        'empty': b'',
        'garbage header': struct.pack('<Q', 40) + b'{not json' + b' ' * 40,
        'huge header length': struct.pack('<Q', 2 ** 60) + data[8:],
        'pickle file': pickle_path.read_bytes(),
        'other safetensors': st_save({'weight': torch.zeros(3)}),
        'missing tensor': _rewrite(data, drop=[some_mod.replace('modulator.', 'bn.').rsplit('.', 0)[0]] if False
                                   else ['head.bias']),
        'extra tensor': _rewrite(data, tensors={'bn.nonexistent.running_mean': torch.zeros(3)}),
        'unknown modulator layer': _rewrite(data, tensors={'modulator.blocks.99.conv': torch.zeros(1, 1, 1, 1)}),
        'wrong shape': _rewrite(data, tensors={'head.weight': torch.zeros(3, 7)}),
        'modulator too big': _rewrite(data, tensors={some_mod: torch.zeros(10_000, 1, 1, 1)}),
        'nan': _rewrite(data, tensors={some_mod: torch.full_like(ts[some_mod], float('nan'))}),
        'inf': _rewrite(data, tensors={'head.bias': torch.tensor([float('inf'), 0., 0.])}),
        'integer modulator': _rewrite(data, tensors={some_mod: ts[some_mod].to(torch.int32)}),
        'negative running var': _rewrite(data, tensors={'bn.bn1.running_var': -torch.ones_like(ts['bn.bn1.running_var'])}),
        'unknown format version': _rewrite(data, meta_update={'format_version': '99'}),
        'corrupt task json': _rewrite(data, meta_update={'task': '{oops'}),
        'path escaping name': _rewrite(data, meta_update={'task': json.dumps(dict(task, name='../../etc'))}),
        'reserved name': _rewrite(data, meta_update={'task': json.dumps(dict(task, name='base'))}),
        'bad num_classes': _rewrite(data, meta_update={'task': json.dumps(dict(task, num_classes=-2))}),
        'bad variant': _rewrite(data, meta_update={'task': json.dumps(dict(task, config=dict(task['config'], variant='sideways')))}),
        'other architecture': _rewrite(data, meta_update={'architecture': 'modcl_mobilenetv2_100'}),
    }


def test_bad_adapters_raise_and_leave_model_unchanged(saved, tmp_path):
    rt, _, data = saved
    model = rt.make_model()
    model.add_task('existing', 3)
    before = _state(model)
    for label, bad in _bad_inputs(data, tmp_path).items():
        path = tmp_path / f'{label.replace(" ", "_")}.safetensors'
        path.write_bytes(bad)
        with pytest.raises(AdapterFormatError) as info:
            model.load_task(path)
        assert str(info.value), label
        _assert_unchanged(model, before)


def test_pickle_is_never_unpickled(tmp_path, saved):
    rt, _, _ = saved
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    import pickle
    (tmp_path / 'evil.safetensors').write_bytes(pickle.dumps(Evil()))
    with pytest.raises(AdapterFormatError, match='pickle'):
        rt.make_model().load_task(tmp_path / 'evil.safetensors')
    assert not marker.exists()


def test_fingerprint_mismatch_refused_unless_allowed(saved, tmp_path):
    rt, model, data = saved
    other = rt.make_model(seed=123)
    before = _state(other)
    path = tmp_path / 'a.safetensors'
    path.write_bytes(data)
    with pytest.raises(FingerprintMismatchError, match='allow_fingerprint_mismatch'):
        other.load_task(path)
    _assert_unchanged(other, before)
    with pytest.warns(UserWarning, match='other backbone'):
        other.load_task(path, allow_fingerprint_mismatch=True)
    assert 'alpha' in other.tasks


def test_name_clash_and_bad_names(saved, tmp_path):
    rt, model, data = saved
    path = tmp_path / 'a.safetensors'
    path.write_bytes(data)
    fresh = rt.make_model()
    fresh.load_task(path)
    before = _state(fresh)
    with pytest.raises(TaskExistsError, match='replace=True'):
        fresh.load_task(path)
    with pytest.raises(InvalidTaskNameError):
        fresh.load_task(path, name='../x')
    _assert_unchanged(fresh, before)
    fresh.load_task(path, replace=True)
    with pytest.raises(AdapterError):
        fresh.load_task(tmp_path / 'missing.safetensors')
    assert issubclass(AdapterFormatError, ModCLError)


def test_load_tasks_folder_all_or_nothing(saved, tmp_path):
    rt, model, _ = saved
    model.save_tasks(tmp_path / 'ad')
    assert json.loads((tmp_path / 'ad' / INDEX_FILE).read_text())['tasks'] == ['alpha', 'beta', 'gamma']
    (tmp_path / 'ad' / 'gamma' / ADAPTER_FILE).write_bytes(b'broken')
    fresh = rt.make_model()
    before = _state(fresh)
    with pytest.raises(AdapterFormatError):
        fresh.load_tasks(tmp_path / 'ad')
    _assert_unchanged(fresh, before)  # alpha and beta were valid, but nothing was added
    assert fresh.load_tasks(tmp_path / 'ad', names=['beta']) == ['beta']
    with pytest.raises(AdapterError, match='no task'):
        fresh.load_tasks(tmp_path / 'ad', names=['delta'])
    with pytest.raises(AdapterError, match='no modcl_index.json'):
        fresh.load_tasks(tmp_path)
    (tmp_path / 'ad' / INDEX_FILE).write_text(json.dumps({'format': 'timm_modcl.adapters', 'format_version': 1,
                                                          'tasks': ['../../etc']}))
    with pytest.raises(AdapterFormatError, match='invalid task name'):
        fresh.load_tasks(tmp_path / 'ad')


def test_save_is_atomic_when_interrupted(saved, tmp_path, monkeypatch):
    rt, model, data = saved
    target = tmp_path / 'a.safetensors'
    model.save_task('alpha', target)
    good = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt('simulated crash during the write')
    monkeypatch.setattr(os, 'fsync', boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_task('beta', target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors']


def test_killed_save_leaves_no_partial_file(saved, tmp_path):
    """A process killed in the middle of writing leaves the old file intact and no partial file under the name."""
    rt, model, data = saved
    target = tmp_path / 'a.safetensors'
    target.write_bytes(data)
    code = f'''
import os, timm_modcl.adapter as ad
real = os.fsync
def die(fd):
    os._exit(9)
os.fsync = die
ad.atomic_write_bytes(r"{target}", b"x" * 1000)
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, timeout=120)
    assert proc.returncode == 9
    assert target.read_bytes() == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_adapter_bytes(saved, data):
    """Mutated adapter bytes either load validly or raise a library error, leaving the model unchanged."""
    rt, ref_model, good = saved
    model = fuzz_model(rt)
    before = _state(model)
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(['flip', 'truncate', 'insert', 'header']))
        if not buf:
            break
        if kind == 'flip':
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == 'truncate':
            del buf[data.draw(st.integers(0, len(buf) - 1)):]
        elif kind == 'insert':
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # mutate inside the JSON header, where most structure lives
            n = struct.unpack('<Q', bytes(buf[:8]))[0] if len(buf) >= 8 else 0
            if 8 < n + 8 <= len(buf):
                i = data.draw(st.integers(8, 8 + n - 1))
                buf[i] = data.draw(st.integers(32, 126))
    try:
        model.load_task(bytes(buf), name='fuzzed')
    except ModCLError:
        _assert_unchanged(model, before)
    else:
        assert 'fuzzed' in model.tasks
        model.remove_task('fuzzed')


_FUZZ_MODEL = {}


def fuzz_model(rt):
    if 'm' not in _FUZZ_MODEL:
        _FUZZ_MODEL['m'] = rt.make_model()
    return _FUZZ_MODEL['m']
