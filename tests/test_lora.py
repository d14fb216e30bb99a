"""Fused LoRA linear: every registered backend against the float64 reference (forward, gradients, dropout with
the same counter-based mask), the two Triton strategies for u, the mask itself, validation and dispatch.

Inputs follow the real use: x ~ N(0, 1), weight and lora_A ~ N(0, 1/in), lora_B ~ N(0, 1/r) (non-zero, so
the adapter term is as large as the base one and an error in it cannot hide).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    backend_device,
    backend_fixture,
    dtype_name,
    float64,
    gpu,
    kernel_device,
    params4bit,
    rel_error,
    requires_cuda,
    requires_triton,
)

from cdm_fast import device as devices
from cdm_fast.dispatch import REGISTRY, BackendUnavailable
from cdm_fast.ops import lora as lora_op
from cdm_fast.ops.lora import dropout_keep, lora_linear, reference

if devices.triton_available():
    import triton
    import triton.language as tl

    from cdm_fast.kernels import lora as lora_kernels
    from cdm_fast.kernels.common import dropout_keep as kernel_dropout_keep

    @triton.jit
    def _keep_kernel(out_ptr, seed, threshold, row_offset, ROWS: tl.constexpr, COLS: tl.constexpr):
        rows = row_offset + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        keep = kernel_dropout_keep(seed, rows, cols, threshold)
        tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * COLS + cols[None, :], keep.to(tl.int8))


ODD = (77, 45, 53, 5)  # tokens, in, out, r: none a multiple of 16; tokens above the decode path's 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALING = 0.75


impl = backend_fixture(lora_op.OP)


def _inputs(tokens, d_in, d_out, rank, *, dtype, device, seed, bias=True, leading=(), adapter_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, tokens, d_in, generator=generator)
    weight = torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in)
    lora_A = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
    lora_B = torch.randn(d_out, rank, generator=generator) / math.sqrt(rank)
    b = torch.randn(d_out, generator=generator) if bias else None
    adapter_dtype = adapter_dtype or dtype
    return (
        x.to(device=device, dtype=dtype),
        weight.to(device=device, dtype=dtype),
        lora_A.to(device=device, dtype=adapter_dtype),
        lora_B.to(device=device, dtype=adapter_dtype),
        b.to(device=device, dtype=dtype) if b is not None else None,
    )


def _skip_unless_served(impl, x, weight, lora_A, lora_B, bias):
    reason = impl.supports(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, bias)
    if reason is not None:
        pytest.skip(f"{impl.backend}: {reason}")


def _seed_of_next_call(torch_seed: int) -> int:
    """The dropout seed `lora_linear` draws after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return lora_op.new_dropout_seed()


# ---------------------------------------------------------------- forward, every backend


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_forward_matches_float64_reference_odd_sizes(impl, dtype, with_bias, poisoned_allocations):
    x, weight, lora_A, lora_B, bias = _inputs(
        *ODD, dtype=dtype, device=backend_device(impl.backend), seed=1, bias=with_bias
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    y = lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend)
    assert y.shape == (ODD[0], ODD[2]) and y.dtype == dtype
    expected = reference(*float64(x, weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y, expected) <= impl.tolerances[dtype_name(dtype)]


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (1, 45, 53, 5), (37, 1, 53, 5), (37, 45, 1, 5), (37, 45, 53, 1)], ids=str
)
def test_forward_matches_float64_reference_size_one_dims(impl, shape, poisoned_allocations):
    x, weight, lora_A, lora_B, bias = _inputs(
        *shape, dtype=torch.float32, device=backend_device(impl.backend), seed=2
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    y = lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend)
    expected = reference(*float64(x, weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y, expected) <= impl.tolerances["float32"]


def test_forward_keeps_leading_dims_and_reads_non_contiguous_inputs(impl, poisoned_allocations):
    tokens, d_in, d_out, rank = ODD
    x, weight, lora_A, lora_B, bias = _inputs(
        tokens, d_in, 2 * d_out, rank, dtype=torch.float32, device="cpu", seed=3, leading=(2,)
    )
    device = backend_device(impl.backend)
    # x a transposed view, weight and bias every other row: no input but the adapter has unit inner stride.
    x = x.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    weight, bias = weight.to(device)[::2], bias.to(device)[::2]
    lora_A, lora_B = lora_A.t().contiguous().to(device).t(), lora_B.to(device)[::2]
    assert not any(t.is_contiguous() for t in (x, weight, lora_A, lora_B, bias))
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    y = lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend)
    assert y.shape == (2, tokens, d_out)
    expected = reference(*float64(x, weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y, expected) <= impl.tolerances["float32"]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_name)
def test_half_activation_with_float32_adapter_computes_in_the_activation_dtype(impl, dtype):
    x, weight, lora_A, lora_B, bias = _inputs(
        *ODD, dtype=dtype, device=backend_device(impl.backend), seed=4, adapter_dtype=torch.float32
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    y = lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend)
    assert y.dtype == dtype
    expected = reference(*float64(x, weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y, expected) <= impl.tolerances[dtype_name(dtype)]


def test_autocast_runs_in_the_autocast_dtype_like_nn_linear():
    x, weight, lora_A, lora_B, bias = _inputs(*ODD, dtype=torch.float32, device="cpu", seed=19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend="torch")
    assert y.dtype == torch.bfloat16
    # The activation is rounded to bf16 once; the products inside are not autocast a second time.
    expected = reference(*float64(x.bfloat16(), weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y, expected) <= 2**-8


# ---------------------------------------------------------------- backward, every backend


def _gradients(impl, x, weight, lora_A, lora_B, bias, grad_y, *, dropout_p=0.0, torch_seed=0):
    leaves = [t.detach().requires_grad_() for t in (x, lora_A, lora_B)]
    torch.manual_seed(torch_seed)
    y = lora_linear(
        leaves[0],
        weight,
        leaves[1],
        leaves[2],
        SCALING,
        bias,
        dropout_p=dropout_p,
        training=True,
        backend=impl.backend,
    )
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]


def _reference_gradients(x, weight, lora_A, lora_B, bias, grad_y, *, dropout_p=0.0, dropout_seed=0):
    leaves = [t.requires_grad_() for t in float64(x, lora_A, lora_B)]
    y = reference(
        leaves[0],
        *float64(weight),
        leaves[1],
        leaves[2],
        SCALING,
        *float64(bias),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    y.backward(grad_y.double().cpu())
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dropout_p", (0.0, 0.3), ids=("no_dropout", "dropout"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gradients_match_float64_autograd_through_reference(impl, dtype, dropout_p, poisoned_allocations):
    x, weight, lora_A, lora_B, bias = _inputs(
        *ODD, dtype=dtype, device=backend_device(impl.backend), seed=5, leading=(2,)
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    grad_y = torch.randn(2, ODD[0], ODD[2], generator=torch.Generator().manual_seed(6)).to(x)
    y, grads = _gradients(impl, x, weight, lora_A, lora_B, bias, grad_y, dropout_p=dropout_p, torch_seed=7)
    y64, grads64 = _reference_gradients(
        x, weight, lora_A, lora_B, bias, grad_y, dropout_p=dropout_p, dropout_seed=_seed_of_next_call(7)
    )
    tolerance = impl.tolerances[dtype_name(dtype)]
    assert rel_error(y, y64) <= tolerance
    for name, grad, grad64, leaf in zip(
        ("x", "lora_A", "lora_B"), grads, grads64, (x, lora_A, lora_B), strict=True
    ):
        assert grad.dtype == leaf.dtype, name
        assert rel_error(grad, grad64) <= tolerance, name


def test_backward_computes_only_the_requested_gradients(impl):
    x, weight, lora_A, lora_B, bias = _inputs(
        *ODD, dtype=torch.float32, device=backend_device(impl.backend), seed=8
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    lora_B.requires_grad_()
    lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend).sum().backward()
    assert x.grad is None and lora_A.grad is None and weight.grad is None
    _, grads64 = _reference_gradients(x, weight, lora_A, lora_B, bias, torch.ones(ODD[0], ODD[2]))
    assert rel_error(lora_B.grad, grads64[2]) <= impl.tolerances["float32"]


def test_trainable_weight_and_bias_get_gradients_through_the_reference():
    x, weight, lora_A, lora_B, bias = _inputs(*ODD, dtype=torch.float64, device="cpu", seed=9)
    leaves = [t.requires_grad_() for t in (x, weight, lora_A, lora_B, bias)]
    torch.manual_seed(3)
    lora_linear(*leaves[:4], SCALING, leaves[4]).square().sum().backward()
    expected = [t.detach().clone().requires_grad_() for t in leaves]
    reference(*expected[:4], SCALING, expected[4]).square().sum().backward()
    for name, leaf, ref in zip(("x", "weight", "lora_A", "lora_B", "bias"), leaves, expected, strict=True):
        assert rel_error(leaf.grad, ref.grad) <= 1e-12, name


def test_torch_backward_passes_gradcheck_with_dropout():
    x, weight, lora_A, lora_B, bias = _inputs(5, 7, 6, 3, dtype=torch.float64, device="cpu", seed=10)
    leaves = [t.requires_grad_() for t in (x, lora_A, lora_B)]

    def fused(x, lora_A, lora_B):
        # The same seed every evaluation: gradcheck differentiates one fixed dropout mask.
        torch.manual_seed(11)
        return lora_linear(
            x, weight, lora_A, lora_B, SCALING, bias, dropout_p=0.4, training=True, backend="torch"
        )

    assert torch.autograd.gradcheck(fused, leaves)


# ---------------------------------------------------------------- dropout


def test_dropout_mask_drops_a_fraction_p_within_binomial_noise():
    rows, cols = 300, 257
    for p in (0.05, 0.1, 0.5):
        for seed in (0, 1, 2**31 - 2):
            dropped = 1 - dropout_keep(seed, rows, cols, p).double().mean().item()
            sigma = math.sqrt(p * (1 - p) / (rows * cols))
            assert abs(dropped - p) <= 5 * sigma, (p, seed, dropped)


def test_dropout_mask_rows_and_columns_are_uncorrelated():
    keep = dropout_keep(5, 512, 512, 0.5).double()
    # Neighbouring rows and columns of a weak hash would share bits: their agreement would sit far from 1/2.
    for a, b in ((keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1])):
        agreement = (a == b).double().mean().item()
        assert abs(agreement - 0.5) <= 5 * math.sqrt(0.25 / a.numel())
    assert not torch.equal(dropout_keep(5, 64, 64, 0.5), dropout_keep(6, 64, 64, 0.5))


def test_dropout_same_torch_seed_same_output_and_eval_mode_ignores_it(impl):
    x, weight, lora_A, lora_B, bias = _inputs(
        *ODD, dtype=torch.float32, device=backend_device(impl.backend), seed=12
    )
    _skip_unless_served(impl, x, weight, lora_A, lora_B, bias)
    outputs = []
    for torch_seed in (1, 1, 2):
        torch.manual_seed(torch_seed)
        outputs.append(
            lora_linear(
                x, weight, lora_A, lora_B, SCALING, bias, dropout_p=0.5, training=True, backend=impl.backend
            )
        )
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    evaluated = lora_linear(
        x, weight, lora_A, lora_B, SCALING, bias, dropout_p=0.5, training=False, backend=impl.backend
    )
    assert torch.equal(evaluated, lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend=impl.backend))


@requires_triton
@pytest.mark.parametrize("row_offset", (0, 1000))
def test_triton_dropout_mask_equals_the_torch_definition_bit_for_bit(row_offset):
    rows, cols = 32, 64
    for seed, p in ((0, 0.1), (12345, 0.5), (2**31 - 2, 0.9)):
        out = torch.empty(rows, cols, dtype=torch.int8, device=kernel_device())
        _keep_kernel[(1,)](out, seed, lora_op.drop_threshold(p), row_offset, ROWS=rows, COLS=cols)
        expected = dropout_keep(seed, row_offset + rows, cols, p)[row_offset:]
        assert torch.equal(out.bool().cpu(), expected)


# ---------------------------------------------------------------- Triton strategies and building blocks


@requires_triton
@pytest.mark.parametrize("dropout_p", (0.0, 0.3), ids=("no_dropout", "dropout"))
@pytest.mark.parametrize("strategy", ("mainloop", "separate"))
def test_triton_strategies_match_float64_reference_forward_and_backward(
    strategy, dropout_p, poisoned_allocations
):
    x, weight, lora_A, lora_B, bias = _inputs(*ODD, dtype=torch.float32, device=kernel_device(), seed=13)
    seed = 99
    y, u = lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, dropout_p, seed, strategy=strategy)
    grad_y = torch.randn(ODD[0], ODD[2], generator=torch.Generator().manual_seed(14)).to(x)
    grad_x, grad_A, grad_B = lora_kernels.backward(
        grad_y, x, weight, lora_A, lora_B, u, SCALING, dropout_p, seed, True, strategy=strategy
    )
    y64, grads64 = _reference_gradients(
        x, weight, lora_A, lora_B, bias, grad_y, dropout_p=dropout_p, dropout_seed=seed
    )
    keep = (
        dropout_keep(seed, ODD[0], ODD[1], dropout_p)
        if dropout_p
        else torch.ones(ODD[0], ODD[1], dtype=torch.bool)
    )
    u64 = (x.double().cpu() * keep / (1 - dropout_p)) @ lora_A.double().cpu().T
    tolerance = REGISTRY[(lora_op.OP, "triton")].tolerances["float32"]
    for name, out, expected in zip(
        ("y", "u", "x", "lora_A", "lora_B"), (y, u, grad_x, grad_A, grad_B), (y64, u64, *grads64), strict=True
    ):
        assert rel_error(out, expected) <= tolerance, name


@requires_triton
@pytest.mark.parametrize("tokens", (1, 7, 64))
def test_triton_decode_path_agrees_with_the_gemm_path_and_the_reference(tokens, poisoned_allocations):
    assert tokens <= lora_kernels.DECODE_MAX_TOKENS < ODD[0]
    x, weight, lora_A, lora_B, bias = _inputs(*ODD, dtype=torch.float32, device=kernel_device(), seed=20)
    y_gemm, u_gemm = lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, 0.0, 0)
    y_decode, u_decode = lora_kernels.forward(x[:tokens], weight, lora_A, lora_B, bias, SCALING, 0.0, 0)
    tolerance = REGISTRY[(lora_op.OP, "triton")].tolerances["float32"]
    assert rel_error(y_decode, y_gemm[:tokens]) <= tolerance
    assert rel_error(u_decode, u_gemm[:tokens]) <= tolerance
    expected = reference(*float64(x[:tokens], weight, lora_A, lora_B), SCALING, *float64(bias))
    assert rel_error(y_decode, expected) <= tolerance


@requires_triton
def test_triton_weight_grad_split_over_many_programs_matches_one_program():
    # More rows than one split holds: the partial sums of several programs must add up.
    left = torch.randn(300, 20, device=kernel_device())
    right = torch.randn(300, 33, device=kernel_device())
    out = lora_kernels.lora_weight_grad(left, right, 0.5, torch.float32)
    assert rel_error(out, 0.5 * left.double().T @ right.double()) <= 1e-5


def test_choose_strategy_follows_the_roofline():
    if not devices.triton_available():
        pytest.skip("triton is not installed")
    assert lora_kernels.choose_strategy(8192, 4096, 32, 0.0) == "separate"
    assert lora_kernels.choose_strategy(8192, 128, 32, 0.1) == "mainloop"
    assert lora_kernels.choose_strategy(8192, 512, 32, 0.0) == "mainloop"
    assert lora_kernels.choose_strategy(8192, 512, 32, 0.1) == "separate"
    assert lora_kernels.choose_strategy(64, 4096, 32, 0.1) == "mainloop"


# ---------------------------------------------------------------- 4-bit base (QLoRA)


QUANT_CASES = [("nf4", True, 64), ("nf4", False, 128), ("fp4", True, 32), ("fp4", False, 64)]


@requires_triton
@pytest.mark.parametrize("quant_type, double_quant, blocksize", QUANT_CASES, ids=str)
def test_triton_4bit_decode_is_bit_exact_against_bitsandbytes(quant_type, double_quant, blocksize):
    # out · in odd and in not a multiple of the blocksize: bytes and blocks straddle row ends.
    d_out, d_in = 53, 45
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(21))
    params, dequantised = params4bit(weight, quant_type, double_quant, blocksize)
    from cdm_fast import quant

    base = quant.from_bitsandbytes(params.to(kernel_device()))
    # An identity activation in float32 (IEEE products) copies the decoded weight into y exactly.
    identity = torch.eye(d_in, device=kernel_device())
    y, _ = lora_kernels.forward(
        identity,
        base,
        torch.zeros(1, d_in, device=identity.device),
        torch.zeros(d_out, 1, device=identity.device),
        None,
        0.0,
        0.0,
        0,
    )
    assert torch.equal(y.t().cpu(), dequantised)


@pytest.mark.parametrize("dropout_p", (0.0, 0.3), ids=("no_dropout", "dropout"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize("quant_type, double_quant, blocksize", QUANT_CASES[:2] + QUANT_CASES[3:], ids=str)
def test_4bit_base_forward_and_grads_match_float64_reference_of_the_dequantised_weight(
    impl, quant_type, double_quant, blocksize, dtype, dropout_p, poisoned_allocations
):
    device = backend_device(impl.backend)
    x, weight, lora_A, lora_B, bias = _inputs(*ODD[:3], 1, dtype=dtype, device="cpu", seed=22)
    params, dequantised = params4bit(weight, quant_type, double_quant, blocksize)
    x, params, lora_A, lora_B, bias = (t.to(device) for t in (x, params, lora_A, lora_B, bias))
    from cdm_fast import quant

    _skip_unless_served(impl, x, quant.from_bitsandbytes(params), lora_A, lora_B, bias)
    grad_y = torch.randn(ODD[0], ODD[2], generator=torch.Generator().manual_seed(23)).to(x)
    y, grads = _gradients(impl, x, params, lora_A, lora_B, bias, grad_y, dropout_p=dropout_p, torch_seed=24)
    y64, grads64 = _reference_gradients(
        x,
        dequantised.to(dtype),
        lora_A,
        lora_B,
        bias,
        grad_y,
        dropout_p=dropout_p,
        dropout_seed=_seed_of_next_call(24),
    )
    tolerance = impl.tolerances[dtype_name(dtype)]
    assert rel_error(y, y64) <= tolerance
    for name, grad, grad64 in zip(("x", "lora_A", "lora_B"), grads, grads64, strict=True):
        assert rel_error(grad, grad64) <= tolerance, name


def test_4bit_base_with_mismatched_shape_raises_naming_weight():
    weight = torch.randn(6, 9)
    params, _ = params4bit(weight, "nf4", True)
    args = _valid_args()  # x is (5, 8): the 4-bit weight is (6, 9)
    with pytest.raises(ValueError, match=r"^weight: expected \(out, 8\)"):
        lora_linear(args[0], params, args[2], args[3], SCALING)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only fail the cuda gate without a GPU run")
def test_explicit_cuda_with_4bit_base_raises_backend_unavailable():
    params, _ = params4bit(torch.randn(6, 8), "nf4", True)
    args = _valid_args()
    with pytest.raises(BackendUnavailable, match="cuda"):
        lora_linear(args[0], params, args[2], args[3], SCALING, backend="cuda")


# ---------------------------------------------------------------- validation and dispatch


def _valid_args():
    return list(_inputs(5, 8, 6, 2, dtype=torch.float32, device="cpu", seed=15))


def _replace(index, value):
    def make():
        args = _valid_args()
        args[index] = value
        return args

    return make


BAD_INPUTS = {
    "rank_mismatch": (_replace(3, torch.randn(6, 3)), {}, ValueError, "lora_B"),
    "lora_A_width": (_replace(2, torch.randn(2, 7)), {}, ValueError, "lora_A"),
    "weight_width": (_replace(1, torch.randn(6, 7)), {}, ValueError, "weight"),
    "bias_shape": (_replace(4, torch.randn(5)), {}, ValueError, "bias"),
    "integer_x": (_replace(0, torch.ones(5, 8, dtype=torch.int32)), {}, TypeError, "x"),
    "lora_A_on_other_device": (_replace(2, torch.randn(2, 8, device="meta")), {}, ValueError, "lora_A"),
    "tensor_scaling": (_valid_args, {"scaling": torch.tensor(1.0)}, TypeError, "scaling"),
    "dropout_one": (_valid_args, {"dropout_p": 1.0}, ValueError, "dropout_p"),
    "bad_backend": (_valid_args, {"backend": "cutlass"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument_before_any_launch(case, monkeypatch):
    make_args, kwargs, error, argument = case

    def launched(*args, **kwargs):
        raise AssertionError("the op ran before the inputs were validated")

    monkeypatch.setattr(lora_op, "_lora_op", launched)
    args = make_args()
    call = {"scaling": SCALING, **kwargs}
    with pytest.raises(error, match=rf"^{argument}: "):
        lora_linear(*args[:4], call.pop("scaling"), args[4], **call)


def test_explicit_triton_on_cpu_without_interpreter_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _valid_args()
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1|triton is not installed"):
        lora_linear(*args[:4], SCALING, args[4], backend="triton")


@pytest.mark.skipif(not devices.triton_available(), reason="the rank gate is only reached with Triton")
def test_explicit_triton_with_too_large_rank_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, lora_A, lora_B, bias = _inputs(
        3, 8, 6, lora_op.MAX_TRITON_RANK + 1, dtype=torch.float32, device="cpu", seed=16
    )
    with pytest.raises(BackendUnavailable, match="rank"):
        lora_linear(x, weight, lora_A, lora_B, SCALING, bias, backend="triton")


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    class Adapted(torch.nn.Module):
        def __init__(self, weight, lora_A, lora_B, bias):
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.lora_A = torch.nn.Parameter(lora_A)
            self.lora_B = torch.nn.Parameter(lora_B)

        def forward(self, x):
            return lora_linear(x, self.weight, self.lora_A, self.lora_B, SCALING, self.bias, backend="torch")

    x, weight, lora_A, lora_B, bias = _inputs(*ODD, dtype=torch.float32, device="cpu", seed=17)
    module = Adapted(weight, lora_A, lora_B, bias)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    outputs, grads = [], []
    for run in (module, compiled):
        x_leaf = x.clone().requires_grad_()
        module.zero_grad()
        y = run(x_leaf)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([x_leaf.grad, module.lora_A.grad, module.lora_B.grad])
    assert rel_error(outputs[1], outputs[0]) <= 1e-6
    for compiled_grad, eager_grad in zip(grads[1], grads[0], strict=True):
        assert rel_error(compiled_grad, eager_grad) <= 1e-6


# ---------------------------------------------------------------- real sizes on a GPU


@gpu
@requires_cuda
@pytest.mark.parametrize("strategy", ("mainloop", "separate"))
@pytest.mark.parametrize("dropout_p", (0.0, 0.1), ids=("no_dropout", "dropout"))
def test_gpu_triton_realistic_size_matches_float64_reference(strategy, dropout_p, record_property):
    tokens, d_in, d_out, rank = 4096, 2048, 1536, 32
    x, weight, lora_A, lora_B, bias = _inputs(
        tokens, d_in, d_out, rank, dtype=torch.bfloat16, device="cuda", seed=18, adapter_dtype=torch.float32
    )
    seed = 1234
    y, u = lora_kernels.forward(x, weight, lora_A, lora_B, bias, SCALING, dropout_p, seed, strategy=strategy)
    grad_y = torch.randn_like(y)
    grad_x, grad_A, grad_B = lora_kernels.backward(
        grad_y, x, weight, lora_A, lora_B, u, SCALING, dropout_p, seed, True, strategy=strategy
    )
    y64, grads64 = _reference_gradients(
        x, weight, lora_A, lora_B, bias, grad_y, dropout_p=dropout_p, dropout_seed=seed
    )
    tolerance = REGISTRY[(lora_op.OP, "triton")].tolerances["bfloat16"]
    for name, out, expected in zip(
        ("y", "x", "lora_A", "lora_B"), (y, grad_x, grad_A, grad_B), (y64, *grads64), strict=True
    ):
        error = rel_error(out, expected)
        record_property(f"error_{name}", error)
        assert error <= tolerance, name
