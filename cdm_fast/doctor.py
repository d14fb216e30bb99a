"""`cdm-fast doctor`: versions, the device, and which backend serves each op here (and why not the others)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from cdm_fast import device as devices
from cdm_fast.dispatch import EXAMPLE_CALLS, BackendUnavailable, implementations, select


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def report() -> dict:
    """Everything doctor prints, as a JSON-able dict."""
    import cdm_fast.ops.projection  # noqa: F401  (registers the op)
    from cdm_fast import _extension

    triton_version = None
    if devices.triton_available():
        import triton

        triton_version = triton.__version__
    info = devices.device_info()
    device = torch.device("cuda") if info else torch.device("cpu")
    ops = {}
    for op, factory in sorted(EXAMPLE_CALLS.items()):
        cases = {}
        for label, args in factory(device):
            backends = {impl.backend: impl.supports(*args) or "ok" for impl in implementations(op)}
            try:
                chosen = select(op, "auto", *args).backend
            except BackendUnavailable as error:
                chosen = f"none ({error})"
            cases[label] = {"auto": chosen, "backends": backends}
        ops[op] = cases
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": devices.triton_interpret(),
        "nvcc": _nvcc_version(),
        "extension": _extension.status(),
        "device": None
        if info is None
        else {
            "name": info.name,
            "capability": f"{info.capability[0]}.{info.capability[1]}",
            "multiprocessors": info.multiprocessors,
            "shared_memory_per_block": info.shared_memory_per_block,
            "l2_cache_bytes": info.l2_cache_bytes,
            "total_memory_bytes": info.total_memory_bytes,
        },
        "example_device": str(device),
        "ops": ops,
    }


def format_report(data: dict) -> str:
    lines = [
        f"python {data['python']}  torch {data['torch']} (CUDA {data['torch_cuda']})  "
        f"triton {data['triton']}  nvcc: {data['nvcc']}",
        f"extension: {data['extension']}",
    ]
    dev = data["device"]
    if dev is None:
        lines.append(
            "device: no CUDA device (ops run on the CPU"
            + ("; Triton kernels in the interpreter)" if data["triton_interpret"] else ")")
        )
    else:
        lines.append(
            f"device: {dev['name']}  sm_{dev['capability'].replace('.', '')}  {dev['multiprocessors']} SMs  "
            f"smem/block {dev['shared_memory_per_block']:,} B  L2 {dev['l2_cache_bytes'] / 2**20:.1f} MiB"
        )
    lines.append(f"backends for example calls on {data['example_device']}:")
    for op, cases in data["ops"].items():
        for label, case in cases.items():
            lines.append(f"  {op} [{label}] -> {case['auto']}")
            for backend, status in case["backends"].items():
                lines.append(f"      {backend:<7} {status}")
    return "\n".join(lines)
