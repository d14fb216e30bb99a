"""Block-sparse attention: every registered backend against the float64 dense masked reference (out, entropy,
gradients), the layout helpers and the block index, validation and dispatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device, backend_fixture, dtype_name, float64, rel_error

from cdm_fast import attention as layouts
from cdm_fast.attention import BlockIndex, num_blocks
from cdm_fast.dispatch import BackendUnavailable
from cdm_fast.ops import attention as attention_op
from cdm_fast.ops.attention import block_sparse_attention, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


impl = backend_fixture(attention_op.OP)


def _inputs(batch, heads, kv_heads, seq_len_q, seq_len_k, head_dim, *, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len_q, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq_len_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq_len_k, head_dim, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _random_layout(batch, heads, seq_len_q, seq_len_k, block_size, *, density, seed, device):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, num_blocks(seq_len_q, block_size), num_blocks(seq_len_k, block_size))
    return (torch.rand(shape, generator=generator) < density).to(device)


def _skip_unless_served(impl, q, k, v):
    reason = impl.supports(q, k, v)
    if reason is not None:
        pytest.skip(f"{impl.backend}: {reason}")


# Cases: (B, Hq, Hkv, Sq, Sk, D, block_size, causal). Odd lengths leave partial blocks; GQA; Sq != Sk.
CASES = {
    "odd_lengths": (2, 2, 2, 37, 45, 16, 16, False),
    "gqa_causal_longer_keys": (1, 4, 2, 29, 53, 16, 16, True),
    "causal_more_queries_than_keys": (1, 2, 1, 40, 24, 24, 16, True),
    "block_32_head_dim_24": (1, 2, 1, 70, 70, 24, 32, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_forward_and_entropy_match_float64_reference_random_per_head_layouts(impl, case, dtype):
    batch, heads, kv_heads, seq_len_q, seq_len_k, head_dim, block_size, causal = case
    q, k, v = _inputs(
        batch,
        heads,
        kv_heads,
        seq_len_q,
        seq_len_k,
        head_dim,
        dtype=dtype,
        device=backend_device(impl.backend),
        seed=1,
    )
    _skip_unless_served(impl, q, k, v)
    layout = _random_layout(
        batch, heads, seq_len_q, seq_len_k, block_size, density=0.6, seed=2, device=q.device
    )
    layout[0, 0, 0] = False  # a query block that sees nothing: out 0, entropy 0
    out, entropy = block_sparse_attention(
        q, k, v, layout, block_size=block_size, causal=causal, return_entropy=True, backend=impl.backend
    )
    ref_out, ref_entropy = reference(*float64(q, k, v), layout.cpu(), block_size=block_size, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert entropy.shape == q.shape[:3] and entropy.dtype == torch.float32
    assert rel_error(out, ref_out) <= impl.tolerances[dtype_name(dtype)]
    assert rel_error(entropy, ref_entropy) <= impl.tolerances[dtype_name(dtype)]
    empty_rows = slice(0, min(block_size, seq_len_q))
    assert torch.equal(
        out[0, 0, empty_rows].float().cpu(), torch.zeros_like(out[0, 0, empty_rows].float().cpu())
    )
    assert torch.equal(entropy[0, 0, empty_rows].cpu(), torch.zeros(entropy[0, 0, empty_rows].shape))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradients_match_float64_autograd_through_reference(impl, case):
    batch, heads, kv_heads, seq_len_q, seq_len_k, head_dim, block_size, causal = case
    q, k, v = _inputs(
        batch,
        heads,
        kv_heads,
        seq_len_q,
        seq_len_k,
        head_dim,
        dtype=torch.float32,
        device=backend_device(impl.backend),
        seed=3,
    )
    _skip_unless_served(impl, q, k, v)
    layout = _random_layout(batch, 1, seq_len_q, seq_len_k, block_size, density=0.7, seed=4, device=q.device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, layout, block_size=block_size, causal=causal, backend=impl.backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    out.backward(grad_out)
    leaves64 = [t.requires_grad_() for t in float64(q, k, v)]
    ref_out, _ = reference(*leaves64, layout.cpu(), block_size=block_size, causal=causal)
    ref_out.backward(grad_out.double().cpu())
    for name, leaf, leaf64 in zip(("q", "k", "v"), leaves, leaves64, strict=True):
        assert rel_error(leaf.grad, leaf64.grad) <= impl.tolerances["float32"], name


def test_key_padding_mask_hides_padded_keys_exactly(impl):
    q, k, v = _inputs(2, 2, 1, 33, 33, 16, dtype=torch.float32, device=backend_device(impl.backend), seed=6)
    _skip_unless_served(impl, q, k, v)
    padding = torch.ones(2, 33, dtype=torch.bool, device=q.device)
    padding[0, :5] = False  # left padding
    padding[1, 30:] = False  # right padding
    layout = layouts.layout_from_key_padding(padding, 33, 16, causal=True)
    out, entropy = block_sparse_attention(
        q,
        k,
        v,
        layout,
        block_size=16,
        causal=True,
        key_padding_mask=padding,
        return_entropy=True,
        backend=impl.backend,
    )
    ref_out, ref_entropy = reference(
        *float64(q, k, v), layout.cpu(), block_size=16, causal=True, key_padding_mask=padding.cpu()
    )
    assert rel_error(out, ref_out) <= impl.tolerances["float32"]
    assert rel_error(entropy, ref_entropy) <= impl.tolerances["float32"]
    # Changing what sits at padded keys changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :5], v2[1, :, 30:] = 1e3, -1e3
    out2 = block_sparse_attention(
        q, k2, v2, layout, block_size=16, causal=True, key_padding_mask=padding, backend=impl.backend
    )
    assert rel_error(out2, out) <= impl.tolerances["float32"]


def test_dense_layout_equals_sdpa(impl):
    q, k, v = _inputs(1, 4, 2, 41, 41, 16, dtype=torch.float32, device=backend_device(impl.backend), seed=7)
    _skip_unless_served(impl, q, k, v)
    out = block_sparse_attention(
        q, k, v, layouts.dense_layout(41, 41, 16, q.device), block_size=16, causal=True, backend=impl.backend
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert rel_error(out, expected) <= 1e-5


def test_prebuilt_index_is_reused_and_checked():
    q, k, v = _inputs(1, 2, 2, 20, 20, 8, dtype=torch.float64, device="cpu", seed=8)
    layout = layouts.causal_layout(20, 20, 16)
    index = BlockIndex.from_layout(layout, 20, 20, 16, causal=True)
    out = block_sparse_attention(q, k, v, layout, block_size=16, causal=True, index=index)
    assert rel_error(out, reference(q, k, v, layout, block_size=16, causal=True)[0]) <= 1e-12
    with pytest.raises(ValueError, match="^index: "):
        block_sparse_attention(q, k, v, layout, block_size=16, causal=False, index=index)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = _inputs(1, 2, 1, 24, 24, 8, dtype=torch.float32, device="cpu", seed=9)
    layout = layouts.causal_layout(24, 24, 16)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, layout, block_size=16, causal=True, backend="torch")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    assert rel_error(compiled(q, k, v), attend(q, k, v)) <= 1e-6


# ---------------------------------------------------------------- layouts and the block index


def test_causal_layout_keeps_exactly_the_blocks_with_a_visible_pair():
    for seq_len_q, seq_len_k in ((37, 37), (20, 53), (53, 20)):
        layout = layouts.causal_layout(seq_len_q, seq_len_k, 16)
        mask = attention_op.element_mask(
            layouts.dense_layout(seq_len_q, seq_len_k, 16), 1, 1, seq_len_q, seq_len_k, 16, True
        )
        expected = layouts._any_per_block(mask, 16)
        assert torch.equal(layout, expected), (seq_len_q, seq_len_k)


def test_sliding_window_and_strided_layouts_are_causal_and_keep_the_diagonal():
    window = layouts.sliding_window_layout(512, 512, 64, window_blocks=2, global_blocks=1)
    strided = layouts.strided_layout(512, 512, 64, stride=3)
    causal = layouts.causal_layout(512, 512, 64)
    for layout in (window, strided):
        assert not (layout & ~causal).any()
        assert layout[0, 0].diagonal().all()
    assert window[0, 0].sum(-1).max() == 3  # two window blocks and one global block


def test_layout_from_mask_mod_keeps_a_block_when_any_element_is_allowed():
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 3

    layout = layouts.layout_from_mask_mod(mask_mod, 1, 1, 40, 40, 16)
    assert layout.shape == (1, 1, 3, 3)
    assert torch.equal(layout[0, 0], torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool))


def test_block_index_lists_kept_blocks_in_order_both_ways():
    layout = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(10)) < 0.5
    index = BlockIndex.from_layout(layout, 5 * 16, 7 * 16, 16)
    for b, h, i in ((0, 0, 0), (1, 2, 4), (0, 1, 3)):
        count = int(index.kv_counts[b, h, i])
        assert index.kv_blocks[b, h, i, :count].tolist() == layout[b, h, i].nonzero().flatten().tolist()
        assert (index.kv_blocks[b, h, i, count:] == -1).all()
    for b, h, j in ((0, 0, 0), (1, 2, 6)):
        count = int(index.q_counts[b, h, j])
        assert index.q_blocks[b, h, j, :count].tolist() == layout[b, h, :, j].nonzero().flatten().tolist()
    assert index.density == pytest.approx(layout.float().mean().item())


# ---------------------------------------------------------------- validation and dispatch


def _valid_args():
    q, k, v = _inputs(1, 2, 1, 20, 20, 8, dtype=torch.float32, device="cpu", seed=11)
    return [q, k, v, layouts.dense_layout(20, 20, 16)]


def _replace(index, value):
    def make():
        args = _valid_args()
        args[index] = value
        return args

    return make


BAD_INPUTS = {
    "layout_shape": (_replace(3, torch.ones(1, 1, 2, 3, dtype=torch.bool)), {}, ValueError, "layout"),
    "layout_dtype": (_replace(3, torch.ones(1, 1, 2, 2)), {}, TypeError, "layout"),
    "layout_heads": (_replace(3, torch.ones(1, 3, 2, 2, dtype=torch.bool)), {}, ValueError, "layout"),
    "block_size": (_valid_args, {"block_size": 24}, ValueError, "block_size"),
    "k_dtype": (_replace(1, torch.randn(1, 1, 20, 8, dtype=torch.float64)), {}, TypeError, "k"),
    "k_device": (_replace(1, torch.randn(1, 1, 20, 8, device="meta")), {}, ValueError, "k"),
    "gqa_heads": (_replace(1, torch.randn(1, 3, 20, 8)), {}, ValueError, "k"),
    "v_shape": (_replace(2, torch.randn(1, 1, 21, 8)), {}, ValueError, "v"),
    "q_dims": (_replace(0, torch.randn(2, 20, 8)), {}, ValueError, "q"),
    "padding_device": (
        _valid_args,
        {"key_padding_mask": torch.ones(1, 20, dtype=torch.bool, device="meta")},
        ValueError,
        "key_padding_mask",
    ),
    "padding_shape": (
        _valid_args,
        {"key_padding_mask": torch.ones(1, 19, dtype=torch.bool)},
        ValueError,
        "key_padding_mask",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument_before_any_launch(case, monkeypatch):
    make_args, kwargs, error, argument = case

    def launched(*args, **kwargs):
        raise AssertionError("the op ran before the inputs were validated")

    monkeypatch.setattr(attention_op, "_attention_op", launched)
    call = {"block_size": 16, **kwargs}
    with pytest.raises(error, match=rf"^{argument}: "):
        block_sparse_attention(*make_args(), **call)


def test_explicit_triton_on_cpu_without_interpreter_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1|triton is not installed"):
        block_sparse_attention(*_valid_args(), block_size=16, backend="triton")


def test_scale_defaults_to_inverse_sqrt_head_dim():
    q, k, v, layout = _valid_args()
    default = block_sparse_attention(q, k, v, layout, block_size=16)
    explicit = block_sparse_attention(q, k, v, layout, block_size=16, scale=1 / math.sqrt(8))
    assert torch.equal(default, explicit)
