"""`python -m bench.cdm`: the speed measurement and the correlation statistic, on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import cdm as bench_cdm
from cdm_fast import cdm, stats


@pytest.fixture(scope="module")
def tiny():
    return bench_cdm.random_model(
        torch.device("cpu"),
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )


def test_measure_speed_times_score_on_a_tiny_random_llama(tiny):
    model, tokenizer = tiny
    row = bench_cdm.measure_speed(
        model,
        tokenizer,
        ["2 + 2 =", "a longer prompt, padded on the left", "x"],
        batch_size=2,
        max_new_tokens=3,
        noise_samples=1,
        device=torch.device("cpu"),
    )
    assert row["prompts"] == 3 and row["batch_size"] == 2
    assert row["seconds"] > 0 and math.isfinite(row["prompts_per_s"])
    assert 1 <= row["generated_tokens_mean"] <= 3
    assert row["params"]["noise_samples"] == 1 and row["params"]["num_layers"] == 2
    assert row["decoding"] == "greedy" and row["samples_per_s"] == row["prompts_per_s"]


def test_measure_speed_times_sampled_scoring_with_a_shared_or_a_per_sample_prefill(tiny):
    model, tokenizer = tiny
    prompts = ["2 + 2 =", "a longer prompt"]
    kwargs = dict(batch_size=2, max_new_tokens=3, noise_samples=1, device=torch.device("cpu"), num_samples=3)
    for prefill in ("shared", "per sample"):
        row = bench_cdm.measure_speed(model, tokenizer, prompts, prefill=prefill, **kwargs)
        assert row["decoding"] == "sampled" and row["num_samples"] == 3 and row["prefill"] == prefill
        assert row["samples_per_s"] == pytest.approx(3 * row["prompts_per_s"])
        assert row["params"]["decoding"] == "sampled" and row["params"]["temperature"] == 0.7


def _results(rng, correct, signal):
    """CDMResults whose CDM carries `signal` x correctness plus noise; the rest is noise."""
    return [
        cdm.CDMResult(
            prompt="p",
            completion="c",
            cdm=float(60 + signal * ok + rng.normal(0, 5)),
            entropy_collapse=float(rng.random()),
            attention_sparsity=float(rng.random()),
            basin_resistance=float(rng.random()),
            n_tokens=3,
            mean_logprob=float(-rng.random()),
        )
        for ok in correct
    ]


def test_validation_rows_carry_spread_auroc_and_the_gain_over_the_best_baseline():
    rng = np.random.default_rng(0)
    correct = rng.random(300) < 0.4
    results = _results(rng, correct, 10.0)
    rows = bench_cdm.validate_scores(results, correct.tolist(), resamples=300, seed=0)
    by_score = {row["score"]: row for row in rows}
    assert set(by_score) == set(bench_cdm.SCORES)
    cdm_row = by_score["cdm"]
    assert cdm_row["auroc"] == stats.auroc([r.cdm for r in results], correct) and cdm_row["auroc"] > 0.8
    assert cdm_row["iqr"] == stats.spread([r.cdm for r in results])["iqr"]
    assert cdm_row["auroc_ci95"][0] > 0.5 and cdm_row["auroc_minus_best_baseline_ci95"][0] > 0.0
    assert cdm_row["best_baseline"] in bench_cdm.BASELINES and "deep_rate" in cdm_row
    baseline = by_score["mean_logprob"]
    assert baseline["baseline"] and "auroc_minus_best_baseline" not in baseline
    assert 0.3 < by_score["attention_sparsity"]["auroc"] < 0.7
    assert "CDM against the targets" in bench_cdm.format_validation(rows)


def test_best_of_n_compares_the_top_scored_sample_with_a_random_one():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.3  # 100 prompts x 4 samples
    rows = bench_cdm.best_of_n(_results(rng, correct, 20.0), correct.tolist(), 4, resamples=300, seed=0)
    by_score = {row["score"]: row for row in rows}
    marks = correct.reshape(-1, 4)
    cdm_row = by_score["cdm"]
    assert cdm_row["random_correct"] == pytest.approx(marks.mean()) and cdm_row["prompts"] == 100
    assert cdm_row["oracle_correct"] == pytest.approx(marks.any(1).mean())
    # CDM = 60 + 20 * right + N(0, 5): the top-scored sample is nearly always a right one when there is one.
    assert cdm_row["best_correct"] == pytest.approx(cdm_row["oracle_correct"], abs=0.03)
    assert cdm_row["best_minus_random_ci95"][0] > 0.0
    low, high = by_score["basin_resistance"]["best_minus_random_ci95"]
    assert low < 0.0 < high
    assert "best − random" in bench_cdm.format_best_of_n(rows)
