"""`cdm-fast lora-distill`: LoRA distillation on the frozen model's own high-CDM completions.

Steps (each a small function; `run(config)` chains them, the CLI only fills the config):

1. collect  — greedy completions of `num_prompts` logic-suite *train*-split prompts and `num_free_text`
              free-text prompts (`cdm_fast.freetext`, train passages), scored by `cdm.score` (which returns
              the completions it scored); keep CDM >= `threshold` or, with `top_fraction`, the top q by CDM.
              The distribution is printed; a warning (with the numbers) when fewer than `min_examples` are
              kept; a `ValueError` and nothing written when none is kept.
2. train    — peft LoRA (r, alpha, dropout, target modules) through `cdm_fast.patch.patch_peft`, causal-LM
              loss on the completion tokens only (prompt tokens labelled -100), AdamW, cosine schedule with
              linear warmup, gradient accumulation, bf16 autocast and `wgrad.deferred` on CUDA only.
              Atomic checkpoints (tmp file + os.replace) every `checkpoint_every` steps and on Ctrl-C.
3. evaluate — on `num_eval_prompts` *eval*-split prompts (disjoint from train by construction): CDM mean and
              parts, deep rate, logic accuracy of the same greedy completions CDM scored (up to
              `max_new_tokens`), before and after, and for a control LoRA trained with the same steps on the
              same number of examples drawn at random from all collected completions (no CDM filter).
              Shallow skills, same three models: perplexity on the held-out free-text passages and greedy
              accuracy on eval-split problems of the reasoning-gym tasks outside the training mix
              (`logic.OUTSIDE_MIX_TASKS`). Differences come with paired bootstrap 95% intervals over prompts
              (or passages; numpy, seeded).
4. report   — report.json / report.md / cdm_hist.png / loss.png, built from metrics.jsonl.

Scale-out: under `torchrun --nproc-per-node N` (`cdm_fast.distill.distributed`) scoring, evaluation and
perplexity are sharded over the ranks and gathered in order, the LoRA trains under DistributedDataParallel
(each rank its own micro-batches of the global batch: batch_size × grad_accum × N examples a step, loss
normalised by the global completion-token count, so N processes step exactly as one process with N times
the accumulation), and rank 0 alone writes. `wgrad.deferred` is used on CUDA in single-process runs only.

CPU defaults are small (16 train + 4 free-text prompts, 8 eval prompts, 32 new tokens, 20 steps): the bare
`cdm-fast lora-distill` finishes on 2 cores in well under an hour (docs/experiments.md has the measured
run); the issue's full setting is `--num-prompts 256 --num-free-text 64 --max-steps 300` on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cdm_fast import cdm, freetext, logic, models
from cdm_fast.distill import distributed
from cdm_fast.distill.distributed import SINGLE_PROCESS, Context

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"
RUNS = ("distill", "control")


@dataclass
class LoraDistillConfig:
    model: str = models.EMBEDDED_NAME
    out: str = "runs/lora-distill"
    load_in_4bit: str | None = None  # "nf4" | "fp4": QLoRA over a bitsandbytes 4-bit base (models.load)
    device_map: str | None = None  # "auto": a model larger than one GPU over all visible ones (one process)
    num_prompts: int = 16  # train-split prompts to collect from (issue default 256; 16 keeps CPU runs short)
    num_free_text: int = 4  # free-text prompts collected beside the logic ones
    num_eval_prompts: int = 8
    num_shallow_prompts: int = 2  # eval problems per task outside the mix (shallow-skill accuracy)
    perplexity_max_length: int = 256  # tokens per held-out free-text passage
    max_new_tokens: int = 32
    threshold: float = cdm.DEFAULT_THRESHOLD
    top_fraction: float | None = None
    min_examples: int = 8
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_steps: int = 20  # CPU-sized; on a GPU use hundreds
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0  # 0: 10% of max_steps (at least 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024
    seed: int = 0
    noise_samples: int = 4
    score_batch_size: int = 8
    control: bool = True
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False
    n_bootstrap: int = 1000
    progress: bool = True
    # Test hook: stop (as on Ctrl-C) after this many optimizer steps of a run; None in real use.
    interrupt_after: int | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------- config


def validate(config: LoraDistillConfig) -> None:
    """ValueError naming the field, the expected and the received value; before anything is loaded/written."""

    def positive(name: str) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")

    for name in (
        "num_prompts",
        "num_eval_prompts",
        "max_new_tokens",
        "rank",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "noise_samples",
        "score_batch_size",
        "checkpoint_every",
        "n_bootstrap",
    ):
        positive(name)
    positive("perplexity_max_length")
    for name in ("min_examples", "num_free_text", "num_shallow_prompts"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    available = freetext.num_prompts("train")
    if config.num_free_text > available:
        raise ValueError(
            f"num_free_text: expected at most {available} (the free-text train prompts), "
            f"got {config.num_free_text}"
        )
    if not isinstance(config.threshold, (int, float)) or not 0.0 <= config.threshold <= 100.0:
        raise ValueError(f"threshold: expected a number in [0, 100], got {config.threshold!r}")
    if config.top_fraction is not None and not 0.0 < config.top_fraction <= 1.0:
        raise ValueError(f"top_fraction: expected a number in (0, 1] or None, got {config.top_fraction!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), got {config.dropout!r}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ValueError(f"lr: expected a finite number > 0, got {config.lr!r}")
    if not config.alpha > 0:
        raise ValueError(f"alpha: expected a number > 0, got {config.alpha!r}")
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {config.warmup_steps!r}")
    if isinstance(config.target_modules, str) or not config.target_modules:
        raise ValueError(f"target_modules: expected a non-empty list of names, got {config.target_modules!r}")
    if config.resume and config.overwrite:
        raise ValueError("resume, overwrite: expected at most one of them, got both")
    if config.load_in_4bit is not None and config.load_in_4bit not in models.QUANT_TYPES:
        raise ValueError(
            f"load_in_4bit: expected one of {models.QUANT_TYPES} or None, got {config.load_in_4bit!r}"
        )


def check_targets(model: torch.nn.Module, target_modules) -> None:
    """ValueError listing the target names no Linear of `model` ends with."""
    linear_names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    unknown = [name for name in target_modules if name not in linear_names]
    if unknown:
        raise ValueError(
            f"target_modules: {unknown} match no Linear of {type(model).__name__}; "
            f"expected names among {sorted(linear_names)}"
        )


def warmup_steps(config: LoraDistillConfig) -> int:
    return config.warmup_steps or max(1, config.max_steps // 10)


# ---------------------------------------------------------------------------------------------- collect


def problems_for(split: str, n: int, seed: int) -> list[logic.Problem]:
    """The first `n` problems of `split` of the default logic mix, interleaved across tasks."""
    per_task = math.ceil(n / len(logic.DEFAULT_TASKS))
    problems = logic.generate(per_task, seed=seed, split=split)
    by_task = [problems[i * per_task : (i + 1) * per_task] for i in range(len(logic.DEFAULT_TASKS))]
    return [task[i] for i in range(per_task) for task in by_task][:n]


@dataclass(frozen=True)
class EvalSet:
    """What each evaluation (before, distill, control) measures on, built once per run."""

    problems: list[logic.Problem]  # eval-split problems of the training mix: CDM, deep rate, accuracy
    outside_mix: list[logic.Problem]  # eval-split problems of logic.OUTSIDE_MIX_TASKS: shallow accuracy
    passages: list[str]  # held-out free-text passages: shallow perplexity

    @classmethod
    def of(cls, config: LoraDistillConfig) -> EvalSet:
        outside_mix = []
        if config.num_shallow_prompts:
            outside_mix = logic.generate(
                config.num_shallow_prompts, seed=config.seed, tasks=logic.OUTSIDE_MIX_TASKS, split="eval"
            )
        return cls(
            problems=problems_for("eval", config.num_eval_prompts, config.seed),
            outside_mix=outside_mix,
            passages=freetext.passages("eval"),
        )


def score_prompts(
    model, tokenizer, prompts: list[str], config: LoraDistillConfig, context: Context = SINGLE_PROCESS
) -> list[cdm.CDMResult]:
    """`cdm.score` in prompt order; batched by length (less padding; CDM does not depend on the batch),
    the prompts sharded over the ranks."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = distributed.map_sharded(
        lambda mine: cdm.score(
            model,
            tokenizer,
            [prompts[i] for i in mine],
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            noise_samples=config.noise_samples,
            batch_size=config.score_batch_size,
            progress=config.progress and context.is_main,
        ),
        order,
        context,
    )
    by_prompt = [None] * len(prompts)
    for position, index in enumerate(order):
        by_prompt[index] = results[position]
    return by_prompt


def select(records: list[dict], threshold: float, top_fraction: float | None) -> tuple[list[dict], float]:
    """The records kept for training and the CDM cut used (`top_fraction` overrides `threshold`)."""
    if top_fraction is not None:
        keep = max(1, round(top_fraction * len(records))) if records else 0
        ranked = sorted(records, key=lambda r: -r["cdm"])[:keep]
        kept_ids = {id(r) for r in ranked}
        cut = min((r["cdm"] for r in ranked), default=float("nan"))
        return [r for r in records if id(r) in kept_ids], cut
    return [r for r in records if r["cdm"] >= threshold], float(threshold)


def describe(records: list[dict], kept: list[dict], cut: float, min_examples: int) -> str:
    values = np.array([r["cdm"] for r in records], dtype=np.float64)
    quantiles = "  ".join(f"q{q:g}={np.quantile(values, q):.1f}" for q in (0.1, 0.25, 0.5, 0.75, 0.9))
    text = (
        f"collected {len(records)} completions: CDM mean {values.mean():.2f}, min {values.min():.1f}, "
        f"max {values.max():.1f}, {quantiles}\nkept {len(kept)} with CDM >= {cut:.2f}"
    )
    if 0 < len(kept) < min_examples:
        warnings.warn(
            f"only {len(kept)} examples have CDM >= {cut:.2f} (min_examples={min_examples}; "
            f"CDM median {np.median(values):.1f}, max {values.max():.1f}): lower --threshold or use "
            f"--top-fraction",
            stacklevel=2,
        )
    return text


def _record(result: cdm.CDMResult, **fields) -> dict:
    """One dataset.jsonl row: prompt, completion, CDM (with the definition it was scored by) and its parts,
    plus `fields`."""
    parts = {
        "entropy_collapse": result.entropy_collapse,
        "attention_sparsity": result.attention_sparsity,
        "basin_resistance": result.basin_resistance,
    }
    return {
        "prompt": result.prompt,
        "completion": result.completion,
        "cdm": result.cdm,
        "definition": result.params["definition"],
        "parts": parts,
        **fields,
    }


def collect(
    model, tokenizer, config: LoraDistillConfig, context: Context = SINGLE_PROCESS
) -> tuple[list[dict], list[dict], float]:
    """All scored train-split records (logic, then free text), those kept, and the CDM cut. Writes nothing."""
    problems = problems_for("train", config.num_prompts, config.seed)
    free_prompts = freetext.prompts("train", config.num_free_text)
    results = score_prompts(model, tokenizer, [p.prompt() for p in problems] + free_prompts, config, context)
    logic_results, free_results = results[: len(problems)], results[len(problems) :]
    records = [
        _record(r, kind="logic", task=p.task, index=p.index, correct=logic.check(p, r.completion) == 1.0)
        for p, r in zip(problems, logic_results, strict=True)
    ] + [
        _record(r, kind="free_text", task="free_text", index=index, correct=None)
        for index, r in enumerate(free_results)
    ]
    kept, cut = select(records, config.threshold, config.top_fraction)
    text = describe(records, kept, cut, config.min_examples)
    if context.is_main:
        print(text)
    if not kept:
        values = [r["cdm"] for r in records]
        raise ValueError(
            f"threshold: no completion kept (CDM >= {cut:.2f}); the {len(records)} collected have CDM "
            f"{min(values):.1f}..{max(values):.1f} (median {np.median(values):.1f}); lower --threshold or "
            f"use --top-fraction. Nothing was written."
        )
    return records, kept, cut


def control_examples(records: list[dict], n: int, seed: int) -> list[dict]:
    """`n` records drawn at random (seeded, without replacement) from all collected, ignoring CDM."""
    order = np.random.default_rng(seed + 1).permutation(len(records))[:n]
    return [records[i] for i in sorted(order)]


# ------------------------------------------------------------------------------------------------ train


def encode_example(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt as `cdm.score` tokenizes it, then the completion; prompt labels -100.

    When longer than `max_length`, the prompt is cut from the left (the completion is kept whole).
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    completion_ids = completion_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def completion_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of the next-token cross-entropy over the completion tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


def example_order(n: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def micro_batch(examples: list, position: int, size: int, seed: int) -> list:
    """`size` examples starting at global data position `position` (epochs reshuffled by seed)."""
    out = []
    for p in range(position, position + size):
        epoch, offset = divmod(p, len(examples))
        out.append(examples[example_order(len(examples), seed, epoch)[offset]])
    return out


def lora_model(model, config: LoraDistillConfig):
    from peft import LoraConfig, get_peft_model

    check_targets(model, config.target_modules)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_optimizer(model, config: LoraDistillConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm, total = warmup_steps(config), config.max_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, position: int) -> None:
    """Adapter weights, optimizer, scheduler, RNG states, step and data position; atomic (tmp + replace)."""
    from peft import get_peft_model_state_dict

    state = {
        "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "step": step,
        "position": position,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, int]:
    from peft import set_peft_model_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    set_peft_model_state_dict(model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["position"]


class Metrics:
    """metrics.jsonl: one JSON object a line, flushed as written (by rank 0 only: `enabled`)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as lines:
            lines.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]

    def keep(self, predicate) -> None:
        if not self.enabled:
            return
        records = [r for r in self.read() if predicate(r)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model,
    tokenizer,
    records: list[dict],
    config: LoraDistillConfig,
    out: Path,
    name: str,
    metrics,
    context: Context = SINGLE_PROCESS,
):
    """Train a fresh LoRA on `records` in place of `model`'s adapters; returns the PeftModel (patched).

    A step takes batch_size × grad_accum × world_size examples from the global data position: micro-batch
    i of rank r starts at position + (i · world_size + r) · batch_size, so the examples a step sees do not
    depend on how they are spread over processes.
    """
    from cdm_fast.patch import patch_peft

    torch.manual_seed(config.seed)
    peft_model = lora_model(model, config)
    report = patch_peft(peft_model)
    if context.is_main:
        print(report)
    device = next(peft_model.parameters()).device
    trained = peft_model
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            peft_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_example(tokenizer, r["prompt"], r["completion"], config.max_length) for r in records]
    optimizer, scheduler = make_optimizer(peft_model, config)
    step, position = 0, 0
    checkpoint = out / f"checkpoint_{name}" / CHECKPOINT
    if config.resume and checkpoint.exists():
        step, position = load_checkpoint(checkpoint, peft_model, optimizer, scheduler)
        if context.is_main:
            print(f"{name}: resumed at step {step} (data position {position}) from {checkpoint}")
    per_step = config.batch_size * config.grad_accum * context.world_size
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.train()
    bar = tqdm(
        total=config.max_steps,
        initial=step,
        desc=f"train {name}",
        unit="step",
        disable=not (config.progress and context.is_main),
    )

    def save() -> None:
        if context.is_main:
            save_checkpoint(checkpoint, peft_model, optimizer, scheduler, step, position)

    try:
        while step < config.max_steps:
            if config.interrupt_after is not None and step >= config.interrupt_after:
                raise KeyboardInterrupt
            start = time.perf_counter()
            batches = [
                collate(
                    micro_batch(
                        examples,
                        position + (i * context.world_size + context.rank) * config.batch_size,
                        config.batch_size,
                        config.seed,
                    ),
                    pad_id,
                )
                for i in range(config.grad_accum)
            ]
            # Every rank divides by the global completion-token count; DDP's gradient mean over the ranks is
            # undone by the world_size factor, so the gradient is that of the whole step's token mean.
            n_tokens = distributed.all_sum(
                sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), context
            )
            total = 0.0
            with distributed.deferred_weight_grads(context, device):
                for i, batch in enumerate(batches):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    last = i == len(batches) - 1
                    sync = contextlib.nullcontext() if last or not context.distributed else trained.no_sync()
                    with sync:
                        with _autocast(device):
                            loss_sum, _ = completion_loss_sum(trained, batch)
                        (loss_sum * context.world_size / max(1, n_tokens)).backward()
                    total += float(loss_sum.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += per_step
            loss = distributed.all_sum(total, context) / max(1, n_tokens)
            all_tokens = distributed.all_sum(sum(int(b["attention_mask"].sum()) for b in batches), context)
            elapsed = time.perf_counter() - start
            metrics.write(
                event="train",
                run=name,
                step=step,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                completion_tokens=n_tokens,
                tokens_per_s=all_tokens / elapsed,
                seconds=elapsed,
                world_size=context.world_size,
            )
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{all_tokens / elapsed:.0f}")
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save()
    except KeyboardInterrupt:
        save()
        if context.is_main:
            print(f"\ninterrupted: {name} checkpoint at step {step} in {checkpoint}; continue with --resume")
        raise
    finally:
        bar.close()
    peft_model.eval()
    return peft_model


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model,
    tokenizer,
    eval_set: EvalSet,
    config: LoraDistillConfig,
    name: str,
    metrics,
    context: Context = SINGLE_PROCESS,
):
    """CDM, parts, deep flag and logic correctness per eval prompt, written to metrics as one record, then
    the shallow-skill record (`evaluate_shallow`)."""
    problems = eval_set.problems
    results = score_prompts(model, tokenizer, [p.prompt() for p in problems], config, context)
    summary = cdm.summarize(
        results, threshold=config.threshold, n_bootstrap=config.n_bootstrap, seed=config.seed
    )
    correct = [float(logic.check(p, r.completion) == 1.0) for p, r in zip(problems, results, strict=True)]
    metrics.write(
        event="eval",
        run=name,
        summary=summary,
        accuracy=float(np.mean(correct)),
        cdm=[r.cdm for r in results],
        deep=[float(r.cdm >= config.threshold) for r in results],
        correct=correct,
        completions=[r.completion for r in results],
    )
    shallow = evaluate_shallow(model, tokenizer, eval_set, config, name, metrics, context)
    if context.is_main:
        print(
            f"eval {name}: CDM {summary['cdm_mean']:.2f}, deep rate {summary['deep_rate']:.3f}, "
            f"accuracy {np.mean(correct):.3f} (n={len(results)}); free-text perplexity "
            f"{shallow['perplexity']:.2f}, outside-mix accuracy {shallow['accuracy']:.3f}"
        )
    return results


def evaluate_shallow(
    model, tokenizer, eval_set: EvalSet, config: LoraDistillConfig, name: str, metrics, context: Context
) -> dict:
    """Perplexity on the held-out free-text passages and greedy accuracy on the tasks outside the mix."""
    free = freetext.perplexity(
        model,
        tokenizer,
        eval_set.passages,
        max_length=config.perplexity_max_length,
        map_texts=lambda f, texts: distributed.map_sharded(f, texts, context),
    )
    problems = eval_set.outside_mix
    solved = logic.evaluate(
        model,
        tokenizer,
        problems,
        batch_size=config.score_batch_size,
        max_new_tokens=config.max_new_tokens,
        progress=False,
        map_problems=lambda f, shard: distributed.map_sharded(f, shard, context),
    )
    correct = [float(r["score"] == 1.0) for r in solved["results"]]
    record = {
        "perplexity": free["perplexity"],
        "nll": free["nll"],
        "nll_per_passage": free["nll_per_text"],
        "tokens": free["tokens"],
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "tasks": [p.task for p in problems],
        "correct": correct,
    }
    metrics.write(event="shallow", run=name, **record)
    return record


def bootstrap_diff(a: list[float], b: list[float], n_bootstrap: int, seed: int) -> dict:
    """Mean of the paired differences b - a over prompts and its 95% bootstrap interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_bootstrap, diff.size))].mean(1)
    return {
        "mean": float(diff.mean()),
        "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
    }


# ----------------------------------------------------------------------------------------------- report


def build_report(out: Path, config: LoraDistillConfig, extra: dict) -> dict:
    """report.json and report.md from metrics.jsonl (plus run facts in `extra`)."""
    import peft
    import transformers

    records = Metrics(out / "metrics.jsonl").read()
    evals = {r["run"]: r for r in records if r["event"] == "eval"}
    shallow = {r["run"]: r for r in records if r["event"] == "shallow"}
    collected = next(r for r in records if r["event"] == "collect")
    losses = {name: [r for r in records if r["event"] == "train" and r["run"] == name] for name in RUNS}
    runs = {}
    for name, record in evals.items():
        runs[name] = {
            "cdm_mean": record["summary"]["cdm_mean"],
            "cdm_mean_ci95": record["summary"]["cdm_mean_ci95"],
            "entropy_collapse_mean": record["summary"]["entropy_collapse_mean"],
            "attention_sparsity_mean": record["summary"]["attention_sparsity_mean"],
            "basin_resistance_mean": record["summary"]["basin_resistance_mean"],
            "deep_rate": record["summary"]["deep_rate"],
            "accuracy": record["accuracy"],
        }
        if name in shallow:
            runs[name]["free_text_perplexity"] = shallow[name]["perplexity"]
            runs[name]["outside_mix_accuracy"] = shallow[name]["accuracy"]
    differences = {}
    pairs = [("before", "distill"), ("before", "control"), ("control", "distill")]
    for a, b in pairs:
        if a in evals and b in evals:
            differences[f"{b} - {a}"] = {
                key: bootstrap_diff(evals[a][key], evals[b][key], config.n_bootstrap, config.seed)
                for key in ("cdm", "deep", "correct")
            }
            if a in shallow and b in shallow:
                for key, field_name in (
                    ("nll_per_passage", "free_text_nll"),
                    ("correct", "outside_mix_correct"),
                ):
                    if shallow[a][key]:
                        differences[f"{b} - {a}"][field_name] = bootstrap_diff(
                            shallow[a][key], shallow[b][key], config.n_bootstrap, config.seed
                        )
    report = {
        "config": asdict(config),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "collect": {k: v for k, v in collected.items() if k != "event"},
        "eval": runs,
        "differences": differences,
        "final_loss": {name: rows[-1]["loss"] for name, rows in losses.items() if rows},
        "shallow": {
            "free_text": f"{len(freetext.passages('eval'))} held-out passages of "
            f"{freetext.source_path().name} (reasoning-gym package data), "
            f"at most {config.perplexity_max_length} tokens each",
            "outside_mix_tasks": list(logic.OUTSIDE_MIX_TASKS),
        },
        "eval_prompt_format": "fewshot",
        "answer_extraction": "cdm_fast.logic.check on the CDM-scored completion",
        **extra,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out / "report.md").write_text(format_markdown(report), encoding="utf-8")
    return report


def format_markdown(report: dict) -> str:
    config, runs, diffs = report["config"], report["eval"], report["differences"]
    before = runs["before"]

    def arrow(name: str, key: str, fmt: str) -> str:
        return f"{format(before[key], fmt)} → {format(runs[name][key], fmt)}" if name in runs else "—"

    def delta(name: str, key: str) -> str:
        d = diffs.get(f"{name} - before", {}).get(key)
        return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "—"

    lines = [
        "# lora-distill report",
        "",
        f"Evaluated on {report['collect']['num_eval_prompts']} held-out eval-split logic prompts "
        "(fewshot format); "
        f"differences are paired means with 95% bootstrap intervals over prompts ({config['n_bootstrap']} "
        "resamples). Accuracy: the CDM-scored greedy completion checked by the task's verifier.",
        "",
        "| run | model | dataset size | rank | steps | CDM before → after | Δ CDM [95% CI] "
        "| deep rate before → after | Δ deep [95% CI] | accuracy before → after | Δ accuracy [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("distill", "CDM-filtered"), ("control", "control (random)")):
        if name not in runs:
            continue
        lines.append(
            f"| {label} | {config['model']} | {report['collect']['kept']} | {config['rank']} "
            f"| {config['max_steps']} "
            f"| {arrow(name, 'cdm_mean', '.2f')} | {delta(name, 'cdm')} | {arrow(name, 'deep_rate', '.3f')} "
            f"| {delta(name, 'deep')} | {arrow(name, 'accuracy', '.3f')} | {delta(name, 'correct')} |"
        )
    if "distill - control" in diffs:
        d = diffs["distill - control"]
        lines += [
            "",
            "Filtered minus control: "
            + ", ".join(
                f"{key} {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for key, v in d.items()
            ),
        ]
    if "free_text_perplexity" in before:
        lines += [
            "",
            "Shallow skills (the seed claims the adapter preserves or improves them): perplexity on "
            f"{report['shallow']['free_text']}; greedy accuracy on eval-split problems of "
            f"{', '.join(report['shallow']['outside_mix_tasks'])} (outside the training mix).",
            "",
            "| run | free-text perplexity before → after | Δ NLL/token [95% CI] "
            "| outside-mix accuracy before → after | Δ accuracy [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("distill", "CDM-filtered"), ("control", "control (random)")):
            if name in runs:
                lines.append(
                    f"| {label} | {arrow(name, 'free_text_perplexity', '.2f')} "
                    f"| {delta(name, 'free_text_nll')} "
                    f"| {arrow(name, 'outside_mix_accuracy', '.3f')} | {delta(name, 'outside_mix_correct')} |"
                )
    c = report["collect"]
    lines += [
        "",
        f"Collected {c['n']} train-split completions ({c.get('n_free_text', 0)} of them free text), CDM mean "
        f"{c['cdm_mean']:.2f}; kept {c['kept']} with CDM ≥ {c['cut']:.2f}. "
        f"Wall time {report['wall_time_s']:.0f} s on {report['device']} × {report.get('world_size', 1)} "
        "process(es). One seed: run several with different --seed values to see the seed-to-seed spread.",
        "",
    ]
    return "\n".join(lines)


def plot(out: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = Metrics(out / "metrics.jsonl").read()
    evals = {r["run"]: r["cdm"] for r in records if r["event"] == "eval"}
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in evals.items():
        axis.hist(values, bins=20, range=(0, 100), alpha=0.5, label=f"{name} (mean {np.mean(values):.1f})")
    axis.axvline(threshold, color="tab:red", linestyle="--", label=f"deep ≥ {threshold:g}")
    axis.set_xlabel("CDM on held-out prompts")
    axis.set_ylabel("prompts")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "cdm_hist.png", dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in RUNS:
        rows = [r for r in records if r["event"] == "train" and r["run"] == name]
        if rows:
            axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("completion-token loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------- run


def prepare_out(config: LoraDistillConfig) -> Path:
    """Refuse an existing run directory unless --overwrite or --resume. Writes nothing."""
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not (config.overwrite or config.resume):
        raise FileExistsError(f"out: {out} exists and is not empty; pass --overwrite or --resume")
    if config.resume and not (out / "dataset.jsonl").exists():
        raise FileNotFoundError(f"resume: {out / 'dataset.jsonl'} not found; nothing to resume")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _peak_rss() -> int | None:
    """Peak resident memory of this process (Linux/macOS), or None where `resource` is missing."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def _unwrap(peft_model):
    """The base model with the LoRA layers removed (not merged)."""
    from cdm_fast.patch import unpatch

    unpatch(peft_model)
    return peft_model.unload()


def run(config: LoraDistillConfig, model=None, tokenizer=None) -> dict:
    """The whole loop; returns the report (on every rank).

    `model`/`tokenizer` (optional, for tests and notebooks) replace `models.load(config.model)`. Under
    torchrun (WORLD_SIZE > 1) the process group is joined here and left at the end.
    """
    validate(config)
    out = prepare_out(config)
    started = time.perf_counter()
    joined = distributed.launched() and not torch.distributed.is_initialized()
    context = distributed.setup(None if model is None else next(model.parameters()).device)
    try:
        return _run(config, out, started, context, model, tokenizer)
    finally:
        if joined:
            distributed.shutdown()


def _run(config: LoraDistillConfig, out: Path, started: float, context: Context, model, tokenizer) -> dict:
    if model is None:
        quantization = None
        if config.load_in_4bit is not None:
            # bf16 compute on CUDA as QLoRA does (the loop autocasts to bf16 there); load dtype on the CPU.
            compute = torch.bfloat16 if context.device.type == "cuda" else None
            quantization = models.Quantization4bit(config.load_in_4bit, compute_dtype=compute)
        distributed.check_device_map(config.device_map, context)
        model, tokenizer = models.load(
            config.model, device=context.device, load_in_4bit=quantization, device_map=config.device_map
        )
    check_targets(model, config.target_modules)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics = Metrics(out / "metrics.jsonl", enabled=context.is_main)
    if config.resume:
        rows = [json.loads(line) for line in (out / "dataset.jsonl").read_text(encoding="utf-8").splitlines()]
        records = rows
        steps = {}
        for name in RUNS:
            ckpt = out / f"checkpoint_{name}" / CHECKPOINT
            steps[name] = torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else 0
        distributed.barrier(context)  # every rank has read the steps before rank 0 rewrites metrics
        metrics.keep(
            lambda r: r["event"] == "collect" or (r["event"] == "train" and r["step"] <= steps[r["run"]])
        )
        if context.is_main:
            print(f"resuming {out}: {sum(r['kept'] for r in rows)} kept examples, checkpoints at {steps}")
    else:
        records, kept, cut = collect(model, tokenizer, config, context)
        kept_ids = {id(r) for r in kept}
        for r in records:
            r["kept"] = id(r) in kept_ids
        if context.is_main:
            if out.exists() and config.overwrite:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            _write_jsonl(out / "dataset.jsonl", records)
        values = [r["cdm"] for r in records]
        metrics.write(
            event="collect",
            n=len(records),
            n_free_text=sum(r["kind"] == "free_text" for r in records),
            kept=len(kept),
            cut=cut,
            cdm_mean=float(np.mean(values)),
            cdm=values,
            num_eval_prompts=config.num_eval_prompts,
        )
    if context.is_main:
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    kept = [r for r in records if r["kept"]]
    eval_set = EvalSet.of(config)
    evaluate(model, tokenizer, eval_set, config, "before", metrics, context)

    peft_model = train(model, tokenizer, kept, config, out, "distill", metrics, context)
    evaluate(peft_model, tokenizer, eval_set, config, "distill", metrics, context)
    if context.is_main:
        _save_adapter(peft_model, out / "adapter")
    model = _unwrap(peft_model)
    if config.control:
        random_records = control_examples(records, len(kept), config.seed)
        if context.is_main:
            _write_jsonl(out / "control_dataset.jsonl", random_records)
        control = train(model, tokenizer, random_records, config, out, "control", metrics, context)
        evaluate(control, tokenizer, eval_set, config, "control", metrics, context)
        if context.is_main:
            _save_adapter(control, out / "control_adapter")
        model = _unwrap(control)

    extra = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "world_size": context.world_size,
        "quantization": asdict(q) if (q := models.Quantization4bit.of(model)) is not None else None,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_rss_bytes": _peak_rss(),
    }
    report = None
    if context.is_main:
        report = build_report(out, config, extra)
        plot(out, config.threshold)
        print((out / "report.md").read_text(encoding="utf-8"))
        print(
            f"wrote {out}/: adapter/, dataset.jsonl, config.json, metrics.jsonl, report.json, report.md, "
            "cdm_hist.png, loss.png"
        )
    return distributed.broadcast(report, context)


def _save_adapter(peft_model, path: Path) -> None:
    """A standard peft adapter folder, replaced atomically (written beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- seeds


def run_seeds(config: LoraDistillConfig, seeds: Sequence[int], model=None, tokenizer=None) -> dict:
    """`run` once per seed (collection noise, LoRA init, data order and control draw all follow the seed) into
    <out>/seed-<s>/, then <out>/seeds.json and seeds.md: every before/after/control difference per seed, with
    its mean and sample standard deviation over the seeds — the seed-to-seed spread the per-run bootstrap
    intervals (over prompts) do not show. `config.seed` is ignored. With `config.resume`, finished seeds are
    read back, an interrupted one continues from its checkpoint and the rest start fresh.
    """
    seeds = list(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds: expected at least two distinct ints, got {seeds!r}")
    validate(config)
    out = Path(config.out)
    if not config.resume:  # a resumed run checks each seed's folder itself
        prepare_out(config)
    joined = distributed.launched() and not torch.distributed.is_initialized()
    context = distributed.setup(None if model is None else next(model.parameters()).device)
    try:
        reports = {}
        for seed in seeds:
            seed_out = out / f"seed-{seed}"
            if config.resume and (seed_out / "report.json").exists():  # finished before the interruption
                reports[seed] = json.loads((seed_out / "report.json").read_text(encoding="utf-8"))
                continue
            resume = config.resume and (seed_out / "dataset.jsonl").exists()
            reports[seed] = run(
                replace(config, seed=seed, out=str(seed_out), resume=resume), model, tokenizer
            )
        summary = summarize_seeds(reports)
        if context.is_main:
            (out / "seeds.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            (out / "seeds.md").write_text(format_seeds_markdown(summary), encoding="utf-8")
            print((out / "seeds.md").read_text(encoding="utf-8"))
        return summary
    finally:
        if joined:
            distributed.shutdown()


def summarize_seeds(reports: dict[int, dict]) -> dict:
    """{comparison: {metric: {"per_seed": {seed: mean difference}, "mean", "std"}}} over the seeds."""
    summary: dict = {"seeds": list(reports), "differences": {}}
    for seed, report in reports.items():
        for comparison, metrics_ in report["differences"].items():
            for metric, value in metrics_.items():
                entry = summary["differences"].setdefault(comparison, {}).setdefault(metric, {"per_seed": {}})
                entry["per_seed"][str(seed)] = value["mean"]
    for metrics_ in summary["differences"].values():
        for entry in metrics_.values():
            values = np.array(list(entry["per_seed"].values()), dtype=np.float64)
            entry["mean"] = float(values.mean())
            entry["std"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return summary


def format_seeds_markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = [
        f"# lora-distill over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "Each cell: the mean over seeds of the per-run paired difference ± its sample standard deviation "
        "over seeds; per-run reports (with bootstrap intervals over prompts) are in seed-<s>/report.md.",
        "",
        "| comparison | " + " | ".join(SEED_METRICS.values()) + " |",
        "|---|" + "---|" * len(SEED_METRICS),
    ]
    for comparison, metrics_ in summary["differences"].items():
        cells = [
            f"{metrics_[key]['mean']:+.3f} ± {metrics_[key]['std']:.3f}" if key in metrics_ else "—"
            for key in SEED_METRICS
        ]
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SEED_METRICS = {
    "cdm": "Δ CDM",
    "deep": "Δ deep rate",
    "correct": "Δ accuracy",
    "free_text_nll": "Δ free-text NLL/token",
    "outside_mix_correct": "Δ outside-mix accuracy",
}
