"""Hardening of the storage component (issue 20): adapter folders, merges, the index and the Hub.

Each test names the item of issue 20 it covers; each failed before its fix. Child processes and kills are bounded in
count and time; every server is the fake Hub on 127.0.0.1.
"""
import contextlib
import io
import json
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import timm
import timm_modcl
from timm_modcl import AdapterError, AdapterFormatError, HubError, ModCLError, StateDictError
from timm_modcl.adapter import ADAPTER_FILE, INDEX_FILE, read_adapter, read_index
from timm_modcl.cli import main

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
            timm_modcl.describe_adapter(data) if hasattr(timm_modcl, 'describe_adapter') else \
                __import__('timm_modcl.adapter').adapter.describe_adapter(data)
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
