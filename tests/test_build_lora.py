"""The fused LoRA forward of `cdm_fast._C` (csrc/lora.cu): exported, compiled for every target without spills
and within shared memory, bad arguments refused before any CUDA call; on a GPU, y and u against the float64
reference with the same dropout mask.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import gpu, rel_error, requires_cuda
from test_build import _poison_allocator_cache, extension, requires_build  # noqa: F401  (extension: fixture)

from bench.aot import parse_ptxas_log
from cdm_fast import _extension
from cdm_fast.ops.lora import dropout_keep, reference

LORA_BOUND = 1e-2
# Opt-in dynamic shared memory per block on sm_89 and sm_120 (sm_90 allows more).
SHARED_MEMORY_LIMIT = 101376
REGISTER_LIMIT = 255
LORA_KERNEL = "lora_forward_kernel"

# Arguments that pass the pointer checks (aligned, non-null) without pointing at anything.
_FAKE_LORA_CALL = dict(
    x=256,
    x_row_stride=64,
    weight=256,
    weight_row_stride=64,
    lora_a=256,
    lora_b=256,
    lora_b_row_stride=16,
    bias=0,
    y=256,
    u=256,
    dtype="bfloat16",
    m=3,
    n=5,
    k=64,
    rank=16,
    scaling=2.0,
    dropout_p=0.0,
    dropout_threshold=0,
    dropout_seed=0,
    stream=0,
)


@requires_build
def test_extension_exports_lora_entry_points(extension):  # noqa: F811
    for name in ("lora_forward", "lora_max_rank", "lora_shared_bytes"):
        assert hasattr(extension, name), name
    assert extension.lora_max_rank() == 64


@requires_build
def test_lora_kernel_compiled_for_every_arch_without_spills_within_shared_memory(extension):  # noqa: F811
    log_path = Path(extension.__file__).with_name("_C_build.log")
    report = parse_ptxas_log(log_path.read_text())
    lora = {key: usage for key, usage in report.items() if LORA_KERNEL in key[0]}
    by_arch: dict[str, set[str]] = {}
    for kernel, arch in lora:
        by_arch.setdefault(arch, set()).add(kernel)
    assert sorted(by_arch) == sorted(f"sm_{arch}" for arch in extension.built_archs())
    # bfloat16 and float16, each with rank tiles 16, 32 and 64.
    assert all(len(kernels) == 6 for kernels in by_arch.values()), by_arch
    assert not {key: usage for key, usage in lora.items() if usage["spills"]}
    assert all(usage["regs"] <= REGISTER_LIMIT for usage in lora.values())
    static_smem = max(usage["smem"] for usage in lora.values())
    for rank in (1, 16, 17, 32, 33, extension.lora_max_rank()):
        assert static_smem + extension.lora_shared_bytes(rank) <= SHARED_MEMORY_LIMIT, rank


@requires_build
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=100, x_row_stride=104, weight_row_stride=104), "k: in_features must be a multiple of 8"),
        (dict(rank=65, lora_b_row_stride=72), "rank: expected 1 <= rank <= 64, got 65"),
        (dict(x_row_stride=60), "x_row_stride: expected a multiple of 8 >= 64"),
        (dict(lora_b_row_stride=12), "lora_b_row_stride: expected a multiple of 8 >= 16"),
        (dict(dtype="float32"), "dtype: expected float16 or bfloat16, got float32"),
        (dict(dtype="int8"), "dtype: expected float32, float16 or bfloat16, got int8"),
        (dict(dropout_p=1.0), "dropout_p: expected 0 <= p < 1"),
        (dict(x=8), "x: expected a 16-byte aligned pointer"),
        (dict(n=0), "n: expected 1 <= value"),
    ],
)
def test_lora_bad_arguments_raise_value_error_before_any_cuda_call(extension, change, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        extension.lora_forward(**{**_FAKE_LORA_CALL, **change})


@requires_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_lora_cuda_errors_raise_runtime_error_without_a_gpu(extension):  # noqa: F811
    with pytest.raises(RuntimeError, match="cdm_fast._C.lora_forward: cuda"):
        extension.lora_forward(**_FAKE_LORA_CALL)


def test_lora_supports_names_why_for_cpu_tensors():
    x, weight = torch.randn(4, 32), torch.randn(16, 32)
    lora_A, lora_B = torch.randn(8, 32), torch.randn(16, 8)
    reason = _extension.lora_supports(x, weight, lora_A, lora_B, None)
    assert reason == "tensors are on cpu; the CUDA extension needs CUDA tensors"


# ---------------------------------------------------------------------------------------------------- GPU


def _lora_inputs(m: int, n: int, k: int, rank: int, dtype: torch.dtype, row_padding: int = 0):
    """Base and adapter terms of comparable size; x optionally a row-strided view."""
    x_wide = torch.randn(m, k + row_padding, device="cuda").to(dtype)
    x = x_wide[:, :k]
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    lora_A = torch.randn(rank, k, device="cuda") / k**0.5
    lora_B = torch.randn(n, rank, device="cuda") / rank**0.5
    bias = torch.randn(n, device="cuda").to(dtype)
    return x, weight, lora_A, lora_B, bias


@gpu
@requires_build
@requires_cuda
@pytest.mark.parametrize("rank", [1, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_lora_forward_matches_float64_reference_odd_sizes(extension, rank, dtype, dropout_p, with_bias):  # noqa: F811
    # M = 77 and N = 200 end in partial tiles; K = 264 ends in a partial stage; x rows are strided.
    x, weight, lora_A, lora_B, bias = _lora_inputs(77, 200, 264, rank, dtype, row_padding=8)
    bias = bias if with_bias else None
    scaling, seed = 2.0, 1234
    reason = _extension.lora_supports(x, weight, lora_A, lora_B, bias)
    if reason is not None:
        pytest.skip(reason)
    _poison_allocator_cache()
    y, u = _extension.lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
    assert y.dtype == dtype and y.shape == (77, 200) and u.dtype == dtype and u.shape == (77, rank)
    x64, weight64, A64, B64 = (t.cpu().double() for t in (x, weight, lora_A.to(dtype), lora_B.to(dtype)))
    bias64 = bias.cpu().double() if bias is not None else None
    expected_y = reference(x64, weight64, A64, B64, scaling, bias64, dropout_p=dropout_p, dropout_seed=seed)
    dropped = x64 * dropout_keep(seed, *x64.shape, dropout_p) / (1 - dropout_p) if dropout_p > 0 else x64
    expected_u = dropped @ A64.T
    error_y, error_u = rel_error(y, expected_y), rel_error(u, expected_u)
    print(f"lora r={rank} {dtype} p={dropout_p}: y error {error_y:.2e}, u error {error_u:.2e}")
    assert error_y <= LORA_BOUND and error_u <= LORA_BOUND


@gpu
@requires_build
@requires_cuda
def test_lora_forward_dropout_mask_matches_dropout_keep_exactly(extension):  # noqa: F811
    # One-hot rows of lora_A copy columns of dropout(x) into u: u is zero exactly where the mask drops.
    m, n, k, p, seed = 300, 24, 520, 0.3, 987654321
    x = (torch.rand(m, k, device="cuda") + 0.5).to(torch.bfloat16)  # no zeros of its own
    weight = torch.zeros(n, k, device="cuda", dtype=torch.bfloat16)
    columns = torch.linspace(0, k - 1, 64).round().long()
    lora_A = torch.zeros(64, k, device="cuda")
    lora_A[torch.arange(64), columns.cuda()] = 1.0
    lora_B = torch.zeros(n, 64, device="cuda")
    if (reason := _extension.lora_supports(x, weight, lora_A, lora_B, None)) is not None:
        pytest.skip(reason)
    _, u = _extension.lora_forward(x, weight, lora_A, lora_B, None, 1.0, p, seed)
    keep = dropout_keep(seed, m, k, p)[:, columns]
    assert torch.equal(u.cpu() != 0, keep)
    # The kernel multiplies the exact fp32 sum by float32(1 / (1 - p)) and rounds once to bfloat16.
    dropout_scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    expected = (x.cpu().float()[:, columns] * dropout_scale).to(torch.bfloat16)
    assert torch.equal(u.cpu()[keep], expected[keep])
