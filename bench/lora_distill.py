"""LoRA-distill training step bench: `python -m bench.lora_distill [--smoke] [--check-targets] [--out P]`.

Training tokens/s of one optimizer step of `cdm-fast lora-distill`'s train loop (issue 13), built from the
loop's own pieces in `cdm_fast.distill.lora`: `lora_model` (peft LoRA, the loop's default rank, alpha and
target modules q, k, v, o, gate, up, down), `collate`, `completion_loss_sum` and `make_optimizer` (AdamW
and its schedule). One step is what the loop does per optimizer step without gradient accumulation:
forward and backward of the completion loss (divided by its token count) under bf16 autocast on CUDA,
gradient clipping, AdamW step, scheduler step, zero_grad.

The model is a `LlamaForCausalLM` built from a config with RANDOM WEIGHTS (the embedded model does not
travel to the GPU machine; every row says "random weights"). Shapes: a SmolLM2-135M-like config and, on
CUDA, a 1B-class config (vocabulary 49152 in both), at the sequence lengths in CASES, batch 4, every token
non-pad, labels on the second half of each sequence only (the prompt half is -100, as `encode_example`
labels a prompt). The frozen base is bf16 on CUDA (fp32 on the CPU); peft keeps the adapters in fp32;
attention is SDPA in every peer (the loop's `models.load` defaults to eager, which CDM scoring needs).

Peers (functions in PEERS, timed in one process on the same model, data and seed; each gets a fresh
model built from the same seed):
  peft             plain peft LoRA, the baseline
  peft+compile     torch.compile of the peft model (CUDA only)
  cdm-fused        `cdm_fast.patch.patch_peft` on the peft model
  cdm-fused+wgrad  the same, with `cdm_fast.wgrad.deferred()` around forward and backward (CUDA only; the
                   loop defers on CUDA)
Step time: `bench.common.time_fn` (CUDA: median of per-step CUDA-event times after a warm-up that also
absorbs compilation and autotuning; CPU: median wall time, never a performance claim). tokens/s counts
every non-pad token of the batch (`attention_mask.sum()`, as the loop's tokens_per_s does). Peak memory
(CUDA only): `bench.common.peak_memory` of one step, beyond what was allocated before it (weights,
adapters, optimizer state excluded), and the absolute peak during that step. first_losses: the completion
loss of every peer's first two steps (same weights, data and seed; the second comes after one AdamW update,
peft's lora_B starting at zero makes the first one the base model's): peers computing the same agree.

`--smoke` (and any run on the CPU): a tiny config (hidden 64, 2 layers), 2 timed steps, rows marked smoke.
`--check-targets`: issue 13 sets no numeric target for this bench, only reporting; it passes when every
peer that applies on this device ran (CUDA-only peers are skipped on the CPU, not failed) and fails when
a peer raised.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import common
from cdm_fast import dispatch
from cdm_fast.distill.lora import LoraDistillConfig, collate, completion_loss_sum, lora_model, make_optimizer

NAME = "lora_distill"
WEIGHTS = "random weights"
BASELINE = "peft"
ATTENTION = "sdpa"
SEED = 0
BATCH = 4


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Case:
    model: LlamaShape
    seq_len: int
    batch: int


SMOLLM2_LIKE = LlamaShape("smollm2-135m-like", 576, 30, 9, 3, 1536, 49152)
ONE_B_CLASS = LlamaShape("1b-class", 2048, 16, 32, 8, 8192, 49152)
TINY = LlamaShape("tiny", 64, 2, 4, 2, 128, 256)

CASES = [
    Case(SMOLLM2_LIKE, 512, BATCH),
    Case(SMOLLM2_LIKE, 1024, BATCH),
    Case(ONE_B_CLASS, 512, BATCH),
    Case(ONE_B_CLASS, 1024, BATCH),
]
SMOKE_CASES = [Case(TINY, 16, BATCH), Case(TINY, 32, BATCH)]


class Skip(Exception):
    """A peer that does not apply on this device; the message says why."""


@dataclass
class Trainee:
    """What a step calls (`forward_model`: the peft model, or its compiled wrapper) and around what."""

    forward_model: nn.Module
    deferral: Callable[[], contextlib.AbstractContextManager]
    note: str = ""


def build_peft_model(case: Case, config: LoraDistillConfig, device: torch.device) -> nn.Module:
    """LlamaForCausalLM with random weights (seeded) on `device`, wrapped by the loop's `lora_model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = case.model
    llama_config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max(2048, case.seq_len),
        tie_word_embeddings=True,
        attn_implementation=ATTENTION,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config).to(base_dtype(device))
    peft_model = lora_model(model, config)
    peft_model.train()
    return peft_model


def base_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_batch(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """`collate` of `batch` random sequences of `seq_len` tokens, labels on the second half only."""
    generator = torch.Generator().manual_seed(SEED)
    prompt_len = case.seq_len // 2
    examples = []
    for _ in range(case.batch):
        ids = torch.randint(0, case.model.vocab, (case.seq_len,), generator=generator).tolist()
        examples.append((ids, [-100] * prompt_len + ids[prompt_len:]))
    return {k: v.to(device) for k, v in collate(examples, pad_id=0).items()}


# ---------------------------------------------------------------- peers


def peft_plain(peft_model: nn.Module, device: torch.device) -> Trainee:
    return Trainee(peft_model, contextlib.nullcontext, note="peft LoRA, default forward")


def peft_compiled(peft_model: nn.Module, device: torch.device) -> Trainee:
    if device.type != "cuda":
        raise Skip("torch.compile is timed on CUDA only (compiling takes minutes on the CPU)")
    torch._dynamo.reset()  # each case compiles a new model; old graphs would count toward the recompile limit
    return Trainee(
        torch.compile(peft_model, dynamic=False), contextlib.nullcontext, note="torch.compile(model)"
    )


def cdm_fused(peft_model: nn.Module, device: torch.device) -> Trainee:
    from cdm_fast.patch import patch_peft

    report = patch_peft(peft_model)
    note = f"patch_peft: {len(report.patched)} patched, {len(report.skipped)} skipped"
    return Trainee(peft_model, contextlib.nullcontext, note=note)


def cdm_fused_wgrad(peft_model: nn.Module, device: torch.device) -> Trainee:
    if device.type != "cuda":
        raise Skip("wgrad deferral overlaps CUDA streams; CUDA only (the loop defers on CUDA only)")
    from cdm_fast import wgrad

    trainee = cdm_fused(peft_model, device)
    return Trainee(peft_model, wgrad.deferred, note=trainee.note + ", wgrad.deferred()")


PEERS: dict[str, Callable[[nn.Module, torch.device], Trainee]] = {
    BASELINE: peft_plain,
    "peft+compile": peft_compiled,
    "cdm-fused": cdm_fused,
    "cdm-fused+wgrad": cdm_fused_wgrad,
}


# ---------------------------------------------------------------- one step


def make_step(
    trainee: Trainee, peft_model: nn.Module, config: LoraDistillConfig, device: torch.device
) -> tuple[Callable[[dict[str, torch.Tensor]], None], list[torch.Tensor]]:
    """(step, losses): one optimizer step as the loop takes it, and every step's loss (0-d, no sync)."""
    optimizer, scheduler = make_optimizer(peft_model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )

    losses = []

    def step(batch: dict[str, torch.Tensor]) -> None:
        with trainee.deferral():
            with autocast():
                loss_sum, completion_tokens = completion_loss_sum(trainee.forward_model, batch)
            loss = loss_sum / max(1, completion_tokens)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step, losses


def run_peer(case: Case, peer: str, config: LoraDistillConfig, device: torch.device, repeats: int) -> dict:
    """The peer's measurements for this case (timing, tokens/s, memory, first loss), or why it did not run."""
    peft_model = build_peft_model(case, config, device)
    batch = make_batch(case, device)
    try:
        trainee = PEERS[peer](peft_model, device)
        step, losses = make_step(trainee, peft_model, config, device)
        timing = common.time_fn(step, [(batch,)], device, repeats=repeats)
        peak = common.peak_memory(step, (batch,), device)
        peak_total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Skip as skip:
        return {"status": "skipped", "note": f"skipped: {skip}"}
    except Exception as error:  # reported in its row and by --check-targets; the other peers still run
        return {"status": "failed", "note": f"failed: {type(error).__name__}: {error}"[:300]}
    tokens = int(batch["attention_mask"].sum())
    return {
        "status": "ran",
        "ms": timing.ms,
        "min_ms": timing.min_ms,
        "timing": timing.method,
        "repeats": timing.repeats,
        "tokens": tokens,
        "completion_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "tokens_per_s": tokens / (timing.ms / 1e3),
        "peak_memory_bytes": peak,
        "peak_total_bytes": peak_total,
        "first_losses": [float(loss) for loss in losses[:2]],
        "note": trainee.note,
    }


def run_case(
    case: Case, config: LoraDistillConfig, device: torch.device, repeats: int, env: dict, smoke: bool
):
    measured = {}
    for peer in PEERS:
        measured[peer] = run_peer(case, peer, config, device, repeats)
        gc.collect()  # the peer's model, optimizer state and graphs, before the next peer builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline_ms = measured[BASELINE].get("ms")
    rows = []
    for peer, result in measured.items():
        ms = result.get("ms")
        rows.append(
            {
                **env,
                "bench": NAME,
                "case": case.model.name,
                "weights": WEIGHTS,
                "shape": {
                    "hidden": case.model.hidden,
                    "layers": case.model.layers,
                    "heads": case.model.heads,
                    "kv_heads": case.model.kv_heads,
                    "intermediate": case.model.intermediate,
                    "vocab": case.model.vocab,
                    "seq_len": case.seq_len,
                    "batch": case.batch,
                    "rank": config.rank,
                    "alpha": config.alpha,
                    "target_modules": list(config.target_modules),
                },
                "seq_len": case.seq_len,
                "peer": peer,
                "base_dtype": str(base_dtype(device)).removeprefix("torch."),
                "autocast": "bf16" if device.type == "cuda" else None,
                "attention": ATTENTION,
                "lora_backend": dispatch.requested_backend(None),
                "ms": ms,
                "min_ms": result.get("min_ms"),
                "timing": result.get("timing"),
                "repeats": result.get("repeats"),
                "tokens": result.get("tokens"),
                "completion_tokens": result.get("completion_tokens"),
                "tokens_per_s": result.get("tokens_per_s"),
                "ratio_vs_peft": baseline_ms / ms if baseline_ms and ms else None,
                "peak_memory_bytes": result.get("peak_memory_bytes"),
                "peak_total_bytes": result.get("peak_total_bytes"),
                "first_losses": result.get("first_losses"),
                "status": result["status"],
                "note": f"{WEIGHTS}; {result['note']}" if result["note"] else WEIGHTS,
                "smoke": smoke,
                "performance_claim": device.type == "cuda" and not smoke and result["status"] == "ran",
            }
        )
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """Failures (empty: pass). Issue 13 asks only for the numbers: every peer not skipped must have run."""
    return [
        f"{r['case']} seq {r['seq_len']} {r['peer']}: {r['note']}" for r in rows if r["status"] == "failed"
    ]


COLUMNS = [
    common.Column("case", "case"),
    common.Column("seq", "seq_len"),
    common.Column("peer", "peer"),
    common.Column("ms", "ms", "{:.2f}"),
    common.Column("tokens/s", "tokens_per_s", "{:.0f}"),
    common.Column("peft/this", "ratio_vs_peft", "{:.3f}"),
    common.Column("peak MiB", "peak_memory_bytes", "{:.0f}"),
    common.Column("loss@2", "second_loss", "{:.5f}"),
    common.Column("note", "note"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_distill", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny config, 2 steps, any device, in seconds")
    parser.add_argument("--check-targets", action="store_true", help="pass when every applicable peer ran")
    parser.add_argument("--out", type=Path, default=common.default_results_path(NAME))
    parser.add_argument("--repeats", type=int, help="timed steps per peer (default 10; smoke or CPU 2)")
    args = parser.parse_args(argv)
    device = common.default_device()
    if device.type != "cuda":
        print(common.NO_GPU_NOTICE)
    smoke = args.smoke or device.type != "cuda"
    repeats = args.repeats or (2 if smoke else 10)
    config = LoraDistillConfig(seed=SEED)
    env = common.environment(device)
    env.update(library_versions())
    rows = []
    for case in SMOKE_CASES if smoke else CASES:
        rows += run_case(case, config, device, repeats, env, smoke)
    print(
        f"LlamaForCausalLM from a config, {WEIGHTS}; one optimizer step of the lora-distill loop per timing"
    )
    print(common.format_table([table_row(r) for r in rows], COLUMNS))
    common.append_jsonl(args.out, rows)
    print(f"{len(rows)} rows appended to {args.out}")
    if args.check_targets:
        failures = check_targets(rows)
        for failure in failures:
            print(f"TARGET MISSED: {failure}")
        print("targets: " + ("FAILED" if failures else "pass (every applicable peer ran; no numeric target)"))
        return 1 if failures else 0
    return 0


def table_row(row: dict) -> dict:
    peak = row["peak_memory_bytes"]
    note = row["note"].removeprefix(WEIGHTS).removeprefix("; ")
    losses = row["first_losses"] or []
    second_loss = losses[1] if len(losses) > 1 else None
    return {
        **row,
        "peak_memory_bytes": peak / 2**20 if peak is not None else None,
        "second_loss": second_loss,
        "note": note,
    }


def library_versions() -> dict[str, str | None]:
    import peft
    import transformers

    return {"peft": peft.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
