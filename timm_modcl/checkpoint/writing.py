"""Writing a training checkpoint: its bytes after an epoch (``checkpoint_bytes``), written atomically
(``write_checkpoint``).
"""

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .._io import atomic_write_bytes
from ..errors import CheckpointError
from ..version import __version__
from .encoding import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, _PathLike, _encode, _save


# ---------------------------------------------------------------------------------------------------- write
def checkpoint_bytes(
        model: nn.Module,
        task: str,
        *,
        epoch: int,
        done: bool,
        history: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        run: Mapping[str, Any],
        rng: Sequence[bytes],
        shuffle_seed: Optional[int] = None,
) -> bytes:
    """The bytes of a checkpoint after ``epoch`` finished epochs (see the module docstring)."""
    state = model.task_info(task)
    tensors: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, v in model.task_tensors(task).items():
        tensors[f'task.{k}'] = v
    sd = optimizer.state_dict()
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, st in sd['state'].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f'optimizer.{idx}.{k}'] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    for r, blob in enumerate(rng):
        tensors[f'rng.{r}'] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    payload = {
        'task': task,
        'task_meta': state.meta(),
        'architecture': str(getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)),
        'backbone_fingerprint': model.backbone_fingerprint(),
        'epoch': int(epoch),
        'done': bool(done),
        'run': dict(run),
        'history': dict(history),
        'optimizer': {'param_groups': sd['param_groups'], 'scalars': scalars},
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'world_size': len(rng),
        'shuffle_seed': shuffle_seed,
        'timm_modcl_version': __version__,
    }
    meta = {'format': CHECKPOINT_FORMAT, 'format_version': str(CHECKPOINT_FORMAT_VERSION),
            'state': json.dumps(_encode(payload))}
    return _save(tensors, meta)


def write_checkpoint(path: _PathLike, data: bytes) -> Path:
    """Write checkpoint bytes atomically (the previous checkpoint stays intact until the rename)."""
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise CheckpointError(f'could not write checkpoint {str(path)!r}: {e}') from e
