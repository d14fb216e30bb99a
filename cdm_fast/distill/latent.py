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

Student (default): a Llama with d=192, 6 layers, 3 heads, 1 kv head, intermediate 512, the teacher's
vocabulary and special tokens, tied embeddings. Its embedding matrix is initialised from the teacher's by a
fixed random projection E_s = E_t @ R, R (d_t, d_s) ~ N(0, 1/d_t) from a generator seeded with `seed`
(keeps each coordinate's variance), or by truncation E_t[:, :d_s]; the blocks are random (HF init).

Layer map: pairs "t:s" of a cached teacher hidden_states index and a student hidden_states index
(0 = embeddings, s in 1..L_s the output of block s; the last one is normed in HF Llama and is not allowed).
Default: student layers 1..L_s-1 to the cached teacher layers, evenly spaced.

Data: the cache's sequences in cache order; the last `heldout_sequences` are held out for perplexity.
"""

from __future__ import annotations

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

from cdm_fast.distill import latents as cache
from cdm_fast.nn.projector import FourierProjector

PROJECTIONS = ("fourier", "linear", "none")
STUDENT_INITS = ("projection", "truncation", "random")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "report.json", "report.md", "loss.png")


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
    student_init: str = "projection"
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
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    if config.student_init not in STUDENT_INITS:
        raise ValueError(f"student_init: expected one of {STUDENT_INITS}, got {config.student_init!r}")
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


def step_losses(student, projectors, batch, pairs, config) -> dict[str, torch.Tensor]:
    mask = batch["attention_mask"]
    output = student(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        output_hidden_states=bool(pairs) and len(projectors) > 0,
    )
    logits = output.logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    mse = torch.zeros((), dtype=torch.float32)
    if len(projectors) > 0:
        keep = mask.bool()
        per_layer = []
        for t, s in pairs:
            target = projectors[str(t)](batch["latents"][t][keep])
            per_layer.append(nn.functional.mse_loss(output.hidden_states[s][keep].float(), target.float()))
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


def prepare_out(config: LatentDistillConfig) -> Path:
    out = Path(config.out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not config.resume and not config.overwrite:
        raise FileExistsError(
            f"out: {out} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if config.overwrite and not config.resume:
        for name in existing:
            (out / name).unlink()
        shutil.rmtree(out / "student", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cache.atomic_write_json(out / "config.json", asdict(config))
    return out


def ensure_cache(config: LatentDistillConfig, out: Path) -> Path:
    cache_dir = Path(config.cache) if config.cache else out / "cache"
    manifest = cache_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
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


def train(config, out, student, projectors, pairs, reader, sigmas) -> None:
    params = list(student.parameters()) + list(projectors.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    metrics = out / "metrics.jsonl"
    checkpoint = out / "checkpoint.pt"
    step = 0
    if config.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        projectors.load_state_dict(state["projectors"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        _truncate_metrics(metrics, step)
    elif metrics.exists():  # a fresh start (or --resume before any checkpoint)
        metrics.unlink()
    if step == 0:
        _log(
            metrics,
            {
                "event": "setup",
                "step": 0,
                "layer_map": pairs,
                "sigmas": sigmas,
                "projection": config.projection,
                "cache": str(reader.cache_dir),
            },
        )

    def save(at_step: int) -> None:
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
    student.train()
    bar = tqdm(
        total=config.max_steps, initial=step, desc="latent-distill", unit="step", disable=not config.progress
    )
    try:
        while step < config.max_steps:
            batch = next(stream)
            started = time.perf_counter()
            losses = step_losses(student, projectors, batch, pairs, config)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            step += 1
            seconds = time.perf_counter() - started
            tokens = int(batch["attention_mask"].sum())
            record = {
                "event": "train",
                "step": step,
                "loss": float(losses["loss"].detach()),
                "ce": float(losses["ce"]),
                "mse": float(losses["mse"]),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
            }
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
def heldout_perplexity(student, reader) -> dict[str, Any]:
    student.eval()
    per_sequence = []
    for batch in reader:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].float()
        nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        per_sequence += ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist()
    return {"mean_nll": sum(per_sequence) / len(per_sequence), "per_sequence_nll": per_sequence}


def evaluate_logic(student, tokenizer, config) -> dict[str, Any]:
    from cdm_fast.logic import evaluate, generate

    if config.eval_problems_per_task < 1:
        return {"skipped": True}
    problems = generate(
        config.eval_problems_per_task, seed=config.seed + 1, split="eval", num_shots=config.eval_num_shots
    )
    student.eval()
    result = evaluate(
        student, tokenizer, problems, max_new_tokens=config.eval_max_new_tokens, progress=config.progress
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
    report = {
        "projection": config.projection,
        "steps": len(train_rows),
        "layer_map": setup.get("layer_map"),
        "sigmas": setup.get("sigmas"),
        "final": {k: train_rows[-1][k] for k in ("loss", "ce", "mse")} if train_rows else None,
        "tokens_per_s_median": sorted(tokens_per_s)[len(tokens_per_s) // 2] if tokens_per_s else None,
        "heldout_perplexity": math.exp(ppl["mean_nll"]) if ppl else None,
        "heldout_nll_ci95": ppl.get("nll_ci95"),
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
        f"| held-out perplexity | {_num(report['heldout_perplexity'])} "
        f"(per-sequence NLL 95% bootstrap CI {_ci(report['heldout_nll_ci95'])}) |",
        f"| logic accuracy (overall, n={logic.get('n')}) | {_num(logic.get('overall'))} "
        f"(95% bootstrap CI {_ci(logic.get('overall_ci95'))}) |",
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
    """Build the cache if missing, train, evaluate, report. Returns the report dict."""
    from cdm_fast import models

    if config.projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {config.projection!r}")
    if config.projection == "none" and config.ce_weight <= 0:
        raise ValueError(
            f"ce_weight: projection 'none' trains on CE only, expected > 0, got {config.ce_weight}"
        )
    if config.max_steps < 1 or config.batch_size < 1 or config.checkpoint_every < 1:
        raise ValueError("max_steps, batch_size, checkpoint_every: expected >= 1")
    out = prepare_out(config)
    cache_dir = ensure_cache(config, out)
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
    if config.projection == "none":
        pairs_used: list = []
    else:
        pairs_used = pairs
    train(
        config,
        out,
        student,
        projectors,
        pairs_used,
        train_reader,
        {
            str(t): {"sigma": sigmas[t], "median_norm": norms[t], "linear_input_scale": input_scales[t]}
            for t in teacher_layers
        },
    )
    heldout_reader = cache.LatentReader(
        cache_dir, expect, batch_size=config.batch_size, layers=[], start=total - heldout, pad_id=pad_id
    )
    ppl = heldout_perplexity(student, heldout_reader)
    ppl["nll_ci95"] = bootstrap_ci(ppl["per_sequence_nll"], config.bootstrap_samples, config.seed)
    logic = evaluate_logic(student, tokenizer, config)
    if "scores" in logic:
        logic["overall_ci95"] = bootstrap_ci(logic["scores"], config.bootstrap_samples, config.seed)
    _log(
        out / "metrics.jsonl",
        {
            "event": "eval",
            "step": config.max_steps,
            "heldout": ppl,
            "logic": logic,
            "peak_memory": peak_memory_bytes(),
            "teacher_dtype": str(teacher_embeddings_dtype),
        },
    )
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    torch.save(projectors.state_dict(), out / "student" / "projectors.pt")
    return write_report(out, config)
