"""Training checkpoints of ``train_task``: resume an interrupted training where its last finished epoch left it.

    train_task(model, 'flowers', train_ds, epochs=30, checkpoint='flowers.ckpt.safetensors', resume=True)

A checkpoint is one safetensors file, written atomically (temporary file, fsync, rename) at the end of every epoch:

* tensors: the trained task's tensors (``task.<flat name>``, as in adapter files), the optimizer state flattened to
  ``optimizer.<param index>.<key>``, and per process (``rng.<rank>``) a nested safetensors blob with the random
  states (torch CPU / CUDA, the shuffling generator; Python's and NumPy's as JSON metadata);
* metadata ``state``: JSON with the epoch, the history, the optimizer's parameter groups and scalar state, the
  scheduler and gradient-scaler state, the run's arguments, the task's description and the backbone fingerprint.

Nothing is pickled. Resuming validates everything against the model and the run's arguments before any tensor is
touched, and only the trained task's tensors are restored: other tasks are never read or written. The values are
checked too, not only the structure: task tensors as the adapter loader checks them; the optimizer's settings and
per-parameter state against what the run's own optimizer keeps after a step (finite moments, non-negative second
moments, whole non-negative steps; for Adam-type optimizers a first moment its second moment allows); the scheduler
state equal to the run's; the history, epoch and random states well-formed.
"""

from .encoding import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, restore_rng_state, rng_state_bytes
from .writing import checkpoint_bytes, write_checkpoint
from .reading import TrainCheckpoint, checkpoint_info, parse_checkpoint, read_checkpoint_bytes

__all__ = ['CHECKPOINT_FORMAT', 'CHECKPOINT_FORMAT_VERSION', 'TrainCheckpoint', 'checkpoint_bytes',
           'read_checkpoint_bytes', 'parse_checkpoint', 'rng_state_bytes', 'restore_rng_state', 'checkpoint_info']
