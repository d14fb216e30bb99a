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
# At most this many tokens take the decode path (`_lora_decode_kernel`).
DECODE_MAX_TOKENS = 64
# The r·(N tiles - 1) above which repeating u's FLOPs in every N tile costs more than re-reading x once:
# peak bf16 FLOP/s over DRAM bytes/s on an H100 SXM (989e12 / 3.35e12), rounded.
_MAINLOOP_REPEAT_LIMIT = 300
_ASSUMED_BLOCK_N = 128


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
        if WEIGHT_4BIT:
            # QLoRA: the base weight is decoded from its 4-bit codes in registers, tile by tile.
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
            w = cast(w, a_ptr.dtype.element_ty, INTERPRET)
        else:
            w = load_tile(w_ptr, k, n, stride_w_k, stride_w_n, K, N, 0.0)
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
    tile to x's), lora_A (r, in), lora_B (out, r). y (M, out) and u (M, r) are new, in x's dtype.
    `strategy` None picks by `choose_strategy`.
    """
    M, N, rank = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    strategy = strategy or choose_strategy(M, N, rank, dropout_p)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES} or None, got {strategy!r}")
    # The adapter is small: cast it to the activation's dtype, never the activation to the adapter's.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
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
