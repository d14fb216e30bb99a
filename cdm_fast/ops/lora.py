"""Fused LoRA BA-add: a frozen Linear plus its low-rank adapter in one op.

    u = dropout(x) @ lora_Aᵀ                         x (M, in), lora_A (r, in)            u (M, r)
    y = x @ weightᵀ + bias + scaling · u @ lora_Bᵀ    weight (out, in), lora_B (out, r)    y (M, out)
Backward (v = dy @ lora_B, (M, r)):
    dx      = dy @ weight + scaling · keep/(1-p) ⊙ (v @ lora_A)
    d lora_A = scaling · vᵀ @ dropout(x)             (r, in)
    d lora_B = scaling · dyᵀ @ u                     (out, r)

Cost (FLOPs): forward 2·M·in·out + 2·M·r·(in + out); backward twice that. Bytes: x, weight and y once each
(2·(M·in + in·out + M·out) in bf16) plus the skinny u (M·r). peft's layer runs four launches and writes
dropout(x), u and the adapter product (M·out) before adding it to the base output; with its default
adapter-dtype autocast it also casts the whole activation bf16 → fp32 → bf16. Here the adapter is cast to the
activation's dtype instead (r·(in + out) elements) and every product accumulates in fp32.

Dropout draws keep/drop per element of x from a counter-based hash of (seed, row, column)
(`dropout_keep`): the kernels regenerate it in backward, so no mask is stored, and the torch path draws the
very same mask, so backends agree bit for bit on which elements drop. Only x and u are saved for backward.
"""

from __future__ import annotations

import functools

import torch

from cdm_fast import device as devices
from cdm_fast import quant, wgrad
from cdm_fast.dispatch import Implementation, register, register_examples, requested_backend, select
from cdm_fast.quant import Weight4bit

OP = "lora"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton kernels keep (BLOCK_M, r) accumulators in registers.
MAX_TRITON_RANK = 128
_UINT32 = 0xFFFFFFFF
# Keep/drop compares the hash's top 24 bits with p·2^24: p resolves to 2^-24.
_UNIFORM_BITS = 24


# ---------------------------------------------------------------- the dropout mask (shared with the kernels)


def _mul32(a: torch.Tensor, constant: int) -> torch.Tensor:
    """(a · constant) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _UINT32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix with good avalanche (Wellons' lowbias32); `kernels.common.hash32` is the same."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(
    seed: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The (rows, cols) bool mask of the elements dropout keeps: hash32(hash32(row ^ seed) + col) ≥ p·2^32.

    Counter-based: element (i, j) depends on (seed, i, j) only, so any kernel can regenerate any tile.
    """
    row = torch.arange(rows, device=device, dtype=torch.int64)
    col = torch.arange(cols, device=device, dtype=torch.int64)
    row_key = hash32((row ^ (seed & _UINT32)) & _UINT32)
    bits = hash32((row_key[:, None] + col[None, :]) & _UINT32)
    return (bits >> (32 - _UNIFORM_BITS)) >= drop_threshold(p)


def drop_threshold(p: float) -> int:
    """The integer the hash's top 24 bits are compared with: an element is kept when they are ≥ it."""
    return round(p * (1 << _UNIFORM_BITS))


def new_dropout_seed() -> int:
    """A seed from torch's CPU generator, so `torch.manual_seed` makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


# ---------------------------------------------------------------- reference


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    """The definition: plain torch, differentiable, computed in float32 (float64 if any input is float64).

    weight may be 4-bit (a bitsandbytes `Params4bit` or a `cdm_fast.quant.Weight4bit`): it is decoded
    (`cdm_fast.quant.dequantize`) and rounded to x's dtype first, the values the kernels multiply with.

    dropout_p > 0 applies the counter-based mask of `dropout_seed` (`dropout_keep`), scaled by 1/(1 - p).
    Returns y (..., out) in x.dtype.
    """
    if quant.is_4bit(weight):
        weight = quant.from_bitsandbytes(weight)
    if isinstance(weight, Weight4bit):
        weight = quant.dequantize(weight, x.dtype)
    inputs = [t for t in (x, weight, lora_A, lora_B, bias) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    dropped = x2d
    if dropout_p > 0:
        keep = dropout_keep(dropout_seed, *x2d.shape, dropout_p, x.device)
        dropped = x2d * keep / (1 - dropout_p)
    y = x2d @ weight.to(dtype).T + scaling * ((dropped @ lora_A.to(dtype).T) @ lora_B.to(dtype).T)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> None:
    dense_weight = None if isinstance(weight, Weight4bit) else weight
    for name, t in (
        ("x", x),
        ("weight", dense_weight),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("bias", bias),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected (..., in) with in ≥ 1, got {tuple(x.shape)}")
    in_features = x.shape[-1]
    if dense_weight is None and weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (x's), got {weight.device}")
    if len(weight.shape) != 2 or weight.shape[1] != in_features:
        raise ValueError(
            f"weight: expected (out, {in_features}) to match x's last dim, got {tuple(weight.shape)}"
        )
    out_features = weight.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] == 0:
        raise ValueError(
            f"lora_A: expected (r, {in_features}) with r ≥ 1 to match x's last dim, got {tuple(lora_A.shape)}"
        )
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B: expected ({out_features}, {rank}) = (weight's out, lora_A's r), "
            f"got {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected ({out_features},) to match weight's out, got {tuple(bias.shape)}")
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a Python float, got {type(scaling).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 ≤ p < 1, got {dropout_p}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ, as peft's `lora.Linear`.

    Args:
        x: (..., in) float16/bfloat16/float32 (float64 on the torch backend); any strides.
        weight: (out, in) frozen base weight, any float dtype (cast to x's dtype tile by tile), or a
            bitsandbytes 4-bit `Params4bit` (NF4/FP4, any blocksize, double quantisation or not; QLoRA),
            which the Triton kernels decode tile by tile without writing a dequantised copy.
        lora_A: (r, in); lora_B: (out, r) — peft's `lora_A.weight` and `lora_B.weight`.
        scaling: alpha / r (peft's `scaling[adapter]`).
        bias: optional (out,).
        dropout_p: dropout on the adapter's input, applied only when `training`.
        backend: None/"auto", "torch", "triton" or "cuda"; env CDM_FAST_BACKEND overrides auto.

    Returns:
        y (..., out) in x.dtype. Differentiable in x, lora_A and lora_B through the fused backward; when
        weight or bias require grad, the whole call runs the differentiable reference instead.
    """
    if quant.is_4bit(weight):
        weight = quant.from_bitsandbytes(weight)
    _validate(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        # As nn.Linear under autocast: the activation in the autocast dtype; the products below then run
        # with autocast off, in the dtypes this op chooses.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    p = float(dropout_p) if training else 0.0
    seed = new_dropout_seed() if p > 0 else 0
    if isinstance(weight, torch.Tensor) and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return reference(x, weight, lora_A, lora_B, float(scaling), bias, dropout_p=p, dropout_seed=seed)
    resolved = requested_backend(backend)
    x2d = x.reshape(-1, x.shape[-1])
    # Fail before any launch (and outside the custom op, so the message is not wrapped).
    select(OP, resolved, x2d, weight, lora_A, lora_B, bias)
    y2d, _ = _lora_op(x2d, *_flatten_weight(weight), lora_A, lora_B, bias, float(scaling), p, seed, resolved)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def _flatten_weight(weight: torch.Tensor | Weight4bit) -> tuple:
    """The base weight as custom-op arguments: (weight, tables, blocksize, nested_blocksize, offset, out).

    A dense weight is itself with no tables; a 4-bit one is its codes with the tables
    [absmax, code(, nested_absmax, nested_code)] and its scalars.
    """
    if not isinstance(weight, Weight4bit):
        return weight, [], 0, 0, 0.0, weight.shape[0]
    tables = [weight.absmax, weight.code]
    if weight.double_quant:
        tables += [weight.nested_absmax, weight.nested_code]
    return (
        weight.codes,
        tables,
        weight.blocksize,
        weight.nested_blocksize,
        float(weight.offset),
        weight.shape[0],
    )


def _unflatten_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    tables: list[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    offset: float,
    out_features: int,
) -> torch.Tensor | Weight4bit:
    if not tables:
        return weight
    return Weight4bit(
        codes=weight,
        absmax=tables[0],
        code=tables[1],
        blocksize=blocksize,
        shape=(out_features, x.shape[1]),
        dtype=x.dtype,
        quant_type="table",
        nested_absmax=tables[2] if len(tables) > 2 else None,
        nested_code=tables[3] if len(tables) > 2 else None,
        nested_blocksize=nested_blocksize,
        offset=offset,
    )


# ---------------------------------------------------------------- custom ops and autograd


@torch.library.custom_op("cdm_fast::lora_linear", mutates_args=())
def _lora_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_tables: list[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    offset: float,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    base = _unflatten_weight(x, weight, weight_tables, blocksize, nested_blocksize, offset, out_features)
    impl = select(OP, backend, x, base, lora_A, lora_B, bias)
    return impl.forward(x, base, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed)


@_lora_op.register_fake
def _(x, weight, weight_tables, *args):
    lora_A, lora_B = args[4], args[5]
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("cdm_fast::lora_linear_backward", mutates_args=())
def _lora_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_tables: list[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    offset: float,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
    needs_x_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    base = _unflatten_weight(x, weight, weight_tables, blocksize, nested_blocksize, offset, out_features)
    impl = select(OP, backend, x, base, lora_A, lora_B, None)
    grad_x, grad_A, grad_B = impl.backward(
        grad_y.contiguous(), x, base, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad
    )
    # A custom op cannot return None: an empty tensor stands for "not requested".
    return grad_x if grad_x is not None else grad_y.new_empty(0), grad_A, grad_B


@_lora_backward_op.register_fake
def _(grad_y, x, weight, weight_tables, *args):
    lora_A, lora_B, needs_x_grad = args[4], args[5], args[-2]
    grad_x = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs_x_grad else grad_y.new_empty(0)
    )
    return grad_x, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    (
        x,
        weight,
        weight_tables,
        *weight_scalars,
        lora_A,
        lora_B,
        bias,
        scaling,
        dropout_p,
        dropout_seed,
        backend,
    ) = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, *weight_tables)
    ctx.weight_scalars = weight_scalars
    ctx.config = (scaling, dropout_p, dropout_seed)
    ctx.backend = backend


def _backward(ctx, grad_y, grad_u):
    x, weight, lora_A, lora_B, u, *weight_tables = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    needs_A, needs_B = ctx.needs_input_grad[7:9]
    # cdm_fast.wgrad: inside `deferred()`, d lora_A and d lora_B go to a pending task; dx is returned now.
    deferral = wgrad.active()
    adapters = (lora_A if needs_A else None, lora_B if needs_B else None)
    if deferral is not None and deferral.wants(*adapters):
        grad_x = _deferred_backward(deferral, ctx, adapters, grad_y, x, weight, weight_tables, u, needs_x)
        return (grad_x, None, [None] * len(weight_tables), *[None] * 11)
    grad_x, grad_A, grad_B = _lora_backward_op(
        grad_y,
        x,
        weight,
        weight_tables,
        *ctx.weight_scalars,
        lora_A,
        lora_B,
        u,
        *ctx.config,
        needs_x,
        ctx.backend,
    )
    return (
        grad_x if needs_x else None,
        None,
        [None] * len(weight_tables),  # the frozen base's tables, in the inputs' structure
        None,
        None,
        None,
        None,
        grad_A if needs_A else None,
        grad_B if needs_B else None,
        None,
        None,
        None,
        None,
        None,
    )


def _deferred_backward(deferral, ctx, adapters, grad_y, x, weight, weight_tables, u, needs_x):
    """cdm_fast.wgrad's split: dx now; (d lora_A, d lora_B) submitted to `deferral` for `adapters`.

    On the Triton kernels the weight-gradient GEMMs themselves are deferred (`kernels.lora.weight_grads`);
    on the torch backend all three come from one call and only the accumulation is deferred.
    """
    lora_A, lora_B = ctx.saved_tensors[2:4]
    scaling, dropout_p, dropout_seed = ctx.config
    base = _unflatten_weight(x, weight, weight_tables, *ctx.weight_scalars)
    impl = select(OP, ctx.backend, x, base, lora_A, lora_B, None)
    split = impl.backend == "triton" or (
        impl.backend == "cuda" and _triton_supports(x, base, lora_A, lora_B, None) is None
    )
    grad_y = grad_y.contiguous()
    if not split:
        grad_x, grad_A, grad_B = impl.backward(
            grad_y, x, base, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x
        )
        deferral.submit(adapters, (grad_A, grad_B), lambda grad_A, grad_B: (grad_A, grad_B))
        return grad_x
    from cdm_fast.kernels import lora as kernels

    if needs_x:
        grad_x, v = kernels.input_grad(grad_y, base, lora_A, lora_B, scaling, dropout_p, dropout_seed)
    else:
        grad_x, v = None, kernels.lora_down(grad_y, lora_B.to(grad_y.dtype).t())

    def weight_grads(grad_y, x, u, v):
        return kernels.weight_grads(grad_y, x, u, v, lora_A, lora_B, scaling, dropout_p, dropout_seed)

    deferral.submit(adapters, (grad_y, x, u, v), weight_grads)
    return grad_x


_lora_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- torch backend (reference math, any device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dropped_input(
    x2d: torch.Tensor, dtype: torch.dtype, dropout_p: float, dropout_seed: int
) -> torch.Tensor:
    x_c = x2d.to(dtype)
    if dropout_p == 0:
        return x_c
    keep = dropout_keep(dropout_seed, *x2d.shape, dropout_p, x2d.device)
    return x_c * keep / (1 - dropout_p)


def _autocast_off(function):
    """Runs the torch backend's float32/float64 products as written, even inside an autocast region."""

    @functools.wraps(function)
    def run(*args):
        with torch.autocast(args[1].device.type, enabled=False):
            return function(*args)

    return run


def _dense(weight: torch.Tensor | Weight4bit, x: torch.Tensor) -> torch.Tensor:
    """The base weight as a dense tensor: a 4-bit one decoded and rounded to x's dtype, as the kernels do."""
    return quant.dequantize(weight, x.dtype) if isinstance(weight, Weight4bit) else weight


@_autocast_off
def _torch_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed):
    weight = _dense(weight, x)
    dtype = _compute_dtype(x)
    u = _dropped_input(x, dtype, dropout_p, dropout_seed) @ lora_A.to(dtype).T
    y = x.to(dtype) @ weight.to(dtype).T + scaling * (u @ lora_B.to(dtype).T)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype), u.to(x.dtype)


@_autocast_off
def _torch_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad):
    weight = _dense(weight, x)
    dtype = _compute_dtype(x)
    grad_c = grad_y.to(dtype)
    v = grad_c @ lora_B.to(dtype)
    grad_A = scaling * (v.T @ _dropped_input(x, dtype, dropout_p, dropout_seed))
    grad_B = scaling * (grad_c.T @ u.to(dtype))
    grad_x = None
    if needs_x_grad:
        grad_dropped = scaling * (v @ lora_A.to(dtype))
        if dropout_p > 0:
            keep = dropout_keep(dropout_seed, *x.shape, dropout_p, x.device)
            grad_dropped = grad_dropped * keep / (1 - dropout_p)
        grad_x = (grad_c @ weight.to(dtype) + grad_dropped).to(x.dtype)
    return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def _torch_supports(x, weight, lora_A, lora_B, bias):
    return None


register(
    Implementation(
        op=OP,
        backend="torch",
        forward=_torch_forward,
        backward=_torch_backward,
        supports=_torch_supports,
        tolerances={"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2},
    )
)


# ---------------------------------------------------------------- triton backend (kernels/lora.py)


def _triton_supports(x, weight, lora_A, lora_B, bias):
    base = weight.codes if isinstance(weight, Weight4bit) else weight
    reason = devices.triton_unavailable_reason(*[t for t in (x, base, lora_A, lora_B, bias) if t is not None])
    if reason is not None:
        return reason
    if x.dtype == torch.float64:
        return "float64 is served by the torch backend only"
    if lora_A.shape[0] > MAX_TRITON_RANK:
        return (
            f"rank {lora_A.shape[0]} > {MAX_TRITON_RANK} (the kernels keep (BLOCK_M, r) tiles in registers)"
        )
    return None


def _triton_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed):
    from cdm_fast.kernels import lora as kernels

    return kernels.forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed)


def _triton_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad):
    from cdm_fast.kernels import lora as kernels

    return kernels.backward(
        grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad
    )


register(
    Implementation(
        op=OP,
        backend="triton",
        forward=_triton_forward,
        backward=_triton_backward,
        supports=_triton_supports,
        tolerances={"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2},
    )
)


# ---------------------------------------------------------------- cuda backend (csrc/lora.cu)


def _cuda_supports(x, weight, lora_A, lora_B, bias):
    from cdm_fast import _extension

    if isinstance(weight, Weight4bit):
        return "a 4-bit base weight is served by the Triton kernels"
    return _extension.lora_supports(x, weight, lora_A, lora_B, bias)


def _cuda_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed):
    from cdm_fast import _extension

    return _extension.lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed)


def _cuda_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad):
    # The extension has no backward: Triton's kernels (the torch math where Triton cannot serve the case)
    # differentiate the same function with the same mask.
    backward = (
        _triton_backward if _triton_supports(x, weight, lora_A, lora_B, None) is None else _torch_backward
    )
    return backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, dropout_seed, needs_x_grad)


register(
    Implementation(
        op=OP,
        backend="cuda",
        forward=_cuda_forward,
        backward=_cuda_backward,
        supports=_cuda_supports,
        tolerances={"bfloat16": 1e-2, "float16": 1e-2},
    )
)


def _example_calls(device: torch.device) -> list[tuple[str, tuple]]:
    """One small call per activation dtype, for `cdm-fast doctor` to ask each backend about."""
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    calls = []
    for dtype in dtypes:
        x = torch.randn(64, 256, device=device, dtype=dtype)
        weight = torch.randn(192, 256, device=device, dtype=dtype)
        lora_A = torch.randn(32, 256, device=device)
        lora_B = torch.randn(192, 32, device=device)
        calls.append((str(dtype).removeprefix("torch."), (x, weight, lora_A, lora_B, None)))
    return calls


register_examples(OP, _example_calls)
