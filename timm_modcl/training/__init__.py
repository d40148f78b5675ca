"""The parts of ``timm_modcl.train.train_task``, one job per module:

* ``options``: the arguments as one checked value (``TrainOptions``), the trainable task;
* ``loaders``: devices and DataLoaders (seeded shuffling, ``DistributedSampler`` shards);
* ``setup``: the run's plan, set-up and start (``TrainRun``, optimizer and schedule from timm);
* ``precision``: mixed precision and the optimizer step (``Stepper``);
* ``resume``: checkpoint and resume of a run (``RunCheckpoint``; the file format is ``timm_modcl.checkpoint``);
* ``loop``: the epoch loop, the end of an epoch, and what follows the last one;
* ``batchnorm``: BN recalibration after training;
* ``guard``: what an error puts back (``TaskSnapshot``, ``CallerState``) and the seeding;
* ``evaluation``: ``evaluate``, ``predict`` and the per-epoch accuracy;
* ``history``: ``TrainHistory``.

DDP set-up, teardown and the per-step error agreement are ``timm_modcl.distributed`` (``ddp_session``,
``call_together``). The public entry points stay in ``timm_modcl.train``.
"""
from .evaluation import evaluate, predict
from .history import TrainHistory
from .options import TrainOptions

__all__ = ['TrainHistory', 'TrainOptions', 'evaluate', 'predict']
