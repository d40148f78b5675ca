"""Continual-learning accuracy benchmark, protocol v2: equal held-out tuning, 8 test seeds, accuracy vs bytes, and
the library's own training recipe.

    nice -n 10 python benchmarks/accuracy.py --workers 2          # the whole protocol (about 8 h on 2 CPU cores)
    python benchmarks/accuracy.py --plan                          # cells per stage and the estimated hours
    python benchmarks/accuracy.py --quick                         # every stage end to end, tiny (a few minutes)
    python benchmarks/accuracy.py --paper-scale --cache DIR --time-budget-s 270   # GPU: chosen settings, 224 px

Stages, run in this priority order so that a partial run is useful (a rerun skips saved cells; ``--time-budget-s``
stops cleanly and the summary marks what is missing):

1. **Tuning** (tuning-only seeds 100 and 101, validation splits of two tuning tasks, ``Settings.tune_tasks``:
   Animal-Shape and the RGB task, or digits while there is none). Every method gets the same search: a joint
   adapter-lr x head-lr grid of 3 x 3 half-decade steps around the method's customary adapter rate (``START_LR``)
   and one head-rate centre for everyone (``START_HEAD_LR``), extended by a line of 3 while the best point lacks a
   tried neighbour (at most ``MAX_EXTENSIONS`` = 2 per axis and side, the same for
   everyone; the cap is recorded when hit), then the method's 3 structural options (``baselines.STRUCTURE``; the
   first is the default structure the grid ran on) at the chosen rates. The criterion is the mean over tuning seeds
   and tuning tasks of validation accuracy. The linear probe (one rate) gets the same 9 settings on its one axis,
   extended one point at a time under the same cap. Each chosen setting records its grid position and whether it is
   interior (all four axis neighbours tried: a local maximum), flagged when not.
2. **Test**: the chosen settings once, on fresh seeds 0..7 x every task; seed-level results (mean over tasks per
   seed); paired differences vs modcl (default) with t intervals over seeds and Holm-adjusted p-values over the
   comparisons (Bonferroni-widened intervals too); the paired bootstrap over seeds and test images only as an extra.
3. **Accuracy vs bytes** (``baselines.BUDGETS``): each configuration at its method's chosen rates (not re-tuned) on
   ``Settings.bytes_tasks`` (the tuning tasks) x test seeds 0, 1, 2; a plot and a table of accuracy at matched
   bytes with t intervals.
4. **Library recipe** (what ``modcl train`` does: timm's training augmentation, 30 epochs, cosine) for modcl, LoRA,
   BN + head, linear probe and full fine-tuning on ``Settings.recipe_tasks`` (the tuning tasks) x seeds 0, 1, 2.
   Reduced, equal tuning rule:
   the adapter rate at the short protocol's chosen value and one half-decade step either side (3 settings, head rate
   at its chosen ratio to the adapter rate), extended one step past an edge optimum as in tuning, tuning seed 100,
   validation of the second tuning task. The linear probe
   caches its features, so its cells get no augmentation (recorded per cell as ``augment_applied``).
5. **Library defaults**: modcl at ``train_task``'s default rates and at the recipe stage's chosen rates, at the
   recipe, on every tuning seed x tuning task (validation only): the library's defaults change only when these
   tuning-only cells prefer the other setting (the summary's ``defaults``; the change itself is made by hand). When
   they prefer the defaults, those are tested once on the recipe stage's seeds and tasks. Beside it, outside the
   equal search, a diagnosis: modcl with its norm affine and head at BN + head's recipe rates, and BN + head itself,
   on the same tuning cells.

Every method trains with the same short recipe (Adam, batch 32, 5 epochs, cosine: the library's default schedule,
fixed for all, not chosen on anyone's validation) at 64 px on 500 training images per task.

What was cut to fit about 6 hours of a 2-core machine (2 workers, 1 torch thread each; ``--plan`` prints it):
tuning on 2 of the tasks and 2 tuning seeds (not all tasks); grids of 3 x 3 with at most 2 extensions per side;
sequential fine-tuning and LwF (forgetting references, not adapter methods) are tuned on one tuning seed and tested
on 3 seeds (0..2); the bytes curve on 2 tasks x 3 seeds at the chosen rates of each method (no per-budget rate
search); the recipe comparison on 2 tasks x 3 seeds with the 3-setting rule above (1 tuning seed, 1 task); no
data-size sweep (protocol v1 has one). It did not fit: the plan made before the run (from protocol v1's cell times)
said 6.0 h, the run needed about 8 h of the machine (more extensions than the one line per method the estimate
assumes, and slower cells). ``--plan`` now prices cells at the run's measured times (``_protocol.CELL_S``): expected
about 7 h, worst case (every search using all its extensions) about 12 h; a tighter budget is cut by
``--time-budget-s`` in priority order.

Cells are keyed by their spec, which holds the hash of the code that produces them (``baselines.py``,
``_fetch.py``, ``_cellrun.py``); each cell also records the timm_modcl source hash and the git commit. Cells live in
``<out-dir>/accuracy_v2_cells/`` (protocol v1's ``accuracy_cells/`` stays as it is).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fetch  # noqa: E402
import _protocol as P  # noqa: E402
import _stats  # noqa: E402
from _cellrun import Store, cell_key, run_cell, worker_init  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL_VERSION = 2
STEM = "accuracy_v2"
LADDER = P.LADDER
MAX_EXTENSIONS = 2
START_LR = {"linear_probe": 1e-2, "bn_head": 1e-2, "lora": 3e-3, "modcl_lora": 3e-3, "ia3": 1e-2,
            "piggyback": 3e-3, "full_finetune": 3e-4, "seq_finetune": 3e-4, "lwf": 3e-4, "modcl": 1e-2}
START_HEAD_LR = 1e-3
SEQUENTIAL = ("seq_finetune", "lwf")
ALL_METHODS = ("modcl", "lora", "modcl_lora", "ia3", "piggyback", "bn_head", "linear_probe", "full_finetune",
               "seq_finetune", "lwf")
RECIPE_METHODS = ("modcl", "lora", "bn_head", "linear_probe", "full_finetune")
LABELS = {
    "modcl": "modcl (default)",
    "linear_probe": "linear probe (head only)",
    "bn_head": "BN + head (per-task BN affine and statistics)",
    "lora": "PEFT LoRA",
    "modcl_lora": "timm_modcl per-task LoRA (depthwise included)",
    "ia3": "PEFT IA3",
    "piggyback": "Piggyback (binary masks)",
    "full_finetune": "full fine-tuning, one copy per task (upper bound)",
    "seq_finetune": "sequential fine-tuning (forgets)",
    "lwf": "LwF (forgets)",
}
#: modcl's per-layer resolution profiles (fallback structures / budgets while baselines.py has none).
PROFILES = {
    "dw_full": ((6, 6), {"*conv_dw": (1, 1)}),
    "dw_fine": ((4, 4), {"*conv_dw": (2, 2)}),
    "late_fine": ((8, 8), {"blocks.[56].*": (3, 3)}),
    "coarse": ((8, 8), {}),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _default_tune_tasks() -> Tuple[str, ...]:
    """Two tuning tasks: Animal-Shape and the natural-image RGB task when ``_fetch`` has one (else digits)."""
    extra = [t for t in _fetch.TASK_ORDER if t not in ("fashion_mnist", "animal_shape", "mnist5k", "digits")]
    return ("animal_shape", extra[0] if extra else "digits")


@dataclass
class Settings:
    size: int = 64
    epochs: int = 5
    batch_size: int = 32
    sched: str = "cosine"
    train_n: Optional[int] = 500
    val_n: int = _fetch.VAL_N
    limit: Optional[int] = None
    tasks: Tuple[str, ...] = tuple(_fetch.TASK_ORDER)
    tune_tasks: Tuple[str, ...] = field(default_factory=_default_tune_tasks)
    tune_seeds: Tuple[int, ...] = (100, 101)
    test_seeds: Tuple[int, ...] = tuple(range(8))
    seq_tune_seeds: Tuple[int, ...] = (100,)
    seq_test_seeds: Tuple[int, ...] = (0, 1, 2)
    methods: Tuple[str, ...] = ALL_METHODS
    grid_width: int = 3
    max_extensions: int = MAX_EXTENSIONS
    bytes_tasks: Tuple[str, ...] = field(default_factory=_default_tune_tasks)
    bytes_seeds: Tuple[int, ...] = (0, 1, 2)
    recipe_methods: Tuple[str, ...] = RECIPE_METHODS
    recipe_tasks: Tuple[str, ...] = field(default_factory=_default_tune_tasks)
    recipe_seeds: Tuple[int, ...] = (0, 1, 2)
    recipe_tune_seeds: Tuple[int, ...] = (100,)
    recipe_tune_tasks: Tuple[str, ...] = field(default_factory=lambda: _default_tune_tasks()[1:])
    recipe_epochs: int = 30
    stages: Tuple[str, ...] = ("tune", "test", "bytes", "recipe", "defaults")
    device: str = "cpu"
    amp: bool = False
    workers: int = 2
    threads: int = 1
    loader_workers: int = 0
    cache: Optional[str] = None
    out_dir: str = str(RESULTS)
    stem: str = STEM
    time_budget_s: Optional[float] = None
    bootstrap: int = 1000
    hp_from: Optional[str] = None                    # paper scale: chosen settings from this accuracy_v2.json
    mode: str = "full"

    def data(self) -> Dict[str, Any]:
        return {"size": self.size, "val_n": self.val_n, "limit": self.limit, "device": self.device.split(":")[0],
                "amp": self.amp}

    def methods_present(self) -> Tuple[str, ...]:
        """``methods`` that ``baselines`` implements (modcl_lora arrives with the baselines branch)."""
        import baselines as B
        return tuple(m for m in self.methods if m in B.METHODS)


# ---------------------------------------------------------------------------------------------------- structure
def _deep_merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _profile_hp(name: str) -> Dict[str, Any]:
    res, layers = PROFILES[name]
    from timm_modcl.config import DEFAULT_CONFIG
    cfg = dict(DEFAULT_CONFIG.to_dict(), resolution=list(res),
               layer_resolution=[[k, list(v)] for k, v in layers.items()])
    return {"config": cfg}


def structure_options(method: str) -> Tuple[List[Dict[str, Any]], str]:
    """The method's structural options (hp dicts merged into its base hp; the first is the default) and where they
    come from: ``baselines.STRUCTURE`` or this module's fallback (modcl: default / no BN affine / late_fine profile;
    other methods: only their default, until baselines.py defines STRUCTURE)."""
    import baselines as B
    table = getattr(B, "STRUCTURE", None)
    if table and method in table:
        return [dict(o) for o in table[method]], "baselines.STRUCTURE"
    if method == "modcl":
        return [{}, {"config": {"bn_affine": False}}, _profile_hp("late_fine")], "fallback"
    return [{}], "fallback"


def budgets() -> Tuple[List[Tuple[str, str, Dict[str, Any]]], str]:
    """(label, method, hp) of the accuracy-vs-bytes curve: ``baselines.BUDGETS`` or a fallback. Each hp updates the
    method's :func:`base_hp` key by key (so a modcl ``config`` there is the whole config, not a patch)."""
    import baselines as B
    got = getattr(B, "BUDGETS", None)
    if got:
        return [(str(a), str(m), dict(h)) for a, m, h in got], "baselines.BUDGETS"
    out: List[Tuple[str, str, Dict[str, Any]]] = [("modcl default", "modcl", {})]
    out += [(f"modcl {n}", "modcl", _profile_hp(n)) for n in PROFILES]
    out += [(f"LoRA r{r}", "lora", {"rank": r}) for r in (1, 2, 4, 8)]
    out += [("IA3", "ia3", {}), ("BN + head", "bn_head", {}), ("Piggyback", "piggyback", {})]
    return out, "fallback"


_MODULATORS: Dict[str, int] = {}


def _modulators(hp: Dict[str, Any]) -> int:
    """Modulator values of a modcl config on MobileNetV2."""
    key = json.dumps(hp, sort_keys=True)
    if key not in _MODULATORS:
        import timm
        import timm_modcl  # noqa: F401  (registers the models)
        from timm_modcl.config import TaskConfig
        cfg = TaskConfig.from_dict(hp["config"])
        model = timm.create_model("modcl_mobilenetv2_100")
        shapes = model.modulator_shapes(cfg.resolution, dict(cfg.layer_resolution)) if cfg.resolution else {}
        _MODULATORS[key] = int(sum(math.prod(s) for s in shapes.values()))
    return _MODULATORS[key]


def base_hp(method: str) -> Dict[str, Any]:
    """The method's default options: modcl the library's DEFAULT_CONFIG; LoRA (both) the smallest rank with at
    least as many values as that config's modulators; the others none."""
    from timm_modcl.config import DEFAULT_CONFIG
    mod = {"config": DEFAULT_CONFIG.to_dict()}
    if method == "modcl":
        return mod
    if method in ("lora", "modcl_lora"):
        import baselines as B
        return {"rank": B.lora_rank_for_budget(B.plain_backbone(None), _modulators(mod))}
    return {}
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
        self.provenance = (P.package_hash(), P.git_commit())

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
            pool = cf.ProcessPoolExecutor(st.workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                                          initargs=(st.threads, st.cache))
        else:
            worker_init(st.threads, st.cache)
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
        record["package_hash"], record["git_commit"] = self.provenance
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


# ---------------------------------------------------------------------------------------------------- specs
def make_spec(st: Settings, method: str, hp: Dict[str, Any], recipe: Dict[str, Any], tasks: Sequence[str],
              seed: int, evaluate: Sequence[str], prio: int, stage: str) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "code": P.bench_code_hash(), "kind": "sequence" if method in SEQUENTIAL else "task",
            "method": method, "hp": hp, "recipe": recipe, "tasks": list(tasks), "train_n": st.train_n,
            "seed": int(seed), "evaluate": list(evaluate), "data": st.data(), "_prio": prio, "_stage": stage}


def specs_for(st: Settings, method, hp, recipe, tasks, seed, evaluate, prio, stage) -> List[Dict[str, Any]]:
    """One cell per task (forgetting-free methods) or one per sequence (sequential fine-tuning, LwF)."""
    if method in SEQUENTIAL:
        return [make_spec(st, method, hp, recipe, tasks, seed, evaluate, prio, stage)]
    return [make_spec(st, method, hp, recipe, [t], seed, evaluate, prio, stage) for t in tasks]


def _const(value):
    """A generator that yields nothing to run and returns ``value``."""
    return value
    yield  # pragma: no cover


class Protocol:
    """The stages of protocol v2 as searches (generators of cell batches) for :class:`Runner`."""

    def __init__(self, st: Settings, store: Store) -> None:
        self.st = st
        self.store = store
        self.chosen: Dict[str, Dict[str, Any]] = {}
        self.tuning: Dict[str, Dict[str, Any]] = {}
        self.test_specs: Dict[str, List[Dict[str, Any]]] = {}
        self.bytes_specs: Dict[str, Dict[str, Any]] = {}
        self.recipe_out: Dict[str, Dict[str, Any]] = {}
        self.defaults_out: Dict[str, Any] = {}
        self.preset: Dict[str, Dict[str, Any]] = {}
        if st.hp_from:
            data = json.loads(Path(st.hp_from).read_text())
            self.preset = {m: v["chosen"] for m, v in data.get("methods", {}).items() if v.get("chosen")}

    def recipe(self, lr: float, head_lr: float, epochs: Optional[int] = None, augment: bool = False) -> Dict[str, Any]:
        r = {"epochs": epochs or self.st.epochs, "batch_size": self.st.batch_size, "lr": _r(lr),
             "head_lr": _r(head_lr), "sched": self.st.sched, "warmup_epochs": 0}
        if augment:
            r["augment"] = "timm"
        return r

    def score(self, specs: List[Dict[str, Any]]) -> Tuple[float, Dict[str, float]]:
        """Mean validation accuracy over the specs' seeds and tasks, and the per seed/task values."""
        vals: Dict[str, float] = {}
        for s in specs:
            res = self.store.get(cell_key(s))["result"]
            accs = res["val_acc"] if s["kind"] == "sequence" else [res["val_acc"]]
            for t, a in zip(s["tasks"], accs):
                vals[f"s{s['seed']}/{t}"] = float(a)
        return float(np.mean(list(vals.values()))), vals

    def evaluate(self, method, hp, lr, head_lr, tasks, seeds, prio, label, table, epochs=None, augment=False):
        """Generator: mean validation accuracy of one setting over tuning seeds and tasks (a row of ``table``)."""
        specs = []
        for seed in seeds:
            specs += specs_for(self.st, method, hp, self.recipe(lr, head_lr, epochs, augment), tasks, seed, ["val"],
                               prio, "tune")
        yield specs
        mean, per = self.score(specs)
        row = {"stage": label, "lr": _r(lr), "head_lr": _r(head_lr), "hp": hp, "val_mean": mean, "val": per}
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

    # -- stage 1: tuning
    def tune(self, method: str):
        st, table = self.st, []
        if st.hp_from:  # no search: the settings chosen by a finished protocol run
            if method not in self.preset:
                _log(f"{method}: no chosen setting in {st.hp_from}; skipped")
                return
            pre = self.preset[method]
            self.chosen[method] = dict(pre, point=pre.get("grid_point"))
            self.tuning[method] = {"validation": [], "preset": st.hp_from, "settings_tried": 0,
                                   "structure_source": st.hp_from, "tuning_seeds": [], "tuning_tasks": [],
                                   "axes": [], "structure_options": [pre.get("structure_option", {})],
                                   "grid": {"grid_size": pre.get("grid_size", []), "extensions": {},
                                            "cap_hit": False, "position": pre.get("grid_position", []),
                                            "best": pre.get("grid_point", [])}}
            if "test" in st.stages:
                yield from self.test(method)
            return
        two = method != "linear_probe"
        seeds = st.seq_tune_seeds if method in SEQUENTIAL else st.tune_seeds
        options, source = structure_options(method)
        hp0 = _deep_merge(base_hp(method), options[0])
        centre = (P.nearest_index(START_LR[method]), P.nearest_index(START_HEAD_LR)) if two else \
            (P.nearest_index(START_LR[method]),)
        g = P.GridSearch(centre, st.grid_width, st.max_extensions)
        rows: Dict[Tuple[int, ...], Dict[str, Any]] = {}

        def rates(p):
            return (LADDER[p[0]], LADDER[p[1]]) if two else (LADDER[p[0]], LADDER[p[0]])

        while True:
            pts = g.next_points()
            if not pts:
                break
            got = yield from self.parallel([self.evaluate(method, hp0, *rates(p), st.tune_tasks, seeds, 0,
                                                          f"grid {list(p)}", table) for p in pts])
            for p, r in zip(pts, got):
                r["point"] = list(p)
                rows[p] = r
            g.add({p: r["val_mean"] for p, r in zip(pts, got)})
        grid = g.result()
        best = rows[tuple(grid["best"])]
        srows = yield from self.parallel([self.evaluate(method, _deep_merge(base_hp(method), o), best["lr"],
                                                        best["head_lr"], st.tune_tasks, seeds, 0,
                                                        f"structure {i}", table)
                                          for i, o in enumerate(options) if i > 0])
        cands = [dict(best, structure=0)] + [dict(r, structure=i + 1) for i, r in enumerate(srows)]
        chosen = max(cands, key=lambda r: (r["val_mean"], -r["structure"]))
        chosen = dict(chosen, grid=grid, interior=grid["interior"], flag=None if grid["interior"] else
                      "; ".join(grid["edge"]), structure_option=options[chosen["structure"]])
        self.chosen[method] = chosen
        self.tuning[method] = {"validation": table, "grid": grid, "structure_options": options,
                               "structure_source": source, "settings_tried": len(table),
                               "tuning_seeds": list(seeds), "tuning_tasks": list(st.tune_tasks),
                               "axes": ["adapter lr", "head lr"] if two else ["lr"]}
        _log(f"{method}: chosen lr={chosen['lr']:g} head_lr={chosen['head_lr']:g} structure {chosen['structure']} "
             f"val={chosen['val_mean']:.4f} interior={grid['interior']}")
        if "test" in st.stages:
            yield from self.test(method)

    # -- stage 2: test
    def test(self, method: str):
        st, row = self.st, self.chosen[method]
        seeds = st.seq_test_seeds if method in SEQUENTIAL else st.test_seeds
        specs = []
        for seed in seeds:
            specs += specs_for(st, method, row["hp"], self.recipe(row["lr"], row["head_lr"]), st.tasks, seed,
                               ["val", "test"], 1, "test")
        self.test_specs[method] = specs
        yield specs

    # -- stage 3: bytes
    def bytes_curve(self):
        st = self.st
        configs, source = budgets()
        self.bytes_source = source
        gens = []
        for label, method, hp in configs:
            if method not in st.methods_present():
                self.bytes_specs[label] = {"method": method, "missing": f"method {method} not available"}
                continue
            while method not in self.chosen:
                yield WAIT
            row = self.chosen[method]
            full = dict(base_hp(method), **hp)  # a budget's hp replaces whole keys (a complete modcl config)
            specs = []
            for seed in st.bytes_seeds:
                specs += specs_for(st, method, full, self.recipe(row["lr"], row["head_lr"]), st.bytes_tasks, seed,
                                   ["val", "test"], 2, "bytes")
            self.bytes_specs[label] = {"method": method, "hp": full, "lr": row["lr"], "head_lr": row["head_lr"],
                                       "specs": specs}
            gens.append(_yield_once(specs))
        yield from self.parallel(gens)

    # -- stage 4: library recipe
    def recipe_stage(self, method: str):
        st, table = self.st, []
        while method not in self.chosen:
            yield WAIT
        row = self.chosen[method]
        i = P.nearest_index(row["lr"])
        ratio = row["head_lr"] / row["lr"]

        def run(js):
            return self.parallel([self.evaluate(method, row["hp"], LADDER[j], LADDER[j] * ratio,
                                                st.recipe_tune_tasks, st.recipe_tune_seeds, 3, f"recipe lr {j}",
                                                table, epochs=st.recipe_epochs, augment=True) for j in js])

        idx = [j for j in (i - 1, i, i + 1) if 0 <= j < len(LADDER)]
        rows = yield from run(idx)
        ext = {-1: 0, 1: 0}
        while True:  # the tuning stage's rule: extend one step past an edge optimum, at most max_extensions a side
            k = max(range(len(rows)), key=lambda n: (rows[n]["val_mean"], -abs(idx[n] - i)))
            side = -1 if idx[k] == min(idx) else 1 if idx[k] == max(idx) else 0
            nxt = idx[k] + side
            if side == 0 or ext[side] >= st.max_extensions or not 0 <= nxt < len(LADDER):
                break
            ext[side] += 1
            new = yield from run([nxt])
            idx, rows = idx + [nxt], rows + new
        order = sorted(range(len(idx)), key=lambda n: idx[n])
        idx, rows = [idx[n] for n in order], [rows[n] for n in order]
        k = max(range(len(rows)), key=lambda n: (rows[n]["val_mean"], -abs(idx[n] - i)))
        best = dict(rows[k], interior=0 < k < len(rows) - 1, position=k, settings_tried=len(rows),
                    extensions={"down": ext[-1], "up": ext[1]})
        specs = []
        for seed in st.recipe_seeds:
            specs += specs_for(st, method, row["hp"], self.recipe(best["lr"], best["head_lr"], st.recipe_epochs,
                                                                  True), st.recipe_tasks, seed, ["val", "test"], 4,
                               "recipe")
        self.recipe_out[method] = {"chosen": best, "validation": table, "specs": specs}
        yield specs

    def searches(self) -> Dict[str, Generator]:
        st = self.st
        out: Dict[str, Generator] = {}
        methods = st.methods_present()
        if "tune" in st.stages or "test" in st.stages:  # test cells follow each method's tuning (or preset)
            for m in methods:
                out[f"tune {m}"] = self.tune(m)
        if "bytes" in st.stages:
            out["bytes"] = self.bytes_curve()
        if "recipe" in st.stages:
            for m in st.recipe_methods:
                if m in methods:
                    out[f"recipe {m}"] = self.recipe_stage(m)
        if "defaults" in st.stages and "recipe" in st.stages and "modcl" in methods and "modcl" in st.recipe_methods:
            out["defaults"] = self.defaults_check()
        return out

    # -- stage 5: the library's default rates against the recipe stage's choice
    def defaults_check(self):
        """modcl at ``train_task``'s default rates and at the recipe stage's chosen rates, at the recipe, on every
        tuning seed x tuning task (validation only). The library's defaults change only when these tuning-only cells
        prefer the other setting; the summary records the paired differences, the decision is made by hand."""
        st, table = self.st, []
        while "modcl" not in self.recipe_out:
            yield WAIT
        lib, chosen = library_defaults(), self.recipe_out["modcl"]["chosen"]
        settings = {"library default": (lib["lr"], lib["head_lr"]), "recipe choice": (chosen["lr"], chosen["head_lr"])}
        runs = {name: ("modcl", self.chosen["modcl"]["hp"], lr, head_lr) for name, (lr, head_lr) in settings.items()}
        diagnosis = []
        if "bn_head" in st.recipe_methods and "bn_head" in st.methods_present():
            # modcl only, outside the equal search: is its gap to BN + head at the recipe the rates of the parts the
            # two share (norm affine, head) or the modulators? modcl's modulators at its recipe rate, its norm affine
            # and head at BN + head's recipe rates; and BN + head itself on the same tuning cells.
            while "bn_head" not in self.recipe_out:
                yield WAIT
            bn = self.recipe_out["bn_head"]["chosen"]
            runs["modcl, norm affine and head at BN + head's rates"] = (
                "modcl", dict(self.chosen["modcl"]["hp"], norm_lr_mult=_r(bn["lr"] / chosen["lr"])), chosen["lr"],
                bn["head_lr"])
            runs["BN + head"] = ("bn_head", self.chosen["bn_head"]["hp"], bn["lr"], bn["head_lr"])
            diagnosis = list(runs)[2:]
        rows = yield from self.parallel([
            self.evaluate(method, hp, lr, head_lr, st.tune_tasks, st.tune_seeds, 4, f"defaults: {name}", table,
                          epochs=st.recipe_epochs, augment=True)
            for name, (method, hp, lr, head_lr) in runs.items()])
        for row, (method, _, _, _) in zip(rows, runs.values()):
            row["method"] = method
        self.defaults_out = {"library": lib, "settings": dict(zip(runs, rows)), "diagnosis": diagnosis}
        if rows[0]["val_mean"] > rows[1]["val_mean"]:
            # the tuning-only cells prefer the library's defaults to the recipe stage's choice: test them once on
            # the recipe stage's seeds and tasks, beside that stage's methods
            lr, head_lr = settings["library default"]
            specs = []
            for seed in st.recipe_seeds:
                specs += specs_for(st, "modcl", self.chosen["modcl"]["hp"],
                                   self.recipe(lr, head_lr, st.recipe_epochs, True), st.recipe_tasks, seed,
                                   ["val", "test"], 4, "defaults")
            self.defaults_out["test_specs"] = specs
            yield specs


def busy_wall_s(cells) -> Optional[float]:
    """Wall time during which at least one cell ran: the union of the cells' ``[finished - wall_s, finished]``
    intervals (None when a cell lacks its finishing time)."""
    spans = []
    for c in cells:
        try:
            end = datetime.datetime.fromisoformat(str(c["finished"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            return None
        spans.append((end - float(c["wall_s"]), end))
    total, cur = 0.0, None
    for a, b in sorted(spans):
        if cur is not None and a <= cur[1]:
            cur[1] = max(cur[1], b)
            continue
        if cur is not None:
            total += cur[1] - cur[0]
        cur = [a, b]
    return total + (cur[1] - cur[0] if cur else 0.0)


def library_defaults() -> Dict[str, Any]:
    """``timm_modcl.train_task``'s default training settings (read from its signature)."""
    import inspect
    from timm_modcl import train_task
    ps = inspect.signature(train_task).parameters
    return {k: ps[k].default for k in ("lr", "head_lr", "epochs", "batch_size", "sched", "weight_decay")}


def _yield_once(specs):
    yield specs
    return specs
# ---------------------------------------------------------------------------------------------------- plan
def plan(st: Settings, methods: Optional[Sequence[str]] = None,
         budget_configs: Optional[Sequence[Tuple[str, str, Dict[str, Any]]]] = None,
         n_structures: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Cells per stage and estimated hours (``_protocol.cell_seconds``, from protocol v2's measured cell times).

    Expected tuning: the initial grid, one extension line and the structural options; the worst case uses every
    extension. Bytes configurations with an empty hp are the method's default structure, whose cells on the bytes
    tasks and seeds are test cells already (same key) when the default structure is chosen: they are not counted.
    """
    if methods is None:
        methods = [m for m in st.methods if m in _known_methods()]
    if budget_configs is None:
        budget_configs = budgets()[0]
    n_budgets = sum(1 for _, m, hp in budget_configs if hp and m in methods)
    scale = (st.size / 64.0) ** 2 * ((st.train_n or 500) / 500.0)
    stages: Dict[str, Dict[str, float]] = {k: {"cells": 0, "seconds": 0.0, "worst_seconds": 0.0}
                                           for k in ("tune", "test", "bytes", "recipe", "defaults")}
    per_method: Dict[str, Dict[str, float]] = {}

    def add(stage, method, cells, task_cells, test, epochs=None, augment=False, worst=None):
        sec = task_cells * P.cell_seconds(method, test, epochs or st.epochs, augment) * scale
        stages[stage]["cells"] += cells
        stages[stage]["seconds"] += sec
        stages[stage]["worst_seconds"] += sec if worst is None else worst * sec
        per_method.setdefault(method, {}).setdefault(stage, 0.0)
        per_method[method][stage] += sec

    for m in methods:
        two = m != "linear_probe"
        n_struct = (n_structures or {}).get(m, 3)
        grid = st.grid_width ** 2
        ext = st.grid_width if two else 1
        settings = grid + ext + (n_struct - 1)
        worst_settings = grid + ext * 2 * len(("a", "b") if two else ("a",)) * st.max_extensions + (n_struct - 1)
        seeds = st.seq_tune_seeds if m in SEQUENTIAL else st.tune_seeds
        seq = m in SEQUENTIAL
        cells = settings * len(seeds) * (1 if seq else len(st.tune_tasks))
        add("tune", m, cells, settings * len(seeds) * len(st.tune_tasks), False, worst=worst_settings / settings)
        tseeds = st.seq_test_seeds if seq else st.test_seeds
        add("test", m, len(tseeds) * (1 if seq else len(st.tasks)), len(tseeds) * len(st.tasks), True)
    per_config = len(st.bytes_seeds) * len(st.bytes_tasks)
    stages["bytes"]["cells"] = n_budgets * per_config
    stages["bytes"]["seconds"] = stages["bytes"]["worst_seconds"] = sum(
        per_config * P.cell_seconds(m, True) * scale for _, m, hp in budget_configs if hp and m in methods)
    for m in st.recipe_methods:
        if m not in methods:
            continue
        aug = m != "linear_probe"
        n_tune = 3 * len(st.recipe_tune_seeds) * len(st.recipe_tune_tasks)
        n_test = len(st.recipe_seeds) * len(st.recipe_tasks)
        add("recipe", m, n_tune, n_tune, False, st.recipe_epochs, aug)
        add("recipe", m, n_test, n_test, True, st.recipe_epochs, aug)
    if "modcl" in methods and "modcl" in st.recipe_methods:
        n = len(st.tune_seeds) * len(st.tune_tasks)
        add("defaults", "modcl", 3 * n, 3 * n, False, st.recipe_epochs, True)  # default, choice, diagnosis
        n_test = len(st.recipe_seeds) * len(st.recipe_tasks)  # the test of the defaults, when they are preferred
        add("defaults", "modcl", n_test, n_test, True, st.recipe_epochs, True)
        if "bn_head" in methods and "bn_head" in st.recipe_methods:
            add("defaults", "bn_head", n, n, False, st.recipe_epochs, True)
    total = sum(s["seconds"] for s in stages.values())
    worst = sum(s["worst_seconds"] for s in stages.values())
    w = max(1, st.workers)
    return {"stages": stages, "per_method_seconds": per_method, "cell_seconds": total, "workers": w,
            "hours": total / w / 3600, "worst_case_hours": worst / w / 3600,
            "basis": "protocol v2's measured cell wall times, 64 px, 500 images, 1 thread a worker (_protocol.CELL_S)"}


def _known_methods() -> Tuple[str, ...]:
    try:
        import baselines as B
        return tuple(B.METHODS) + (("modcl_lora",) if "modcl_lora" not in B.METHODS else ())
    except Exception:  # pragma: no cover - plan without torch
        return ALL_METHODS


def print_plan(pl: Dict[str, Any]) -> None:
    print(f"protocol v{PROTOCOL_VERSION} plan ({pl['basis']}; {pl['workers']} workers)")
    for name, s in pl["stages"].items():
        print(f"  {name:8s} {int(s['cells']):5d} cells  {s['seconds'] / 3600:6.2f} cell-h"
              f"  (worst case {s['worst_seconds'] / 3600:.2f})")
    print(f"  estimated wall: {pl['hours']:.2f} h (every search extended at most once per method); "
          f"worst case {pl['worst_case_hours']:.2f} h")


CUTS = [
    "tuning on 2 of the tasks (Settings.tune_tasks) and 2 tuning seeds (100, 101)",
    "rate grids of 3 x 3 half-decade steps, at most 2 extensions per axis and side",
    "sequential fine-tuning and LwF: tuned on 1 tuning seed, tested on 3 seeds (0..2)",
    "accuracy vs bytes: 2 tasks x 3 seeds, each configuration at its method's chosen rates (no per-budget search)",
    "library recipe: 5 methods, 2 tasks x 3 seeds; tuning = 3 adapter rates around the short protocol's choice on "
    "1 tuning seed and 1 task (Settings.recipe_tune_tasks)",
    "no data-size sweep (protocol v1 has one)",
]


# ---------------------------------------------------------------------------------------------------- summary
def _cells(store: Store, specs: List[Dict[str, Any]]):
    return [(s, store.get(cell_key(s)) if cell_key(s) in store else None) for s in specs]


def _per_seed(store: Store, specs: List[Dict[str, Any]], tasks: Sequence[str]):
    """seed -> task -> test accuracy (and val), counts per task, correctness bits, missing cell keys."""
    test: Dict[int, Dict[str, float]] = {}
    val: Dict[int, Dict[str, float]] = {}
    counts: Dict[str, Dict[str, Any]] = {}
    correct: Dict[int, Dict[str, np.ndarray]] = {}
    missing, walls, forgetting = [], [], {}
    import baselines as B
    for spec, cell in _cells(store, specs):
        if cell is None:
            missing.append(cell_key(spec))
            continue
        res, seed = cell["result"], spec["seed"]
        walls.append(cell["wall_s"])
        if spec["kind"] == "sequence":
            for j, t in enumerate(spec["tasks"]):
                test.setdefault(seed, {})[t] = res["test_acc"][j]
                val.setdefault(seed, {})[t] = res["val_acc"][j]
                correct.setdefault(seed, {})[t] = B.unpack_bits(res["test_correct"][j], res["test_n"][j])
                counts.setdefault(t, res["counts"][j])
            R = res["test_matrix"]
            T = len(R)
            forgetting[seed] = float(np.mean([max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j]
                                              for j in range(T - 1)])) if T > 1 else 0.0
        else:
            t = spec["tasks"][0]
            test.setdefault(seed, {})[t] = res["test_acc"]
            val.setdefault(seed, {})[t] = res["val_acc"]
            correct.setdefault(seed, {})[t] = B.unpack_bits(res["test_correct"], res["test_n"])
            counts.setdefault(t, res["counts"])
    complete = sorted(s for s in test if all(t in test[s] for t in tasks))
    seed_mean = {s: float(np.mean([test[s][t] for t in tasks])) for s in complete}
    return {"test": test, "val": val, "counts": counts, "correct": correct, "missing": missing,
            "complete_seeds": complete, "seed_mean": seed_mean, "wall_s": float(sum(walls)),
            "forgetting": forgetting}


def _mask_agreement(store: Store, specs: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Piggyback's masks across test seeds, per task, from each cell's fixed sample of mask entries: the fraction of
    entries flipped to 0, and for every pair of seeds the Jaccard overlap of their flipped entries beside the overlap
    two independent masks with those flip rates would have by chance (``p q / (p + q - p q)``)."""
    import baselines as B
    masks: Dict[str, Dict[int, np.ndarray]] = {}
    for spec, cell in _cells(store, specs):
        c = (cell or {}).get("result", {}).get("counts", {})
        if c.get("mask_sample") is None or spec["kind"] == "sequence":
            continue
        masks.setdefault(spec["tasks"][0], {})[spec["seed"]] = ~B.unpack_bits(c["mask_sample"], int(c["mask_sample_n"]))
    if not masks:
        return None
    out: Dict[str, Any] = {"sample_entries": int(next(iter(next(iter(masks.values())).values())).size), "tasks": {}}
    for task, by_seed in sorted(masks.items()):
        seeds = sorted(by_seed)
        rate = {s: float(by_seed[s].mean()) for s in seeds}
        flipped = [rate[s] for s in seeds]
        pairs, chance = [], []
        for i, a in enumerate(seeds):
            for b in seeds[i + 1:]:
                x, y = by_seed[a], by_seed[b]
                union = int((x | y).sum())
                pairs.append(float((x & y).sum() / union) if union else None)
                p_, q_ = rate[a], rate[b]
                chance.append(p_ * q_ / (p_ + q_ - p_ * q_) if p_ + q_ > 0 else None)
        known = [(j, c) for j, c in zip(pairs, chance) if j is not None and c is not None]
        out["tasks"][task] = {"seeds": seeds, "flipped_fraction": flipped,
                              "jaccard_mean": float(np.mean([j for j, _ in known])) if known else None,
                              "jaccard_chance_mean": float(np.mean([c for _, c in known])) if known else None,
                              "pairs": len(pairs)}
    return out


def _bytes_of(counts: Dict[str, Dict[str, Any]]) -> Optional[float]:
    vals = [c["bytes"] for c in counts.values() if "bytes" in c]
    return float(np.mean(vals)) if vals else None


def _mean_ci(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sd and the t interval of the mean over seeds."""
    out: Dict[str, Any] = dict(_stats.mean_sd(values)) if len(values) else {"n": 0}
    if len(values) >= 2:
        out["ci"] = _stats.paired_t(values)["ci"]
    return out


def _compare_all(ps: Dict[str, Dict[str, Any]], ref: str, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Seed-level paired comparisons ``name - ref`` with Holm over the comparisons made."""
    made = {n: ps[n] for n in names if n != ref and n in ps and ps[n]["complete_seeds"]}
    if ref not in ps or not ps[ref]["complete_seeds"]:
        return {}
    out = {}
    for n, d in made.items():
        if len(set(d["seed_mean"]) & set(ps[ref]["seed_mean"])) >= 2:
            out[n] = _stats.compare_seeds(d["seed_mean"], ps[ref]["seed_mean"], comparisons=len(made))
    ph = _stats.holm({n: c["p"] for n, c in out.items() if c.get("p") is not None})
    for n, c in out.items():
        c.update(ph.get(n, {}))
        lo, hi = c["ci"]
        c["verdict"] = ("baseline better" if lo > 0 else "modcl better" if hi < 0 else None) if c.get("reject") \
            else None
    return out


def summarise(p: Protocol, st: Settings, wall_s: float, complete: bool) -> Dict[str, Any]:
    """The whole protocol as one JSON-able dict (accuracy_v2.json); partial runs mark what is missing."""
    import timm
    import torch
    store = p.store
    methods = st.methods_present()
    out: Dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION, "complete": complete, "mode": st.mode,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(st).items()
                     if k not in ("cache", "out_dir")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "timm": timm.__version__, "device": _device_name(st.device), "workers": st.workers,
                    "torch_threads_per_worker": st.threads},
        "wall_s": wall_s, "cuts": CUTS, "plan": plan(st, methods),
        "code": {"bench_code_hash": P.bench_code_hash(), "package_hash": P.package_hash(),
                 "git_commit": P.git_commit()},
        "methods": {}, "missing": {},
    }
    prov: Dict[str, int] = {}
    for r in store.mem.values():
        k = f"code {r['spec'].get('code')} / package {r.get('package_hash')} / commit {r.get('git_commit')}"
        prov[k] = prov.get(k, 0) + 1
    out["code"]["cells_by_hash"] = prov
    ps: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        e: Dict[str, Any] = {"label": LABELS.get(m, m)}
        tun = p.tuning.get(m)
        if tun is None:
            e["status"] = "not tuned yet"
            out["missing"][m] = "tuning incomplete"
            out["methods"][m] = e
            continue
        ch = p.chosen[m]
        walls = [store.get(cell_key(s))["wall_s"] for s in _tuning_specs(p, m) if cell_key(s) in store]
        e["budget"] = {k: tun[k] for k in ("settings_tried", "structure_source", "tuning_seeds", "tuning_tasks",
                                           "axes")}
        e["budget"].update(grid_size=tun["grid"]["grid_size"], extensions=tun["grid"]["extensions"],
                           cap_hit=tun["grid"]["cap_hit"], structure_options=len(tun["structure_options"]),
                           tuning_cell_s=float(sum(walls)))
        e["chosen"] = {"lr": ch["lr"], "head_lr": ch["head_lr"], "hp": ch["hp"], "structure": ch["structure"],
                       "structure_option": ch["structure_option"], "val_mean": ch["val_mean"],
                       "grid_point": ch.get("point", tun["grid"]["best"]), "grid_position": tun["grid"]["position"],
                       "grid_size": tun["grid"]["grid_size"], "interior": ch["interior"], "flag": ch["flag"]}
        e["validation"] = tun["validation"]
        specs = p.test_specs.get(m, [])
        d = _per_seed(store, specs, st.tasks)
        ps[m] = d
        if d["missing"] or not specs:
            out["missing"][m] = f"{len(d['missing'])} test cells missing" if specs else "test not started"
        e["per_seed_test"] = {str(s): d["test"][s] for s in sorted(d["test"])}
        e["per_seed_mean"] = {str(s): v for s, v in d["seed_mean"].items()}
        e["complete_seeds"] = d["complete_seeds"]
        e["bytes_per_task"] = _bytes_of(d["counts"])
        e["counts_per_task"] = d["counts"]
        if d["seed_mean"]:
            e["test_avg"] = _mean_ci(list(d["seed_mean"].values()))
            e["test_per_task"] = {t: _stats.mean_sd([d["test"][s][t] for s in d["complete_seeds"]])
                                  for t in st.tasks}
        if d["forgetting"]:
            e["forgetting"] = _stats.mean_sd(list(d["forgetting"].values()))
        if m == "piggyback":
            e["mask_agreement"] = _mask_agreement(store, specs)
        e["test_cell_s"] = d["wall_s"]
        out["methods"][m] = e
    comps = _compare_all(ps, "modcl", [m for m in methods if m not in SEQUENTIAL])
    for n, c in comps.items():
        out["methods"][n]["diff_vs_modcl"] = c
        if st.bootstrap and n in ps and "modcl" in ps:
            seeds = sorted(set(ps[n]["seed_mean"]) & set(ps["modcl"]["seed_mean"]))
            a = {s: [ps[n]["correct"][s][t] for t in st.tasks] for s in seeds}
            b = {s: [ps["modcl"]["correct"][s][t] for t in st.tasks] for s in seeds}
            out["methods"][n]["bootstrap_vs_modcl"] = _stats.paired_bootstrap(a, b, replicates=st.bootstrap)
    out["comparisons"] = {"reference": "modcl", "correction": "Holm over the comparisons listed",
                          "count": len(comps), "interval": "t over seeds (seed-level means over tasks), 95 %; "
                          "ci_bonferroni: simultaneous over the comparisons"}
    out["bytes"] = _bytes_summary(p, st)
    out["recipe"] = _recipe_summary(p, st)
    out["defaults"] = _defaults_summary(p, st)
    out["target"] = _target(out)
    return out


def _tuning_specs(p: Protocol, m: str) -> List[Dict[str, Any]]:
    st, out = p.st, []
    seeds = st.seq_tune_seeds if m in SEQUENTIAL else st.tune_seeds
    for row in p.tuning.get(m, {}).get("validation", []):
        for seed in seeds:
            out += specs_for(st, m, row["hp"], p.recipe(row["lr"], row["head_lr"]), st.tune_tasks, seed, ["val"],
                             0, "tune")
    return out


def _bytes_summary(p: Protocol, st: Settings) -> Dict[str, Any]:
    rows: Dict[str, Dict[str, Any]] = {}
    means: Dict[str, Dict[int, float]] = {}
    for label, b in p.bytes_specs.items():
        if "specs" not in b:
            rows[label] = {"method": b["method"], "missing": b.get("missing")}
            continue
        d = _per_seed(p.store, b["specs"], st.bytes_tasks)
        means[label] = d["seed_mean"]
        rows[label] = {"method": b["method"], "hp": b["hp"], "lr": b["lr"], "head_lr": b["head_lr"],
                       "bytes_per_task": _bytes_of(d["counts"]), "per_seed_mean": {str(s): v for s, v in
                                                                                  d["seed_mean"].items()},
                       "test_avg": _mean_ci(list(d["seed_mean"].values())), "missing_cells": len(d["missing"])}
    if not p.bytes_specs and "bytes" in st.stages:
        return {"missing": "not started (waits on tuning)"}
    mod = [l for l, r in rows.items() if r["method"] == "modcl" and r.get("bytes_per_task")]
    matched = []
    for label, r in rows.items():
        if r["method"] == "modcl" or not r.get("bytes_per_task") or not mod:
            continue
        peer = min(mod, key=lambda l: abs(math.log(rows[l]["bytes_per_task"] / r["bytes_per_task"])))
        c = _stats.compare_seeds(means[peer], means[label]) if len(set(means[peer]) & set(means[label])) >= 2 \
            else None
        matched.append({"baseline": label, "baseline_bytes": r["bytes_per_task"], "modcl": peer,
                        "modcl_bytes": rows[peer]["bytes_per_task"],
                        "bytes_ratio": rows[peer]["bytes_per_task"] / r["bytes_per_task"],
                        "modcl_minus_baseline": c})
    return {"source": getattr(p, "bytes_source", None), "tasks": list(st.bytes_tasks),
            "seeds": list(st.bytes_seeds), "configs": rows, "matched": matched,
            "rates": "each configuration at its method's chosen rates from stage 1 (not re-tuned)"}


def _recipe_summary(p: Protocol, st: Settings) -> Dict[str, Any]:
    rows: Dict[str, Any] = {}
    ps = {}
    for m in st.recipe_methods:
        r = p.recipe_out.get(m)
        if r is None:
            rows[m] = {"missing": "not started (waits on tuning)"}
            continue
        d = _per_seed(p.store, r["specs"], st.recipe_tasks)
        ps[m] = d
        augmented = [c.get("augment_applied") for _, c in _cells(p.store, r["specs"]) if c is not None]
        rows[m] = {"chosen": r["chosen"], "validation": r["validation"], "bytes_per_task": _bytes_of(d["counts"]),
                   "per_seed_test": {str(s): d["test"][s] for s in sorted(d["test"])},
                   "per_seed_mean": {str(s): v for s, v in d["seed_mean"].items()},
                   "test_avg": _mean_ci(list(d["seed_mean"].values())), "missing_cells": len(d["missing"]),
                   "augment_applied": bool(augmented) and all(augmented)}
    for n, c in _compare_all(ps, "modcl", list(ps)).items():
        rows[n]["diff_vs_modcl"] = c
    return {"tasks": list(st.recipe_tasks), "seeds": list(st.recipe_seeds), "epochs": st.recipe_epochs,
            "sched": st.sched, "augment": "timm create_transform(is_training=True)",
            "tuning_rule": "3 adapter rates: the short protocol's choice and one half-decade step either side, head "
                           "rate at the chosen ratio, extended one step at a time while the best is on an edge (at "
                           f"most {st.max_extensions} a side, as in tuning); tuning seed(s) "
                           + ", ".join(map(str, st.recipe_tune_seeds)) + ", task(s) " + ", ".join(st.recipe_tune_tasks),
            "methods": rows}


def _defaults_summary(p: Protocol, st: Settings) -> Dict[str, Any]:
    d = p.defaults_out
    if not d:
        return {"missing": "not run (waits on the recipe stage)" if "defaults" in st.stages else "not in the stages"}
    lib, ours = d["settings"]["library default"], d["settings"]["recipe choice"]
    keys = sorted(set(lib["val"]) & set(ours["val"]))

    def minus(a, b):
        return _mean_ci([a["val"][k] - b["val"][k] for k in keys])
    out = {"library": d["library"], "settings": d["settings"], "cells": keys,
           "recipe_choice_minus_default": minus(ours, lib),
           "per_cell_diff": {k: ours["val"][k] - lib["val"][k] for k in keys},
           "prefers": "recipe choice" if ours["val_mean"] > lib["val_mean"] else "library default",
           "rule": "the library's defaults change only when the tuning-only cells prefer the other setting"}
    if d.get("test_specs"):
        ps = {"preferred": _per_seed(p.store, d["test_specs"], st.recipe_tasks)}
        for m, r in p.recipe_out.items():
            ps[m] = _per_seed(p.store, r["specs"], st.recipe_tasks)
        pref = ps["preferred"]
        out["preferred_test"] = {
            "setting": "library default", "tasks": list(st.recipe_tasks), "seeds": list(st.recipe_seeds),
            "per_seed_test": {str(k): v for k, v in sorted(pref["test"].items())},
            "test_avg": _mean_ci(list(pref["seed_mean"].values())), "missing_cells": len(pref["missing"]),
            "bytes_per_task": _bytes_of(pref["counts"]),
            "others_minus_preferred": _compare_all(ps, "preferred", [m for m in ps if m != "preferred"])}
    if d.get("diagnosis"):
        out["diagnosis"] = {
            "note": "modcl only, outside the equal search (not in any comparison table); validation of the tuning "
                    "cells",
            "minus_recipe_choice": {n: minus(d["settings"][n], ours) for n in d["diagnosis"]}}
    return out


def _target(out: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's target at the default budget: modcl on or above every equal-or-smaller baseline (Holm-corrected
    interval excluding 0 against at least one), and within 1 point of per-task full fine-tuning."""
    ms = out["methods"]
    mod = ms.get("modcl", {})
    if "test_avg" not in mod:
        return {"evaluated": False}
    res: Dict[str, Any] = {"evaluated": True, "modcl_bytes": mod.get("bytes_per_task")}
    below, beaten = {}, []
    for n, s in ms.items():
        c = s.get("diff_vs_modcl")
        if n in ("modcl", "full_finetune") or not c or s.get("bytes_per_task") is None:
            continue
        if s["bytes_per_task"] <= (mod.get("bytes_per_task") or 0) * 1.05:
            below[n] = c["diff"]
            if c.get("verdict") == "modcl better":
                beaten.append(n)
    res["equal_or_smaller_baselines_minus_modcl"] = below
    res["modcl_not_below_any"] = all(v <= 0 or ms[n]["diff_vs_modcl"]["ci"][0] < 0 for n, v in below.items())
    res["significantly_better_than"] = beaten
    ft = ms.get("full_finetune", {}).get("diff_vs_modcl")
    if ft:
        res["full_finetune_minus_modcl"] = ft["diff"]
        res["full_finetune_minus_modcl_ci"] = ft["ci"]
        res["within_1_point_of_full_finetune"] = ft["diff"] <= 0.01
    res["met"] = bool(res["modcl_not_below_any"] and beaten and res.get("within_1_point_of_full_finetune"))
    return res


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------------------- main
def _csv(s: str, conv=str) -> Tuple[Any, ...]:
    return tuple(conv(x) for x in s.split(",") if x)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end run of every stage (a few minutes)")
    ap.add_argument("--plan", action="store_true", help="print cells per stage and the estimated hours; run nothing")
    ap.add_argument("--paper-scale", action="store_true",
                    help="GPU: 224 px, 30 epochs, full training sets, --device cuda, AMP, seeds 0-2, test stage only, "
                         "settings from --hp-from (default benchmarks/results/accuracy_v2.json); no re-tuning")
    ap.add_argument("--hp-from", help="accuracy_v2.json whose chosen settings are tested (no tuning)")
    ap.add_argument("--device", help="cpu (default) or cuda")
    ap.add_argument("--stages", help="comma-separated subset of tune,test,bytes,recipe,defaults")
    ap.add_argument("--tasks", help="comma-separated test tasks (default: " + ",".join(_fetch.TASK_ORDER) + ")")
    ap.add_argument("--tune-tasks", help="comma-separated tuning tasks")
    ap.add_argument("--methods", help="comma-separated methods (default: " + ",".join(ALL_METHODS) + ")")
    ap.add_argument("--test-seeds", help="comma-separated test seeds (default 0..7)")
    ap.add_argument("--tune-seeds", help="comma-separated tuning-only seeds (default 100,101)")
    ap.add_argument("--limit", type=int, help="cap every split at this many images (dry runs)")
    ap.add_argument("--workers", type=int, help="worker processes (default 2)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    ap.add_argument("--cache", help="data/weights folder (see _fetch.py)")
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results)")
    ap.add_argument("--time-budget-s", type=float,
                    help="stop after this many seconds, keep and summarise what finished")
    ap.add_argument("--bootstrap", type=int, help="bootstrap replicates of the extra interval (default 1000; 0: none)")
    a = ap.parse_args(argv)
    st = Settings()
    if a.quick:
        two = tuple(_fetch.TASK_ORDER[-2:])
        st = Settings(size=32, epochs=1, train_n=40, limit=60, tasks=two, tune_tasks=two[:1], tune_seeds=(100,),
                      test_seeds=(0, 1), seq_tune_seeds=(100,), seq_test_seeds=(0, 1), grid_width=2,
                      max_extensions=1, bytes_tasks=two[:1], bytes_seeds=(0, 1), recipe_tasks=two[:1],
                      recipe_seeds=(0, 1), recipe_tune_seeds=(100,), recipe_tune_tasks=two[:1], recipe_epochs=2,
                      stem=STEM + "_quick",
                      bootstrap=100, mode="quick")
    if a.paper_scale:
        st = Settings(size=224, epochs=30, train_n=None, device="cuda", amp=True, workers=1, threads=4,
                      loader_workers=6, test_seeds=(0, 1, 2), seq_test_seeds=(0, 1, 2), stages=("test",),
                      hp_from=str(RESULTS / f"{STEM}.json"), stem=STEM + "_paper_scale", mode="paper-scale")
    for name, conv in (("limit", int), ("workers", int), ("threads", int), ("cache", str), ("out_dir", str),
                       ("time_budget_s", float), ("bootstrap", int), ("hp_from", str), ("device", str)):
        v = getattr(a, name)
        if v is not None:
            setattr(st, name, conv(v))
    for name, attr, conv in (("tasks", "tasks", str), ("tune_tasks", "tune_tasks", str),
                             ("test_seeds", "test_seeds", int), ("tune_seeds", "tune_seeds", int),
                             ("methods", "methods", str), ("stages", "stages", str)):
        v = getattr(a, name)
        if v:
            setattr(st, attr, _csv(v, conv))
    for attr in ("tasks", "tune_tasks"):
        bad = [t for t in getattr(st, attr) if t not in _fetch.TASK_ORDER]
        if bad:
            ap.error(f"unknown tasks {bad}; choose from {_fetch.TASK_ORDER}")
    bad = [m for m in st.methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    bad = [s for s in st.stages if s not in ("tune", "test", "bytes", "recipe", "defaults")]
    if bad:
        ap.error(f"unknown stages {bad}")
    if set(st.tune_seeds) & set(st.test_seeds):
        ap.error("tuning seeds must not be test seeds")
    if st.hp_from and not Path(st.hp_from).is_file():
        ap.error(f"--hp-from {st.hp_from} does not exist (run the protocol first)")
    return st, a


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    st, a = parse_args(argv)
    if a.plan:
        pl = plan(st)
        print_plan(pl)
        print("cut to fit:\n  - " + "\n  - ".join(CUTS))
        return {"plan": pl}
    if st.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here")
    out_dir = Path(st.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _fetch.backbone_weights(st.cache)  # fetch once, before the workers start
    for t in set(st.tasks) | set(st.tune_tasks) | set(st.bytes_tasks) | set(st.recipe_tasks):
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
    summary["abandoned_cells"] = runner.abandoned
    summary["cells_total"] = len(store.mem)
    summary["cell_wall_s_total"] = float(sum(r["wall_s"] for r in store.mem.values()))
    summary["busy_wall_s"] = busy_wall_s(store.mem.values())
    from timm_modcl._io import atomic_write_json
    path = atomic_write_json(out_dir / f"{st.stem}.json", summary)
    _log(f"wrote {path} ({'complete' if complete else 'partial'}, {wall / 60:.1f} min)")
    import report
    report.write_all_v2(summary, out_dir, st.stem)
    return summary


if __name__ == "__main__":
    main()
