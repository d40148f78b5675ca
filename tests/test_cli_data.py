"""``modcl train/eval --data`` beyond image folders (timm's ``create_dataset``: ``torch/``, ``hfds/``, ``wds/``) on tiny
local copies written here, offline; and the library parts the CLI calls (``timm_modcl.backbone``,
``timm_modcl.multisize``, ``timm_modcl.data_sources``)."""
import contextlib
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from timm_modcl import backbone
from timm_modcl.adapter import read_index
from timm_modcl.cli import main
from timm_modcl.data_sources import parse_data, read_class_map, task_datasets
from timm_modcl.errors import DataError, FingerprintMismatchError

ARCH = 'modcl_mobilenetv2_050'
SIZE = 32
TRAIN = ['--model', ARCH, '--epochs', '1', '--input-size', str(SIZE), '--batch-size', '4', '--no-progress',
         '--no-pretrained']


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(rc, err, *fragments):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('modcl: error: ') and 'Traceback' not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


def _pixels(label, seed, size=12):
    rng = np.random.default_rng(seed)
    base = 40 + 160 * (label % 2)
    return np.clip(base + rng.integers(-20, 20, (size, size)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- torch/
def _idx(path, array, ndim_code):
    header = struct.pack('>I', 0x0800 | ndim_code) + b''.join(struct.pack('>I', d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _tiny_mnist(root, train_labels, test_labels):
    """torchvision's MNIST layout (root/MNIST/raw/*-idx?-ubyte, uncompressed), a few 28x28 images."""
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for prefix, labels in (('train', train_labels), ('t10k', test_labels)):
        images = np.stack([np.kron(_pixels(y, 7 * i + y, 14), np.ones((2, 2), np.uint8)) for i, y in enumerate(labels)])
        _idx(raw / f'{prefix}-images-idx3-ubyte', images, 3)
        _idx(raw / f'{prefix}-labels-idx1-ubyte', np.array(labels), 1)
    return root


def test_torchvision_dataset_train_and_eval(tmp_path):
    root = _tiny_mnist(tmp_path / 'tv', [0, 1] * 6, [0, 1, 1, 0])
    out = tmp_path / 'ad'
    rc, said, err = _run(['train', '--data', 'torch/mnist', '--data-dir', root, '--task', 'digits', '--out', out,
                          *TRAIN])
    assert rc == 0, err
    assert 'digits: 10 classes, 12 training / 4 validation images at 32px' in said  # the t10k split validates
    index = read_index(out)
    assert index['tasks'] == ['digits']
    meta = json.loads((out / 'digits' / 'adapter_config.json').read_text())
    assert meta['class_names'][:2] == ['0 - zero', '1 - one'] and meta['num_classes'] == 10
    rc, said, err = _run(['eval', '--out', out, '--data', 'torch/mnist', '--data-dir', root, '--json',
                          tmp_path / 'r.json'])
    assert rc == 0, err
    result = json.loads((tmp_path / 'r.json').read_text())['results'][0]
    assert result['task'] == 'digits' and result['images'] == 4 and 0.0 <= result['accuracy'] <= 1.0
    rc, said, err = _run(['eval', '--out', out, '--data', 'torch/mnist', '--data-dir', root, '--split', 'all',
                          '--json', tmp_path / 'all.json'])
    assert rc == 0, err
    assert json.loads((tmp_path / 'all.json').read_text())['results'][0]['images'] == 16


def test_torchvision_dataset_errors(tmp_path):
    (tmp_path / 'empty').mkdir()
    rc, _, err = _run(['train', '--data', 'torch/mnist', '--data-dir', tmp_path / 'empty', '--task', 't', '--out',
                       tmp_path / 'ad', *TRAIN])
    _one_line_error(rc, err, "'torch/mnist' has no local copy", '--dataset-download')
    rc, _, err = _run(['train', '--data', 'torch/mnist', '--task', 't', '--out', tmp_path / 'ad', *TRAIN])
    _one_line_error(rc, err, '--data-dir')
    rc, _, err = _run(['train', '--data', 'torch/nosuchset', '--data-dir', tmp_path / 'empty', '--task', 't',
                       '--out', tmp_path / 'ad', *TRAIN])
    _one_line_error(rc, err, 'torch/nosuchset', 'Unknown torchvision dataset')
    bad = _tiny_mnist(tmp_path / 'bad', [0, 1, 12, 1], [0, 1])
    rc, _, err = _run(['train', '--data', 'torch/mnist', '--data-dir', bad, '--task', 't', '--out', tmp_path / 'ad',
                       *TRAIN])
    _one_line_error(rc, err, 'label 12 is out of range', '10 classes')
    assert not (tmp_path / 'ad').exists()


# ---------------------------------------------------------------------------------------------------- hfds/
def _tiny_hf(path, labels, names=('ant', 'bee')):
    import datasets  # the dev extra installs it (and webdataset), so these tests run, never skip
    images = [Image.fromarray(np.stack([_pixels(y, i)] * 3, -1)) for i, y in enumerate(labels)]
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=list(names))})
    ds = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features)
    datasets.DatasetDict({'train': ds}).save_to_disk(str(path))
    return path


def test_hf_dataset_local_copy_train_and_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_hf(tmp_path / 'insects', [0, 1] * 5)
    cache = tmp_path / 'hfcache'
    rc, said, err = _run(['train', '--data', 'hfds/insects', '--data-dir', cache, '--task', 'insects', '--out', 'ad',
                          '--val-fraction', '0.2', *TRAIN])
    assert rc == 0, err
    # no validation split in the copy: 20 % of each class held out, as for a flat image folder
    assert 'insects: 2 classes, 8 training / 2 validation images' in said, said
    meta = json.loads((tmp_path / 'ad' / 'insects' / 'adapter_config.json').read_text())
    assert meta['class_names'] == ['ant', 'bee']
    rc, said, err = _run(['eval', '--out', 'ad', '--data', 'hfds/insects', '--data-dir', cache, '--json', 'r.json'])
    assert rc == 0, err
    assert json.loads((tmp_path / 'r.json').read_text())['results'][0]['images'] == 2


def test_hf_dataset_without_local_copy_needs_download_flag(tmp_path):
    rc, _, err = _run(['train', '--data', 'hfds/nobody/no-such-dataset', '--data-dir', tmp_path / 'c', '--task', 't',
                       '--out', tmp_path / 'ad', *TRAIN])
    _one_line_error(rc, err, "'hfds/nobody/no-such-dataset' has no local copy", '--dataset-download')
    assert not (tmp_path / 'ad').exists()


def test_hf_dataset_class_map_and_bad_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_hf(tmp_path / 'three', [0, 1, 2] * 3, names=('ant', 'bee', 'cricket'))
    (tmp_path / 'three.txt').write_text('cricket\nbee\nant\n')  # the class map sets the classes' order
    train, val, classes = task_datasets('hfds/three', data_dir=tmp_path / 'c', class_map=tmp_path / 'three.txt',
                                        input_size=SIZE, val_split=None, val_fraction=0.0)
    assert classes == ['cricket', 'bee', 'ant'] and val is None
    assert [train[i][1] for i in range(3)] == [2, 1, 0] and train[0][0].shape == (3, SIZE, SIZE)
    (tmp_path / 'two.txt').write_text('bee\nant\n')
    with pytest.raises(DataError, match="label 'cricket' is not among the classes of the class map"):
        task_datasets('hfds/three', data_dir=tmp_path / 'c', class_map=tmp_path / 'two.txt', input_size=SIZE)


# ---------------------------------------------------------------------------------------------------- wds/
def _shards(folder, labels, per_shard=4):
    folder.mkdir(parents=True)
    names = []
    for s in range(0, len(labels), per_shard):
        name = f'tiny-train-{s // per_shard:04d}.tar'
        with tarfile.open(folder / name, 'w') as tar:
            for i, y in enumerate(labels[s:s + per_shard], s):
                buf = io.BytesIO()
                Image.fromarray(np.stack([_pixels(y, i)] * 3, -1)).save(buf, format='PNG')
                for ext, data in (('png', buf.getvalue()), ('cls', str(y).encode())):
                    info = tarfile.TarInfo(f'{i:05d}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    sizes = [len(labels[s:s + per_shard]) for s in range(0, len(labels), per_shard)]
    (folder / '_info.json').write_text(json.dumps({'name': 'tiny', 'splits': {'train': {
        'name': 'train', 'num_samples': len(labels), 'filenames': names, 'shard_lengths': sizes}}}))
    return folder


def test_webdataset_shards_train(tmp_path):
    shards = _shards(tmp_path / 'shards', [0, 1] * 4)
    rc, said, err = _run(['train', '--data', 'wds/tiny', '--data-dir', shards, '--task', 'w', '--out',
                          tmp_path / 'ad', *TRAIN])
    _one_line_error(rc, err, 'does not list its classes', '--num-classes', '--class-map')
    rc, said, err = _run(['train', '--data', 'wds/tiny', '--data-dir', shards, '--task', 'w', '--out', tmp_path / 'ad',
                          '--num-classes', '2', *TRAIN])
    assert rc == 0, err
    assert 'w: 2 classes, 8 training / 0 validation images' in said
    assert read_index(tmp_path / 'ad')['tasks'] == ['w']
    history = json.loads((tmp_path / 'ad' / 'w' / 'train_history.json').read_text())
    assert len(history['train_loss']) == 1 and np.isfinite(history['train_loss'][0])


def test_webdataset_label_out_of_range(tmp_path):
    shards = _shards(tmp_path / 'shards', [0, 1, 5, 1])
    rc, _, err = _run(['train', '--data', 'wds/tiny', '--data-dir', shards, '--task', 'w', '--out', tmp_path / 'ad',
                       '--num-classes', '2', *TRAIN])
    _one_line_error(rc, err, 'label 5 is out of range')
    assert not (tmp_path / 'ad').exists()


# ---------------------------------------------------------------------------------------------------- prefixes
def test_prefixes_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_data('HFDS/beans') == ('hfds', 'beans') and parse_data('torch/mnist') == ('torch', 'mnist')
    assert parse_data('flowers/train') == ('folder', 'flowers/train')
    (tmp_path / 'torch' / 'mnist').mkdir(parents=True)  # a folder of that name is a folder
    assert parse_data('torch/mnist') == ('folder', 'torch/mnist')
    with pytest.raises(DataError, match='tfds/ datasets are not supported'):
        parse_data('tfds/beans')
    with pytest.raises(DataError, match='name the dataset'):
        parse_data('wds/')
    rc, _, err = _run(['train', '--data', 'hfdss/beans', '--task', 't', '--out', 'ad', *TRAIN])
    _one_line_error(rc, err, 'does not exist', "'hfdss/' is not a dataset prefix", 'hfds/, torch/, wds/')


def test_class_map_file(tmp_path):
    (tmp_path / 'c.txt').write_text('cat\n\ndog\n')
    assert read_class_map(tmp_path / 'c.txt') == ['cat', 'dog']
    (tmp_path / 'twice.txt').write_text('cat\ncat\n')
    with pytest.raises(DataError, match='twice'):
        read_class_map(tmp_path / 'twice.txt')
    (tmp_path / 'c.pkl').write_bytes(b'\x80\x04N.')
    with pytest.raises(DataError, match='one class name per line'):
        read_class_map(tmp_path / 'c.pkl')


# ---------------------------------------------------------------------------------------------------- library
def test_resolve_backbone_random_and_fingerprint(monkeypatch, tmp_path):
    monkeypatch.delenv('MODCL_WEIGHTS', raising=False)
    model, source, fallback = backbone.resolve_backbone(ARCH, pretrained=False)
    assert source == 'random-init(seed=0)' and fallback is None
    again = backbone.resolve_backbone(ARCH, fingerprint=model.backbone_fingerprint())
    assert again.source == source and again.model.backbone_fingerprint() == model.backbone_fingerprint()
    monkeypatch.setattr(backbone, 'cached_weights', lambda name: None)
    monkeypatch.setattr(backbone, 'weights_reachable', lambda name, timeout=3.0: 'offline (test)')
    with pytest.raises(FingerprintMismatchError, match='random-init'):
        backbone.resolve_backbone(ARCH, fingerprint='0' * 64)
    with pytest.raises(backbone.WeightsUnavailableError, match='offline'):
        backbone.resolve_backbone(ARCH, pretrained=True)
    assert backbone.resolve_backbone(ARCH, fallback_random=True).fallback == 'offline (test)'
    with pytest.raises(FileNotFoundError):
        backbone.resolve_backbone(ARCH, file=tmp_path / 'none.safetensors')
    with pytest.raises(backbone.ModelNameError, match='did you mean'):
        backbone.resolve_backbone('modcl_mobilenetv2_05')


def test_multisize_merges_scores_across_input_sizes():
    from timm_modcl.multisize import group_tasks_by_input_size, predict_images_task_agnostic
    model = backbone.create_backbone(ARCH)
    for name, k, size in (('a', 2, '32'), ('b', 3, '48'), ('c', 2, '32')):
        model.add_task(name, k, metadata={'input_size': size})
    model.eval()
    assert group_tasks_by_input_size(model, ['a', 'b', 'c']) == {32: ['a', 'c'], 48: ['b']}
    images = [Image.fromarray(np.stack([_pixels(i, i, 40)] * 3, -1)) for i in range(3)]
    choices = predict_images_task_agnostic(model, images, scorer='energy', batch_size=2)
    assert len(choices) == 3
    from timm_modcl.data import eval_transform
    for img, choice in zip(images, choices):
        # the same scores as each size group scored on its own, the best over both groups
        scores = {}
        for size, group in ((32, ['a', 'c']), (48, ['b'])):
            pred = model.predict_task_agnostic(eval_transform(model, size)(img)[None], scorer='energy', tasks=group)
            scores.update(zip(group, pred.task_scores[0].tolist()))
        best = max(scores, key=scores.get)
        assert choice.task == best and choice.scorer == 'energy'
        expect = torch.tensor(list(scores.values())).softmax(0).max().item()
        assert choice.task_prob == pytest.approx(expect, rel=1e-4)
        assert choice.logits.shape == (model.tasks[best].num_classes,)


def test_hub_download_of_modcl_serve_is_bounded(hub, tmp_path):
    """``modcl serve --repo-id`` downloads through ``hub.download_adapter_files``: within the time bound, or a
    HubError (it used to download with only huggingface_hub's per-request timeout, retried)."""
    import time

    from timm_modcl.adapter import ADAPTER_FILE
    from timm_modcl.errors import HubError
    from timm_modcl.hub import download_adapter_files
    model = backbone.create_backbone(ARCH)
    model.add_task('t1', 3, (8, 8))
    model.push_tasks_to_hub('alice/ad', token=hub.alice, endpoint=hub.url)
    index, files = download_adapter_files('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c', timeout=30)
    assert index['tasks'] == ['t1'] and list(files) == ['t1'] and files['t1'].endswith(ADAPTER_FILE)
    with pytest.raises(HubError, match="no task"):
        download_adapter_files('alice/ad', ['t2'], endpoint=hub.url, cache_dir=tmp_path / 'c', timeout=30)
    hub.fault = lambda method, path: 'stall' if ADAPTER_FILE in path else None
    t0 = time.perf_counter()
    with pytest.raises(HubError, match='did not answer in time'):
        download_adapter_files('alice/ad', endpoint=hub.url, cache_dir=tmp_path / 'c2', timeout=2)
    assert time.perf_counter() - t0 < 10
