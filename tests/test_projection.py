"""Fourier projection: every registered backend against the float64 reference (forward, fp8 precisions,
gradients), the Triton fp8 quantise kernels against `cdm_fast.float8`, input validation and dispatch reasons.

Inputs follow the real use: x ~ N(0, 1) and freqs ~ N(0, 1/d_in), so the phases x@freqs are O(1) turns.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    backend_device,
    backend_fixture,
    dtype_name,
    gpu,
    kernel_device,
    rel_error,
    requires_cuda,
    requires_triton,
)

from cdm_fast import device as devices
from cdm_fast import float8
from cdm_fast.dispatch import REGISTRY, BackendUnavailable
from cdm_fast.ops import projection as projection_op
from cdm_fast.ops.projection import fourier_projection, reference

if devices.triton_available():
    import triton
    import triton.language as tl

    from cdm_fast.kernels import projection as projection_kernels
    from cdm_fast.kernels.common import to_e4m3

    @triton.jit
    def _to_e4m3_kernel(values_ptr, codes_ptr, size, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        values = tl.load(values_ptr + offsets, mask=offsets < size)
        tl.store(codes_ptr + offsets, to_e4m3(values, INTERPRET), mask=offsets < size)


ODD = (37, 45, 19, 23)  # rows, d_in, m, d_out: none a multiple of 16, d_in leaves an MX tail block of 13
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_PRECISIONS = ("fp8", "fp8-features")
# Error of the fp8 precisions to the exact (unquantised) function: reported, and only sanity-bounded, since
# it is the cost of fp8 itself (fp8 rounds x and freqs, so phases of O(1) turns move by a few percent).
FP8_ERROR_TO_EXACT_SANITY_BOUND = {"fp8": 0.5, "fp8-features": 0.1}


impl = backend_fixture(projection_op.OP)


def _skip_unless_served(impl, x, freqs, weight, bias, precision="bf16", fp8_scaling="rowwise"):
    reason = impl.supports(x.reshape(-1, x.shape[-1]), freqs, weight, bias, precision, fp8_scaling)
    if reason is not None:
        pytest.skip(f"{impl.backend}: {reason}")


def _inputs(rows, d_in, m, d_out, *, dtype, device, seed, bias=True, leading=()):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, rows, d_in, generator=generator)
    freqs = torch.randn(d_in, m, generator=generator) / math.sqrt(d_in)
    weight = torch.randn(2 * m, d_out, generator=generator)
    b = torch.randn(d_out, generator=generator) if bias else None
    return tuple(t.to(device=device, dtype=dtype) if t is not None else None for t in (x, freqs, weight, b))


def _reference64(x, freqs, weight, bias, **kwargs):
    """The definition in float64, fed exactly the same input values (on their device)."""
    return reference(*(t.double() if t is not None else None for t in (x, freqs, weight, bias)), **kwargs)


# ---------------------------------------------------------------- fp8 building blocks (Triton)


@requires_triton
def test_to_e4m3_matches_torch_cast_on_ties_subnormals_and_saturation():
    device = kernel_device()
    generator = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    random = torch.randn(20_000, generator=generator) * torch.exp2(
        torch.randint(-14, 10, (20_000,), generator=generator).float()
    )
    special = torch.tensor(
        [448.0, 449.0, 463.9, 464.0, 1e6, -1e30, 0.0, -0.0, 2**-10, 2**-11, 3 * 2**-11, 1.94]
    )
    values = torch.cat([grid, ties, -ties, random, special]).to(device)
    codes = torch.empty_like(values, dtype=torch.float8_e4m3fn)
    block = 1024
    _to_e4m3_kernel[(triton.cdiv(values.numel(), block),)](
        values, codes, values.numel(), BLOCK=block, INTERPRET=devices.triton_interpret()
    )
    expected = values.clamp(-float8.E4M3_MAX, float8.E4M3_MAX).to(torch.float8_e4m3fn)
    mismatched = codes.view(torch.uint8) != expected.view(torch.uint8)
    assert not mismatched.any(), f"{mismatched.sum().item()} codes differ, e.g. at {values[mismatched][:5]}"


def _quantise_input(dim, dtype, device, seed):
    """(45, 70): tail blocks along both dims; one all-zero slice; magnitudes over 2^-20 .. 2^20."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(45, 70, generator=generator) * torch.exp2(
        torch.randint(-20, 20, (45, 1), generator=generator).float()
    )
    t.select(1 - dim, 3).zero_()
    return t.to(device=device, dtype=dtype)


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize("dim", (0, 1))
def test_quantize_rowwise_kernel_matches_float8_recipe_exactly(dim, dtype, poisoned_allocations):
    t = _quantise_input(dim, dtype, kernel_device(), seed=10 + dim)
    codes, scales = projection_kernels.quantize_rowwise(t, dim)
    expected_codes, expected_scales = float8.quantize_rowwise(t, dim)
    # Division is IEEE in both, so there are no rounding ties to excuse: codes and scales are bit-exact.
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))


@requires_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
@pytest.mark.parametrize("dim", (0, 1))
def test_quantize_mx_kernel_matches_float8_recipe_exactly(dim, dtype, poisoned_allocations):
    t = _quantise_input(dim, dtype, kernel_device(), seed=20 + dim)
    codes, scales = projection_kernels.quantize_mx(t, dim)
    expected_codes, expected_scales = float8.quantize_mx(t, dim)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    # The layout tl.dot_scaled reads: scales (slices, K/32) with the blocks contiguous.
    assert scales.stride(dim) == 1


@pytest.mark.skipif(not devices.triton_available(), reason="triton is not installed")
def test_autotune_pruning_keeps_only_configs_that_fit_shared_memory():
    from cdm_fast.kernels.common import prune_by_shared_memory

    def stage_bytes(meta, args):
        return meta["BLOCK_K"] * (meta["BLOCK_M"] + meta["BLOCK_N"]) * args["a_ptr"].element_size()

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=stages)
        for bm in (64, 128, 256)
        for stages in (2, 3, 4)
    ]
    a = torch.empty(1, dtype=torch.bfloat16)
    limit = devices.shared_memory_limit(a.device)
    kept = prune_by_shared_memory(stage_bytes)(configs, {"a_ptr": a})
    # Without a GPU to ask, every stage is counted against the sm_120 limit: the conservative side.
    assert kept == [c for c in configs if c.num_stages * stage_bytes(c.kwargs, {"a_ptr": a}) <= limit]
    assert 0 < len(kept) < len(configs)
    too_big = [triton.Config({"BLOCK_M": 512, "BLOCK_N": 512, "BLOCK_K": 128}, num_stages=s) for s in (3, 4)]
    assert prune_by_shared_memory(stage_bytes)(too_big, {"a_ptr": a}) == too_big[:1]


# ---------------------------------------------------------------- forward, every backend


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_forward_matches_float64_reference_odd_sizes(impl, dtype, with_bias, poisoned_allocations):
    x, freqs, weight, bias = _inputs(
        *ODD, dtype=dtype, device=backend_device(impl.backend), seed=1, bias=with_bias
    )
    _skip_unless_served(impl, x, freqs, weight, bias)
    y = fourier_projection(x, freqs, weight, bias, backend=impl.backend)
    assert y.shape == (ODD[0], ODD[3]) and y.dtype == dtype
    assert rel_error(y, _reference64(x, freqs, weight, bias)) <= impl.tolerances[dtype_name(dtype)]


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (1, 45, 19, 23), (37, 1, 19, 23), (37, 45, 1, 23), (37, 45, 19, 1)], ids=str
)
def test_forward_matches_float64_reference_size_one_dims(impl, shape, poisoned_allocations):
    x, freqs, weight, bias = _inputs(*shape, dtype=torch.float32, device=backend_device(impl.backend), seed=2)
    _skip_unless_served(impl, x, freqs, weight, bias)
    y = fourier_projection(x, freqs, weight, bias, backend=impl.backend)
    assert rel_error(y, _reference64(x, freqs, weight, bias)) <= impl.tolerances["float32"]


def test_forward_keeps_batched_leading_dims(impl, poisoned_allocations):
    x, freqs, weight, bias = _inputs(
        3, 45, 19, 23, dtype=torch.float32, device=backend_device(impl.backend), seed=3, leading=(2,)
    )
    _skip_unless_served(impl, x, freqs, weight, bias)
    y = fourier_projection(x, freqs, weight, bias, backend=impl.backend)
    assert y.shape == (2, 3, 23)
    assert rel_error(y, _reference64(x, freqs, weight, bias)) <= impl.tolerances["float32"]


def test_forward_matches_float64_reference_non_contiguous_inputs(impl, poisoned_allocations):
    rows, d_in, m, d_out = ODD
    x, freqs, weight, bias = _inputs(rows, d_in, m, 2 * d_out, dtype=torch.float32, device="cpu", seed=4)
    device = backend_device(impl.backend)
    # x and freqs transposed views, weight and bias every other column: no input has unit inner stride.
    x = x.t().contiguous().to(device).t()
    freqs = freqs.t().contiguous().to(device).t()
    weight, bias = weight.to(device)[:, ::2], bias.to(device)[::2]
    assert not any(t.is_contiguous() for t in (x, freqs, weight, bias))
    _skip_unless_served(impl, x, freqs, weight, bias)
    y = fourier_projection(x, freqs, weight, bias, backend=impl.backend)
    assert rel_error(y, _reference64(x, freqs, weight, bias)) <= impl.tolerances["float32"]


@pytest.mark.parametrize("fp8_scaling", float8.FLOAT8_SCALINGS)
@pytest.mark.parametrize("precision", FP8_PRECISIONS)
def test_fp8_matches_reference_fed_the_same_quantised_inputs(
    impl, precision, fp8_scaling, poisoned_allocations, record_property
):
    x, freqs, weight, bias = _inputs(
        *ODD, dtype=torch.bfloat16, device=backend_device(impl.backend), seed=5, leading=(2,)
    )
    _skip_unless_served(impl, x, freqs, weight, bias, precision, fp8_scaling)
    y = fourier_projection(
        x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling, backend=impl.backend
    )
    quantised = _reference64(x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling)
    error_to_quantised = rel_error(y, quantised)
    error_to_exact = rel_error(y, _reference64(x, freqs, weight, bias))
    record_property("error_to_quantised_reference", error_to_quantised)
    record_property("error_to_exact_reference", error_to_exact)
    print(
        f"\n{impl.backend} {precision}/{fp8_scaling}: {error_to_quantised:.2e} to the quantised reference, "
        f"{error_to_exact:.2e} to the exact one"
    )
    assert error_to_quantised <= impl.tolerances["fp8"]
    assert math.isfinite(error_to_exact) and error_to_exact <= FP8_ERROR_TO_EXACT_SANITY_BOUND[precision]


# ---------------------------------------------------------------- backward, every backend


def _gradients(impl, x, freqs, weight, bias, grad_y, precision="bf16"):
    leaves = [t.detach().requires_grad_() for t in (x, freqs, weight, bias)]
    fourier_projection(*leaves, precision=precision, backend=impl.backend).backward(grad_y)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gradients_match_float64_autograd_through_reference(impl, dtype, poisoned_allocations):
    device = backend_device(impl.backend)
    x, freqs, weight, bias = _inputs(*ODD, dtype=dtype, device=device, seed=6, leading=(2,))
    _skip_unless_served(impl, x, freqs, weight, bias)
    grad_y = torch.randn(2, ODD[0], ODD[3], generator=torch.Generator().manual_seed(7)).to(x)
    grads = _gradients(impl, x, freqs, weight, bias, grad_y)
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (x, freqs, weight, bias)]
    reference(*leaves64).backward(grad_y.double().cpu())
    for name, grad, leaf in zip(("x", "freqs", "weight", "bias"), grads, leaves64, strict=True):
        assert grad.dtype == dtype, name
        assert rel_error(grad, leaf.grad) <= impl.tolerances[dtype_name(dtype)], name


def test_backward_computes_only_the_requested_gradients(impl, poisoned_allocations):
    x, freqs, weight, bias = _inputs(*ODD, dtype=torch.float32, device=backend_device(impl.backend), seed=8)
    _skip_unless_served(impl, x, freqs, weight, bias)
    weight.requires_grad_()
    fourier_projection(x, freqs, weight, backend=impl.backend).sum().backward()
    assert x.grad is None and freqs.grad is None
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (x, freqs, weight)]
    reference(*leaves64).sum().backward()
    assert rel_error(weight.grad, leaves64[2].grad) <= impl.tolerances["float32"]


def test_fp8_backward_is_the_gradient_of_the_unquantised_function(impl):
    x, freqs, weight, bias = _inputs(*ODD, dtype=torch.bfloat16, device=backend_device(impl.backend), seed=9)
    _skip_unless_served(impl, x, freqs, weight, bias, "fp8")
    grad_y = torch.randn(ODD[0], ODD[3], generator=torch.Generator().manual_seed(10)).to(x)
    for fp8_grad, exact_grad in zip(
        _gradients(impl, x, freqs, weight, bias, grad_y, precision="fp8"),
        _gradients(impl, x, freqs, weight, bias, grad_y),
        strict=True,
    ):
        assert torch.equal(fp8_grad, exact_grad)


# ---------------------------------------------------------------- validation and dispatch


def _valid_args():
    return _inputs(5, 8, 3, 4, dtype=torch.float32, device="cpu", seed=11)


def _replace(position, value):
    def args():
        inputs = list(_valid_args())
        inputs[position] = value
        return inputs

    return args


BAD_INPUTS = {
    "freqs_wrong_d_in": (_replace(1, torch.randn(7, 3)), {}, ValueError, "freqs"),
    "freqs_not_2d": (_replace(1, torch.randn(8)), {}, ValueError, "freqs"),
    "weight_wrong_rows": (_replace(2, torch.randn(5, 4)), {}, ValueError, "weight"),
    "bias_wrong_size": (_replace(3, torch.randn(5)), {}, ValueError, "bias"),
    "bad_precision": (_valid_args, {"precision": "fp16"}, ValueError, "precision"),
    "bad_fp8_scaling": (_valid_args, {"fp8_scaling": "tensorwise"}, ValueError, "fp8_scaling"),
    "integer_x": (_replace(0, torch.ones(5, 8, dtype=torch.int32)), {}, TypeError, "x"),
    "integer_weight": (_replace(2, torch.ones(6, 4, dtype=torch.int64)), {}, TypeError, "weight"),
    "weight_on_other_device": (_replace(2, torch.randn(6, 4, device="meta")), {}, ValueError, "weight"),
    "bias_not_a_tensor": (_replace(3, [0.0] * 4), {}, TypeError, "bias"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument_before_any_launch(case, monkeypatch):
    make_args, kwargs, error, argument = case

    def launched(*args, **kwargs):
        raise AssertionError("the op ran before the inputs were validated")

    monkeypatch.setattr(projection_op, "_projection_op", launched)
    with pytest.raises(error, match=rf"^{argument}: "):
        fourier_projection(*make_args(), **kwargs)


def test_explicit_triton_on_cpu_without_interpreter_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1|triton is not installed"):
        fourier_projection(*_valid_args(), backend="triton")


@pytest.mark.skipif(not devices.triton_available(), reason="the float64 gate is only reached with Triton")
def test_explicit_triton_with_float64_raises_backend_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = [t.double() for t in _valid_args()]
    with pytest.raises(BackendUnavailable, match="float64"):
        fourier_projection(*args, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only fail the cuda gate without a GPU run")
def test_explicit_cuda_with_cpu_tensors_raises_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="cuda"):
        fourier_projection(*_valid_args(), backend="cuda")


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    class Projection(torch.nn.Module):
        def __init__(self, freqs, weight, bias):
            super().__init__()
            self.register_buffer("freqs", freqs)
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(bias)

        def forward(self, x):
            return fourier_projection(x, self.freqs, self.weight, self.bias, backend="torch")

    x, freqs, weight, bias = _inputs(*ODD, dtype=torch.float32, device="cpu", seed=12)
    module = Projection(freqs, weight, bias)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    outputs, grads = [], []
    for run in (module, compiled):
        x_leaf = x.clone().requires_grad_()
        module.zero_grad()
        y = run(x_leaf)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([x_leaf.grad, module.weight.grad, module.bias.grad])
    assert rel_error(outputs[1], outputs[0]) <= 1e-6
    for compiled_grad, eager_grad in zip(grads[1], grads[0], strict=True):
        assert rel_error(compiled_grad, eager_grad) <= 1e-6


# ---------------------------------------------------------------- real sizes on a GPU (Triton)

REALISTIC = (4096, 1024, 512, 384)  # rows, d_in, m, d_out
# bench.projection's default CUDA shape: teacher latents (d_in = 8192) to the student width (d_out = 1536).
BENCH_DEFAULT = (16384, 8192, 2048, 1536)


def _triton_tolerance(precision: str, dtype: torch.dtype) -> float:
    tolerances = REGISTRY[(projection_op.OP, "triton")].tolerances
    return tolerances["fp8"] if precision in FP8_PRECISIONS else tolerances[dtype_name(dtype)]


@gpu
@requires_cuda
@pytest.mark.parametrize(
    "precision, fp8_scaling",
    [("bf16", "rowwise"), *[(p, s) for p in FP8_PRECISIONS for s in float8.FLOAT8_SCALINGS]],
)
def test_gpu_triton_realistic_size_matches_reference(precision, fp8_scaling, record_property):
    x, freqs, weight, bias = _inputs(*REALISTIC, dtype=torch.bfloat16, device="cuda", seed=13)
    y = fourier_projection(
        x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling, backend="triton"
    )
    error = rel_error(y, _reference64(x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling))
    error_to_exact = rel_error(y, _reference64(x, freqs, weight, bias))
    record_property("error_to_quantised_reference", error)
    record_property("error_to_exact_reference", error_to_exact)
    print(
        f"\ntriton {precision}/{fp8_scaling} {REALISTIC}: {error:.2e} to the reference, "
        f"{error_to_exact:.2e} to the exact one"
    )
    assert error <= _triton_tolerance(precision, x.dtype)
    if precision in FP8_PRECISIONS:
        assert error_to_exact <= FP8_ERROR_TO_EXACT_SANITY_BOUND[precision]


@gpu
@requires_cuda
def test_gpu_triton_realistic_size_gradients_match_float64_autograd():
    x, freqs, weight, bias = _inputs(*REALISTIC, dtype=torch.bfloat16, device="cuda", seed=14)
    grad_y = torch.randn(REALISTIC[0], REALISTIC[3], device="cuda", dtype=torch.bfloat16)
    grads = _gradients(REGISTRY[(projection_op.OP, "triton")], x, freqs, weight, bias, grad_y)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, freqs, weight, bias)]
    reference(*leaves64).backward(grad_y.double())
    for name, grad, leaf in zip(("x", "freqs", "weight", "bias"), grads, leaves64, strict=True):
        assert rel_error(grad, leaf.grad) <= _triton_tolerance("bf16", x.dtype), name


@gpu
@requires_cuda
def test_gpu_triton_rowwise_fp8_at_bench_default_shape_matches_quantised_reference(record_property):
    x, freqs, weight, bias = _inputs(*BENCH_DEFAULT, dtype=torch.bfloat16, device="cuda", seed=15)
    y = fourier_projection(x, freqs, weight, bias, precision="fp8", fp8_scaling="rowwise", backend="triton")
    error = rel_error(y, _reference64(x, freqs, weight, bias, precision="fp8", fp8_scaling="rowwise"))
    record_property("error_to_quantised_reference", error)
    assert error <= _triton_tolerance("fp8", x.dtype)
