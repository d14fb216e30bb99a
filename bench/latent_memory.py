"""Peak memory of one latent-distill student step at the seed's shape: teacher latents d=8192 (read from an
fp8 cache), student d=1536 (a 1.5B-class Llama), Fourier projectors to the student width, AdamW.

With CUDA: builds the student in bf16 on the GPU, runs one full step (forward, MSE to the projected latents
+ CE, backward, AdamW) on random tokens and latents, and reports `torch.cuda.max_memory_allocated`.
Without CUDA: prints the documented arithmetic below, labelled "arithmetic, not measured".

Arithmetic (bytes; N = tokens per step, P = student parameters, L = student layers, d = 1536, d_kv =
kv heads · head_dim, i = intermediate, V = vocab, m = Fourier frequencies, k = mapped layers, D = 8192):
- weights: bf16 params 2P; grads 2P (bf16) ; AdamW m, v in fp32 8P; (+ fp32 master copy 4P, row "fp32 master")
- activations kept for backward, no checkpointing, SDPA/flash attention (no N² scores):
  per layer per token ≈ 2 bytes · (6d + 2·d_kv + 4i)  [norm in/out ×2, q, k, v, attn out, o-proj out,
  gate, up, act, gate·up] → 2·N·L·(6d + 2·d_kv + 4i)
- logits: bf16 logits 2·N·V, fp32 upcast for CE 4·N·V, its gradient 4·N·V (a chunked CE removes most)
- latents on device: fp8 codes + fp32 row scales k·N·(D + 4), dequantised bf16 k·N·D·2
- projector (per mapped layer): freqs D·m·4 (fp32 buffer), weight + bias 2m·d·4 with grads and AdamW
  (16 B per param), activations phases N·m·4 + features N·2m·2
The seed claimed "under 48 GB"; this file reports whatever the arithmetic or the GPU says.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import append_jsonl, default_results_path, environment

SEED_SHAPE = {
    "teacher_d": 8192,
    "student_d": 1536,
    "student_layers": 28,
    "heads": 12,
    "kv_heads": 2,
    "intermediate": 8960,
    "vocab": 128256,  # the teacher's tokenizer (Llama-3 70B-class, d=8192), shared by the student
    "tie_embeddings": True,
    "mapped_layers": 4,
    "num_frequencies": 256,
}


def student_params(s: dict) -> int:
    d, layers, inter, vocab = s["student_d"], s["student_layers"], s["intermediate"], s["vocab"]
    head_dim = d // s["heads"]
    d_kv = s["kv_heads"] * head_dim
    per_layer = d * d * 2 + d * d_kv * 2 + 3 * d * inter + 2 * d
    embeddings = vocab * d * (1 if s["tie_embeddings"] else 2)
    return layers * per_layer + embeddings + d


def arithmetic(s: dict, tokens: int) -> dict:
    gib = 2**30
    p = student_params(s)
    d, inter, layers, vocab = s["student_d"], s["intermediate"], s["student_layers"], s["vocab"]
    d_kv = s["kv_heads"] * (d // s["heads"])
    k, m, big_d = s["mapped_layers"], s["num_frequencies"], s["teacher_d"]
    projector_params = k * (2 * m * d + d)
    parts = {
        "weights_bf16": 2 * p,
        "grads_bf16": 2 * p,
        "adamw_fp32_m_v": 8 * p,
        "activations": 2 * tokens * layers * (6 * d + 2 * d_kv + 4 * inter),
        "logits_bf16_fp32_grad": tokens * vocab * (2 + 4 + 4),
        "latents_fp8_plus_bf16": k * tokens * (big_d + 4) + k * tokens * big_d * 2,
        "projectors": k * big_d * m * 4 + 16 * projector_params + k * tokens * (m * 4 + 2 * m * 2),
    }
    total = sum(parts.values())
    return {
        "params": p,
        "tokens": tokens,
        "parts_gib": {name: value / gib for name, value in parts.items()},
        "total_gib": total / gib,
        "total_with_fp32_master_gib": (total + 4 * p) / gib,
        "total_chunked_ce_gib": (total - tokens * vocab * 8) / gib,
    }


def measure(s: dict, tokens: int, seq: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cdm_fast.float8 import dequantize_rowwise, quantize_rowwise
    from cdm_fast.nn.projector import FourierProjector

    device = torch.device("cuda")
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["student_d"],
        num_hidden_layers=s["student_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        intermediate_size=s["intermediate"],
        tie_word_embeddings=s["tie_embeddings"],
        max_position_embeddings=max(seq, 2048),
    )
    student = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    student.config._attn_implementation = "sdpa"
    k = s["mapped_layers"]
    projectors = torch.nn.ModuleList(
        FourierProjector(s["teacher_d"], s["student_d"], s["num_frequencies"], sigma=1.0 / 100, seed=j)
        for j in range(k)
    ).to(device)
    optimizer = torch.optim.AdamW([*student.parameters(), *projectors.parameters()], lr=1e-5)
    batch = tokens // seq
    ids = torch.randint(0, s["vocab"], (batch, seq), device=device)
    codes = [
        quantize_rowwise(torch.randn(batch, seq, s["teacher_d"], device=device) * 3, -1) for _ in range(k)
    ]
    student_layers = [round((j + 1) * s["student_layers"] / (k + 1)) for j in range(k)]
    torch.cuda.reset_peak_memory_stats()
    out = student(input_ids=ids, labels=ids, output_hidden_states=True)
    mse = sum(
        torch.nn.functional.mse_loss(
            out.hidden_states[layer].float(),
            projectors[j](dequantize_rowwise(*codes[j], torch.bfloat16)).float(),
        )
        for j, layer in enumerate(student_layers)
    )
    (out.loss + mse / k).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "params": student_params(s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latent_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch · sequence)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=str(default_results_path("latent_memory")))
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    row = {**environment(device), "bench": "latent_memory", "shape": SEED_SHAPE, "tokens": args.tokens}
    row["arithmetic"] = arithmetic(SEED_SHAPE, args.tokens)
    if device.type == "cuda":
        row["kind"] = "measured: torch.cuda.max_memory_allocated, bf16 student, torch path"
        row["measured"] = measure(SEED_SHAPE, args.tokens, args.seq)
    else:
        row["kind"] = "arithmetic, not measured"
    a = row["arithmetic"]
    print(
        f"latent_memory ({row['kind']}): student params {a['params'] / 1e9:.3f} B, tokens/step {args.tokens}"
    )
    for name, value in a["parts_gib"].items():
        print(f"  {name:24s} {value:8.2f} GiB")
    print(f"  {'total':24s} {a['total_gib']:8.2f} GiB")
    print(f"  {'total, chunked CE':24s} {a['total_chunked_ce_gib']:8.2f} GiB")
    print(f"  {'total, + fp32 master':24s} {a['total_with_fp32_master_gib']:8.2f} GiB")
    if "measured" in row:
        print(f"  measured peak            {row['measured']['peak_gib']:8.2f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(args.out, [row])
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
