"""Per-user metric gains and bootstrap intervals (one user = one sampling unit).

Recall@K and NDCG@K are means over users of a per-user gain (hit, or ``1/log2(rank+1)``), so
their uncertainty is the mean's: a bootstrap over users gives the 95% interval, and a *paired*
bootstrap (the same resampled users for both models) gives the interval of a difference between
two models scored on the same users, which is far tighter than comparing two separate intervals.

    >>> per_user_gains([["a", "b"], ["c"]], ["b", "x"], 10)["recall@10"]
    [1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from onerec_prod.eval.metrics import target_rank


def per_user_gains(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                   ks: Sequence[int] | int) -> dict[str, list[float]]:
    """``{"recall@K": [...], "ndcg@K": [...]}``: each user's gain, in input order."""
    ks = [ks] if isinstance(ks, int) else list(ks)
    if len(ranked) != len(targets):
        raise ValueError(f"one ranked list per target expected: {len(ranked)} vs {len(targets)}")
    out: dict[str, list[float]] = {}
    ranks = [target_rank(p, t) for p, t in zip(ranked, targets, strict=True)]
    for k in ks:
        out[f"recall@{k}"] = [1.0 if r is not None and r <= k else 0.0 for r in ranks]
        out[f"ndcg@{k}"] = [1.0 / math.log2(r + 1) if r is not None and r <= k else 0.0 for r in ranks]
    return out


def _resample_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    means = x[_resample_idx(x.size, n_boot, seed)].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)`` over the same users (paired bootstrap)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired_diff_ci: need two equal, non-empty arrays, got {x.shape} and {y.shape}")
    return bootstrap_ci(x - y, n_boot, seed, level)


def summarize(gains: Mapping[str, Sequence[float]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """``{metric: {"mean", "low", "high", "n"}}`` for every metric of ``gains``."""
    out = {}
    for name, vals in gains.items():
        m, lo, hi = bootstrap_ci(vals, n_boot, seed)
        out[name] = {"mean": m, "low": lo, "high": hi, "n": len(vals)}
    return out


def fmt_ci(mean: float, low: float, high: float, digits: int = 4) -> str:
    """``'.0648 [.0620, .0677]'`` style text."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
