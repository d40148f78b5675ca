"""Hardening of the storage component (issue 20): adapter folders, merges, the index and the Hub.

Also the storage findings of the first hardening review: adapter folders read only their own files, a failed
``save_tasks`` writes nothing, the Hub ends stalls and broken connections in bounded time with a clear error. Each test
of issue 20 names the item it covers; each failed before its fix. Child processes and kills are bounded in
count and time; every server is the fake Hub on 127.0.0.1.
"""
import contextlib
import io
import json
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import timm
import timm_modcl
from timm_modcl import AdapterError, AdapterFormatError, HubError, ModCLError, StateDictError
from timm_modcl.adapter import ADAPTER_FILE, INDEX_FILE, describe_adapter, read_adapter, read_index
from timm_modcl.cli import main
from _hardening import assert_same_state as _assert_same, model_state as _state

ARCH = 'modcl_mobilenetv2_050'
ROOT = Path(__file__).resolve().parents[1]
DEEP = 100_000  # levels of JSON nesting: far beyond Python's recursion limit


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(ARCH).eval()


def _task(model, name, classes=3, seed=1):
    model.add_task(name, classes, (8, 8))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.task_parameters(name):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _folder(path, names, seed=1):
    model = _model()
    for i, n in enumerate(names):
        _task(model, n, seed=seed + i)
    return model.save_tasks(path, names=names)


def _snapshot(folder):
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else
                                         os.readlink(p) if p.is_symlink() else 'dir')
            for p in sorted(folder.rglob('*'))}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _deep(n=DEEP):
    return '[' * n + ']' * n


# ---------------------------------------------------------------- item 1: `modcl pull` is bounded on a stalled Hub
def test_cli_pull_from_a_stalled_hub_ends_with_a_clear_error_in_bounded_time(hub, tmp_path, monkeypatch):
    model = _task(_model(), 't1')
    model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url)
    monkeypatch.setenv('MODCL_HUB_TIMEOUT', '2')
    for stalled in (INDEX_FILE, ADAPTER_FILE):  # the CLI's own index fetch, then the library's adapter download
        hub.fault = lambda method, path, stalled=stalled: 'stall' if stalled in path else None
        result = {}
        thread = threading.Thread(target=lambda: result.update(zip(('rc', 'out', 'err'), _run(
            ['pull', '--repo-id', 'alice/ad', '--out', tmp_path / f'out_{stalled}', '--endpoint', hub.url,
             '--no-pretrained']))), daemon=True)
        t0 = time.perf_counter()
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), f'modcl pull still running after 30 s with {stalled} stalled'
        assert time.perf_counter() - t0 < 15
        assert result['rc'] != 0
        assert 'did not answer in time' in result['err'] and 'Traceback' not in result['err']
        assert not (tmp_path / f'out_{stalled}' / INDEX_FILE).exists()


def test_remote_index_is_read_by_the_library_within_its_timeout(hub, tmp_path):
    model = _task(_model(), 't1')
    model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url)
    from timm_modcl.hub import remote_index
    index = remote_index('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c')
    assert index['tasks'] == ['t1'] and index['architecture'] == ARCH
    hub.fault = lambda method, path: 'stall' if INDEX_FILE in path else None
    t0 = time.perf_counter()
    with pytest.raises(HubError, match='did not answer in time'):
        remote_index('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c2', timeout=1)
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- the Hub: stalls, dropped connections, timeouts
def _pushed(hub, tmp_path):
    model = _model()
    model.add_task('t1', 3, (8, 8))
    model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url)
    return model


def test_pull_from_a_stalled_hub_ends_in_bounded_time(hub, tmp_path):
    _pushed(hub, tmp_path)
    hub.fault = lambda method, path: 'stall' if ADAPTER_FILE in path else None
    model = _model()
    before = _state(model)
    t0 = time.perf_counter()
    with pytest.raises(HubError, match='did not answer in time.*nothing was loaded.*timeout='):
        model.load_tasks_from_hub('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c', timeout=2)
    assert time.perf_counter() - t0 < 10
    _assert_same(model, before)


def test_push_to_a_stalled_hub_ends_in_bounded_time(hub, tmp_path):
    model = _model()
    model.add_task('t1', 3, (8, 8))
    hub.fault = lambda method, path: 'stall' if method == 'POST' and '/commit/' in path else None
    t0 = time.perf_counter()
    with pytest.raises(HubError, match='did not answer in time.*may still land'):
        model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url, timeout=2)
    assert time.perf_counter() - t0 < 10


def test_dropped_connection_and_dead_server_say_what_failed(hub, tmp_path, monkeypatch):
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT', 2, raising=False)
    _pushed(hub, tmp_path)
    hub.fault = lambda method, path: 'drop' if ADAPTER_FILE in path else None
    model = _model()
    before = _state(model)
    with pytest.raises(HubError, match="adapter file of task 't1'.*retry") as info:
        model.load_tasks_from_hub('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c', timeout=30)
    assert 'ReadError' not in str(info.value).split(':')[0]
    _assert_same(model, before)
    url = hub.url
    hub.stop()
    with pytest.raises(HubError, match='cannot be reached.*HF_ENDPOINT'):
        model.load_tasks_from_hub('alice/ad', endpoint=url, cache_dir=tmp_path / 'c2', timeout=30)
    _assert_same(model, before)
    with pytest.raises(HubError, match='timeout must be a positive'):
        model.load_tasks_from_hub('alice/ad', endpoint=url, timeout=0)


@pytest.mark.parametrize('timeout', [float('inf'), float('nan'), 0])
def test_hub_timeout_must_be_finite(hub, timeout):
    model = _model()
    with pytest.raises(HubError, match='finite number of seconds'):
        model.load_tasks_from_hub('alice/ad', endpoint=hub.url, timeout=timeout)
    with pytest.raises(HubError, match='not found'):  # a huge finite timeout works (no OverflowError in the wait)
        model.load_tasks_from_hub('alice/ad', endpoint=hub.url, timeout=1e300)


def test_hub_timeout_from_the_environment_must_be_finite(hub, monkeypatch):
    monkeypatch.setenv('MODCL_HUB_TIMEOUT', 'inf')
    with pytest.raises(HubError, match='MODCL_HUB_TIMEOUT'):
        _model().load_tasks_from_hub('alice/ad', endpoint=hub.url)


def test_push_with_bad_input_creates_no_repo_or_branch(hub):
    from huggingface_hub import HfApi
    model = _model()
    model.add_task('a', 3)
    with pytest.raises(AdapterError):
        model.push_tasks_to_hub('alice/new', token=hub.alice, endpoint=hub.url, revision='dev', dtype=torch.int8)
    assert not HfApi(endpoint=hub.url, token=hub.alice).repo_exists('alice/new')


# ---------------------------------------------------------------- item 4: deeply nested JSON gets a typed error
@pytest.fixture(scope='module')
def adapter_bytes():
    from timm_modcl.adapter import adapter_bytes
    return adapter_bytes(_task(_model(), 't1'), 't1')


def _raw_adapter(good, extra):
    """``good`` with its safetensors header given one more top-level entry ``extra`` (raw JSON text)."""
    (n,) = struct.unpack('<Q', good[:8])
    header = good[8:8 + n].rstrip(b' ')
    text = header[:-1] + b',"x":' + extra.encode() + b'}'
    text += b' ' * (-len(text) % 8)
    return struct.pack('<Q', len(text)) + text + good[8 + n:]


@pytest.mark.parametrize('depth', [65, DEEP])
def test_deeply_nested_json_in_an_adapter_header_or_task_metadata_is_an_adapter_format_error(
        adapter_bytes, tmp_path, depth):
    meta, tensors = read_adapter(adapter_bytes)
    variants = {
        'header': _raw_adapter(adapter_bytes, _deep(depth)),
        'task metadata': st_save(dict(tensors), metadata=dict(meta, task=_deep(depth))),
        'task metadata value': st_save(dict(tensors), metadata=dict(
            meta, task=json.dumps(dict(json.loads(meta['task']), metadata={'k': 'v'}))[:-1] + ', "deep": '
            + _deep(depth) + '}')),
    }
    model = _model()
    before = list(model.tasks)
    for what, data in variants.items():
        with pytest.raises(AdapterFormatError, match='nested more than 64 levels|corrupt'):
            model.load_task(data)
        with pytest.raises(AdapterFormatError):
            describe_adapter(data)
        assert list(model.tasks) == before, what
    # and through a folder and a merge
    folder = _folder(tmp_path / 'src', ['t1'])
    (folder / 't1' / ADAPTER_FILE).write_bytes(variants['task metadata'])
    with pytest.raises(AdapterFormatError):
        model.load_tasks(folder)
    with pytest.raises(AdapterFormatError):
        timm_modcl.merge_adapter_folders([folder], tmp_path / 'dest')
    assert not (tmp_path / 'dest').exists()


def test_deeply_nested_index_is_an_adapter_format_error_in_load_merge_cli_and_hub_pull(hub, tmp_path):
    folder = _folder(tmp_path / 'src', ['t1'])
    deep_index = ('{"format": "timm_modcl.adapters", "format_version": 1, "tasks": ["t1"], "x": ' + _deep()
                  + '}').encode()
    (folder / INDEX_FILE).write_bytes(deep_index)
    model = _model()
    with pytest.raises(AdapterFormatError, match='nested more than 64 levels'):
        model.load_tasks(folder)
    dest = _folder(tmp_path / 'dest', ['d1'], seed=7)
    before = _snapshot(dest)
    with pytest.raises(AdapterFormatError, match='nested more than 64 levels'):
        timm_modcl.merge_adapter_folders([folder], dest)
    assert _snapshot(dest) == before
    rc, out, err = _run(['merge', folder, '--out', dest])
    assert rc == 2 and 'nested more than 64 levels' in err and 'Traceback' not in err
    assert _snapshot(dest) == before
    # a Hub repo whose index nests deeply
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.url, token=hub.alice)
    api.create_repo('alice/deep')
    api.upload_file(path_or_fileobj=deep_index, path_in_repo=INDEX_FILE, repo_id='alice/deep')
    with pytest.raises(AdapterFormatError, match='nested more than 64 levels'):
        model.load_tasks_from_hub('alice/deep', endpoint=hub.url, cache_dir=tmp_path / 'c')
    assert list(model.tasks) == ['base']


def test_deeply_nested_state_dict_metadata_is_a_state_dict_error():
    model = _task(_model(), 't1')
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 1)
    sd[key] = torch.frombuffer(bytearray(_deep().encode()), dtype=torch.uint8).clone()
    fresh = _model()
    with pytest.raises(StateDictError):
        fresh.load_state_dict(sd)
    assert list(fresh.tasks) == ['base']


def test_load_json_bounds_depth_without_recursing():
    from timm_modcl._io import load_json
    assert load_json(b'{"a": [[1]]}', AdapterFormatError, 'x') == {'a': [[1]]}
    assert load_json('[' * 64 + ']' * 64, AdapterFormatError, 'x') is not None
    for text in ('[' * 65 + ']' * 65, _deep(), '{"a":' * 5000 + '1' + '}' * 5000, '[' * 10 ** 6):
        with pytest.raises(AdapterFormatError, match='nested more than 64 levels|corrupt'):
            load_json(text, AdapterFormatError, 'x')


# ---------------------------------------------------------------- adapter folders: own files only, all or nothing
def test_adapter_folders_refuse_links_devices_and_fifos(tmp_path):
    model = _model()
    model.add_task('t1', 3, (8, 8))
    folder = model.save_tasks(tmp_path / 'ad')
    outside = _model().eval()
    outside.add_task('t1', 3, (8, 8))
    elsewhere = outside.save_tasks(tmp_path / 'elsewhere')
    task_dir = folder / 't1'
    real = tmp_path / 'real_t1'
    task_dir.rename(real)

    cases = {
        'a linked task folder': lambda: os.symlink(elsewhere / 't1', task_dir),
        'a linked adapter file': lambda: (task_dir.mkdir(), os.symlink(elsewhere / 't1' / ADAPTER_FILE,
                                                                       task_dir / ADAPTER_FILE)),
        'a link to /dev/zero': lambda: (task_dir.mkdir(), os.symlink('/dev/zero', task_dir / ADAPTER_FILE)),
        'a FIFO': lambda: (task_dir.mkdir(), os.mkfifo(task_dir / ADAPTER_FILE)),
    }
    fresh = _model()
    before = _state(fresh)
    for label, make in cases.items():
        make()
        t0 = time.perf_counter()
        with pytest.raises(AdapterError, match='link|regular file'):
            fresh.load_tasks(folder)
        assert time.perf_counter() - t0 < 5, label
        _assert_same(fresh, before)
        if task_dir.is_symlink():
            task_dir.unlink()
        else:
            for f in task_dir.iterdir():
                f.unlink()
            task_dir.rmdir()
    real.rename(task_dir)
    assert fresh.load_tasks(folder) == ['t1']
    with pytest.raises(AdapterError, match='regular file'):
        fresh.load_task('/dev/zero')


def test_load_tasks_takes_one_name_as_a_string(tmp_path):
    model = _model()
    model.add_task('t1', 3, (8, 8))
    model.add_task('t', 3, (8, 8))
    folder = model.save_tasks(tmp_path / 'ad')
    assert _model().load_tasks(folder, names='t1') == ['t1']


def test_save_tasks_writes_nothing_when_a_later_task_cannot_be_saved(tmp_path):
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 3)
    with torch.no_grad():
        model.modcl_tasks['b'].head.weight[0, 0] = 1e6  # overflows float16
    with pytest.raises(AdapterError):
        model.save_tasks(tmp_path / 'out', dtype=torch.float16)
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').rglob('*'))


def test_failed_load_of_a_folder_with_a_headless_task_leaves_the_random_state(tmp_path):
    model = _model()
    model.add_task('a', 3)
    model.add_task('b', 3)
    folder = model.save_tasks(tmp_path / 'ad', include_head=False)
    (folder / 'b' / ADAPTER_FILE).write_bytes(b'garbage' * 10)
    fresh = _model()
    before = _state(fresh)
    with pytest.raises(AdapterFormatError), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fresh.load_tasks(folder)
    _assert_same(fresh, before)


# ---------------------------------------------------------------- item 5: concurrent writers of one folder lose nothing
def _writer(role, ops, root, barrier, results):
    """A writer process: for each round, wait for the other writer, then save or merge into the round's folder."""
    try:
        torch.set_num_threads(1)
        model = _model()
        for r, op in enumerate(ops):
            if op == 'save':
                _task(model, f'{role}{r}', seed=r)
            barrier.wait(60)
            dest = Path(root) / f'dest{r}'
            if op == 'save':
                model.save_tasks(dest, names=[f'{role}{r}'])
            else:
                timm_modcl.merge_adapter_folders([Path(root) / f'src_{role}{r}'], dest)
        results.put((role, 'ok'))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((role, f'{type(e).__name__}: {e}'))


def test_concurrent_merges_and_saves_in_separate_processes_lose_no_task(tmp_path):
    pairs = [('merge', 'merge'), ('save', 'save'), ('merge', 'save')]
    rounds = int(os.environ.get('MODCL_TEST_WRITER_ROUNDS', '8'))  # per pair; 20 for the report's count
    ops_a, ops_b = [], []
    for a, b in pairs:
        ops_a += [a] * rounds
        ops_b += [b] * rounds
    source = _model()
    for r, (a, b) in enumerate(zip(ops_a, ops_b)):
        for role, op in (('a', a), ('b', b)):
            if op == 'merge':
                _task(source, f'{role}{r}', seed=r)
                source.save_tasks(tmp_path / f'src_{role}{r}', names=[f'{role}{r}'])
        if r % 2:  # every other round merges / saves into a folder that already holds a task
            _task(source, f'd{r}', seed=100 + r)
            source.save_tasks(tmp_path / f'dest{r}', names=[f'd{r}'])
    ctx = multiprocessing.get_context('spawn')
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(role, ops, str(tmp_path), barrier, results), daemon=True)
             for role, ops in (('a', ops_a), ('b', ops_b))]
    for p in procs:
        p.start()
    try:
        outcome = dict(results.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert outcome == {'a': 'ok', 'b': 'ok'}, outcome
    lost = []
    fresh = _model()
    for r in range(len(ops_a)):
        expected = {'a%d' % r, 'b%d' % r} | ({'d%d' % r} if r % 2 else set())
        listed = set(read_index(tmp_path / f'dest{r}')['tasks'])
        lost += [(pairs[r // rounds], t) for t in expected - listed]
        assert listed <= expected
    assert lost == [], f'{len(lost)} task(s) lost in {len(ops_a)} rounds: {lost}'
    for r in range(len(ops_a)):  # every folder loads as a whole
        assert len(fresh.load_tasks(tmp_path / f'dest{r}', replace=True)) >= 2
    print(f'{len(ops_a)} rounds ({rounds} per pair of writers): 0 tasks lost')


def test_writers_of_one_folder_serialise_and_the_lock_leaves_no_file(tmp_path):
    from timm_modcl._io import folder_lock
    folder = _folder(tmp_path / 'f', ['t1'])
    before = _snapshot(folder)
    with folder_lock(folder, AdapterError):
        with pytest.raises(AdapterError, match='another process has been writing'):
            with folder_lock(folder, AdapterError, timeout=0.2):
                pass
        code = ('import sys; from timm_modcl._io import folder_lock; from timm_modcl import AdapterError\n'
                'try:\n    with folder_lock(sys.argv[1], AdapterError, timeout=0.5): print("got it")\n'
                'except AdapterError as e: print("refused:", e)\n')
        proc = subprocess.run([sys.executable, '-c', code, str(folder)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.stdout.startswith('refused: another process'), proc.stdout + proc.stderr
    with folder_lock(folder, AdapterError, timeout=0.2):
        pass
    assert _snapshot(folder) == before  # no lock file


# ---------------------------------------------------------------- item 6: merge validates, is atomic, follows no link
def _bad_sources(good, tmp_path):
    """Source folders, each holding one good task and one hostile variant of another."""
    meta, tensors = read_adapter(good)
    mod = next(k for k in tensors if k.startswith('modulator.'))
    bn = next(k for k in tensors if k.endswith('running_var'))
    t = dict(tensors)
    variants = {
        'wrong-shape modulator': dict(t, **{mod: torch.zeros(tensors[mod].shape[0] + 1, *tensors[mod].shape[1:])}),
        'NaN head': dict(t, **{'head.weight': torch.full_like(tensors['head.weight'], float('nan'))}),
        'Inf running var': dict(t, **{bn: torch.full_like(tensors[bn], float('inf'))}),
        'modulator of 1e30': dict(t, **{mod: torch.full_like(tensors[mod], 1e30)}),
        'wrong head classes': dict(t, **{'head.bias': torch.zeros(7)}),
        'missing modulator': {k: v for k, v in t.items() if k != mod},
        'integer modulator': dict(t, **{mod: tensors[mod].to(torch.int32)}),
    }
    out = {}
    for i, (what, ts) in enumerate(variants.items()):
        folder = _folder(tmp_path / f'src{i}', [f'ok{i}', 'bad'], seed=i)
        (folder / 'bad' / ADAPTER_FILE).write_bytes(st_save(ts, metadata=dict(
            meta, task=json.dumps(dict(json.loads(meta['task']), name='bad')))))
        out[what] = folder
    return out


def test_merge_refuses_hostile_tensors_before_writing_and_the_cli_exits_non_zero(adapter_bytes, tmp_path):
    dest = _folder(tmp_path / 'dest', ['d1'], seed=50)
    before = _snapshot(dest)
    for what, src in _bad_sources(adapter_bytes, tmp_path).items():
        with pytest.raises(AdapterFormatError, match='bad'):
            timm_modcl.merge_adapter_folders([src], dest)
        assert _snapshot(dest) == before, what
        with pytest.raises(AdapterFormatError):
            timm_modcl.merge_adapter_folders([src], tmp_path / 'new')
        assert not (tmp_path / 'new').exists(), what
        assert not [p for p in tmp_path.iterdir() if 'staging' in p.name], what
        rc, out, err = _run(['merge', src, '--out', dest])
        assert rc != 0 and 'bad' in err and 'Traceback' not in err, (what, rc, err)
        assert _snapshot(dest) == before, what
    # what is merged loads as a whole
    good = _folder(tmp_path / 'good', ['g1', 'g2'], seed=60)
    assert timm_modcl.merge_adapter_folders([good], dest) == ['d1', 'g1', 'g2']
    assert _model().load_tasks(dest) == ['d1', 'g1', 'g2']


def test_merge_does_not_follow_a_symlinked_task_folder_or_file_in_the_destination(tmp_path):
    src = _folder(tmp_path / 'src', ['t1'])
    outside = tmp_path / 'outside'
    outside.mkdir()
    (outside / 'keep.txt').write_text('mine')
    for link in ('t1', f't1/{ADAPTER_FILE}'):
        dest = _folder(tmp_path / f'dest_{len(link)}', ['d1'], seed=9)
        if link == 't1':
            (dest / 't1').symlink_to(outside, target_is_directory=True)
        else:
            (dest / 't1').mkdir()
            (dest / link).symlink_to(outside / 'keep.txt')
        before = _snapshot(dest)
        with pytest.raises(AdapterError, match='symbolic link'):
            timm_modcl.merge_adapter_folders([src], dest)
        assert _snapshot(dest) == before
        assert sorted(p.name for p in outside.iterdir()) == ['keep.txt'] and (outside / 'keep.txt').read_text() == 'mine'
    # save_tasks refuses it too
    model = _task(_model(), 't1')
    with pytest.raises(AdapterError, match='symbolic link'):
        model.save_tasks(tmp_path / 'dest_2', names=['t1'])
    assert sorted(p.name for p in outside.iterdir()) == ['keep.txt']


def test_merge_refuses_an_adapter_with_a_corrupt_task_header(tmp_path):
    model = _model()
    model.add_task('a', 3)
    src = model.save_tasks(tmp_path / 'src')
    path = src / 'a' / ADAPTER_FILE
    good = path.read_bytes()
    for task in (None, 'not json', '[]'):
        meta, tensors = read_adapter(good)
        meta = dict(meta)
        if task is None:
            meta.pop('task')
        else:
            meta['task'] = task
        path.write_bytes(st_save(dict(tensors), metadata=meta))
        with pytest.raises(AdapterFormatError):
            timm_modcl.merge_adapter_folders([src], tmp_path / f'dest_{task is None}')


_KILL_SCRIPT = r'''
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
import timm_modcl
from pathlib import Path
root, kills, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
sources = sorted(p for p in root.iterdir() if p.name.startswith('src'))
OPS = ('replace', 'rename', 'unlink', 'mkdir', 'rmdir')


def merge(dest, kill_at=None, count=None):
    """Merge in a forked child; with ``kill_at``, it kills itself just before its kill_at-th file-system step."""
    pid = os.fork()
    if pid == 0:
        try:
            steps = [0]
            for name in OPS:
                def step(*a, _real=getattr(os, name), **k):
                    steps[0] += 1
                    if steps[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*a, **k)
                setattr(os, name, step)
            timm_modcl.merge_adapter_folders(sources, dest)
            if count is not None:
                Path(count).write_text(str(steps[0]))
            os._exit(0)
        except BaseException:
            os._exit(3)
    return pid


if mode == 'steps':  # a kill before every file-system step of a merge into an existing and into a new folder
    out = []
    for kind in ('existing', 'new'):
        pid = merge(root / ('probe_' + kind if kind == 'new' else 'existing_probe'), count=root / 'count')
        assert os.waitpid(pid, 0)[1] == 0
        n = int((root / 'count').read_text())
        for k in range(1, n + 1):
            dest = root / ('%s_step%d' % (kind, k))
            pid = merge(dest, kill_at=k)
            status = os.waitpid(pid, 0)[1]
            out.append({'dest': str(dest), 'step': k, 'steps': n, 'finished': os.WIFEXITED(status)})
    print(json.dumps({'duration': 0, 'kills': out}))
    sys.exit(0)

# the time a whole merge takes, without kills
t0 = time.perf_counter()
pid = merge(root / 'probe')
assert os.waitpid(pid, 0)[1] == 0
duration = time.perf_counter() - t0
out = []
for k in range(kills):
    dest = root / ('existing%d' % k if k % 2 else 'new%d' % k)
    # half the kills anywhere, half late (where the files are written)
    delay = duration * (rng.uniform(0, 1.2) if k % 4 < 2 else rng.uniform(0.6, 1.1))
    pid = merge(dest)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    out.append({'dest': str(dest), 'delay': delay, 'finished': os.WIFEXITED(status)})
print(json.dumps({'duration': duration, 'kills': out}))
'''


def _kill_during_merge(tmp_path, kills, mode='random', sources=4):
    tasks = []
    for i in range(sources):
        _folder(tmp_path / f'src{i}', [f's{i}a', f's{i}b'], seed=10 * i)
        tasks += [f's{i}a', f's{i}b']
    existing = [f'existing{k}' for k in range(1, kills, 2)] if mode == 'random' else \
        ['existing_probe'] + [f'existing_step{k}' for k in range(1, 40 * sources)]
    _folder(tmp_path / existing[0], ['d1'], seed=99)
    for name in existing[1:]:
        shutil.copytree(tmp_path / existing[0], tmp_path / name)
    old = _snapshot(tmp_path / existing[0])
    script = tmp_path / 'kill.py'
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(kills), '0', mode], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = {'as it was': 0, 'complete': 0, 'committed, finished by the next writer': 0, 'finished': 0,
              'killed while writing': 0}
    model = _model()
    for entry in report['kills']:
        dest = Path(entry['dest'])
        counts['finished'] += entry['finished']
        new = dest.name.startswith('new')
        visible = sorted(p.name for p in dest.iterdir() if not p.name.startswith('.')) if dest.exists() else None
        staged = list(tmp_path.glob(f'.{dest.name}.modcl-staging-*')) + (
            list(dest.glob('.modcl-staging-*')) if dest.exists() else [])
        counts['killed while writing'] += bool(staged)  # files were being staged when the kill came
        if new and not dest.exists():
            state = 'as it was'
        else:
            listed = read_index(dest)['tasks']
            want = ([] if new else ['d1'])
            if listed == want and visible != sorted(want + [INDEX_FILE]):
                # killed in the last renames of a decided merge: the index still lists the old tasks (each listed
                # file is whole), and the commit record lets the next writer of the folder finish the merge
                assert any((p / 'COMMIT.json').is_file() for p in staged), (entry, visible)
                assert model.load_tasks(dest, replace=True) == listed
                timm_modcl.save_tasks(model, dest, names=[])  # any writer: here a save of nothing
                listed = read_index(dest)['tasks']
                assert listed == want + tasks, (entry, listed)
                assert sorted(p.name for p in dest.iterdir()) == sorted(listed + [INDEX_FILE])
                state = 'committed, finished by the next writer'
            elif listed == want:
                state = 'as it was'
                if not new:
                    assert (dest / 'd1' / ADAPTER_FILE).read_bytes() == old[f'd1/{ADAPTER_FILE}']
            else:
                assert listed == want + tasks, (entry, listed)
                state = 'complete'
                assert visible == sorted(listed + [INDEX_FILE]), (entry, visible)
            assert model.load_tasks(dest, replace=True) == listed
            # the next writer cleans up after the killed one and completes the merge
            assert timm_modcl.merge_adapter_folders(sorted(tmp_path.glob('src*')), dest, replace=True) == want + tasks
            assert not [p for p in dest.iterdir() if p.name.startswith('.')]
        counts[state] += 1
    return report, counts


def test_a_kill_during_a_merge_leaves_the_destination_as_it_was_or_complete(tmp_path):
    kills = int(os.environ.get('MODCL_TEST_MERGE_KILLS', '16'))  # 75 for the report's count
    report, counts = _kill_during_merge(tmp_path, kills)
    assert counts['as it was'] + counts['complete'] + counts['committed, finished by the next writer'] == kills
    print(f'{kills} kills during merges of {report["duration"]:.2f} s: {counts}')


def test_a_kill_before_any_file_system_step_of_a_merge_leaves_the_destination_as_it_was_or_complete(tmp_path):
    report, counts = _kill_during_merge(tmp_path, 0, mode='steps', sources=1)
    steps = len(report['kills'])
    assert steps >= 10
    assert counts['as it was'] + counts['complete'] + counts['committed, finished by the next writer'] == steps
    assert counts['finished'] == 0  # every one was killed
    print(f'a kill before each of the {steps} file-system steps of two merges: {counts}')


# ---------------------------------------------------------------- item 11: a hostile ETag writes nothing outside the cache
@pytest.mark.parametrize('kind', ['relative', 'absolute'])
def test_a_hostile_etag_is_refused_and_nothing_is_written_outside_the_cache(hub, tmp_path, kind):
    model = _task(_model(), 't1')
    model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url)
    target = tmp_path / 'victim'
    hub.etag = lambda method, path, oid: ('../../../victim' if kind == 'relative' else str(target))
    cache = tmp_path / 'a' / 'b' / 'cache'
    fresh = _model()
    with pytest.raises(HubError, match='malformed ETag'):
        fresh.load_tasks_from_hub('alice/ad', endpoint=hub.url, cache_dir=cache)
    assert list(fresh.tasks) == ['base']
    written = [p for p in tmp_path.rglob('*') if p.is_file() and cache not in p.parents]
    assert written == [], written
    from timm_modcl.hub import remote_index
    with pytest.raises(HubError, match='malformed ETag'):
        remote_index('alice/ad', endpoint=hub.url, cache_dir=cache)
    assert [p for p in tmp_path.rglob('*') if p.is_file() and cache not in p.parents] == []
    # huggingface_hub's own calls outside the library are not changed by the check
    from huggingface_hub import hf_hub_download
    hub.etag = None
    assert Path(hf_hub_download('alice/ad', INDEX_FILE, endpoint=hub.url, cache_dir=tmp_path / 'c2')).is_file()


# ---------------------------------------------------------------- fuzz: mutated indexes and adapters through merge
def _mutate_bytes(data, rng):
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 2:  # insert garbage
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # flip in the first 256 bytes (the header / the JSON keys)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(256, len(data)))] = rng.randrange(256)
    return bytes(data)


_ODD_VALUES = [None, True, 0, -1, 1e308, float('nan'), '', 'x' * 300, '../x', [], {}, [[[]]], ['t1', 't1'],
               ['base'], ['a/b'], {'a': 1}, 'modcl_resnet50', '0' * 64, 2, '1']


def _mutate_index(index, rng):
    index = json.loads(json.dumps(index))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(index) + ['extra'])
        if rng.random() < 0.2:
            index.pop(key, None)
        elif key == 'tasks' and rng.random() < 0.5:
            index['tasks'] = index['tasks'] + [rng.choice(['t9', 'base', '', 'x' * 200, 7, None, '.', 't1'])]
        else:
            index[key] = rng.choice(_ODD_VALUES)
    return json.dumps(index, allow_nan=True).encode()


def _mutate_tensors(data, rng):
    meta, tensors = read_adapter(data)
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    kind = rng.randrange(7)
    if kind == 0 and t.is_floating_point():
        t = t.clone().view(-1)
        t[rng.randrange(t.numel())] = rng.choice([float('nan'), float('inf'), -float('inf'), 1e30, -1e7])
        tensors[key] = t.view(tensors[key].shape)
    elif kind == 1:
        tensors[key] = torch.zeros(*(s + rng.choice([-1, 1]) for s in t.shape)) if t.ndim else torch.zeros(2)
    elif kind == 2:
        tensors[key] = t.to(rng.choice([torch.int32, torch.float64, torch.uint8, torch.float16]))
    elif kind == 3:
        del tensors[key]
    elif kind == 4:
        tensors['modulator.not_a_layer'] = torch.zeros(3)
    elif kind == 5:
        task = json.loads(meta['task'])
        task[rng.choice(list(task) + ['extra'])] = rng.choice(_ODD_VALUES)
        meta = dict(meta, task=json.dumps(task, allow_nan=True))
    else:
        meta = dict(meta, **{rng.choice(sorted(meta)): rng.choice(['', 'x', '1', '99', 'false', '{}'])})
    return st_save(tensors, metadata=meta)


def test_fuzz_merge_with_mutated_indexes_and_adapters(tmp_path):
    rng = random.Random(20)
    n = int(os.environ.get('MODCL_TEST_MERGE_FUZZ', '60'))  # of each kind; 300 for the report's count
    good = _folder(tmp_path / 'good', ['t1', 't2'])
    index_bytes, adapter = (good / INDEX_FILE).read_bytes(), (good / 't1' / ADAPTER_FILE).read_bytes()
    dest = _folder(tmp_path / 'dest', ['d1'], seed=40)
    before = _snapshot(dest)
    src = tmp_path / 'src'
    counts = {'refused': 0, 'merged': 0}
    untyped = []
    for i in range(2 * n):
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(good, src)
        if i < n:
            (src / INDEX_FILE).write_bytes(_mutate_bytes(index_bytes, rng) if i % 2 else
                                           _mutate_index(json.loads(index_bytes), rng))
        else:
            (src / 't1' / ADAPTER_FILE).write_bytes(_mutate_bytes(adapter, rng) if i % 2 else
                                                    _mutate_tensors(adapter, rng))
        try:
            names = timm_modcl.merge_adapter_folders([src], dest)
        except ModCLError:
            counts['refused'] += 1
            assert _snapshot(dest) == before, f'mutation {i} changed the destination on error'
            continue
        except Exception as e:  # noqa: BLE001 - counted, the test fails below
            untyped.append((i, f'{type(e).__name__}: {e}'))
            continue
        counts['merged'] += 1  # a harmless mutation: what was merged must load as a whole
        assert _model().load_tasks(dest) == names
        shutil.rmtree(dest)
        _folder(dest, ['d1'], seed=40)
        assert _snapshot(dest) == before
    assert untyped == [], untyped[:5]
    print(f'{2 * n} mutated merges: {counts}, 0 untyped errors, destination unchanged on every error')


def test_deeply_nested_checkpoint_state_is_a_checkpoint_error():
    from timm_modcl.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, parse_checkpoint
    from timm_modcl.errors import CheckpointError
    for state in (_deep(), '{"a":' * 70 + '1' + '}' * 70):
        data = st_save({'x': torch.zeros(1)}, metadata={
            'format': CHECKPOINT_FORMAT, 'format_version': str(CHECKPOINT_FORMAT_VERSION), 'state': state})
        with pytest.raises(CheckpointError, match='nested more than 64 levels'):
            parse_checkpoint(data)
    with pytest.raises(CheckpointError):  # and in the header itself
        parse_checkpoint(_raw_adapter(data, _deep()))


# ------------------------------------------------------------------------------------------ paths of other types
@pytest.mark.parametrize('bad', [None, 123, 1.5, ['a'], b'bytes'])
def test_paths_of_other_types_are_adapter_errors(bad, tmp_path):
    """load_tasks / save_task / save_tasks / merge given something that is not a path: AdapterError, nothing
    written (they raised an untyped TypeError)."""
    from timm_modcl import AdapterError, merge_adapter_folders
    model = _model()
    model.add_task('a', 3)
    calls = [lambda: model.load_tasks(bad), lambda: model.save_task('a', bad), lambda: model.save_tasks(bad),
             lambda: merge_adapter_folders([bad], tmp_path / 'dest'), lambda: merge_adapter_folders([tmp_path], bad)]
    for call in calls:
        with pytest.raises(AdapterError, match='must be a path'):
            call()
    assert list(tmp_path.iterdir()) == [] and list(model.tasks) == ['base', 'a']
