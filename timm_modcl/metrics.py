"""Continual-learning metrics over an accuracy matrix (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

``R[i][j]`` is the accuracy on task ``j`` measured right after learning task ``i``. Row ``i`` must hold the tasks
learned so far (``j <= i``); entries for tasks not learned yet (``j > i``) are optional (``None``).

    m = AccuracyMatrix(['a', 'b', 'c'])
    m.add_row([0.9])              # after learning a
    m.add_row([0.9, 0.8])         # after learning b
    m.add_row({'a': 0.9, 'b': 0.8, 'c': 0.7})
    m.average_accuracy, m.mean_forgetting, m.backward_transfer
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._io import atomic_write_json
from .errors import DataError

__all__ = ['AccuracyMatrix']

Row = Union[Sequence[Optional[float]], Mapping[str, float]]



def _check_acc(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise DataError(f'{where}: accuracy must be a number in [0, 1], got {v!r}')
    return float(v)


class AccuracyMatrix:
    """Accuracies ``R[i][j]`` on task ``j`` after learning task ``i``, and the metrics derived from them.

    Args:
        tasks: Task names in the order they are learned.
        rows: Optional rows to start with (as for ``add_row``).

    Raises:
        DataError (a ValueError): on duplicate task names or bad rows.
    """

    def __init__(self, tasks: Sequence[str], rows: Optional[Sequence[Row]] = None) -> None:
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise DataError(f'tasks must be a list of task names, got {tasks!r}')
        tasks = [str(t) for t in tasks]
        if not tasks:
            raise DataError('an accuracy matrix needs at least one task')
        if len(set(tasks)) != len(tasks):
            raise DataError(f'task names must be unique, got {tasks}')
        self.tasks: List[str] = tasks
        self.rows: List[List[Optional[float]]] = []
        for row in rows or ():
            self.add_row(row)

    # ------------------------------------------------------------------ building
    def add_row(self, row: Row) -> None:
        """Record the accuracies measured after learning the next task.

        Args:
            row: A sequence (task order; at least the tasks learned so far, i.e. ``len(rows) + 1`` values, ``None``
                for not measured future tasks) or a mapping ``{task name: accuracy}`` with at least those tasks.
        """
        i = len(self.rows)
        if i >= len(self.tasks):
            raise DataError(f'the matrix already has a row for each of its {len(self.tasks)} tasks')
        if isinstance(row, Mapping):
            unknown = [k for k in row if k not in self.tasks]
            if unknown:
                raise DataError(f'row {i}: unknown tasks {unknown}')
            values = [row.get(t) for t in self.tasks]
        else:
            values = list(row)
            if len(values) > len(self.tasks):
                raise DataError(f'row {i} has {len(values)} values for {len(self.tasks)} tasks')
            values += [None] * (len(self.tasks) - len(values))
        out: List[Optional[float]] = []
        for j, v in enumerate(values):
            if v is None:
                if j <= i:
                    raise DataError(f'row {i} (after learning {self.tasks[i]!r}) has no accuracy for task '
                                     f'{self.tasks[j]!r}, which has been learned')
                out.append(None)
            else:
                out.append(_check_acc(v, f'R[{i}][{j}]'))
        self.rows.append(out)

    def __getitem__(self, ij) -> Optional[float]:
        i, j = ij
        return self.rows[i][j]

    @property
    def num_learned(self) -> int:
        """Number of rows, i.e. tasks learned so far."""
        return len(self.rows)

    def _require_rows(self) -> int:
        if not self.rows:
            raise DataError('the accuracy matrix has no rows yet')
        return len(self.rows) - 1

    # ------------------------------------------------------------------ metrics
    @property
    def final_accuracies(self) -> Dict[str, float]:
        """Accuracy on each learned task after the last learned task (the last row)."""
        last = self._require_rows()
        return {self.tasks[j]: self.rows[last][j] for j in range(last + 1)}

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over the learned tasks after learning the last one (mean of the last row)."""
        accs = list(self.final_accuracies.values())
        return sum(accs) / len(accs)

    @property
    def forgetting(self) -> Dict[str, float]:
        """Per task ``j`` except the last learned: ``max_{j <= i < last} R[i][j] - R[last][j]`` (>= 0)."""
        last = self._require_rows()
        return {
            self.tasks[j]: max(self.rows[i][j] for i in range(j, last)) - self.rows[last][j]
            for j in range(last)
        }

    @property
    def mean_forgetting(self) -> float:
        """Mean of ``forgetting`` over the tasks before the last learned one (0.0 when only one task is learned)."""
        f = list(self.forgetting.values())
        return sum(f) / len(f) if f else 0.0

    @property
    def max_forgetting(self) -> float:
        """Largest ``forgetting`` of any task (0.0 when only one task is learned)."""
        return max(self.forgetting.values(), default=0.0)

    @property
    def backward_transfer(self) -> float:
        """Mean of ``R[last][j] - R[j][j]`` over the tasks before the last learned one (negative: forgetting;
        0.0 when only one task is learned)."""
        last = self._require_rows()
        if last == 0:
            return 0.0
        return sum(self.rows[last][j] - self.rows[j][j] for j in range(last)) / last

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: the tasks, the matrix (``None`` for unmeasured entries) and the metrics."""
        d: Dict[str, Any] = {'tasks': list(self.tasks), 'matrix': [list(r) for r in self.rows]}
        if self.rows:
            d.update(
                average_accuracy=self.average_accuracy,
                forgetting=self.forgetting,
                mean_forgetting=self.mean_forgetting,
                backward_transfer=self.backward_transfer,
            )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'AccuracyMatrix':
        """Inverse of ``to_dict`` (the derived metrics in ``d`` are ignored and recomputed)."""
        if not isinstance(d, Mapping) or 'tasks' not in d:
            raise DataError('not an accuracy matrix dict: expected keys "tasks" and "matrix"')
        return cls(d['tasks'], d.get('matrix') or [])

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``to_dict()`` as JSON, atomically (a temporary file in the same folder, then a rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> 'AccuracyMatrix':
        with open(path, encoding='utf-8') as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccuracyMatrix) and self.tasks == other.tasks and self.rows == other.rows

    def __repr__(self) -> str:
        return f'AccuracyMatrix(tasks={self.tasks!r}, rows={self.rows!r})'

    def format_table(self, digits: int = 1) -> str:
        """The matrix as a text table in percent (rows: after learning task i; columns: accuracy on task j),
        followed by average accuracy, forgetting and backward transfer."""
        header = ['after \\ on'] + self.tasks
        body = []
        for i, row in enumerate(self.rows):
            body.append([self.tasks[i]] + ['-' if v is None else f'{100 * v:.{digits}f}' for v in row])
        widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]

        def fmt(r):
            return '  '.join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r)))

        lines = [fmt(header), '  '.join('-' * w for w in widths)] + [fmt(r) for r in body]
        if self.rows:
            lines += [
                '',
                f'average accuracy:  {100 * self.average_accuracy:.{digits}f}%',
                f'forgetting (mean): {100 * self.mean_forgetting:.{digits}f} points'
                f' (max {100 * self.max_forgetting:.{digits}f})',
                f'backward transfer: {100 * self.backward_transfer:+.{digits}f} points',
            ]
        return '\n'.join(lines)
