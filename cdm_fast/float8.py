"""FP8 (e4m3) scaling recipes, as plain torch: the definition every kernel's quantisation must match.

Two granularities, chosen per device:
- "rowwise": one fp32 scale per row of the left operand and per column of the right one,
  scale = amax / 448, q = e4m3(t / scale). Serves `tl.dot` / `mma.sync ... e4m3` (sm_89, sm_90).
- "mx": one power-of-two ue8m0 scale per 32 consecutive elements along the reduction dim (OCP MX),
  exponent = ceil(log2(amax / 448)) so no element saturates. Serves the full-rate block-scaled MMA
  on sm_120 (`kind::mxf8f6f4.block_scale`, Triton `tl.dot_scaled`) and is the more accurate recipe.

Sin/cos features lie in [-1, 1] and need no amax pass: they are stored as e4m3(256 * f) under both
recipes (256 <= 448, and a power of two, so the same constant is a valid ue8m0 block scale).
"""

from __future__ import annotations

from typing import Literal

import torch

E4M3_MAX = 448.0
MX_BLOCK = 32
UE8M0_BIAS = 127
FEATURE_SCALE_EXPONENT = 8
FEATURE_SCALE = 2.0**FEATURE_SCALE_EXPONENT

Float8Scaling = Literal["rowwise", "mx"]
FLOAT8_SCALINGS: tuple[str, ...] = ("rowwise", "mx")


def default_scaling(device: torch.device) -> Float8Scaling:
    """MX block scaling where the hardware runs it at full rate (sm_120+), row-wise elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10:
        return "mx"
    return "rowwise"


def quantize_rowwise(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `t` and fp32 scales with one scale per slice along `dim` (amax taken along `dim`).

    Returns (codes like t, scales with `dim` kept as size 1); t ≈ codes.float() * scales.
    """
    t32 = t.float()
    amax = t32.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def mx_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(amax / 448)) from the fp32 bits, exactly as the kernels compute it; in [-127, 127]."""
    ratio = (amax.float() / E4M3_MAX).contiguous()
    bits = ratio.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    exponent = biased - UE8M0_BIAS + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    exponent = torch.where(biased == 0, torch.full_like(exponent, -UE8M0_BIAS), exponent)
    return exponent.clamp(-UE8M0_BIAS, UE8M0_BIAS)


def quantize_mx(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `t` and ue8m0 scales (uint8, biased exponent), one per 32 elements along `dim`.

    Returns (codes like t, scales shaped like t with `dim` replaced by ceil(size/32)); a tail block
    shorter than 32 is scaled by its own amax.
    """
    dim = dim % t.dim()
    size = t.shape[dim]
    blocks = -(-size // MX_BLOCK)
    t32 = t.float().movedim(dim, -1)
    padded = torch.nn.functional.pad(t32, (0, blocks * MX_BLOCK - size))
    grouped = padded.reshape(*padded.shape[:-1], blocks, MX_BLOCK)
    exponent = mx_scale_exponent(grouped.abs().amax(dim=-1))
    scaled = grouped * torch.exp2(-exponent.float()).unsqueeze(-1)
    codes = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = codes.reshape(padded.shape)[..., :size].movedim(-1, dim)
    scales = (exponent + UE8M0_BIAS).to(torch.uint8).movedim(-1, dim)
    return codes, scales


def dequantize_rowwise(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype)


def dequantize_mx(codes: torch.Tensor, scales: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    dim = dim % codes.dim()
    factor = torch.exp2(scales.to(dtype) - UE8M0_BIAS).repeat_interleave(MX_BLOCK, dim=dim)
    return codes.to(dtype) * factor.narrow(dim, 0, codes.shape[dim])


def fake_quantize(t: torch.Tensor, dim: int, scaling: Float8Scaling, dtype: torch.dtype) -> torch.Tensor:
    """t rounded through e4m3 under `scaling` (reduction along `dim`), returned in `dtype`."""
    if scaling == "rowwise":
        return dequantize_rowwise(*quantize_rowwise(t, dim), dtype)
    return dequantize_mx(*quantize_mx(t, dim), dim, dtype)


def fake_quantize_features(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sin/cos features in [-1, 1] rounded through e4m3 with the fixed scale 2**8."""
    return (features * FEATURE_SCALE).to(torch.float8_e4m3fn).to(dtype) / FEATURE_SCALE
