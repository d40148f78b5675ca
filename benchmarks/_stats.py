"""Statistics of the accuracy benchmark: mean and sd over seeds, seed-level paired t intervals with a Holm
correction over the comparisons, and (as an extra) paired bootstrap intervals of differences."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["mean_sd", "paired_bootstrap", "verdict", "paired_t", "holm", "compare_seeds"]


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


def paired_t(diffs: Sequence[float], level: float = 0.95) -> Dict[str, object]:
    """Student t interval of the mean of seed-level paired differences (one value per seed).

    Returns the mean, the interval ``mean -+ t_{n-1} * sd / sqrt(n)``, the two-sided p-value of "mean = 0", ``n`` and
    the level. With fewer than two values the interval and p-value are None.
    """
    from scipy import stats as ss
    d = np.asarray(diffs, dtype=float)
    n = int(d.size)
    out: Dict[str, object] = {"diff": float(d.mean()) if n else None, "n": n, "level": level}
    if n < 2:
        out.update(ci=None, p=None, sd=None)
        return out
    sd = float(d.std(ddof=1))
    se = sd / np.sqrt(n)
    q = float(ss.t.ppf(0.5 + level / 2, n - 1))
    if se == 0.0:
        p = 0.0 if d.mean() != 0 else 1.0
    else:
        p = float(2 * ss.t.sf(abs(d.mean()) / se, n - 1))
    out.update(ci=[float(d.mean() - q * se), float(d.mean() + q * se)], p=p, sd=sd, t_quantile=q)
    return out


def holm(pvalues: Dict[str, float], alpha: float = 0.05) -> Dict[str, Dict[str, object]]:
    """Holm's step-down correction: adjusted p-values (monotone, capped at 1) and rejections at ``alpha``.

    ``pvalues``: comparison name -> raw p-value. Returns name -> {"p", "p_holm", "reject"}.
    """
    names = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m = len(names)
    out: Dict[str, Dict[str, object]] = {}
    running = 0.0
    for i, k in enumerate(names):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = {"p": float(pvalues[k]), "p_holm": float(running), "reject": bool(running <= alpha)}
    return out


def compare_seeds(a: Dict[int, float], b: Dict[int, float], comparisons: int = 1,
                  level: float = 0.95) -> Dict[str, object]:
    """Seed-level comparison of ``a - b`` (seed -> mean accuracy over tasks), paired by seed: the t interval at
    ``level`` and a Bonferroni-widened interval at ``1 - (1 - level) / comparisons`` (simultaneous over the
    comparisons; the Holm-adjusted p-values come from :func:`holm` over all comparisons)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = paired_t(diffs, level)
    out["seeds"] = seeds
    out["per_seed"] = [float(x) for x in diffs]
    wide = paired_t(diffs, 1 - (1 - level) / max(1, comparisons))
    out["ci_bonferroni"] = wide["ci"]
    out["comparisons"] = comparisons
    return out
