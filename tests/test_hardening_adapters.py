"""Hardening of the adapter-file component: what ``add_task`` accepts (task names, metadata) round-trips through
an adapter file; hostile adapter files (bad ``num_classes``, unsupported dtypes, missing or overflowing modulators,
malformed task fields, read by ``load_task``, ``create_model(adapters=...)`` and ``modcl info``) are refused; saved
files are byte-identical and get the usual permissions.

Hostile input: every bad input gets a typed error (a ``ModCLError``), and the model, its files and the global random
state stay as they were. Ends with a fuzz run of >= 2,000 mutated adapters."""
import json
import os
import random
import stat
import struct
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import save as st_save

import timm
from timm_modcl import AdapterError, AdapterFormatError, InvalidTaskNameError, ModCLError, TaskError
from timm_modcl.adapter import ADAPTER_FILE, INDEX_FILE, read_adapter
from _hardening import assert_same_state as _assert_same, model_state as _state


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('modcl_mobilenetv2_050').eval()


@pytest.fixture(scope='module')
def adapter():
    model = _model()
    model.add_task('t1', 3, (8, 8), class_names=['a', 'b', 'c'])
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    model.eval()
    from timm_modcl.adapter import adapter_bytes
    return adapter_bytes(model, 't1'), adapter_bytes(model, 't1', include_head=False)


def _rewrite(data, tensors=None, drop=(), meta=None, task=None):
    m, ts = read_adapter(data)
    ts = dict(ts)
    ts.update(tensors or {})
    for k in drop:
        ts.pop(k)
    if task is not None:
        m['task'] = json.dumps(dict(json.loads(m['task']), **task))
    m.update(meta or {})
    return st_save(ts, metadata=m)


# ---------------------------------------------------------------- task names and metadata round-trip
def test_metadata_given_as_numbers_round_trips(tmp_path):
    model = _model()
    model.add_task('n', 3, metadata={'acc': 0.9, 'epochs': 30, 'tuned': True, 'note': 'x'})
    assert model.tasks['n'].metadata == {'acc': '0.9', 'epochs': '30', 'tuned': 'true', 'note': 'x'}
    fresh = _model()
    fresh.load_task(model.save_task('n', tmp_path / 'n.safetensors'))
    fresh.load_state_dict(model.state_dict())
    assert fresh.tasks['n'].metadata == model.tasks['n'].metadata
    before = _state(model)
    for bad in ({'a': [1]}, {1: 'x'}, {'a': float('nan')}, 'acc=0.9', {'k' * 10: 'v' * 70_000}):
        with pytest.raises(TaskError):
            model.add_task('bad', 3, metadata=bad)
    _assert_same(model, before)


@pytest.mark.parametrize('name', ['a\n', 'a ', 'a\t', '\na', 'é', 'a\x00'])
def test_task_names_with_whitespace_or_non_ascii_are_refused(name):
    model = _model()
    with pytest.raises(InvalidTaskNameError):
        model.add_task(name, 3)
    assert list(model.tasks) == ['base']


# ---------------------------------------------------------------- loading: hostile adapter files are refused
@pytest.mark.parametrize('num_classes', ['abc', -5, 10 ** 9, 200_000, 2.5, True, None])
def test_headless_adapter_with_bad_num_classes(adapter, num_classes):
    _, headless = adapter
    model = _model()
    before = _state(model)
    bad = _rewrite(headless, task={'num_classes': num_classes})
    t0 = time.perf_counter()
    with pytest.raises(AdapterFormatError, match='num_classes|fresh one'):
        model.load_task(bad)
    assert time.perf_counter() - t0 < 5  # refused from the metadata, nothing allocated first
    _assert_same(model, before)


@pytest.mark.parametrize('dtype', [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.bool, torch.complex64])
def test_adapter_with_unsupported_dtypes(adapter, dtype):
    data, _ = adapter
    model = _model()
    before = _state(model)
    ts = read_adapter(data)[1]
    key = next(k for k in ts if k.startswith('modulator.'))
    bad = _rewrite(data, tensors={key: ts[key].to(dtype)})
    with pytest.raises(AdapterFormatError, match='float16, bfloat16, float32 or float64'):
        model.load_task(bad)
    _assert_same(model, before)


def test_adapter_with_missing_modulators_is_refused(adapter):
    data, _ = adapter
    model = _model()
    before = _state(model)
    keys = [k for k in read_adapter(data)[1] if k.startswith('modulator.')]
    for drop in (keys[:1], keys):
        with pytest.raises(AdapterFormatError, match='missing tensor'):
            model.load_task(_rewrite(data, drop=drop))
    _assert_same(model, before)


def test_adapter_with_overflowing_modulators_is_refused(adapter):
    data, _ = adapter
    model = _model()
    ts = read_adapter(data)[1]
    key = next(k for k in ts if k.startswith('modulator.'))
    for value, match in ((3e38, 'beyond'), (2e6, 'beyond'), (float('inf'), 'NaN or Inf')):
        with pytest.raises(AdapterFormatError, match=match):
            model.load_task(_rewrite(data, tensors={key: torch.full_like(ts[key], value)}))
    # the library never writes what it would refuse to read
    model.add_task('big', 3, (8, 8))
    with torch.no_grad():
        model.modcl_tasks['big'].modulators[key[len('modulator.'):]].fill_(2e6)
    with pytest.raises(AdapterError, match='beyond'):
        model.save_task('big', '/dev/null')


def test_failed_load_leaves_the_global_random_state(adapter):
    data, headless = adapter
    model = _model()
    before = _state(model)
    with pytest.raises(AdapterFormatError):
        model.load_task(_rewrite(data, drop=['head.bias']))
    with pytest.raises(AdapterFormatError):
        model.load_task(_rewrite(headless, task={'num_classes': -1}))
    _assert_same(model, before)


@pytest.mark.parametrize('task_update', [
    {'config': '[1]'}, {'config': {'resolution': 4}}, {'config': {'resolution': [4, 'x']}}, {'num_classes': '3'},
    {'class_names': 'abc'}, {'name': '../x'}, {'metadata': {'a': [1]}},
])
def test_cli_info_and_load_task_reject_malformed_fields_alike(adapter, tmp_path, task_update):
    model = _model()
    model.add_task('t1', 3, (8, 8))
    folder = model.save_tasks(tmp_path / 'ad')
    path = folder / 't1' / ADAPTER_FILE
    path.write_bytes(_rewrite(path.read_bytes(), task=task_update))
    with pytest.raises(AdapterFormatError):
        _model().load_task(path)
    proc = subprocess.run([sys.executable, '-m', 'timm_modcl', 'info', '--out', str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith('modcl: error:') and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_adapters_argument_with_a_missing_path(tmp_path):
    with pytest.raises(AdapterError, match='no such file or folder, and not a Hub repo id'):
        timm.create_model('modcl_mobilenetv2_050', adapters='/no/such/path')
    with pytest.raises(AdapterError, match='no such file or folder'):
        timm.create_model('modcl_mobilenetv2_050', adapters=str(tmp_path / 'missing'))


# ---------------------------------------------------------------- saving: deterministic bytes and the usual permissions
def test_saves_are_byte_identical(tmp_path):
    model = _model()
    model.add_task('d', 3, (8, 8), metadata={'b': '1', 'a': '2'})
    one = model.save_task('d', tmp_path / 'one.safetensors').read_bytes()
    two = model.save_task('d', tmp_path / 'two.safetensors').read_bytes()
    assert one == two
    model.save_tasks(tmp_path / 'ad')
    code = ('import torch, timm, timm_modcl; torch.manual_seed(0); '
            f'm = timm.create_model("modcl_mobilenetv2_050"); m.load_task(r"{tmp_path / "one.safetensors"}"); '
            f'm.save_task("d", r"{tmp_path / "three.safetensors"}")')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)  # another process, other hash seeds
    assert (tmp_path / 'three.safetensors').read_bytes() == one
    assert read_adapter(one)[0]['has_stats'] == 'false'


def test_saved_files_get_the_usual_permissions(adapter, tmp_path):
    model = _model()
    model.add_task('p', 3)
    old = os.umask(0o022)
    try:
        path = model.save_task('p', tmp_path / 'p.safetensors')
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        model.save_tasks(tmp_path / 'folder')
        for f in (tmp_path / 'folder' / INDEX_FILE, tmp_path / 'folder' / 'p' / ADAPTER_FILE):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        os.chmod(path, 0o640)
        model.save_task('p', path)  # overwriting keeps the existing mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o077)
        assert stat.S_IMODE(model.save_task('p', tmp_path / 'q.safetensors').stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------- fuzz: >= 2,000 mutated adapters
_DTYPES = ['F16', 'BF16', 'F32', 'F64', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'F8_E5M2', 'C64', 'X']

_VALUES = [None, True, False, 0, -1, 1, 3, 10 ** 12, -(10 ** 12), 2.5, float('nan'), '', 'abc', '../x', 'base',
           'a\n', [], [1], [4, 4], [0, 4], [4, 'x'], {}, {'a': 1}, 'é' * 70]


def _mutate(good: bytes, header: dict, rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    buf = bytearray(good)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 1:
        return bytes(buf[:rng.randrange(len(buf))])
    if kind == 2:
        i = rng.randrange(len(buf))
        return bytes(buf[:i]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + bytes(buf[i:])
    h = json.loads(json.dumps(header))
    meta = h['__metadata__']
    task = json.loads(meta['task'])
    names = [k for k in h if k != '__metadata__']
    key = rng.choice(names)
    if kind == 3:
        h[key]['dtype'] = rng.choice(_DTYPES)
    elif kind == 4:
        h[key]['shape'] = [rng.choice([0, 1, 2, 3, 7, 10 ** 6, -1]) for _ in range(rng.randint(0, 5))]
    elif kind == 5:
        h[key]['data_offsets'] = [rng.randint(-5, len(good)), rng.randint(-5, 2 * len(good))]
    elif kind == 6:
        if rng.random() < 0.5:
            del h[key]
        else:
            h[key.replace('modulator', 'bn') + rng.choice(['', '.x'])] = h.pop(key)
    elif kind == 7:
        field = rng.choice(['num_classes', 'name', 'class_names', 'metadata', 'config'])
        task[field] = rng.choice(_VALUES)
        meta['task'] = json.dumps(task)
    elif kind == 8:
        cfg = task.get('config') or {}
        cfg[rng.choice(['resolution', 'variant', 'layer_resolution', 'bn_affine', 'extra'])] = rng.choice(
            _VALUES + [[['conv_stem', None]], [['*', [1, 1]]], [['blocks.*', [64, 64]]]])
        task['config'] = cfg
        meta['task'] = json.dumps(task)
    else:
        meta[rng.choice(['format', 'format_version', 'has_head', 'has_stats', 'architecture', 'dtype'])] = \
            rng.choice(['', '1', '2', '99', 'false', 'true', 'timm_modcl.adapter', 'modcl_mobilenetv2_100'])
    (n,) = struct.unpack('<Q', good[:8])
    text = json.dumps(h).encode()
    return struct.pack('<Q', len(text)) + text + good[8 + n:]


def test_fuzz_thousands_of_mutated_adapters(adapter):
    """2,000 mutations of a real adapter (bytes, dtypes, shapes, offsets, names, metadata, config): each loads validly
    or raises a ModCLError, and a failure changes nothing."""
    data, headless = adapter
    model = _model()
    rng = random.Random(0)
    sources = []
    for good in (data, headless):
        (n,) = struct.unpack('<Q', good[:8])
        sources.append((good, json.loads(good[8:8 + n])))
    counts = {'loaded': 0, 'refused': 0}
    foreign = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for i in range(2000):
            good, header = sources[i % 2]
            bad = _mutate(good, header, rng)
            before = _state(model)
            try:
                model.load_task(bad, name='fuzzed', allow_fingerprint_mismatch=rng.random() < 0.5)
            except ModCLError:
                counts['refused'] += 1
                now = _state(model)
                if now[:4] != before[:4] or not torch.equal(now[4], before[4]):
                    foreign.append((i, 'state changed'))
            except Exception as e:  # noqa: BLE001 - what the test counts
                foreign.append((i, f'{type(e).__name__}: {e}'[:200]))
            else:
                counts['loaded'] += 1
                model.remove_task('fuzzed')
    elapsed = time.perf_counter() - t0
    print(f'fuzz: {counts}, {len(foreign)} foreign errors or state changes, {elapsed:.1f} s')
    assert not foreign, foreign[:5]
    assert counts['refused'] > 1500
