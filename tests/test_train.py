"""Trainer, evaluation, continual-learning metrics and data helpers."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import timm
import timm_modcl
from timm_modcl import DataError, TaskError, TaskNotFoundError
from timm_modcl.data import digits_tasks, image_folder_datasets, scan_image_folder
from timm_modcl.metrics import AccuracyMatrix
from timm_modcl.train import TrainHistory, evaluate, predict, train_task

SIZE = 32


def _model():
    torch.manual_seed(0)
    return timm.create_model('modcl_mobilenetv2_050', pretrained=False)


def _toy_data(n=32, seed=0):
    """Two classes that differ in colour (red or blue plus noise): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.3
    x[y == 1, 0] += 1.0
    x[y == 0, 2] += 1.0
    return TensorDataset(x, y)


def _logits(model, x, task):
    model.eval()
    with torch.no_grad(), model.use_task(task):
        return model(x)


def _task_tensors(model, task):
    return {k: v.detach().clone() for k, v in model.modcl_tasks[task].tensors().items()}


# ------------------------------------------------------------------------------------------ train_task
def test_train_task_learns_and_leaves_other_tasks_bit_identical():
    model = _model()
    model.add_task('other', 3)
    model.add_task('toy', 2)
    model.set_task('other')
    data = _toy_data()
    x = data.tensors[0]
    before = {t: _logits(model, x, t) for t in ('base', 'other')}
    tensors_before = {t: _task_tensors(model, t) for t in ('base', 'other')}
    acc_before = evaluate(model, data, 'toy')

    hist = train_task(model, 'toy', data, data, epochs=8, batch_size=32, lr=0.01, head_lr=None, sched='step',
                      milestones=[], seed=0, progress=False)  # one constant rate

    assert model.active_task == 'toy'  # the trained task stays active
    assert hist.epochs == 8 and len(hist.val_acc) == 8 and all(t > 0 for t in hist.epoch_time_s)
    assert hist.train_loss[-1] < 0.25 * hist.train_loss[0]
    assert hist.lr == [0.01] * 8
    assert evaluate(model, data, 'toy') >= max(acc_before, 0.9)
    for t in ('base', 'other'):
        assert torch.equal(_logits(model, x, t), before[t])
        after = _task_tensors(model, t)
        assert all(torch.equal(after[k], v) for k, v in tensors_before[t].items())


def test_train_task_schedule_head_lr_callback_and_history_json(tmp_path):
    model = _model()
    model.add_task('toy', 2)
    data = _toy_data(8)
    seen = []
    # the default schedule (chosen by the accuracy benchmark): cosine decay, head at 3e-4
    hist = train_task(model, 'toy', data, epochs=4, batch_size=4, progress=False, recalibrate_bn=False)
    cosine = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert hist.lr == pytest.approx([0.01 * c for c in cosine])
    assert hist.head_lr == pytest.approx([3e-4 * c for c in cosine])
    # the paper's recipe: one rate, MultiStepLR at epochs // 2 (torch's milestone timing)
    hist = train_task(model, 'toy', data, epochs=4, batch_size=4, head_lr=None, sched='step', progress=False,
                      recalibrate_bn=False)
    assert hist.lr == pytest.approx([0.01, 0.01, 0.001, 0.001]) and hist.head_lr == hist.lr

    def stop_after_three(h):
        seen.append(h.epochs)
        return h.epochs == 3

    hist = train_task(model, 'toy', DataLoader(data, batch_size=4), epochs=6, lr=0.02, head_lr=0.05, sched='step',
                      milestones=[1, 2], progress=False, callback=stop_after_three, recalibrate_bn=False)
    assert seen == [1, 2, 3] and hist.epochs == 3 and hist.stopped_early
    assert hist.lr == pytest.approx([0.02, 0.002, 0.0002])
    assert hist.head_lr == pytest.approx([0.05, 0.005, 0.0005])
    path = hist.to_json(tmp_path / 'h' / 'history.json')
    d = json.loads(path.read_text())
    assert d['task'] == 'toy' and d['train_loss'] == hist.train_loss and d['val_acc'] == [None] * 3
    assert TrainHistory.from_dict(d) == hist
    assert [p.name for p in path.parent.iterdir()] == ['history.json']  # no temporary file left


def test_train_task_cosine_schedule_with_warmup():
    import math
    model = _model()
    model.add_task('toy', 2)
    hist = train_task(model, 'toy', _toy_data(8), epochs=5, batch_size=4, lr=0.01, head_lr=0.02, sched='cosine',
                      warmup_epochs=1, progress=False, recalibrate_bn=False)
    assert hist.lr[0] == pytest.approx(1e-7)  # warm-up starts at 1e-5 x lr
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]  # cosine over the other 4 epochs
    assert hist.lr[1:] == pytest.approx(expected)
    assert hist.head_lr[1:] == pytest.approx([2 * v for v in expected])
    with pytest.raises(TaskError, match='sched'):
        train_task(model, 'toy', _toy_data(8), epochs=1, sched='linear', progress=False)
    with pytest.raises(TaskError, match='warmup_epochs'):
        train_task(model, 'toy', _toy_data(8), epochs=2, warmup_epochs=3, progress=False)


def test_train_task_bad_arguments():
    model = _model()
    model.add_task('toy', 2)
    data = _toy_data(4)
    with pytest.raises(TaskNotFoundError, match='nope'):
        train_task(model, 'nope', data, epochs=1, progress=False)
    with pytest.raises(TaskError, match='base'):
        train_task(model, 'base', data, epochs=1, progress=False)
    bad = TensorDataset(data.tensors[0], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(DataError, match='label 2 is out of range'):
        train_task(model, 'toy', bad, epochs=1, batch_size=4, progress=False)
    with pytest.raises(DataError, match='empty'):
        train_task(model, 'toy', TensorDataset(torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0)), progress=False)
    with pytest.raises(TaskError, match='lr'):
        train_task(model, 'toy', data, epochs=1, lr=-1.0, progress=False)


def test_bn_recalibration_only_touches_the_trained_task():
    model = _model()
    model.add_task('a', 2)
    model.add_task('b', 2)
    data = _toy_data(8)
    a_before = _task_tensors(model, 'a')
    train_task(model, 'b', data, epochs=1, batch_size=4, progress=False)
    b_stats = {k: v for k, v in _task_tensors(model, 'b').items() if k.startswith('bn.')}
    # cumulative averages over the pass: the counters hold the number of recalibration batches
    assert all(int(v) == 2 for k, v in b_stats.items() if k.endswith('num_batches_tracked'))
    a_after = _task_tensors(model, 'a')
    assert all(torch.equal(a_after[k], v) for k, v in a_before.items())


def test_evaluate_and_predict_restore_state():
    model = _model()
    model.add_task('t', 2, class_names=['no', 'yes'])
    model.add_task('u', 3)
    model.train()
    data = _toy_data(6)
    acc = evaluate(model, data, 't', batch_size=4)
    assert 0.0 <= acc <= 1.0 and acc * 6 == round(acc * 6)
    assert model.active_task == 'u' and model.training
    assert evaluate(model, DataLoader(data, batch_size=3), 't') == acc
    top = predict(model, data.tensors[0][:2], 't', topk=5)
    assert len(top) == 2 and len(top[0]) == 2
    assert {name for _, name, _ in top[0]} == {'no', 'yes'}
    assert sum(p for _, _, p in top[0]) == pytest.approx(1.0, abs=1e-5)
    assert model.active_task == 'u'


# ------------------------------------------------------------------------------------------ metrics
def _example():
    return AccuracyMatrix(['a', 'b', 'c'], [[0.9], [0.8, 0.7, None], {'a': 0.6, 'b': 0.75, 'c': 0.5}])


def test_accuracy_matrix_metrics_by_hand():
    m = _example()
    assert m[1, 0] == 0.8 and m[0, 1] is None
    assert m.average_accuracy == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    f = m.forgetting
    assert list(f) == ['a', 'b']
    assert f['a'] == pytest.approx(0.9 - 0.6)    # max(R[0][a], R[1][a]) - R[2][a]
    assert f['b'] == pytest.approx(0.7 - 0.75)   # improved: negative forgetting
    assert m.mean_forgetting == pytest.approx((0.3 - 0.05) / 2)
    assert m.max_forgetting == pytest.approx(0.3)
    assert m.backward_transfer == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    assert m.final_accuracies == {'a': 0.6, 'b': 0.75, 'c': 0.5}


def test_accuracy_matrix_partial_and_no_forgetting():
    m = AccuracyMatrix(['x', 'y', 'z'])
    m.add_row([1.0])
    assert m.forgetting == {} and m.mean_forgetting == 0.0 and m.backward_transfer == 0.0
    assert m.average_accuracy == 1.0
    m.add_row([1.0, 0.5])
    assert m.forgetting == {'x': 0.0} and m.mean_forgetting == 0.0 and m.backward_transfer == 0.0
    assert m.average_accuracy == 0.75
    assert m.num_learned == 2


def test_accuracy_matrix_rejects_bad_rows():
    with pytest.raises(ValueError, match='unique'):
        AccuracyMatrix(['a', 'a'])
    m = AccuracyMatrix(['a', 'b'])
    with pytest.raises(ValueError, match='no accuracy'):
        m.add_row([None])
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        m.add_row([1.5])
    with pytest.raises(ValueError, match='unknown tasks'):
        m.add_row({'zz': 0.5})
    m.add_row([0.5])
    with pytest.raises(ValueError, match="task 'b'"):
        m.add_row([0.5])
    m.add_row([0.5, 0.5])
    with pytest.raises(ValueError, match='already has a row'):
        m.add_row([0.5, 0.5])
    with pytest.raises(ValueError, match='no rows'):
        _ = AccuracyMatrix(['q']).average_accuracy


def test_accuracy_matrix_json_roundtrip_and_table(tmp_path):
    m = _example()
    path = m.to_json(tmp_path / 'm.json')
    assert os.listdir(tmp_path) == ['m.json']
    d = json.loads(path.read_text())
    assert d['matrix'] == [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.75, 0.5]]
    assert d['mean_forgetting'] == pytest.approx(0.125)
    assert AccuracyMatrix.from_json(path) == m
    assert AccuracyMatrix.from_dict(m.to_dict()) == m
    table = m.format_table()
    lines = table.splitlines()
    assert lines[0].split()[-3:] == ['a', 'b', 'c']
    assert lines[2].split() == ['a', '90.0', '-', '-']
    assert lines[4].split() == ['c', '60.0', '75.0', '50.0']
    assert 'average accuracy:  61.7%' in table
    assert 'backward transfer: -12.5 points' in table


# ------------------------------------------------------------------------------------------ data helpers
def _save(path, mode, size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == 'L':
        img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8), 'L')
    elif mode == 'RGBA':
        img = Image.fromarray(rng.integers(0, 255, size[::-1] + (4,), dtype=np.uint8), 'RGBA')
    elif mode == 'P':
        img = Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8), 'RGB').convert('P')
    else:
        img = Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8), 'RGB')
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'data'
    for i in range(4):
        _save(root / 'cat' / f'{i}.png', 'RGB', seed=i)
        _save(root / 'dog' / f'{i}.png', 'RGB', seed=10 + i)
    _save(root / 'cat' / 'gray.png', 'L')
    _save(root / 'dog' / 'alpha.png', 'RGBA')
    _save(root / 'dog' / 'sub' / 'palette.png', 'P')      # nested images belong to the top-level class
    (root / 'cat' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n this is not a png')
    (root / 'cat' / 'notes.txt').write_text('ignored: not an image extension')
    return root


def test_image_folder_datasets_modes_corrupt_files_and_split(folder):
    with pytest.warns(UserWarning, match='skipped 1 unreadable image'):
        train, val, classes = image_folder_datasets(folder, _model(), input_size=SIZE, val_fraction=0.25,
                                                    augment=False)
    assert classes == ['cat', 'dog']
    assert len(train) + len(val) == 11
    assert [p.endswith('corrupt.png') for p in train.skipped_files] == [True]
    assert sorted(t for _, t in val.samples) == [0, 1, 1]   # stratified: 25% of 5 cats, of 6 dogs
    names = {os.path.basename(p) for p, _ in train.samples + val.samples}
    assert {'gray.png', 'alpha.png', 'palette.png'} <= names
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and y in (0, 1)
    # the same seed gives the same split
    with pytest.warns(UserWarning):
        _, val2, _ = image_folder_datasets(folder, None, input_size=SIZE, val_fraction=0.25)
    assert val2.samples == val.samples


def test_image_folder_train_val_layout_and_class_names(tmp_path):
    for split, n in (('train', 3), ('val', 2)):
        for c in ('b', 'a'):
            for i in range(n):
                _save(tmp_path / split / c / f'{i}.jpg', 'RGB', seed=i)
    train, val, classes = image_folder_datasets(tmp_path, None, input_size=SIZE)
    assert classes == ['a', 'b'] and len(train) == 6 and len(val) == 4
    # fixed classes: a folder with a subset keeps the indices
    _, val, classes = image_folder_datasets(tmp_path, None, input_size=SIZE, class_names=['z', 'b', 'a'])
    assert classes == ['z', 'b', 'a'] and sorted({t for _, t in val.samples}) == [1, 2]
    with pytest.raises(DataError, match='not among'):
        image_folder_datasets(tmp_path, None, class_names=['a'])
    train, val, _ = image_folder_datasets(tmp_path / 'train', None, val_fraction=0.0)
    assert val is None and len(train) == 6


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(DataError, match='does not exist'):
        image_folder_datasets(tmp_path / 'missing')
    (tmp_path / 'flat').mkdir()
    _save(tmp_path / 'flat' / 'x.png', 'RGB')
    with pytest.raises(DataError, match='no class subfolders'):
        image_folder_datasets(tmp_path / 'flat')
    (folder / 'empty').mkdir()
    with pytest.raises(DataError, match=r"\['empty'\].*no readable images"):
        image_folder_datasets(folder)
    (tmp_path / 'bad' / 'only').mkdir(parents=True)
    (tmp_path / 'bad' / 'only' / 'x.jpg').write_bytes(b'garbage')
    with pytest.raises(DataError, match=r'no readable images.*1 unreadable file'):
        scan_image_folder(tmp_path / 'bad')
    with pytest.raises(DataError, match='val_fraction'):
        image_folder_datasets(tmp_path / 'bad', val_fraction=1.0)
    assert issubclass(DataError, ValueError)


def test_digits_tasks():
    tasks = digits_tasks(num_tasks=5, size=16, seed=0)
    assert [t.name for t in tasks] == ['digits-0-1', 'digits-2-3', 'digits-4-5', 'digits-6-7', 'digits-8-9']
    name, class_names, train, test = tasks[1]
    assert class_names == ['2', '3']
    x, y = train.tensors
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
    assert set(y.tolist()) == {0, 1} and set(test.tensors[1].tolist()) == {0, 1}
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    # ImageNet normalisation of a gray image in [0, 1]: the background (0) is -mean/std in every channel
    assert x[:, 0].min().item() == pytest.approx(-0.485 / 0.229, abs=1e-4)
    assert x[:, 2].min().item() == pytest.approx(-0.406 / 0.225, abs=1e-4)
    assert torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456, atol=1e-5)
    again = digits_tasks(num_tasks=5, size=16, seed=0)
    assert torch.equal(again[1].train.tensors[0], x)
    three = digits_tasks(num_tasks=3, size=8, max_train_per_class=5)
    assert [t.class_names for t in three] == [['0', '1', '2', '3'], ['4', '5', '6'], ['7', '8', '9']]
    assert len(three[0].train) == 20
    with pytest.raises(DataError):
        digits_tasks(num_tasks=11)


def test_train_task_amp_bfloat16_on_cpu_keeps_other_tasks():
    model = _model()
    model.add_task('other', 2)
    model.add_task('toy', 2)
    x = _toy_data(8).tensors[0]
    before = _logits(model, x, 'other')
    hist = train_task(model, 'toy', _toy_data(8), epochs=2, batch_size=4, amp=True, grad_clip=1.0,
                      label_smoothing=0.1, progress=False)
    assert all(np.isfinite(hist.train_loss))
    assert torch.equal(_logits(model, x, 'other'), before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------ found in the 0.2 review
def _snapshot(model):
    return (model.active_task, {t: {k: v.detach().clone() for k, v in model.modcl_tasks[t].tensors().items()}
                                for t in model.tasks})


def _two_tasks_a_active():
    model = _model()
    model.add_task('a', 2)
    model.add_task('b', 2)
    model.set_task('a')
    return model, _snapshot(model)


def _unchanged(model, before):
    active, tensors = before
    assert model.active_task == active
    for t, ts in tensors.items():
        now = model.modcl_tasks[t].tensors()
        assert all(torch.equal(v, now[k]) for k, v in ts.items()), t


@pytest.mark.parametrize('labels, match', [
    (torch.tensor([0.7, 1.7, 0.2, 1.2]), 'integer class indices'),
    (torch.eye(2)[[0, 1, 0, 1]].long(), 'one class index per image'),
    (torch.tensor([True, False, True, False]), 'integer class indices'),
])
def test_labels_that_are_not_class_indices_are_refused(labels, match):
    model, before = _two_tasks_a_active()
    data = TensorDataset(_toy_data(4).tensors[0], labels)
    with pytest.raises(DataError, match=match):
        train_task(model, 'b', data, epochs=1, batch_size=4, progress=False, seed=0)
    with pytest.raises(DataError, match=match):
        evaluate(model, data, 'b')
    with pytest.raises(DataError, match=match):
        timm_modcl.compute_task_statistics(model, 'b', data)
    _unchanged(model, before)


@pytest.mark.parametrize('kwargs, error', [
    (dict(opt='bogus'), TaskError), (dict(opt=3), TaskError), (dict(weight_decay='x'), TaskError),
    (dict(gamma='x'), TaskError), (dict(num_workers=-1), TaskError), (dict(milestones=['x']), TaskError),
    (dict(milestones=5), TaskError), (dict(label_smoothing=2), TaskError), (dict(grad_clip='x'), TaskError),
    (dict(batch_size=0), DataError), (dict(val_data=[1, 2]), DataError),
])
def test_bad_training_arguments_leave_the_model_as_it_was(kwargs, error):
    model, before = _two_tasks_a_active()
    with pytest.raises(error):
        train_task(model, 'b', _toy_data(8), **dict(dict(epochs=1, batch_size=4, progress=False, seed=0), **kwargs))
    _unchanged(model, before)


def test_image_folder_dataset_ends(tmp_path):
    for c in ('a', 'b'):
        for i in range(2):
            (tmp_path / 'd' / c).mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (8, 8), (40 * i, 0, 0)).save(tmp_path / 'd' / c / f'{i}.png')
    train = image_folder_datasets(tmp_path / "d", timm.create_model("modcl_mobilenetv2_050"), input_size=32, val_fraction=0.0).train
    assert len(list(train)) == len(train) == 4
    with pytest.raises(IndexError):
        train[len(train)]


def test_accuracy_matrix_errors_are_typed():
    for bad in ([], ['a', 'a'], 'abc'):
        with pytest.raises(DataError):
            AccuracyMatrix(bad)
    with pytest.raises(DataError):
        AccuracyMatrix.from_dict({'tasks': 'abc', 'matrix': []})
