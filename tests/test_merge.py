"""Tasks learned in parallel: ``merge_adapter_folders`` / ``modcl merge`` combine the adapter folders of workers
that share a backbone, byte for byte, and refuse anything else without writing."""
import contextlib
import io
from pathlib import Path

import pytest
import torch

import timm
import timm_modcl  # noqa: F401
from timm_modcl import (AdapterError, AdapterFormatError, FingerprintMismatchError, TaskExistsError, load_tasks,
                        merge_adapter_folders, save_tasks)
from timm_modcl.adapter import ADAPTER_FILE, read_index
from timm_modcl.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARCH = 'modcl_mobilenetv2_050'
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _backbone(seed=0, arch=ARCH):
    torch.manual_seed(seed)
    return timm.create_model(arch)


def _worker(folder, names, seed=0, arch=ARCH):
    """A worker: its own copy of the backbone, its tasks (perturbed, as after training), saved to its folder."""
    model = _backbone(seed, arch)
    for i, n in enumerate(names):
        model.add_task(n, 2 + i)
        with torch.no_grad():
            for p in model.task_parameters(n):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(n) % 1000)))
    save_tasks(model, folder, names=names)
    return model


def _logits(model, task):
    model.eval()
    with torch.no_grad(), model.use_task(task):
        return model(X)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def test_merge_three_workers_bit_identical_and_destination_kept(tmp_path):
    workers = {f'w{i}': _worker(tmp_path / f'w{i}', [f'task{i}']) for i in range(3)}
    workers['w3'] = _worker(tmp_path / 'w3', ['task3', 'task4'])
    names = merge_adapter_folders([tmp_path / 'w0', tmp_path / 'w1', tmp_path / 'w1'], tmp_path / 'all')
    assert names == ['task0', 'task1'] and read_index(tmp_path / 'all')['tasks'] == names
    # a destination that already holds tasks keeps them (first), and is named as a source harmlessly
    names = merge_adapter_folders([tmp_path / 'all', tmp_path / 'w2', tmp_path / 'w3'], tmp_path / 'all')
    assert names == ['task0', 'task1', 'task2', 'task3', 'task4']
    for i, (w, model) in enumerate(workers.items()):
        for n in model.modcl_tasks:
            if n == 'base':
                continue
            assert (tmp_path / 'all' / n / ADAPTER_FILE).read_bytes() == (tmp_path / w / n / ADAPTER_FILE).read_bytes()
    fresh = _backbone()
    assert load_tasks(fresh, tmp_path / 'all') == names
    for model in workers.values():
        for n in model.modcl_tasks:
            if n != 'base':
                assert torch.equal(_logits(fresh, n), _logits(model, n)), n


def test_merge_refuses_without_writing(tmp_path):
    _worker(tmp_path / 'a', ['cats'])
    _worker(tmp_path / 'b', ['dogs'])
    _worker(tmp_path / 'other_seed', ['birds'], seed=1)
    _worker(tmp_path / 'same_name', ['cats'])
    _worker(tmp_path / 'other_arch', ['fish'], arch='modcl_mobilenetv2_075')
    merge_adapter_folders([tmp_path / 'a'], tmp_path / 'dest')
    before = _snapshot(tmp_path / 'dest')

    with pytest.raises(FingerprintMismatchError, match='other backbone weights'):
        merge_adapter_folders([tmp_path / 'b', tmp_path / 'other_seed'], tmp_path / 'dest')
    with pytest.raises(FingerprintMismatchError):
        merge_adapter_folders([tmp_path / 'b', tmp_path / 'other_seed'], tmp_path / 'new')
    assert not (tmp_path / 'new').exists()
    with pytest.raises(AdapterFormatError, match='modcl_mobilenetv2_075'):
        merge_adapter_folders([tmp_path / 'other_arch'], tmp_path / 'dest')
    with pytest.raises(TaskExistsError, match="task 'cats' is in both"):
        merge_adapter_folders([tmp_path / 'b', tmp_path / 'same_name'], tmp_path / 'dest')
    with pytest.raises(AdapterError, match='no modcl_index.json'):
        merge_adapter_folders([tmp_path / 'b', tmp_path / 'missing'], tmp_path / 'dest')
    with pytest.raises(AdapterError, match='at least one source'):
        merge_adapter_folders([], tmp_path / 'dest')
    (tmp_path / 'b' / 'dogs' / ADAPTER_FILE).write_bytes(b'garbage')
    with pytest.raises(AdapterFormatError):
        merge_adapter_folders([tmp_path / 'b'], tmp_path / 'dest')
    assert _snapshot(tmp_path / 'dest') == before

    # replace=True: the later folder's task wins
    names = merge_adapter_folders([tmp_path / 'same_name'], tmp_path / 'dest', replace=True)
    assert names == ['cats']
    assert (tmp_path / 'dest' / 'cats' / ADAPTER_FILE).read_bytes() == \
        (tmp_path / 'same_name' / 'cats' / ADAPTER_FILE).read_bytes()


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_modcl_merge_command(tmp_path):
    _worker(tmp_path / 'a', ['cats'])
    _worker(tmp_path / 'b', ['dogs', 'mice'])
    _worker(tmp_path / 'c', ['birds'], seed=1)
    rc, out, err = _run(['merge', '--out', tmp_path / 'all', tmp_path / 'a', tmp_path / 'b'])
    assert rc == 0, err
    assert '3 task(s) from 2 folder(s): cats, dogs, mice' in out
    rc, out, err = _run(['merge', '--out', tmp_path / 'all', tmp_path / 'c'])
    assert rc == 2 and err.startswith('modcl: error:') and 'other backbone weights' in err
    assert read_index(tmp_path / 'all')['tasks'] == ['cats', 'dogs', 'mice']
    rc, out, err = _run(['merge', '--out', tmp_path / 'all'])
    assert rc == 2 and 'SRC' in err


def test_parallel_tasks_example_core(tmp_path, capsys):
    """examples/parallel_tasks.py without its process spawning (the workers run one after another here): 3 tasks
    learned by 3 workers, merged, loaded, each bit-identical to its worker, a foreign backbone refused."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('parallel_tasks', ROOT / 'examples' / 'parallel_tasks.py')
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(['--quick', '--out', str(tmp_path / 'run')])
    (tmp_path / 'run').mkdir()
    for i in range(example.NUM_TASKS):
        example.learn(i, args)
    assert example.merge_and_check(args)
    out = capsys.readouterr().out
    assert out.count('bit-identical to its worker: yes') == 3 and 'refused as expected' in out
    assert read_index(tmp_path / 'run' / 'merged')['tasks'] == ['digits-0-1-2-3', 'digits-4-5-6', 'digits-7-8-9']
