"""Fourier-feature projection: teacher latents (d_in) to student width (d_out).

    P = x @ freqs                                   x (N, d_in), freqs (d_in, m)   -- phases, in turns
    F = concat(sin(2π P), cos(2π P)) / sqrt(m)      (N, 2m)
    y = F @ weight + bias                           weight (2m, d_out), bias (d_out,)

Cost: 2·N·d_in·m + 2·N·2m·d_out FLOPs (GEMM1 + GEMM2). Bytes, fused: x, freqs, weight once, y once,
plus F once each way in fp8 (N·2m bytes written by GEMM1's epilogue, read by GEMM2). Unfused torch
writes and reads P, sin, cos and the concatenation in bf16: about 8·N·m + 8·N·m extra bytes.

Precision: "bf16" (no fp8; computes in the input dtype with fp32 accumulation), "fp8" (both GEMMs on
e4m3 codes, fp32 accumulation), "fp8-features" (GEMM1 exact for phase accuracy, GEMM2 in fp8). The fp8
scaling recipe ("rowwise" or "mx", see `cdm_fast.float8`) defaults to the device's best. The backward is
the exact gradient of the unquantised function (straight-through for the fp8 rounding), computed in
the input dtype with fp32 accumulation.
"""

from __future__ import annotations

import math

import torch

from cdm_fast import device as devices
from cdm_fast import wgrad
from cdm_fast.dispatch import Implementation, register, register_examples, requested_backend, select
from cdm_fast.float8 import (
    FLOAT8_SCALINGS,
    Float8Scaling,
    default_scaling,
    fake_quantize,
    fake_quantize_features,
)

OP = "projection"
PRECISIONS = ("bf16", "fp8", "fp8-features")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reference(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    precision: str = "bf16",
    fp8_scaling: Float8Scaling = "rowwise",
) -> torch.Tensor:
    """The definition: plain torch, any device, computed in float32 (float64 if any input is float64).

    fp8 precisions round the GEMM operands through e4m3 exactly as the kernels do (same scaling recipe),
    so this is also "the reference fed the same quantised inputs". Returns y (..., d_out) in x.dtype.
    """
    inputs = [t for t in (x, freqs, weight, bias) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    x_c, freqs_c, weight_c = x.to(dtype), freqs.to(dtype), weight.to(dtype)
    if precision == "fp8":
        x_c = fake_quantize(x_c, dim=-1, scaling=fp8_scaling, dtype=dtype)
        freqs_c = fake_quantize(freqs_c, dim=0, scaling=fp8_scaling, dtype=dtype)
    angle = 2 * math.pi * (x_c @ freqs_c)
    features = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    if precision in ("fp8", "fp8-features"):
        features = fake_quantize_features(features, dtype)
        weight_c = fake_quantize(weight_c, dim=0, scaling=fp8_scaling, dtype=dtype)
    y = (features @ weight_c) / math.sqrt(freqs.shape[1])
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def _validate(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    fp8_scaling: str | None,
) -> None:
    for name, t in (("x", x), ("freqs", freqs), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
    if x.dim() < 1:
        raise ValueError("x: expected (..., d_in), got a 0-d tensor")
    if freqs.dim() != 2 or freqs.shape[0] != x.shape[-1]:
        raise ValueError(
            f"freqs: expected (d_in, m) = ({x.shape[-1]}, m) to match x's last dim, got {tuple(freqs.shape)}"
        )
    if freqs.shape[1] == 0:
        raise ValueError("freqs: expected at least one frequency, got m = 0")
    if weight.dim() != 2 or weight.shape[0] != 2 * freqs.shape[1]:
        raise ValueError(
            f"weight: expected (2m, d_out) = ({2 * freqs.shape[1]}, d_out) for m = {freqs.shape[1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(
            f"bias: expected ({weight.shape[1]},) to match weight's d_out, got {tuple(bias.shape)}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if fp8_scaling is not None and fp8_scaling not in FLOAT8_SCALINGS:
        raise ValueError(f"fp8_scaling: expected one of {FLOAT8_SCALINGS} or None, got {fp8_scaling!r}")


def fourier_projection(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    precision: str = "bf16",
    fp8_scaling: Float8Scaling | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = concat(sin(2π·x@freqs), cos(2π·x@freqs)) / sqrt(m) @ weight + bias.

    Args:
        x: (..., d_in) float16/bfloat16/float32 (float64 on the torch backend).
        freqs: (d_in, m) frequencies in cycles per unit.
        weight: (2m, d_out); rows [0, m) multiply the sines, [m, 2m) the cosines.
        bias: optional (d_out,).
        precision: "bf16" | "fp8" | "fp8-features" (see the module docstring).
        fp8_scaling: "rowwise" | "mx" | None (the device's best: mx on sm_120, rowwise elsewhere).
        backend: None/"auto", "torch", "triton" or "cuda"; env CDM_FAST_BACKEND overrides auto.

    Returns:
        y (..., d_out) in x.dtype. Differentiable in x, freqs, weight and bias.
    """
    _validate(x, freqs, weight, bias, precision, fp8_scaling)
    scaling = fp8_scaling or default_scaling(x.device)
    resolved = requested_backend(backend)
    # Fail before any launch (and outside the custom op, so the message is not wrapped).
    select(OP, resolved, x, freqs, weight, bias, precision, scaling)
    x2d = x.reshape(-1, x.shape[-1])
    y2d = _projection_op(x2d, freqs, weight, bias, precision, scaling, resolved)
    return y2d.reshape(*x.shape[:-1], weight.shape[1])


@torch.library.custom_op("cdm_fast::fourier_projection", mutates_args=())
def _projection_op(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    fp8_scaling: str,
    backend: str,
) -> torch.Tensor:
    impl = select(OP, backend, x, freqs, weight, bias, precision, fp8_scaling)
    return impl.forward(x, freqs, weight, bias, precision, fp8_scaling)


@_projection_op.register_fake
def _(x, freqs, weight, bias, precision, fp8_scaling, backend):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("cdm_fast::fourier_projection_backward", mutates_args=())
def _projection_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    needs_x_grad: bool,
    needs_freqs_grad: bool,
    precision: str,
    fp8_scaling: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select(OP, backend, x, freqs, weight, None, precision, fp8_scaling)
    grads = impl.backward(grad_y.contiguous(), x, freqs, weight, needs_x_grad, needs_freqs_grad)
    # A custom op cannot return None: an empty tensor stands for "not requested".
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)


@_projection_backward_op.register_fake
def _(grad_y, x, freqs, weight, needs_x_grad, needs_freqs_grad, precision, fp8_scaling, backend):
    return (
        torch.empty_like(x) if needs_x_grad else grad_y.new_empty(0),
        torch.empty_like(freqs) if needs_freqs_grad else grad_y.new_empty(0),
        torch.empty_like(weight),
        weight.new_empty(weight.shape[1]),
    )


def _setup_context(ctx, inputs, output):
    x, freqs, weight, bias, precision, fp8_scaling, backend = inputs
    ctx.save_for_backward(x, freqs, weight)
    ctx.config = (precision, fp8_scaling, backend)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.bias = bias  # cdm_fast.wgrad: the leaf a deferred d bias accumulates into


def _backward(ctx, grad_y):
    x, freqs, weight = ctx.saved_tensors
    needs_x, needs_freqs, needs_weight, needs_bias = ctx.needs_input_grad[:4]
    # cdm_fast.wgrad: inside `deferred()`, dx now and the parameter gradients by a pending task.
    deferral = wgrad.active()
    params = (
        freqs if needs_freqs else None,
        weight if needs_weight else None,
        ctx.bias if needs_bias and ctx.has_bias else None,
    )
    if deferral is not None and deferral.wants(*params):
        return (_deferred_backward(deferral, ctx, params, grad_y, x, freqs, weight, needs_x), *[None] * 6)
    grad_x, grad_freqs, grad_weight, grad_bias = _projection_backward_op(
        grad_y, x, freqs, weight, needs_x, needs_freqs, *ctx.config
    )
    return (
        grad_x if needs_x else None,
        grad_freqs if needs_freqs else None,
        grad_weight if needs_weight else None,
        grad_bias.to(ctx.bias_dtype) if needs_bias and ctx.has_bias else None,
        None,
        None,
        None,
    )


def _deferred_backward(deferral, ctx, params, grad_y, x, freqs, weight, needs_x):
    """cdm_fast.wgrad's split: dx now; (d freqs, d weight, d bias) submitted to `deferral` for `params`.

    On the Triton kernels the weight-gradient GEMMs themselves are deferred (`kernels.projection.weight_grads`
    on the features and grad_P that `input_grad` leaves); on the torch backend the gradients come from one
    call and only their accumulation is deferred.
    """
    precision, fp8_scaling, backend = ctx.config
    impl = select(OP, backend, x, freqs, weight, None, precision, fp8_scaling)
    grad_y = grad_y.contiguous()
    needs_freqs = params[0] is not None
    if impl.backend not in ("triton", "cuda"):
        grad_x, grad_freqs, grad_weight, grad_bias = impl.backward(
            grad_y, x, freqs, weight, needs_x, needs_freqs
        )
        bias_grad = grad_bias.to(ctx.bias_dtype) if params[2] is not None else None
        deferral.submit(params, (grad_freqs, grad_weight, bias_grad), lambda *grads: grads)
        return grad_x
    from cdm_fast.kernels import projection as kernels

    grad_x, features, grad_phase = kernels.input_grad(grad_y, x, freqs, weight, needs_x)

    def weight_grads(grad_y, x, freqs, weight, features, grad_phase):
        grad_freqs, grad_weight, grad_bias = kernels.weight_grads(
            grad_y, x, freqs, weight, features, grad_phase, needs_freqs
        )
        return grad_freqs, grad_weight, grad_bias.to(ctx.bias_dtype) if params[2] is not None else None

    deferral.submit(params, (grad_y, x, freqs, weight, features, grad_phase), weight_grads)
    return grad_x if needs_x else None


_projection_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- torch backend (reference math, any device)


def _torch_forward(x, freqs, weight, bias, precision, fp8_scaling):
    return reference(x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling)


def _torch_backward(grad_y, x, freqs, weight, needs_x_grad, needs_freqs_grad):
    """Exact gradients of the unquantised function, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = freqs.shape[1]
    x_c, freqs_c, grad_c = x.to(dtype), freqs.to(dtype), grad_y.to(dtype)
    angle = 2 * math.pi * (x_c @ freqs_c)
    sin, cos = torch.sin(angle), torch.cos(angle)
    features = torch.cat([sin, cos], dim=-1) / math.sqrt(m)
    grad_weight = features.T @ grad_c
    grad_bias = grad_c.sum(0)
    grad_features = grad_c @ weight.to(dtype).T
    # d/dP of (sin, cos)(2πP)/sqrt(m) = 2π/sqrt(m) · (cos, -sin)
    grad_phase = (grad_features[:, :m] * cos - grad_features[:, m:] * sin) * (2 * math.pi / math.sqrt(m))
    grad_x = (grad_phase @ freqs_c.T).to(x.dtype) if needs_x_grad else None
    grad_freqs = (x_c.T @ grad_phase).to(freqs.dtype) if needs_freqs_grad else None
    return grad_x, grad_freqs, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def _torch_supports(x, freqs, weight, bias, precision, fp8_scaling):
    return None


register(
    Implementation(
        op=OP,
        backend="torch",
        forward=_torch_forward,
        backward=_torch_backward,
        supports=_torch_supports,
        tolerances={"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "fp8": 1e-2},
    )
)


# ---------------------------------------------------------------- triton backend (kernels/projection.py)


def _triton_supports(x, freqs, weight, bias, precision, fp8_scaling):
    reason = devices.triton_unavailable_reason(*[t for t in (x, freqs, weight, bias) if t is not None])
    if reason is not None:
        return reason
    if x.dtype == torch.float64:
        return "float64 is served by the torch backend only"
    if precision != "bf16" and x.device.type == "cuda":
        cc = devices.capability(x.device)
        if cc < (8, 9):
            return f"fp8 needs compute capability >= 8.9, device has {cc[0]}.{cc[1]}"
    return None


def _triton_forward(x, freqs, weight, bias, precision, fp8_scaling):
    from cdm_fast.kernels import projection as kernels

    return kernels.forward(x, freqs, weight, bias, precision=precision, fp8_scaling=fp8_scaling)


def _triton_backward(grad_y, x, freqs, weight, needs_x_grad, needs_freqs_grad):
    from cdm_fast.kernels import projection as kernels

    return kernels.backward(grad_y, x, freqs, weight, needs_x_grad, needs_freqs_grad)


register(
    Implementation(
        op=OP,
        backend="triton",
        forward=_triton_forward,
        backward=_triton_backward,
        supports=_triton_supports,
        tolerances={"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "fp8": 1e-2},
    )
)


# ---------------------------------------------------------------- cuda backend (csrc/projection.cu)


def _cuda_forward(x, freqs, weight, bias, precision, fp8_scaling):
    from cdm_fast import _extension

    return _extension.projection_forward_fp8(x, freqs, weight, bias, fp8_scaling)


def _cuda_supports(x, freqs, weight, bias, precision, fp8_scaling):
    from cdm_fast import _extension

    return _extension.projection_supports(x, freqs, weight, bias, precision, fp8_scaling)


register(
    Implementation(
        op=OP,
        backend="cuda",
        forward=_cuda_forward,
        # The extension has no backward: the Triton kernels differentiate the same function.
        backward=_triton_backward,
        supports=_cuda_supports,
        tolerances={"fp8": 1e-2},
    )
)


def _example_calls(device: torch.device) -> list[tuple[str, tuple]]:
    """A small bf16 call per precision, for `cdm-fast doctor` to ask each backend about."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(64, 256, device=device, dtype=dtype)
    freqs = torch.randn(256, 64, device=device, dtype=dtype)
    weight = torch.randn(128, 96, device=device, dtype=dtype)
    scaling = default_scaling(device)
    return [(p, (x, freqs, weight, None, p, scaling)) for p in PRECISIONS]


register_examples(OP, _example_calls)
