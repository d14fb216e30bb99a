"""The CUDA extension `cdm_fast._C`: built wherever nvcc is, importable without a GPU, free of libtorch and of
a dynamic cudart, every kernel compiled for every target without spills; its capability gate; on a GPU, its
quantise kernels against `cdm_fast.float8` and its fp8 projection against the float64 reference.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import gpu, rel_error, requires_cuda

from bench.aot import parse_ptxas_log
from cdm_fast import _extension, float8
from cdm_fast.ops.projection import reference

DEFAULT_CUDA_ARCHS = "89;90a;120a"
# Codes may differ from cdm_fast.float8 only where a tie rounds the other way.
CODE_MISMATCH_BOUND = 1e-3
FP8_BOUND = 1e-2


def _nvcc_present() -> bool:
    homes = [os.environ[var] for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates = [Path(home, "bin", "nvcc") for home in homes] + [Path("/usr/local/cuda/bin/nvcc")]
    return shutil.which("nvcc") is not None or any(c.is_file() for c in candidates)


requires_build = pytest.mark.skipif(
    not _nvcc_present() or os.environ.get("CDM_FAST_NO_CUDA", "0") not in ("", "0"),
    reason="no CUDA compiler (or CDM_FAST_NO_CUDA is set): the package is pure Python",
)


def _requested_archs() -> list[str]:
    value = os.environ.get("CDM_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    return [arch for arch in re.split(r"[;,\s]+", value) if arch]


def _installed_version() -> str:
    from importlib.metadata import version

    return version("cdm-fast")


@pytest.fixture(scope="module")
def extension():
    module = _extension.load()
    if module is None:
        pytest.fail(_extension.unavailable_reason(torch.device("cuda")))
    return module


@requires_build
def test_extension_is_built_and_imports_without_a_gpu(extension):
    assert extension.version() == _installed_version()
    assert Path(extension.__file__).name.startswith("_C.")


@requires_build
def test_built_archs_are_the_requested_list(extension):
    assert extension.built_archs() == _requested_archs()


@requires_build
@pytest.mark.skipif(shutil.which("ldd") is None or shutil.which("nm") is None, reason="needs ldd and nm")
def test_links_no_libtorch_no_dynamic_cudart_and_exports_no_cuda_symbols(extension):
    libraries = subprocess.run(["ldd", extension.__file__], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"libtorch|libc10|libcudart", libraries), libraries
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", extension.__file__], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "PyInit__C" in exported
    # cudart is linked in with hidden symbols, so it cannot capture or be captured by torch's cudart.
    assert not [symbol for symbol in exported if symbol.startswith(("cuda", "__cuda"))]


@requires_build
def test_every_kernel_compiled_for_every_arch_without_spills(extension):
    log_path = Path(extension.__file__).with_name("_C_build.log")
    assert log_path.is_file(), f"{log_path} is missing: setup.py installs it beside the extension"
    report = parse_ptxas_log(log_path.read_text())
    kernels: dict[str, set[str]] = {}
    for kernel, arch in report:
        kernels.setdefault(arch, set()).add(kernel)
    assert sorted(kernels) == sorted(f"sm_{arch}" for arch in extension.built_archs())
    first = next(iter(kernels.values()))
    assert first and all(names == first for names in kernels.values()), kernels
    spilling = {key: usage for key, usage in report.items() if usage["spills"]}
    assert not spilling, spilling


# Arguments that pass the pointer checks (aligned, non-null) without pointing at anything.
_FAKE_FEATURES_CALL = dict(
    x_codes=256, x_scales=256, freq_codes=256, freq_scales=256, features=256, n=3, m=16
)
_FAKE_QUANTIZE_CALL = dict(src=256, outer=2, inner=2, stride_outer=2, stride_inner=1, codes=256, scales=256)


@requires_build
def test_bad_arguments_raise_value_error_before_any_cuda_call(extension):
    with pytest.raises(ValueError, match="d_in: expected a positive multiple of 16, got 100"):
        extension.projection_features_fp8(**_FAKE_FEATURES_CALL, d_in=100, stream=0)
    with pytest.raises(ValueError, match="dtype: expected float32, float16 or bfloat16, got int8"):
        extension.quantize_rowwise(**_FAKE_QUANTIZE_CALL, dtype="int8", stream=0)


@requires_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_cuda_errors_raise_runtime_error_without_a_gpu(extension):
    with pytest.raises(RuntimeError, match="cdm_fast._C.projection_features_fp8: cuda"):
        extension.projection_features_fp8(**_FAKE_FEATURES_CALL, d_in=32, stream=0)


@pytest.mark.parametrize(
    ("archs", "capability", "serves"),
    [
        (["89", "90a", "120a"], (12, 0), True),
        (["89", "90a", "120a"], (12, 1), False),  # sm_120a code runs on 12.0 only
        (["89", "90a", "120a"], (8, 9), True),
        (["89", "90a", "120a"], (9, 0), True),
        (["89", "90a", "120a"], (8, 6), False),
        (["89", "90a", "120a"], (10, 0), False),  # the highest target's PTX is arch-specific
        (["80", "90"], (12, 0), True),  # plain PTX of the highest target is JIT-compiled
        (["86"], (8, 9), True),  # SASS runs on a later minor of the same major
        (["120f"], (12, 1), True),
    ],
)
def test_arch_list_serves_device(archs, capability, serves):
    assert bool(_extension._serving_archs(archs, capability)) is serves


def test_projection_supports_names_why_for_cpu_tensors():
    x, freqs, weight = torch.randn(4, 32), torch.randn(32, 16), torch.randn(32, 16)
    reason = _extension.projection_supports(x, freqs, weight, None, "fp8", "rowwise")
    assert reason == "tensors are on cpu; the CUDA extension needs CUDA tensors"


# ---------------------------------------------------------------------------------------------------- GPU


def _poison_allocator_cache(total_bytes: int = 16 << 20, chunk_bytes: int = 512 << 10) -> None:
    """Leave the caching allocator's small-block pool (allocations up to 1 MiB) filled with 0xFF bytes, NaN
    as e4m3, float16, bfloat16 and float32 alike (`poison_`'s NaN is not NaN when read as e4m3 codes): the
    outputs and intermediates allocated next are carved from it, so an element a kernel forgets to write
    stays NaN."""
    chunks = [
        torch.empty(chunk_bytes, dtype=torch.uint8, device="cuda") for _ in range(total_bytes // chunk_bytes)
    ]
    for chunk in chunks:
        chunk.fill_(0xFF)
    del chunks


def _random_rows_of_varied_magnitude(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Fresh N(0, 1) values with every row and column scaled by 10^U(-2, 2), so that scales differ."""
    rows = 10 ** torch.empty(shape[0], 1, device="cuda").uniform_(-2, 2)
    cols = 10 ** torch.empty(1, shape[1], device="cuda").uniform_(-2, 2)
    return (torch.randn(shape, device="cuda") * rows * cols).to(dtype)


@gpu
@requires_build
@requires_cuda
@pytest.mark.parametrize("scaling", ["rowwise", "mx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_quantize_kernels_match_float8_recipes_odd_sizes(extension, scaling, dtype, dim, transposed):
    t = _random_rows_of_varied_magnitude((333, 181), dtype)
    t = t.t().contiguous().t() if transposed else t
    expected_codes, expected_scales = getattr(float8, f"quantize_{scaling}")(t.cpu(), dim)
    _poison_allocator_cache()
    codes, scales = getattr(_extension, f"quantize_{scaling}")(t, dim)
    assert codes.shape == expected_codes.shape and scales.shape == expected_scales.shape
    assert codes.stride(dim) == 1
    assert torch.equal(scales.cpu(), expected_scales)
    mismatches = (codes.cpu().view(torch.uint8) != expected_codes.view(torch.uint8)).float().mean().item()
    assert mismatches <= CODE_MISMATCH_BOUND, mismatches


def _projection_inputs(batch: tuple[int, ...], d_in: int, m: int, d_out: int, dtype: torch.dtype):
    """x ~ N(0, 1), freqs ~ N(0, 1/d_in): phases of O(1) turns, as in real use."""
    x = torch.randn(*batch, d_in, device="cuda").to(dtype)
    freqs = (torch.randn(d_in, m, device="cuda") / d_in**0.5).to(dtype)
    weight = torch.randn(2 * m, d_out, device="cuda").to(dtype)
    bias = torch.randn(d_out, device="cuda").to(dtype)
    return x, freqs, weight, bias


@gpu
@requires_build
@requires_cuda
@pytest.mark.parametrize("scaling", ["rowwise", "mx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_projection_forward_fp8_matches_float64_reference_batched_odd_rows(
    extension, scaling, dtype, with_bias
):
    # 333 rows and d_out = 144 end in partial tiles; d_in = 112 ends in an MX block of 16.
    x, freqs, weight, bias = _projection_inputs((3, 111), d_in=112, m=80, d_out=144, dtype=dtype)
    bias = bias if with_bias else None
    reason = _extension.projection_supports(x, freqs, weight, bias, "fp8", scaling)
    if reason is not None:
        pytest.skip(reason)
    x2d = x.reshape(-1, x.shape[-1])
    _poison_allocator_cache()
    out = _extension.projection_forward_fp8(x2d, freqs, weight, bias, scaling)
    assert out.dtype == dtype and out.shape == (333, 144)
    inputs64 = [t.cpu().double() if t is not None else None for t in (x2d, freqs, weight, bias)]
    ref = reference(*inputs64, precision="fp8", fp8_scaling=scaling)
    exact = reference(*inputs64, precision="bf16")
    error, error_to_exact = rel_error(out, ref), rel_error(out, exact)
    print(
        f"fp8 {scaling} {dtype}: error to the quantised reference {error:.2e}, to exact {error_to_exact:.2e}"
    )
    assert error <= FP8_BOUND


@gpu
@requires_build
@requires_cuda
def test_projection_forward_fp8_float32_parameters_and_strided_x(extension):
    x, freqs, weight, bias = _projection_inputs((257,), d_in=64, m=32, d_out=48, dtype=torch.bfloat16)
    freqs, weight, bias = freqs.float(), weight.float().t().contiguous().t(), bias.float()
    x_strided = torch.cat([x, x], dim=1)[:, ::2]
    scaling = float8.default_scaling(x.device)
    reason = _extension.projection_supports(x_strided, freqs, weight, bias, "fp8", scaling)
    if reason is not None:
        pytest.skip(reason)
    out = _extension.projection_forward_fp8(x_strided, freqs, weight, bias, scaling)
    inputs64 = [t.cpu().double() for t in (x_strided, freqs, weight, bias)]
    assert rel_error(out, reference(*inputs64, precision="fp8", fp8_scaling=scaling)) <= FP8_BOUND
