"""`latent-distill`: train a student on MSE to projected teacher latents (+ causal-LM loss), from a cache.

    loss = mse_weight · mean_l MSE(student_hidden[map(l)], P_l(teacher_latent[l])) + ce_weight · CE

over non-pad tokens, with one projector P_l per mapped teacher layer:
- "fourier": `FourierProjector(d_teacher, d_student, num_frequencies, sigma_l)`, sigma_l = sigma_scale /
  median row norm of layer l's latents (measured on the first training batch and recorded), so the phases
  x·freqs have a standard deviation of about sigma_scale turns instead of wrapping randomly;
- "linear": a learned `nn.Linear(d_teacher, d_student)` (the TinyBERT / DistillKit baseline) applied to
  x · sqrt(d_teacher) / median row norm (a fixed, recorded input scale giving coordinates of RMS about 1, so
  that its initial outputs, like the Fourier projector's, have about unit scale and the MSE weights compare);
- "none": no latent term, causal-LM loss only (the control).
The three are three runs with the same data, steps and seed.

Caveat, stated rather than hidden: the target side is learned (P_l is trained with the student), so the MSE
alone has a collapsed minimum (P_l → its bias, student hidden → that constant); the CE term and the short
runs keep it away in practice, and the report shows the MSE and CE terms apart.

Student: full fine-tune (default) or, with `student_lora_rank` R > 0, a peft LoRA (rank R, alpha
`student_lora_alpha`, default 2R) on every Linear of the blocks, run through `cdm_fast.patch.patch_peft`
(the fused lora op); the projectors always train in full. `student` may be a pretrained HF folder (its
weights are loaded) or a folder with only a config.json (built from it). Saved: `student/` (the full model,
LoRA merged in, + `projectors.pt`) and, for LoRA, `adapter/` (a standard peft adapter folder).

Student (default): a Llama with d=192, 6 layers, 3 heads, 1 kv head, intermediate 512, the teacher's
vocabulary and special tokens, tied embeddings. Its embedding matrix is initialised from the teacher's by a
fixed random projection E_s = E_t @ R, R (d_t, d_s) ~ N(0, 1/d_t) from a generator seeded with `seed`
(keeps each coordinate's variance), or by truncation E_t[:, :d_s]; the blocks are random (HF init).

Layer map: pairs "t:s" of a cached teacher hidden_states index and a student hidden_states index
(0 = embeddings, s in 1..L_s the output of block s; the last one is normed in HF Llama and is not allowed).
Default: student layers 1..L_s-1 to the cached teacher layers, evenly spaced.

Data: the cache's sequences in cache order, `batch_size` sequences (the global batch) per optimizer step;
the last `heldout_sequences` are held out. Evaluation (after training): perplexity on those held-out cache
sequences, perplexity on `cdm_fast.freetext.passages("eval")` (free text never in any cache: the default
cache's free text is generated from the "train" passages), and logic-suite accuracy per task (split "eval").

Scale-out: under `torchrun --nproc-per-node N` (`cdm_fast.distill.distributed`) every rank reads the same
global batch and takes its own contiguous slice of its rows; student + projectors train as one module under
DistributedDataParallel. Each rank's loss is its sum over its tokens divided by the global batch's token
counts (times N, which DDP's gradient averaging undoes), so one step equals the single-process step on the
same global batch up to floating-point summation order. Rank 0 alone writes config, metrics, checkpoints,
the student and the report, and evaluates while the others wait.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cdm_fast.distill import distributed
from cdm_fast.distill import latents as cache
from cdm_fast.distill.distributed import SINGLE_PROCESS, Context
from cdm_fast.nn.projector import FourierProjector

PROJECTIONS = ("fourier", "linear", "none")
STUDENT_INITS = ("projection", "truncation", "random")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "report.json", "report.md", "loss.png")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class LatentDistillConfig:
    out: str = "runs/latent-distill"
    teacher: str = "smollm2-135m"
    cache: str | None = None  # None: <out>/cache, built when missing
    data: str | None = None  # for a cache built here (see CacheLatentsConfig.data)
    cache_layers: tuple[int, ...] | None = None
    cache_dtype: str = "fp8"
    student: str | None = None  # a config.json / HF folder for the student's architecture; None: the default
    student_hidden: int = 192
    student_layers: int = 6
    student_heads: int = 3
    student_kv_heads: int = 1
    student_intermediate: int = 512
    student_init: str = "projection"  # for a student built from a config (ignored for pretrained weights)
    student_lora_rank: int = 0  # 0: full fine-tune; R > 0: a peft LoRA of rank R (+ the projectors in full)
    student_lora_alpha: float | None = None  # None: 2 * student_lora_rank
    layer_map: str | None = None  # "t:s,t:s"; None: evenly spaced
    projection: str = "fourier"
    num_frequencies: int = 256
    sigma: float | None = None  # None: sigma_scale / median latent row norm, per layer
    sigma_scale: float = 1.0
    projection_precision: str = "bf16"
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 4
    max_steps: int = 100
    heldout_sequences: int = 4
    checkpoint_every: int = 50
    eval_problems_per_task: int = 1
    eval_max_new_tokens: int = 24
    eval_num_shots: int = 0  # the default cache's prompts are zero-shot too
    eval_freetext_passages: int | None = (
        None  # held-out free-text passages for perplexity; None: all, 0: none
    )
    bootstrap_samples: int = 1000
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# ---------------------------------------------------------------- pieces


def parse_layer_map(text: str | None, teacher_layers, student_layers: int) -> list[tuple[int, int]]:
    """[(teacher hidden_states index, student hidden_states index)], validated; ValueError names layer_map."""
    teacher_layers = list(teacher_layers)
    if text is None:
        count = min(len(teacher_layers), max(student_layers - 1, 1))
        picks = [
            teacher_layers[round(k * (len(teacher_layers) - 1) / max(count - 1, 1))] for k in range(count)
        ]
        if count == 1:
            picks = [teacher_layers[len(teacher_layers) // 2]]
        student = [max(1, round((k + 1) * student_layers / (count + 1))) for k in range(count)]
        pairs = list(zip(picks, student, strict=True))
    else:
        pairs = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(
                    f"layer_map: expected 'teacher:student' pairs like '10:2,20:4', got {text!r}"
                )
            pairs.append((int(parts[0]), int(parts[1])))
    if not pairs:
        raise ValueError(f"layer_map: expected at least one pair, got {text!r}")
    for t, s in pairs:
        if t not in teacher_layers:
            raise ValueError(f"layer_map: teacher layer {t} is not cached; expected one of {teacher_layers}")
        if not 0 <= s < student_layers:
            raise ValueError(
                f"layer_map: student layer {s} out of range; expected 0..{student_layers - 1} "
                f"(hidden_states index; the last, normed one excluded)"
            )
    students = [s for _, s in pairs]
    if len(set(students)) != len(students) or len({t for t, _ in pairs}) != len(pairs):
        raise ValueError(f"layer_map: expected each teacher and student layer at most once, got {pairs}")
    return pairs


def build_student(config: LatentDistillConfig, teacher_config: Any, teacher_embeddings: torch.Tensor | None):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if config.student_init not in STUDENT_INITS:
        raise ValueError(f"student_init: expected one of {STUDENT_INITS}, got {config.student_init!r}")
    if config.student and any((Path(config.student) / name).is_file() for name in WEIGHT_FILES):
        student = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32)
        if student.config.vocab_size != teacher_config.vocab_size:
            raise ValueError(
                f"student: expected the teacher's vocab_size {teacher_config.vocab_size}, "
                f"got {student.config.vocab_size}"
            )
        return student
    if config.student:
        student_config = AutoConfig.from_pretrained(config.student)
    else:
        student_config = LlamaConfig(
            vocab_size=teacher_config.vocab_size,
            hidden_size=config.student_hidden,
            num_hidden_layers=config.student_layers,
            num_attention_heads=config.student_heads,
            num_key_value_heads=config.student_kv_heads,
            intermediate_size=config.student_intermediate,
            max_position_embeddings=teacher_config.max_position_embeddings,
            rms_norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-5),
            tie_word_embeddings=True,
            bos_token_id=teacher_config.bos_token_id,
            eos_token_id=teacher_config.eos_token_id,
            pad_token_id=getattr(teacher_config, "pad_token_id", None),
        )
        rope = getattr(teacher_config, "rope_parameters", None)
        if rope is not None:
            student_config.rope_parameters = rope
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(
            f"student: expected the teacher's vocab_size {teacher_config.vocab_size}, "
            f"got {student_config.vocab_size}"
        )
    torch.manual_seed(config.seed)
    student = LlamaForCausalLM(student_config)
    if teacher_embeddings is not None and config.student_init != "random":
        d_t, d_s = teacher_embeddings.shape[1], student_config.hidden_size
        with torch.no_grad():
            if config.student_init == "projection":
                generator = torch.Generator().manual_seed(config.seed)
                r = torch.randn(d_t, d_s, generator=generator) / math.sqrt(d_t)
                student.get_input_embeddings().weight.copy_(teacher_embeddings.float() @ r)
            else:
                if d_s > d_t:
                    raise ValueError(f"student_init: truncation needs d_student <= {d_t}, got {d_s}")
                student.get_input_embeddings().weight.copy_(teacher_embeddings[:, :d_s].float())
    return student


def lora_student(student, config: LatentDistillConfig):
    """A peft LoRA (rank `student_lora_rank`) on every Linear of the blocks (peft's "all-linear": lm_head
    excluded), the base frozen, patched to the fused op. Returns (peft model, patch report as text)."""
    from peft import LoraConfig, get_peft_model

    from cdm_fast.patch import patch_peft

    rank = config.student_lora_rank
    alpha = config.student_lora_alpha if config.student_lora_alpha is not None else 2.0 * rank
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(student, lora)
    return model, str(patch_peft(model))


class ScaledLinear(nn.Module):
    """nn.Linear applied to x · input_scale (a fixed buffer)."""

    def __init__(self, d_in: int, d_out: int, input_scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_scale.to(x.dtype))


def build_projectors(config, pairs, d_teacher, d_student, sigmas, input_scales=None) -> nn.ModuleDict:
    if config.projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {config.projection!r}")
    modules = {}
    for t, _ in pairs:
        if config.projection == "fourier":
            modules[str(t)] = FourierProjector(
                d_teacher,
                d_student,
                config.num_frequencies,
                sigma=sigmas[t],
                precision=config.projection_precision,
                seed=config.seed + t,
            )
        elif config.projection == "linear":
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(config.seed + t)
            scale = 1.0 if input_scales is None else input_scales[t]
            modules[str(t)] = ScaledLinear(d_teacher, d_student, scale)
            torch.random.set_rng_state(generator_state)
    return nn.ModuleDict(modules)


def median_norms(batch: dict[str, Any], layers) -> dict[int, float]:
    mask = batch["attention_mask"].bool()
    return {t: float(batch["latents"][t][mask].float().norm(dim=-1).median()) for t in layers}


def token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """The denominators of the losses: next-token targets (CE) and non-pad tokens (latent MSE)."""
    mask = batch["attention_mask"]
    return {"ce_tokens": int(mask[:, 1:].sum()), "latent_tokens": int(mask.sum())}


def step_losses(student, projectors, batch, pairs, config, counts=None) -> dict[str, torch.Tensor]:
    """The weighted loss and its CE and MSE terms, each a sum over this batch's tokens divided by `counts`
    (`token_counts` of the global batch; default: of this batch, which makes them plain means)."""
    counts = counts or token_counts(batch)
    mask = batch["attention_mask"]
    output = student(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        output_hidden_states=bool(pairs) and len(projectors) > 0,
    )
    logits = output.logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce_sum = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    ce = ce_sum / max(counts["ce_tokens"], 1)
    mse = torch.zeros((), dtype=torch.float32, device=ce.device)
    if len(projectors) > 0:
        keep = mask.bool()
        per_layer = []
        for t, s in pairs:
            hidden = output.hidden_states[s][keep].float()
            target = projectors[str(t)](batch["latents"][t][keep]).float()
            squared = nn.functional.mse_loss(hidden, target, reduction="sum")
            per_layer.append(squared / max(counts["latent_tokens"] * hidden.shape[-1], 1))
        mse = torch.stack(per_layer).mean()
    terms = []  # a zero weight drops its term from the graph (no zero gradients flowing)
    if config.ce_weight:
        terms.append(config.ce_weight * ce)
    if len(projectors) > 0 and config.mse_weight:
        terms.append(config.mse_weight * mse)
    if not terms:
        raise ValueError("ce_weight, mse_weight: expected at least one positive weight, got none")
    loss = torch.stack(terms).sum()
    return {"loss": loss, "ce": ce.detach(), "mse": mse.detach()}


class Distilled(nn.Module):
    """Student and projectors as one module, so DistributedDataParallel wraps (and syncs) both;
    forward(batch, counts) = `step_losses`."""

    def __init__(self, student: nn.Module, projectors: nn.ModuleDict, pairs, config) -> None:
        super().__init__()
        self.student, self.projectors = student, projectors
        self.pairs, self.config = pairs, config

    def forward(self, batch: dict[str, Any], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        return step_losses(self.student, self.projectors, batch, self.pairs, self.config, counts)


def local_rows(batch: dict[str, Any], context: Context) -> tuple[dict[str, Any], float]:
    """This rank's contiguous slice of the global batch's rows, and its weight: 1, or 0 when the batch has
    fewer rows than ranks and this rank has none (it then runs row 0 with weight 0, as DDP needs every rank
    to take part in the step)."""
    if not context.distributed:
        return batch, 1.0
    rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(context.world_size)[context.rank]
    weight = 1.0
    if rows.numel() == 0:
        rows, weight = torch.zeros(1, dtype=torch.long), 0.0
    return {
        "input_ids": batch["input_ids"][rows],
        "attention_mask": batch["attention_mask"][rows],
        "latents": {t: v[rows] for t, v in batch["latents"].items()},
    }, weight


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "latents": {t: v.to(device) for t, v in batch["latents"].items()},
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def peak_memory_bytes() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"kind": "cuda max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    return {
        "kind": "process max RSS (CPU)",
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
    }


def bootstrap_ci(values: list[float], samples: int, seed: int) -> list[float] | None:
    if len(values) < 2:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (samples, len(values)), generator=generator)
    means = t[idx].mean(dim=1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


# ---------------------------------------------------------------- steps


def prepare_out(config: LatentDistillConfig, context: Context) -> Path:
    """Check (every rank, before anything is written), then clear and write config.json (rank 0)."""
    out = Path(config.out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not config.resume and not config.overwrite:
        raise FileExistsError(
            f"out: {out} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            "--overwrite to replace it"
        )
    distributed.barrier(context)
    if context.is_main:
        if config.overwrite and not config.resume:
            for name in existing:
                (out / name).unlink()
            shutil.rmtree(out / "student", ignore_errors=True)
            shutil.rmtree(out / "adapter", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_json(out / "config.json", asdict(config))
    distributed.barrier(context)
    return out


def ensure_cache(config: LatentDistillConfig, out: Path, context: Context) -> Path:
    cache_dir = Path(config.cache) if config.cache else out / "cache"
    manifest = cache_dir / "manifest.json"
    complete = manifest.exists() and json.loads(manifest.read_text()).get("complete")
    if distributed.broadcast(complete, context):
        return cache_dir
    cache.run(
        cache.CacheLatentsConfig(
            teacher=config.teacher,
            out=str(cache_dir),
            data=config.data,
            layers=config.cache_layers,
            dtype=config.cache_dtype,
            seed=config.seed,
            progress=config.progress,
        )
    )
    return cache_dir


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint's step (from an interrupted run) and old evaluations."""
    if not path.exists():
        return
    records = [line for line in path.read_text().splitlines() if line]
    kept = [
        line
        for line in records
        if json.loads(line).get("step", 0) <= step and json.loads(line).get("event") != "eval"
    ]
    cache.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _gpu_step(context: Context) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the fused projection and LoRA kernels take bf16), plus `wgrad.deferred` there
    in a single process: the student's and projectors' weight-gradient GEMMs overlap the rest of backward."""
    stack = contextlib.ExitStack()
    if context.device.type == "cuda":
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    stack.enter_context(distributed.deferred_weight_grads(context))
    return stack


def train(config, out, student, projectors, pairs, reader, setup_record, context: Context) -> None:
    """AdamW on the trainable parameters of student + projectors for `max_steps` global batches."""
    model = Distilled(student, projectors, pairs, config).to(context.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    metrics = out / "metrics.jsonl"
    checkpoint = out / "checkpoint.pt"
    step = 0
    if config.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=context.device, weights_only=False)
        student.load_state_dict(state["student"])
        projectors.load_state_dict(state["projectors"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if context.is_main:
            _truncate_metrics(metrics, step)
    elif metrics.exists() and context.is_main:  # a fresh start (or --resume before any checkpoint)
        metrics.unlink()
    if step == 0 and context.is_main:
        _log(metrics, {"event": "setup", "step": 0, **setup_record, "world_size": context.world_size})
    distributed.barrier(context)
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # With ce_weight 0 the blocks above the highest mapped layer (and lm_head) get no gradient.
        step_module = DistributedDataParallel(model, find_unused_parameters=not config.ce_weight)
    else:
        step_module = model
    if distributed.defers_weight_grads(context):
        from cdm_fast.wgrad import defer_wgrad

        defer_wgrad(student)

    def save(at_step: int) -> None:
        if not context.is_main:
            return
        atomic_torch_save(
            {
                "student": student.state_dict(),
                "projectors": projectors.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": at_step,
                "config": asdict(config),
            },
            checkpoint,
        )

    def batches():
        while True:  # epochs in cache order; a resumed run skips what was consumed, so it sees the same data
            yield from reader

    stream = batches()
    for _ in range(step):
        next(stream)
    model.train()
    bar = tqdm(
        total=config.max_steps,
        initial=step,
        desc="latent-distill",
        unit="step",
        disable=not (config.progress and context.is_main),
    )
    try:
        while step < config.max_steps:
            batch = next(stream)
            started = time.perf_counter()
            counts = token_counts(batch)
            local, weight = local_rows(batch, context)
            optimizer.zero_grad(set_to_none=True)
            with _gpu_step(context):
                losses = step_module(to_device(local, context.device), counts)
                # DDP averages gradients over ranks; each rank's loss is already its share of the global mean.
                (losses["loss"] * (weight * context.world_size)).backward()
            optimizer.step()
            step += 1
            seconds = time.perf_counter() - started
            tokens = counts["latent_tokens"]
            record = {
                "event": "train",
                "step": step,
                "loss": distributed.all_sum(weight * float(losses["loss"].detach()), context),
                "ce": distributed.all_sum(weight * float(losses["ce"]), context),
                "mse": distributed.all_sum(weight * float(losses["mse"]), context),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
            }
            if context.is_main:
                _log(metrics, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save(step)
    except KeyboardInterrupt:
        save(step)
        print(f"interrupted: checkpoint at step {step} in {checkpoint}; continue with --resume")
        raise
    finally:
        bar.close()


@torch.no_grad()
def heldout_perplexity(student, reader, context: Context = SINGLE_PROCESS) -> dict[str, Any]:
    """Mean over the held-out cache sequences of each one's mean next-token NLL, the batches sharded over
    ranks."""
    student.eval()
    device = student.get_input_embeddings().weight.device

    def batch_nll(batches: list[dict]) -> list[list[float]]:
        per_batch = []
        for batch in batches:
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            labels = input_ids[:, 1:]
            mask = attention_mask[:, 1:].float()
            nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
            per_batch.append(((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist())
        return per_batch

    per_sequence = [
        nll for batch in distributed.map_sharded(batch_nll, list(reader), context) for nll in batch
    ]
    return {"mean_nll": sum(per_sequence) / len(per_sequence), "per_sequence_nll": per_sequence}


def freetext_perplexity(student, tokenizer, config, context: Context = SINGLE_PROCESS) -> dict[str, Any]:
    """Perplexity on the held-out free-text passages (`cdm_fast.freetext.passages("eval")`, never cached),
    the passages sharded over ranks."""
    from cdm_fast import freetext

    texts = freetext.passages("eval")
    if config.eval_freetext_passages is not None:
        texts = texts[: config.eval_freetext_passages]
    if not texts:
        return {"skipped": True}

    result = freetext.perplexity(
        student,
        tokenizer,
        texts,
        max_length=512,
        batch_size=config.batch_size,
        map_texts=lambda f, shard: distributed.map_sharded(f, shard, context),
    )
    return {
        "nll": result["nll"],
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "passages": len(texts),
        "per_passage_nll": result["nll_per_text"],
    }


def evaluate_logic(student, tokenizer, config, context: Context = SINGLE_PROCESS) -> dict[str, Any]:
    """Greedy accuracy on eval-split problems of the logic mix, the problems sharded over ranks."""
    from cdm_fast.logic import evaluate, generate

    if config.eval_problems_per_task < 1:
        return {"skipped": True}
    problems = generate(
        config.eval_problems_per_task, seed=config.seed + 1, split="eval", num_shots=config.eval_num_shots
    )
    student.eval()

    result = evaluate(
        student,
        tokenizer,
        problems,
        max_new_tokens=config.eval_max_new_tokens,
        progress=config.progress and context.is_main,
        map_problems=lambda f, shard: distributed.map_sharded(f, shard, context),
    )
    scores = [1.0 if r["score"] == 1.0 else 0.0 for r in result["results"]]
    return {
        "accuracy": result["accuracy"],
        "overall": sum(scores) / len(scores),
        "scores": scores,
        "n": len(scores),
        "prompt_format": problems[0].prompt_format,
        "num_shots": config.eval_num_shots,
        "answer_extraction": "cdm_fast.logic.answer_line + the task's extractor",
    }


def write_report(out: Path, config: LatentDistillConfig) -> dict[str, Any]:
    """report.json, report.md and loss.png, from metrics.jsonl only."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    train_rows = [r for r in records if r["event"] == "train"]
    setup = next((r for r in records if r["event"] == "setup"), {})
    evaluation = next((r for r in reversed(records) if r["event"] == "eval"), {})
    tokens_per_s = [r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]
    ppl = evaluation.get("heldout", {})
    free = evaluation.get("freetext", {})
    report = {
        "projection": config.projection,
        "steps": len(train_rows),
        "layer_map": setup.get("layer_map"),
        "sigmas": setup.get("sigmas"),
        "final": {k: train_rows[-1][k] for k in ("loss", "ce", "mse")} if train_rows else None,
        "tokens_per_s_median": sorted(tokens_per_s)[len(tokens_per_s) // 2] if tokens_per_s else None,
        "heldout_perplexity": math.exp(ppl["mean_nll"]) if ppl else None,
        "heldout_nll_ci95": ppl.get("nll_ci95"),
        "freetext_perplexity": free.get("perplexity"),
        "freetext_nll_ci95": free.get("nll_ci95"),
        "freetext_passages": free.get("passages"),
        "student_lora_rank": config.student_lora_rank,
        "trainable_parameters": setup.get("trainable_parameters"),
        "world_size": setup.get("world_size", 1),
        "logic": {k: v for k, v in evaluation.get("logic", {}).items() if k != "scores"},
        "peak_memory": evaluation.get("peak_memory"),
        "config": asdict(config),
    }
    cache.atomic_write_json(out / "report.json", report)
    logic = report["logic"]
    lines = [
        f"# latent-distill ({config.projection})",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| steps | {report['steps']} |",
        f"| final loss / CE / MSE | {_fmt(report['final'])} |",
        f"| held-out cache perplexity (last {config.heldout_sequences} cached sequences) | "
        f"{_num(report['heldout_perplexity'])} "
        f"(per-sequence NLL 95% bootstrap CI {_ci(report['heldout_nll_ci95'])}) |",
        f"| held-out free-text perplexity ({report['freetext_passages']} eval passages, never cached) | "
        f"{_num(report['freetext_perplexity'])} "
        f"(per-passage NLL 95% bootstrap CI {_ci(report['freetext_nll_ci95'])}) |",
        f"| logic accuracy (overall, n={logic.get('n')}) | {_num(logic.get('overall'))} "
        f"(95% bootstrap CI {_ci(logic.get('overall_ci95'))}) |",
        *(f"| logic accuracy: {task} | {_num(value)} |" for task, value in logic.get("accuracy", {}).items()),
        f"| trainable parameters | {report['trainable_parameters']} "
        f"(LoRA rank {config.student_lora_rank or 'none: full fine-tune'}) |",
        f"| processes (world size) | {report['world_size']} |",
        f"| tokens/s (median) | {_num(report['tokens_per_s_median'])} |",
        f"| peak memory | {_memory(report['peak_memory'])} |",
        f"| layer map (teacher:student) | {report['layer_map']} |",
        f"| sigma per teacher layer (median latent norm) | {_sigmas(report['sigmas'])} |",
        "",
        "Measured on this run only; compare projections with runs of the same steps, data and seed.",
    ]
    cache.atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    _plot(train_rows, out / "loss.png")
    return report


def _sigmas(sigmas) -> str:
    if not sigmas:
        return "n/a"
    return ", ".join(f"{t}: {v['sigma']:.3g} ({v['median_norm']:.3g})" for t, v in sigmas.items())


def _ci(interval) -> str:
    return "n/a" if not interval else f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def _memory(peak) -> str:
    return "n/a" if not peak else f"{peak['bytes'] / 2**30:.2f} GiB ({peak['kind']})"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _fmt(final) -> str:
    return "n/a" if not final else " / ".join(f"{final[k]:.4g}" for k in ("loss", "ce", "mse"))


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce", "mse"):
        axis.plot(steps, [r[key] for r in rows], label=key, marker="." if len(rows) < 20 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".loss-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- run


def run(config: LatentDistillConfig) -> dict[str, Any]:
    """Build the cache if missing, train, evaluate, report. Returns the report dict (on every rank).

    Under torchrun every rank calls this (see the module docstring)."""
    from cdm_fast import models

    if config.projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {config.projection!r}")
    if config.projection == "none" and config.ce_weight <= 0:
        raise ValueError(
            f"ce_weight: projection 'none' trains on CE only, expected > 0, got {config.ce_weight}"
        )
    if config.max_steps < 1 or config.batch_size < 1 or config.checkpoint_every < 1:
        raise ValueError("max_steps, batch_size, checkpoint_every: expected >= 1")
    if config.student_lora_rank < 0:
        raise ValueError(
            f"student_lora_rank: expected >= 0 (0: full fine-tune), got {config.student_lora_rank}"
        )
    context = distributed.setup()
    out = prepare_out(config, context)
    cache_dir = ensure_cache(config, out, context)
    teacher, tokenizer = models.load(config.teacher)
    expect = {
        "teacher": cache.teacher_id(config.teacher),
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "d_model": int(teacher.config.hidden_size),
    }
    manifest = cache.read_manifest(cache_dir)
    cache.check_manifest(manifest, expect)
    total = manifest["num_sequences"]
    heldout = min(config.heldout_sequences, total - 1)
    if heldout < 1:
        raise ValueError(f"heldout_sequences: the cache has {total} sequences, need at least 2")
    student = build_student(config, teacher.config, teacher.get_input_embeddings().weight.detach())
    teacher_embeddings_dtype = teacher.dtype
    del teacher
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = parse_layer_map(config.layer_map, manifest["layers"], student.config.num_hidden_layers)
    teacher_layers = [t for t, _ in pairs]
    train_reader = cache.LatentReader(
        cache_dir,
        expect,
        batch_size=config.batch_size,
        layers=teacher_layers,
        stop=total - heldout,
        pad_id=pad_id,
    )
    first = next(iter(train_reader))
    norms = median_norms(first, teacher_layers)
    sigmas = {
        t: (config.sigma if config.sigma else config.sigma_scale / max(norms[t], 1e-12))
        for t in teacher_layers
    }
    d_teacher = manifest["d_model"]
    input_scales = {t: math.sqrt(d_teacher) / max(norms[t], 1e-12) for t in teacher_layers}
    projectors = build_projectors(config, pairs, d_teacher, student.config.hidden_size, sigmas, input_scales)
    patched = None
    if config.student_lora_rank > 0:
        student, patched = lora_student(student, config)
    student.to(context.device)
    trainable = sum(p.numel() for p in [*student.parameters(), *projectors.parameters()] if p.requires_grad)
    setup_record = {
        "layer_map": pairs,
        "sigmas": {
            str(t): {"sigma": sigmas[t], "median_norm": norms[t], "linear_input_scale": input_scales[t]}
            for t in teacher_layers
        },
        "projection": config.projection,
        "cache": str(cache_dir),
        "trainable_parameters": trainable,
        "patch_peft": patched,
        "teacher_dtype": str(teacher_embeddings_dtype),
    }
    pairs_used = [] if config.projection == "none" else pairs
    train(config, out, student, projectors, pairs_used, train_reader, setup_record, context)
    distributed.barrier(context)
    report = evaluate_and_report(config, out, student, projectors, tokenizer, cache_dir, expect, context)
    return distributed.broadcast(report, context)


def evaluate_and_report(
    config, out, student, projectors, tokenizer, cache_dir, expect, context
) -> dict | None:
    """Held-out cache and free-text perplexity and logic accuracy, sharded over the ranks; then, on rank 0,
    the eval record, the saved student and the report (returned; None on the other ranks)."""
    total = cache.read_manifest(cache_dir)["num_sequences"]
    heldout = min(config.heldout_sequences, total - 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    heldout_reader = cache.LatentReader(
        cache_dir, expect, batch_size=config.batch_size, layers=[], start=total - heldout, pad_id=pad_id
    )
    ppl = heldout_perplexity(student, heldout_reader, context)
    free = freetext_perplexity(student, tokenizer, config, context)
    logic = evaluate_logic(student, tokenizer, config, context)
    if not context.is_main:
        return None
    ppl["nll_ci95"] = bootstrap_ci(ppl["per_sequence_nll"], config.bootstrap_samples, config.seed)
    if "per_passage_nll" in free:
        free["nll_ci95"] = bootstrap_ci(free["per_passage_nll"], config.bootstrap_samples, config.seed)
    if "scores" in logic:
        logic["overall_ci95"] = bootstrap_ci(logic["scores"], config.bootstrap_samples, config.seed)
    _log(
        out / "metrics.jsonl",
        {
            "event": "eval",
            "step": config.max_steps,
            "heldout": ppl,
            "freetext": free,
            "logic": logic,
            "peak_memory": peak_memory_bytes(),
        },
    )
    if config.student_lora_rank > 0:
        student.save_pretrained(out / "adapter")  # a standard peft adapter folder
        student = student.merge_and_unload()
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    torch.save(projectors.state_dict(), out / "student" / "projectors.pt")
    return write_report(out, config)
