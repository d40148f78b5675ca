"""Continual-learning accuracy benchmark: timm_modcl against the methods users would pick instead.

    nice -n 10 python benchmarks/accuracy.py               # the protocol below (about 3 h on 2 CPU cores)
    python benchmarks/accuracy.py --quick                  # every method end to end, tiny (a few minutes)
    python benchmarks/accuracy.py --paper-scale --cache DIR --time-budget-s 270   # GPU: 224 px, 30 epochs

Protocol (README "Benchmarks" and ``benchmarks/results/accuracy.md`` state it with the numbers):

* Tasks Fashion-MNIST -> Animal-Shape -> MNIST-5k -> digits at 64 px on an ImageNet MobileNetV2 (``_fetch``). Per
  task: a fixed class-balanced validation split carved from the training images (500; 215 for digits), a class-
  balanced training subset of the rest resampled for every seed (500 images), the dataset's whole test split
  (10,000 / 2,000 / 1,000 / 719 images). Seeds 0, 1, 2.
* Every method trains with the same recipe (``baselines.Recipe``: Adam, batch 32, 5 epochs, the learning rates
  multiplied by 0.1 after half the epochs or a cosine, whichever the schedule search below picked for all).
* Learning rates are chosen on seed 0's validation split only, by the same staged search for every method: stage 1,
  one rate for all of the method's parameters over three half-decade steps around the method's customary rate,
  extended by one step (three times at most) while the best is at an edge; stage 2 (methods with a head and other
  parameters), the head's rate as 1 or 3 times the stage-1 rate, extended the same way (0.01x to 100x). The chosen rates are
  then used for every seed. The criterion is the mean over tasks of the validation accuracy (after the last task for
  sequential fine-tuning and LwF).
* modcl additionally explores its own options on validation (seed 0): first the schedule (step vs cosine, each over
  stage 1; the winner becomes the schedule of every method), the head rate, then one change at a time from the best
  configuration (no per-task BN affine, the paper variant with its own three rates, one warm-up epoch, four per-layer
  resolution profiles of about the same size), all improving changes together, and finally the same staged rate
  search as every method on the configuration kept. That configuration is the library default.
* Test accuracy is computed once, for the chosen settings, on three seeds: mean and sd over seeds, and paired
  bootstrap 95 % intervals (seeds and test images resampled) of each method's difference from the modcl default;
  "better" / "worse" only where the interval excludes 0.
* A data-size sweep on Fashion-MNIST (500 / 2,000 training images) for modcl, LoRA, BN + head and the
  linear probe: at each size stage 1 is rerun around the rate chosen above (head multiplier kept), three seeds.

Cells (one task of one method with one setting and seed, or a whole sequence for sequential fine-tuning / LwF) run in
up to ``--workers`` processes with one torch thread each and are saved as they finish under
``<out-dir>/accuracy_cells/``; a rerun skips the saved ones. ``--time-budget-s`` stops training when the time is up
(the running cells are abandoned, everything finished is kept and summarised).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fetch  # noqa: E402
import _stats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL_VERSION = 1
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
MULTS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
START_LR = {"linear_probe": 1e-2, "bn_head": 1e-2, "lora": 3e-3, "ia3": 1e-2, "piggyback": 3e-3,
            "full_finetune": 3e-4, "seq_finetune": 3e-4, "lwf": 3e-4, "modcl": 1e-2}
SEQUENTIAL = ("seq_finetune", "lwf")
BASELINES = ("linear_probe", "bn_head", "lora", "ia3", "piggyback", "full_finetune", "seq_finetune", "lwf")
LABELS = {
    "modcl": "modcl (default)",
    "linear_probe": "linear probe (head only)",
    "bn_head": "BN + head (per-task BN affine and statistics)",
    "lora": "PEFT LoRA (rank matched to modcl)",
    "ia3": "PEFT IA3",
    "piggyback": "Piggyback (binary masks)",
    "full_finetune": "full fine-tuning, one copy per task (upper bound)",
    "seq_finetune": "sequential fine-tuning (forgets)",
    "lwf": "LwF (forgets)",
}
#: modcl's per-layer resolution profiles explored on validation (modulator values on MobileNetV2 in the comment).
PROFILES = {
    "dw_fine": ((4, 4), {"*conv_dw": (2, 2)}),                                            # 148,902
    "dw_full": ((6, 6), {"*conv_dw": (1, 1)}),                                            # 122,107
    "early_fine": ((4, 4), {"conv_stem": (1, 1), "blocks.[0-3].*": (2, 2), "blocks.[56].*": (6, 6),
                            "conv_head": (8, 8)}),                                        # 117,222
    "late_fine": ((8, 8), {"blocks.[56].*": (3, 3)}),                                     # 153,076
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _r(x: float) -> float:
    return float(f"{x:.6g}")


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    size: int = 64
    epochs: int = 5
    batch_size: int = 32
    train_n: Optional[int] = 500
    val_n: int = _fetch.VAL_N
    limit: Optional[int] = None
    seeds: Tuple[int, ...] = (0, 1, 2)
    tune_seed: int = 0
    tasks: Tuple[str, ...] = _fetch.TASK_ORDER
    methods: Tuple[str, ...] = ("modcl",) + BASELINES
    grid_width: int = 3
    max_extensions: int = 3
    head_mults: Tuple[float, ...] = (3.0,)
    explore: bool = True
    toggles: Optional[Tuple[str, ...]] = None       # None: all
    sweep_task: str = "fashion_mnist"
    sweep_sizes: Tuple[int, ...] = (500, 2000)
    sweep_methods: Tuple[str, ...] = ("modcl", "lora", "bn_head", "linear_probe")
    tune: str = "protocol"                           # or "none": settings from --hp-from / library defaults
    hp_from: Optional[str] = None
    device: str = "cpu"
    amp: bool = False
    workers: int = 2
    threads: int = 1
    loader_workers: int = 0
    cache: Optional[str] = None
    out_dir: str = str(RESULTS)
    stem: str = "accuracy"
    time_budget_s: Optional[float] = None
    bootstrap: int = 4000
    mode: str = "full"

    def data(self) -> Dict[str, Any]:
        return {"size": self.size, "val_n": self.val_n, "limit": self.limit, "device": self.device.split(":")[0],
                "amp": self.amp}


# ---------------------------------------------------------------------------------------------------- cells
def cell_key(spec: Dict[str, Any]) -> str:
    body = {k: v for k, v in spec.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    tasks = "+".join(t[:6] for t in spec["tasks"])
    return f"{spec['method']}-{tasks}-n{spec['train_n']}-s{spec['seed']}-{digest}"


def make_spec(st: Settings, method: str, hp: Dict[str, Any], recipe: Dict[str, Any], tasks: Sequence[str],
              train_n: Optional[int], seed: int, evaluate: Sequence[str], prio: int) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": "sequence" if method in SEQUENTIAL else "task", "method": method,
            "hp": hp, "recipe": recipe, "tasks": list(tasks), "train_n": train_n, "seed": int(seed),
            "evaluate": list(evaluate), "data": st.data(), "_prio": prio}


def specs_for(st: Settings, method: str, hp, recipe, tasks, train_n, seed, evaluate, prio) -> List[Dict[str, Any]]:
    """One cell per task (forgetting-free methods) or one per sequence (sequential fine-tuning, LwF)."""
    if method in SEQUENTIAL:
        return [make_spec(st, method, hp, recipe, tasks, train_n, seed, evaluate, prio)]
    return [make_spec(st, method, hp, recipe, [t], train_n, seed, evaluate, prio) for t in tasks]


class Store:
    """Finished cells, one JSON file each (written atomically), keyed by ``cell_key``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mem: Dict[str, Dict[str, Any]] = {}
        for p in sorted(folder.glob("*.json")):
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


# ---------------------------------------------------------------------------------------------------- worker side
_WORKER: Dict[str, Any] = {}


def _worker_init(threads: int, cache: Optional[str]) -> None:
    import torch
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _WORKER["cache"] = cache
    _WORKER["raw"] = {}
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _raw(name: str):
    raw = _WORKER.setdefault("raw", {})
    if name not in raw:
        raw[name] = _fetch.LOADERS[name](_WORKER.get("cache"))
    return raw[name]


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
    try:
        if spec["kind"] == "sequence":
            result = B.run_sequence_cell(spec["method"], spec["hp"], recipe, splits, indices, spec["seed"], ctx,
                                         spec["evaluate"])
        else:
            result = B.run_task_cell(spec["method"], spec["hp"], recipe, splits[0], indices[0], spec["seed"], ctx,
                                     spec["evaluate"])
    except B.BudgetExceeded:
        status, result = "budget", {"progress": progress}
    finally:
        if running_dir:
            try:
                (Path(running_dir) / f"{key}.json").unlink()
            except OSError:
                pass
    return {"key": key, "spec": {k: v for k, v in spec.items() if not k.startswith("_")}, "status": status,
            "result": result, "wall_s": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": torch.get_num_threads(), "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------------- scheduler
WAIT: List[Dict[str, Any]] = []  # a search yields an empty batch while it waits for another search's decision


class Runner:
    """Runs searches (generators yielding batches of cell specs) over a process pool, highest priority first."""

    def __init__(self, st: Settings, store: Store) -> None:
        self.st = st
        self.store = store
        self.deadline = time.time() + st.time_budget_s if st.time_budget_s else None
        self.stopped = False
        self.running_dir = Path(st.out_dir) / f"{st.stem}_cells" / "running"
        self.running_dir.mkdir(parents=True, exist_ok=True)
        self.computed = 0
        self.abandoned: List[Dict[str, Any]] = []

    def expired(self) -> bool:
        return self.stopped or (self.deadline is not None and time.time() > self.deadline)

    def run(self, searches: Dict[str, Generator]) -> Dict[str, Any]:
        st = self.st
        outcomes: Dict[str, Any] = {}
        batches: Dict[str, List[Dict[str, Any]]] = {}
        for name, gen in searches.items():
            self._advance(name, gen, batches, outcomes, first=True)
        queue: List[Tuple[int, int, Dict[str, Any]]] = []
        queued: set = set()
        inflight: Dict[Any, str] = {}
        counter = 0
        pool = None
        if st.workers > 1:
            pool = cf.ProcessPoolExecutor(st.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                          initargs=(st.threads, st.cache))
        else:
            _worker_init(st.threads, st.cache)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                changed = True
                while changed:  # hand finished batches back to their searches; let waiting searches look again
                    changed = False
                    for name in list(batches):
                        batch = batches[name]
                        if batch and all(cell_key(s) in self.store for s in batch):
                            self._advance(name, searches[name], batches, outcomes)
                            changed = True
                    for name in [n for n, b in batches.items() if not b]:
                        self._advance(name, searches[name], batches, outcomes)
                        if batches.get(name, True):
                            changed = True
                if not batches:
                    break
                for batch in batches.values():
                    for s in batch:
                        k = cell_key(s)
                        if k not in self.store and k not in queued:
                            counter += 1
                            queue.append((s.get("_prio", 5), counter, s))
                            queued.add(k)
                if self.expired():
                    _log("time budget used up (or stopped): no new cells")
                    break
                if not queue and not inflight:
                    raise RuntimeError(f"searches wait on each other: {sorted(batches)}")
                queue.sort(key=lambda q: (q[0], q[1]))
                if pool is None:
                    _, _, s = queue.pop(0)
                    self._finish(run_cell(dict(s, _device=st.device, _loader_workers=st.loader_workers),
                                          self.deadline, str(self.running_dir)))
                    queued.discard(cell_key(s))
                    continue
                while len(inflight) < st.workers and queue:
                    _, _, s = queue.pop(0)
                    fut = pool.submit(run_cell, dict(s, _device=st.device, _loader_workers=st.loader_workers),
                                      self.deadline, str(self.running_dir))
                    inflight[fut] = cell_key(s)
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    queued.discard(inflight.pop(fut))
                    self._finish(fut.result())
        except KeyboardInterrupt:
            _log("interrupted: summarising what finished")
            self.stopped = True
        finally:
            if pool is not None:
                if self.stopped:  # abandon running cells now rather than at their next epoch
                    for proc in list(getattr(pool, "_processes", {}).values()):
                        proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
        return outcomes

    def _finish(self, record: Dict[str, Any]) -> None:
        spec = record["spec"]
        if record["status"] != "done":
            _log(f"cell {record['key']} stopped by the time budget after {record['wall_s']:.0f}s")
            self.abandoned.append({"key": record["key"], "spec": spec, "wall_s": record["wall_s"],
                                   "progress": record["result"].get("progress", [])})
            self.stopped = True
            return
        self.store.put(record["key"], record)
        self.computed += 1
        res = record["result"]
        acc = res.get("test_acc", res.get("val_acc"))
        if isinstance(acc, list):
            acc = float(np.mean(acc))
        _log(f"done {record['key']} lr={spec['recipe']['lr']:.3g} head_lr={spec['recipe']['head_lr']:.3g} "
             f"{'test' if 'test_acc' in res else 'val'}={acc:.4f} {record['wall_s']:.0f}s")

    def _advance(self, name, gen, batches, outcomes, first=False) -> None:
        try:
            nxt = next(gen) if first else gen.send(None)
        except StopIteration as e:
            outcomes[name] = e.value
            batches.pop(name, None)
            return
        batches[name] = list(nxt)


# ---------------------------------------------------------------------------------------------------- searches
class Protocol:
    """The searches of the protocol; ``decisions`` is what they tell each other."""

    def __init__(self, st: Settings, store: Store) -> None:
        self.st = st
        self.store = store
        self.decisions: Dict[str, Any] = {"hp": {}}
        self.summaries: Dict[str, Any] = {}
        self.preset = self._load_preset()

    # -- helpers
    def _load_preset(self) -> Dict[str, Any]:
        if self.st.tune != "none":
            return {}
        if not self.st.hp_from:
            return {}
        data = json.loads(Path(self.st.hp_from).read_text())
        return {m: v["chosen"] for m, v in data.get("methods", {}).items() if v.get("chosen")}

    def recipe(self, lr: float, head_lr: float, sched: str, warmup: int = 0) -> Dict[str, Any]:
        return {"epochs": self.st.epochs, "batch_size": self.st.batch_size, "lr": _r(lr), "head_lr": _r(head_lr),
                "sched": sched, "warmup_epochs": int(warmup)}

    def score(self, specs: List[Dict[str, Any]]) -> Tuple[float, Dict[str, float]]:
        per_task: Dict[str, float] = {}
        for s in specs:
            res = self.store.get(cell_key(s))["result"]
            if s["kind"] == "sequence":
                per_task.update(dict(zip(s["tasks"], res["val_acc"])))
            else:
                per_task[s["tasks"][0]] = res["val_acc"]
        return float(np.mean(list(per_task.values()))), per_task

    def evaluate(self, method, hp, lr, head_lr, sched, warmup, tasks, train_n, prio, label, table):
        """Generator: validation score of one setting on the tuning seed (appends a row to ``table``)."""
        specs = specs_for(self.st, method, hp, self.recipe(lr, head_lr, sched, warmup), tasks, train_n,
                          self.st.tune_seed, ["val"], prio)
        yield specs
        mean, per_task = self.score(specs)
        row = {"stage": label, "lr": _r(lr), "head_lr": _r(head_lr), "sched": sched, "warmup_epochs": warmup,
               "hp": hp, "val_mean": mean, "val_per_task": per_task}
        table.append(row)
        return row

    def parallel(self, gens: List[Generator]) -> Generator:
        """Run sub-searches side by side; returns their results in order."""
        outs: List[Any] = [None] * len(gens)
        live: Dict[int, List[Dict[str, Any]]] = {}
        for i, g in enumerate(gens):
            try:
                live[i] = next(g)
            except StopIteration as e:
                outs[i] = e.value
        while live:
            yield [s for b in live.values() for s in b]
            for i in list(live):
                if all(cell_key(s) in self.store for s in live[i]):
                    try:
                        live[i] = gens[i].send(None)
                    except StopIteration as e:
                        outs[i] = e.value
                        del live[i]
        return outs

    def ladder_search(self, values: List[float], start: int, run: Callable[[float], Generator], label: str):
        """Generator: the window of ``grid_width`` ladder steps around ``start``, extended while an edge wins."""
        st = self.st
        half = (st.grid_width - 1) // 2
        lo, hi = max(0, start - half), min(len(values) - 1, start - half + st.grid_width - 1)
        tried: Dict[int, Dict[str, Any]] = {}
        todo = list(range(lo, hi + 1))
        ext = 0
        while True:
            rows = yield from self.parallel([run(values[i]) for i in todo if i not in tried])
            for i, row in zip([i for i in todo if i not in tried], rows):
                tried[i] = row
            best = max(sorted(tried), key=lambda i: tried[i]["val_mean"])
            if ext < st.max_extensions and best == min(tried) and best > 0:
                todo, ext = [best - 1], ext + 1
            elif ext < st.max_extensions and best == max(tried) and best < len(values) - 1:
                todo, ext = [best + 1], ext + 1
            else:
                return values[best], tried[best]

    def lr_search(self, method, hp, sched, warmup, tasks, train_n, start_lr, prio, table, head_mult=None,
                  stage2=True, tag="", stage1_row=None):
        """Generator: stage 1 (shared rate; skipped when ``stage1_row`` gives its result) and stage 2 (head
        multiplier); returns the chosen row."""
        two = method != "linear_probe"
        m1 = head_mult if head_mult is not None else 1.0

        def run1(lr):
            return self.evaluate(method, hp, lr, lr * m1 if two else lr, sched, warmup, tasks, train_n, prio,
                                 f"{tag}stage 1: lr", table)

        if stage1_row is None:
            lr, row = yield from self.ladder_search(LADDER, LADDER.index(_nearest(LADDER, start_lr)), run1, "lr")
        else:
            lr, row = stage1_row["lr"], stage1_row
        if not (two and stage2 and head_mult is None):
            return row
        mults = [m for m in MULTS]
        known = {1.0: row}

        def run2(mult):
            if mult in known:
                return _const(known[mult])
            return self.evaluate(method, hp, lr, lr * mult, sched, warmup, tasks, train_n, prio,
                                 f"{tag}stage 2: head multiplier", table)

        # window: 1 (done) and the configured multipliers, extended while an edge wins
        st = self.st
        window = sorted({1.0, *st.head_mults})
        tried: Dict[float, Dict[str, Any]] = {}
        todo = window
        ext = 0
        while True:
            rows = yield from self.parallel([run2(m) for m in todo if m not in tried])
            for m, r in zip([m for m in todo if m not in tried], rows):
                tried[m] = r
            best = max(sorted(tried), key=lambda m: tried[m]["val_mean"])
            i = mults.index(best)
            if ext < st.max_extensions and best == min(tried) and i > 0:
                todo, ext = [mults[i - 1]], ext + 1
            elif ext < st.max_extensions and best == max(tried) and i < len(mults) - 1:
                todo, ext = [mults[i + 1]], ext + 1
            else:
                return tried[best]

    def finals(self, method, hp, row, tasks, train_n, prio, seeds=None):
        """Generator: the test cells of a chosen setting over the seeds; returns their specs."""
        specs = []
        for seed in (seeds if seeds is not None else self.st.seeds):
            specs += specs_for(self.st, method, hp, self.recipe(row["lr"], row["head_lr"], row["sched"],
                                                                row["warmup_epochs"]),
                               tasks, train_n, seed, ["val", "test"], prio)
        yield specs
        return specs

    # -- modcl
    def modcl_hp(self, resolution, variant="identity", layer_resolution=None, bn_affine=True) -> Dict[str, Any]:
        from timm_modcl.config import TaskConfig
        cfg = TaskConfig(resolution=tuple(resolution) if resolution is not None else None, variant=variant,
                         layer_resolution=tuple((k, v) for k, v in (layer_resolution or {}).items()),
                         bn_affine=bn_affine)
        return {"config": cfg.to_dict()}

    def modcl_search(self):
        st, table = self.st, []
        tasks, prio = list(st.tasks), 0
        if st.tune == "none":
            row = self._preset_row("modcl")
            self.decisions.update(sched=row["sched"], modcl=row, modcl_budget=_modulators(row["hp"]))
            specs = yield from self.finals("modcl", row["hp"], row, tasks, st.train_n, 2)
            self.summaries["modcl"] = {"chosen": row, "validation": [], "final_specs": specs}
            return
        base = self.modcl_hp((4, 4))
        start = START_LR["modcl"]
        # A: the schedule of the protocol, from stage 1 under each
        step_row, cos_row = yield from self.parallel([
            self.lr_search("modcl", base, s, 0, tasks, st.train_n, start, prio, table, stage2=False,
                           tag=f"A ({s}) ") for s in ("step", "cosine")])
        a = cos_row if cos_row["val_mean"] > step_row["val_mean"] else step_row
        self.decisions["sched"] = a["sched"]
        _log(f"schedule chosen on modcl's validation: {a['sched']} (step {step_row['val_mean']:.4f}, "
             f"cosine {cos_row['val_mean']:.4f})")
        # B: the head's rate
        b = yield from self.lr_search("modcl", base, a["sched"], 0, tasks, st.train_n, a["lr"], prio, table,
                                      tag="B ", stage1_row=a)
        cur = b
        if st.explore:
            cur = yield from self.modcl_toggles(cur, tasks, table)
        # E: the staged rate search of every method, on the configuration kept
        final = yield from self.lr_search("modcl", cur["hp"], cur["sched"], cur["warmup_epochs"], tasks, st.train_n,
                                          start, prio, table, tag="E ")
        self.decisions.update(modcl=final, modcl_budget=_modulators(final["hp"]))
        self.decisions["hp"]["modcl"] = final
        _log(f"modcl default chosen on validation: {final['hp']} lr={final['lr']} head_lr={final['head_lr']} "
             f"sched={final['sched']} warmup={final['warmup_epochs']}")
        specs = yield from self.finals("modcl", final["hp"], final, tasks, st.train_n, 2)
        self.summaries["modcl"] = {"chosen": final, "validation": table, "final_specs": specs}

    def modcl_toggles(self, cur, tasks, table):
        """Generator: one change at a time from ``cur``, then all improving changes together."""
        st = self.st
        cfg = cur["hp"]["config"]

        def with_cfg(**changes):
            c = dict(cfg, **changes)
            return {"config": c}

        changes: Dict[str, Dict[str, Any]] = {
            "bn_affine=False": {"hp": with_cfg(bn_affine=False)},
            "warmup_epochs=1": {"warmup": 1},
        }
        for name, (res, layers) in PROFILES.items():
            changes[f"profile {name}"] = {"hp": with_cfg(resolution=list(res),
                                                           layer_resolution=[[k, list(v)] for k, v in layers.items()])}
        if st.toggles is not None:
            changes = {k: v for k, v in changes.items() if k in st.toggles}
        gens, names = [], []
        for name, ch in changes.items():
            names.append(name)
            gens.append(self.evaluate("modcl", ch.get("hp", cur["hp"]), cur["lr"], cur["head_lr"], cur["sched"],
                                      ch.get("warmup", cur["warmup_epochs"]), tasks, st.train_n, 0, f"C {name}", table))
        paper = None
        if st.toggles is None or "variant=paper" in st.toggles:
            i = LADDER.index(_nearest(LADDER, cur["lr"]))
            paper_hp = with_cfg(variant="paper")
            mult = cur["head_lr"] / cur["lr"]
            paper = [self.evaluate("modcl", paper_hp, LADDER[j], LADDER[j] * mult, cur["sched"], cur["warmup_epochs"],
                                   tasks, st.train_n, 0, "C variant=paper", table)
                     for j in (i - 1, i, i + 1) if 0 <= j < len(LADDER)]
        rows = yield from self.parallel(gens + (paper or []))
        singles = dict(zip(names, rows[:len(names)]))
        if paper:
            singles["variant=paper"] = max(rows[len(names):], key=lambda r: r["val_mean"])
        improving = [n for n, r in singles.items() if r["val_mean"] > cur["val_mean"]]
        _log("modcl one-change results: " + ", ".join(f"{n} {r['val_mean'] - cur['val_mean']:+.4f}"
                                                       for n, r in singles.items()))
        best = max([cur] + [singles[n] for n in improving], key=lambda r: r["val_mean"])
        # D: every improving change together (of several profiles, the best one)
        profiles = [n for n in improving if n.startswith("profile")]
        combo_names = [n for n in improving if not n.startswith("profile")]
        if profiles:
            combo_names.append(max(profiles, key=lambda n: singles[n]["val_mean"]))
        if len(combo_names) >= 2:
            hp = copy.deepcopy(cur["hp"])
            lr, head_lr, warm = cur["lr"], cur["head_lr"], cur["warmup_epochs"]
            for n in combo_names:
                r = singles[n]
                if n == "warmup_epochs=1":
                    warm = 1
                elif n == "variant=paper":
                    hp["config"]["variant"] = "paper"
                    lr, head_lr = r["lr"], r["head_lr"]
                elif n == "bn_affine=False":
                    hp["config"]["bn_affine"] = False
                else:
                    hp["config"]["resolution"] = r["hp"]["config"]["resolution"]
                    hp["config"]["layer_resolution"] = r["hp"]["config"]["layer_resolution"]
            combo = yield from self.evaluate("modcl", hp, lr, head_lr, cur["sched"], warm, tasks, st.train_n, 0,
                                             "D " + " + ".join(combo_names), table)
            if combo["val_mean"] > best["val_mean"]:
                best = combo
        return best

    def _preset_row(self, method: str) -> Dict[str, Any]:
        if method in self.preset:
            row = dict(self.preset[method])
            row["hp"] = dict(row.get("hp", {}))
            row["stage"] = f"from {self.st.hp_from}"
            return row
        if method != "modcl":
            raise SystemExit(f"--tune none needs chosen settings for {method}: pass --hp-from a previous "
                             f"accuracy.json that has them")
        from timm_modcl.config import DEFAULT_CONFIG
        import inspect
        from timm_modcl.train import train_task
        d = {k: p.default for k, p in inspect.signature(train_task).parameters.items()}
        lr = d["lr"]
        return {"hp": {"config": DEFAULT_CONFIG.to_dict()}, "lr": lr, "head_lr": d["head_lr"] or lr,
                "sched": d["sched"], "warmup_epochs": d["warmup_epochs"], "stage": "library default"}

    # -- baselines
    def baseline_search(self, method: str):
        st, table = self.st, []
        tasks = list(st.tasks)
        while "sched" not in self.decisions:
            yield WAIT
        hp: Dict[str, Any] = {}
        if method == "lora":
            while "modcl_budget" not in self.decisions:
                yield WAIT
            hp = {"rank": _lora_rank(self.decisions["modcl_budget"])}
        if st.tune == "none":
            row = self._preset_row(method)
            row["hp"] = dict(row["hp"], **hp)
        else:
            row = yield from self.lr_search(method, hp, self.decisions["sched"], 0, tasks, st.train_n,
                                            START_LR[method], 1, table)
        self.decisions["hp"][method] = row
        specs = yield from self.finals(method, row["hp"], row, tasks, st.train_n, 2)
        self.summaries[method] = {"chosen": row, "validation": table, "final_specs": specs}

    # -- data-size sweep
    def sweep_search(self, method: str, size: int):
        st, table = self.st, []
        while method not in self.decisions["hp"]:
            yield WAIT
        main = self.decisions["hp"][method]
        tasks = [st.sweep_task]
        mult = main["head_lr"] / main["lr"]
        if st.tune == "none":
            row = main
        else:
            row = yield from self.lr_search(method, main["hp"], main["sched"], main["warmup_epochs"], tasks, size,
                                            main["lr"], 3, table, head_mult=mult, stage2=False)
        specs = yield from self.finals(method, row["hp"], row, tasks, size, 3)
        self.summaries.setdefault("sweep", {})[f"{method}@{size}"] = {
            "method": method, "train_n": size, "chosen": row, "validation": table, "final_specs": specs}

    def searches(self) -> Dict[str, Generator]:
        st = self.st
        out: Dict[str, Generator] = {}
        if "modcl" in st.methods or "lora" in st.methods or any(m in st.methods for m in st.sweep_methods):
            out["modcl"] = self.modcl_search()
        for m in st.methods:
            if m != "modcl":
                out[m] = self.baseline_search(m)
        for size in st.sweep_sizes:
            for m in st.sweep_methods:
                if m in st.methods:
                    out[f"sweep {m}@{size}"] = self.sweep_search(m, size)
        return out


def _const(value):
    """A generator that yields nothing to run and returns ``value``."""
    return value
    yield  # pragma: no cover


def _nearest(values: Sequence[float], x: float) -> float:
    return min(values, key=lambda v: abs(math.log(v) - math.log(x)))


_MODULATORS: Dict[str, int] = {}


def _modulators(hp: Dict[str, Any]) -> int:
    """Modulator values of a modcl config on MobileNetV2 (what LoRA's rank is matched to)."""
    key = json.dumps(hp, sort_keys=True)
    if key not in _MODULATORS:
        import timm
        import timm_modcl  # noqa: F401
        from timm_modcl.config import TaskConfig
        cfg = TaskConfig.from_dict(hp["config"])
        model = timm.create_model("modcl_mobilenetv2_100")
        shapes = model.modulator_shapes(cfg.resolution, dict(cfg.layer_resolution)) if cfg.resolution else {}
        _MODULATORS[key] = int(sum(math.prod(s) for s in shapes.values()))
    return _MODULATORS[key]


def _lora_rank(budget: int) -> int:
    import baselines as B
    return B.lora_rank_for_budget(B.plain_backbone(None), budget)


# ---------------------------------------------------------------------------------------------------- summary
def _final_cells(store: Store, specs: List[Dict[str, Any]]):
    return [store.get(cell_key(s)) if cell_key(s) in store else None for s in specs]


def _method_summary(p: Protocol, name: str, summ: Dict[str, Any], tasks: Sequence[str]) -> Dict[str, Any]:
    """Per-seed test accuracies, counts and statistics of one method from its final cells."""
    store = p.store
    cells = _final_cells(store, summ["final_specs"])
    per_seed: Dict[int, Dict[str, Any]] = {}
    correct: Dict[int, Dict[str, np.ndarray]] = {}
    counts, masks, matrices, walls, imgs, train_s = None, {}, {}, [], 0, 0.0
    for spec, cell in zip(summ["final_specs"], cells):
        if cell is None:
            continue
        res, seed = cell["result"], spec["seed"]
        walls.append(cell["wall_s"])
        d = per_seed.setdefault(seed, {"test": {}, "val": {}})
        if spec["kind"] == "sequence":
            for j, t in enumerate(spec["tasks"]):
                d["test"][t] = res["test_acc"][j]
                d["val"][t] = res["val_acc"][j]
                correct.setdefault(seed, {})[t] = _unpack(res["test_correct"][j], res["test_n"][j])
            matrices[seed] = res["test_matrix"]
            counts = counts or {t: c for t, c in zip(spec["tasks"], res["counts"])}
            imgs += sum(res["train_images"]) * spec["recipe"]["epochs"]
        else:
            t = spec["tasks"][0]
            d["test"][t] = res["test_acc"]
            d["val"][t] = res["val_acc"]
            correct.setdefault(seed, {})[t] = _unpack(res["test_correct"], res["test_n"])
            counts = counts or {}
            counts.setdefault(t, res["counts"])
            if "mask_zero_fraction" in res["counts"]:
                masks.setdefault(seed, {})[t] = res["counts"]["mask_zero_fraction"]
            imgs += res["train_images"] * spec["recipe"]["epochs"]
        train_s += res["train_s"]
    complete = [s for s, d in per_seed.items() if len(d["test"]) == len(tasks)]
    out: Dict[str, Any] = {"label": LABELS.get(name, name), "chosen": summ["chosen"],
                           "validation": summ.get("validation", []), "complete_seeds": sorted(complete),
                           "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}}
    if counts:
        first = counts[next(iter(counts))]
        out["counts_per_task"] = counts
        out["values_per_task"] = first["values"]
        out["trainable_per_task"] = first["trainable"]
        out["bn_stats_per_task"] = first["bn_stats"]
        out["mask_bits_per_task"] = first["mask_bits"]
        out["bytes_per_task"] = float(np.mean([c["bytes"] for c in counts.values()]))
    if complete:
        avgs = [float(np.mean([per_seed[s]["test"][t] for t in tasks])) for s in complete]
        out["test_avg"] = _stats.mean_sd(avgs)
        out["test_avg_per_seed"] = dict(zip(map(str, complete), avgs))
        out["test_per_task"] = {t: _stats.mean_sd([per_seed[s]["test"][t] for s in complete]) for t in tasks}
        out["val_avg"] = _stats.mean_sd([float(np.mean([per_seed[s]["val"][t] for t in tasks])) for s in complete])
    if masks:
        out["piggyback_mask_zero_fraction"] = {str(s): m for s, m in masks.items()}
        vals = [v for m in masks.values() for v in m.values()]
        out["piggyback_mask_zero_fraction_range"] = [float(min(vals)), float(max(vals))]
    if matrices:
        out["test_matrices"] = {str(s): m for s, m in matrices.items()}
        forg = []
        for s, R in matrices.items():
            T = len(R)
            forg.append(float(np.mean([max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)])))
        out["forgetting"] = _stats.mean_sd(forg)
    else:
        out["forgetting"] = {"mean": 0.0, "sd": 0.0, "n": len(complete), "note": "tasks never touch each other"}
    # the final cell of the tuning seed repeats the tuning run: their validation accuracies must agree
    tune = summ["chosen"].get("val_per_task")
    if tune and p.st.tune_seed in per_seed:
        got = per_seed[p.st.tune_seed]["val"]
        out["rerun_val_max_abs_diff"] = max((abs(got[t] - tune[t]) for t in got if t in tune), default=None)
    keys = {cell_key(s) for s in _tuning_specs(p, summ)}
    tune_walls = [store.get(k)["wall_s"] for k in keys if k in store]
    out["wall_s"] = {"tuning": float(sum(tune_walls)), "final": float(sum(walls)), "cells": len(tune_walls) + len(walls)}
    if train_s:
        out["train_images_per_s"] = imgs / train_s
    out["_correct"] = correct
    return out


def _tuning_specs(p: Protocol, summ: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for row in summ.get("validation", []):
        method = "modcl" if "config" in row["hp"] else summ.get("_method")
        if method is None:
            continue
        out += specs_for(p.st, method, row["hp"], p.recipe(row["lr"], row["head_lr"], row["sched"],
                                                           row["warmup_epochs"]),
                         list(row["val_per_task"]), summ.get("_train_n", p.st.train_n), p.st.tune_seed, ["val"], 0)
    return out


def _unpack(text: str, n: int) -> np.ndarray:
    import baselines as B
    return B.unpack_bits(text, n)


def _crossings(sizes: List[int], a: List[Optional[float]], b: List[Optional[float]]) -> List[str]:
    out = []
    for i in range(len(sizes) - 1):
        if None in (a[i], a[i + 1], b[i], b[i + 1]):
            continue
        d0, d1 = a[i] - b[i], a[i + 1] - b[i + 1]
        if d0 == 0 or d0 * d1 < 0:
            out.append(f"between {sizes[i]:,} and {sizes[i + 1]:,} training images")
    return out


def summarise(p: Protocol, st: Settings, wall_s: float, complete: bool) -> Dict[str, Any]:
    """The whole protocol as one JSON-able dict (accuracy.json)."""
    import timm
    import torch
    tasks = list(st.tasks)
    out: Dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION, "complete": complete, "mode": st.mode,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(st).items()
                     if k not in ("cache", "out_dir")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "timm": timm.__version__, "device": _device_name(st.device), "workers": st.workers,
                    "torch_threads_per_worker": st.threads},
        "wall_s": wall_s,
        "decisions": {k: v for k, v in p.decisions.items() if k != "hp"},
        "data": _data_summary(st),
        "methods": {},
    }
    summaries = {}
    for name, summ in p.summaries.items():
        if name == "sweep":
            continue
        summ = dict(summ, _method=name)
        summaries[name] = _method_summary(p, name, summ, tasks)
    ref = summaries.get("modcl")
    for name, s in summaries.items():
        if ref is not None and name != "modcl" and s.get("complete_seeds") and ref.get("complete_seeds"):
            a = {seed: [s["_correct"][seed][t] for t in tasks] for seed in s["complete_seeds"]}
            b = {seed: [ref["_correct"][seed][t] for t in tasks] for seed in ref["complete_seeds"]}
            if set(a) & set(b):
                bs = _stats.paired_bootstrap(a, b, replicates=st.bootstrap)
                bs["verdict"] = _stats.verdict(bs["ci"], f"{name} better", "modcl better")
                s["diff_vs_modcl"] = bs
    for name in ["modcl"] + [m for m in BASELINES if m in summaries]:
        if name in summaries:
            s = summaries[name]
            s.pop("_correct")
            out["methods"][name] = s
    # sweep
    sweep = p.summaries.get("sweep", {})
    if sweep:
        rows: Dict[str, Dict[str, Any]] = {}
        corr: Dict[str, Dict[int, Dict[int, List[np.ndarray]]]] = {}
        for key, summ in sweep.items():
            m, n = summ["method"], summ["train_n"]
            s = _method_summary(p, m, dict(summ, _method=m, _train_n=n), [st.sweep_task])
            corr.setdefault(m, {})[n] = {seed: [s["_correct"][seed][st.sweep_task]] for seed in s["complete_seeds"]}
            s.pop("_correct")
            rows.setdefault(m, {})[str(n)] = {k: s.get(k) for k in ("chosen", "validation", "test_avg",
                                                                    "complete_seeds", "per_seed", "bytes_per_task",
                                                                    "wall_s")}
        sizes = sorted({summ["train_n"] for summ in sweep.values()})
        for m, by_n in rows.items():
            if m == "modcl" or "modcl" not in corr:
                continue
            for n, r in by_n.items():
                a, b = corr[m].get(int(n), {}), corr["modcl"].get(int(n), {})
                if set(a) & set(b):
                    bs = _stats.paired_bootstrap(a, b, replicates=st.bootstrap)
                    bs["verdict"] = _stats.verdict(bs["ci"], f"{m} better", "modcl better")
                    r["diff_vs_modcl"] = bs
        cross = {}
        if "modcl" in rows:
            mc = [rows["modcl"].get(str(n), {}).get("test_avg") for n in sizes]
            mc = [x["mean"] if x else None for x in mc]
            for m, by_n in rows.items():
                if m == "modcl":
                    continue
                other = [by_n.get(str(n), {}).get("test_avg") for n in sizes]
                other = [x["mean"] if x else None for x in other]
                cross[m] = {"modcl_minus_other": [None if None in (x, y) else x - y for x, y in zip(mc, other)],
                            "crossings": _crossings(sizes, mc, other)}
        out["sweep"] = {"task": st.sweep_task, "sizes": sizes, "methods": rows, "crossings": cross}
    out["target"] = _target(out)
    return out


def _target(out: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's target: modcl default <= LoRA's bytes, better than every baseline of at most that size (interval
    excluding 0), and within 1 point of per-task full fine-tuning."""
    ms = out["methods"]
    if "modcl" not in ms or "test_avg" not in ms["modcl"]:
        return {"evaluated": False}
    mod = ms["modcl"]
    res: Dict[str, Any] = {"evaluated": True, "modcl_bytes": mod.get("bytes_per_task")}
    lora = ms.get("lora", {})
    res["lora_bytes"] = lora.get("bytes_per_task")
    res["modcl_at_most_lora_bytes"] = (None if res["lora_bytes"] is None
                                       else mod.get("bytes_per_task", math.inf) <= res["lora_bytes"])
    budget = res["lora_bytes"] if res["lora_bytes"] is not None else mod.get("bytes_per_task")
    beats = {}
    for name, s in ms.items():
        if name in ("modcl", "full_finetune") or "diff_vs_modcl" not in s:
            continue
        if s.get("bytes_per_task", math.inf) <= budget * 1.0000001:
            beats[name] = s["diff_vs_modcl"]["verdict"] == "modcl better"
    res["beats_every_smaller_or_equal_baseline"] = beats
    ft = ms.get("full_finetune", {})
    if "diff_vs_modcl" in ft:
        gap = ft["diff_vs_modcl"]["diff"]
        res["full_finetune_minus_modcl"] = gap
        res["full_finetune_minus_modcl_ci"] = ft["diff_vs_modcl"]["ci"]
        res["within_1_point_of_full_finetune"] = gap <= 0.01
    res["met"] = bool(beats) and all(beats.values()) and bool(res.get("within_1_point_of_full_finetune")) and bool(
        res.get("modcl_at_most_lora_bytes"))
    return res


def _data_summary(st: Settings) -> Dict[str, Any]:
    out = {}
    for t in sorted(set(st.tasks) | ({st.sweep_task} if st.sweep_sizes else set())):
        try:
            s = _fetch.task_splits(t, st.train_n, st.tune_seed, st.cache, val_n=st.val_n, limit=st.limit)
        except Exception as e:  # pragma: no cover - reported, not fatal
            out[t] = {"error": str(e)}
            continue
        out[t] = {"pool": s.pool_size, "train": int(len(s.y_train)), "val": int(len(s.y_val)),
                  "test": int(len(s.y_test)), "classes": s.num_classes}
    return out


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end run of every method (a few minutes)")
    ap.add_argument("--paper-scale", action="store_true",
                    help="224 px, 30 epochs, full training sets, --device cuda, AMP; no tuning: the settings come "
                         "from --hp-from (default benchmarks/results/accuracy.json), one seed")
    ap.add_argument("--size", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--train-n", type=int, help="training images per task (0: all)")
    ap.add_argument("--val-n", type=int)
    ap.add_argument("--limit", type=int, help="cap every split at this many images (dry runs)")
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--tasks", help="comma-separated tasks (default: " + ",".join(_fetch.TASK_ORDER) + ")")
    ap.add_argument("--methods", help="comma-separated methods")
    ap.add_argument("--sweep-sizes", help="comma-separated training sizes of the Fashion-MNIST sweep ('' for none)")
    ap.add_argument("--no-explore", action="store_true", help="skip modcl's one-change exploration")
    ap.add_argument("--tune", choices=("protocol", "none"))
    ap.add_argument("--hp-from", help="accuracy.json whose chosen settings --tune none uses")
    ap.add_argument("--device")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--workers", type=int, help="worker processes (default 2 on CPU, 1 on a GPU)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    ap.add_argument("--loader-workers", type=int, help="DataLoader workers per cell (default 0; 6 at paper scale)")
    ap.add_argument("--cache", help="data/weights folder (default $MODCL_BENCH_CACHE or ~/.cache/timm_modcl/bench); "
                                    "see _fetch.py for the layout of an offline copy")
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results)")
    ap.add_argument("--time-budget-s", type=float, help="stop training after this many seconds, keep what finished")
    ap.add_argument("--bootstrap", type=int, help="bootstrap replicates (default 4000)")
    a = ap.parse_args(argv)
    st = Settings()
    if a.quick:
        st = Settings(size=32, epochs=1, train_n=60, limit=80, seeds=(0, 1, 2), grid_width=2, max_extensions=0,
                      head_mults=(10.0,), toggles=("bn_affine=False", "profile dw_full"), sweep_sizes=(30, 60),
                      stem="accuracy_quick", bootstrap=500, mode="quick")
    if a.paper_scale:
        st = Settings(size=224, epochs=30, train_n=None, device="cuda", amp=True, workers=1, threads=4,
                      loader_workers=6, tune="none", seeds=(0,), sweep_sizes=(), stem="accuracy_paper_scale",
                      hp_from=str(RESULTS / "accuracy.json"), mode="paper-scale")
    for name, attr, conv in (("size", "size", int), ("epochs", "epochs", int), ("val_n", "val_n", int),
                             ("limit", "limit", int), ("device", "device", str), ("workers", "workers", int),
                             ("threads", "threads", int), ("loader_workers", "loader_workers", int),
                             ("cache", "cache", str), ("out_dir", "out_dir", str), ("tune", "tune", str),
                             ("hp_from", "hp_from", str), ("time_budget_s", "time_budget_s", float),
                             ("bootstrap", "bootstrap", int), ("amp", "amp", bool)):
        v = getattr(a, name)
        if v is not None:
            setattr(st, attr, conv(v))
    if a.train_n is not None:
        st.train_n = None if a.train_n == 0 else a.train_n
    if a.seeds:
        st.seeds = tuple(int(s) for s in a.seeds.split(","))
        st.tune_seed = st.seeds[0]
    if a.tasks:
        st.tasks = tuple(a.tasks.split(","))
        bad = [t for t in st.tasks if t not in _fetch.TASK_ORDER]
        if bad:
            ap.error(f"unknown tasks {bad}; choose from {_fetch.TASK_ORDER}")
    if a.methods:
        st.methods = tuple(a.methods.split(","))
        bad = [m for m in st.methods if m not in ("modcl",) + BASELINES]
        if bad:
            ap.error(f"unknown methods {bad}")
    if a.sweep_sizes is not None:
        st.sweep_sizes = tuple(int(s) for s in a.sweep_sizes.split(",") if s)
    if a.no_explore:
        st.explore = False
    if st.device.startswith("cuda") and a.workers is None:
        st.workers = 1
    if st.tune == "none" and st.hp_from and not Path(st.hp_from).is_file():
        ap.error(f"--hp-from {st.hp_from} does not exist")
    return st


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    st = parse_args(argv)
    if st.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here (use --device cpu for a dry run)")
    out_dir = Path(st.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _fetch.backbone_weights(st.cache)  # fetch once, before the workers start
    for t in set(st.tasks) | ({st.sweep_task} if st.sweep_sizes else set()):
        _fetch.LOADERS[t](st.cache)
    store = Store(out_dir / f"{st.stem}_cells")
    proto = Protocol(st, store)
    runner = Runner(st, store)

    def on_term(signum, frame):  # a scheduler's kill: stop, summarise what finished
        runner.stopped = True
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.time()
    _log(f"{st.mode} run: {len(store.mem)} cells already done in {store.folder}")
    runner.run(proto.searches())
    complete = not runner.stopped and not runner.expired()
    wall = time.time() - t0
    summary = summarise(proto, st, wall, complete)
    summary["cells_computed_this_run"] = runner.computed
    summary["abandoned_cells"] = runner.abandoned  # stopped by the time budget: their per-epoch progress
    summary["cells_total"] = len(store.mem)
    summary["cell_wall_s_total"] = float(sum(r["wall_s"] for r in store.mem.values()))
    from timm_modcl._io import atomic_write_json
    path = atomic_write_json(out_dir / f"{st.stem}.json", summary)
    _log(f"wrote {path} ({'complete' if complete else 'partial'}, {wall / 60:.1f} min)")
    try:
        import report
        report.write_all(summary, out_dir, st.stem)
    except Exception as e:  # the JSON is what matters; the report can be rebuilt with report.py
        _log(f"report failed: {type(e).__name__}: {e}")
        raise
    return summary


if __name__ == "__main__":
    main()
