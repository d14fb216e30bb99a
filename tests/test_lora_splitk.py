"""Split-K decode path of the fused LoRA forward (`kernels.lora._lora_splitk_kernel`): y and u against the
float64 reference and the N-only decode kernel, with dropout, bias, a 4-bit base and strided inputs; the
split rule and the dispatch.

Shapes are decode-sized with odd N and K (not multiples of 16) and K long enough for three splits of the
interpreter's 32-wide granule, so every test crosses split boundaries and ends inside a tile.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import dtype_name, kernel_device, params4bit, rel_error, requires_triton

from cdm_fast import device as devices
from cdm_fast import quant
from cdm_fast.dispatch import REGISTRY
from cdm_fast.ops import lora as lora_op
from cdm_fast.ops.lora import dropout_keep, reference

if devices.triton_available():
    from cdm_fast.kernels import lora as lora_kernels

N, K = 67, 193
SPLITS = 3
SCALING = 0.75
TOLERANCES = REGISTRY[(lora_op.OP, "triton")].tolerances


def _inputs(tokens, rank, *, dtype, seed, bias=True, d_out=N, d_in=K):
    """x ~ N(0, 1), weight and lora_A ~ N(0, 1/in), lora_B ~ N(0, 1/r): the adapter term as large as the
    base one, so an error in it cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=generator)
    weight = torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in)
    lora_A = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
    lora_B = torch.randn(d_out, rank, generator=generator) / math.sqrt(rank)
    b = torch.randn(d_out, generator=generator) if bias else None
    device = kernel_device()
    return [
        t.to(device=device, dtype=dtype) if t is not None else None for t in (x, weight, lora_A, lora_B, b)
    ]


def _expected(x, weight, lora_A, lora_B, bias, dropout_p=0.0, dropout_seed=0):
    """(y, u) in float64 on the CPU: the op's reference and dropout(x) @ lora_Aᵀ with the same mask."""
    x64, w64, a64, b64 = (t.detach().double().cpu() for t in (x, weight, lora_A, lora_B))
    bias64 = bias.double().cpu() if bias is not None else None
    y = reference(x64, w64, a64, b64, SCALING, bias64, dropout_p=dropout_p, dropout_seed=dropout_seed)
    dropped = x64
    if dropout_p > 0:
        dropped = x64 * dropout_keep(dropout_seed, *x64.shape, dropout_p) / (1 - dropout_p)
    return y, dropped @ a64.T


def _splitk(x, weight, lora_A, lora_B, bias, dropout_p=0.0, dropout_seed=0, split_k=SPLITS):
    return lora_kernels.lora_splitk(
        x, weight, lora_A, lora_B, bias, SCALING, dropout_p, dropout_seed, split_k=split_k
    )


# ---------------------------------------------------------------- against the float64 reference


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize("rank", (1, 16))
@pytest.mark.parametrize("tokens", (1, 3, 17))
def test_splitk_forward_y_and_u_match_float64_reference_odd_sizes(tokens, rank, dtype, poisoned_allocations):
    x, weight, lora_A, lora_B, bias = _inputs(tokens, rank, dtype=dtype, seed=tokens * 100 + rank)
    y, u = _splitk(x, weight, lora_A, lora_B, bias)
    assert y.shape == (tokens, N) and u.shape == (tokens, rank) and y.dtype == u.dtype == dtype
    y64, u64 = _expected(x, weight, lora_A, lora_B, bias)
    assert rel_error(y, y64) <= TOLERANCES[dtype_name(dtype)]
    assert rel_error(u, u64) <= TOLERANCES[dtype_name(dtype)]


@requires_triton
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
def test_splitk_bias_is_added_once_whatever_the_split_count(with_bias):
    x, weight, lora_A, lora_B, bias = _inputs(3, 16, dtype=torch.float32, seed=1, bias=with_bias)
    y64, _ = _expected(x, weight, lora_A, lora_B, bias)
    for split_k in (1, SPLITS):
        y, _ = _splitk(x, weight, lora_A, lora_B, bias, split_k=split_k)
        assert rel_error(y, y64) <= TOLERANCES["float32"], split_k


@requires_triton
def test_splitk_more_splits_than_k_blocks_clamps_to_one_granule_each():
    x, weight, lora_A, lora_B, bias = _inputs(1, 16, dtype=torch.float32, seed=2)
    y, u = _splitk(x, weight, lora_A, lora_B, bias, split_k=10_000)
    y64, u64 = _expected(x, weight, lora_A, lora_B, bias)
    assert rel_error(y, y64) <= TOLERANCES["float32"]
    assert rel_error(u, u64) <= TOLERANCES["float32"]


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
def test_splitk_dropout_uses_the_same_counter_mask_as_torch_and_the_mainloop(dtype):
    x, weight, lora_A, lora_B, bias = _inputs(17, 16, dtype=dtype, seed=3)
    dropout_p, seed = 0.3, 4321
    y, u = _splitk(x, weight, lora_A, lora_B, bias, dropout_p, seed)
    y64, u64 = _expected(x, weight, lora_A, lora_B, bias, dropout_p, seed)
    tolerance = TOLERANCES[dtype_name(dtype)]
    assert rel_error(y, y64) <= tolerance and rel_error(u, u64) <= tolerance
    y_torch, u_torch = lora_op._torch_forward(x, weight, lora_A, lora_B, bias, SCALING, dropout_p, seed)
    assert rel_error(y, y_torch) <= tolerance and rel_error(u, u_torch) <= tolerance
    y_main, u_main = lora_kernels.forward(
        x, weight, lora_A, lora_B, bias, SCALING, dropout_p, seed, strategy="mainloop"
    )
    assert rel_error(y, y_main) <= tolerance and rel_error(u, u_main) <= tolerance
    # Another seed draws another mask: the seed reaches the kernel.
    y_other, _ = _splitk(x, weight, lora_A, lora_B, bias, dropout_p, seed + 1)
    assert rel_error(y_other, y64) > tolerance


@requires_triton
def test_splitk_reads_non_contiguous_x_weight_and_adapters(poisoned_allocations):
    x, weight, lora_A, lora_B, bias = _inputs(3, 16, dtype=torch.float32, seed=5, d_out=2 * N)
    x = x.t().contiguous().t()
    weight, bias, lora_B = weight[::2], bias[::2], lora_B[::2]
    lora_A = lora_A.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (x, weight, lora_A, lora_B, bias))
    y, u = _splitk(x, weight, lora_A, lora_B, bias)
    y64, u64 = _expected(x, weight, lora_A, lora_B, bias)
    assert rel_error(y, y64) <= TOLERANCES["float32"]
    assert rel_error(u, u64) <= TOLERANCES["float32"]


# ---------------------------------------------------------------- against the N-only decode kernel


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize("tokens", (1, 17))
def test_splitk_equals_the_mainloop_decode_result(tokens, dtype):
    x, weight, lora_A, lora_B, bias = _inputs(tokens, 16, dtype=dtype, seed=6 + tokens)
    y, u = _splitk(x, weight, lora_A, lora_B, bias)
    y_main, u_main = lora_kernels.forward(
        x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0, strategy="mainloop"
    )
    tolerance = TOLERANCES[dtype_name(dtype)]
    assert rel_error(y, y_main) <= tolerance
    assert rel_error(u, u_main) <= tolerance


@requires_triton
def test_forward_strategy_splitk_is_the_split_k_launcher_and_bad_strategy_raises():
    x, weight, lora_A, lora_B, bias = _inputs(3, 16, dtype=torch.float32, seed=8)
    y, u = lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0, strategy="splitk")
    y64, u64 = _expected(x, weight, lora_A, lora_B, bias)
    assert rel_error(y, y64) <= TOLERANCES["float32"] and rel_error(u, u64) <= TOLERANCES["float32"]
    with pytest.raises(ValueError, match=r"^strategy: "):
        lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0, strategy="gemv")


# ---------------------------------------------------------------- 4-bit base (QLoRA)


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize(
    "quant_type, double_quant, blocksize",
    [("nf4", True, 64), ("nf4", False, 128), ("fp4", True, 32), ("fp4", False, 64)],
    ids=str,
)
def test_splitk_4bit_base_matches_reference_of_the_dequantised_weight_and_the_mainloop(
    quant_type, double_quant, blocksize, dtype
):
    x, weight, lora_A, lora_B, bias = _inputs(3, 16, dtype=dtype, seed=9)
    # N·K odd and K not a multiple of the blocksize: bytes and scale blocks straddle rows and splits.
    params, dequantised = params4bit(weight.float().cpu(), quant_type, double_quant, blocksize)
    base = quant.from_bitsandbytes(params.to(kernel_device()))
    y, u = _splitk(x, base, lora_A, lora_B, bias, dropout_p=0.2, dropout_seed=10)
    y64, u64 = _expected(x, dequantised.to(dtype), lora_A, lora_B, bias, 0.2, 10)
    tolerance = TOLERANCES[dtype_name(dtype)]
    assert rel_error(y, y64) <= tolerance and rel_error(u, u64) <= tolerance
    y_main, _ = lora_kernels.forward(x, base, lora_A, lora_B, bias, SCALING, 0.2, 10, strategy="mainloop")
    assert rel_error(y, y_main) <= tolerance


# ---------------------------------------------------------------- the split rule and dispatch


SHAPES = [
    (tokens, n, k, rank)
    for tokens in (1, 8, 64)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (512, 8192), (67, 193), (1, 1))
    for rank in (1, 16, 32, 128)
]


@pytest.mark.skipif(not devices.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(
    "weight_bytes, adapter_bytes", [(2, 2), (4, 4), (0.5, 2)], ids=("bf16", "fp32", "4bit")
)
def test_splitk_factor_is_at_least_one_within_k_blocks_and_bounds_lora_B_rereads(weight_bytes, adapter_bytes):
    block_k = 256
    for tokens, n, k, rank in SHAPES:
        factor = lora_kernels.splitk_factor(
            tokens,
            n,
            k,
            rank,
            multiprocessors=132,
            block_k=block_k,
            weight_element_bytes=weight_bytes,
            adapter_element_bytes=adapter_bytes,
        )
        shape = (tokens, n, k, rank)
        assert isinstance(factor, int) and factor >= 1, shape
        assert factor == 1 or factor <= k // block_k, shape
        reread, weight_total = factor * n * rank * adapter_bytes, n * k * weight_bytes
        assert factor == 1 or reread <= 0.05 * weight_total, shape


@pytest.mark.skipif(not devices.triton_available(), reason="triton is not installed")
def test_splitk_factor_fills_an_underfilled_grid_and_leaves_a_full_one_alone():
    # The docstring's example: 64 N tiles of one token on 132 SMs; lora_B's re-reads allow 6 splits.
    assert lora_kernels.splitk_factor(1, 4096, 4096, 32, multiprocessors=132, block_k=256) == 6
    assert lora_kernels.splitk_factor(1, 4096, 4096, 8, multiprocessors=132, block_k=256) == 8
    # Enough N tiles to fill the device, or a K too short to cut: no split.
    assert lora_kernels.splitk_factor(1, 65536, 4096, 8, multiprocessors=132, block_k=256) == 1
    assert lora_kernels.splitk_factor(1, 4096, 256, 8, multiprocessors=132, block_k=256) == 1
    # More SMs to fill never asks for fewer splits.
    factors = [
        lora_kernels.splitk_factor(1, 2048, 16384, 8, multiprocessors=s, block_k=256) for s in (16, 132)
    ]
    assert factors[0] <= factors[1]


@pytest.mark.skipif(not devices.triton_available(), reason="triton is not installed")
def test_prefers_splitk_only_for_decode_on_an_underfilled_grid():
    assert lora_kernels.prefers_splitk(1, 4096, 4096, 16, multiprocessors=132)
    assert lora_kernels.prefers_splitk(64, 4096, 4096, 16, multiprocessors=132)
    assert not lora_kernels.prefers_splitk(65, 4096, 4096, 16, multiprocessors=132)
    assert not lora_kernels.prefers_splitk(1, 65536, 4096, 16, multiprocessors=132)
    assert not lora_kernels.prefers_splitk(1, 4096, 128, 16, multiprocessors=132)


@requires_triton
def test_forward_dispatches_to_splitk_where_preferred(monkeypatch):
    x, weight, lora_A, lora_B, bias = _inputs(1, 1, dtype=torch.float32, seed=11)
    sms = devices.multiprocessor_count(x.device)
    assert lora_kernels.prefers_splitk(1, N, K, 1, multiprocessors=sms, adapter_element_bytes=4)
    calls = []
    splitk = lora_kernels.lora_splitk
    monkeypatch.setattr(lora_kernels, "lora_splitk", lambda *args: calls.append(args) or splitk(*args))
    y, _ = lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0)
    assert len(calls) == 1
    assert rel_error(y, _expected(x, weight, lora_A, lora_B, bias)[0]) <= TOLERANCES["float32"]
    lora_kernels.forward(torch.cat([x] * 65), weight, lora_A, lora_B, bias, SCALING, 0.0, 0)
    assert len(calls) == 1
    # Atomics add in any order: deterministic mode keeps the N-only grid.
    with _deterministic_algorithms():
        lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0)
    assert len(calls) == 1


@contextlib.contextmanager
def _deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
