"""Pure statistics of rates: Wilson intervals, the cluster bootstrap over problems (samples of one problem are not
independent), and grouping items by cluster. numpy only."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from jaxtyping import Float


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def cluster_bootstrap(sums: Float[np.ndarray, " m"] | Sequence[float], counts: Float[np.ndarray, " m"] | Sequence[float],
                      *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Σ sums / Σ counts when the m clusters (problems) are resampled with replacement: the
    ratio estimator of a rate (sums = successes, counts = samples per problem) or of a mean over items grouped in
    clusters (sums = per-cluster totals, counts = items per cluster). Deterministic given `seed`."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError(f"cluster_bootstrap needs sums and counts of one shape (m,), got {s.shape} and {c.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level={level} must be in (0, 1) and n_boot={n_boot} >= 1")
    if s.size == 0 or c.sum() <= 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, s.size, size=(n_boot, s.size))  # (B, m) resampled clusters
    num, den = s[idx].sum(1), c[idx].sum(1)
    stat = num[den > 0] / den[den > 0]
    a = (1 - level) / 2
    return float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))


def grouped(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, list]:
    """(per-cluster sums, per-cluster counts, cluster keys in first-seen order) of item values."""
    if len(values) != len(clusters):
        raise ValueError(f"grouped got {len(values)} values but {len(clusters)} cluster labels; pass one per value")
    keys: dict[Hashable, int] = {}
    for c in clusters:
        keys.setdefault(c, len(keys))
    sums, counts = np.zeros(len(keys)), np.zeros(len(keys))
    for v, c in zip(values, clusters, strict=True):
        sums[keys[c]] += float(v)
        counts[keys[c]] += 1
    return sums, counts, list(keys)
