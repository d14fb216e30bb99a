"""Shared test helpers: one relative-error measure, output poisoning, device selection, bench smoke runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

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


def dequantize_4bit_float64(codes: torch.Tensor, state) -> torch.Tensor:
    """The values of a standard-layout bitsandbytes 4-bit weight, float64 (exact products of float32
    factors), straight from its codes and bitsandbytes' definition rather than from cdm_fast.quant: nibbles
    high first along the flat row-major index f, block f // blocksize, a double-quantised absmax resolved in
    float32 as bitsandbytes does (nested code · nested absmax, then + offset). Round with
    `.float().to(state.dtype)` for what a bit-exact dequantisation gives."""
    functional = pytest.importorskip("bitsandbytes.functional")
    numel = int(state.shape[0]) * int(state.shape[1])
    packed = codes.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
    code = functional.get_4bit_type(state.quant_type, device="cpu").double()
    blocks = absmax_float32(state).double().repeat_interleave(state.blocksize)[:numel]
    return (code[nibbles] * blocks).reshape(tuple(state.shape))


def absmax_float32(state) -> torch.Tensor:
    """A standard-layout quant state's per-block scales, float32 (num_blocks,), a double-quantised absmax
    resolved as bitsandbytes does it (nested code · nested absmax, then + offset, each rounded to float32)."""
    absmax = state.absmax.reshape(-1)
    if not state.nested:
        return absmax
    nested = state.state2
    per_block = nested.absmax.reshape(-1).repeat_interleave(nested.blocksize)[: absmax.numel()]
    return nested.code[absmax.long()] * per_block + torch.as_tensor(state.offset, dtype=torch.float32)


def params4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64):
    """(bitsandbytes Params4bit of `weight`, its dequantised values in weight's dtype), quantised by
    bitsandbytes itself on the CPU and dequantised by `dequantize_4bit_float64`; skips the test without
    bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")
    functional = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes' CPU fallback is wrapped in torch.compile: compiling it per shape would dominate a test.
    with torch.compiler.set_stance("force_eager"):
        codes, state = functional.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
    dequantised = dequantize_4bit_float64(codes, state).float().to(state.dtype)
    params = bnb.nn.Params4bit(
        data=codes,
        requires_grad=False,
        quant_state=state,
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=double_quant,
        bnb_quantized=True,
    )
    return params, dequantised


def strict_json_rows(path: Path) -> list[dict]:
    """A bench's JSON lines, refusing NaN and Infinity (benches write non-finite floats as strings)."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in Path(path).read_text().splitlines()]


def run_bench_smoke(main: Callable[[list[str]], int], out: Path, *args: str) -> tuple[int, list[dict]]:
    """(exit status, rows) of `main(["--smoke", *args, "--out", out])`, run as a user would: without
    TRITON_INTERPRET or CDM_FAST_BACKEND, so the bench picks each peer's backend itself."""
    patch = pytest.MonkeyPatch()
    for name in ("TRITON_INTERPRET", "CDM_FAST_BACKEND"):
        patch.delenv(name, raising=False)
    try:
        status = main(["--smoke", *args, "--out", str(out)])
    finally:
        patch.undo()
    return status, strict_json_rows(out)


def assert_smoke_rows(status: int, rows: list[dict], required_keys: set[str]) -> None:
    """A CPU smoke run succeeded, and each row has every field and claims no performance."""
    assert status == 0
    assert rows
    for row in rows:
        assert required_keys <= row.keys(), required_keys - row.keys()
        assert row["device"] == "cpu" and row["performance_claim"] is False and row["smoke"] is True
        assert not row["note"].startswith("failed"), row


def assert_timed_or_skipped(row: dict, *context) -> None:
    """Either a positive time with its rates, or no time and a note giving the reason it was skipped."""
    timed = row["ms"] is not None and row["ms"] > 0 and row["tflops"] > 0 and row["gb_s"] > 0
    reason = row["note"].removeprefix("skipped: ")
    skipped = row["ms"] is None and row["note"].startswith("skipped: ") and len(reason.strip()) > 3
    assert timed != skipped, (row["impl"], *context, row["note"])
