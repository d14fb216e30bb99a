"""`python -m bench.cdm`: the speed measurement and the correlation statistic, on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import cdm as bench_cdm


def test_measure_speed_times_score_on_a_tiny_random_llama():
    model, tokenizer = bench_cdm.random_model(
        torch.device("cpu"),
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
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


def test_measure_speed_times_sampled_scoring_with_a_shared_or_a_per_sample_prefill():
    model, tokenizer = bench_cdm.random_model(
        torch.device("cpu"),
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    prompts = ["2 + 2 =", "a longer prompt"]
    kwargs = dict(batch_size=2, max_new_tokens=3, noise_samples=1, device=torch.device("cpu"), num_samples=3)
    for prefill in ("shared", "per sample"):
        row = bench_cdm.measure_speed(model, tokenizer, prompts, prefill=prefill, **kwargs)
        assert row["decoding"] == "sampled" and row["num_samples"] == 3 and row["prefill"] == prefill
        assert row["samples_per_s"] == pytest.approx(3 * row["prompts_per_s"])
        assert row["params"]["decoding"] == "sampled" and row["params"]["temperature"] == 0.7


def test_point_biserial_is_pearson_and_its_interval_brackets_it():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, 40)
    values = 60 + 10 * correct + rng.normal(0, 5, 40)
    r, (low, high) = bench_cdm.point_biserial(values, correct)
    assert r == np.corrcoef(values, correct)[0, 1]
    assert low < r < high and high - low < 1.0
    assert bench_cdm.point_biserial(values, correct) == (r, [low, high])  # fixed seed


def test_point_biserial_is_nan_with_one_class():
    r, interval = bench_cdm.point_biserial([50.0, 60.0, 70.0], [True, True, True])
    assert math.isnan(r) and all(math.isnan(value) for value in interval)
