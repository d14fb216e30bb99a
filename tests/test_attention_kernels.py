"""The Triton attention kernels (kernels/attention.py) against the torch backend's math
(`cdm_fast.ops.attention._torch_forward` / `_torch_backward`) in float32, under the interpreter or on a GPU:
out, log-sum-exp, entropy and dq/dk/dv on odd sizes, GQA, causal with Sq ≠ Sk, empty rows, per-batch and
per-head random layouts, key padding, non-contiguous inputs, tiles smaller than the index block, both launch
orders, outputs poisoned before the call.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_device, rel_error, requires_triton

from cdm_fast.attention import BlockIndex, num_blocks
from cdm_fast.dispatch import REGISTRY
from cdm_fast.ops import attention as attention_op
from cdm_fast.ops.attention import _torch_backward, _torch_forward

TOLERANCES = REGISTRY[(attention_op.OP, "triton")].tolerances

# (B, Hq, Hkv, Sq, Sk, D, block_size, causal, layout broadcast over (batch, head), key padding)
CASES = [
    pytest.param(2, 4, 2, 37, 45, 24, 16, True, (False, False), True, id="gqa-causal-sq<sk-padding-per-head"),
    pytest.param(1, 2, 1, 80, 33, 16, 32, True, (True, True), False, id="causal-sq>sk-empty-rows-block32"),
    pytest.param(2, 2, 2, 50, 50, 64, 32, False, (False, True), True, id="per-batch-layout-d64-block32"),
    pytest.param(1, 4, 1, 17, 70, 16, 16, False, (True, False), False, id="mqa-per-head-layout"),
]


def _inputs(batch, heads, kv_heads, seq_len_q, seq_len_k, head_dim, block_size, causal, broadcast, padding):
    device = kernel_device()
    # Non-contiguous: every tensor a slice of a larger one, with heads and positions swapped in memory.
    q = torch.randn(batch, seq_len_q, heads, head_dim + 3, device=device)[..., :head_dim].transpose(1, 2)
    k = torch.randn(batch, seq_len_k, kv_heads, head_dim, device=device).transpose(1, 2)
    v = torch.randn(batch, kv_heads, head_dim, seq_len_k, device=device).transpose(2, 3)
    shape = (
        1 if broadcast[0] else batch,
        1 if broadcast[1] else heads,
        num_blocks(seq_len_q, block_size),
        num_blocks(seq_len_k, block_size),
    )
    layout = torch.rand(shape, device=device) < 0.6
    layout[..., 0, :] = False  # the first query block sees nothing: empty rows
    # The last query block sees every key block, so that some rows attend to many keys and dq cannot be
    # all-zero (rows with a single visible key have dq = 0 exactly, and a relative error of noise).
    layout[..., -1, :] = True
    key_padding_mask = torch.rand(batch, seq_len_k, device=device) < 0.8 if padding else None
    index = BlockIndex.from_layout(layout, seq_len_q, seq_len_k, block_size, causal=causal)
    return q, k, v, layout, index, key_padding_mask


@requires_triton
@pytest.mark.parametrize("launch_order", ["l2", "plain"])
@pytest.mark.parametrize(
    (
        "batch",
        "heads",
        "kv_heads",
        "seq_len_q",
        "seq_len_k",
        "head_dim",
        "block_size",
        "causal",
        "broadcast",
        "padding",
    ),
    CASES,
)
def test_forward_and_backward_match_the_torch_math(
    batch,
    heads,
    kv_heads,
    seq_len_q,
    seq_len_k,
    head_dim,
    block_size,
    causal,
    broadcast,
    padding,
    launch_order,
    poisoned_allocations,
    monkeypatch,
):
    from cdm_fast.kernels import attention as kernels

    # A tiny L2: swizzle groups of 2 query blocks, the last one partial.
    monkeypatch.setattr(kernels, "_l2_cache_bytes", lambda device: 4 * block_size * head_dim * 4)
    q, k, v, layout, index, key_padding_mask = _inputs(
        batch, heads, kv_heads, seq_len_q, seq_len_k, head_dim, block_size, causal, broadcast, padding
    )
    scale = 1.0 / math.sqrt(head_dim)
    out, lse, entropy = kernels.forward(
        q, k, v, index, key_padding_mask, scale=scale, return_entropy=True, launch_order=launch_order
    )
    ref_out, ref_lse, ref_entropy = _torch_forward(q, k, v, layout, index, key_padding_mask, scale, True)
    assert rel_error(out, ref_out) <= TOLERANCES["float32"]
    assert (entropy - ref_entropy).abs().max().item() <= TOLERANCES["entropy"]
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(lse), empty)
    assert (lse[~empty] - ref_lse[~empty]).abs().max().item() <= 1e-4
    assert (out[empty] == 0).all() and (entropy[empty] == 0).all()

    grad_out = torch.randn_like(ref_out)
    grads = kernels.backward(grad_out, q, k, v, out, lse, index, key_padding_mask, scale=scale)
    ref_grads = _torch_backward(grad_out, q, k, v, ref_out, ref_lse, layout, index, key_padding_mask, scale)
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, name
        assert rel_error(grad, ref) <= TOLERANCES["float32"], name


@requires_triton
def test_forward_without_entropy_returns_none_and_the_same_output(poisoned_allocations):
    from cdm_fast.kernels import attention as kernels

    q, k, v, layout, index, _ = _inputs(1, 2, 2, 33, 33, 16, 16, True, (True, True), False)
    with_entropy = kernels.forward(q, k, v, index, None, scale=0.25, return_entropy=True)
    out, lse, entropy = kernels.forward(q, k, v, index, None, scale=0.25, return_entropy=False)
    assert entropy is None
    assert torch.equal(out, with_entropy[0]) and torch.equal(lse, with_entropy[1])


def test_l2_group_size_grows_with_the_cache_and_is_capped_by_the_key_blocks():
    from cdm_fast.kernels.attention import l2_group_size

    small = l2_group_size(4 * 1024 * 1024, 16384, 128, 2, 128)
    large = l2_group_size(50 * 1024 * 1024, 16384, 128, 2, 128)
    assert 1 <= small < large <= 128
    assert l2_group_size(50 * 1024 * 1024, 256, 128, 2, 128) == 2
    assert l2_group_size(0, 256, 128, 2, 128) == 1
