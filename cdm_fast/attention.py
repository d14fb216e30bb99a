"""Block layouts for `cdm_fast.block_sparse_attention`, and the index form the kernels walk.

A layout is a bool tensor (B|1, H|1, ceil(Sq/bs), ceil(Sk/bs)): block (i, j) is True when query block i may
attend to key block j. Inside a kept block every element is visible, except where `causal` hides it (causal
aligns the last query with the last key: query q sees key k when k ≤ q + Sk − Sq).

`BlockIndex` turns a layout into per-row lists of kept key blocks (and, for backward, per-column lists of
query blocks), dropping the blocks causality hides entirely. Build it once per (layout, sizes, causal) and
reuse it across layers: it holds only small int32 tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _causal_blocks(seq_len_q: int, seq_len_k: int, block_size: int, device) -> torch.Tensor:
    """(nq, nk) bool: block (i, j) holds at least one (query, key) pair causality allows."""
    offset = seq_len_k - seq_len_q
    first_query = torch.arange(num_blocks(seq_len_q, block_size), device=device) * block_size
    # A block's last query sees the most keys, and its first key is the one it must see.
    last_query = torch.clamp(first_query + block_size - 1, max=seq_len_q - 1)
    first_key = torch.arange(num_blocks(seq_len_k, block_size), device=device) * block_size
    return first_key[None, :] <= last_query[:, None] + offset


def dense_layout(seq_len_q: int, seq_len_k: int, block_size: int = 128, device=None) -> torch.Tensor:
    """Every block kept: (1, 1, nq, nk)."""
    return torch.ones(
        1,
        1,
        num_blocks(seq_len_q, block_size),
        num_blocks(seq_len_k, block_size),
        dtype=torch.bool,
        device=device,
    )


def causal_layout(seq_len_q: int, seq_len_k: int, block_size: int = 128, device=None) -> torch.Tensor:
    """The blocks causal attention touches (last query aligned with the last key): (1, 1, nq, nk)."""
    return _causal_blocks(seq_len_q, seq_len_k, block_size, device)[None, None]


def sliding_window_layout(
    seq_len_q: int,
    seq_len_k: int,
    block_size: int = 128,
    *,
    window_blocks: int,
    global_blocks: int = 1,
    causal: bool = True,
    device=None,
) -> torch.Tensor:
    """Local window of `window_blocks` key blocks ending at each query block's diagonal, plus the first
    `global_blocks` key blocks (sinks) for every query, and every key block for the first `global_blocks`
    query blocks when not causal. (1, 1, nq, nk)."""
    if window_blocks < 1 or global_blocks < 0:
        raise ValueError(
            f"window_blocks: expected ≥ 1 (and global_blocks ≥ 0), got {window_blocks}, {global_blocks}"
        )
    nq, nk = num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size)
    # The diagonal key block of each query block, with the last query aligned to the last key.
    diagonal = (torch.arange(nq, device=device) * block_size + (seq_len_k - seq_len_q)).clamp(
        min=0
    ) // block_size
    keys = torch.arange(nk, device=device)
    distance = diagonal[:, None] - keys[None, :]
    keep = (distance >= 0) & (distance < window_blocks) if causal else distance.abs() < window_blocks
    keep |= keys[None, :] < global_blocks
    if not causal:
        keep |= torch.arange(nq, device=device)[:, None] < global_blocks
    else:
        keep &= _causal_blocks(seq_len_q, seq_len_k, block_size, device)
    return keep[None, None]


def strided_layout(
    seq_len_q: int, seq_len_k: int, block_size: int = 128, *, stride: int, causal: bool = True, device=None
) -> torch.Tensor:
    """Each query block keeps its own diagonal key block and every `stride`-th key block (Sparse
    Transformer's strided pattern at block granularity). (1, 1, nq, nk)."""
    if stride < 1:
        raise ValueError(f"stride: expected ≥ 1, got {stride}")
    nq, nk = num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size)
    diagonal = (torch.arange(nq, device=device) * block_size + (seq_len_k - seq_len_q)).clamp(
        min=0
    ) // block_size
    keys = torch.arange(nk, device=device)
    keep = (keys[None, :] % stride == stride - 1) | (keys[None, :] == diagonal[:, None])
    if causal:
        keep &= _causal_blocks(seq_len_q, seq_len_k, block_size, device)
    return keep[None, None]


def layout_from_mask_mod(
    mask_mod: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int,
    heads: int,
    seq_len_q: int,
    seq_len_k: int,
    block_size: int = 128,
    device=None,
) -> torch.Tensor:
    """A layout from a FlexAttention-style `mask_mod(b, h, q_idx, kv_idx) -> bool`: a block is kept when
    any of its elements is. Evaluates the mask densely, (B, H, nq, nk); meant for building a layout once."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    q = torch.arange(seq_len_q, device=device)[None, None, :, None]
    k = torch.arange(seq_len_k, device=device)[None, None, None, :]
    allowed = torch.as_tensor(mask_mod(b, h, q, k), device=device).expand(batch, heads, seq_len_q, seq_len_k)
    return _any_per_block(allowed, block_size)


def layout_from_key_padding(
    key_padding_mask: torch.Tensor, seq_len_q: int, block_size: int = 128, *, causal: bool = False
) -> torch.Tensor:
    """A layout (B, 1, nq, nk) from a key-padding mask (B, Sk), True = a real token: a key block is kept when
    it holds any real token. Padding inside a kept block still needs masking: pass the same mask to the op."""
    if key_padding_mask.dim() != 2 or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask: expected a bool (B, Sk) tensor, got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )
    batch, seq_len_k = key_padding_mask.shape
    keys = _any_per_block(key_padding_mask[:, None, None, :], block_size)  # (B, 1, 1, nk)
    layout = keys.expand(batch, 1, num_blocks(seq_len_q, block_size), keys.shape[-1])
    if causal:
        layout = layout & _causal_blocks(seq_len_q, seq_len_k, block_size, key_padding_mask.device)
    return layout.contiguous()


def _any_per_block(allowed: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., Sq, Sk) bool -> (..., nq, nk): whether any element of each block is True."""
    *lead, seq_len_q, seq_len_k = allowed.shape
    nq, nk = num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size)
    padded = allowed.new_zeros(*lead, nq * block_size, nk * block_size)
    padded[..., :seq_len_q, :seq_len_k] = allowed
    return padded.reshape(*lead, nq, block_size, nk, block_size).any(dim=-1).any(dim=-2)


@dataclass(frozen=True)
class BlockIndex:
    """The kept key blocks of every query block, and the kept query blocks of every key block.

    kv_blocks (B', H', nq, max_kv) int32: row (b, h, i) lists the kept key blocks of query block i in
    increasing order, padded with -1; kv_counts (B', H', nq) int32 says how many are valid. q_blocks /
    q_counts are the transposed lists (B', H', nk, max_q), walked by the backward's dk/dv pass. B' and H'
    are 1 where the layout broadcasts. Causality is already applied at block level; the kernels still mask
    elements inside the diagonal blocks.
    """

    kv_blocks: torch.Tensor
    kv_counts: torch.Tensor
    q_blocks: torch.Tensor
    q_counts: torch.Tensor
    block_size: int
    seq_len_q: int
    seq_len_k: int
    causal: bool

    @classmethod
    def from_layout(
        cls, layout: torch.Tensor, seq_len_q: int, seq_len_k: int, block_size: int, *, causal: bool = False
    ) -> BlockIndex:
        """Build the index of a bool layout (B|1, H|1, nq, nk) (validated by the caller)."""
        keep = layout.to(torch.bool)
        if causal:
            keep = keep & _causal_blocks(seq_len_q, seq_len_k, block_size, layout.device)
        kv_blocks, kv_counts = _lists(keep)
        q_blocks, q_counts = _lists(keep.transpose(-1, -2))
        return cls(kv_blocks, kv_counts, q_blocks, q_counts, block_size, seq_len_q, seq_len_k, causal)

    def to(self, device: torch.device | str) -> BlockIndex:
        return BlockIndex(
            self.kv_blocks.to(device),
            self.kv_counts.to(device),
            self.q_blocks.to(device),
            self.q_counts.to(device),
            self.block_size,
            self.seq_len_q,
            self.seq_len_k,
            self.causal,
        )

    @property
    def density(self) -> float:
        """Fraction of the (nq × nk) blocks kept, averaged over the batch and head entries."""
        nq, nk = self.kv_counts.shape[-1], self.q_counts.shape[-1]
        return float(self.kv_counts.sum()) / (self.kv_counts.numel() * nk) if nq and nk else 0.0


def _lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., rows, cols) bool -> (indices (..., rows, max(1, max count)) int32 padded with -1, counts)."""
    counts = keep.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    columns = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32)
    # Kept columns sort first, in increasing order: key = column for kept, column + cols for dropped.
    order = torch.where(keep, columns, columns + keep.shape[-1]).argsort(dim=-1, stable=True)[..., :width]
    indices = torch.where(
        torch.arange(width, device=keep.device) < counts[..., None], order.to(torch.int32), -1
    ).to(torch.int32)
    return indices.contiguous(), counts.contiguous()
