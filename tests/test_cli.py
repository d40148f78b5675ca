"""The ``modcl`` command line, in-process through ``main([...])`` (and once as ``python -m timm_modcl``)."""
import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_modcl.backbone as backbone
import timm_modcl.cli as cli
from timm_modcl.adapter import load_tasks, read_index
from timm_modcl.cli import main

SIZE = 32
TRAIN = ['--epochs', '1', '--input-size', str(SIZE), '--batch-size', '4', '--no-progress']


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _image(path, colour, mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    a = (np.array(colour)[None, None, :] + rng.integers(-30, 30, (SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(a, 'RGB')
    if mode != 'RGB':
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """``root/pets`` (2 classes x 6 images, a grayscale one and a corrupt file) and ``root/shapes`` (3 x 4)."""
    root = tmp_path_factory.mktemp('data')
    for k, (c, colour) in enumerate((('cat', (220, 40, 40)), ('dog', (40, 40, 220)))):
        for i in range(6):
            _image(root / 'pets' / c / f'{i}.png', colour, seed=10 * k + i)
    _image(root / 'pets' / 'cat' / 'gray.png', (220, 40, 40), mode='L')
    (root / 'pets' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    for k, (c, colour) in enumerate((('circle', (0, 200, 0)), ('square', (200, 200, 0)), ('star', (0, 0, 0)))):
        for i in range(4):
            _image(root / 'shapes' / c / f'{i}.jpg', colour, seed=100 + 10 * k + i)
    return root


def _logits(out, task):
    """Logits of a task loaded from an adapter folder onto the seeded random backbone (``--no-pretrained``)."""
    index = read_index(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cli.RANDOM_INIT_SEED)
        model = timm.create_model(index['architecture'])
    assert model.backbone_fingerprint() == index['backbone_fingerprint']
    load_tasks(model, out, names=[task])
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad(), model.use_task(task):
        return model(x)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """Train ``pets``, then ``shapes`` into the same folder (the second call finds the backbone by itself)."""
    out = tmp_path_factory.mktemp('adapters') / 'ad'
    first = _run(['train', '--data', data / 'pets', '--task', 'pets', '--out', out, '--no-pretrained', *TRAIN])
    index1 = read_index(out)
    logits1 = _logits(out, 'pets')
    second = _run(['train', '--data', data / 'shapes', '--task', 'shapes', '--out', out, *TRAIN])
    return SimpleNamespace(out=out, first=first, second=second, index1=index1, logits1=logits1)


def _assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('modcl: error: '), err
    assert 'Traceback' not in err
    for f in fragments:
        assert f in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------- train
def test_train_twice_adds_a_task_and_keeps_the_first_unchanged(trained):
    rc, out, err = trained.first
    assert rc == 0, err
    assert 'pets: 2 classes' in out and '1 unreadable file(s) skipped' in out and 'random-init' in out
    assert 'validation accuracy' in out
    assert 'skipped 1 unreadable image file(s)' in err and 'broken.jpg' in err  # a warning, not an error
    assert trained.index1['tasks'] == ['pets']

    rc, out, err = trained.second
    assert rc == 0, err
    assert '1 existing task(s)' in out
    index = read_index(trained.out)
    assert index['tasks'] == ['pets', 'shapes']
    assert index['backbone_fingerprint'] == trained.index1['backbone_fingerprint']
    assert torch.equal(_logits(trained.out, 'pets'), trained.logits1)
    history = json.loads((trained.out / 'shapes' / 'train_history.json').read_text())
    assert history['task'] == 'shapes' and len(history['train_loss']) == 1


def test_train_uses_the_library_defaults(trained, data, tmp_path, monkeypatch):
    """Without --resolution / --head-lr, modcl train trains what train_task and add_task do by default."""
    import timm_modcl.train as train_module
    from timm_modcl import DEFAULT_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cli.RANDOM_INIT_SEED)
        model = timm.create_model(read_index(trained.out)['architecture'])
    load_tasks(model, trained.out, names=['pets'])
    model.add_task('reference', 2)
    assert model.modcl_tasks['pets'].config == model.modcl_tasks['reference'].config
    assert model.modcl_tasks['pets'].config.layer_resolution == DEFAULT_CONFIG.layer_resolution
    seen = {}
    real = train_module.train_task

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, 'train_task', spy)
    rc, _, err = _run(['train', '--data', data / 'shapes', '--task', 'shapes', '--out', tmp_path / 'o',
                       '--no-pretrained', '--epochs', '0', '--input-size', str(SIZE), '--no-progress'])
    assert rc == 0, err
    assert 'head_lr' not in seen  # train_task's own default
    rc, _, err = _run(['train', '--data', data / 'shapes', '--task', 'shapes', '--out', tmp_path / 'o', '--replace',
                       '--no-pretrained', '--epochs', '0', '--input-size', str(SIZE), '--no-progress',
                       '--head-lr', '0.002'])
    assert rc == 0, err
    assert seen['head_lr'] == 0.002


def test_train_existing_task_needs_replace(trained, data):
    args = ['train', '--data', data / 'pets', '--task', 'pets', '--out', trained.out, *TRAIN]
    rc, _, err = _run(args)
    _assert_one_line_error(rc, err, "'pets' already exists", '--replace')
    before = _logits(trained.out, 'shapes')
    rc, out, err = _run(args + ['--replace', '--seed', '1'])
    assert rc == 0, err
    assert read_index(trained.out)['tasks'] == ['pets', 'shapes']
    assert torch.equal(_logits(trained.out, 'shapes'), before)


# ---------------------------------------------------------------------------------------------------- inspect
def test_eval_one_task_all_tasks_and_json(trained, data, tmp_path):
    rc, out, err = _run(['eval', '--out', trained.out, '--data', data / 'shapes', '--task', 'shapes',
                         '--split', 'all'])
    assert rc == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ['task', 'classes', 'images', 'accuracy']
    assert row.split()[:3] == ['shapes', '3', '12'] and row.endswith('%')

    rc, out, err = _run(['eval', '--out', trained.out, '--data', data, '--json', tmp_path / 'r.json'])
    assert rc == 0, err
    assert [line.split()[0] for line in out.strip().splitlines()[1:]] == ['pets', 'shapes']
    results = json.loads((tmp_path / 'r.json').read_text())['results']
    assert [r['task'] for r in results] == ['pets', 'shapes'] and all(0 <= r['accuracy'] <= 1 for r in results)


def test_info_and_tasks(trained):
    rc, out, err = _run(['info', '--out', trained.out])
    assert rc == 0, err
    index = read_index(trained.out)
    assert index['backbone_fingerprint'] in out and 'modcl_mobilenetv2_100' in out
    assert 'tasks:        2' in out and '2 classes: cat, dog' in out and '3 classes: circle, square, star' in out
    assert 'resolution 4x4' in out and 'KiB' in out and 'input size: 32px' in out
    # values and bytes are counted from the same tensors, and add up to the file's size
    from safetensors import safe_open
    file_lines = [line.split() for line in out.splitlines() if line.strip().startswith('file:')]
    assert len(file_lines) == 2
    for words, task in zip(file_lines, ('pets', 'shapes')):
        path = trained.out / task / 'adapter_model.safetensors'
        with safe_open(str(path), 'pt') as f:
            tensors = [f.get_tensor(k) for k in f.keys()]
        values = sum(t.numel() for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        assert words[1] == f'{values:,}' and words[4] == f'{nbytes / 1024:.1f}'
        assert words[-2] == f'{path.stat().st_size / 1024:.1f}'

    rc, out, err = _run(['tasks', '--out', trained.out])
    assert rc == 0, err
    assert out.split('\n')[0].split()[:4] == ['pets', '2', 'classes:', 'cat,']
    assert len(out.strip().splitlines()) == 2


def test_predict_topk(trained, data):
    image = data / 'shapes' / 'star' / '0.jpg'
    rc, out, err = _run(['predict', image, '--out', trained.out, '--task', 'shapes', '--topk', '2'])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == '0.jpg (shapes):' and len(lines) == 3
    assert lines[1].split()[0] == '1.' and lines[1].split()[1] in ('circle', 'square', 'star')
    assert lines[1].endswith('%')
    rc, _, err = _run(['predict', image, '--out', trained.out, '--task', 'shapes', '--scorer', 'energy'])
    _assert_one_line_error(rc, err, '--scorer', '--task')


def _copy_folder(trained, dest):
    """A copy of the adapter folder and the model its tasks load into."""
    import shutil
    shutil.copytree(trained.out, dest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cli.RANDOM_INIT_SEED)
        model = timm.create_model(read_index(dest)['architecture'])
    load_tasks(model, dest)
    return model


def _without_prototypes(trained, dest):
    """A copy of the adapter folder whose tasks have no statistics."""
    model = _copy_folder(trained, dest)
    for task in ('pets', 'shapes'):
        model.modcl_tasks[task].stats.clear()
    model.save_tasks(dest)
    return dest


def _with_prototypes(trained, data, dest, scorer='prototype'):
    """A copy of the adapter folder whose tasks carry prototype (or ``scorer``'s) statistics of their images."""
    from timm_modcl.data import eval_transform
    model = _copy_folder(trained, dest)
    for task in ('pets', 'shapes'):
        transform = eval_transform(model, SIZE)
        xs, ys = [], []
        for c, name in enumerate(model.tasks[task].class_names):
            for f in sorted((data / task / name).glob('[0-9]*')):
                xs.append(transform(Image.open(f).convert('RGB')))
                ys.append(c)
        model.compute_task_statistics(task, (torch.stack(xs), torch.tensor(ys)), scorer=scorer)
    model.save_tasks(dest)
    return dest


def test_predict_without_task_chooses_the_task(trained, data, tmp_path):
    images = [data / 'shapes' / 'star' / '0.jpg', data / 'pets' / 'cat' / '1.png', data / 'shapes' / 'circle' / '2.jpg']
    # adapters without statistics: the head-confidence (energy) scorer
    plain = _without_prototypes(trained, tmp_path / 'plain')
    rc, out, err = _run(['predict', *images, '--out', plain, '--topk', '2'])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 9
    for header, image in zip(lines[::3], images):
        assert header.startswith(f'{image.name} (task ') and header.endswith('by the energy scorer):')
        assert header.split()[2].rstrip(',') in ('pets', 'shapes')
    rc, _, err = _run(['predict', images[0], '--out', plain, '--scorer', 'prototype'])
    _assert_one_line_error(rc, err, 'no prototype statistics', 'compute_task_statistics')

    # with statistics: the prototype scorer by default
    folder = _with_prototypes(trained, data, tmp_path / 'protos')
    rc, out, err = _run(['predict', *images, '--out', folder, '--topk', '1'])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6
    chosen = [line.split()[2].rstrip(',') for line in lines[::2]]
    assert chosen == ['shapes', 'pets', 'shapes']
    assert all(line.endswith('by the prototype scorer):') for line in lines[::2])
    probability = float(lines[0].split()[3].rstrip('%'))
    assert 0 < probability <= 100
    rc, out, err = _run(['predict', images[0], '--out', folder, '--scorer', 'max_softmax'])
    assert rc == 0, err
    assert out.splitlines()[0].endswith('by the max_softmax scorer):')
    names = {'shapes': ('circle', 'square', 'star'), 'pets': ('cat', 'dog')}
    for task, line in zip(chosen, lines[1::2]):
        assert line.split()[0] == '1.' and line.split()[1] in names[task] and line.endswith('%')


def test_predict_without_task_uses_ranpac_statistics_when_every_task_has_them(trained, data, tmp_path):
    images = [data / 'shapes' / 'star' / '0.jpg', data / 'pets' / 'cat' / '1.png']
    folder = _with_prototypes(trained, data, tmp_path / 'ranpac', scorer='ranpac')
    rc, out, err = _run(['predict', *images, '--out', folder, '--topk', '1'])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert all(line.endswith('by the ranpac scorer):') for line in lines[::2])
    assert [line.split()[2].rstrip(',') for line in lines[::2]] == ['shapes', 'pets']
    rc, out, err = _run(['predict', images[0], '--out', folder, '--scorer', 'ncm'])
    assert rc == 0, err
    assert out.splitlines()[0].endswith('by the ncm scorer):')


# ---------------------------------------------------------------------------------------------------- errors
def test_user_errors_are_one_line(trained, data, tmp_path):
    (tmp_path / 'empty' / 'a').mkdir(parents=True)
    _image(tmp_path / 'empty' / 'a' / '0.png', (0, 0, 0))
    (tmp_path / 'empty' / 'b').mkdir()
    (tmp_path / 'bad.png').write_bytes(b'nope')
    new = ['--out', tmp_path / 'new', '--no-pretrained', *TRAIN]
    cases = [
        (['train', '--data', tmp_path / 'missing', '--task', 't', *new], ['does not exist', 'missing']),
        (['train', '--data', tmp_path / 'empty', '--task', 't', *new], ["['b']", 'no readable images']),
        (['train', '--data', data / 'pets', '--task', 't', '--model', 'resnet50', *new], ['not a modcl model']),
        (['train', '--data', data / 'pets', '--task', 't', '--model', 'modcl_mobilenet_v2_100', *new],
         ["did you mean 'modcl_mobilenetv2_100'"]),
        (['train', '--data', data / 'pets', '--task', 'a/b', *new], ['task name']),
        (['train', '--data', data / 'pets', '--task', 't', '--weights', tmp_path / 'nope.pth', '--out',
          tmp_path / 'new', *TRAIN], ['weights file does not exist']),
        (['eval', '--out', tmp_path / 'nothing', '--data', data], ['does not exist']),
        (['eval', '--out', trained.out, '--data', data, '--task', 'birds'], ["no task 'birds'", 'pets, shapes']),
        (['info', '--out', data], ['not a folder of timm_modcl adapters']),
        (['predict', tmp_path / 'bad.png', '--out', trained.out, '--task', 'pets'], ['cannot read image']),
        (['predict', tmp_path / 'none.png', '--out', trained.out, '--task', 'pets'], ['image does not exist']),
    ]
    for argv, fragments in cases:
        rc, _, err = _run(argv)
        _assert_one_line_error(rc, err, *fragments)
    assert not (tmp_path / 'new').exists()

    rc, _, err = _run(['eval', '--out', tmp_path / 'nothing', '--data', data, '--verbose'])
    assert rc == 2 and 'Traceback' in err and err.strip().splitlines()[-1].startswith('modcl: error:')
    rc, _, err = _run(['train', '--data', data / 'pets'])  # argparse: missing arguments
    assert rc == 2 and 'required' in err
    assert _run([])[0] == 2
    assert _run(['--help'])[0] == 0


def test_python_m_help_subprocess():
    r = subprocess.run([sys.executable, '-m', 'timm_modcl', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ('train', 'eval', 'info', 'tasks', 'predict', 'push', 'pull', 'demo'):
        assert cmd in r.stdout


# ---------------------------------------------------------------------------------------------------- hub
@pytest.fixture
def hub(isolated_hf_client):
    from hub_server import FakeHub
    with FakeHub(tokens={'hf_alice_token': 'alice'}) as server:
        yield server


def test_push_and_pull(trained, hub, tmp_path):
    rc, out, err = _run(['push', '--out', trained.out, '--repo-id', 'alice/pets', '--token', 'hf_alice_token',
                         '--endpoint', hub.url])
    assert rc == 0, err
    assert 'pushed 2 task(s) (pets, shapes) to alice/pets' in out

    dest = tmp_path / 'pulled'
    rc, out, err = _run(['pull', '--repo-id', 'alice/pets', '--out', dest, '--endpoint', hub.url, '--task', 'pets'])
    assert rc == 0, err
    assert 'pulled 1 task(s) (pets)' in out
    assert read_index(dest)['tasks'] == ['pets']
    assert torch.equal(_logits(dest, 'pets'), _logits(trained.out, 'pets'))

    rc, _, err = _run(['pull', '--repo-id', 'alice/pets', '--out', dest, '--endpoint', hub.url])
    _assert_one_line_error(rc, err, "'pets' already exists", '--replace')
    rc, out, err = _run(['pull', '--repo-id', 'alice/pets', '--out', dest, '--endpoint', hub.url, '--replace'])
    assert rc == 0, err
    assert read_index(dest)['tasks'] == ['pets', 'shapes']

    rc, _, err = _run(['pull', '--repo-id', 'alice/missing', '--out', tmp_path / 'x', '--endpoint', hub.url,
                       '--no-pretrained'])
    _assert_one_line_error(rc, err, 'alice/missing')
    rc, _, err = _run(['push', '--out', trained.out, '--repo-id', 'alice/pets', '--token', 'hf_wrong',
                       '--endpoint', hub.url])
    _assert_one_line_error(rc, err)
    assert 'hf_wrong' not in err


# ---------------------------------------------------------------------------------------------------- demo
def test_demo_quick_offline_falls_back_and_forgets_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv('MODCL_WEIGHTS', raising=False)
    monkeypatch.setattr(backbone, 'cached_weights', lambda name: None)
    monkeypatch.setattr(backbone, 'weights_reachable', lambda name, timeout=3.0: 'cannot reach huggingface.co (test)')
    rc, out, err = _run(['demo', '--quick', '--out', tmp_path / 'demo', '--no-progress'])
    assert rc == 0, err
    assert ('could not download pretrained weights (cannot reach huggingface.co (test)); '
            'falling back to random initialisation') in out
    assert 'forgetting per task (fraction): digits-0-1 0.0\n' in out
    assert 'bit-identical at the end to right after it was learned: yes' in out
    assert 'wall time:' in out
    matrix = json.loads((tmp_path / 'demo' / 'accuracy_matrix.json').read_text())
    assert matrix['tasks'] == ['digits-0-1', 'digits-2-3'] and matrix['mean_forgetting'] == 0.0
    assert matrix['matrix'][1][0] == matrix['matrix'][0][0]
    assert read_index(tmp_path / 'demo')['tasks'] == ['digits-0-1', 'digits-2-3']


def test_demo_is_reproducible_whatever_the_global_rng_state(tmp_path, monkeypatch):
    """The same --seed gives the same adapters byte for byte, even though torch seeds its global RNG differently in
    every process (the first task's head used to be initialised from it)."""
    monkeypatch.setattr(backbone, 'cached_weights', lambda name: None)
    monkeypatch.setattr(backbone, 'weights_reachable', lambda name, timeout=3.0: 'offline (test)')
    files = []
    for run, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        rc, _, err = _run(['demo', '--quick', '--out', tmp_path / f'd{run}', '--no-progress'])
        assert rc == 0, err
        files.append({p.relative_to(tmp_path / f'd{run}'): p.read_bytes()
                      for p in sorted((tmp_path / f'd{run}').rglob('*.safetensors'))})
    assert len(files[0]) == 2 and files[0] == files[1]


def test_demo_refuses_more_tasks_than_digits(tmp_path):
    rc, _, err = _run(['demo', '--quick', '--tasks', '11', '--out', tmp_path / 'd'])
    _assert_one_line_error(rc, err, '--tasks 11', 'at most 10')
    assert not (tmp_path / 'd').exists()


def test_demo_weights_file_missing_is_an_error(tmp_path):
    rc, _, err = _run(['demo', '--quick', '--weights', tmp_path / 'nope.pt', '--out', tmp_path / 'd'])
    _assert_one_line_error(rc, err, 'weights file does not exist')
