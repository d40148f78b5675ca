"""Helpers shared by the hardening tests (tests/test_hardening_*.py)."""
import torch


def model_state(model):
    """Cheap fingerprint of everything a failed call must leave alone: the tasks, the bound task, the train flag,
    the identity and version of every task and frozen tensor, and the global torch random state."""
    tensors = [t for task in model.modcl_tasks.values() for t in task.tensors().values()]
    tensors += list(model.frozen_tensors().values())
    return (list(model.tasks), model.active_task, model.training, [(id(t), t._version) for t in tensors],
            torch.random.get_rng_state())


def assert_same_state(model, before):
    now = model_state(model)
    assert now[:4] == before[:4]
    assert torch.equal(now[4], before[4]), 'the global random state moved'
