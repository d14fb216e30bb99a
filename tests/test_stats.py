"""cdm_fast.stats against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cdm_fast import stats


def test_average_ranks_share_ties():
    assert stats.average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_is_the_pairwise_win_rate_with_ties_counting_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 57).astype(float)  # many ties
    labels = rng.random(57) < 0.3
    wins = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[labels], scores[~labels])
    ]
    assert stats.auroc(scores, labels) == pytest.approx(sum(wins) / len(wins), abs=1e-12)
    assert stats.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and stats.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(stats.auroc([1.0, 2.0], [True, True]))


def test_bootstrap_interval_of_a_mean_brackets_it_with_the_normal_width():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, 400)
    estimate, low, high = stats.bootstrap(np.mean, values, resamples=2000, seed=0)
    assert estimate == values.mean() and low < estimate < high
    assert (high - low) == pytest.approx(2 * 1.96 * values.std() / math.sqrt(400), rel=0.15)
    assert stats.bootstrap(np.mean, values, seed=0) == (estimate, low, high)


def test_paired_bootstrap_draws_the_same_rows_from_every_array():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 5.0, 100)
    estimate, low, high = stats.bootstrap(lambda a, b: float(np.mean(a - b)), base + 0.25, base)
    assert estimate == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_bootstrap_drops_undefined_draws_and_refuses_ragged_arrays():
    labels = np.array([True] + [False] * 9)
    scores = np.arange(10.0)
    estimate, low, high = stats.bootstrap(stats.auroc, scores, labels, resamples=300, seed=0)
    assert estimate == 0.0 and low == 0.0 and high == 0.0
    with pytest.raises(ValueError, match="samples"):
        stats.bootstrap(np.mean, np.ones(3), np.ones(4))


def test_spread_reports_std_iqr_and_the_5_95_range():
    result = stats.spread(np.arange(101.0))
    assert result == {"std": pytest.approx(np.arange(101.0).std()), "iqr": 50.0, "p5": 5.0, "p95": 95.0}
