"""Pieces every Triton kernel of the package shares: the L2-grouped tile order, shared-memory pruning of
autotune configs, and the casts and the dot that must also compute correctly under the CPU interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from cdm_fast import device as devices

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`, walking GROUP_M tile rows column by column.

    Programs that run together then share a few A row-panels and B column-panels, so the operands are
    read from L2 rather than DRAM (the Triton matmul tutorial's swizzle).
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _round_to_e4m3_grid(value):
    # The interpreter's fp32 -> fp8 cast truncates the mantissa and drops the carry of the rounding
    # (1.94 -> 1.0, not 2.0). Rounding here, exactly, leaves it only representable values to cast.
    # e4m3 keeps 3 mantissa bits, so the grid spacing is 2^(e - 3), with e clamped at the smallest normal
    # exponent -6 (subnormals are evenly spaced by 2^-9). Scaling by powers of two is exact, and adding
    # 1.5 * 2^23 rounds a value below 2^22 to an integer, half to even, in fp32.
    bits = value.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    inverse_spacing = ((127 + 3 - exponent) << 23).to(tl.float32, bitcast=True)
    spacing = ((127 - 3 + exponent) << 23).to(tl.float32, bitcast=True)
    steps = (tl.abs(value) * inverse_spacing + 12582912.0) - 12582912.0
    magnitude = steps * spacing
    return tl.where(bits < 0, -magnitude, magnitude)


@triton.jit
def to_e4m3(value, INTERPRET: tl.constexpr):
    """fp32 -> float8e4nv, round to nearest even, saturating at +-448 (as torch's clamp + cast)."""
    value = tl.minimum(tl.maximum(value, -E4M3_MAX), E4M3_MAX)
    if INTERPRET:
        value = _round_to_e4m3_grid(value)
    return value.to(tl.float8e4nv)


@triton.jit
def cast(value, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """value.to(dtype), rounding to nearest even as the GPU does."""
    if INTERPRET and dtype == tl.bfloat16 and value.dtype == tl.float32:
        # The interpreter's fp32 -> bf16 cast truncates (a bias every sum of stored values inherits):
        # round the 16 dropped bits half to even first, so that the cast drops zeros.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def dot_in_dtype(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with b cast to a's dtype, fp32 accumulation."""
    b = cast(b, a.dtype, INTERPRET)
    if INTERPRET and a.dtype == tl.bfloat16:
        # The interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 holds bf16 values exactly.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, num_rows, num_cols, other):
    """The (rows × cols) tile of a strided matrix, `other` outside it; int64 offsets for tensors over 2^31."""
    offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    return tl.load(ptr + offsets, mask=(rows[:, None] < num_rows) & (cols[None, :] < num_cols), other=other)


@triton.jit
def store_tile(ptr, value, rows, cols, stride_row, stride_col, num_rows, num_cols, INTERPRET: tl.constexpr):
    """Stores the (rows × cols) tile, cast to the pointer's dtype; elements outside the matrix are dropped."""
    offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    tl.store(
        ptr + offsets,
        cast(value, ptr.dtype.element_ty, INTERPRET),
        mask=(rows[:, None] < num_rows) & (cols[None, :] < num_cols),
    )


@triton.jit
def hash32(x):
    """A 32-bit integer mix with good avalanche (Wellons' lowbias32) on uint32; `cdm_fast.ops.lora.hash32`
    computes the same function in torch."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """The (rows × cols) keep mask of counter-based dropout: hash32(hash32(row ^ seed) + col) >> 8 ≥ threshold

    Element (i, j) depends on (seed, i, j) only, so backward regenerates any tile instead of storing a mask;
    `cdm_fast.ops.lora.dropout_keep` is the torch definition it must match bit for bit.
    """
    row_key = hash32(rows.to(tl.uint32) ^ seed.to(tl.uint32))
    bits = hash32(row_key[:, None] + cols.to(tl.uint32)[None, :])
    return (bits >> 8) >= threshold


@triton.jit
def load_4bit_tile(
    codes_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    blocksize,
    nested_blocksize,
    rows,
    cols,
    stride_row,
    stride_col,
    num_rows,
    num_cols,
    DOUBLE_QUANT: tl.constexpr,
):
    """The (rows × cols) tile, in fp32, of a bitsandbytes 4-bit matrix, 0 outside it (`cdm_fast.quant`).

    Strides are those of the dense row-major (out, in) weight the codes stand for, so a transposed view is a
    swap of strides. Element f of the flat weight is nibble f % 2 (high first) of byte f // 2, its value
    code[nibble] · absmax[f // blocksize]; a double-quantised absmax is itself
    nested_code[absmax byte] · nested_absmax[block // nested_blocksize] + offset. Every lookup is a gather
    from a table of 16 or 256 entries (cache-resident), and nothing dequantised is written to memory.
    """
    flat = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    packed = tl.load(codes_ptr + flat // 2, mask=inside, other=0)
    nibble = tl.where(flat % 2 == 0, packed >> 4, packed & 0xF)
    value = tl.load(code_ptr + nibble)
    block = flat // blocksize
    if DOUBLE_QUANT:
        absmax_byte = tl.load(absmax_ptr + block, mask=inside, other=0)
        nested = tl.load(nested_absmax_ptr + block // nested_blocksize, mask=inside, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_byte) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return tl.where(inside, value * scale, 0.0)


def autotune_configs(configs: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune candidates for this session: one small config under the interpreter, where timing
    candidates would take minutes and measure nothing."""
    return [interpreter] if devices.triton_interpret() else configs


def _pipelined_copies(num_stages: int, capability: tuple[int, int] | None) -> int:
    # Measured with triton.compile: the wgmma pipeline (sm_90, sm_100) keeps num_stages operand tiles in
    # shared memory, the mma.sync/cp.async pipeline (sm_80, sm_89, sm_120) num_stages - 1.
    if capability is None or capability[0] in (9, 10):
        return num_stages
    return max(num_stages - 1, 1)


def prune_by_shared_memory(
    stage_bytes: Callable[[dict[str, Any], dict[str, Any]], int],
    resident_bytes: Callable[[dict[str, Any], dict[str, Any]], int] | None = None,
) -> Callable[..., list[triton.Config]]:
    """An `early_config_prune` keeping the configs whose pipelined tiles fit the device's shared memory.

    `stage_bytes(meta, args)` is the shared memory of one pipeline stage of a config (meta: the config's
    constexprs; args: the kernel's arguments by name); `resident_bytes(meta, args)`, if given, what the
    kernel keeps once whatever the depth (an attention program's q tile). When nothing fits, the smallest
    config is kept.
    """

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
        limit = devices.shared_memory_limit(device)
        capability = devices.capability(device)

        def shared_bytes(config: triton.Config) -> int:
            resident = resident_bytes(config.kwargs, args) if resident_bytes else 0
            return resident + _pipelined_copies(config.num_stages, capability) * stage_bytes(
                config.kwargs, args
            )

        fitting = [c for c in configs if shared_bytes(c) <= limit]
        return fitting or [min(configs, key=shared_bytes)]

    return prune
