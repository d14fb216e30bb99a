"""transformers' attention on the fused block-sparse op.

`register_hf_attention()` registers `cdm_fast.block_sparse_attention` with transformers'
`AttentionInterface` and `AttentionMaskInterface` ("cdm_block_sparse"): causal + key padding by default, any
block layout through `layout_fn`, and the per-query attention entropy through `attention_entropy_recorder()`
(what `cdm.score` reads for S when a model runs on it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdm_fast.attention import BlockIndex, causal_layout, layout_from_key_padding, num_blocks
from cdm_fast.ops.attention import BLOCK_SIZES, block_sparse_attention

ATTENTION_NAME = "cdm_block_sparse"


@dataclass
class CausalPaddingMask:
    """What the registered mask function hands the attention function instead of a dense 4-D mask.

    Causal attention with the last query aligned with the last key (prefill and KV-cache decode alike),
    plus `key_padding_mask` (B, Sk) bool, True = a real key (None: no padding). `layout` (B|1, H|1, nq, nk)
    and its `index` are built once per forward and shared by every layer.
    """

    key_padding_mask: torch.Tensor | None
    layout: torch.Tensor
    index: Any
    block_size: int
    sparse: bool


@dataclass(frozen=True)
class AttentionEntropy:
    """One attention call's softmax entropy: (B, Hq, Sq) float32 nats, from the module at `layer_idx`."""

    layer_idx: int | None
    entropy: torch.Tensor
    module: nn.Module = field(repr=False)


class AttentionEntropyRecorder:
    """Collects an `AttentionEntropy` per attention call while its context is active (`records`, in order)."""

    def __init__(self) -> None:
        self.records: list[AttentionEntropy] = []


_active_recorders: list[AttentionEntropyRecorder] = []


@contextlib.contextmanager
def attention_entropy_recorder():
    """While active, the `cdm_block_sparse` attention also computes each query's attention entropy (in the
    same fused pass) and appends it to the yielded recorder's `records`.

    Padded query rows (left padding) see no key: their entropy is 0. Calls that fall back to SDPA (a mask
    other than causal + padding) raise instead of recording nothing.
    """
    recorder = AttentionEntropyRecorder()
    _active_recorders.append(recorder)
    try:
        yield recorder
    finally:
        _active_recorders.remove(recorder)


def register_hf_attention(
    name: str = ATTENTION_NAME,
    layout_fn: Callable[[int, int, Any], torch.Tensor] | None = None,
    block_size: int = 128,
    backend: str | None = None,
) -> str:
    """Register `cdm_fast.block_sparse_attention` with transformers under `name`; returns `name`.

    Registers both an attention function (`AttentionInterface`) and a mask function (`AttentionMaskInterface`:
    without one transformers passes no mask at all, so padding would be ignored). Afterwards
    `from_pretrained(..., attn_implementation=name)` and `model.set_attn_implementation(name)` use it.
    Registering again (same or new settings) replaces the previous entry.

    The mask function returns a `CausalPaddingMask` (key padding (B, Sk) + causal, last query aligned with
    the last key), so left and right padding and KV-cache decoding are exact. `layout_fn(seq_len_q, seq_len_k,
    config)` returns a bool layout (B|1, H|1, ceil(Sq/block_size), ceil(Sk/block_size)) of kept key blocks
    (causality and key padding still apply inside it); None keeps every causal block.

    Falls back to transformers' SDPA: single-token decoding with the dense layout (nothing to skip), and
    masks other than causal + padding (mask overlays, packed sequences, sliding-window caches), which arrive
    materialised. Training with attention dropout > 0 raises: the op has no dropout.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {BLOCK_SIZES}, got {block_size!r}")
    if layout_fn is not None and not callable(layout_fn):
        raise TypeError(
            f"layout_fn: expected a callable (seq_len_q, seq_len_k, config) or None, got {layout_fn!r}"
        )
    AttentionMaskInterface.register(
        name, functools.partial(_mask, layout_fn=layout_fn, block_size=block_size)
    )
    AttentionInterface.register(name, functools.partial(_attention, backend=backend))
    return name


def _layout(layout_fn, key_padding_mask, seq_len_q, seq_len_k, block_size, config, device) -> torch.Tensor:
    if layout_fn is None:
        if key_padding_mask is None:
            return causal_layout(seq_len_q, seq_len_k, block_size, device=device)
        return layout_from_key_padding(key_padding_mask, seq_len_q, block_size, causal=True)
    layout = layout_fn(seq_len_q, seq_len_k, config)
    expected = (num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size))
    if (
        not isinstance(layout, torch.Tensor)
        or layout.dtype != torch.bool
        or layout.dim() != 4
        or tuple(layout.shape[2:]) != expected
    ):
        got = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise ValueError(
            f"layout_fn: expected a bool tensor (B|1, H|1, {expected[0]}, {expected[1]}) for Sq={seq_len_q}, "
            f"Sk={seq_len_k}, block_size={block_size}, got {getattr(layout, 'dtype', '')} {got}"
        )
    return layout.to(device)


def _mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    layout_fn,
    block_size: int,
    config: Any = None,
    device: Any = "cpu",
    **kwargs: Any,
):
    """transformers' mask-function protocol (see `masking_utils.sdpa_mask`): a `CausalPaddingMask` when the
    mask is plain causal + padding with queries ending where keys end, else the dense bool (B, 1, Sq, Sk)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if isinstance(q_offset, torch.Tensor) and q_offset.numel() == 1 and not torch.compiler.is_compiling():
        q_offset = int(q_offset)
    aligned = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    if mask_function is not causal_mask_function or not aligned:
        kwargs.pop("allow_is_causal_skip", None)
        return sdpa_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function or causal_mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            device=device,
            **kwargs,
        )
    key_padding_mask = None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if not bool(padding.all()):
            key_padding_mask = padding
    layout = _layout(layout_fn, key_padding_mask, q_length, kv_length, block_size, config, device)
    index = BlockIndex.from_layout(layout, q_length, kv_length, block_size, causal=True)
    return CausalPaddingMask(key_padding_mask, layout, index, block_size, sparse=layout_fn is not None)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    backend: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention protocol: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if module.training and dropout > 0:
        raise ValueError(
            f"dropout: cdm_block_sparse attention has no dropout, got attention dropout {dropout} in "
            "training; set config.attention_dropout = 0 or use attn_implementation='sdpa'"
        )
    for unsupported in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{unsupported}: not supported by cdm_block_sparse attention, got a value")
    if attention_mask is None and not getattr(module, "is_causal", True):
        raise ValueError(
            "attention_mask: cdm_block_sparse is causal-only; got a non-causal module with no mask"
        )
    if attention_mask is None:
        # No mask came (the mask function was bypassed): plain causal, no padding.
        block_size = BLOCK_SIZES[-1]
        layout = causal_layout(query.shape[2], key.shape[2], block_size, device=query.device)
        attention_mask = CausalPaddingMask(None, layout, None, block_size, sparse=False)
    if not isinstance(attention_mask, CausalPaddingMask):
        if _active_recorders:
            raise ValueError(
                "attention_mask: a materialised mask (not causal + padding) falls back to SDPA, which has no "
                "entropy to record"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    key_padding_mask = attention_mask.key_padding_mask
    if query.shape[2] == 1 and not attention_mask.sparse and not _active_recorders:
        dense = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, dense, dropout, scaling, is_causal=False)
    result = block_sparse_attention(
        query,
        key,
        value,
        attention_mask.layout,
        block_size=attention_mask.block_size,
        causal=True,
        scale=scaling,
        return_entropy=bool(_active_recorders),
        key_padding_mask=key_padding_mask,
        index=attention_mask.index,
        backend=backend,
    )
    if _active_recorders:
        out, entropy = result
        record = AttentionEntropy(getattr(module, "layer_idx", None), entropy, module)
        for recorder in _active_recorders:
            recorder.records.append(record)
    else:
        out = result
    return out.transpose(1, 2).contiguous(), None
