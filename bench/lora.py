"""Fused LoRA bench: `python -m bench.lora [--4bit] [--decode] [--mode M] [--check-targets] [--smoke] ...`.

    y = x @ weightᵀ + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ
    x (M, in), weight (out, in) frozen, lora_A (r, in), lora_B (out, r); bf16 activations, no bias (as Llama)

FLOPs counted (what is computed; the weight is frozen, so backward has no weight gradient — the usual
"backward = 2 × forward" would count one that never runs):
    forward  2·M·in·out + 2·M·r·(in + out)
    backward 2·M·in·out + 4·M·r·(in + out)     dx = dy@weight + s·(dy@lora_B)@lora_A;  d lora_A, d lora_B
    the base Linear alone (the floor): 2·M·in·out forward, 2·M·in·out backward (input grad only).
Bytes counted (each operand read or written once, 2 bytes per element):
    forward  x, weight, lora_A, lora_B, y (+ u = x@lora_Aᵀ (M, r) written when training)
    backward dy, x (for d lora_A), u, weight, lora_A, lora_B read; dx, d lora_A, d lora_B written.

Roofline of the main shape (M = 8192 tokens, in = out = 4096, r = 32), against H100 SXM datasheet peaks
(989 TFLOP/s dense bf16, 3.35 TB/s HBM3) — ideal times from the datasheet, NOT measurements:
    forward           279.2 GFLOP  168.8 MB   0.282 ms compute, 0.050 ms memory
    backward          283.5 GFLOP  236.5 MB   0.287 ms compute, 0.071 ms memory
    forward+backward  562.6 GFLOP  405.3 MB   0.569 ms compute, 0.121 ms memory
    base Linear fwd+input grad  549.8 GFLOP   0.556 ms compute
Compute-bound: LoRA's own FLOPs are 2.3 % over the base Linear's, so a fused kernel can approach that
overhead; peft's separate launches, fp32 round-trip of x and (M, out) adapter product cost memory traffic.

Modes: "forward" is inference (no_grad, eval, training=False); "backward" times autograd's backward alone
over a graph built beforehand (grads for x and the adapter, retain_graph); "forward+backward" both.
Training modes use training=True and dropout --dropout (default 0). Every peer gets the same values:
lora_A, lora_B are drawn in bf16 (so peft's fp32 copies hold exactly them), lora_B random (not peft's
zero init) so the adapter term is measured. Rotating input sets (x, dy) exceed 2× L2; the weights of one
peer stay the same tensors across calls. Peak memory: torch.cuda.max_memory_allocated during one call,
minus what was allocated before it: outputs, saved activations, grads and temporaries, not the inputs
(in the backward mode the graph exists before the call, so only grads and temporaries).
Error: ||y - ref|| / ||ref|| of the forward output against `cdm_fast.ops.lora.reference` in float64 on up
to --error-rows evenly spaced rows (not computed when dropout is on in a training mode: masks differ).

The Llama-7B-like layer set (q, k, v, o: 4096→4096; gate, up: 4096→11008; down: 11008→4096; r = 32) is
timed per distinct projection shape (q/k/v/o share the main r = 32 row) and also reported as one
"layer-set" row per peer and mode: the sum of the projections' medians (q/k/v/o counted 4×, gate/up 2×),
as if run one after another; its peak memory is not reported (activations of a real layer overlap).

Suites (a row's "suite" and "base" say which): the default is training over a bf16 base (above).
  --4bit      training over a bitsandbytes NF4 base (double quantisation, blocksize 64, compute dtype bf16,
              quantised on the device by Params4bit's first `.to(device)`), same shapes and modes. Peers: ours
              (`cdm_fast.lora_linear` given the Params4bit), peft + bitsandbytes with QLoRA defaults (a real
              peft `lora.bnb.Linear4bit` around a hand-built `bnb.nn.Linear4bit`, fp32 adapters), its
              torch.compile, and the floor: bitsandbytes' own 4-bit matmul (`Linear4bit.forward`) for the base
              alone. Every peer reads the same codes; the float64 reference uses the dequantised weight. Also
              the memory comparison below.
  --decode    decode shapes (tokens 1, 8, 64), forward only (eval, no grad), bf16 base; with --4bit also the
              NF4 base. Peers: ours, peft (bf16) / peft + bitsandbytes (4-bit), Unsloth-style addmm (bf16) and
              the base alone (nn.Linear bf16 / bitsandbytes 4-bit matmul): "over base" is the LoRA overhead.
  --smoke alone runs every suite at tiny sizes (bitsandbytes runs its 4-bit layers on the CPU).
Bytes for a 4-bit base count the packed weight as it is stored (codes, absmax, nested statistics).

Memory (--4bit): peak CUDA memory (max_memory_allocated, minus what was allocated before the weights were
built: weights, adapters, activations, grads; no optimizer state) of one Llama-7B-like layer set (random
weights, r = 32, 8192 tokens) over a bf16 base vs the 4-bit base, for ours and peft, forward (eval, no grad)
and a training step (forward + backward). The projections run as in a decoder layer without attention:
q, k, v, o and gate, up of the input, down of silu(gate)·up. Off CUDA these rows are unmeasured.

The seed claims its adapters cost "+0–3% latency, −30% VRAM in 4-bit"; the summary prints that claim beside
what was measured here (LoRA overhead over the base at 1 token; peak memory of the 4-bit base vs the bf16
base), or "unmeasured".

Issue 14 targets (--check-targets, H100, bf16 compute, r = 32, 4096x4096): training-shape forward+backward
over the 4-bit base >= 1.4x faster than peft + bitsandbytes QLoRA; 1-token decode LoRA overhead over the base
alone <= 3% for the bf16 and the 4-bit base; our 1-token 4-bit decode (LoRA included) at least as fast as
bitsandbytes' own 4-bit matmul of the base alone (the strict reading, which for the 4-bit base also implies
the 3% target; the ratio to peft + bitsandbytes' QLoRA decode is reported beside it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import inspect
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import cdm_fast
from bench import common
from cdm_fast import dispatch, quant
from cdm_fast.dispatch import BackendUnavailable
from cdm_fast.ops.lora import OP, reference


class Shape(NamedTuple):
    tokens: int
    in_features: int
    out_features: int
    rank: int

    def as_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "in": self.in_features, "out": self.out_features, "r": self.rank}


# (name, in, out) of one Llama-7B-like decoder layer's projections, and the rank the layer set runs at.
LLAMA_7B_LAYER = (
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 11008),
    ("up_proj", 4096, 11008),
    ("down_proj", 11008, 4096),
)
SMOKE_LAYER = tuple((name, i // 64, o // 64) for name, i, o in LLAMA_7B_LAYER)  # 64→64, 64→172, 172→64
LAYER_SET_RANK = {"full": 32, "smoke": 4}
SHAPES = {
    "full": [
        Shape(8192, 4096, 4096, 16),
        Shape(8192, 4096, 4096, 32),  # the target shape; also q/k/v/o of the layer set
        Shape(8192, 4096, 4096, 64),
        Shape(8192, 4096, 11008, 32),  # gate/up
        Shape(8192, 11008, 4096, 32),  # down
    ],
    # SMOKE_LAYER's shapes. Not 1/128 of the layer: an in_features of 32, below the NF4 blocksize, meets
    # bitsandbytes 0.50's AVX512 CPU dequantisation, which misplaces blocks that cross a row end (README).
    "smoke": [Shape(16, 64, 64, 4), Shape(16, 64, 172, 4), Shape(16, 172, 64, 4)],
}
LAYER_SETS = {"full": LLAMA_7B_LAYER, "smoke": SMOKE_LAYER}
MODES = ("forward", "backward", "forward+backward")
BASELINE = "peft-default"
FLOOR = "base-linear"
TARGET_SHAPE = Shape(8192, 4096, 4096, 32)
TARGETS = {"speedup_vs_peft": 1.3, "overhead_vs_base": 0.15, "peak_memory_vs_peft": 1.0}
TARGET_DEVICE = "H100"
DECODE_TOKENS = {"full": (1, 8, 64), "smoke": (1, 8)}
MEMORY_TOKENS = {"full": 8192, "smoke": 16}
DECODE_TARGET_SHAPE = Shape(1, 4096, 4096, 32)
TARGETS_4BIT = {"qlora_speedup_vs_peft_bnb": 1.4, "decode_overhead_vs_base": 0.03, "decode_4bit_vs_bnb": 1.0}
SEED_CLAIM = "+0–3% latency, −30% VRAM in 4-bit"
BNB_4BIT = {"quant_type": "nf4", "compress_statistics": True, "blocksize": 64}  # QLoRA's defaults


@dataclass(frozen=True)
class Case:
    shape: Shape
    mode: str
    dtype: torch.dtype
    dropout_p: float
    scaling: float
    device: torch.device
    compile_cpu: bool
    base: str = "bf16"  # "bf16" | "nf4": the frozen weight's storage (compute is always bf16)
    suite: str = "training"  # "training" | "decode"

    @property
    def training(self) -> bool:
        return self.mode != "forward"


@dataclass(frozen=True)
class Weights:
    """The values every peer starts from: weight (out, in), lora_A (r, in), lora_B (out, r), all in bf16.

    Over a 4-bit base, `base_4bit` is the quantised `bnb.nn.Linear4bit` and `weight` its dequantised values.
    """

    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base_4bit: nn.Module | None = None

    @property
    def frozen(self) -> torch.Tensor:
        """The frozen weight as our op receives it: the bf16 tensor, or the bitsandbytes Params4bit."""
        return self.weight if self.base_4bit is None else self.base_4bit.weight


@dataclass(frozen=True)
class Layer:
    """A peer built for one case: `forward(x) -> y`; backward computes grads for x and `adapter_params`."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    adapter_params: tuple[torch.Tensor, ...]
    base_only: bool = False  # counts the base Linear's FLOPs and bytes only
    note: str = ""


class Skip(Exception):
    """This peer cannot run here; the message says why."""


# ---------------------------------------------------------------- peers


def _adapter_params(case: Case, weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.clone().requires_grad_(case.training) for t in (weights.lora_A, weights.lora_B))


def cdm_op(case: Case, weights: Weights, *, backend: str | None) -> Layer:
    """The public op `cdm_fast.lora_linear` with `backend` (None: auto)."""
    probe = torch.empty(1, case.shape.in_features, device=case.device, dtype=case.dtype)
    if case.device.type != "cuda" and backend not in (None, "torch"):
        try:
            dispatch.select(OP, backend, probe, weights.frozen, weights.lora_A, weights.lora_B, None)
            reason = "the Triton interpreter on the CPU is not timed"
        except BackendUnavailable as error:
            reason = str(error)
        raise Skip(reason)
    resolved = dispatch.select(
        OP, backend, probe, weights.frozen, weights.lora_A, weights.lora_B, None
    ).backend
    lora_A, lora_B = _adapter_params(case, weights)

    def forward(x):
        return cdm_fast.lora_linear(
            x,
            weights.frozen,
            lora_A,
            lora_B,
            case.scaling,
            dropout_p=case.dropout_p,
            training=case.training,
            backend=backend,
        )

    return Layer(forward, (lora_A, lora_B), note=f"auto chose {resolved}" if backend is None else "")


def cdm_kernel_strategy(case: Case, weights: Weights, *, strategy: str) -> Layer:
    """The Triton forward kernel with `strategy`: u in the base GEMM's mainloop, a separate pass, or the
    split-K decode kernel."""
    try:
        from cdm_fast.kernels import lora as kernels
    except ImportError as error:
        raise Skip(f"cdm_fast.kernels.lora cannot be imported ({error})") from None
    if "strategy" not in inspect.signature(kernels.forward).parameters:
        raise Skip("cdm_fast.kernels.lora.forward has no `strategy` argument")
    if case.mode != "forward":
        raise Skip("the strategy picks the forward kernel only; training modes are timed as cdm-triton")
    if case.device.type != "cuda":
        raise Skip("Triton kernels are not timed on the CPU")

    def forward(x):
        out = kernels.forward(
            x.reshape(-1, x.shape[-1]),
            weights.weight,
            weights.lora_A,
            weights.lora_B,
            None,
            case.scaling,
            0.0,
            0,
            strategy=strategy,
        )
        return out[0] if isinstance(out, tuple) else out

    return Layer(forward, ())


def _peft_layer(case: Case, weights: Weights, *, autocast_adapter_dtype: bool) -> nn.Module:
    """A real peft `lora.Linear` around a bf16 nn.Linear of `weights.weight`, adapters as peft makes them.

    Over a 4-bit base: a peft `lora.bnb.Linear4bit` around a copy of `weights.base_4bit` (peft picks its
    bitsandbytes layer only for a model marked `is_loaded_in_4bit`, as transformers marks a QLoRA model).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise Skip("peft is not installed") from None
    _, in_features, out_features, rank = case.shape
    model = nn.Sequential()
    if case.base == "nf4":
        model.add_module("proj", copy.deepcopy(weights.base_4bit))
        model.is_loaded_in_4bit = True
    else:
        model.add_module(
            "proj", nn.Linear(in_features, out_features, bias=False, device=case.device, dtype=case.dtype)
        )
        with torch.no_grad():
            model.proj.weight.copy_(weights.weight)
    config = LoraConfig(
        r=rank, lora_alpha=case.scaling * rank, lora_dropout=case.dropout_p, target_modules=["proj"]
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    layer = peft_model.base_model.model.proj
    expected = "Linear4bit" if case.base == "nf4" else "Linear"
    if type(layer).__name__ != expected:
        raise TypeError(
            f"peft wrapped the base in {type(layer).__module__}.{type(layer).__name__}, not {expected}"
        )
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(weights.lora_A)
        layer.lora_B["default"].weight.copy_(weights.lora_B)
    layer.train(case.training)
    for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        param.requires_grad_(case.training)
    return layer


def _peft_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def peft_default(case: Case, weights: Weights) -> Layer:
    layer = _peft_layer(case, weights, autocast_adapter_dtype=True)
    dtype = str(layer.lora_A["default"].weight.dtype).removeprefix("torch.")
    return Layer(layer, _peft_params(layer), note=f"adapters in {dtype} (autocast_adapter_dtype=True)")


def peft_no_input_cast(case: Case, weights: Weights) -> Layer:
    """peft with autocast_adapter_dtype=False (adapters stay bf16) and cast_input_dtype_enabled=False.

    peft 0.21 exposes the flag per layer (`peft.helpers.disable_input_dtype_casting` sets it on every
    tuner layer); with bf16 adapters x is not cast anyway, and fp32 adapters with casting off would fail.
    """
    layer = _peft_layer(case, weights, autocast_adapter_dtype=False)
    layer.cast_input_dtype_enabled = False
    return Layer(layer, _peft_params(layer), note="adapters in bf16, cast_input_dtype_enabled=False")


def peft_compiled(case: Case, weights: Weights) -> Layer:
    if case.device.type != "cuda" and not case.compile_cpu:
        raise Skip("torch.compile is not timed on the CPU (compiling takes minutes there); --compile-cpu")
    layer = _peft_layer(case, weights, autocast_adapter_dtype=True)
    # Every case compiles lora.Linear.forward anew; without a reset, dynamo's recompile limit would
    # silently leave later cases in eager mode.
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=False)
    if case.base == "nf4":
        probe = torch.randn(case.shape.tokens, case.shape.in_features, device=case.device, dtype=case.dtype)
        try:
            with torch.set_grad_enabled(case.training):
                y = compiled(probe.requires_grad_(case.training))
                if case.training:
                    y.sum().backward()
        except Exception as error:
            message = " ".join(str(error).split())[:200]
            raise Skip(
                f"torch.compile fails on peft's bitsandbytes layer: {type(error).__name__}: {message}"
            ) from None
        for param in _peft_params(layer):
            param.grad = None
        return Layer(
            compiled, _peft_params(layer), note="torch.compile(peft lora.bnb.Linear4bit), QLoRA defaults"
        )
    return Layer(compiled, _peft_params(layer), note="torch.compile(peft lora.Linear), default peft config")


class _AddmmLora(torch.autograd.Function):
    """Unsloth-style cuBLAS sequence: out = x@Wᵀ; out.addmm_(x@Aᵀ, Bᵀ, alpha=s); backward with addmm_ too."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        u = x2d @ lora_A.t()
        out = x2d @ weight.t()
        out.addmm_(u, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, u)
        ctx.scaling = scaling
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_A, lora_B, u = ctx.saved_tensors
        scaling = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        v = dy @ lora_B
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ weight
            grad_x.addmm_(v, lora_A, alpha=scaling)
            grad_x = grad_x.reshape(grad_out.shape[:-1] + (weight.shape[1],))
        if ctx.needs_input_grad[2]:
            grad_A = torch.addmm(lora_A, v.t(), x2d, beta=0, alpha=scaling)
        if ctx.needs_input_grad[3]:
            grad_B = torch.addmm(lora_B, dy.t(), u, beta=0, alpha=scaling)
        return grad_x, None, grad_A, grad_B, None


def unsloth_addmm(case: Case, weights: Weights) -> Layer:
    if case.training and case.dropout_p > 0:
        raise Skip("Unsloth's fused LoRA path needs dropout 0 (it falls back to peft otherwise)")
    lora_A, lora_B = _adapter_params(case, weights)
    return Layer(
        lambda x: _AddmmLora.apply(x, weights.weight, lora_A, lora_B, case.scaling),
        (lora_A, lora_B),
        note="hand-written, adapters in bf16",
    )


def base_linear(case: Case, weights: Weights) -> Layer:
    return Layer(
        lambda x: torch.nn.functional.linear(x, weights.weight),
        (),
        base_only=True,
        note="frozen base alone (the floor): no adapter; backward = input grad only",
    )


def bnb_4bit_base(case: Case, weights: Weights) -> Layer:
    layer = copy.deepcopy(weights.base_4bit).train(case.training)
    return Layer(
        layer,
        (),
        base_only=True,
        note="bitsandbytes Linear4bit alone (the floor): bnb.matmul_4bit, no adapter; backward = input grad",
    )


def transformer_engine(case: Case, weights: Weights) -> Layer:
    raise Skip(
        "Transformer Engine has no LoRA layer, and its wheel (276 MB) cannot travel to the GPU machine"
    )


PEERS: dict[str, Callable[[Case, Weights], Layer]] = {
    "cdm-auto": functools.partial(cdm_op, backend=None),
    "cdm-torch": functools.partial(cdm_op, backend="torch"),
    "cdm-triton": functools.partial(cdm_op, backend="triton"),
    "cdm-cuda": functools.partial(cdm_op, backend="cuda"),
    "cdm-triton-mainloop": functools.partial(cdm_kernel_strategy, strategy="mainloop"),
    "cdm-triton-separate": functools.partial(cdm_kernel_strategy, strategy="separate"),
    BASELINE: peft_default,
    "peft-bf16-no-cast": peft_no_input_cast,
    "peft-compiled": peft_compiled,
    "unsloth-addmm": unsloth_addmm,
    "te-linear": transformer_engine,
    FLOOR: base_linear,
}
OURS = ("cdm-auto", "cdm-triton", "cdm-cuda")  # the rows --check-targets judges
PEFT_BNB, BNB_FLOOR = "peft-bnb-qlora", "bnb-4bit-base"
PEERS_4BIT: dict[str, Callable[[Case, Weights], Layer]] = {
    "cdm-auto": functools.partial(cdm_op, backend=None),
    "cdm-torch": functools.partial(cdm_op, backend="torch"),
    "cdm-triton": functools.partial(cdm_op, backend="triton"),
    "cdm-cuda": functools.partial(cdm_op, backend="cuda"),
    PEFT_BNB: peft_default,
    "peft-bnb-compiled": peft_compiled,
    BNB_FLOOR: bnb_4bit_base,
}
# The N-only decode grid ("mainloop") beside the split-K one: the pair shows what splitting K buys.
PEERS_DECODE = {
    name: PEERS[name]
    for name in (
        "cdm-auto",
        "cdm-torch",
        "cdm-triton",
        "cdm-cuda",
        "cdm-triton-mainloop",
        BASELINE,
        "unsloth-addmm",
        FLOOR,
    )
} | {"cdm-triton-splitk": functools.partial(cdm_kernel_strategy, strategy="splitk")}
PEERS_DECODE_4BIT = {
    name: PEERS_4BIT[name]
    for name in ("cdm-auto", "cdm-torch", "cdm-triton", "cdm-cuda", PEFT_BNB, BNB_FLOOR)
}


@dataclass(frozen=True)
class Suite:
    """Which cases run against which peers; `baseline` and `floor` name the rows the ratios divide by."""

    suite: str  # "training" | "decode"
    base: str  # "bf16" | "nf4"
    peers: dict[str, Callable[[Case, Weights], Layer]]
    baseline: str
    floor: str

    @property
    def name(self) -> str:
        return f"{self.suite}-{self.base}"


SUITES = {
    suite.name: suite
    for suite in (
        Suite("training", "bf16", PEERS, BASELINE, FLOOR),
        Suite("training", "nf4", PEERS_4BIT, PEFT_BNB, BNB_FLOOR),
        Suite("decode", "bf16", PEERS_DECODE, BASELINE, FLOOR),
        Suite("decode", "nf4", PEERS_DECODE_4BIT, PEFT_BNB, BNB_FLOOR),
    )
}


# ---------------------------------------------------------------- cost model


def flops(shape: Shape, mode: str, base_only: bool = False) -> int:
    m, i, o, r = shape
    base = 2 * m * i * o
    forward = base if base_only else base + 2 * m * r * (i + o)
    backward = base if base_only else base + 4 * m * r * (i + o)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def bytes_moved(
    shape: Shape, mode: str, base_only: bool = False, element_size: int = 2, weight_bytes: int | None = None
) -> int:
    """weight_bytes: the frozen weight as stored (a packed 4-bit base), read once per forward and backward."""
    m, i, o, r = shape
    if base_only:
        forward = backward = m * i + i * o + m * o
    else:
        forward = m * i + i * o + r * (i + o) + m * o + (m * r if mode != "forward" else 0)
        backward = m * o + 2 * m * i + m * r + i * o + 2 * r * (i + o)
    elements = {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]
    weight_reads = 2 if mode == "forward+backward" else 1
    stored = element_size * i * o if weight_bytes is None else weight_bytes
    return element_size * elements + (stored - element_size * i * o) * weight_reads


def packed_bytes(base_4bit: nn.Module) -> int:
    """Bytes of a quantised bnb Linear4bit's weight as stored: codes, absmax and nested statistics."""
    state = base_4bit.weight.quant_state
    parts = [base_4bit.weight.data, state.absmax]
    if state.nested:
        parts += [state.state2.absmax, state.state2.code]
    return common.tensor_bytes(parts)


def quantize_4bit(weight: torch.Tensor) -> nn.Module:
    """A bnb.nn.Linear4bit holding `weight` (out, in) as NF4 with QLoRA's defaults (BNB_4BIT), quantised on
    weight's device: Params4bit quantises on its first `.to(device)` (`.cuda()` is the same call), the CPU
    included in bitsandbytes 0.50."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Skip("bitsandbytes is not installed") from None
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=weight.dtype,
        compress_statistics=BNB_4BIT["compress_statistics"],
        quant_type=BNB_4BIT["quant_type"],
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, **BNB_4BIT)
    if not quant.cpu_repackable(out_features, in_features, BNB_4BIT["blocksize"]):
        # bitsandbytes' AVX512-BF16 CPU inference repack raises on this shape: its peers keep the standard
        # layout here, as they do on every other CPU.
        quant.keep_standard_layout(layer)
    return layer.to(weight.device)


# ---------------------------------------------------------------- running


def make_weights(shape: Shape, device: torch.device, dtype: torch.dtype, base: str = "bf16") -> Weights:
    _, in_features, out_features, rank = shape
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / math.sqrt(in_features)
    lora_A = torch.randn(rank, in_features, device=device, dtype=dtype) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, rank, device=device, dtype=dtype) / math.sqrt(rank)
    if base == "bf16":
        return Weights(weight, lora_A, lora_B)
    base_4bit = quantize_4bit(weight)
    # bitsandbytes' own CPU dequantisation misplaces blocks that cross a row end on AVX512 CPUs (README);
    # cdm_fast.quant's is checked bit for bit against a float64 one.
    dequantized = quant.dequantize(quant.from_bitsandbytes(base_4bit.weight), dtype)
    return Weights(dequantized, lora_A, lora_B, base_4bit)


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape.tokens, shape.in_features, device=device, dtype=dtype)
    grad_y = torch.randn(shape.tokens, shape.out_features, device=device, dtype=dtype)
    return x, grad_y


def _grads(y, x, layer: Layer, grad_y, retain_graph: bool = False):
    return torch.autograd.grad(y, (x, *layer.adapter_params), grad_y, retain_graph=retain_graph)


def timed_call(layer: Layer, mode: str, sets: list[tuple]) -> tuple[Callable, list[tuple]]:
    """(fn, its argument sets) that time `mode`; backward builds one graph per set first."""
    if mode == "forward":

        def forward(x, grad_y):
            with torch.no_grad():
                return layer.forward(x)

        return forward, sets
    leaves = [(x.detach().requires_grad_(True), grad_y) for x, grad_y in sets]
    if mode == "forward+backward":

        def forward_backward(x, grad_y):
            return _grads(layer.forward(x), x, layer, grad_y)

        return forward_backward, leaves

    def backward(y, x, grad_y):
        return _grads(y, x, layer, grad_y, retain_graph=True)

    return backward, [(layer.forward(x), x, grad_y) for x, grad_y in leaves]


class Reference:
    """float64 forward output on a row subset of the first input set (rows are independent)."""

    def __init__(self, x: torch.Tensor, weights: Weights, scaling: float, max_rows: int):
        step = 1 if max_rows <= 0 else max(1, math.ceil(x.shape[0] / max_rows))
        self.rows = torch.arange(0, x.shape[0], step, device=x.device)
        w = weights
        self.y = reference(
            x[self.rows].double(), w.weight.double(), w.lora_A.double(), w.lora_B.double(), scaling
        )
        self.base_y = x[self.rows].double() @ w.weight.double().T

    def error(self, y: torch.Tensor, base_only: bool) -> float:
        return common.rel_error(y.reshape(-1, y.shape[-1])[self.rows], self.base_y if base_only else self.y)


# Everything a row measures, None until measured (or where it does not apply).
_MEASURED = dict.fromkeys(
    "ms min_ms repeats timing flops bytes tflops gb_s peak_fraction ratio_vs_peft overhead_vs_base"
    " peak_memory_bytes weights_bytes vram_vs_bf16_base error_vs_float64 targets".split()
)


def _new_row(env: dict, case: Case, impl: str, **fields) -> dict:
    """One JSON line with every key present (None where it does not apply)."""
    row = {**env, "bench": "lora", "case": "projection", "shape": case.shape.as_dict(), "mode": case.mode}
    row.update(suite=case.suite, base=case.base)
    row.update(dtype=str(case.dtype).removeprefix("torch."), dropout_p=case.dropout_p, scaling=case.scaling)
    row.update(impl=impl, **_MEASURED, note="", performance_claim=case.device.type == "cuda", **fields)
    return row


def _set_rates(row: dict, ceilings: dict | None) -> None:
    row["tflops"] = row["flops"] / row["ms"] / 1e9
    row["gb_s"] = row["bytes"] / row["ms"] / 1e6
    if ceilings:
        row["peak_fraction"] = row["flops"] / (ceilings["bf16_gemm_tflops"] * 1e9) / row["ms"]


def run_case(case: Case, suite: Suite, args, env: dict, ceilings) -> tuple[list[dict], bool]:
    """Time every peer of `suite` on one (shape, mode); returns the rows and whether any peer failed."""
    device = case.device
    weights = make_weights(case.shape, device, case.dtype, case.base)
    weight_bytes = None if weights.base_4bit is None else packed_bytes(weights.base_4bit)
    sets = common.rotating_input_sets(lambda: make_inputs(case.shape, device, case.dtype), device)
    check_error = case.mode == "forward" or case.dropout_p == 0
    ref = Reference(sets[0][0], weights, case.scaling, args.error_rows) if check_error else None
    rows, failed = [], False
    for name, build in suite.peers.items():
        row = _new_row(env, case, name, input_sets=len(sets))
        try:
            layer = build(case, weights)
            row["note"] = layer.note
            row["flops"] = flops(case.shape, case.mode, layer.base_only)
            row["bytes"] = bytes_moved(
                case.shape, case.mode, layer.base_only, case.dtype.itemsize, weight_bytes
            )
            fn, fn_sets = timed_call(layer, case.mode, sets)
            if ref is not None:
                with torch.set_grad_enabled(case.training):
                    row["error_vs_float64"] = ref.error(layer.forward(sets[0][0]), layer.base_only)
            timing = common.time_fn(fn, fn_sets, device, repeats=args.repeats)
            row.update(ms=timing.ms, min_ms=timing.min_ms, repeats=timing.repeats, timing=timing.method)
            _set_rates(row, ceilings)
            row["peak_memory_bytes"] = common.peak_memory(fn, fn_sets[0], device)
            del fn, fn_sets, layer
        except (Skip, BackendUnavailable) as reason:
            row["note"] = f"skipped: {reason}"
        except Exception as error:
            failed = True
            row["note"] = f"failed: {type(error).__name__}: {error}".strip()
            traceback.print_exc()
        rows.append(row)
    add_ratios(rows, suite)
    return rows, failed


def add_ratios(rows: list[dict], suite: Suite) -> None:
    """ratio_vs_peft = the suite's peft ms / ms; overhead_vs_base = ms / its floor's ms - 1 (same case)."""
    peft = next((r["ms"] for r in rows if r["impl"] == suite.baseline and r["ms"]), None)
    base = next((r["ms"] for r in rows if r["impl"] == suite.floor and r["ms"]), None)
    for row in rows:
        if row["ms"]:
            row["ratio_vs_peft"] = peft / row["ms"] if peft else None
            row["overhead_vs_base"] = row["ms"] / base - 1 if base else None


def layer_set_rows(rows: list[dict], suite: Suite, layer_set, rank: int, ceilings) -> list[dict]:
    """Per (peer, mode, tokens) of `suite`: the sum over the layer set's projections of their medians, when
    all were timed."""
    counts: dict[tuple[int, int], int] = {}
    for _, in_features, out_features in layer_set:
        counts[(in_features, out_features)] = counts.get((in_features, out_features), 0) + 1
    rows = [r for r in rows if (r["suite"], r["base"]) == (suite.suite, suite.base)]
    summed = []
    for mode, tokens in dict.fromkeys((r["mode"], r["shape"]["tokens"]) for r in rows):
        mode_rows = []
        for impl in suite.peers:
            parts = {
                (r["shape"]["in"], r["shape"]["out"]): r
                for r in rows
                if r["impl"] == impl
                and r["mode"] == mode
                and r["shape"]["tokens"] == tokens
                and r["shape"]["r"] == rank
                and r["case"] == "projection"
            }
            first = next(iter(parts.values()), None)
            if first is None or not set(counts) <= set(parts):
                continue
            row = {**first, **_MEASURED, "case": "layer-set", "note": "", "input_sets": None}
            row["shape"] = {
                "tokens": first["shape"]["tokens"],
                "r": rank,
                "projections": [n for n, *_ in layer_set],
            }
            part_rows = [(parts[key], n) for key, n in counts.items()]
            untimed = [p["note"] for p, _ in part_rows if not p["ms"]]
            if untimed:
                row["note"] = untimed[0]
            else:
                row["ms"] = sum(p["ms"] * n for p, n in part_rows)
                row["flops"] = sum(p["flops"] * n for p, n in part_rows)
                row["bytes"] = sum(p["bytes"] * n for p, n in part_rows)
                errors = [p["error_vs_float64"] for p, _ in part_rows if p["error_vs_float64"] is not None]
                row["error_vs_float64"] = max(errors) if errors else None
                row["timing"] = "sum of per-projection medians"
                row["note"] = "; ".join(dict.fromkeys(p["note"] for p, _ in part_rows if p["note"]))
                _set_rates(row, ceilings)
            mode_rows.append(row)
        add_ratios(mode_rows, suite)
        summed.extend(mode_rows)
    return summed


# ---------------------------------------------------------------- targets


def check_targets(rows: list[dict], env: dict) -> list[str]:
    """The issue's targets at TARGET_SHAPE, forward+backward, on an H100; verdicts go to row["targets"]."""
    lines = [
        f"\ntargets ({TARGET_DEVICE}, bf16, r={TARGET_SHAPE.rank}, tokens {TARGET_SHAPE.tokens}, "
        f"{TARGET_SHAPE.in_features}x{TARGET_SHAPE.out_features}, forward+backward):"
    ]
    unmeasured = None
    if TARGET_DEVICE not in (env["device"] or ""):
        unmeasured = f"device is {env['device']}, not an {TARGET_DEVICE}"
    at_target = [
        r
        for r in rows
        if r["case"] == "projection"
        and (r["suite"], r["base"]) == ("training", "bf16")
        and r["mode"] == "forward+backward"
        and r["shape"] == TARGET_SHAPE.as_dict()
        and r["dtype"] == "bfloat16"
    ]
    if not at_target:
        unmeasured = unmeasured or "the target shape and mode were not run"
    by_impl = {r["impl"]: r for r in at_target}
    peft, base = by_impl.get(BASELINE), by_impl.get(FLOOR)
    for impl in OURS:
        row = by_impl.get(impl)
        ours_ms = row["ms"] if row else None
        peak = row["peak_memory_bytes"] if row else None
        values = {
            "speedup_vs_peft": peft["ms"] / ours_ms if ours_ms and peft and peft["ms"] else None,
            "overhead_vs_base": ours_ms / base["ms"] - 1 if ours_ms and base and base["ms"] else None,
            "peak_memory_vs_peft": peak / peft["peak_memory_bytes"]
            if peak is not None and peft and peft["peak_memory_bytes"]
            else None,
        }
        passes = {
            "speedup_vs_peft": lambda v: v >= TARGETS["speedup_vs_peft"],
            "overhead_vs_base": lambda v: v <= TARGETS["overhead_vs_base"],
            "peak_memory_vs_peft": lambda v: v <= TARGETS["peak_memory_vs_peft"],
        }
        labels = {
            "speedup_vs_peft": f"speed-up vs {BASELINE} (target >= {TARGETS['speedup_vs_peft']}x)",
            "overhead_vs_base": f"overhead vs {FLOOR}'s fwd+dx (target <= {TARGETS['overhead_vs_base']:.0%})",
            "peak_memory_vs_peft": f"peak memory / {BASELINE}'s (target <= {TARGETS['peak_memory_vs_peft']})",
        }
        verdicts = {}
        for key, value in values.items():
            if unmeasured or value is None:
                why = unmeasured or (row and row["note"]) or f"{impl} or a peer was not timed"
                verdicts[key] = f"unmeasured: {why}"
            else:
                verdicts[key] = "pass" if passes[key](value) else "fail"
            shown = "-" if value is None else f"{value:.3f}"
            lines.append(f"  {impl:<10} {labels[key]:<62} {shown:>7}  {verdicts[key]}")
        if row is not None:
            met = all(v == "pass" for v in verdicts.values())
            row["targets"] = {**values, "verdicts": verdicts, "met": met}
    return lines


def _row_at(rows: list[dict], suite: str, base: str, mode: str, shape: Shape, impl: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["case"] == "projection"
            and (r["suite"], r["base"], r["mode"], r["impl"]) == (suite, base, mode, impl)
            and r["shape"] == shape.as_dict()
        ),
        None,
    )


def check_targets_4bit(rows: list[dict], env: dict) -> list[str]:
    """Issue 14's targets (4-bit base and decode, TARGETS_4BIT) on an H100; verdicts go to row["targets"]."""
    speedup, overhead, vs_bnb = (TARGETS_4BIT[k] for k in TARGETS_4BIT)
    specs = [  # key, label, (suite, base, mode, shape), the peer divided by, value(ours_ms, their_ms), passes
        (
            "qlora_speedup_vs_peft_bnb",
            f"4-bit training fwd+bwd, speed-up vs {PEFT_BNB} (>= {speedup}x)",
            ("training", "nf4", "forward+backward", TARGET_SHAPE),
            PEFT_BNB,
            lambda ours, theirs: theirs / ours,
            lambda v: v >= speedup,
        ),
        (
            "decode_overhead_vs_base",
            f"1-token decode, bf16 base: overhead vs {FLOOR} (<= {overhead:.0%})",
            ("decode", "bf16", "forward", DECODE_TARGET_SHAPE),
            FLOOR,
            lambda ours, theirs: ours / theirs - 1,
            lambda v: v <= overhead,
        ),
        (
            "decode_overhead_vs_base",
            f"1-token decode, 4-bit base: overhead vs {BNB_FLOOR} (<= {overhead:.0%})",
            ("decode", "nf4", "forward", DECODE_TARGET_SHAPE),
            BNB_FLOOR,
            lambda ours, theirs: ours / theirs - 1,
            lambda v: v <= overhead,
        ),
        (
            "decode_4bit_vs_bnb",
            f"1-token 4-bit decode, speed vs {BNB_FLOOR} (>= {vs_bnb}x)",
            ("decode", "nf4", "forward", DECODE_TARGET_SHAPE),
            BNB_FLOOR,
            lambda ours, theirs: theirs / ours,
            lambda v: v >= vs_bnb,
        ),
    ]
    lines = [
        f"\nissue 14 targets ({TARGET_DEVICE}, bf16 compute, r={TARGET_SHAPE.rank}, "
        f"{TARGET_SHAPE.in_features}x{TARGET_SHAPE.out_features}; "
        f"training {TARGET_SHAPE.tokens} tokens, decode 1):"
    ]
    off_device = None
    if TARGET_DEVICE not in (env["device"] or ""):
        off_device = f"device is {env['device']}, not an {TARGET_DEVICE}"
    for key, label, where, peer, value_of, passes in specs:
        theirs = _row_at(rows, *where, peer)
        for impl in OURS:
            row = _row_at(rows, *where, impl)
            value = None
            if row and row["ms"] and theirs and theirs["ms"]:
                value = value_of(row["ms"], theirs["ms"])
            if off_device or value is None:
                suite, base = where[0], where[1]
                why = (
                    off_device
                    or (row and row["note"])
                    or f"{impl} at {suite}-{base} {where[2]} was not timed"
                )
                verdict = f"unmeasured: {why}"
            else:
                verdict = "pass" if passes(value) else "fail"
            shown = "-" if value is None else f"{value:.3f}"
            lines.append(f"  {impl:<10} {label:<72} {shown:>7}  {verdict}")
            if row is not None:
                targets = row["targets"] or {"verdicts": {}}
                targets[key] = value
                targets["verdicts"][key] = verdict
                targets["met"] = all(v == "pass" for v in targets["verdicts"].values())
                row["targets"] = targets
    return lines


# ---------------------------------------------------------------- memory


def _layer_set_step(layers: dict[str, Layer], x: torch.Tensor, training: bool) -> torch.Tensor:
    """The layer set's projections as in a decoder layer without attention; backward when training."""
    with torch.set_grad_enabled(training):
        total = sum(
            layer.forward(x).float().sum()
            for name, layer in layers.items()
            if name not in ("gate_proj", "up_proj", "down_proj")
        )
        hidden = nn.functional.silu(layers["gate_proj"].forward(x)) * layers["up_proj"].forward(x)
        total = total + layers["down_proj"].forward(hidden).float().sum()
        if training:
            total.backward()
    return total.detach()


def run_memory(size: str, env: dict, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], bool]:
    """Peak memory of one 7B-like layer set over a bf16 vs a 4-bit base, for ours and peft (see docstring)."""
    tokens, rank, layer_set = MEMORY_TOKENS[size], LAYER_SET_RANK[size], LAYER_SETS[size]
    rows, failed = [], False
    for base, peers in (("bf16", PEERS), ("nf4", PEERS_4BIT)):
        peft_name = BASELINE if base == "bf16" else PEFT_BNB
        for impl in ("cdm-auto", peft_name):
            for mode in ("forward", "forward+backward"):
                _, in_features, out_features = layer_set[0]
                shape = Shape(tokens, in_features, out_features, rank)
                case = Case(shape, mode, dtype, 0.0, 2.0, device, False, base, "memory")
                row = _new_row(env, case, impl)
                row["case"] = "memory"
                row["shape"] = {"tokens": tokens, "r": rank, "projections": [n for n, *_ in layer_set]}
                try:
                    row.update(_measure_layer_set(case, peers[impl], layer_set))
                except (Skip, BackendUnavailable) as reason:
                    row["note"] = f"skipped: {reason}"
                except Exception as error:
                    failed = True
                    row["note"] = f"failed: {type(error).__name__}: {error}".strip()
                    traceback.print_exc()
                rows.append(row)
    for row in rows:
        bf16_impl = "cdm-auto" if row["impl"] == "cdm-auto" else BASELINE
        bf16 = next(r for r in rows if (r["base"], r["impl"], r["mode"]) == ("bf16", bf16_impl, row["mode"]))
        if row["peak_memory_bytes"] and bf16 and bf16["peak_memory_bytes"]:
            row["vram_vs_bf16_base"] = row["peak_memory_bytes"] / bf16["peak_memory_bytes"] - 1
    return rows, failed


def _measure_layer_set(case: Case, build: Callable[[Case, Weights], Layer], layer_set) -> dict:
    device = case.device
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    layers = {}
    for name, in_features, out_features in layer_set:
        shape = Shape(case.shape.tokens, in_features, out_features, case.shape.rank)
        weights = make_weights(shape, device, case.dtype, case.base)
        if case.base == "nf4":  # keep only the packed weight alive, as a QLoRA model does
            weights = Weights(
                torch.empty(0, device=device), weights.lora_A, weights.lora_B, weights.base_4bit
            )
        layers[name] = build(dataclasses.replace(case, shape=shape), weights)
        del weights
    x = torch.randn(case.shape.tokens, layer_set[0][1], device=device, dtype=case.dtype)
    x.requires_grad_(case.training)
    gc.collect()
    if not cuda:
        _layer_set_step(layers, x, case.training)
        return {"note": "unmeasured: no CUDA (peak memory is torch.cuda.max_memory_allocated); ran once"}
    torch.cuda.synchronize(device)
    weights_bytes = torch.cuda.memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    _layer_set_step(layers, x, case.training)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    note = "weights, adapters, input, activations, grads; no optimizer state"
    return {"peak_memory_bytes": peak, "weights_bytes": weights_bytes, "note": note}


def seed_claim_summary(rows: list[dict]) -> list[str]:
    """The seed's claim beside what this run measured (or "unmeasured")."""
    lines = [f'\nseed\'s claim: "{SEED_CLAIM}"; measured here:']
    shape = DECODE_TARGET_SHAPE
    latency = []
    for base, floor in (("bf16", FLOOR), ("nf4", BNB_FLOOR)):
        row = _row_at(rows, "decode", base, "forward", shape, "cdm-auto")
        if row is None:
            latency.append(f"{base} base unmeasured (this case was not run)")
        elif not row["performance_claim"] or row["overhead_vs_base"] is None:
            latency.append(f"{base} base unmeasured ({row['note'] or 'no GPU'})")
        else:
            latency.append(f"{base} base {row['overhead_vs_base']:+.1%} over {floor}")
    lines.append(
        f"  latency, LoRA over the base alone (cdm-auto, 1 token, {shape.in_features}x{shape.out_features}, "
        f"r={shape.rank}): " + "; ".join(latency)
    )
    memory = []
    for impl in ("cdm-auto", PEFT_BNB):
        for mode in ("forward", "forward+backward"):
            key = ("memory", "nf4", impl, mode)
            row = next((r for r in rows if (r["case"], r["base"], r["impl"], r["mode"]) == key), None)
            label = f"{impl} {'training step' if mode != 'forward' else 'forward'}"
            if row is None:
                memory.append(f"{label} unmeasured (not run: --4bit)")
            elif row["vram_vs_bf16_base"] is None:
                memory.append(f"{label} unmeasured")
            else:
                memory.append(f"{label} {row['vram_vs_bf16_base']:+.0%}")
    lines.append("  peak memory, 4-bit base vs bf16 base (7B-like layer set): " + "; ".join(memory))
    return lines


# ---------------------------------------------------------------- printing and CLI


def _describe(case: Case, env: dict, sets_note: str) -> str:
    commit = (env["git_commit"] or "unknown") + (" (dirty)" if env["git_dirty"] else "")
    device_text = f"{env['device']} (cc {env['cc']})" if env["cc"] else "cpu"
    m, i, o, r = case.shape
    return (
        f"\nlora {case.suite}, {case.base} base  tokens={m} in={i} out={o} r={r}  {case.mode}  bf16 compute  "
        f"dropout {case.dropout_p}  "
        f"GFLOP {flops(case.shape, case.mode) / 1e9:.4g}\n"
        f"{device_text}  torch {env['torch']}  triton {env['triton']}  peft {env['peft']}  commit {commit}  "
        f"{sets_note}"
    )


def _table(rows: list[dict], memory: bool = False) -> str:
    columns = [
        common.Column("impl", "impl"),
        common.Column("base", "base"),
        common.Column("mode", "mode"),
        common.Column("peak MiB", "peak_mib", "{:.0f}"),
        common.Column("weights MiB", "weights_mib", "{:.0f}"),
        common.Column("vs bf16 base", "vram_vs_bf16_base", "{:+.0%}"),
        common.Column("note", "note_ref"),
    ]
    if not memory:
        columns = [
            common.Column("impl", "impl"),
            common.Column("ms", "ms", "{:.3f}"),
            common.Column("TFLOP/s", "tflops", "{:.3g}"),
            common.Column("GB/s", "gb_s", "{:.3g}"),
            common.Column("of bf16 GEMM", "peak_fraction", "{:.0%}"),
            common.Column("vs peft", "ratio_vs_peft", "{:.2f}x"),
            common.Column("over base", "overhead_vs_base", "{:+.1%}"),
            common.Column("peak MiB", "peak_mib", "{:.0f}"),
            common.Column("err fp64", "error_vs_float64", "{:.2e}"),
            common.Column("note", "note_ref"),
        ]
    derived = {"peak_mib": common.mib("peak_memory_bytes"), "weights_mib": common.mib("weights_bytes")}
    return common.format_table_with_notes(rows, columns, derived)


def _cases(suite: Suite, args) -> list[tuple[Shape, str]]:
    """(shape, mode) pairs of a suite: training shapes × --mode, or decode token counts × shapes, forward."""
    if suite.suite == "decode":
        return [
            (s._replace(tokens=t), "forward") for t in DECODE_TOKENS[args.size] for s in SHAPES[args.size]
        ]
    return [(shape, mode) for shape in SHAPES[args.size] for mode in args.modes]


def parse_args(argv: list[str] | None, device: torch.device) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", dest="modes", action="append", choices=MODES, help="repeatable (default: all)"
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout p in the training modes")
    parser.add_argument("--scaling", type=float, default=2.0, help="alpha / r (default 2: alpha = 2r)")
    parser.add_argument(
        "--4bit", dest="four_bit", action="store_true", help="bitsandbytes NF4 base (QLoRA); with peak memory"
    )
    parser.add_argument("--decode", action="store_true", help="decode shapes: tokens 1, 8, 64, forward only")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes: every path in seconds (alone: every suite)"
    )
    parser.add_argument("--out", type=Path, default=common.default_results_path("lora"))
    parser.add_argument("--repeats", type=int, help="timed calls (default 50; CPU 3)")
    parser.add_argument("--error-rows", type=int, default=1024, help="rows compared with float64 (0: all)")
    parser.add_argument("--compile-cpu", action="store_true", help="also time torch.compile on the CPU")
    parser.add_argument("--check-targets", action="store_true", help="judge the issue's H100 targets")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout: expected 0 <= p < 1, got {args.dropout}")
    args.modes = [m for m in MODES if m in (args.modes or MODES)]
    args.size = "smoke" if args.smoke else "full"
    every_suite = args.smoke and not (args.four_bit or args.decode)
    if every_suite:
        args.suites = list(SUITES)
    elif args.decode:
        args.suites = ["decode-bf16"] + (["decode-nf4"] if args.four_bit else [])
    else:
        args.suites = ["training-nf4" if args.four_bit else "training-bf16"]
    args.memory = every_suite or args.four_bit
    args.repeats = args.repeats or (2 if args.smoke else 50 if device.type == "cuda" else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    device = common.default_device()
    args = parse_args(argv, device)
    if device.type != "cuda":
        print(common.NO_GPU_NOTICE)
    env = common.environment(device)
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    ceilings = None if args.smoke else common.measure_ceilings(device)
    if ceilings:
        print("ceilings: " + "  ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    all_rows, failed = [], False
    layer_set, rank = LAYER_SETS[args.size], LAYER_SET_RANK[args.size]
    for suite in (SUITES[name] for name in args.suites):
        suite_rows = []
        for shape, mode in _cases(suite, args):
            case = Case(
                shape, mode, torch.bfloat16, args.dropout, args.scaling, device, args.compile_cpu, suite.base,
                suite.suite,
            )  # fmt: skip
            rows, case_failed = run_case(case, suite, args, env, ceilings)
            print(_describe(case, env, f"{rows[0]['input_sets']} rotating input set(s)"))
            print(_table(rows))
            suite_rows.extend(rows)
            failed = failed or case_failed
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        summed = layer_set_rows(suite_rows, suite, layer_set, rank, ceilings)
        if summed:
            names = ", ".join(name for name, *_ in layer_set)
            print(f"\n{suite.name}: layer set ({names}), r={rank}: sums of per-projection medians")
            for mode, tokens in dict.fromkeys((r["mode"], r["shape"]["tokens"]) for r in summed):
                part = [r for r in summed if (r["mode"], r["shape"]["tokens"]) == (mode, tokens)]
                print(f"\n{mode}, {tokens} tokens\n" + _table(part))
        all_rows.extend(suite_rows + summed)
    if args.memory:
        rows, memory_failed = run_memory(args.size, env, device, torch.bfloat16)
        failed = failed or memory_failed
        print(
            f"\npeak memory, one layer set ({MEMORY_TOKENS[args.size]} tokens, r={rank}): bf16 vs 4-bit base"
        )
        print(_table(rows, memory=True))
        all_rows.extend(rows)
    if args.check_targets:
        print("\n".join(check_targets(all_rows, env)))
        print("\n".join(check_targets_4bit(all_rows, env)))
    print("\n".join(seed_claim_summary(all_rows)))
    for row in all_rows:
        row.update(ceilings=ceilings, smoke=args.smoke)
    path = common.append_jsonl(args.out, all_rows)
    print(f"\nappended {len(all_rows)} rows to {path}")
    if device.type != "cuda":
        print(common.NO_GPU_NOTICE)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
