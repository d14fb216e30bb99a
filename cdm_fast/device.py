"""What this machine offers the kernels: Triton, the interpreter, compute capability, shared memory, L2.

Capability gates in the registry and `cdm-fast doctor` both ask these functions, so the reasons they
print are the same.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

# Largest dynamic shared memory one block may opt into, by compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"). Used for autotune pruning and the AOT check when no
# device is present to ask.
MAX_SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 166_912,
    (8, 6): 101_376,
    (8, 9): 101_376,
    (9, 0): 232_448,
    (10, 0): 232_448,
    (12, 0): 101_376,
}


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """None when Triton can run on these tensors, else why not."""
    if not triton_available():
        return "triton is not installed"
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"} and triton_interpret():
        return None
    if devices == {"cpu"}:
        return "CPU tensors need TRITON_INTERPRET=1 for Triton kernels"
    return f"tensors on {sorted(devices)}; Triton kernels need CUDA tensors"


def capability(device: torch.device | None = None) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None for CPU tensors / no GPU."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    capability: tuple[int, int]
    multiprocessors: int
    shared_memory_per_block: int
    l2_cache_bytes: int
    total_memory_bytes: int


def device_info(device: torch.device | int | None = None) -> DeviceInfo | None:
    """Properties the kernels are tuned by, read from the device (never hard-coded), or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    cc = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or MAX_SHARED_MEMORY_PER_BLOCK.get(cc, 49_152)
    return DeviceInfo(
        name=props.name,
        capability=cc,
        multiprocessors=props.multi_processor_count,
        shared_memory_per_block=int(smem),
        l2_cache_bytes=int(getattr(props, "L2_cache_size", 0)),
        total_memory_bytes=int(props.total_memory),
    )


def shared_memory_limit(device: torch.device | None = None) -> int:
    """Opt-in shared memory per block for autotune pruning; the interpreter has no limit that matters."""
    info = device_info(device) if device is not None and device.type == "cuda" else None
    return info.shared_memory_per_block if info else MAX_SHARED_MEMORY_PER_BLOCK[(12, 0)]


def multiprocessor_count(device: torch.device | None = None) -> int:
    """SMs to fill with programs; 2 elsewhere (the interpreter runs programs one by one anyway)."""
    info = device_info(device) if device is not None and device.type == "cuda" else None
    return info.multiprocessors if info else 2
