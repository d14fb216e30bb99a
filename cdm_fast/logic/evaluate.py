"""Accuracy of a causal LM on logic-suite problems: batched greedy generation, then ``check``.

Works with any HF-style pair: ``tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=...)``
and ``batch_decode``; ``model.generate(input_ids=..., attention_mask=..., max_new_tokens=...,
do_sample=False)`` returning prompt + new tokens. Prompts are left-padded so every row's new tokens start
at the same column. A chat template already writes its special tokens, so "chat" prompts are tokenized
without adding them again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from cdm_fast.logic.suite import Problem, check, extract


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    map_problems: Callable[[Callable[[list[Problem]], list], list[Problem]], list] | None = None,
) -> dict[str, Any]:
    """Greedy-decode every problem's prompt and score it.

    Returns ``{"accuracy": {task: fraction scoring 1.0}, "mean_score": {task: mean score},
    "results": [per problem: task, difficulty, prompt_format, index, answer, completion, extracted, score]}``.
    map_problems(f, problems) spreads the per-problem work and must return f's results for every problem, in
    order (e.g. `distributed.map_sharded` over ranks); default f(problems).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size, max_new_tokens: expected >= 1, got {batch_size} and {max_new_tokens}")
    prompt_formats = {problem.prompt_format for problem in problems}
    if len(prompt_formats) > 1:
        raise ValueError(
            f"problems: expected one prompt_format, got {sorted(prompt_formats)}; evaluate each apart"
        )
    add_special_tokens = prompt_formats != {"chat"}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = getattr(model, "device", torch.device("cpu"))

    def solve(shard: list[Problem]) -> list[dict[str, Any]]:
        results = []
        with tqdm(total=len(shard), desc="logic suite", unit="problem", disable=not progress) as bar:
            for start in range(0, len(shard), batch_size):
                batch = shard[start : start + batch_size]
                encoded = tokenizer(
                    [problem.prompt(tokenizer) for problem in batch],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                )
                input_ids = encoded["input_ids"].to(device)
                with torch.inference_mode():
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=encoded["attention_mask"].to(device),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad_token_id,
                    )
                completions = tokenizer.batch_decode(
                    output[:, input_ids.shape[1] :], skip_special_tokens=True
                )
                for problem, completion in zip(batch, completions, strict=True):
                    results.append(
                        {
                            "task": problem.task,
                            "difficulty": problem.difficulty,
                            "prompt_format": problem.prompt_format,
                            "index": problem.index,
                            "answer": problem.answer,
                            "completion": completion,
                            "extracted": extract(problem, completion),
                            "score": check(problem, completion),
                        }
                    )
                bar.update(len(batch))
        return results

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        results = (map_problems or (lambda f, items: f(items)))(solve, list(problems))
    finally:
        tokenizer.padding_side = padding_side
    scores = defaultdict(list)
    for result in results:
        scores[result["task"]].append(result["score"])
    return {
        "accuracy": {task: sum(score == 1.0 for score in s) / len(s) for task, s in scores.items()},
        "mean_score": {task: sum(s) / len(s) for task, s in scores.items()},
        "results": results,
    }
