"""Shared test helpers: one relative-error measure, output poisoning, device selection."""

from __future__ import annotations

import pytest
import torch

from cdm_fast import device as devices


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere counts as infinite error."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a preallocated output with NaN so that any element a kernel forgets to write fails the check."""
    return t.fill_(float("nan"))


def kernel_device() -> torch.device | None:
    """Where Triton kernels can run in this session: CUDA, the CPU under TRITON_INTERPRET=1, or nowhere."""
    if torch.cuda.is_available() and not devices.triton_interpret():
        return torch.device("cuda")
    if devices.triton_interpret() and devices.triton_available():
        return torch.device("cpu")
    return None


def backend_device(backend: str) -> torch.device | None:
    """Where a backend runs here: torch on the CPU, Triton where `kernel_device` says, cuda on CUDA."""
    if backend == "torch":
        return torch.device("cpu")
    if backend == "triton":
        return kernel_device()
    return torch.device("cuda") if torch.cuda.is_available() else None


def backend_fixture(op: str):
    """A fixture over each registered backend of `op`, skipped where this session cannot run it."""
    from cdm_fast.dispatch import implementations

    @pytest.fixture(params=implementations(op), ids=lambda impl: impl.backend)
    def impl(request):
        if backend_device(request.param.backend) is None:
            pytest.skip(f"no device for the {request.param.backend} backend in this session")
        return request.param

    return impl


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def float64(*tensors):
    """CPU float64 copies (None stays None), for references."""
    return [t.detach().double().cpu() if t is not None else None for t in tensors]


requires_triton = pytest.mark.skipif(
    kernel_device() is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every buffer made with torch.empty starts as NaN (255, a NaN scale, for uint8), so that an element a
    kernel forgets to write shows up in the result."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t.fill_(255)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.fixture(scope="session")
def embedded_model_cache(tmp_path_factory):
    """A model cache the real-model tests share, so the embedded GGUF is converted once per session and
    nothing is written under ~/.cache."""
    return tmp_path_factory.mktemp("embedded_model_cache")
