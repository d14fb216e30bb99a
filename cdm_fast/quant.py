"""bitsandbytes 4-bit weights (NF4 / FP4, QLoRA) as the kernels read them: packed codes and block scales.

Memory layout (verified bit for bit against a float64 dequantisation from the codes, and against bitsandbytes
0.50.2's `dequantize_4bit` where that is right: its torch fallback always, its CPU C kernel where blocksize
divides in (its AVX512 path misplaces blocks that cross a row end: README); its CUDA kernel uses the same
layout). The weight is (out, in), row-major;
element (row, col) has the flat index f = row · in + col, and everything below is in terms of f, never of
(row, col), so blocks and bytes run across row ends whenever in is odd or not a multiple of blocksize:

    byte     = codes[f // 2]                              codes: uint8, ceil(out · in / 2) bytes
    nibble   = byte >> 4 if f % 2 == 0 else byte & 0xF    high nibble first; the last low nibble of an odd
                                                          out · in is padding (0)
    block    = f // blocksize                             num_blocks = ceil(out · in / blocksize); the last
                                                          block may be short
    weight_f = fp32(code[nibble] · absmax_real[block])    then rounded once to the output dtype

Double quantisation (`compress_statistics=True`, Params4bit's default) stores absmax itself 8-bit, in blocks
of nested_blocksize (256) along the block index, with the mean subtracted:

    absmax_real[b] = fp32(fp32(nested_code[absmax[b]] · nested_absmax[b // nested_blocksize]) + offset)

two separately rounded fp32 operations, in that order (bitsandbytes dequantises the 8-bit absmax to fp32
with `dequantize_blockwise` and then adds `offset` in place). A kernel that wants bit-exact scales must not
let the compiler contract them into one fused multiply-add (an FMA rounds once and can differ in the last
bit). nested_code is bitsandbytes' 256-entry signed dynamic map; code is the 16 NF4 values, or the FP4
values [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12 in bit-pattern order (the
sign is the nibble's top bit). bitsandbytes dequantises with its own canonical table for the quant type and
ignores quant_state.code, so `from_bitsandbytes` refuses a quant state whose code differs from it.

bitsandbytes may store the bytes in another dtype (Params4bit's quant_storage, for FSDP); they are the same
bytes, read here as uint8.

bitsandbytes 0.50 repacks a weight in place for its AVX512-BF16 CPU GEMM: `Linear4bit.forward` in eval mode
with an input that needs no grad, on a CPU where `bitsandbytes.functional.has_avx512bf16()`, replaces the
codes and the quant state (`_convert_weight_packed_for_cpu`) and sets `quant_state.packing_format_for_cpu`:

    codes    (out, in / 2) uint8: per tile of 32 rows and per column pair, 32 bytes whose low nibbles are rows
             0-15 and high nibbles rows 16-31 (each row's two columns adjacent)
    absmax   bfloat16 (in / blocksize, out): the real scales (double quantisation resolved) rounded to bf16,
             transposed; quant_state.dtype becomes bfloat16

It needs out % 32 == 0 and in % blocksize == 0 (on other shapes the repack itself fails). `from_bitsandbytes`
reads that layout too, converting it back to the flat one above (new tensors: the repacked storage is not
shared); the bf16 scales are what bitsandbytes computes with from then on. `keep_standard_layout(module)`
stops bitsandbytes from repacking, so that a 4-bit model computes the same numbers on every x86 CPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes.functional.quantize_4bit's list

_NF4_VALUES = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
_FP4_VALUES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def code_book(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values bitsandbytes decodes a nibble of `quant_type` to (its `get_4bit_type`)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
    values = torch.tensor(_NF4_VALUES if quant_type == "nf4" else _FP4_VALUES, device=device)
    return values.div_(values.abs().max())


@dataclass(frozen=True)
class Weight4bit:
    """A bitsandbytes 4-bit weight (out, in): packed codes, per-block absmax, the 16-value code book, and
    for a double-quantised absmax its own scales (layout and formulas in the module docstring).

    codes: uint8 (ceil(out · in / 2),); absmax: float32 (num_blocks,), or uint8 when double-quantised;
    code: float32 (16,); nested_absmax: float32 (ceil(num_blocks / nested_blocksize),); nested_code: float32
    (256,); dtype: what bitsandbytes dequantises to (quant_state.dtype). All tensors on one device.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 0
    offset: float = 0.0

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device


def is_4bit(weight: object) -> bool:
    """Whether `weight` is a bitsandbytes `Params4bit`, or a uint8 tensor carrying a `quant_state`.
    Never imports bitsandbytes: if it was not imported, no Params4bit can exist."""
    if not isinstance(weight, torch.Tensor):
        return False
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    params4bit = getattr(bnb_nn, "Params4bit", None)
    if params4bit is not None and isinstance(weight, params4bit):
        return True
    return weight.dtype == torch.uint8 and getattr(weight, "quant_state", None) is not None


def from_bitsandbytes(weight: torch.Tensor) -> Weight4bit:
    """The packed 4-bit `weight` (a quantised `Params4bit`, or a uint8 tensor with a `quant_state`) as a
    `Weight4bit`, sharing its storage; a weight bitsandbytes repacked for its CPU GEMM is converted back to
    the standard layout (module docstring). Raises ValueError naming `weight` for a layout the kernels cannot
    read."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(
            "weight: expected a quantised bitsandbytes 4-bit weight with a quant_state, got "
            f"{type(weight).__name__} without one (a Params4bit is quantised by its first .to(device))"
        )
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"weight: expected quant_type in {QUANT_TYPES}, got {state.quant_type!r}")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(
            f"weight: expected a blocksize bitsandbytes allows {BLOCKSIZES}, got {state.blocksize}"
        )
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"weight: expected a 2-d (out, in) quantised shape, got {state.shape}")
    if state.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"weight: expected quant_state.dtype float16, bfloat16 or float32, got {state.dtype}"
        )
    out_features, in_features = (int(size) for size in state.shape)
    if not weight.is_contiguous():
        raise ValueError("weight: expected contiguous packed codes, got a strided view")
    code = code_book(state.quant_type, weight.device)
    if state.code is not None and not torch.equal(state.code.to(code.device, torch.float32), code):
        raise ValueError(
            f"weight: quant_state.code is not bitsandbytes' {state.quant_type} table, "
            "which bitsandbytes dequantises with"
        )
    if getattr(state, "packing_format_for_cpu", False):
        codes, absmax = _unpack_cpu_repacked(weight, state, out_features, in_features)
    else:
        codes = weight.detach().view(torch.uint8).reshape(-1)
        absmax = state.absmax.reshape(-1)
    expected_bytes = -(-out_features * in_features // 2)
    if codes.numel() != expected_bytes:
        raise ValueError(
            f"weight: expected {expected_bytes} bytes of packed codes for shape "
            f"({out_features}, {in_features}), "
            f"got {codes.numel()} ({weight.dtype}, shape {tuple(weight.shape)})"
        )
    num_blocks = -(-out_features * in_features // state.blocksize)
    nested_absmax = nested_code = None
    nested_blocksize, offset = 0, 0.0
    if state.nested:
        nested = state.state2
        if absmax.dtype != torch.uint8:
            raise ValueError(f"weight: expected a uint8 double-quantised absmax, got {absmax.dtype}")
        if nested.dtype != torch.float32:
            raise ValueError(f"weight: expected a float32 nested quant state, got {nested.dtype}")
        nested_blocksize = int(nested.blocksize)
        nested_absmax = nested.absmax.reshape(-1)
        nested_code = nested.code.reshape(-1)
        expected_nested = -(-num_blocks // nested_blocksize) if nested_blocksize > 0 else -1
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != expected_nested:
            raise ValueError(
                f"weight: expected a float32 nested absmax of {expected_nested} blocks "
                f"of {nested_blocksize}, "
                f"got {nested_absmax.dtype} ({nested_absmax.numel()},)"
            )
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(
                "weight: expected a float32 (256,) nested code, "
                f"got {nested_code.dtype} ({nested_code.numel()},)"
            )
        offset = float(state.offset)
    elif absmax.dtype != torch.float32:
        raise ValueError(f"weight: expected a float32 absmax, got {absmax.dtype}")
    if absmax.numel() != num_blocks:
        raise ValueError(
            f"weight: expected {num_blocks} absmax blocks of {state.blocksize} for shape "
            f"({out_features}, {in_features}), got {absmax.numel()}"
        )
    tables = {"absmax": absmax, "nested_absmax": nested_absmax, "nested_code": nested_code}
    for name, table in tables.items():
        if table is not None and table.device != codes.device:
            raise ValueError(
                f"weight: codes are on {codes.device} but quant_state {name} is on {table.device}"
            )
    return Weight4bit(
        codes=codes,
        absmax=absmax,
        code=code,
        blocksize=int(state.blocksize),
        shape=(out_features, in_features),
        dtype=state.dtype,
        quant_type=state.quant_type,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        nested_blocksize=nested_blocksize,
        offset=offset,
    )


CPU_REPACK_TILE_ROWS = 32  # bitsandbytes' block_n in _convert_weight_packed_for_cpu


def cpu_repackable(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes 0.50's AVX512-BF16 CPU repack can take an (out, in) weight: on other shapes it
    raises inside `Linear4bit.forward` (README)."""
    return out_features % CPU_REPACK_TILE_ROWS == 0 and in_features % blocksize == 0 and in_features % 2 == 0


def _unpack_cpu_repacked(
    weight: torch.Tensor, state, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat packed codes, float32 absmax) of a weight bitsandbytes repacked for its CPU GEMM (layout in the
    module docstring), after checking every part of that layout."""
    blocksize = int(state.blocksize)
    rows = CPU_REPACK_TILE_ROWS
    if not cpu_repackable(out_features, in_features, blocksize):
        raise ValueError(
            f"weight: a CPU-repacked weight (packing_format_for_cpu) needs out % {rows} == 0 and "
            f"in % blocksize == 0, got ({out_features}, {in_features}) with blocksize {blocksize}"
        )
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (out_features, in_features // 2):
        raise ValueError(
            f"weight: expected CPU-repacked codes uint8 ({out_features}, {in_features // 2}), "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    absmax = state.absmax
    expected_absmax = (in_features // blocksize, out_features)
    if state.nested or absmax.dtype != torch.bfloat16 or tuple(absmax.shape) != expected_absmax:
        raise ValueError(
            f"weight: expected a CPU-repacked absmax bfloat16 {expected_absmax}, not double-quantised, got "
            f"{absmax.dtype} {tuple(absmax.shape)}{' (nested)' if state.nested else ''}"
        )
    # Each 32-byte group is one (tile, column pair): low nibbles hold the tile's rows 0-15, high nibbles
    # rows 16-31, each row's two columns side by side.
    groups = weight.detach().reshape(-1, rows)
    nibbles = torch.cat([groups & 0xF, groups >> 4], dim=1)
    per_element = nibbles.reshape(out_features // rows, in_features // 2, rows, 2).transpose(1, 2).reshape(-1)
    codes = (per_element[0::2] << 4) | per_element[1::2]
    # (in / blocksize, out) transposed back is (out, in / blocksize) row-major: the flat block order.
    return codes, absmax.t().reshape(-1).float()


def keep_standard_layout(module: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking the 4-bit weights of `module`'s `Linear4bit` layers for its
    AVX512-BF16 CPU GEMM (module docstring), so they keep their float32 scales and the model computes the same
    numbers on every x86 CPU. Returns how many layers it set; a weight already repacked stays repacked
    (`from_bitsandbytes` reads it)."""
    linear4bit = getattr(sys.modules.get("bitsandbytes.nn"), "Linear4bit", None)
    layers = [m for m in module.modules() if linear4bit is not None and isinstance(m, linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def dequantize_absmax(w: Weight4bit) -> torch.Tensor:
    """The real per-block scales, float32 (num_blocks,): `w.absmax` itself, or the double quantisation
    resolved as bitsandbytes does it (multiply, then add offset, each rounded to fp32)."""
    if not w.double_quant:
        return w.absmax
    nested_block = torch.arange(w.absmax.numel(), device=w.device) // w.nested_blocksize
    scaled = w.nested_code[w.absmax.long()] * w.nested_absmax[nested_block]
    return scaled + w.offset


def dequantize(w: Weight4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out, in) weight in `dtype` (default `w.dtype`), equal bit for bit to
    `bitsandbytes.functional.dequantize_4bit`: fp32 code · absmax, rounded once to `dtype`."""
    flat = torch.arange(w.numel, device=w.device)
    packed = w.codes[flat // 2]
    nibble = torch.where(flat % 2 == 0, packed >> 4, packed & 0xF)
    values = w.code[nibble.long()] * dequantize_absmax(w)[flat // w.blocksize]
    return values.to(dtype or w.dtype).reshape(w.shape)
