"""Triton kernels of block-sparse attention with the fused entropy (the math: `cdm_fast.ops.attention`).

forward     one program per (BLOCK_M query rows, query head): online softmax over the kept key blocks of
            its query block (`BlockIndex.kv_blocks`), walked in BLOCK_N sub-tiles, with beside m and l one
            more accumulator e = Σ exp(s − m)·(s − m), rescaled as l is, so that H = log l − e / l (nats).
            Writes out, the log-sum-exp m + log l (−inf for a row with no visible key) and the entropy.
backward    FlashAttention-2: `_attention_delta_kernel` (delta = rowsum(dO ∘ O)), `_attention_dkdv_kernel`
            (one program per BLOCK_N keys of a KV head, walking the transposed index `q_blocks` of every query
            head of its GQA group and accumulating their contributions in registers, so dk/dv are written
            once, with no atomics and no per-head partials), `_attention_dq_kernel` (one program per query
            tile, walking kv_blocks).
Launch order ("l2"): the programs of one (batch, KV head) are consecutive, and inside them query tiles are
swizzled GEMM-style, `group` query blocks × the query heads of the GQA group, so that the programs running at
the same time read the same K/V blocks from L2; `l2_group_size` sizes the group from the device's L2.
"plain" is the Triton tutorial's order (query tiles of one head, head after head).
Products in the inputs' dtype with fp32 accumulation; fp32 inputs multiply in IEEE fp32 (no tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cdm_fast import device as devices
from cdm_fast.attention import BlockIndex, num_blocks

from .common import autotune_configs, cast, dot_in_dtype, load_tile, prune_by_shared_memory, store_tile

LAUNCH_ORDERS = ("l2", "plain")
# The interpreter has no L2: an H100's 50 MiB stands in, so the "l2" order is still exercised.
_STAND_IN_L2_BYTES = 50 * 1024 * 1024


def l2_group_size(l2_bytes: int, seq_len_k: int, head_dim: int, element_size: int, block_size: int) -> int:
    """Query blocks per swizzle group of the "l2" launch order.

    Neighbouring query blocks of a layout (causal, sliding window) read mostly the same key blocks, so a
    group of query blocks is worth running together while the K/V blocks it brings in (one block of K and
    one of V, `2 · block_size · head_dim · element_size` bytes, per query block) stay resident in half of
    the L2 (the other half for q, out and the other KV heads in flight); there are no more distinct key
    blocks than ceil(Sk / block_size).
    """
    kv_block_bytes = 2 * block_size * head_dim * element_size
    resident = (l2_bytes // 2) // max(kv_block_bytes, 1)
    return max(1, min(resident, num_blocks(seq_len_k, block_size)))


def _l2_cache_bytes(device: torch.device) -> int:
    info = devices.device_info(device) if device.type == "cuda" else None
    return info.l2_cache_bytes if info and info.l2_cache_bytes else _STAND_IN_L2_BYTES


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands must not go through tf32 (10-bit mantissa): the fp32 path promises 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def _prune(stage_bytes, resident_bytes):
    """Tiles no larger than the index block (a tile never straddles two kept blocks), then shared memory."""
    by_shared_memory = prune_by_shared_memory(stage_bytes, resident_bytes)

    def prune(configs, named_args, **kwargs):
        block_size = {**named_args, **kwargs}["BLOCK_SIZE"]
        fitting = [
            c for c in configs if c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size
        ]
        return by_shared_memory(
            fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])], named_args, **kwargs
        )

    return prune


def _element_size(args) -> int:
    return args["q_ptr"].element_size()


# Shared memory, as the compiled kernels use it (checked by bench.aot against every config): the streamed
# tiles once per pipeline copy, the program's resident tiles and MMA-operand staging (p, ds) once.


def _forward_stage_bytes(meta, args):
    """The streamed K and V tiles."""
    return _element_size(args) * 2 * meta["BLOCK_N"] * args["BLOCK_D"]


def _forward_resident_bytes(meta, args):
    """The q tile and the p tile fed to the second MMA."""
    m, n = meta["BLOCK_M"], meta["BLOCK_N"]
    return _element_size(args) * (m * args["BLOCK_D"] + m * n)


def _dkdv_stage_bytes(meta, args):
    """The streamed q and dO tiles."""
    return _element_size(args) * 2 * meta["BLOCK_M"] * args["BLOCK_D"]


def _dkdv_resident_bytes(meta, args):
    """The program's k and v tiles and the p and ds operand tiles."""
    m, n = meta["BLOCK_M"], meta["BLOCK_N"]
    return _element_size(args) * (2 * n * args["BLOCK_D"] + 2 * m * n)


def _dq_stage_bytes(meta, args):
    """The streamed K and V tiles."""
    return _element_size(args) * 2 * meta["BLOCK_N"] * args["BLOCK_D"]


def _dq_resident_bytes(meta, args):
    """The program's q and dO tiles and the ds operand tile."""
    m, n = meta["BLOCK_M"], meta["BLOCK_N"]
    return _element_size(args) * (2 * m * args["BLOCK_D"] + m * n)


def _configs(tiles) -> list[triton.Config]:
    return autotune_configs(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w) for bm, bn, s, w in tiles],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_stages=1, num_warps=4),
    )


# The last tiles are the ones D = 256 (and fp32) fit sm_120's 101,376 B with.
_FORWARD_TILES = [(128, 64, 3, 8), (128, 128, 2, 8), (64, 64, 3, 4), (64, 32, 2, 4), (32, 16, 2, 4)]
_BACKWARD_TILES = [(64, 128, 2, 8), (64, 64, 2, 4), (32, 64, 2, 4), (32, 32, 2, 4), (16, 32, 2, 4)]


@triton.jit
def _visible(rows, cols, kpm_ptr, kpm_offset, stride_kpm_s, seq_len_q, seq_len_k, CAUSAL: tl.constexpr):
    """(rows × cols) bool: the key exists, is not padding, and (causal) k ≤ q + Sk − Sq."""
    visible = (rows[:, None] < seq_len_q) & (cols[None, :] < seq_len_k)
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (seq_len_k - seq_len_q))
    if kpm_ptr is not None:
        real = tl.load(
            kpm_ptr + kpm_offset + cols.to(tl.int64) * stride_kpm_s, mask=cols < seq_len_k, other=0
        )
        visible = visible & (real != 0)[None, :]
    return visible


@triton.autotune(
    configs=_configs(_FORWARD_TILES),
    key=["seq_len_q", "seq_len_k", "BLOCK_D", "BLOCK_SIZE", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune(_forward_stage_bytes, _forward_resident_bytes)},
)
@triton.jit
def _attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kpm_ptr,
    out_ptr,
    lse_ptr,
    entropy_ptr,
    kv_blocks_ptr,
    kv_counts_ptr,
    seq_len_q,
    seq_len_k,
    head_dim,
    kv_heads,
    kv_group_size,
    group_blocks,
    scale,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_v_d,
    stride_kpm_b,
    stride_kpm_s,
    stride_out_b,
    stride_out_h,
    stride_out_s,
    stride_out_d,
    stride_lse_b,
    stride_lse_h,
    stride_lse_s,
    stride_entropy_b,
    stride_entropy_h,
    stride_entropy_s,
    stride_blocks_b,
    stride_blocks_h,
    stride_blocks_i,
    stride_blocks_j,
    stride_counts_b,
    stride_counts_h,
    stride_counts_i,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out, log-sum-exp and (entropy_ptr not None) entropy of BLOCK_M query rows of one query head.

    group_blocks > 0: the "l2" order, groups of group_blocks query blocks × the kv_group_size heads of one
    KV head; 0: the plain order.
    """
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_len_q, BLOCK_M)
    tiles_per_kv_head = kv_group_size * num_m_tiles
    batch_kv_head = pid // tiles_per_kv_head
    tile = pid % tiles_per_kv_head
    if group_blocks > 0:
        group_m = group_blocks * (BLOCK_SIZE // BLOCK_M)
        tiles_per_group = group_m * kv_group_size
        first_m = (tile // tiles_per_group) * group_m
        group_size = tl.minimum(num_m_tiles - first_m, group_m)
        m_tile = first_m + (tile % tiles_per_group) % group_size
        head_in_group = (tile % tiles_per_group) // group_size
    else:
        m_tile = tile % num_m_tiles
        head_in_group = tile // num_m_tiles
    b = batch_kv_head // kv_heads
    kv_head = batch_kv_head % kv_heads
    head = kv_head * kv_group_size + head_in_group

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_tile(
        q_ptr + b * stride_q_b + head * stride_q_h, rows, d, stride_q_s, stride_q_d, seq_len_q, head_dim, 0.0
    )
    k_base = k_ptr + b * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv_head * stride_v_h
    query_block = (m_tile * BLOCK_M) // BLOCK_SIZE
    blocks = kv_blocks_ptr + b * stride_blocks_b + head * stride_blocks_h + query_block * stride_blocks_i
    count = tl.load(
        kv_counts_ptr + b * stride_counts_b + head * stride_counts_h + query_block * stride_counts_i
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # e = Σ exp(s − m)·(s − m): relative to m, so H = log l − e / l does not cancel two large numbers.
    e_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n in range(0, count):
        key_block = tl.load(blocks + n * stride_blocks_j)
        for sub in range(0, BLOCK_SIZE, BLOCK_N):
            cols = key_block * BLOCK_SIZE + sub + tl.arange(0, BLOCK_N)
            k_t = load_tile(k_base, d, cols, stride_k_d, stride_k_s, head_dim, seq_len_k, 0.0)
            s = dot_in_dtype(
                q, k_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, INTERPRET
            )
            visible = _visible(
                rows, cols, kpm_ptr, b * stride_kpm_b, stride_kpm_s, seq_len_q, seq_len_k, CAUSAL
            )
            s = tl.where(visible, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = −inf; subtracting 0 instead avoids −inf − (−inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            if entropy_ptr is not None:
                shift = tl.where(l_i > 0, m_i - m_safe, 0.0) * l_i
                e_i = alpha * (e_i + shift) + tl.sum(p * tl.where(visible, s - m_safe[:, None], 0.0), 1)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_base, cols, d, stride_v_s, stride_v_d, seq_len_k, head_dim, 0.0)
            acc = dot_in_dtype(
                cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INPUT_PRECISION, INTERPRET
            )
            m_i = m_new

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    store_tile(
        out_ptr + b * stride_out_b + head * stride_out_h,
        out,
        rows,
        d,
        stride_out_s,
        stride_out_d,
        seq_len_q,
        head_dim,
        INTERPRET,
    )
    lse = tl.where(nonempty, m_i + tl.log(l_safe), float("-inf"))
    inside = rows < seq_len_q
    tl.store(lse_ptr + b * stride_lse_b + head * stride_lse_h + rows * stride_lse_s, lse, mask=inside)
    if entropy_ptr is not None:
        entropy = tl.where(nonempty, tl.log(l_safe) - e_i / l_safe, 0.0)
        entropy_row = entropy_ptr + b * stride_entropy_b + head * stride_entropy_h
        tl.store(entropy_row + rows * stride_entropy_s, entropy, mask=inside)


def _broadcast_strides(t: torch.Tensor, dims: int) -> list[int]:
    """Strides of the first `dims` dims, 0 where the dim has size 1 (the layout broadcasts there)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)]


def _index_args(blocks: torch.Tensor, counts: torch.Tensor) -> list[int]:
    return [
        *_broadcast_strides(blocks, 2),
        blocks.stride(2),
        blocks.stride(3),
        *_broadcast_strides(counts, 2),
        counts.stride(2),
    ]


def _padding_args(key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    if key_padding_mask is None:
        return None, 0, 0
    mask = key_padding_mask.to(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    key_padding_mask: torch.Tensor | None,
    *,
    scale: float,
    return_entropy: bool,
    launch_order: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out (B, Hq, Sq, D) in q's dtype, log-sum-exp (B, Hq, Sq) fp32, entropy (B, Hq, Sq) fp32 or None).

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with any strides; key_padding_mask (B, Sk) bool or None.
    """
    if launch_order not in LAUNCH_ORDERS:
        raise ValueError(f"launch_order: expected one of {LAUNCH_ORDERS}, got {launch_order!r}")
    batch, heads, seq_len_q, head_dim = q.shape
    kv_heads, seq_len_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_len_q, dtype=torch.float32, device=q.device)
    entropy = torch.empty_like(lse) if return_entropy else None
    mask, *mask_strides = _padding_args(key_padding_mask)
    group_blocks = 0
    if launch_order == "l2":
        group_blocks = l2_group_size(
            _l2_cache_bytes(q.device), seq_len_k, head_dim, q.element_size(), index.block_size
        )
    entropy_strides = entropy.stride() if entropy is not None else (0, 0, 0)
    _attention_forward_kernel[lambda meta: (batch * heads * triton.cdiv(seq_len_q, meta["BLOCK_M"]),)](
        q,
        k,
        v,
        mask,
        out,
        lse,
        entropy,
        index.kv_blocks,
        index.kv_counts,
        seq_len_q,
        seq_len_k,
        head_dim,
        kv_heads,
        heads // kv_heads,
        group_blocks,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        *out.stride(),
        *lse.stride(),
        *entropy_strides,
        *_index_args(index.kv_blocks, index.kv_counts),
        CAUSAL=index.causal,
        BLOCK_SIZE=index.block_size,
        BLOCK_D=_block_d(head_dim),
        INPUT_PRECISION=_input_precision(q.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    return out, lse, entropy


@triton.autotune(configs=_configs([(64, 16, 1, 4), (128, 16, 1, 4)]), key=["seq_len_q", "BLOCK_D"])
@triton.jit
def _attention_delta_kernel(
    grad_out_ptr,
    out_ptr,
    delta_ptr,
    rows_total,
    seq_len_q,
    head_dim,
    heads,
    stride_grad_b,
    stride_grad_h,
    stride_grad_s,
    stride_grad_d,
    stride_out_b,
    stride_out_h,
    stride_out_s,
    stride_out_d,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) in fp32 for BLOCK_M of the B·Hq·Sq rows (delta is contiguous (B, Hq, Sq))."""
    flat = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    position = flat % seq_len_q
    head = (flat // seq_len_q) % heads
    b = flat // (seq_len_q * heads)
    d = tl.arange(0, BLOCK_D)
    inside = (flat < rows_total)[:, None] & (d < head_dim)[None, :]
    grad_rows = b.to(tl.int64) * stride_grad_b + head * stride_grad_h + position.to(tl.int64) * stride_grad_s
    out_rows = b.to(tl.int64) * stride_out_b + head * stride_out_h + position.to(tl.int64) * stride_out_s
    grad = tl.load(grad_out_ptr + grad_rows[:, None] + d[None, :] * stride_grad_d, mask=inside, other=0.0)
    out = tl.load(out_ptr + out_rows[:, None] + d[None, :] * stride_out_d, mask=inside, other=0.0)
    delta = tl.sum(grad.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + flat, delta, mask=flat < rows_total)


@triton.autotune(
    configs=_configs(_BACKWARD_TILES),
    key=["seq_len_q", "seq_len_k", "BLOCK_D", "BLOCK_SIZE", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune(_dkdv_stage_bytes, _dkdv_resident_bytes)},
)
@triton.jit
def _attention_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    kpm_ptr,
    dk_ptr,
    dv_ptr,
    q_blocks_ptr,
    q_counts_ptr,
    seq_len_q,
    seq_len_k,
    head_dim,
    kv_heads,
    kv_group_size,
    scale,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_v_d,
    stride_grad_b,
    stride_grad_h,
    stride_grad_s,
    stride_grad_d,
    stride_kpm_b,
    stride_kpm_s,
    stride_dk_b,
    stride_dk_h,
    stride_dk_s,
    stride_dk_d,
    stride_dv_b,
    stride_dv_h,
    stride_dv_s,
    stride_dv_d,
    stride_blocks_b,
    stride_blocks_h,
    stride_blocks_i,
    stride_blocks_j,
    stride_counts_b,
    stride_counts_h,
    stride_counts_i,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk = Σ dsᵀ q, dv = Σ pᵀ dO for BLOCK_N keys of one KV head, summed over the query heads of its group
    and the query blocks that keep this key block (lse, delta: (B, Hq, Sq) contiguous fp32)."""
    n_tile = tl.program_id(0)
    b = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = load_tile(
        k_ptr + b * stride_k_b + kv_head * stride_k_h,
        cols,
        d,
        stride_k_s,
        stride_k_d,
        seq_len_k,
        head_dim,
        0.0,
    )
    v = load_tile(
        v_ptr + b * stride_v_b + kv_head * stride_v_h,
        cols,
        d,
        stride_v_s,
        stride_v_d,
        seq_len_k,
        head_dim,
        0.0,
    )
    key_block = (n_tile * BLOCK_N) // BLOCK_SIZE
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    heads = kv_heads * kv_group_size
    for head_in_group in range(0, kv_group_size):
        head = kv_head * kv_group_size + head_in_group
        q_base = q_ptr + b * stride_q_b + head * stride_q_h
        grad_base = grad_out_ptr + b * stride_grad_b + head * stride_grad_h
        row_stats = (b * heads + head).to(tl.int64) * seq_len_q
        blocks = q_blocks_ptr + b * stride_blocks_b + head * stride_blocks_h + key_block * stride_blocks_i
        count = tl.load(
            q_counts_ptr + b * stride_counts_b + head * stride_counts_h + key_block * stride_counts_i
        )
        for n in range(0, count):
            query_block = tl.load(blocks + n * stride_blocks_j)
            for sub in range(0, BLOCK_SIZE, BLOCK_M):
                rows = query_block * BLOCK_SIZE + sub + tl.arange(0, BLOCK_M)
                q_t = load_tile(q_base, d, rows, stride_q_d, stride_q_s, head_dim, seq_len_q, 0.0)
                grad_t = load_tile(grad_base, d, rows, stride_grad_d, stride_grad_s, head_dim, seq_len_q, 0.0)
                lse = tl.load(lse_ptr + row_stats + rows, mask=rows < seq_len_q, other=float("-inf"))
                delta = tl.load(delta_ptr + row_stats + rows, mask=rows < seq_len_q, other=0.0)
                # Transposed scores (keys × queries): the products below then need no transposed result.
                s_t = dot_in_dtype(
                    k, q_t, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), INPUT_PRECISION, INTERPRET
                )
                visible_t = tl.trans(
                    _visible(
                        rows, cols, kpm_ptr, b * stride_kpm_b, stride_kpm_s, seq_len_q, seq_len_k, CAUSAL
                    )
                )
                # A row with lse = −inf saw no key: it has no p and contributes nothing.
                keep = visible_t & (lse > float("-inf"))[None, :]
                p_t = tl.where(keep, tl.exp(s_t * scale - tl.where(keep, lse[None, :], 0.0)), 0.0)
                dv = dot_in_dtype(
                    cast(p_t, v.dtype, INTERPRET), tl.trans(grad_t), dv, INPUT_PRECISION, INTERPRET
                )
                dp_t = dot_in_dtype(
                    v, grad_t, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), INPUT_PRECISION, INTERPRET
                )
                ds_t = p_t * (dp_t - delta[None, :]) * scale
                dk = dot_in_dtype(
                    cast(ds_t, k.dtype, INTERPRET), tl.trans(q_t), dk, INPUT_PRECISION, INTERPRET
                )
    store_tile(
        dk_ptr + b * stride_dk_b + kv_head * stride_dk_h,
        dk,
        cols,
        d,
        stride_dk_s,
        stride_dk_d,
        seq_len_k,
        head_dim,
        INTERPRET,
    )
    store_tile(
        dv_ptr + b * stride_dv_b + kv_head * stride_dv_h,
        dv,
        cols,
        d,
        stride_dv_s,
        stride_dv_d,
        seq_len_k,
        head_dim,
        INTERPRET,
    )


@triton.autotune(
    configs=_configs(_BACKWARD_TILES),
    key=["seq_len_q", "seq_len_k", "BLOCK_D", "BLOCK_SIZE", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune(_dq_stage_bytes, _dq_resident_bytes)},
)
@triton.jit
def _attention_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    kpm_ptr,
    dq_ptr,
    kv_blocks_ptr,
    kv_counts_ptr,
    seq_len_q,
    seq_len_k,
    head_dim,
    heads,
    kv_group_size,
    scale,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_v_d,
    stride_grad_b,
    stride_grad_h,
    stride_grad_s,
    stride_grad_d,
    stride_kpm_b,
    stride_kpm_s,
    stride_dq_b,
    stride_dq_h,
    stride_dq_s,
    stride_dq_d,
    stride_blocks_b,
    stride_blocks_h,
    stride_blocks_i,
    stride_blocks_j,
    stride_counts_b,
    stride_counts_h,
    stride_counts_i,
    CAUSAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq = Σ ds k over the kept key blocks of BLOCK_M query rows of one query head."""
    m_tile = tl.program_id(0)
    b = tl.program_id(1) // heads
    head = tl.program_id(1) % heads
    kv_head = head // kv_group_size
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_tile(
        q_ptr + b * stride_q_b + head * stride_q_h, rows, d, stride_q_s, stride_q_d, seq_len_q, head_dim, 0.0
    )
    grad = load_tile(
        grad_out_ptr + b * stride_grad_b + head * stride_grad_h,
        rows,
        d,
        stride_grad_s,
        stride_grad_d,
        seq_len_q,
        head_dim,
        0.0,
    )
    row_stats = (b * heads + head).to(tl.int64) * seq_len_q
    lse = tl.load(lse_ptr + row_stats + rows, mask=rows < seq_len_q, other=float("-inf"))
    delta = tl.load(delta_ptr + row_stats + rows, mask=rows < seq_len_q, other=0.0)
    k_base = k_ptr + b * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv_head * stride_v_h
    query_block = (m_tile * BLOCK_M) // BLOCK_SIZE
    blocks = kv_blocks_ptr + b * stride_blocks_b + head * stride_blocks_h + query_block * stride_blocks_i
    count = tl.load(
        kv_counts_ptr + b * stride_counts_b + head * stride_counts_h + query_block * stride_counts_i
    )
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n in range(0, count):
        key_block = tl.load(blocks + n * stride_blocks_j)
        for sub in range(0, BLOCK_SIZE, BLOCK_N):
            cols = key_block * BLOCK_SIZE + sub + tl.arange(0, BLOCK_N)
            k_t = load_tile(k_base, d, cols, stride_k_d, stride_k_s, head_dim, seq_len_k, 0.0)
            v_t = load_tile(v_base, d, cols, stride_v_d, stride_v_s, head_dim, seq_len_k, 0.0)
            s = dot_in_dtype(
                q, k_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, INTERPRET
            )
            visible = _visible(
                rows, cols, kpm_ptr, b * stride_kpm_b, stride_kpm_s, seq_len_q, seq_len_k, CAUSAL
            )
            keep = visible & (lse > float("-inf"))[:, None]
            p = tl.where(keep, tl.exp(s * scale - tl.where(keep, lse[:, None], 0.0)), 0.0)
            dp = dot_in_dtype(
                grad, v_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, INTERPRET
            )
            ds = p * (dp - delta[:, None]) * scale
            dq = dot_in_dtype(cast(ds, k_t.dtype, INTERPRET), tl.trans(k_t), dq, INPUT_PRECISION, INTERPRET)
    store_tile(
        dq_ptr + b * stride_dq_b + head * stride_dq_h,
        dq,
        rows,
        d,
        stride_dq_s,
        stride_dq_d,
        seq_len_q,
        head_dim,
        INTERPRET,
    )


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    log_sum_exp: torch.Tensor,
    index: BlockIndex,
    key_padding_mask: torch.Tensor | None,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes and shapes; log_sum_exp (B, Hq, Sq) float32 from `forward`."""
    batch, heads, seq_len_q, head_dim = q.shape
    kv_heads, seq_len_k = k.shape[1], k.shape[2]
    lse = log_sum_exp.to(torch.float32).contiguous()
    delta = torch.empty(batch, heads, seq_len_q, dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    rows_total = batch * heads * seq_len_q
    _attention_delta_kernel[lambda meta: (triton.cdiv(rows_total, meta["BLOCK_M"]),)](
        grad_out,
        out,
        delta,
        rows_total,
        seq_len_q,
        head_dim,
        heads,
        *grad_out.stride(),
        *out.stride(),
        BLOCK_D=block_d,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask, *mask_strides = _padding_args(key_padding_mask)
    common = dict(
        CAUSAL=index.causal,
        BLOCK_SIZE=index.block_size,
        BLOCK_D=block_d,
        INPUT_PRECISION=_input_precision(q.dtype),
        INTERPRET=devices.triton_interpret(),
    )
    _attention_dkdv_kernel[lambda meta: (triton.cdiv(seq_len_k, meta["BLOCK_N"]), batch * kv_heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        mask,
        dk,
        dv,
        index.q_blocks,
        index.q_counts,
        seq_len_q,
        seq_len_k,
        head_dim,
        kv_heads,
        heads // kv_heads,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad_out.stride(),
        *mask_strides,
        *dk.stride(),
        *dv.stride(),
        *_index_args(index.q_blocks, index.q_counts),
        **common,
    )
    _attention_dq_kernel[lambda meta: (triton.cdiv(seq_len_q, meta["BLOCK_M"]), batch * heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        mask,
        dq,
        index.kv_blocks,
        index.kv_counts,
        seq_len_q,
        seq_len_k,
        head_dim,
        heads,
        heads // kv_heads,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad_out.stride(),
        *mask_strides,
        *dq.stride(),
        *_index_args(index.kv_blocks, index.kv_counts),
        **common,
    )
    return dq, dk, dv
