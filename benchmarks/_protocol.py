"""Pure logic of the accuracy protocol v2 (no training): the rate grid and its extension, interior flags, code
hashes and the cost model behind ``accuracy.py --plan``.

Kept free of torch so ``tests/test_benchmark_protocol.py`` checks it in well under a second.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent

#: Half-decade learning-rate ladder shared by every method and both axes.
LADDER: List[float] = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]

Point = Tuple[int, ...]  # ladder indices, one per axis: (adapter, head) or (lr,) for one-axis methods


def nearest_index(x: float, values: Sequence[float] = LADDER) -> int:
    """Index of the ladder value nearest to ``x`` on a log scale."""
    return min(range(len(values)), key=lambda i: abs(math.log(values[i]) - math.log(x)))


@dataclass
class GridSearch:
    """A grid over ladder indices, extended while its best point lacks a tried neighbour.

    Two axes (adapter lr x head lr): the initial grid is ``width`` x ``width`` steps around ``centre``; while the
    best point (highest score; ties go to the earlier-tried point) has an untried neighbour on an axis, the line of
    ``width`` points beyond it on that axis (centred on the best on the other axis) is added, at most
    ``max_extensions`` times per axis and side. One axis (no head / adapter split): ``width ** 2`` points around
    ``centre`` (the same number of settings), extended by one point at a time under the same cap.

    The best point is *interior* when every axis neighbour was tried (a local maximum of the grid); otherwise the
    result records why not (``cap`` reached or the ``ladder`` ends).
    """

    centre: Point
    width: int = 3
    max_extensions: int = 2
    size: int = len(LADDER)
    scores: Dict[Point, float] = field(default_factory=dict)
    order: List[Point] = field(default_factory=list)
    extensions: Dict[str, int] = field(default_factory=dict)

    @property
    def axes(self) -> int:
        return len(self.centre)

    def _ok(self, p: Point) -> bool:
        return all(0 <= i < self.size for i in p)

    def initial(self) -> List[Point]:
        """The first batch of points to score."""
        if self.axes == 1:
            n = self.width ** 2
            lo = self.centre[0] - (n - 1) // 2
            lo = max(0, min(lo, self.size - n))
            pts = [(i,) for i in range(lo, lo + n)]
        else:
            h = (self.width - 1) // 2
            pts = [(self.centre[0] + a, self.centre[1] + b) for a in range(-h, self.width - h)
                   for b in range(-h, self.width - h)]
        return [p for p in pts if self._ok(p)]

    def add(self, scores: Dict[Point, float]) -> None:
        """Record scores (validation means) of points."""
        for p, s in scores.items():
            if p not in self.scores:
                self.order.append(p)
            self.scores[p] = float(s)

    def best(self) -> Point:
        return max(self.order, key=lambda p: (self.scores[p], -self.order.index(p)))

    def _missing(self, p: Point) -> List[Tuple[int, int]]:
        """(axis, direction) of the untried neighbours of ``p`` (inside or outside the ladder)."""
        out = []
        for a in range(self.axes):
            for d in (-1, 1):
                q = tuple(v + d if k == a else v for k, v in enumerate(p))
                if q not in self.scores:
                    out.append((a, d))
        return out

    def next_points(self) -> List[Point]:
        """Points to score next (empty: the search is over)."""
        if not self.scores:
            return self.initial()
        b = self.best()
        pts: List[Point] = []
        h = (self.width - 1) // 2
        for a, d in self._missing(b):
            key = f"{a}{'+' if d > 0 else '-'}"
            beyond = b[a] + d
            if not 0 <= beyond < self.size or self.extensions.get(key, 0) >= self.max_extensions:
                continue
            self.extensions[key] = self.extensions.get(key, 0) + 1
            if self.axes == 1:
                pts.append((beyond,))
            else:
                o = 1 - a
                for off in range(-h, self.width - h):
                    q = [0, 0]
                    q[a], q[o] = beyond, b[o] + off
                    q = tuple(q)
                    if self._ok(q) and q not in self.scores and q not in pts:
                        pts.append(q)
        return pts

    def result(self) -> Dict[str, Any]:
        """Where the best point sits: indices, interior flag, why not interior, extensions used."""
        b = self.best()
        miss = self._missing(b)
        why = []
        for a, d in miss:
            beyond = b[a] + d
            side = f"axis {a} {'high' if d > 0 else 'low'}"
            if not 0 <= beyond < self.size:
                why.append(f"{side}: ladder ends")
            elif self.extensions.get(f"{a}{'+' if d > 0 else '-'}", 0) >= self.max_extensions:
                why.append(f"{side}: extension cap ({self.max_extensions}) reached")
            else:
                why.append(f"{side}: not tried")
        axis_vals = [sorted({p[a] for p in self.scores}) for a in range(self.axes)]
        return {"best": list(b), "score": self.scores[b], "interior": not miss, "edge": why,
                "cap_hit": any("cap" in w for w in why), "extensions": dict(self.extensions),
                "position": [axis_vals[a].index(b[a]) for a in range(self.axes)],
                "grid_size": [len(v) for v in axis_vals], "settings": len(self.scores)}


def run_grid(search: GridSearch, score: Callable[[Point], float]) -> Dict[str, Any]:
    """Drive ``search`` with a synchronous scoring function (tests, dry runs)."""
    while True:
        pts = search.next_points()
        if not pts:
            return search.result()
        search.add({p: score(p) for p in pts})


# ---------------------------------------------------------------------------------------------------- code hashes
def file_hash(paths: Iterable[Path]) -> str:
    """sha256 (first 16 hex digits) over the named files' bytes, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def bench_code_hash() -> str:
    """Hash of the benchmark code that determines a cell's result: baselines.py, _fetch.py and the cell runner."""
    return file_hash([HERE / "baselines.py", HERE / "_fetch.py", HERE / "_cellrun.py"])


def package_hash() -> str:
    """Hash of the timm_modcl package source (every .py under it, sorted)."""
    pkg = HERE.parent / "timm_modcl"
    return file_hash(sorted(pkg.rglob("*.py")))


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (with ``+dirty`` when tracked files changed), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# ---------------------------------------------------------------------------------------------------- cost model
#: Seconds per task cell (per task of a sequence) at 64 px / 500 training images / 1 torch thread, two workers on the
#: 2-core machine: the mean ``wall_s`` of protocol v2's own cells (``benchmarks/results/accuracy_v2_cells``, as
#: :func:`measured_cell_seconds` recomputes them; ``tests/test_benchmark_protocol.py`` checks the two agree):
#: 5-epoch validation-only cells, 5-epoch validation + test cells, and 30-epoch cells with timm's augmentation (the
#: library recipe). The plan made before the run used protocol v1's cell times and estimated 6.0 h; the run took
#: longer (the closing note of issue 17 and README say how much), so the table was replaced by these measurements.
CELL_S = {
    # method:       (val 5 ep, val+test 5 ep, 30 ep augmented)
    "bn_head": (25.5, 25.1, 117.1),
    "full_finetune": (62.7, 31.4, 146.9),
    "ia3": (76.0, 91.3, None),
    "linear_probe": (3.2, 8.9, 5.4),
    "lora": (63.8, 67.9, 186.8),
    "lwf": (54.9, 50.1, None),
    "modcl": (63.6, 73.5, 154.0),
    "modcl_lora": (60.0, 29.3, None),
    "piggyback": (38.5, 32.6, None),
    "seq_finetune": (47.8, 59.4, None),
}
#: Methods without cells of their own (estimate: the slowest adapter method).
CELL_S_DEFAULT = (80.0, 95.0, 220.0)
#: Epochs of the long (recipe) column of :data:`CELL_S`.
LONG_EPOCHS = 30


def cell_seconds(method: str, test: bool, epochs: int = 5, augment: bool = False) -> float:
    """Estimated seconds of one task cell (one task of a sequence) of ``method``: the measured 5-epoch cell, or, for
    longer training, linear in the epochs from it to the measured 30-epoch augmented cell (``augment`` is accepted
    for the callers' clarity; the long column is augmented, the 5-epoch columns are not)."""
    val_s, test_s, long_s = CELL_S.get(method, CELL_S_DEFAULT)
    base = test_s if test else val_s
    if long_s is None:  # never measured at length: scale the whole 5-epoch cell with the epochs (pessimistic)
        long_s = val_s * LONG_EPOCHS / 5.0
    if epochs <= 5:
        return base * epochs / 5.0
    return base + (long_s - val_s) * (epochs - 5) / (LONG_EPOCHS - 5)


def measured_cell_seconds(folder: Path) -> Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]]:
    """Mean ``wall_s`` per task of the cells in ``folder`` by method: 5-epoch validation-only, 5-epoch validation +
    test, and :data:`LONG_EPOCHS`-epoch cells (None where a method has no such cell)."""
    import json
    acc: Dict[str, List[List[float]]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        cell = json.loads(path.read_text())
        spec = cell["spec"]
        epochs = spec["recipe"]["epochs"]
        col = 2 if epochs == LONG_EPOCHS else (1 if "test" in spec["evaluate"] else 0) if epochs == 5 else None
        if col is None:
            continue
        acc.setdefault(spec["method"], [[], [], []])[col].append(cell["wall_s"] / len(spec["tasks"]))
    return {m: tuple(sum(v) / len(v) if v else None for v in cols) for m, cols in acc.items()}
