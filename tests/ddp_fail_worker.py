"""Worker of tests/test_distributed.py: 2 gloo processes train one task while one process's shard goes bad.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_fail_worker.py OUT MODE

MODE ``label``: a label out of range in rank 1's shard; ``nan``: an image that makes rank 1's loss NaN. Each rank writes
``OUT/<rank>.json`` with the error it ended with (class and message), whether its task was put back, and its time.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import timm_modcl  # noqa: F401
from timm_modcl import train_task

from ddp_worker import BN_ARCH, dataset, make_model


class _Poisoned(Dataset):
    """The same samples; after ``after`` reads (``None``: never) every sample read is bad."""

    def __init__(self, data, after, mode: str) -> None:
        self.data, self.after, self.mode, self.reads = data, after, mode, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        self.reads += 1
        if self.after is not None and self.reads > self.after:
            if self.mode == 'label':
                y = torch.tensor(7)
            else:
                x = torch.full_like(x, 3e38)  # finite (passes the input check), overflows in the first conv
        return x, y


def main(out: Path, mode: str) -> None:
    rank = int(os.environ['RANK'])
    model = make_model(BN_ARCH)
    before = {k: v.clone() for k, v in model.modcl_tasks['t'].tensors().items()}
    data = _Poisoned(dataset(16, seed=0), after=4 if rank == 1 else None, mode=mode)  # rank 1's 3rd batch goes bad
    t0 = time.perf_counter()
    try:
        train_task(model, 't', data, epochs=1, batch_size=2, lr=0.01, seed=0, progress=False, prototypes=False,
                   recalibrate_bn=False, distributed=True)
        report = {'error': None}
    except Exception as e:  # noqa: BLE001 (reported)
        report = {'error': type(e).__name__, 'message': str(e), 'modcl': isinstance(e, timm_modcl.ModCLError)}
    report['seconds'] = time.perf_counter() - t0
    after = model.modcl_tasks['t'].tensors()
    report['unchanged'] = all(torch.equal(v, after[k]) for k, v in before.items())
    (out / f'{rank}.json').write_text(json.dumps(report))


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2])
