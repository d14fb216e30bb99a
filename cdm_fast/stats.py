"""Statistics the metric's validation uses: AUROC, bootstrap intervals (paired for shared rows), spread.

Plain numpy, so that every report computes the same thing the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values` (n,), ties sharing their average rank, float64 (n,)."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` (n,) for binary `labels` (n,): the probability that a random
    positive scores above a random negative, ties counting half (Mann-Whitney U / (n_pos · n_neg)).
    NaN when a class is absent."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def bootstrap(
    statistic: Callable[..., float],
    *samples,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(statistic of the data, lower, upper): the percentile interval of `statistic(*samples)` over
    `resamples` draws of n rows with replacement. Every array in `samples` has n rows and is drawn with the
    same row indices, so paired values stay paired (a paired bootstrap). Draws where the statistic is NaN
    (an AUROC that drew one class only) are dropped; the interval is NaN when all are."""
    arrays = [np.asarray(sample) for sample in samples]
    size = len(arrays[0])
    if size == 0 or any(len(array) != size for array in arrays):
        raise ValueError(f"samples: expected arrays of one non-zero length, got {[len(a) for a in arrays]}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    estimate = float(statistic(*arrays))
    rows = np.random.default_rng(seed).integers(0, size, size=(resamples, size))
    draws = np.array([statistic(*(array[index] for array in arrays)) for index in rows], dtype=np.float64)
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return estimate, math.nan, math.nan
    tail = (1.0 - level) / 2.0
    return estimate, float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def spread(values) -> dict[str, float]:
    """std, interquartile range and the 5th and 95th percentiles of `values` (n,)."""
    values = np.asarray(values, dtype=np.float64)
    p5, p25, p75, p95 = np.quantile(values, [0.05, 0.25, 0.75, 0.95])
    return {"std": float(values.std()), "iqr": float(p75 - p25), "p5": float(p5), "p95": float(p95)}
