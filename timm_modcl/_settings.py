"""Settings read from the environment, in one place.

``MODCL_WEIGHTS``: path of a local backbone checkpoint used by ``modcl demo`` (and the CLI) instead of downloading
pretrained weights. The Hub's own variables (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ...) are
read by ``huggingface_hub`` itself.
"""
import os
from typing import Optional


def weights_file() -> Optional[str]:
    """The local backbone checkpoint named by ``MODCL_WEIGHTS``, if set."""
    return os.environ.get('MODCL_WEIGHTS') or None


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE``, as huggingface_hub read it at import)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)
