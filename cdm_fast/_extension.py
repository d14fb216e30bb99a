"""The compiled CUDA extension `cdm_fast._C`, seen from torch.

`_C` (csrc/) takes device addresses, sizes, strides and the CUDA stream as ints and never links torch; this
module is its torch side. It says whether the extension can serve a device (`unavailable_reason`), a
projection call (`projection_supports`) and a LoRA call (`lora_supports`), and wraps the kernels: outputs
are allocated with torch on the inputs' device and every launch goes to `torch.cuda.current_stream(device)`.

Layouts, chosen so that both GEMM operands are read along the reduction dim (K):
- codes: e4m3, stored (slices, K) with K contiguous; `quantize_*` return them as views shaped like the input.
- "rowwise" scales: float32, one per slice.
- "mx" scales: ue8m0 bytes, one per 32 of K, stored block-major (ceil(K / 32), round_up(slices, 16)) so that
  a GEMM tile's scales are 16-byte runs; `quantize_mx` returns them as a view shaped like
  `cdm_fast.float8.quantize_mx`'s.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from types import ModuleType
from typing import NamedTuple

import torch

from cdm_fast.float8 import MX_BLOCK, Float8Scaling

# d_in, m and d_out must be multiples of this (16-byte rows of codes for cp.async, whole element pairs in the
# epilogues); the number of rows N is free.
SIZE_MULTIPLE = 16
_SCALES_LD_MULTIPLE = 16
_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
_PARAMETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    if importlib.util.find_spec("cdm_fast._C") is None:
        return None, "cdm_fast._C is not built (no CUDA compiler at install time, or CDM_FAST_NO_CUDA=1)"
    try:
        return importlib.import_module("cdm_fast._C"), None
    except ImportError as error:
        return None, f"cdm_fast._C is built but does not import: {error}"


def load() -> ModuleType | None:
    """The `cdm_fast._C` module, or None when it was not built or does not import (cached)."""
    return _load()[0]


def status() -> str:
    """One line for `cdm-fast doctor`: what the extension was built for and with, or why it is absent."""
    module, reason = _load()
    if module is None:
        return reason
    archs = ", ".join(f"sm_{arch}" for arch in module.built_archs())
    runtime = _cuda_version(module.cuda_runtime_version())
    driver = module.cuda_driver_version()
    driver_text = f"driver supports CUDA {_cuda_version(driver)}" if driver else "no driver"
    return f"cdm_fast._C {module.version()} for {archs}, CUDA {runtime} runtime (static); {driver_text}"


def _parse_arch(arch: str) -> tuple[tuple[int, int], str]:
    """'120a' -> ((12, 0), 'a'); '89' -> ((8, 9), '')."""
    match = re.fullmatch(r"(\d+)(\d)([af]?)", arch)
    if match is None:
        raise ValueError(f"arch: expected a compute capability like '89' or '120a', got {arch!r}")
    return (int(match[1]), int(match[2])), match[3]


def _serves(arch: str, capability: tuple[int, int], with_ptx: bool) -> bool:
    """Whether code built for `arch` runs on a device of `capability`.

    SASS runs on the same major and an equal or later minor; 'a' (arch-specific) SASS and PTX only on that
    exact capability; plain PTX (the highest target's) is JIT-compiled for any later device.
    """
    (major, minor), suffix = _parse_arch(arch)
    if suffix == "a":
        return capability == (major, minor)
    same_family = capability[0] == major and capability[1] >= minor
    return same_family or (with_ptx and suffix == "" and capability >= (major, minor))


def _serving_archs(archs: list[str], capability: tuple[int, int]) -> list[str]:
    highest = max(archs, key=lambda arch: _parse_arch(arch)[0])
    return [arch for arch in archs if _serves(arch, capability, with_ptx=arch == highest)]


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def unavailable_reason(device: torch.device) -> str | None:
    """None when `cdm_fast._C` is built with code for `device`, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"tensors are on {device.type}; the CUDA extension needs CUDA tensors"
    module, reason = _load()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    runtime, driver = module.cuda_runtime_version(), module.cuda_driver_version()
    if driver // 1000 < runtime // 1000:
        return (
            f"cdm_fast._C links the CUDA {_cuda_version(runtime)} runtime, the driver supports CUDA "
            f"{_cuda_version(driver)}: update the driver or build with an older CUDA toolkit"
        )
    capability = torch.cuda.get_device_capability(device)
    archs = module.built_archs()
    if not _serving_archs(archs, capability):
        return f"built for {', '.join(f'sm_{a}' for a in archs)}; this device is {_sm(capability)}"
    return None


def _mx_unavailable_reason(capability: tuple[int, int]) -> str | None:
    if capability[0] != 12:
        return (
            "fp8_scaling='mx' needs the block-scaled mma.sync of compute capability 12.x, "
            f"this device is {_sm(capability)}"
        )
    archs = load().built_archs()
    if not any(_parse_arch(a)[1] for a in _serving_archs(archs, capability)):
        return (
            f"fp8_scaling='mx' needs an arch-specific build (e.g. CDM_FAST_CUDA_ARCHS=120a) for "
            f"{_sm(capability)}; built for {', '.join(f'sm_{a}' for a in archs)}"
        )
    return None


def projection_supports(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    fp8_scaling: str,
) -> str | None:
    """Capability gate of the CUDA projection: None when `projection_forward_fp8` serves this call, else why.

    Serves precision "fp8" only, x in float16/bfloat16 (y comes out in x's dtype), freqs/weight/bias in
    float16/bfloat16/float32, compute capability >= 8.9 ("mx" on 12.x with an arch-specific build),
    d_in, m and d_out multiples of 16.
    """
    for t in (x, freqs, weight, bias):
        if t is not None and t.device.type != "cuda":
            return unavailable_reason(t.device)
    reason = unavailable_reason(x.device)
    if reason is not None:
        return reason
    if precision != "fp8":
        return f"the CUDA extension implements precision 'fp8' only, got {precision!r}"
    if x.dtype not in _ACTIVATION_DTYPES:
        return f"x: the CUDA kernels take float16 or bfloat16, got {x.dtype}"
    for name, t in (("freqs", freqs), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _PARAMETER_DTYPES:
            return f"{name}: the CUDA kernels take float16, bfloat16 or float32, got {t.dtype}"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 9):
        return f"fp8 mma.sync needs compute capability >= 8.9, this device is {_sm(capability)}"
    if fp8_scaling == "mx":
        reason = _mx_unavailable_reason(capability)
        if reason is not None:
            return reason
    elif fp8_scaling != "rowwise":
        return f"fp8_scaling: expected 'rowwise' or 'mx', got {fp8_scaling!r}"
    d_in, m, d_out = freqs.shape[0], freqs.shape[1], weight.shape[1]
    if any(size == 0 or size % SIZE_MULTIPLE for size in (d_in, m, d_out)):
        return (
            f"the CUDA kernels need d_in, m and d_out to be positive multiples of {SIZE_MULTIPLE}, "
            f"got d_in={d_in}, m={m}, d_out={d_out}"
        )
    if x.numel() // d_in >= 2**31:
        return f"the CUDA kernels take fewer than 2**31 rows, got {x.numel() // d_in}"
    return None


class _Quantized(NamedTuple):
    codes: torch.Tensor  # (slices, K) e4m3, K contiguous
    scales: torch.Tensor  # rowwise: (slices,) float32; mx: (ceil(K / 32), scales_ld) uint8
    scales_ld: int


def _module() -> ModuleType:
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _quantize(t: torch.Tensor, dim: int, scaling: Float8Scaling) -> _Quantized:
    """Quantise a 2-D CUDA tensor along `dim` (the reduction dim) into the GEMM layouts."""
    if t.dim() != 2:
        raise ValueError(f"t: expected a 2-D tensor, got shape {tuple(t.shape)}")
    dim = dim % 2
    slices, k = t.shape[1 - dim], t.shape[dim]
    codes = torch.empty((slices, k), dtype=torch.float8_e4m3fn, device=t.device)
    common = dict(
        src=t.data_ptr(),
        dtype=str(t.dtype).removeprefix("torch."),
        outer=slices,
        inner=k,
        stride_outer=t.stride(1 - dim),
        stride_inner=t.stride(dim),
        codes=codes.data_ptr(),
        stream=_stream(t.device),
    )
    with torch.cuda.device(t.device):
        if scaling == "mx":
            scales_ld = -(-slices // _SCALES_LD_MULTIPLE) * _SCALES_LD_MULTIPLE
            scales = torch.empty((-(-k // MX_BLOCK), scales_ld), dtype=torch.uint8, device=t.device)
            _module().quantize_mx(scales=scales.data_ptr(), scales_ld=scales_ld, **common)
            return _Quantized(codes, scales, scales_ld)
        scales = torch.empty(slices, dtype=torch.float32, device=t.device)
        _module().quantize_rowwise(scales=scales.data_ptr(), **common)
        return _Quantized(codes, scales, 0)


def quantize_rowwise(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cdm_fast.float8.quantize_rowwise(t, dim)` for a 2-D CUDA float16/bfloat16/float32 tensor, any strides.

    Returns (codes float8_e4m3fn shaped like t, float32 scales with `dim` kept as size 1); the codes are
    stored with `dim` contiguous.
    """
    q = _quantize(t, dim, "rowwise")
    codes = q.codes if dim % 2 == 1 else q.codes.t()
    return codes, q.scales.unsqueeze(dim)


def quantize_mx(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cdm_fast.float8.quantize_mx(t, dim)` for a 2-D CUDA float16/bfloat16/float32 tensor, any strides.

    Returns (codes float8_e4m3fn shaped like t, uint8 ue8m0 scales shaped like t with `dim` replaced by
    ceil(size / 32)); both are views of the block-major GEMM layouts.
    """
    q = _quantize(t, dim, "mx")
    slices = q.codes.shape[0]
    scales = q.scales[:, :slices]
    return (q.codes, scales.t()) if dim % 2 == 1 else (q.codes.t(), scales)


def projection_forward_fp8(
    x: torch.Tensor,
    freqs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fp8_scaling: Float8Scaling,
) -> torch.Tensor:
    """y = `reference(x, freqs, weight, bias, precision="fp8", fp8_scaling=...)` on the CUDA kernels.

    x (N, d_in) float16/bfloat16, freqs (d_in, m), weight (2m, d_out), bias (d_out,) or None; call
    `projection_supports` first. Quantises x per row and freqs/weight per column (or per 32 along d_in / 2m
    for "mx"), runs GEMM1 with the sin/cos epilogue into e4m3 features (N, 2m) and GEMM2 with the scale and
    bias epilogue. Returns y (N, d_out) in x.dtype.
    """
    module = _module()
    n = x.shape[0]
    m, d_out = freqs.shape[1], weight.shape[1]
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    mx = fp8_scaling == "mx"
    x_q = _quantize(x, 1, fp8_scaling)
    freqs_q = _quantize(freqs, 0, fp8_scaling)
    weight_q = _quantize(weight, 0, fp8_scaling)
    features = torch.empty((n, 2 * m), dtype=torch.float8_e4m3fn, device=x.device)
    bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
    shapes = dict(n=n, m=m, stream=_stream(x.device))
    with torch.cuda.device(x.device):
        if mx:
            module.projection_features_mxfp8(
                x_codes=x_q.codes.data_ptr(),
                x_scales=x_q.scales.data_ptr(),
                x_scales_ld=x_q.scales_ld,
                freq_codes=freqs_q.codes.data_ptr(),
                freq_scales=freqs_q.scales.data_ptr(),
                freq_scales_ld=freqs_q.scales_ld,
                features=features.data_ptr(),
                d_in=freqs.shape[0],
                **shapes,
            )
        else:
            module.projection_features_fp8(
                x_codes=x_q.codes.data_ptr(),
                x_scales=x_q.scales.data_ptr(),
                freq_codes=freqs_q.codes.data_ptr(),
                freq_scales=freqs_q.scales.data_ptr(),
                features=features.data_ptr(),
                d_in=freqs.shape[0],
                **shapes,
            )
        output = dict(
            features=features.data_ptr(),
            weight_codes=weight_q.codes.data_ptr(),
            weight_scales=weight_q.scales.data_ptr(),
            bias=bias32.data_ptr() if bias32 is not None else 0,
            y=y.data_ptr(),
            y_dtype=str(y.dtype).removeprefix("torch."),
            d_out=d_out,
            y_row_stride=y.stride(0),
            **shapes,
        )
        if mx:
            module.projection_output_mxfp8(weight_scales_ld=weight_q.scales_ld, **output)
        else:
            module.projection_output_fp8(**output)
    return y


# ---------------------------------------------------------------------------------------------------- LoRA
# x and weight rows are copied in 16-byte cp.async chunks: 8 elements of float16/bfloat16.
LORA_CHUNK_ELEMENTS = 8
_LORA_ALIGNMENT_BYTES = 16


def lora_supports(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
) -> str | None:
    """Capability gate of the CUDA LoRA forward: None when `lora_forward` serves this call, else why.

    Serves x (M, in) float16/bfloat16 with unit column stride, a row stride that is a multiple of 8 and a
    16-byte aligned start; weight (out, in) in x's dtype, laid out the same way; lora_A, lora_B and bias in
    any float dtype (cast to x's dtype); rank ≤ `lora_max_rank()`; in_features a multiple of 8.
    """
    tensors = [t for t in (x, weight, lora_A, lora_B, bias) if t is not None]
    for t in tensors:
        if t.device.type != "cuda":
            return unavailable_reason(t.device)
    reason = unavailable_reason(x.device)
    if reason is not None:
        return reason
    if any(t.device != x.device for t in tensors):
        return "the CUDA kernel needs every tensor on x's device"
    if x.dtype not in _ACTIVATION_DTYPES:
        return f"x: the CUDA kernel takes float16 or bfloat16, got {x.dtype}"
    if weight.dtype != x.dtype:
        return f"weight: the CUDA kernel reads weight in x's dtype ({x.dtype}), got {weight.dtype}"
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype not in _PARAMETER_DTYPES:
            return f"{name}: the CUDA kernel takes float16, bfloat16 or float32, got {t.dtype}"
    if x.dim() != 2 or weight.dim() != 2:
        return f"x, weight: the CUDA kernel takes 2-D x and weight, got {x.dim()}-D and {weight.dim()}-D"
    module = load()
    if not hasattr(module, "lora_forward"):
        return "cdm_fast._C was built without the LoRA kernel (csrc/lora.cu): rebuild the extension"
    in_features, out_features, rank = x.shape[1], weight.shape[0], lora_A.shape[0]
    max_rank = module.lora_max_rank()
    if rank > max_rank:
        return f"rank {rank} > {max_rank} (the CUDA kernel keeps u tiles of up to {max_rank} columns on chip)"
    if in_features % LORA_CHUNK_ELEMENTS:
        return (
            f"in_features must be a multiple of {LORA_CHUNK_ELEMENTS} for 16-byte cp.async, got {in_features}"
        )
    if out_features == 0:
        return "out_features must be ≥ 1"
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1 or t.stride(0) % LORA_CHUNK_ELEMENTS:
            return (
                f"{name}: the CUDA kernel needs unit column stride and a row stride that is a multiple of "
                f"{LORA_CHUNK_ELEMENTS} (16-byte cp.async rows), got strides {tuple(t.stride())}"
            )
        if t.data_ptr() % _LORA_ALIGNMENT_BYTES:
            return f"{name}: the CUDA kernel needs a {_LORA_ALIGNMENT_BYTES}-byte aligned start for cp.async"
    if max(x.shape[0], out_features, in_features) >= 2**31:
        return (
            f"the CUDA kernel takes sizes below 2**31, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    return None


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u) of `cdm_fast.ops.lora` on the fused CUDA kernel (csrc/lora.cu); call `lora_supports` first.

    x (M, in) float16/bfloat16, weight (out, in) in x's dtype, lora_A (r, in), lora_B (out, r), bias (out,) or
    None; lora_A, lora_B and bias are cast to x's dtype. dropout_p > 0 applies the counter-based mask of
    `cdm_fast.ops.lora.dropout_keep(dropout_seed, ...)` to x's contribution to u, scaled by 1 / (1 - p).
    Returns y = x @ weightᵀ + bias + scaling · u @ lora_Bᵀ (M, out) and u = dropout(x) @ lora_Aᵀ (M, r),
    both in x.dtype; u is computed in fp32 and rounded once, and that rounded u enters y.
    """
    from cdm_fast.ops.lora import drop_threshold

    module = _module()
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 ≤ p < 1, got {dropout_p}")
    m, in_features = x.shape
    out_features, rank = weight.shape[0], lora_A.shape[0]
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    u = torch.empty((m, rank), dtype=x.dtype, device=x.device)
    if m == 0:
        return y, u
    lora_A = lora_A.to(x.dtype).contiguous()
    # lora_B rows padded with zeros to a multiple of 8 elements: 16-byte cp.async rows for any r.
    padded_rank = -(-rank // LORA_CHUNK_ELEMENTS) * LORA_CHUNK_ELEMENTS
    if padded_rank == rank:
        lora_B = lora_B.to(x.dtype).contiguous()
    else:
        padded = torch.zeros((out_features, padded_rank), dtype=x.dtype, device=x.device)
        padded[:, :rank] = lora_B
        lora_B = padded
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    with torch.cuda.device(x.device):
        module.lora_forward(
            x=x.data_ptr(),
            x_row_stride=x.stride(0),
            weight=weight.data_ptr(),
            weight_row_stride=weight.stride(0),
            lora_a=lora_A.data_ptr(),
            lora_b=lora_B.data_ptr(),
            lora_b_row_stride=lora_B.stride(0),
            bias=bias.data_ptr() if bias is not None else 0,
            y=y.data_ptr(),
            u=u.data_ptr(),
            dtype=str(x.dtype).removeprefix("torch."),
            m=m,
            n=out_features,
            k=in_features,
            rank=rank,
            scaling=float(scaling),
            dropout_p=float(dropout_p),
            dropout_threshold=drop_threshold(dropout_p) if dropout_p > 0 else 0,
            dropout_seed=int(dropout_seed) & 0xFFFFFFFF,
            stream=_stream(x.device),
        )
    return y, u
