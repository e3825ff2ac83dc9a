"""Rank statistics: ranks with ties, Spearman's rank correlation, and its bootstrap interval and permutation p-value.

Pure functions of number sequences, like the significance tests in :mod:`ktransfer.metrics` (McNemar,
Benjamini–Hochberg); the scout scores its predictors with them.
"""

from __future__ import annotations

import math

import numpy as np


def ranks(values) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length; got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x) - (len(x) + 1) / 2.0, ranks(y) - (len(y) + 1) / 2.0
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def spearman_with_interval(x, y, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's ρ, a percentile bootstrap interval over the pairs, and a two-sided permutation p-value."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        value = spearman(x[pick], y[pick])
        if not math.isnan(value):
            boot.append(value)
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(boot, tail)), float(np.quantile(boot, 1.0 - tail))) if boot else (float("nan"), float("nan"))
    # Permutation test: how often shuffled realised values correlate at least as strongly (+1 keeps p > 0).
    extreme = sum(1 for _ in range(resamples) if abs(spearman(x, rng.permutation(y))) >= abs(rho) - 1e-12) if not math.isnan(rho) else resamples
    return {"spearman": rho, "low": low, "high": high, "confidence": confidence, "p_value": (extreme + 1) / (resamples + 1), "n": len(x)}


__all__ = ["ranks", "spearman", "spearman_with_interval"]
