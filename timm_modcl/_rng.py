"""Global random states on error paths: a call that fails leaves the torch, NumPy and Python generators as they were.

Iterating a DataLoader draws its base seed from the global torch generator, and building a model initialises its
weights from it, so an error found while reading the data (bad labels, NaN images) or after building (a missing
adapter) would otherwise move the generators of the caller, whose later results then change.
"""
import contextlib
import random
from typing import Any, Iterator, Optional, Tuple

import torch

__all__ = ['keep_rng_on_error']


def _states() -> Tuple[torch.Tensor, Optional[list], Any, Any]:
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torchvision
        np_state = None
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda, np_state, random.getstate()


def _restore(states: Tuple[torch.Tensor, Optional[list], Any, Any]) -> None:
    cpu, cuda, np_state, py_state = states
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if np_state is not None:
        import numpy as np
        np.random.set_state(np_state)
    random.setstate(py_state)


@contextlib.contextmanager
def keep_rng_on_error() -> Iterator[None]:
    """Context manager (and decorator): if the block raises, put the torch (CPU and initialised CUDA), NumPy and
    Python random states back to what they were when it started, then re-raise. On success nothing is restored."""
    states = _states()
    try:
        yield
    except BaseException:
        _restore(states)
        raise
