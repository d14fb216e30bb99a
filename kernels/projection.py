"""Triton kernels of the Fourier projection (the math, cost model and precisions: `cdm_fast.ops.projection`).

Forward, two GEMMs:
    features:  P = x @ freqs,  F = [sin 2πP, cos 2πP]       (N, 2m): e4m3(256·F) codes, or x.dtype values
    output:    y = F @ weight / sqrt(m) + bias                (N, d_out) in x.dtype
Each GEMM runs in one of three modes (a constexpr):
    "plain"    operands in x.dtype (bf16/fp16/fp32), fp32 accumulation
    "rowwise"  e4m3 codes through tl.dot; fp32 row scales of A and column scales of B applied in the epilogue
    "mx"       e4m3 codes with one ue8m0 scale per 32 along K through tl.dot_scaled (sm_120's full-rate form)
precision "bf16" = plain/plain, F in x.dtype; "fp8-features" = plain/scaled, F fp8; "fp8" = scaled/scaled.
The fp8 operands come from the quantise kernels below, which reproduce `cdm_fast.float8` exactly.

Backward, the exact gradient of the unquantised function:
    phase_grad:  P, G_sin = grad_y @ weight[:m]ᵀ, G_cos = grad_y @ weight[m:]ᵀ recomputed per tile of P, then
                 grad_P = 2π/sqrt(m) · (G_sin·cos 2πP − G_cos·sin 2πP) and F/sqrt(m), both in x.dtype
    matmul:      grad_weight = (F/sqrt(m))ᵀ grad_y,  grad_x = grad_P freqsᵀ,  grad_freqs = xᵀ grad_P
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from cdm_fast import device as devices
from cdm_fast import float8

from .common import (
    E4M3_MAX,
    autotune_configs,
    cast,
    dot_in_dtype,
    grouped_tile,
    load_tile,
    prune_by_shared_memory,
    store_tile,
    to_e4m3,
)

MX_BLOCK = tl.constexpr(float8.MX_BLOCK)
UE8M0_BIAS = tl.constexpr(float8.UE8M0_BIAS)
FEATURE_SCALE = tl.constexpr(float8.FEATURE_SCALE)
FEATURE_SCALE_INVERSE = tl.constexpr(1.0 / float8.FEATURE_SCALE)
# The features' fixed scale 2^-8 as a ue8m0 byte, for tl.dot_scaled's A operand.
FEATURE_SCALE_BYTE = tl.constexpr(float8.UE8M0_BIAS - float8.FEATURE_SCALE_EXPONENT)
TWO_PI = tl.constexpr(2 * math.pi)


def _gemm_configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); the interpreter gets one small one."""
    return autotune_configs(
        [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_stages=stages,
                num_warps=warps,
            )
            for bm, bn, bk, stages, warps in shapes
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_stages=1, num_warps=4),
    )


def _two_operand_stage_bytes(a: str, b: str):
    """Shared memory of one pipeline stage: an A tile (BLOCK_M, BLOCK_K), a B tile (BLOCK_K, BLOCK_N), and
    in mx mode their ue8m0 scales."""

    def stage_bytes(meta, args):
        operands = meta["BLOCK_M"] * args[a].element_size() + meta["BLOCK_N"] * args[b].element_size()
        scales = (meta["BLOCK_M"] + meta["BLOCK_N"]) // float8.MX_BLOCK if args.get("MODE") == "mx" else 0
        return meta["BLOCK_K"] * (operands + scales)

    return stage_bytes


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands must not go through tf32 (10-bit mantissa): the fp32 path promises 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------- fp8 quantisation (cdm_fast.float8, exactly)


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_SLICES": 16, "BLOCK_K": 128}, num_warps=4),
            triton.Config({"BLOCK_SLICES": 16, "BLOCK_K": 256}, num_warps=8),
            triton.Config({"BLOCK_SLICES": 64, "BLOCK_K": 64}, num_warps=8),
        ],
        triton.Config({"BLOCK_SLICES": 16, "BLOCK_K": 32}, num_warps=4),
    ),
    key=["slices", "length"],
)
@triton.jit
def _quantize_rowwise_kernel(
    t_ptr,
    codes_ptr,
    scales_ptr,
    slices,
    length,
    stride_t_slice,
    stride_t_k,
    stride_codes_slice,
    stride_codes_k,
    INTERPRET: tl.constexpr,
    BLOCK_SLICES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """codes = e4m3(t / s), s = amax(|t|) / 448 per slice (1 if all zero), t viewed as (slices, length)."""
    s = tl.program_id(0) * BLOCK_SLICES + tl.arange(0, BLOCK_SLICES)
    amax = tl.zeros((BLOCK_SLICES,), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        tile = load_tile(t_ptr, s, k, stride_t_slice, stride_t_k, slices, length, 0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(tile), axis=1))
    # IEEE division (div_rn), as torch divides: the GPU's default fp32 division is approximate.
    scale = tl.where(amax > 0, tl.math.div_rn(amax, E4M3_MAX), 1.0)
    for k0 in range(0, length, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        tile = load_tile(t_ptr, s, k, stride_t_slice, stride_t_k, slices, length, 0.0).to(tl.float32)
        codes = to_e4m3(tl.math.div_rn(tile, scale[:, None]), INTERPRET)
        store_tile(codes_ptr, codes, s, k, stride_codes_slice, stride_codes_k, slices, length, INTERPRET)
    tl.store(scales_ptr + s, scale, mask=s < slices)


@triton.jit
def _mx_scale_exponent(amax):
    """ceil(log2(amax / 448)) from the fp32 bits, in [-127, 127] (`cdm_fast.float8.mx_scale_exponent`)."""
    bits = tl.math.div_rn(amax, E4M3_MAX).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    exponent = biased - UE8M0_BIAS + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    exponent = tl.where(biased == 0, -UE8M0_BIAS, exponent)
    return tl.minimum(tl.maximum(exponent, -UE8M0_BIAS), UE8M0_BIAS)


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_SLICES": 32, "BLOCK_K": 128}, num_warps=4),
            triton.Config({"BLOCK_SLICES": 64, "BLOCK_K": 64}, num_warps=4),
            triton.Config({"BLOCK_SLICES": 64, "BLOCK_K": 128}, num_warps=8),
        ],
        triton.Config({"BLOCK_SLICES": 16, "BLOCK_K": 64}, num_warps=4),
    ),
    key=["slices", "length"],
)
@triton.jit
def _quantize_mx_kernel(
    t_ptr,
    codes_ptr,
    scales_ptr,
    slices,
    length,
    stride_t_slice,
    stride_t_k,
    stride_codes_slice,
    stride_codes_k,
    stride_scales_slice,
    stride_scales_block,
    INTERPRET: tl.constexpr,
    BLOCK_SLICES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """codes = e4m3(t · 2^-e), e = ceil(log2(amax / 448)) per 32 consecutive k; scales = e + 127 (ue8m0)."""
    s = tl.program_id(0) * BLOCK_SLICES + tl.arange(0, BLOCK_SLICES)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = load_tile(t_ptr, s, k, stride_t_slice, stride_t_k, slices, length, 0.0).to(tl.float32)
    # Zero padding past `length` leaves a short tail block scaled by its own amax, as the recipe says.
    blocks = tl.reshape(tile, (BLOCK_SLICES, BLOCK_K // MX_BLOCK, MX_BLOCK))
    exponent = _mx_scale_exponent(tl.max(tl.abs(blocks), axis=2))
    # 2^-e from its bits: exact, where exp2 may be approximate on the GPU.
    factor = ((-exponent + UE8M0_BIAS) << 23).to(tl.float32, bitcast=True)
    scaled = tl.reshape(blocks * factor[:, :, None], (BLOCK_SLICES, BLOCK_K))
    codes = to_e4m3(scaled, INTERPRET)
    store_tile(codes_ptr, codes, s, k, stride_codes_slice, stride_codes_k, slices, length, INTERPRET)
    b = tl.program_id(1) * (BLOCK_K // MX_BLOCK) + tl.arange(0, BLOCK_K // MX_BLOCK)
    store_tile(
        scales_ptr,
        exponent + UE8M0_BIAS,
        s,
        b,
        stride_scales_slice,
        stride_scales_block,
        slices,
        tl.cdiv(length, MX_BLOCK),
        INTERPRET,
    )


def _slices_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t (2-D) viewed as (slices, reduction length), the reduction along `dim`: a transpose, never a copy."""
    return t if dim % 2 == 1 else t.t()


def quantize_rowwise(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cdm_fast.float8.quantize_rowwise` of a 2-D t: (codes like t, fp32 scales with `dim` kept as 1).

    The codes are stored with `dim` contiguous (K-major, as the fp8 MMAs read both operands).
    """
    view = _slices_along(t, dim)
    slices, length = view.shape
    codes = torch.empty(slices, length, dtype=torch.float8_e4m3fn, device=t.device)
    scales = torch.empty(slices, 1, dtype=torch.float32, device=t.device)
    _quantize_rowwise_kernel[lambda meta: (triton.cdiv(slices, meta["BLOCK_SLICES"]),)](
        view,
        codes,
        scales,
        slices,
        length,
        *view.stride(),
        *codes.stride(),
        INTERPRET=devices.triton_interpret(),
    )
    return _slices_along(codes, dim), _slices_along(scales, dim)


def quantize_mx(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cdm_fast.float8.quantize_mx` of a 2-D t: (codes like t, uint8 scales, `dim` of size ceil(size/32)).

    Codes and scales are stored with `dim` contiguous: the scales of a (K, N) operand are then the
    (N, K/32) matrix tl.dot_scaled takes for its right operand, and (M, K/32) for its left one.
    """
    view = _slices_along(t, dim)
    slices, length = view.shape
    codes = torch.empty(slices, length, dtype=torch.float8_e4m3fn, device=t.device)
    scales = torch.empty(slices, triton.cdiv(length, float8.MX_BLOCK), dtype=torch.uint8, device=t.device)
    _quantize_mx_kernel[
        lambda meta: (triton.cdiv(slices, meta["BLOCK_SLICES"]), triton.cdiv(length, meta["BLOCK_K"]))
    ](
        view,
        codes,
        scales,
        slices,
        length,
        *view.stride(),
        *codes.stride(),
        *scales.stride(),
        INTERPRET=devices.triton_interpret(),
    )
    return _slices_along(codes, dim), _slices_along(scales, dim)


def _gemm_operand(t: torch.Tensor, dim: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A GEMM operand for `mode` with its reduction along `dim`: (codes, scales), or (t, None) when plain."""
    if mode == "rowwise":
        return quantize_rowwise(t, dim)
    if mode == "mx":
        return quantize_mx(t, dim)
    return t, None


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return t.stride() if t is not None else (0, 0)


# ---------------------------------------------------------------- forward GEMMs


@triton.jit
def _sin_cos_of_turns(phase, INTERPRET: tl.constexpr):
    """(sin 2πP, cos 2πP) for phases P in turns."""
    # Dropping whole turns is exact (|P| < 2^22) and leaves an argument in [-π, π], where the hardware's
    # sin.approx/cos.approx are accurate to about 1e-6. tl.sin would take libdevice's full range reduction:
    # a local-memory table and hundreds of instructions per element.
    angle = TWO_PI * (phase - tl.floor(phase + 0.5))
    if INTERPRET:
        sin = tl.sin(angle)
        cos = tl.cos(angle)
    else:
        sin = libdevice.fast_sinf(angle)
        cos = libdevice.fast_cosf(angle)
    return sin, cos


@triton.jit
def _dot(
    acc, a, a_scale, b, b_scale, MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr
):
    """acc + a @ b in `MODE`; mx reads a_scale (BLOCK_M, BLOCK_K/32) and b_scale (BLOCK_N, BLOCK_K/32)."""
    if MODE == "mx":
        acc = tl.dot_scaled(a, a_scale, "e4m3", b, b_scale, "e4m3", acc)
    elif MODE == "rowwise":
        # Row and column scales factor out of the K sum: the epilogue applies them once. Hopper's fp8 MMA
        # accumulates with fewer bits than fp32: promote into the fp32 accumulator once per K tile.
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=a.shape[1])
    else:
        acc = dot_in_dtype(a, b, acc, INPUT_PRECISION, INTERPRET)
    return acc


_FORWARD_GEMM_SHAPES = [
    (128, 128, 64, 4, 8),
    (128, 128, 128, 3, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 128, 4, 4),
    # fp32 operands take 4 bytes: on sm_120 (101,376 B per block) only this tile fits their pipeline.
    (64, 64, 32, 3, 4),
]


@triton.autotune(
    configs=_gemm_configs(_FORWARD_GEMM_SHAPES),
    key=["rows", "num_frequencies", "d_in", "MODE", "FEATURES_FP8"],
    prune_configs_by={
        "early_config_prune": prune_by_shared_memory(_two_operand_stage_bytes("x_ptr", "freqs_ptr"))
    },
)
@triton.jit
def _features_kernel(
    x_ptr,
    x_scale_ptr,
    freqs_ptr,
    freqs_scale_ptr,
    features_ptr,
    rows,
    num_frequencies,
    d_in,
    stride_x_m,
    stride_x_k,
    stride_x_scale_m,
    stride_x_scale_k,
    stride_freqs_k,
    stride_freqs_n,
    stride_freqs_scale_k,
    stride_freqs_scale_n,
    stride_features_m,
    stride_features_n,
    MODE: tl.constexpr,
    FEATURES_FP8: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """P = x @ freqs for one (BLOCK_M, BLOCK_N) tile; F[:, j] = sin 2πP[:, j], F[:, m + j] = cos 2πP[:, j]."""
    pid_m, pid_n = grouped_tile(
        tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(num_frequencies, BLOCK_N), GROUP_M
    )
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    phase = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, m, k, stride_x_m, stride_x_k, rows, d_in, 0.0)
        freqs = load_tile(freqs_ptr, k, n, stride_freqs_k, stride_freqs_n, d_in, num_frequencies, 0.0)
        x_scale = None
        freqs_scale = None
        if MODE == "mx":
            kb = k0 // MX_BLOCK + tl.arange(0, BLOCK_K // MX_BLOCK)
            num_blocks = tl.cdiv(d_in, MX_BLOCK)
            x_scale = load_tile(x_scale_ptr, m, kb, stride_x_scale_m, stride_x_scale_k, rows, num_blocks, 0)
            freqs_scale = load_tile(
                freqs_scale_ptr,
                n,
                kb,
                stride_freqs_scale_n,
                stride_freqs_scale_k,
                num_frequencies,
                num_blocks,
                0,
            )
        phase = _dot(phase, x, x_scale, freqs, freqs_scale, MODE, INPUT_PRECISION, INTERPRET)
    if MODE == "rowwise":
        x_scale = tl.load(x_scale_ptr + m * stride_x_scale_m, mask=m < rows, other=0.0)
        freqs_scale = tl.load(freqs_scale_ptr + n * stride_freqs_scale_n, mask=n < num_frequencies, other=0.0)
        phase = phase * x_scale[:, None] * freqs_scale[None, :]
    sin, cos = _sin_cos_of_turns(phase, INTERPRET)
    if FEATURES_FP8:
        # |F| <= 1 needs no amax pass: the fixed power-of-two scale 2^8 serves both recipes.
        sin = to_e4m3(sin * FEATURE_SCALE, INTERPRET)
        cos = to_e4m3(cos * FEATURE_SCALE, INTERPRET)
    store_tile(
        features_ptr, sin, m, n, stride_features_m, stride_features_n, rows, num_frequencies, INTERPRET
    )
    cos_n = n + num_frequencies
    store_tile(
        features_ptr,
        cos,
        m,
        cos_n,
        stride_features_m,
        stride_features_n,
        rows,
        2 * num_frequencies,
        INTERPRET,
    )


@triton.autotune(
    configs=_gemm_configs(_FORWARD_GEMM_SHAPES),
    key=["rows", "d_out", "num_features", "MODE"],
    prune_configs_by={
        "early_config_prune": prune_by_shared_memory(_two_operand_stage_bytes("features_ptr", "weight_ptr"))
    },
)
@triton.jit
def _output_kernel(
    features_ptr,
    weight_ptr,
    weight_scale_ptr,
    bias_ptr,
    y_ptr,
    rows,
    d_out,
    num_features,
    inverse_sqrt_m,
    stride_features_m,
    stride_features_k,
    stride_bias,
    stride_weight_k,
    stride_weight_n,
    stride_weight_scale_k,
    stride_weight_scale_n,
    stride_y_m,
    stride_y_n,
    MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = F @ weight / sqrt(m) + bias for one (BLOCK_M, BLOCK_N) tile of y; F holds 256·F in fp8 modes."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(d_out, BLOCK_N), GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, num_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        features = load_tile(
            features_ptr, m, k, stride_features_m, stride_features_k, rows, num_features, 0.0
        )
        weight = load_tile(weight_ptr, k, n, stride_weight_k, stride_weight_n, num_features, d_out, 0.0)
        features_scale = None
        weight_scale = None
        if MODE == "mx":
            # The features' scale is the constant 2^-8: a ue8m0 byte, no tensor to read.
            features_scale = tl.full((BLOCK_M, BLOCK_K // MX_BLOCK), FEATURE_SCALE_BYTE, tl.uint8)
            kb = k0 // MX_BLOCK + tl.arange(0, BLOCK_K // MX_BLOCK)
            weight_scale = load_tile(
                weight_scale_ptr,
                n,
                kb,
                stride_weight_scale_n,
                stride_weight_scale_k,
                d_out,
                tl.cdiv(num_features, MX_BLOCK),
                0,
            )
        acc = _dot(acc, features, features_scale, weight, weight_scale, MODE, INPUT_PRECISION, INTERPRET)
    if MODE == "rowwise":
        weight_scale = tl.load(weight_scale_ptr + n * stride_weight_scale_n, mask=n < d_out, other=0.0)
        acc = acc * (weight_scale[None, :] * FEATURE_SCALE_INVERSE)
    acc = acc * inverse_sqrt_m
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + n * stride_bias, mask=n < d_out, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, m, n, stride_y_m, stride_y_n, rows, d_out, INTERPRET)


def _gemm_modes(precision: str, fp8_scaling: str) -> tuple[str, str]:
    """(features GEMM mode, output GEMM mode) of a precision."""
    if precision == "bf16":
        return "plain", "plain"
    if precision == "fp8-features":
        return "plain", fp8_scaling
    return fp8_scaling, fp8_scaling


def forward(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    precision: str,
    fp8_scaling: str,
) -> torch.Tensor:
    """y = [sin 2π x@freqs, cos 2π x@freqs] / sqrt(m) @ weight + bias.

    x (N, d_in) any strides, freqs (d_in, m), weight (2m, d_out), bias (d_out,) or None; fp16/bf16/fp32,
    possibly mixed (plain GEMMs compute in x.dtype). Returns a new y (N, d_out) in x.dtype.
    """
    rows, d_in = x.shape
    num_frequencies, d_out = freqs.shape[1], weight.shape[1]
    features_mode, output_mode = _gemm_modes(precision, fp8_scaling)
    interpret = devices.triton_interpret()

    x_op, x_scale = _gemm_operand(x, 1, features_mode)
    freqs_op, freqs_scale = _gemm_operand(freqs, 0, features_mode)
    features_dtype = x.dtype if precision == "bf16" else torch.float8_e4m3fn
    features = torch.empty(rows, 2 * num_frequencies, dtype=features_dtype, device=x.device)
    _features_kernel[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(num_frequencies, meta["BLOCK_N"]),)
    ](
        x_op,
        x_scale,
        freqs_op,
        freqs_scale,
        features,
        rows,
        num_frequencies,
        d_in,
        *x_op.stride(),
        *_strides(x_scale),
        *freqs_op.stride(),
        *_strides(freqs_scale),
        *features.stride(),
        MODE=features_mode,
        FEATURES_FP8=precision != "bf16",
        INPUT_PRECISION=_input_precision(x.dtype),
        INTERPRET=interpret,
    )

    weight_op, weight_scale = _gemm_operand(weight, 0, output_mode)
    y = torch.empty(rows, d_out, dtype=x.dtype, device=x.device)
    _output_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)](
        features,
        weight_op,
        weight_scale,
        bias,
        y,
        rows,
        d_out,
        2 * num_frequencies,
        1.0 / math.sqrt(num_frequencies),
        *features.stride(),
        bias.stride(0) if bias is not None else 0,
        *weight_op.stride(),
        *_strides(weight_scale),
        *y.stride(),
        MODE=output_mode,
        INPUT_PRECISION=_input_precision(x.dtype),
        INTERPRET=interpret,
    )
    return y


# ---------------------------------------------------------------- backward


def _phase_grad_stage_bytes(meta, args):
    # The P loop and the G loop run one after the other; the larger one sets the footprint.
    phase_loop = meta["BLOCK_K"] * (
        meta["BLOCK_M"] * args["x_ptr"].element_size() + meta["BLOCK_N"] * args["freqs_ptr"].element_size()
    )
    grad_loop = meta["BLOCK_K"] * (
        meta["BLOCK_M"] * args["grad_y_ptr"].element_size()
        + 2 * meta["BLOCK_N"] * args["weight_ptr"].element_size()
    )
    return max(phase_loop, grad_loop)


@triton.autotune(
    configs=_gemm_configs(
        [
            (64, 64, 32, 3, 4),
            (64, 64, 64, 3, 8),
            (64, 128, 32, 3, 8),
            (128, 64, 32, 3, 8),
            (64, 128, 64, 3, 8),
        ]
    ),
    key=["rows", "num_frequencies", "d_in", "d_out"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_phase_grad_stage_bytes)},
)
@triton.jit
def _phase_grad_kernel(
    x_ptr,
    freqs_ptr,
    grad_y_ptr,
    weight_ptr,
    grad_phase_ptr,
    features_ptr,
    rows,
    num_frequencies,
    d_in,
    d_out,
    inverse_sqrt_m,
    stride_x_m,
    stride_x_k,
    stride_freqs_k,
    stride_freqs_n,
    stride_grad_y_m,
    stride_grad_y_k,
    stride_weight_j,
    stride_weight_k,
    stride_grad_phase_m,
    stride_grad_phase_n,
    stride_features_m,
    stride_features_n,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """For one (BLOCK_M, BLOCK_N) tile of phase columns j:
    P = x @ freqs[:, j],  G_sin = grad_y @ weight[j]ᵀ,  G_cos = grad_y @ weight[m + j]ᵀ,
    grad_P = 2π/sqrt(m) · (G_sin·cos 2πP − G_cos·sin 2πP),  F = [sin 2πP, cos 2πP] / sqrt(m).
    """
    pid_m, pid_n = grouped_tile(
        tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(num_frequencies, BLOCK_N), GROUP_M
    )
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Recomputing P costs one GEMM1 tile; storing it in the forward would cost N·m reads and writes.
    phase = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, m, k, stride_x_m, stride_x_k, rows, d_in, 0.0)
        freqs = load_tile(freqs_ptr, k, j, stride_freqs_k, stride_freqs_n, d_in, num_frequencies, 0.0)
        phase = dot_in_dtype(x, freqs, phase, INPUT_PRECISION, INTERPRET)
    # Only the columns of grad_F that pair with this tile's phases: grad_y read once for both halves.
    grad_sin = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    grad_cos = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_out, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        grad_y = load_tile(grad_y_ptr, m, k, stride_grad_y_m, stride_grad_y_k, rows, d_out, 0.0)
        grad_y = cast(grad_y, x_ptr.dtype.element_ty, INTERPRET)
        weight_sin = load_tile(
            weight_ptr, k, j, stride_weight_k, stride_weight_j, d_out, num_frequencies, 0.0
        )
        weight_cos = load_tile(
            weight_ptr,
            k,
            j + num_frequencies,
            stride_weight_k,
            stride_weight_j,
            d_out,
            2 * num_frequencies,
            0.0,
        )
        grad_sin = dot_in_dtype(grad_y, weight_sin, grad_sin, INPUT_PRECISION, INTERPRET)
        grad_cos = dot_in_dtype(grad_y, weight_cos, grad_cos, INPUT_PRECISION, INTERPRET)
    sin, cos = _sin_cos_of_turns(phase, INTERPRET)
    grad_phase = (TWO_PI * inverse_sqrt_m) * (grad_sin * cos - grad_cos * sin)
    store_tile(
        grad_phase_ptr,
        grad_phase,
        m,
        j,
        stride_grad_phase_m,
        stride_grad_phase_n,
        rows,
        num_frequencies,
        INTERPRET,
    )
    store_tile(
        features_ptr,
        sin * inverse_sqrt_m,
        m,
        j,
        stride_features_m,
        stride_features_n,
        rows,
        num_frequencies,
        INTERPRET,
    )
    store_tile(
        features_ptr,
        cos * inverse_sqrt_m,
        m,
        j + num_frequencies,
        stride_features_m,
        stride_features_n,
        rows,
        2 * num_frequencies,
        INTERPRET,
    )


@triton.autotune(
    configs=_gemm_configs(_FORWARD_GEMM_SHAPES),
    key=["M", "N", "K"],
    prune_configs_by={
        "early_config_prune": prune_by_shared_memory(_two_operand_stage_bytes("a_ptr", "b_ptr"))
    },
)
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_a_m,
    stride_a_k,
    stride_b_k,
    stride_b_n,
    stride_c_m,
    stride_c_n,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C = A @ B for one (BLOCK_M, BLOCK_N) tile, in A's dtype with fp32 accumulation, stored in C's dtype."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, m, k, stride_a_m, stride_a_k, M, K, 0.0)
        b = load_tile(b_ptr, k, n, stride_b_k, stride_b_n, K, N, 0.0)
        acc = dot_in_dtype(a, b, acc, INPUT_PRECISION, INTERPRET)
    store_tile(c_ptr, acc, m, n, stride_c_m, stride_c_n, M, N, INTERPRET)


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N), any strides, computed in a.dtype; a new (M, N) tensor of out_dtype."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    _matmul_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
        a,
        b,
        c,
        M,
        N,
        K,
        *a.stride(),
        *b.stride(),
        *c.stride(),
        INPUT_PRECISION=_input_precision(a.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    return c


def input_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    needs_x_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(grad_x (N, d_in) | None, F/sqrt(m) (N, 2m), grad_P (N, m)): the input gradient and what the weight
    gradients need, in x.dtype with fp32 accumulation. grad_y (N, d_out) contiguous."""
    rows, d_in = x.shape
    num_frequencies, d_out = freqs.shape[1], weight.shape[1]
    inverse_sqrt_m = 1.0 / math.sqrt(num_frequencies)
    grad_phase = torch.empty(rows, num_frequencies, dtype=x.dtype, device=x.device)
    features = torch.empty(rows, 2 * num_frequencies, dtype=x.dtype, device=x.device)
    _phase_grad_kernel[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(num_frequencies, meta["BLOCK_N"]),)
    ](
        x,
        freqs,
        grad_y,
        weight,
        grad_phase,
        features,
        rows,
        num_frequencies,
        d_in,
        d_out,
        inverse_sqrt_m,
        *x.stride(),
        *freqs.stride(),
        *grad_y.stride(),
        *weight.stride(),
        *grad_phase.stride(),
        *features.stride(),
        INPUT_PRECISION=_input_precision(x.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    grad_x = _matmul(grad_phase, freqs.t(), x.dtype) if needs_x_grad else None
    return grad_x, features, grad_phase


def weight_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor,
    grad_phase: torch.Tensor,
    needs_freqs_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(grad_freqs (d_in, m) | None, grad_weight (2m, d_out), grad_bias (d_out,)) from `input_grad`'s
    features and grad_P: the weight-gradient GEMMs `cdm_fast.wgrad.deferred` may run later."""
    grad_weight = _matmul(features.t(), grad_y, weight.dtype)
    grad_bias = grad_y.sum(0, dtype=torch.float32).to(weight.dtype)
    grad_freqs = _matmul(x.t(), grad_phase, freqs.dtype) if needs_freqs_grad else None
    return grad_freqs, grad_weight, grad_bias


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    needs_x_grad: bool,
    needs_freqs_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Exact gradients of the unquantised projection, in x.dtype with fp32 accumulation.

    grad_y (N, d_out). Returns (grad_x (N, d_in) | None, grad_freqs (d_in, m) | None, grad_weight (2m, d_out),
    grad_bias (d_out,)), each in its parameter's dtype (grad_bias in weight's, as the op's fake says).
    """
    grad_x, features, grad_phase = input_grad(grad_y, x, freqs, weight, needs_x_grad)
    grad_freqs, grad_weight, grad_bias = weight_grads(
        grad_y, x, freqs, weight, features, grad_phase, needs_freqs_grad
    )
    return grad_x, grad_freqs, grad_weight, grad_bias
