"""The value checks of a checkpoint: finite numbers, the history, and what a run's own optimizer keeps after a step
(the state template, the Adam moment bound).
"""

import copy
import json
import math
import re
from typing import Any, Dict, Mapping, Optional

import torch

from ..errors import CheckpointError
from .encoding import _decode, _encode


# ---------------------------------------------------------------------------------------------------- value checks
#: optimizer state keys that hold squares, sums of squares or maxima of magnitudes (Adam's ``exp_avg_sq``,
#: ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``, Adadelta's ``acc_delta``, Adamax's ``exp_inf``)
_NON_NEGATIVE_STATE = re.compile(r'sq|square|^sum$|^acc_delta$|^exp_inf$')


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (``1`` is not ``1.0`` or ``True``; NaN equals nothing)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _normalised(obj: Any) -> Any:
    """``obj`` as a checkpoint stores and reads it back (JSON, tuples kept)."""
    return _decode(json.loads(json.dumps(_encode(obj))))


def _check_history(history: Mapping[str, Any], task: str, epoch: int, label: str) -> None:
    """The history of ``epoch`` finished epochs: the fields of ``TrainHistory``, one finite value per epoch each."""
    from dataclasses import fields

    from ..training.history import TrainHistory
    names = {f.name for f in fields(TrainHistory)}
    if set(history) != names:
        odd = sorted(set(history) ^ names)
        raise CheckpointError(f'{label}: the history does not have the fields of a TrainHistory ({odd[:4]})')
    if history['task'] != task:
        raise CheckpointError(f'{label}: the history is of task {history["task"]!r}, not {task!r}')
    if not isinstance(history['stopped_early'], bool):
        raise CheckpointError(f'{label}: the history\'s stopped_early is {history["stopped_early"]!r}, not a bool')
    bounds = {'train_loss': math.inf, 'train_acc': 1.0, 'val_acc': 1.0, 'lr': math.inf, 'head_lr': math.inf,
              'epoch_time_s': math.inf}
    for key, top in bounds.items():
        values = history[key]
        if not isinstance(values, list) or len(values) != epoch:
            raise CheckpointError(f'{label}: the history\'s {key} must list {epoch} value(s), one per finished '
                                  f'epoch')
        for v in values:
            if v is None and key == 'val_acc':
                continue
            if not _finite_number(v) or not 0 <= v <= top:
                raise CheckpointError(f'{label}: the history\'s {key} has the value {v!r} (a number from 0 to '
                                      f'{top:g} expected)')


def _adam_bound(optimizer: torch.optim.Optimizer, group: int) -> Optional[float]:
    """For Adam-type optimizers (exponential averages ``m`` of the gradients and ``v`` of their squares, betas
    ``b1``, ``b2``): the ``c`` with ``m**2 <= c * v`` for every gradient sequence (Cauchy-Schwarz over the two
    averages' weights: ``c = (1 - b1)**2 / ((1 - b2) * (1 - b1**2 / b2))``); ``None`` for other optimizers."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)):
        return None
    betas = optimizer.param_groups[group].get('betas')
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_finite_number(b) for b in betas):
        return None
    b1, b2 = (float(b) for b in betas)
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        return None
    return (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))


def _state_template(optimizer: torch.optim.Optimizer) -> Optional[Dict[int, Dict[str, Any]]]:
    """The per-parameter state ``optimizer`` keeps after a step (keys, tensor shapes and dtypes), from one step of
    a copy on copies of its parameters (the global random state and the parameters are not touched); ``None`` for
    an optimizer that cannot be stepped that way."""
    try:
        with torch.random.fork_rng(devices=[]):
            dry = copy.deepcopy(optimizer)
            for group in dry.param_groups:
                for p in group['params']:
                    p.grad = torch.ones_like(p)
            dry.step()
            state = dry.state_dict()['state']
        return {int(i): dict(st) for i, st in state.items()}
    except Exception:  # noqa: BLE001 - e.g. an optimizer that needs a closure: the generic checks remain
        return None
