"""Block-sparse attention with the per-query attention entropy computed in the same pass.

    s_ij = scale · q_i · k_j        for the key blocks the layout keeps (and, if causal, j ≤ i + Sk − Sq)
    p_ij = exp(s_ij − m_i) / l_i    m_i = max_j s_ij,  l_i = Σ_j exp(s_ij − m_i)
    out_i = Σ_j p_ij v_j            H_i = −Σ_j p_ij log p_ij = m_i + log l_i − Σ_j p_ij s_ij   (nats)
q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq a multiple of Hkv (GQA: query head h reads kv head h // (Hq/Hkv)).
A query row with no visible key has out 0, entropy 0 (and log-sum-exp −inf, which backward reads as "no p").

Cost at density ρ (fraction of kept blocks): forward 4·B·Hq·Sq·Sk·D·ρ FLOPs, backward 2.5× that; bytes:
q, k, v, out once each (k, v re-read from L2 by the query blocks sharing them), plus (B, Hq, Sq) floats of
log-sum-exp and entropy. The attention matrix (B·Hq·Sq·Sk) is never written; the entropy costs one extra
(BLOCK_M,) accumulator of Σ p·s per row.
"""

from __future__ import annotations

import math

import torch

from cdm_fast import device as devices
from cdm_fast.attention import BlockIndex, num_blocks
from cdm_fast.dispatch import Implementation, register, register_examples, requested_backend, select

OP = "attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int = 128,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, dense and masked: (out (B, Hq, Sq, D) in q's dtype, entropy (B, Hq, Sq) float32).

    Computed in float32 (float64 if q is float64). key_padding_mask (B, Sk) bool, True = a real key.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_c = k.to(dtype).repeat_interleave(group, dim=1)
    v_c = v.to(dtype).repeat_interleave(group, dim=1)
    scores = scale * (q.to(dtype) @ k_c.transpose(-1, -2))
    visible = element_mask(layout, batch, heads, seq_len_q, seq_len_k, block_size, causal, key_padding_mask)
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    empty = ~visible.any(-1, keepdim=True)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    p = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    p = torch.where(visible, p, torch.zeros_like(p))
    out = p @ v_c
    entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    return out.to(q.dtype), entropy.to(torch.float32)


def element_mask(
    layout: torch.Tensor,
    batch: int,
    heads: int,
    seq_len_q: int,
    seq_len_k: int,
    block_size: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, Sq, Sk) bool: which (query, key) pairs the layout, causality and key padding allow."""
    rows = torch.arange(seq_len_q, device=layout.device) // block_size
    cols = torch.arange(seq_len_k, device=layout.device) // block_size
    visible = layout.to(torch.bool)[:, :, rows][:, :, :, cols].expand(batch, heads, seq_len_q, seq_len_k)
    if causal:
        query = torch.arange(seq_len_q, device=layout.device)[:, None]
        key = torch.arange(seq_len_k, device=layout.device)[None, :]
        visible = visible & (key <= query + seq_len_k - seq_len_q)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(layout.device)[:, None, None, :]
    return visible


def _validate(q, k, v, layout, block_size, scale, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {t.device}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, S, D), got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
    batch, heads, seq_len_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or heads % max(k.shape[1], 1) != 0 or k.shape[1] == 0:
        raise ValueError(
            f"k: expected ({batch}, Hkv, Sk, {head_dim}) with {heads} % Hkv == 0, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim from 1 to {MAX_HEAD_DIM}, got {head_dim}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size: expected a power of two from 16 to 128 {BLOCK_SIZES}, got {block_size}"
        )
    seq_len_k = k.shape[2]
    expected = (num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size))
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(
            f"layout: expected a bool tensor, got {getattr(layout, 'dtype', type(layout).__name__)}"
        )
    if (
        layout.dim() != 4
        or tuple(layout.shape[2:]) != expected
        or layout.shape[0] not in (1, batch)
        or layout.shape[1] not in (1, heads)
    ):
        raise ValueError(
            f"layout: expected ({batch}|1, {heads}|1, {expected[0]}, {expected[1]}) for Sq={seq_len_q}, "
            f"Sk={seq_len_k}, block_size={block_size}, got {tuple(layout.shape)}"
        )
    if layout.device != q.device:
        raise ValueError(f"layout: expected device {q.device} (q's), got {layout.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask: expected device {q.device} (q's), got {key_padding_mask.device}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq_len_k)
    ):
        raise ValueError(
            f"key_padding_mask: expected bool ({batch}, {seq_len_k}), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int = 128,
    causal: bool = False,
    scale: float | None = None,
    return_entropy: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    index: BlockIndex | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over the key blocks `layout` keeps, optionally with each query's attention entropy.

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq a multiple of Hkv; float16/bfloat16/float32 (float64 on
            the torch backend); D ≤ 256; any strides.
        layout: bool (B|1, Hq|1, ceil(Sq/block_size), ceil(Sk/block_size)).
        block_size: 16, 32, 64 or 128.
        causal: also hide keys after each query, the last query aligned with the last key.
        scale: defaults to 1/sqrt(D).
        return_entropy: also return the softmax entropy per query, (B, Hq, Sq) float32 nats.
        key_padding_mask: optional bool (B, Sk), True = a real key; padded keys are never attended.
        index: a prebuilt `BlockIndex` of this layout (reuse it across layers); built when None. Only its
            sizes are checked against the call: an index of another layout of equal sizes goes unnoticed.
        backend: None/"auto", "torch" or "triton"; env CDM_FAST_BACKEND overrides auto.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, and entropy when asked. Rows with no visible key: out 0, entropy 0.
        Differentiable in q, k and v.
    """
    _validate(q, k, v, layout, block_size, scale, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seq_len_q, seq_len_k = q.shape[2], k.shape[2]
    if index is None:
        index = BlockIndex.from_layout(layout, seq_len_q, seq_len_k, block_size, causal=causal)
    elif (index.block_size, index.seq_len_q, index.seq_len_k, index.causal) != (
        block_size,
        seq_len_q,
        seq_len_k,
        causal,
    ):
        raise ValueError(
            f"index: built for block_size={index.block_size}, Sq={index.seq_len_q}, Sk={index.seq_len_k}, "
            f"causal={index.causal}; this call has {block_size}, {seq_len_q}, {seq_len_k}, {causal}"
        )
    resolved = requested_backend(backend)
    # Fail before any launch (and outside the custom op, so the message is not wrapped).
    select(OP, resolved, q, k, v)
    out, entropy, _ = _attention_op(
        q,
        k,
        v,
        layout,
        index.kv_blocks,
        index.kv_counts,
        index.q_blocks,
        index.q_counts,
        key_padding_mask,
        block_size,
        causal,
        scale,
        return_entropy,
        resolved,
    )
    return (out, entropy) if return_entropy else out


# ---------------------------------------------------------------- custom ops and autograd


def _log_sum_exp_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 beside half and float32 inputs; float64 keeps the torch backend's float64 gradients exact."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _index(kv_blocks, kv_counts, q_blocks, q_counts, block_size, seq_len_q, seq_len_k, causal) -> BlockIndex:
    return BlockIndex(kv_blocks, kv_counts, q_blocks, q_counts, block_size, seq_len_q, seq_len_k, causal)


@torch.library.custom_op("cdm_fast::block_sparse_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    q_blocks: torch.Tensor,
    q_counts: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    block_size: int,
    causal: bool,
    scale: float,
    return_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = _index(kv_blocks, kv_counts, q_blocks, q_counts, block_size, q.shape[2], k.shape[2], causal)
    impl = select(OP, backend, q, k, v)
    out, log_sum_exp, entropy = impl.forward(q, k, v, layout, index, key_padding_mask, scale, return_entropy)
    # A custom op cannot return None: an empty tensor stands for "not asked".
    return out, entropy if entropy is not None else q.new_empty(0, dtype=torch.float32), log_sum_exp


@_attention_op.register_fake
def _(
    q,
    k,
    v,
    layout,
    kv_blocks,
    kv_counts,
    q_blocks,
    q_counts,
    key_padding_mask,
    block_size,
    causal,
    scale,
    return_entropy,
    backend,
):
    rows = q.shape[:3]
    entropy = (
        q.new_empty(rows, dtype=torch.float32) if return_entropy else q.new_empty(0, dtype=torch.float32)
    )
    return torch.empty_like(q), entropy, q.new_empty(rows, dtype=_log_sum_exp_dtype(q))


@torch.library.custom_op("cdm_fast::block_sparse_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    log_sum_exp: torch.Tensor,
    layout: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    q_blocks: torch.Tensor,
    q_counts: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    block_size: int,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = _index(kv_blocks, kv_counts, q_blocks, q_counts, block_size, q.shape[2], k.shape[2], causal)
    impl = select(OP, backend, q, k, v)
    return impl.backward(
        grad_out.contiguous(), q, k, v, out, log_sum_exp, layout, index, key_padding_mask, scale
    )


@_attention_backward_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    log_sum_exp,
    layout,
    kv_blocks,
    kv_counts,
    q_blocks,
    q_counts,
    key_padding_mask,
    block_size,
    causal,
    scale,
    backend,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        layout,
        kv_blocks,
        kv_counts,
        q_blocks,
        q_counts,
        key_padding_mask,
        block_size,
        causal,
        scale,
        _,
        backend,
    ) = inputs
    out, _, log_sum_exp = output
    ctx.save_for_backward(
        q, k, v, out, log_sum_exp, layout, kv_blocks, kv_counts, q_blocks, q_counts, key_padding_mask
    )
    ctx.config = (block_size, causal, scale, backend)


def _backward(ctx, grad_out, grad_entropy, grad_log_sum_exp):
    q, k, v, out, log_sum_exp, layout, kv_blocks, kv_counts, q_blocks, q_counts, key_padding_mask = (
        ctx.saved_tensors
    )
    grad_q, grad_k, grad_v = _attention_backward_op(
        grad_out,
        q,
        k,
        v,
        out,
        log_sum_exp,
        layout,
        kv_blocks,
        kv_counts,
        q_blocks,
        q_counts,
        key_padding_mask,
        *ctx.config,
    )
    return grad_q, grad_k, grad_v, *([None] * 11)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- torch backend (reference math, any device)


def _torch_forward(q, k, v, layout, index, key_padding_mask, scale, return_entropy):
    """The reference, plus the log-sum-exp per row (−inf for empty rows) that backward uses."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, seq_len_q, _ = q.shape
    seq_len_k = k.shape[2]
    group = heads // k.shape[1]
    visible = element_mask(
        layout, batch, heads, seq_len_q, seq_len_k, index.block_size, index.causal, key_padding_mask
    )
    k_c = k.to(dtype).repeat_interleave(group, dim=1)
    v_c = v.to(dtype).repeat_interleave(group, dim=1)
    scores = (scale * (q.to(dtype) @ k_c.transpose(-1, -2))).masked_fill(~visible, float("-inf"))
    log_sum_exp = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - log_sum_exp[..., None].clamp_min(torch.finfo(dtype).min))
    p = torch.where(visible, p, torch.zeros_like(p))
    out = (p @ v_c).to(q.dtype)
    entropy = None
    if return_entropy:
        entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1).to(torch.float32)
    return out, log_sum_exp.to(_log_sum_exp_dtype(q)), entropy


def _torch_backward(grad_out, q, k, v, out, log_sum_exp, layout, index, key_padding_mask, scale):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, seq_len_q, _ = q.shape
    seq_len_k, kv_heads = k.shape[2], k.shape[1]
    group = heads // kv_heads
    visible = element_mask(
        layout, batch, heads, seq_len_q, seq_len_k, index.block_size, index.causal, key_padding_mask
    )
    q_c, grad_c = q.to(dtype), grad_out.to(dtype)
    k_c = k.to(dtype).repeat_interleave(group, dim=1)
    v_c = v.to(dtype).repeat_interleave(group, dim=1)
    scores = scale * (q_c @ k_c.transpose(-1, -2))
    # Recompute p from the saved log-sum-exp, as the kernels do; an empty row has lse −inf and no p.
    lse = log_sum_exp.to(dtype)[..., None]
    p = torch.where(
        visible & torch.isfinite(lse), torch.exp(scores - lse.clamp_min(-1e30)), torch.zeros_like(scores)
    )
    grad_v = p.transpose(-1, -2) @ grad_c
    grad_p = grad_c @ v_c.transpose(-1, -2)
    delta = (grad_c * out.to(dtype)).sum(-1, keepdim=True)
    grad_scores = p * (grad_p - delta) * scale
    grad_q = grad_scores @ k_c
    grad_k = grad_scores.transpose(-1, -2) @ q_c
    # GQA: the query heads of one group share a key/value head; their gradients add.
    grad_k = grad_k.reshape(batch, kv_heads, group, seq_len_k, -1).sum(2)
    grad_v = grad_v.reshape(batch, kv_heads, group, seq_len_k, -1).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _torch_supports(q, k, v):
    return None


register(
    Implementation(
        op=OP,
        backend="torch",
        forward=_torch_forward,
        backward=_torch_backward,
        supports=_torch_supports,
        tolerances={"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "entropy": 1e-4},
    )
)


# ---------------------------------------------------------------- triton backend (kernels/attention.py)


def _triton_supports(q, k, v):
    reason = devices.triton_unavailable_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype == torch.float64:
        return "float64 is served by the torch backend only"
    try:
        from cdm_fast.kernels import attention  # noqa: F401
    except ImportError as error:
        return f"the Triton attention kernels are not available ({error})"
    return None


def _triton_forward(q, k, v, layout, index, key_padding_mask, scale, return_entropy):
    from cdm_fast.kernels import attention as kernels

    return kernels.forward(q, k, v, index, key_padding_mask, scale=scale, return_entropy=return_entropy)


def _triton_backward(grad_out, q, k, v, out, log_sum_exp, layout, index, key_padding_mask, scale):
    from cdm_fast.kernels import attention as kernels

    return kernels.backward(grad_out, q, k, v, out, log_sum_exp, index, key_padding_mask, scale=scale)


register(
    Implementation(
        op=OP,
        backend="triton",
        forward=_triton_forward,
        backward=_triton_backward,
        supports=_triton_supports,
        tolerances={"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "entropy": 1e-3},
    )
)


def _example_calls(device: torch.device) -> list[tuple[str, tuple]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 4, 256, 64, device=device, dtype=dtype)
    k = torch.randn(1, 2, 256, 64, device=device, dtype=dtype)
    return [(str(dtype).removeprefix("torch."), (q, k, k))]


register_examples(OP, _example_calls)
