"""One validated task payload (issue 16, items 6 and 8): ``timm_modcl.payload.TaskPayload`` passes between the model,
adapter files, checkpoints, state dicts and the Hub, validated in one place; one safetensors reader; adapter folders
are merged, pushed, pulled and described without building a backbone."""
import contextlib
import io
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import timm
import timm_modcl  # noqa: F401
from timm_modcl import (AdapterFormatError, CheckpointError, FingerprintMismatchError, PayloadError, StateDictError,
                        TaskExistsError, TaskNotFoundError)
from timm_modcl.adapter import (ADAPTER_FILE, INDEX_FILE, adapter_payload, index_layer_table, payload_bytes,
                                read_adapter, read_folder, read_index)
from timm_modcl.checkpoint import parse_checkpoint
from timm_modcl.cli import main
from timm_modcl.payload import MAX_MODULATOR, LayerTable, TaskPayload, read_safetensors

ARCH = 'modcl_mobilenetv2_050'
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(ARCH).eval()


def _task(model, name, classes=3, seed=1):
    model.add_task(name, classes, (8, 8), class_names=[f'c{i}' for i in range(classes)], metadata={'acc': 0.5})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.task_parameters(name):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _logits(model, task):
    with torch.no_grad(), model.use_task(task):
        return model(X)


@pytest.fixture(scope='module')
def trained():
    model = _task(_model(), 't1')
    return _task(model, 't2', classes=4, seed=2)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- the value
def test_a_payload_round_trips_through_bytes_and_a_model(trained):
    payload = trained.task_payload('t1')
    assert payload.name == 't1' and payload.num_classes == 3 and payload.class_names == ('c0', 'c1', 'c2')
    assert payload.metadata == {'acc': '0.5'} and not payload.headless
    assert set(payload.head) == {'weight', 'bias'} and payload.modulators and payload.norm_stats
    assert payload.check(trained.layer_table()) is payload
    data = payload_bytes(payload, architecture=ARCH, backbone_fingerprint=trained.backbone_fingerprint())
    meta, tensors = read_adapter(data)
    again = adapter_payload(meta, tensors, table=trained.layer_table())
    assert again.meta() == payload.meta()
    assert all(torch.equal(again.tensors[k], v) for k, v in payload.tensors.items())
    fresh = _model()
    assert fresh.load_payloads([again]) == ['t1']
    assert torch.equal(_logits(fresh, 't1'), _logits(trained, 't1'))
    with pytest.raises(TaskExistsError):
        fresh.load_payloads([again])
    assert fresh.load_payloads([again.replace(name='t1b')], activate=True) == ['t1b']
    assert fresh.active_task == 't1b'


def _bad(payload, **tensors):
    return dict(payload.tensors, **tensors)


@pytest.mark.parametrize('what', ['nan', 'int modulator', 'huge modulator', 'negative var', 'head classes',
                                  'stats name', 'kind', 'bn stat', 'name', 'num_classes', 'class names', 'metadata'])
def test_construction_refuses_what_a_payload_cannot_be(trained, what):
    p = trained.task_payload('t1')
    mod = next(k for k in p.tensors if k.startswith('modulator.'))
    var = next(k for k in p.tensors if k.endswith('running_var'))
    meta, tensors = p.meta(), dict(p.tensors)
    if what == 'nan':
        tensors[mod] = torch.full_like(tensors[mod], float('nan'))
    elif what == 'int modulator':
        tensors[mod] = tensors[mod].to(torch.int32)
    elif what == 'huge modulator':
        tensors[mod] = torch.full_like(tensors[mod], 2 * MAX_MODULATOR)
    elif what == 'negative var':
        tensors[var] = -torch.ones_like(tensors[var])
    elif what == 'head classes':
        tensors['head.bias'] = torch.zeros(7)
    elif what == 'stats name':
        tensors['stats.Bad-Name'] = torch.zeros(1)
    elif what == 'kind':
        tensors['other.x'] = torch.zeros(1)
    elif what == 'bn stat':
        tensors[var.replace('running_var', 'running_max')] = torch.zeros(1)
    elif what == 'name':
        meta['name'] = '../evil'
    elif what == 'num_classes':
        meta['num_classes'] = -1
    elif what == 'class names':
        meta['class_names'] = ['a']
    else:
        meta['metadata'] = {'x': float('inf')}
    with pytest.raises(PayloadError):
        TaskPayload.from_meta(meta, tensors)


@pytest.mark.parametrize('what', ['missing', 'unexpected', 'shape'])
def test_check_refuses_tensors_that_do_not_fit_the_layers(trained, what):
    p = trained.task_payload('t1')
    mod = next(k for k in p.tensors if k.startswith('modulator.'))
    tensors = dict(p.tensors)
    if what == 'missing':
        del tensors[mod]
    elif what == 'unexpected':
        tensors['modulator.no_such_layer'] = torch.zeros(2, 2)
    else:
        tensors[mod] = torch.zeros(tensors[mod].shape[0] + 1, *tensors[mod].shape[1:])
    bad = p.replace(tensors=tensors)  # valid as a value
    with pytest.raises(PayloadError, match=what if what != 'shape' else 'has shape'):
        bad.check(trained.layer_table())
    before = list(trained.tasks)
    with pytest.raises(PayloadError):
        trained.load_payloads([p.replace(name='ok'), bad.replace(name='bad')])  # all or nothing
    assert list(trained.tasks) == before


def test_layer_table_round_trips_through_json_and_refuses_malformed_ones(trained):
    table = trained.layer_table()
    assert LayerTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert table.head == {'weight': (1280,), 'bias': ()} and table.feature_dim == 1280
    assert len(table.weights) == len(trained.modulated_layers)
    for bad in (None, {}, {'weights': [['a', [1, 2], 0]]}, {'weights': [['a', [-1], 1]]}, {'weights': [['a', [1]]]},
                {'weights': [], 'affine': [['n', {'gamma': [3]}, True]]}, {'weights': [], 'feature_dim': True}):
        with pytest.raises(PayloadError):
            LayerTable.from_dict(bad)


def test_public_task_methods(trained):
    assert trained.has_head and trained.task_info('t1').num_classes == 3
    with pytest.raises(TaskNotFoundError):
        trained.task_info('nope')
    live = trained.task_tensors('t1')
    assert {id(p) for p in trained.task_parameters('t1')} <= {id(t) for t in live.values()}  # the live tensors
    model = _task(_model(), 'm')
    assert model.update_task_metadata('m', {'metric_val_acc': 0.75}) == {'acc': '0.5', 'metric_val_acc': '0.75'}
    with pytest.raises(timm_modcl.TaskError):
        model.update_task_metadata('m', {'bad': object()})
    assert model.task_info('m').metadata == {'acc': '0.5', 'metric_val_acc': '0.75'}
    assert model.backbone_dtype == torch.float32 and model.backbone_device == torch.device('cpu')
    assert model.task_statistics('m') == {}
    model.update_task_statistics('m', {'custom': torch.ones(2, dtype=torch.float64)})
    assert list(model.task_statistics('m')) == ['custom'] and model.task_statistics('m')['custom'].dtype == torch.float64
    for bad in ({'Bad-Name': torch.ones(1)}, {'other': torch.tensor([float('nan')])},
                {'proto_mean': torch.zeros(3, 5)}):  # incomplete prototype statistics
        with pytest.raises(PayloadError):
            model.update_task_statistics('m', bad)
        assert list(model.task_statistics('m')) == ['custom']


# ---------------------------------------------------------------------------------------------------- one reader
@pytest.mark.parametrize('data', [b'\x80\x04pickle', b'short', struct.pack('<Q', 10 ** 12) + b'{}',
                                  struct.pack('<Q', 4) + b'[1]  '])
def test_adapters_and_checkpoints_share_one_safetensors_reader(data):
    with pytest.raises(PayloadError) as direct:
        read_safetensors(data, 'x')
    reason = str(direct.value).split('x ', 1)[-1]
    with pytest.raises(AdapterFormatError) as adapter:
        read_adapter(data, 'x')
    with pytest.raises(CheckpointError) as checkpoint:
        parse_checkpoint(data, 'x')
    assert reason in str(adapter.value) and reason in str(checkpoint.value)


def test_a_state_dict_task_is_checked_as_a_payload(trained):
    sd = trained.state_dict()
    key = next(k for k in sd if k.startswith('modcl_tasks.t1.modulator.'))
    sd[key] = torch.full_like(sd[key], float('nan'))
    with pytest.raises(StateDictError, match="task 't1'.*NaN"):
        _model().load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------- no backbone
@pytest.fixture
def no_backbone(monkeypatch):
    """``timm.create_model`` records and refuses every call: what runs inside builds no backbone."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError(f'a backbone was built: create_model{args[:1]}')
    monkeypatch.setattr(timm, 'create_model', refuse)
    monkeypatch.setattr(timm.models, 'create_model', refuse)
    return calls


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_merge_info_and_read_folder_build_no_backbone(trained, tmp_path, no_backbone):
    a = trained.save_tasks(tmp_path / 'a', names=['t1'])
    b = trained.save_tasks(tmp_path / 'b', names=['t2'])
    assert index_layer_table(read_index(a)) == trained.layer_table()
    assert timm_modcl.merge_adapter_folders([a, b], tmp_path / 'all') == ['t1', 't2']
    index, payloads = read_folder(tmp_path / 'all')
    assert list(payloads) == ['t1', 't2'] and payloads['t2'].num_classes == 4
    rc, out, err = _run(['merge', a, b, '--out', tmp_path / 'cli'])
    assert rc == 0, err
    rc, out, err = _run(['info', '--out', tmp_path / 'all'])
    assert rc == 0 and 't2' in out, err
    # a wrong-shape modulator is refused by the index's layer table alone
    meta, tensors = read_adapter(b / 't2' / ADAPTER_FILE)
    mod = next(k for k in tensors if k.startswith('modulator.'))
    tensors[mod] = torch.zeros(tensors[mod].shape[0] + 1, *tensors[mod].shape[1:])
    (b / 't2' / ADAPTER_FILE).write_bytes(st_save(tensors, metadata=meta))
    before = _snapshot(tmp_path / 'all')
    with pytest.raises(AdapterFormatError, match='has shape'):
        timm_modcl.merge_adapter_folders([b], tmp_path / 'all', replace=True)
    assert _snapshot(tmp_path / 'all') == before
    assert no_backbone == []


def test_a_folder_indexed_before_layer_tables_still_merges(trained, tmp_path):
    a = trained.save_tasks(tmp_path / 'a', names=['t1'])
    index = json.loads((a / INDEX_FILE).read_text())
    del index['layers']
    (a / INDEX_FILE).write_text(json.dumps(index))
    assert timm_modcl.merge_adapter_folders([a], tmp_path / 'all') == ['t1']
    b = trained.save_tasks(tmp_path / 'b', names=['t2'])
    assert timm_modcl.merge_adapter_folders([b], tmp_path / 'all') == ['t1', 't2']
    assert read_index(tmp_path / 'all').get('layers') is not None  # taken from the source that has one
    assert _model().load_tasks(tmp_path / 'all') == ['t1', 't2']


def test_push_and_pull_folders_build_no_backbone(trained, hub, tmp_path, monkeypatch):
    from timm_modcl.hub import pull_folder, push_folder
    src = trained.save_tasks(tmp_path / 'src')
    calls = []
    real = timm.create_model

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError('a backbone was built')
    monkeypatch.setattr(timm, 'create_model', refuse)
    url = push_folder(src, 'alice/ad', token=hub.alice, endpoint=hub.url)
    assert 'alice/ad' in url
    from huggingface_hub import hf_hub_download
    card = Path(hf_hub_download('alice/ad', 'README.md', endpoint=hub.url, cache_dir=tmp_path / 'c')).read_text()
    assert 'base_model: timm/mobilenetv2_050.lamb_in1k' in card and 'c0, c1, c2' in card and '`t2`' in card
    assert pull_folder('alice/ad', tmp_path / 'dst', tasks=['t2'], endpoint=hub.url,
                       cache_dir=tmp_path / 'c') == ['t2']
    assert (tmp_path / 'dst' / 't2' / ADAPTER_FILE).read_bytes() == (src / 't2' / ADAPTER_FILE).read_bytes()
    with pytest.raises(TaskExistsError, match='already exists'):
        pull_folder('alice/ad', tmp_path / 'dst', endpoint=hub.url, cache_dir=tmp_path / 'c')
    assert pull_folder('alice/ad', tmp_path / 'dst', endpoint=hub.url, cache_dir=tmp_path / 'c',
                       replace=True) == ['t1', 't2']
    assert read_index(tmp_path / 'dst')['tasks'] == ['t2', 't1']
    rc, out, err = _run(['push', '--out', src, '--repo-id', 'alice/cli', '--token', hub.alice, '--endpoint', hub.url])
    assert rc == 0, err
    rc, out, err = _run(['pull', '--repo-id', 'alice/cli', '--out', tmp_path / 'cli', '--endpoint', hub.url])
    assert rc == 0 and 'pulled 2 task(s)' in out, err
    # a folder of other backbone weights is refused before anything is written
    other = _task(real(ARCH), 'o')
    other_dir = other.save_tasks(tmp_path / 'other')
    before = _snapshot(other_dir)
    with pytest.raises(FingerprintMismatchError):
        pull_folder('alice/ad', other_dir, endpoint=hub.url, cache_dir=tmp_path / 'c')
    assert _snapshot(other_dir) == before
    assert calls == []
    monkeypatch.setattr(timm, 'create_model', real)
    fresh = _model()
    assert fresh.load_tasks(tmp_path / 'cli') == ['t1', 't2']
    assert torch.equal(_logits(fresh, 't2'), _logits(trained, 't2'))
