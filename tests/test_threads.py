"""Tasks chosen per call: many threads serving different tasks from one model get their own task's answers, and the
model is unchanged afterwards (issue 16, item 1)."""
import threading

import pytest
import torch

import timm
import timm_modcl  # noqa: F401

TASKS = ('a', 'b', 'c', 'd')


def _perturb_(model, name: str, seed: int) -> None:
    """Give a task distinct modulators, BN statistics, affine and head (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for flat, t in model.modcl_tasks[name].tensors().items():
            if not t.is_floating_point():
                continue
            if flat.endswith('running_var'):
                t.mul_(1 + 0.5 * torch.rand(t.shape, generator=g))
            else:
                t.add_(0.2 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model('modcl_mobilenetv2_050', pretrained=False)
    for i, name in enumerate(TASKS):
        m.add_task(name, num_classes=3 + i, activate=False)   # heads of different sizes: a mix-up cannot hide
        _perturb_(m, name, i)
    m.set_task('b')
    return m.eval()


def _state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.active_task,
            [m.training for m in model.modules()], model.num_classes)


def _assert_same_state(model, before):
    sd, active, modes, num_classes = before
    now = model.state_dict()
    assert set(now) == set(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert model.active_task == active and model.num_classes == num_classes
    assert [m.training for m in model.modules()] == modes


def _run_threads(worker, n_threads: int):
    errors, barrier = [], threading.Barrier(n_threads)

    def run(i):
        try:
            barrier.wait(timeout=30)
            worker(i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), 'a thread hung'
    assert not errors, errors[:3]


def test_eight_threads_four_tasks_fifty_calls_equal_a_serial_run(model):
    """8 threads x 4 tasks x 50 calls through forward_task, forward_tasks and task_scope give exactly the serial
    results (per task, the same batch as one batch), and nothing of the model changes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = {}
        for t in TASKS:
            with model.use_task(t):
                ref[t] = model(x)
    assert len({r.shape[1] for r in ref.values()}) == 4
    model.set_task('b')
    before = _state(model)
    calls = 50
    results = [[] for _ in range(8)]

    def worker(i):
        for c in range(calls):
            t = TASKS[(i + c) % 4]
            kind = c % 3
            if kind == 0:
                y = model.forward_task(x, t)
            elif kind == 1:
                y = torch.stack(model.forward_tasks(x, [t] * 4))
            else:
                with torch.no_grad(), model.task_scope(t):
                    y = model(x)
            results[i].append((t, y))

    torch.set_num_threads(1)
    _run_threads(worker, 8)
    total = sum(len(r) for r in results)
    wrong = sum(not torch.equal(y, ref[t]) for r in results for t, y in r)
    assert total == 8 * calls
    assert wrong == 0, f'{wrong} of {total} results were not their task\'s'
    _assert_same_state(model, before)


def test_mixed_task_batches_from_threads(model):
    """forward_tasks with a different mix of tasks per thread: every sample gets its own task's output."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 32, 32, generator=g)
    mixes = [[TASKS[(i + j) % 4] for j in range(8)] for i in range(4)]
    refs = [model.forward_tasks(x, mix) for mix in mixes]
    before = _state(model)

    def worker(i):
        for _ in range(10):
            out = model.forward_tasks(x, mixes[i % 4])
            assert all(torch.equal(a, b) for a, b in zip(out, refs[i % 4]))

    _run_threads(worker, 8)
    _assert_same_state(model, before)


def test_task_scope_computes_the_task_and_changes_nothing(model):
    x = torch.randn(2, 3, 32, 32)
    before = _state(model)
    with torch.no_grad():
        with model.use_task('c'):
            ref_c, feat_c = model(x), model.forward_features(x)
        with model.task_scope('c'):
            assert model.active_task == 'b'           # the bound task is unchanged
            assert torch.equal(model(x), ref_c)       # head included
            assert torch.equal(model.forward_features(x), feat_c)
            with model.task_scope('a'):               # scopes nest
                assert model(x).shape[1] == 3
            assert torch.equal(model(x), ref_c)
        assert model(x).shape[1] == 4                # 'b' again outside
    _assert_same_state(model, before)
    with pytest.raises(timm_modcl.TaskNotFoundError):
        with model.task_scope('nope'):
            pass


def test_task_scope_of_one_model_leaves_another_alone(model):
    other = timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = other(x)
        with model.task_scope('a'):
            assert torch.equal(other(x), plain)


def test_forward_task_in_train_mode_restores_the_modes_and_statistics(model):
    x = torch.randn(2, 3, 32, 32)
    ref = model.forward_task(x, 'a')
    model.train()
    try:
        before = _state(model)
        y = model.forward_task(x, 'a')                # eval semantics: no BN statistics move
        assert torch.equal(y, ref)
        _assert_same_state(model, before)
    finally:
        model.eval()


def test_scoped_training_step_updates_only_the_scoped_task_statistics(model):
    """In train mode a task scope updates the scoped task's own BatchNorm statistics; the bound task and the others
    stay as they were. Only the bound task's tensors require grad, so a scope trains nothing (set_task / use_task
    bind the task to train)."""
    import copy
    m = copy.deepcopy(model)
    m.train()
    snap = {t: {k: v.detach().clone() for k, v in m.modcl_tasks[t].tensors().items()} for t in TASKS}
    x = torch.randn(4, 3, 32, 32)
    with m.task_scope('c'):
        out = m(x)
    changed = {t: [k for k, v in m.modcl_tasks[t].tensors().items() if not torch.equal(v, snap[t][k])] for t in TASKS}
    assert changed['c'] and all(k.startswith('bn.') for k in changed['c'])
    assert not changed['a'] and not changed['b'] and not changed['d']
    assert not out.requires_grad
    with m.use_task('c'):
        m(x).logsumexp(1).mean().backward()
        grads = [p for p in m.task_parameters('c') if p.grad is not None]
        assert grads and not any(p.grad is not None for t in ('a', 'b', 'd') for p in m.task_parameters(t))
    assert not any(p.grad is not None for p in m.task_parameters('c'))   # unbinding drops them: no stale step


def test_copies_and_pickles_keep_working_with_scopes(model):
    import copy
    import pickle
    x = torch.randn(2, 3, 32, 32)
    ref, ref_b = model.forward_task(x, 'd'), model.forward_task(x, 'b')
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone.forward_task(x, 'd'), ref)
        with torch.no_grad(), clone.task_scope('d'):
            assert torch.equal(clone(x), ref)
        assert clone.active_task == 'b'
        with torch.no_grad(), model.task_scope('a'):  # the original's scope does not reach the copy
            assert torch.equal(clone(x), ref_b)


def test_export_leaves_no_scope_hooks(model):
    plain = model.export_task('a')
    assert not any(h for m in plain.modules() for h in m._forward_hooks.values())
    assert not any('modcl_cache' in m.__dict__ for m in plain.modules())
