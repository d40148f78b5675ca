"""Settings read from the environment, in one place.

``MODCL_WEIGHTS``: path of a local backbone checkpoint used by ``modcl demo`` (and the CLI) instead of downloading
pretrained weights. The Hub's own variables (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ...) are
read by ``huggingface_hub`` itself.

``MODCL_HUB_TIMEOUT``: seconds a whole Hub push or pull may take before it ends in a ``HubError`` (default 120).
``MODCL_WEIGHT_CACHE_BYTES``: memory limit of a model's cache of effective weights (see ``WeightCache``);
default 256 MiB.
"""
import math
import os
from typing import Optional


def weights_file() -> Optional[str]:
    """The local backbone checkpoint named by ``MODCL_WEIGHTS``, if set."""
    return os.environ.get('MODCL_WEIGHTS') or None


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE``, as huggingface_hub read it at import)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _env_number(name: str, default, cast, ok, expected: str, error: str):
    """A number from the environment variable ``name`` (``default`` when unset or empty), checked with ``ok``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = cast(value)
    except ValueError:
        number = None
    if number is None or not ok(number):
        from . import errors
        raise getattr(errors, error)(f'{name} must be {expected}, got {value!r}')
    return number


#: Default memory limit of a model's effective-weight cache: a few tasks of a mid-size model on a CPU machine.
DEFAULT_WEIGHT_CACHE_BYTES = 256 * 1024 * 1024
#: Default bound, in seconds, of a whole Hub push or pull.
DEFAULT_HUB_TIMEOUT = 120.0


def weight_cache_bytes() -> int:
    """Memory limit of the effective-weight cache (``MODCL_WEIGHT_CACHE_BYTES``, default 256 MiB)."""
    return _env_number('MODCL_WEIGHT_CACHE_BYTES', DEFAULT_WEIGHT_CACHE_BYTES, int, lambda n: n >= 0,
                       'a non-negative integer', 'ModCLError')


def hub_timeout() -> float:
    """Seconds a Hub push or pull may take in all (``MODCL_HUB_TIMEOUT``, default 120)."""
    return _env_number('MODCL_HUB_TIMEOUT', DEFAULT_HUB_TIMEOUT, float, lambda t: 0 < t < math.inf,
                       'a positive, finite number of seconds', 'HubError')
