"""Triton kernels of the fused LoRA linear (the math, cost model and dropout mask: `cdm_fast.ops.lora`).

One GEMM with a low-rank epilogue serves the forward output and the input gradient:
    lora_matmul:  out = a @ wᵀ + bias + epilogue_scale · [keep ⊙] (t @ upᵀ)
                  forward: a = x, w = weight (out, in),  t = u = dropout(x) @ lora_Aᵀ,  up = lora_B (out, r)
                  dgrad:   a = dy, w = weightᵀ (in, out), t = v = dy @ lora_B,         up = lora_Aᵀ (in, r),
                           keep = the dropout mask of x, epilogue_scale = scaling / (1 - p)
The skinny t (M, r) comes from one of two strategies:
    "mainloop"  accumulated beside the base product from the same a tile (a read once), by every N tile;
                the first N tile stores it
    "separate"  one skinny pass `lora_down` first (a read once more), loaded in the epilogue
Which is cheaper is a roofline question: "mainloop" repeats 2·M·K·r FLOPs (and, with dropout, the mask
hashing) in each of the N/BLOCK_N - 1 other tiles; "separate" reads a once more, M·K·2 bytes. On an H100
(989 TFLOP/s bf16, 3.35 TB/s) the repeat costs more once r·(N/BLOCK_N - 1) exceeds ~300: "separate" wins
at 4096 outputs and r = 32, "mainloop" at narrow outputs and decode-sized N. `choose_strategy` encodes it.
Decode (M ≤ DECODE_MAX_TOKENS) is a GEMV: the weight stream is the whole cost, and N/BLOCK_N programs cannot
draw DRAM bandwidth on 132 SMs. "splitk" (`_lora_splitk_kernel`, forward only) also splits K over a grid axis:
each program reduces its K slice of x @ Wᵀ and of u = dropout(x) @ lora_Aᵀ, adds scaling · u_s @ lora_Bᵀ
(correct by linearity) and atomically adds its fp32 partial into y (and, in the N tile 0, u_s into u).
`splitk_factor` sizes the split and `prefers_splitk` is the dispatch rule.
The weight gradients are split-M reductions, `lora_weight_grad`:
    d lora_A = scaling/(1-p) · vᵀ @ (keep ⊙ x)     d lora_B = scaling · dyᵀ @ u
kept apart from the dgrad so that `cdm_fast.wgrad.deferred` can run them later on a side stream.
The base weight may be 4-bit (QLoRA, `cdm_fast.quant.Weight4bit`): forward and dgrad decode its codes in the
mainloop (`load_4bit_tile`, code book and block scales gathered in registers); no dense copy is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cdm_fast import device as devices
from cdm_fast.ops.lora import drop_threshold
from cdm_fast.quant import Weight4bit

from .common import (
    autotune_configs,
    cast,
    dot_in_dtype,
    dropout_keep,
    grouped_tile,
    load_4bit_tile,
    load_tile,
    prune_by_shared_memory,
    store_tile,
)

STRATEGIES = ("mainloop", "separate")
# The forward may also split K (`_lora_splitk_kernel`); dgrad never does.
FORWARD_STRATEGIES = (*STRATEGIES, "splitk")
# At most this many tokens take the decode path (`_lora_decode_kernel` or `_lora_splitk_kernel`).
DECODE_MAX_TOKENS = 64
# The r·(N tiles - 1) above which repeating u's FLOPs in every N tile costs more than re-reading x once:
# peak bf16 FLOP/s over DRAM bytes/s on an H100 SXM (989e12 / 3.35e12), rounded.
_MAINLOOP_REPEAT_LIMIT = 300
_ASSUMED_BLOCK_N = 128
# Split-K decode (`splitk_factor`): programs per SM that keep enough weight bytes in flight to draw DRAM
# bandwidth, the (BLOCK_M, BLOCK_N) tile the fill is counted in, the shortest split in granules (the longest
# BLOCK_K), and the share of the weight's bytes the per-split re-reads of lora_B may add.
_SPLITK_PROGRAMS_PER_SM = 4
_SPLITK_BLOCK_M = 16
_SPLITK_ASSUMED_BLOCK_N = 64
_SPLITK_MIN_GRANULES = 2
_SPLITK_B_REREAD_LIMIT = 0.05


def _matmul_configs() -> list[triton.Config]:
    return autotune_configs(
        [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w
            )
            for bm, bn, bk, s, w in [
                (128, 128, 64, 4, 8),
                (128, 256, 64, 3, 8),
                (128, 128, 32, 4, 4),
                (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4),
                # fp32 operands take 4 bytes: the tile that fits sm_120's 101,376 B per block.
                (64, 64, 32, 3, 4),
            ]
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_stages=1, num_warps=4),
    )


# Bytes per base-weight element a 4-bit pipeline stage holds: Triton pipelines every gathered load, so the
# packed byte, the code-book value (fp32) and the scale (fp32, or its byte plus the two nested fp32 lookups)
# each get a staged copy. Measured against the compiled kernels' shared memory (bench.aot).
_4BIT_STAGE_BYTES = {False: 1 + 4 + 4, True: 1 + 4 + 1 + 4 + 4}


def _matmul_stage_bytes(meta, args):
    """One pipeline stage: the a tile, the w tile and, in the mainloop strategy, the down tile."""
    if args.get("WEIGHT_4BIT"):
        w_bytes = _4BIT_STAGE_BYTES[bool(args.get("DOUBLE_QUANT"))]
    else:
        w_bytes = args["w_ptr"].element_size()
    per_k = meta["BLOCK_M"] * args["a_ptr"].element_size() + meta["BLOCK_N"] * w_bytes
    if args.get("COMPUTE_T"):
        per_k += args["RANK_BLOCK"] * args["down_ptr"].element_size()
    return meta["BLOCK_K"] * per_k


def _down_stage_bytes(meta, args):
    """One pipeline stage of the skinny pass: the a tile and the down tile."""
    per_k = (
        meta["BLOCK_M"] * args["a_ptr"].element_size() + args["RANK_BLOCK"] * args["down_ptr"].element_size()
    )
    return meta["BLOCK_K"] * per_k


def _weight_grad_stage_bytes(meta, args):
    """One pipeline stage of the weight gradient: (BLOCK_M, BLOCK_P) and (BLOCK_M, BLOCK_Q) tiles."""
    per_m = (
        args["BLOCK_P"] * args["left_ptr"].element_size() + args["BLOCK_Q"] * args["right_ptr"].element_size()
    )
    return meta["BLOCK_M"] * per_m


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands must not go through tf32 (10-bit mantissa): the fp32 path promises 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_base_weight_tile(
    w_ptr,
    w_absmax_ptr,
    w_code_ptr,
    w_nested_absmax_ptr,
    w_nested_code_ptr,
    w_offset,
    w_blocksize,
    w_nested_blocksize,
    k,
    n,
    stride_w_k,
    stride_w_n,
    K,
    N,
    DTYPE: tl.constexpr,
    WEIGHT_4BIT: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The (BLOCK_K, BLOCK_N) tile of the base weight Wᵀ at rows k, columns n, in DTYPE, 0 outside (K, N).

    WEIGHT_4BIT (QLoRA): decoded from its bitsandbytes 4-bit codes in registers, tile by tile, so no dense
    copy of the weight is ever written; otherwise loaded as stored (already DTYPE).
    """
    if WEIGHT_4BIT:
        w = load_4bit_tile(
            w_ptr,
            w_absmax_ptr,
            w_code_ptr,
            w_nested_absmax_ptr,
            w_nested_code_ptr,
            w_offset,
            w_blocksize,
            w_nested_blocksize,
            k,
            n,
            stride_w_k,
            stride_w_n,
            K,
            N,
            DOUBLE_QUANT,
        )
        w = cast(w, DTYPE, INTERPRET)
    else:
        w = load_tile(w_ptr, k, n, stride_w_k, stride_w_n, K, N, 0.0)
    return w


@triton.autotune(
    configs=_matmul_configs(),
    key=["M", "N", "K", "RANK_BLOCK", "COMPUTE_T", "INPUT_DROPOUT", "EPILOGUE_DROPOUT", "WEIGHT_4BIT"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_matmul_stage_bytes)},
)
@triton.jit
def _lora_matmul_kernel(
    a_ptr,
    w_ptr,
    w_absmax_ptr,
    w_code_ptr,
    w_nested_absmax_ptr,
    w_nested_code_ptr,
    w_offset,
    w_blocksize,
    w_nested_blocksize,
    down_ptr,
    up_ptr,
    bias_ptr,
    t_ptr,
    out_ptr,
    M,
    N,
    K,
    rank,
    epilogue_scale,
    dropout_seed,
    dropout_threshold,
    dropout_rescale,
    stride_a_m,
    stride_a_k,
    stride_w_n,
    stride_w_k,
    stride_down_r,
    stride_down_k,
    stride_up_n,
    stride_up_r,
    stride_bias,
    stride_t_m,
    stride_t_r,
    stride_out_m,
    stride_out_n,
    RANK_BLOCK: tl.constexpr,
    COMPUTE_T: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr,
    EPILOGUE_DROPOUT: tl.constexpr,
    WEIGHT_4BIT: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = a @ wᵀ + bias + epilogue_scale · [keep ⊙] (t @ upᵀ) for one (BLOCK_M, BLOCK_N) tile of out.

    COMPUTE_T: t = [keep ⊙] a @ downᵀ · dropout_rescale is accumulated here (and stored by the N tile 0);
    otherwise t is read. INPUT_DROPOUT masks a's tile for t only (forward); EPILOGUE_DROPOUT masks the
    low-rank term at out's coordinates (dgrad). Products in a's dtype, fp32 accumulation.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, RANK_BLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, m, k, stride_a_m, stride_a_k, M, K, 0.0)
        w = load_base_weight_tile(
            w_ptr,
            w_absmax_ptr,
            w_code_ptr,
            w_nested_absmax_ptr,
            w_nested_code_ptr,
            w_offset,
            w_blocksize,
            w_nested_blocksize,
            k,
            n,
            stride_w_k,
            stride_w_n,
            K,
            N,
            a_ptr.dtype.element_ty,
            WEIGHT_4BIT,
            DOUBLE_QUANT,
            INTERPRET,
        )
        acc = dot_in_dtype(a, w, acc, INPUT_PRECISION, INTERPRET)
        if COMPUTE_T:
            # t accumulates beside acc from the same a tile, so a is read from memory once.
            down = load_tile(down_ptr, k, j, stride_down_k, stride_down_r, K, rank, 0.0)
            if INPUT_DROPOUT:
                a = tl.where(dropout_keep(dropout_seed, m, k, dropout_threshold), a, tl.zeros_like(a))
            t_acc = dot_in_dtype(a, down, t_acc, INPUT_PRECISION, INTERPRET)
    if COMPUTE_T:
        # t is rounded to a's dtype before the epilogue uses it: the same values backward reads.
        t = cast(t_acc * dropout_rescale, a_ptr.dtype.element_ty, INTERPRET)
        if pid_n == 0:
            store_tile(t_ptr, t, m, j, stride_t_m, stride_t_r, M, rank, INTERPRET)
    else:
        t = load_tile(t_ptr, m, j, stride_t_m, stride_t_r, M, rank, 0.0)
    up = load_tile(up_ptr, j, n, stride_up_r, stride_up_n, rank, N, 0.0)
    low_rank = dot_in_dtype(t, up, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, INTERPRET)
    if EPILOGUE_DROPOUT:
        low_rank = tl.where(dropout_keep(dropout_seed, m, n, dropout_threshold), low_rank, 0.0)
    acc += epilogue_scale * low_rank
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + n * stride_bias, mask=n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, m, n, stride_out_m, stride_out_n, M, N, INTERPRET)


def _decode_configs() -> list[triton.Config]:
    # Few tokens: the weight stream is the whole cost. Narrow N tiles spread it over many SMs; long K tiles
    # keep many bytes in flight per program.
    return autotune_configs(
        [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1}, num_stages=s, num_warps=w
            )
            for bm, bn, bk, s, w in [
                (16, 32, 256, 4, 4),
                (16, 64, 128, 4, 4),
                (16, 64, 256, 3, 4),
                (32, 64, 128, 4, 4),
                (64, 64, 128, 3, 4),
                (64, 32, 64, 3, 4),
            ]
        ],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1}, num_stages=1, num_warps=4),
    )


# The decode path (M ≤ DECODE_MAX_TOKENS): the same kernel with GEMV-shaped tiles, always computing t in the
# mainloop, so the weight is streamed once and the low-rank term costs no second launch (t's repeat across N
# tiles is r·K·M FLOPs and lora_A's bytes from L2, small beside the weight's bytes from DRAM).
_lora_decode_kernel = triton.autotune(
    configs=_decode_configs(),
    key=["M", "N", "K", "RANK_BLOCK", "COMPUTE_T", "INPUT_DROPOUT", "EPILOGUE_DROPOUT", "WEIGHT_4BIT"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_matmul_stage_bytes)},
)(_lora_matmul_kernel.fn)


def _splitk_configs() -> list[triton.Config]:
    # GEMV-shaped: one M tile covers a decode step; the grid's split axis, not BLOCK_N, supplies the programs.
    # The largest BLOCK_K here is the granule a split's length is a multiple of (`_splitk_granule`).
    return autotune_configs(
        [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bn, bk, s, w in [
                (32, 256, 4, 4),
                (64, 128, 4, 4),
                (64, 256, 3, 4),
                (128, 64, 4, 4),
                (128, 128, 3, 8),
                # A 4-bit base stages ~9-14 B per weight element and fp32 operands 4 B: the tiles that fit
                # sm_120's 101,376 B per block.
                (32, 64, 3, 4),
                (64, 64, 2, 4),
            ]
        ],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4),
    )


def _splitk_stage_bytes(meta, args):
    """One pipeline stage: the x tile, the weight tile and the lora_A tile."""
    if args.get("WEIGHT_4BIT"):
        w_bytes = _4BIT_STAGE_BYTES[bool(args.get("DOUBLE_QUANT"))]
    else:
        w_bytes = args["w_ptr"].element_size()
    per_k = (
        meta["BLOCK_M"] * args["x_ptr"].element_size()
        + meta["BLOCK_N"] * w_bytes
        + args["RANK_BLOCK"] * args["lora_A_ptr"].element_size()
    )
    return meta["BLOCK_K"] * per_k


@triton.autotune(
    configs=_splitk_configs(),
    key=["M", "N", "K", "k_per_split", "RANK_BLOCK", "INPUT_DROPOUT", "WEIGHT_4BIT"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_splitk_stage_bytes)},
    # Every program adds into out and u: timing a config must start from zeros, as the launcher's call does.
    reset_to_zero=["out_ptr", "u_ptr"],
)
@triton.jit
def _lora_splitk_kernel(
    x_ptr,
    w_ptr,
    w_absmax_ptr,
    w_code_ptr,
    w_nested_absmax_ptr,
    w_nested_code_ptr,
    w_offset,
    w_blocksize,
    w_nested_blocksize,
    lora_A_ptr,
    lora_B_ptr,
    bias_ptr,
    u_ptr,
    out_ptr,
    M,
    N,
    K,
    rank,
    k_per_split,
    scaling,
    dropout_seed,
    dropout_threshold,
    dropout_rescale,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    stride_A_r,
    stride_A_k,
    stride_B_n,
    stride_B_r,
    stride_bias,
    stride_u_m,
    stride_u_r,
    stride_out_m,
    stride_out_n,
    RANK_BLOCK: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr,
    WEIGHT_4BIT: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out += x_s @ W_sᵀ + scaling · u_s @ lora_Bᵀ (+ bias on split 0) for one (BLOCK_M, BLOCK_N) tile and
    one K slice s of k_per_split (a multiple of BLOCK_K); u_s = [keep ⊙] x_s @ A_sᵀ · dropout_rescale.

    y = Σ_s (x_s W_sᵀ + scaling · u_s Bᵀ) by linearity, so each split adds its fp32 partial to out (and the
    N tile 0 its u_s to u) with atomics. out (M, N) and u (M, r) are fp32 and start at zero.
    """
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, RANK_BLOCK)
    k_first = split * k_per_split
    k_last = tl.minimum(k_first + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    for k0 in range(k_first, k_last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, m, k, stride_x_m, stride_x_k, M, k_last, 0.0)
        w = load_base_weight_tile(
            w_ptr,
            w_absmax_ptr,
            w_code_ptr,
            w_nested_absmax_ptr,
            w_nested_code_ptr,
            w_offset,
            w_blocksize,
            w_nested_blocksize,
            k,
            n,
            stride_w_k,
            stride_w_n,
            k_last,
            N,
            x_ptr.dtype.element_ty,
            WEIGHT_4BIT,
            DOUBLE_QUANT,
            INTERPRET,
        )
        acc = dot_in_dtype(x, w, acc, INPUT_PRECISION, INTERPRET)
        # u_s accumulates beside the base product from the same x tile, so x is read once.
        lora_A = load_tile(lora_A_ptr, k, j, stride_A_k, stride_A_r, k_last, rank, 0.0)
        if INPUT_DROPOUT:
            x = tl.where(dropout_keep(dropout_seed, m, k, dropout_threshold), x, tl.zeros_like(x))
        u_acc = dot_in_dtype(x, lora_A, u_acc, INPUT_PRECISION, INTERPRET)
    # u_s stays fp32 here (a partial sum: rounding it would round each split's share separately).
    u_part = u_acc * dropout_rescale
    lora_B = load_tile(lora_B_ptr, j, n, stride_B_r, stride_B_n, rank, N, 0.0)
    acc += scaling * dot_in_dtype(u_part, lora_B, tl.zeros_like(acc), INPUT_PRECISION, INTERPRET)
    if bias_ptr is not None:
        if split == 0:
            acc += tl.load(bias_ptr + n * stride_bias, mask=n < N, other=0.0).to(tl.float32)[None, :]
    # Atomics rather than a (SPLIT_K, M, N) workspace summed afterwards: no second pass over SPLIT_K·M·N
    # partials, and the adds land in L2, where out's M·N fp32 elements stay resident.
    out_offsets = m[:, None].to(tl.int64) * stride_out_m + n[None, :].to(tl.int64) * stride_out_n
    tl.atomic_add(out_ptr + out_offsets, acc, mask=(m[:, None] < M) & (n[None, :] < N), sem="relaxed")
    if pid_n == 0:
        u_offsets = m[:, None].to(tl.int64) * stride_u_m + j[None, :].to(tl.int64) * stride_u_r
        tl.atomic_add(u_ptr + u_offsets, u_part, mask=(m[:, None] < M) & (j[None, :] < rank), sem="relaxed")


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bm, bk, s, w in [
                (64, 128, 4, 4),
                (32, 256, 3, 4),
                (128, 64, 4, 8),
                (16, 128, 4, 4),
            ]
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4),
    ),
    key=["M", "K", "RANK_BLOCK", "INPUT_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_down_stage_bytes)},
)
@triton.jit
def _lora_down_kernel(
    a_ptr,
    down_ptr,
    t_ptr,
    M,
    K,
    rank,
    dropout_seed,
    dropout_threshold,
    dropout_rescale,
    stride_a_m,
    stride_a_k,
    stride_down_r,
    stride_down_k,
    stride_t_m,
    stride_t_r,
    RANK_BLOCK: tl.constexpr,
    INPUT_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """t = [keep ⊙] a @ downᵀ · dropout_rescale for BLOCK_M rows: the skinny GEMM, bound by reading a."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, RANK_BLOCK)
    t_acc = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, m, k, stride_a_m, stride_a_k, M, K, 0.0)
        if INPUT_DROPOUT:
            a = tl.where(dropout_keep(dropout_seed, m, k, dropout_threshold), a, tl.zeros_like(a))
        down = load_tile(down_ptr, k, j, stride_down_k, stride_down_r, K, rank, 0.0)
        t_acc = dot_in_dtype(a, down, t_acc, INPUT_PRECISION, INTERPRET)
    store_tile(t_ptr, t_acc * dropout_rescale, m, j, stride_t_m, stride_t_r, M, rank, INTERPRET)


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_M": bm}, num_stages=s, num_warps=w)
            for bm, s, w in [(64, 4, 4), (128, 3, 8), (32, 4, 4)]
        ],
        triton.Config({"BLOCK_M": 16}, num_stages=1, num_warps=4),
    ),
    key=["M", "P", "Q", "BLOCK_P", "BLOCK_Q", "RIGHT_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_by_shared_memory(_weight_grad_stage_bytes)},
)
@triton.jit
def _lora_weight_grad_kernel(
    left_ptr,
    right_ptr,
    partial_ptr,
    M,
    P,
    Q,
    rows_per_split,
    dropout_seed,
    dropout_threshold,
    stride_left_m,
    stride_left_p,
    stride_right_m,
    stride_right_q,
    stride_partial_s,
    stride_partial_p,
    stride_partial_q,
    RIGHT_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """partial[s] = leftᵀ @ [keep ⊙] right over split s's rows, for one (BLOCK_P, BLOCK_Q) tile; fp32.

    The weight gradients reduce over all M tokens into a small (r, in) or (out, r) result: splitting M
    across programs (summed afterwards) is what fills the GPU.
    """
    pid_p, pid_q, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    for m0 in range(first, last, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        left = load_tile(left_ptr, p, m, stride_left_p, stride_left_m, P, last, 0.0)
        right = load_tile(right_ptr, m, q, stride_right_m, stride_right_q, last, Q, 0.0)
        if RIGHT_DROPOUT:
            right = tl.where(dropout_keep(dropout_seed, m, q, dropout_threshold), right, tl.zeros_like(right))
        acc = dot_in_dtype(left, right, acc, INPUT_PRECISION, INTERPRET)
    store_tile(
        partial_ptr + split * stride_partial_s, acc, p, q, stride_partial_p, stride_partial_q, P, Q, INTERPRET
    )


# ---------------------------------------------------------------- launchers


def rank_block(rank: int) -> int:
    """The padded rank the kernels tile r with: a power of two ≥ 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(rank))


def choose_strategy(M: int, N: int, rank: int, dropout_p: float) -> str:
    """ "mainloop" or "separate" for the skinny t (see the module docstring's roofline)."""
    repeated_tiles = triton.cdiv(N, _ASSUMED_BLOCK_N) - 1
    if repeated_tiles == 0 or M <= DECODE_MAX_TOKENS:
        return "mainloop"
    # With dropout every repeat also re-hashes the a tile's mask: then only one N tile may compute t.
    if dropout_p == 0 and rank_block(rank) * repeated_tiles <= _MAINLOOP_REPEAT_LIMIT:
        return "mainloop"
    return "separate"


def _splitk_granule() -> int:
    """The longest BLOCK_K among this session's split-K configs: a split's length is a multiple of it, so
    that every config's K tiles end at split boundaries."""
    return max(config.kwargs["BLOCK_K"] for config in _splitk_configs())


def splitk_factor(
    M: int,
    N: int,
    K: int,
    rank: int,
    *,
    multiprocessors: int = 132,
    block_k: int | None = None,
    weight_element_bytes: float = 2.0,
    adapter_element_bytes: int = 2,
) -> int:
    """How many K slices the split-K decode kernel cuts the reduction into (1: no split).

    Roofline: a decode step streams the weight once, N·K·weight_element_bytes, and does little else, so its
    time is those bytes over the bandwidth that the programs in flight can draw. The N-only grid has
    tiles = cdiv(M, 16)·cdiv(N, 64) programs; DRAM bandwidth wants about 4 per SM, so the factor is
    cdiv(4·multiprocessors, tiles), then clamped:
      - a split is at least 2·block_k long (block_k: the longest BLOCK_K, the granule of a split's length),
        so a program's loop outweighs its epilogue, and there are never more splits than K blocks;
      - every split re-reads lora_B's (N, r) tile for its epilogue: splits·N·r·adapter_element_bytes on top
        of the weight's N·K·weight_element_bytes. That is negligible when K/splits ≫ r·adapter/weight bytes;
        splits ≤ 0.05·K·weight_element_bytes / (r·adapter_element_bytes) keeps it under 5% of the weight's
        bytes (conservative: concurrent splits of one N tile mostly find it in L2).
    x and lora_A are re-read by every N tile, as on the N-only grid, from L2.
    E.g. M = 1, N = K = 4096, r = 32, bf16, 132 SMs: 64 tiles want 9 splits, length allows 8, lora_B 6.
    """
    block_k = block_k or _splitk_granule()
    tiles = triton.cdiv(M, _SPLITK_BLOCK_M) * triton.cdiv(N, _SPLITK_ASSUMED_BLOCK_N)
    wanted = triton.cdiv(_SPLITK_PROGRAMS_PER_SM * multiprocessors, tiles)
    by_length = K // (_SPLITK_MIN_GRANULES * block_k)
    by_lora_B = int(_SPLITK_B_REREAD_LIMIT * K * weight_element_bytes / (rank * adapter_element_bytes))
    return max(1, min(wanted, by_length, by_lora_B))


def _weight_element_bytes(weight: torch.Tensor | Weight4bit) -> float:
    """Bytes the kernels stream per base-weight element: a 4-bit code, or the dense dtype's size."""
    return 0.5 if isinstance(weight, Weight4bit) else weight.element_size()


def prefers_splitk(
    M: int,
    N: int,
    K: int,
    rank: int,
    *,
    multiprocessors: int = 132,
    weight_element_bytes: float = 2.0,
    adapter_element_bytes: int = 2,
) -> bool:
    """The forward's dispatch rule: split K when the step is a decode (M ≤ DECODE_MAX_TOKENS) and the N-only
    grid would underfill the device, i.e. `splitk_factor` finds a split worth making (> 1)."""
    factor = splitk_factor(
        M,
        N,
        K,
        rank,
        multiprocessors=multiprocessors,
        weight_element_bytes=weight_element_bytes,
        adapter_element_bytes=adapter_element_bytes,
    )
    return M <= DECODE_MAX_TOKENS and factor > 1


def _dropout_args(dropout_p: float, dropout_seed: int) -> tuple[int, int, float]:
    return dropout_seed, drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def lora_down(
    a: torch.Tensor, down: torch.Tensor, dropout_p: float = 0.0, dropout_seed: int = 0
) -> torch.Tensor:
    """t = dropout(a) @ downᵀ: a (M, K) any strides, down (r, K) any strides; a new (M, r) in a's dtype."""
    M, K = a.shape
    rank = down.shape[0]
    t = torch.empty(M, rank, dtype=a.dtype, device=a.device)
    _lora_down_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        a,
        down,
        t,
        M,
        K,
        rank,
        *_dropout_args(dropout_p, dropout_seed),
        *a.stride(),
        *down.stride(),
        *t.stride(),
        RANK_BLOCK=rank_block(rank),
        INPUT_DROPOUT=dropout_p > 0,
        INPUT_PRECISION=_input_precision(a.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    return t


def _base_weight_args(
    weight: torch.Tensor | Weight4bit, transpose: bool
) -> tuple[list, tuple[int, int], dict]:
    """The kernel's base-weight arguments for w = weight (forward) or weightᵀ (dgrad): the pointers and
    4-bit parameters, (stride_w_n, stride_w_k), and the constexprs."""
    if isinstance(weight, Weight4bit):
        # The codes stand for a row-major (out, in) matrix: its transpose is a swap of those strides.
        strides = (1, weight.in_features) if transpose else (weight.in_features, 1)
        pointers = [
            weight.codes,
            weight.absmax,
            weight.code,
            weight.nested_absmax,
            weight.nested_code,
            float(weight.offset),
            weight.blocksize,
            max(weight.nested_blocksize, 1),
        ]
        return pointers, strides, {"WEIGHT_4BIT": True, "DOUBLE_QUANT": weight.double_quant}
    w = weight.t() if transpose else weight
    return [w, None, None, None, None, 0.0, 1, 1], w.stride(), {"WEIGHT_4BIT": False, "DOUBLE_QUANT": False}


def lora_matmul(
    a: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    t: torch.Tensor | None,
    epilogue_scale: float,
    *,
    transpose_weight: bool,
    input_dropout: bool,
    epilogue_dropout: bool,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, t): out = a @ wᵀ + bias + epilogue_scale · [keep ⊙] (t @ upᵀ), with t = [keep ⊙] a @ downᵀ.

    w = weight (out, in), or its transpose when `transpose_weight`; weight dense (any strides and float
    dtype) or 4-bit (`Weight4bit`). a (M, K), down (r, K), up (N, r), any strides; t (M, r) given
    ("separate") or None to compute it in the mainloop, in which case it is returned new. out (M, N) is new,
    in a's dtype. M ≤ DECODE_MAX_TOKENS launches the decode-shaped tiles.
    """
    M, K = a.shape
    N = up.shape[0]
    rank = up.shape[1]
    compute_t = t is None
    if compute_t:
        t = torch.empty(M, rank, dtype=a.dtype, device=a.device)
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    weight_args, weight_strides, weight_flags = _base_weight_args(weight, transpose_weight)
    kernel = _lora_decode_kernel if M <= DECODE_MAX_TOKENS else _lora_matmul_kernel
    kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
        a,
        *weight_args,
        down,
        up,
        bias,
        t,
        out,
        M,
        N,
        K,
        rank,
        epilogue_scale,
        dropout_seed,
        drop_threshold(dropout_p),
        # t is rescaled by 1/(1 - p) only where it is the dropped input's product (forward).
        1.0 / (1.0 - dropout_p) if input_dropout else 1.0,
        *a.stride(),
        *weight_strides,
        *down.stride(),
        *up.stride(),
        bias.stride(0) if bias is not None else 0,
        *t.stride(),
        *out.stride(),
        RANK_BLOCK=rank_block(rank),
        COMPUTE_T=compute_t,
        INPUT_DROPOUT=input_dropout and dropout_p > 0,
        EPILOGUE_DROPOUT=epilogue_dropout and dropout_p > 0,
        **weight_flags,
        # bitsandbytes rounds the double-quantised scale's product and sum separately: no FMA contraction.
        enable_fp_fusion=not weight_flags["DOUBLE_QUANT"],
        INPUT_PRECISION=_input_precision(a.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    return out, t


def lora_splitk(
    x: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    *,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u) of the forward with K split over `split_k` slices (None: `splitk_factor`): x (M, K) any strides,
    weight (N, K) dense or 4-bit, lora_A (r, K) and lora_B (N, r) in x's dtype. y (M, N) and u (M, r) are new,
    in x's dtype, summed in fp32 and rounded once. On a GPU the splits' atomic adds land in any order, so y
    and u may differ between runs in the last fp32 bits (the N-only "mainloop" path is bitwise reproducible).
    """
    M, K = x.shape
    N, rank = lora_B.shape
    block_k = _splitk_granule()
    if split_k is None:
        split_k = splitk_factor(
            M,
            N,
            K,
            rank,
            multiprocessors=devices.multiprocessor_count(x.device),
            block_k=block_k,
            weight_element_bytes=_weight_element_bytes(weight),
            adapter_element_bytes=x.element_size(),
        )
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    u = torch.zeros(M, rank, dtype=torch.float32, device=x.device)
    weight_args, weight_strides, weight_flags = _base_weight_args(weight, transpose=False)
    _lora_splitk_kernel[
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits, triton.cdiv(M, meta["BLOCK_M"]))
    ](
        x,
        *weight_args,
        lora_A,
        lora_B,
        bias,
        u,
        out,
        M,
        N,
        K,
        rank,
        k_per_split,
        scaling,
        *_dropout_args(dropout_p, dropout_seed),
        *x.stride(),
        *weight_strides,
        *lora_A.stride(),
        *lora_B.stride(),
        bias.stride(0) if bias is not None else 0,
        *u.stride(),
        *out.stride(),
        RANK_BLOCK=rank_block(rank),
        INPUT_DROPOUT=dropout_p > 0,
        **weight_flags,
        # bitsandbytes rounds the double-quantised scale's product and sum separately: no FMA contraction.
        enable_fp_fusion=not weight_flags["DOUBLE_QUANT"],
        INPUT_PRECISION=_input_precision(x.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    return out.to(x.dtype), u.to(x.dtype)


def lora_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    *,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    """scale · leftᵀ @ [keep ⊙] right: left (M, P), right (M, Q), any strides; a new (P, Q) of out_dtype.

    Computed in left's dtype with fp32 accumulation, split over M and summed in fp32.
    """
    M, P = left.shape
    Q = right.shape[1]
    # The rank side is one padded tile; the other side tiles by 64.
    block_p = rank_block(P) if P <= 128 else 64
    block_q = rank_block(Q) if Q <= 128 and P > 128 else 64
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    target_programs = 4 * devices.multiprocessor_count(left.device)
    splits = max(1, min(triton.cdiv(target_programs, tiles), triton.cdiv(M, 128)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 128) * 128
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, P, Q, dtype=torch.float32, device=left.device)
    _lora_weight_grad_kernel[(triton.cdiv(P, block_p), triton.cdiv(Q, block_q), splits)](
        left,
        right,
        partial,
        M,
        P,
        Q,
        rows_per_split,
        dropout_seed,
        drop_threshold(dropout_p),
        *left.stride(),
        *right.stride(),
        *partial.stride(),
        RIGHT_DROPOUT=dropout_p > 0,
        INPUT_PRECISION=_input_precision(left.dtype),
        INTERPRET=devices.triton_interpret(),
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
    )
    return (partial.sum(0) * scale).to(out_dtype)


def _forward_strategy(
    x: torch.Tensor, weight: torch.Tensor | Weight4bit, N: int, rank: int, dropout_p: float
) -> str:
    """The forward's automatic choice: "splitk" where `prefers_splitk`, unless
    `torch.use_deterministic_algorithms` is on (the splits' atomics add in any order);
    else `choose_strategy`."""
    M, K = x.shape
    if not torch.are_deterministic_algorithms_enabled() and prefers_splitk(
        M,
        N,
        K,
        rank,
        multiprocessors=devices.multiprocessor_count(x.device),
        weight_element_bytes=_weight_element_bytes(weight),
        adapter_element_bytes=x.element_size(),
    ):
        return "splitk"
    return choose_strategy(M, N, rank, dropout_p)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    *,
    strategy: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u) of `cdm_fast.ops.lora`: x (M, in) any strides, weight (out, in) any float dtype (cast tile by
    tile to x's) or 4-bit, lora_A (r, in), lora_B (out, r). y (M, out) and u (M, r) are new, in x's dtype.
    `strategy` None picks by `_forward_strategy` (split K for a decode on an underfilled grid);
    "mainloop", "separate" or "splitk" force one.
    """
    strategy = strategy or _forward_strategy(x, weight, lora_B.shape[0], lora_A.shape[0], dropout_p)
    if strategy not in FORWARD_STRATEGIES:
        raise ValueError(f"strategy: expected one of {FORWARD_STRATEGIES} or None, got {strategy!r}")
    # The adapter is small: cast it to the activation's dtype, never the activation to the adapter's.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if strategy == "splitk":
        return lora_splitk(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed)
    u = lora_down(x, lora_A, dropout_p, dropout_seed) if strategy == "separate" else None
    return lora_matmul(
        x,
        weight,
        lora_A,
        lora_B,
        bias,
        u,
        scaling,
        transpose_weight=False,
        input_dropout=True,
        epilogue_dropout=False,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )


def input_grad(
    grad_y: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    *,
    strategy: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, v): dx = dy @ weight + scaling/(1-p) · keep ⊙ (v @ lora_A), v = dy @ lora_B (M, r), both new."""
    M, in_features, rank = grad_y.shape[0], lora_A.shape[1], lora_A.shape[0]
    strategy = strategy or choose_strategy(M, in_features, rank, 0.0)
    lora_A, lora_B = lora_A.to(grad_y.dtype), lora_B.to(grad_y.dtype)
    v = lora_down(grad_y, lora_B.t()) if strategy == "separate" else None
    return lora_matmul(
        grad_y,
        weight,
        lora_B.t(),
        lora_A.t(),
        None,
        v,
        scaling / (1.0 - dropout_p),
        transpose_weight=True,
        input_dropout=False,
        epilogue_dropout=True,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )


def weight_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d lora_A (r, in), d lora_B (out, r)) in the adapters' dtypes: the two skinny weight-gradient GEMMs."""
    grad_A = lora_weight_grad(
        v, x, scaling / (1.0 - dropout_p), lora_A.dtype, dropout_p=dropout_p, dropout_seed=dropout_seed
    )
    grad_B = lora_weight_grad(grad_y, u, scaling, lora_B.dtype)
    return grad_A, grad_B


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    needs_x_grad: bool,
    *,
    strategy: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx (M, in) | None, d lora_A, d lora_B) for grad_y (M, out) contiguous and the saved x, u."""
    if needs_x_grad:
        grad_x, v = input_grad(
            grad_y, weight, lora_A, lora_B, scaling, dropout_p, dropout_seed, strategy=strategy
        )
    else:
        grad_x, v = None, lora_down(grad_y, lora_B.to(grad_y.dtype).t())
    grad_A, grad_B = weight_grads(grad_y, x, u, v, lora_A, lora_B, scaling, dropout_p, dropout_seed)
    return grad_x, grad_A, grad_B
