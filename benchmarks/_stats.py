"""Statistics of the accuracy benchmark: mean and sd over seeds, paired bootstrap intervals of differences."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["mean_sd", "paired_bootstrap", "verdict"]


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired_bootstrap(a: Dict[int, List[np.ndarray]], b: Dict[int, List[np.ndarray]], replicates: int = 4000,
                     seed: int = 0, chunk: int = 100, level: float = 0.95) -> Dict[str, object]:
    """Paired bootstrap of the difference in average accuracy ``a - b``.

    ``a[seed][task]`` / ``b[seed][task]``: per-image correctness (bool) of the two methods on the same test images of
    each task, for the same seeds (same training subsets). The statistic is the mean over seeds of the mean over tasks
    of each task's accuracy difference. Each replicate resamples the seeds with replacement (training variation, paired
    by seed) and, independently per task, the test images with replacement (test-set variation, paired by image; the
    same image draw for every seed). Returns the point estimate, the percentile interval and the replicates' sd.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no common seeds")
    n_tasks = len(a[seeds[0]])
    rng = np.random.default_rng(seed)
    S = len(seeds)
    seed_draw = rng.integers(0, S, size=(replicates, S))
    per_task = np.zeros((replicates, n_tasks))
    point = []
    for t in range(n_tasks):
        d = np.stack([a[s][t].astype(np.int8) - b[s][t].astype(np.int8) for s in seeds])  # (S, n)
        n = d.shape[1]
        point.append(d.mean(axis=1))
        for lo in range(0, replicates, chunk):
            hi = min(lo + chunk, replicates)
            idx = rng.integers(0, n, size=(hi - lo, n))
            m = d[:, idx].mean(axis=-1).T  # (chunk, S): each seed's accuracy difference on the resampled images
            per_task[lo:hi, t] = np.take_along_axis(m, seed_draw[lo:hi], axis=1).mean(axis=1)
    reps = per_task.mean(axis=1)
    alpha = (1.0 - level) / 2
    est = float(np.mean([np.mean([p[k] for p in point]) for k in range(S)]))
    return {"diff": est, "ci": [float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))],
            "sd": float(reps.std(ddof=1)), "replicates": replicates, "seeds": seeds, "level": level}


def verdict(ci: Sequence[float], better: str = "first", worse: str = "second") -> Optional[str]:
    """``better`` if the interval of ``a - b`` lies above 0, ``worse`` if below, None if it contains 0."""
    lo, hi = ci
    if lo > 0:
        return better
    if hi < 0:
        return worse
    return None
