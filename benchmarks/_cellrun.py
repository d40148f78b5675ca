"""Running and storing one cell of the accuracy protocol (one task, or one sequence, of one method with one setting
and seed). Everything that decides a cell's result lives here, in ``baselines.py`` and in ``_fetch.py``: their
hash (``_protocol.bench_code_hash``) is part of every cell's key, so changed code never reuses old cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import _fetch

_WORKER: Dict[str, Any] = {}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cell_key(spec: Dict[str, Any]) -> str:
    """File stem of a cell: method, tasks, training size, seed and a digest of the whole spec (code hash included)."""
    body = {k: v for k, v in spec.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    tasks = "+".join(t[:6] for t in spec["tasks"])
    return f"{spec['method']}-{tasks}-n{spec['train_n']}-s{spec['seed']}-{digest}"


class Store:
    """Finished cells, one JSON file each (written atomically), keyed by :func:`cell_key`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mem: Dict[str, Dict[str, Any]] = {}
        for p in sorted(self.folder.glob("*.json")):
            try:
                self.mem[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                _log(f"ignoring unreadable cell file {p}")

    def __contains__(self, key: str) -> bool:
        return key in self.mem

    def get(self, key: str) -> Dict[str, Any]:
        return self.mem[key]

    def put(self, key: str, record: Dict[str, Any]) -> None:
        from timm_modcl._io import atomic_write_bytes
        atomic_write_bytes(self.folder / f"{key}.json", (json.dumps(record) + "\n").encode())
        self.mem[key] = record


def worker_init(threads: int, cache: Optional[str]) -> None:
    """Process-pool initializer: one torch thread (by default), the data cache, Ctrl-C left to the parent."""
    import torch
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _WORKER["cache"] = cache
    _WORKER["raw"] = {}
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _raw(name: str):
    raw = _WORKER.setdefault("raw", {})
    if name not in raw:
        raw[name] = _fetch.LOADERS[name](_WORKER.get("cache"))
    return raw[name]


class AugmentPreprocess:
    """Collate function of the library-recipe cells: timm's training transform (what ``modcl train`` applies through
    ``create_transform(is_training=True)``: random-resized crop, horizontal flip, colour jitter, ImageNet
    normalisation) on each uint8 image (gray ``(H, W)`` or RGB ``(H, W, 3)``)."""

    def __init__(self, size: int) -> None:
        from timm.data import create_transform
        self.tf = create_transform(input_size=int(size), is_training=True, mean=_fetch.IMAGENET_MEAN,
                                   std=_fetch.IMAGENET_STD)

    def __call__(self, items):
        import torch
        from PIL import Image
        xs = [self.tf(Image.fromarray(np.asarray(it[0].numpy() if hasattr(it[0], "numpy") else it[0])).convert("RGB"))
              for it in items]
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
        idx = torch.as_tensor([int(it[2]) for it in items])
        return torch.stack(xs), y, idx


def _augmented_train_loaders(B):
    """``baselines._train_loaders`` with timm's augmentation in the shuffled training loader (the second loader,
    used for BN recalibration / feature caching, stays plain)."""
    plain = B._train_loaders

    def loaders(splits, ctx, recipe, seed):
        loader, train_eval = plain(splits, ctx, recipe, seed)
        loader.collate_fn = AugmentPreprocess(ctx.size)
        return loader, train_eval
    return plain, loaders


def diverged_result(spec: Dict[str, Any], splits, message: str) -> Dict[str, Any]:
    """The record of a cell whose loss became non-finite: accuracy 0 on every evaluated split (every test image
    counted wrong), no counts, ``diverged`` set, so searches rank the setting last and summaries stay well-formed."""
    import baselines as B
    seq = spec["kind"] == "sequence"
    out: Dict[str, Any] = {"diverged": message, "train_s": 0.0, "eval_s": 0.0,
                           "train_images": [len(s.y_train) for s in splits] if seq else len(splits[0].y_train),
                           "counts": [{} for _ in splits] if seq else {}, "history": []}
    for split in spec["evaluate"]:
        ns = [int(len(s.y_val if split == "val" else s.y_test)) for s in splits]
        out[f"{split}_acc"] = [0.0] * len(ns) if seq else 0.0
        out[f"{split}_n"] = ns if seq else ns[0]
        if split == "test":
            bits = [B.pack_bits(np.zeros(n, dtype=bool)) for n in ns]
            out["test_correct"] = bits if seq else bits[0]
            if seq:
                out["test_matrix"] = [[0.0] * len(ns) for _ in ns]
    return out


def run_cell(spec: Dict[str, Any], deadline: Optional[float], running_dir: Optional[str]) -> Dict[str, Any]:
    """Run one cell (in a worker process or in-process) and return its record."""
    import torch
    import baselines as B
    key = cell_key(spec)
    d = spec["data"]
    progress: List[Dict[str, Any]] = []

    def on_epoch(info):
        progress.append(info)
        if running_dir:
            from timm_modcl._io import atomic_write_bytes
            atomic_write_bytes(Path(running_dir) / f"{key}.json",
                               json.dumps({"spec": spec, "progress": progress}).encode())

    device = spec.get("_device") or d["device"]
    ctx = B.Context(weights=_fetch.backbone_weights(_WORKER.get("cache")), device=device, amp=d["amp"],
                    size=d["size"], num_workers=int(spec.get("_loader_workers", 0)), deadline=deadline,
                    on_epoch=on_epoch)
    r = spec["recipe"]
    recipe = B.Recipe(epochs=r["epochs"], batch_size=r["batch_size"], lr=r["lr"], head_lr=r["head_lr"],
                      sched=r["sched"], warmup_epochs=r["warmup_epochs"])
    splits = [_fetch.task_splits(t, spec["train_n"], spec["seed"], val_n=d["val_n"], limit=d["limit"], raw=_raw(t))
              for t in spec["tasks"]]
    indices = [_fetch.TASK_ORDER.index(t) for t in spec["tasks"]]
    t0 = time.perf_counter()
    status = "done"
    plain = None
    if r.get("augment"):
        if spec["method"] == "linear_probe":  # its features are cached once: augmentation cannot apply
            pass
        else:
            plain, B._train_loaders = _augmented_train_loaders(B)
    try:
        if spec["kind"] == "sequence":
            result = B.run_sequence_cell(spec["method"], spec["hp"], recipe, splits, indices, spec["seed"], ctx,
                                         spec["evaluate"])
        else:
            result = B.run_task_cell(spec["method"], spec["hp"], recipe, splits[0], indices[0], spec["seed"], ctx,
                                     spec["evaluate"])
    except B.BudgetExceeded:
        status, result = "budget", {"progress": progress}
    except FloatingPointError as e:  # a rate on the grid's edge diverged: a finished cell scoring 0
        result = diverged_result(spec, splits, str(e))
    finally:
        if plain is not None:
            B._train_loaders = plain
        if running_dir:
            try:
                (Path(running_dir) / f"{key}.json").unlink()
            except OSError:
                pass
    return {"key": key, "spec": {k: v for k, v in spec.items() if not k.startswith("_")}, "status": status,
            "result": result, "wall_s": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": torch.get_num_threads(), "pid": os.getpid(), "augment_applied": plain is not None}
