"""The LoRA bench's smoke mode on the CPU: strict JSON lines with every field, every peer timed or skipped."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_smoke_rows, assert_timed_or_skipped, run_bench_smoke

from bench import lora

REQUIRED_KEYS = {
    "device", "cc", "torch", "triton", "cuda", "peft", "git_commit", "timestamp", "bench", "case", "shape",
    "mode", "dtype", "dropout_p", "impl", "ms", "tflops", "gb_s", "ratio_vs_peft", "overhead_vs_base",
    "peak_memory_bytes", "error_vs_float64", "flops", "bytes", "targets", "note", "performance_claim",
    "smoke", "suite", "base", "weights_bytes", "vram_vs_bf16_base",
}  # fmt: skip
ALWAYS_TIMED = {
    "training-bf16": (
        "cdm-auto",
        "cdm-torch",
        lora.BASELINE,
        "peft-bf16-no-cast",
        "unsloth-addmm",
        lora.FLOOR,
    ),
    "training-nf4": ("cdm-auto", "cdm-torch", lora.PEFT_BNB, lora.BNB_FLOOR),
    "decode-bf16": ("cdm-auto", "cdm-torch", lora.BASELINE, "unsloth-addmm", lora.FLOOR),
    "decode-nf4": ("cdm-auto", "cdm-torch", lora.PEFT_BNB, lora.BNB_FLOOR),
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lora.jsonl"
    return run_bench_smoke(lora.main, out, "--check-targets", "--repeats", "1")


pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU smoke test; on a GPU run `python -m bench.lora` itself"
)


def test_smoke_run_succeeds_and_writes_strict_json_rows_with_every_field(smoke_run):
    assert_smoke_rows(*smoke_run, REQUIRED_KEYS)


@pytest.mark.parametrize("suite_name", list(lora.SUITES))
def test_every_peer_is_timed_or_skipped_with_a_reason_in_every_shape_and_mode(smoke_run, suite_name):
    _, rows = smoke_run
    suite = lora.SUITES[suite_name]
    projection_rows = [
        r for r in rows if r["case"] == "projection" and (r["suite"], r["base"]) == (suite.suite, suite.base)
    ]
    cases = {(json.dumps(r["shape"]), r["mode"]) for r in projection_rows}
    if suite.suite == "decode":
        assert len(cases) == len(lora.SHAPES["smoke"]) * len(lora.DECODE_TOKENS["smoke"])
        assert {mode for _, mode in cases} == {"forward"}
    else:
        assert len(cases) == len(lora.SHAPES["smoke"]) * len(lora.MODES)
    for shape, mode in cases:
        case_rows = [r for r in projection_rows if (json.dumps(r["shape"]), r["mode"]) == (shape, mode)]
        by_impl = {r["impl"]: r for r in case_rows}
        assert set(by_impl) == set(suite.peers)
        for row in case_rows:
            assert_timed_or_skipped(row, mode)
        for impl in ALWAYS_TIMED[suite_name]:
            assert by_impl[impl]["ms"] is not None, (impl, mode, by_impl[impl]["note"])
            assert by_impl[impl]["error_vs_float64"] < 2e-2
        assert by_impl[suite.baseline]["ratio_vs_peft"] == pytest.approx(1.0)
        assert by_impl[suite.floor]["overhead_vs_base"] == pytest.approx(0.0)


def test_layer_set_rows_sum_the_projections_medians(smoke_run):
    _, rows = smoke_run
    rank = lora.LAYER_SET_RANK["smoke"]
    for mode in lora.MODES:
        parts = {
            (r["shape"]["in"], r["shape"]["out"]): r["ms"]
            for r in rows
            if r["case"] == "projection"
            and r["impl"] == lora.FLOOR
            and r["mode"] == mode
            and r["suite"] == "training"
        }
        expected = sum(parts[(i, o)] for _, i, o in lora.SMOKE_LAYER)
        layer_set = [
            r for r in rows if r["case"] == "layer-set" and r["mode"] == mode and r["suite"] == "training"
        ]
        (summed,) = [r for r in layer_set if r["impl"] == lora.FLOOR]
        assert summed["shape"]["r"] == rank and summed["ms"] == pytest.approx(expected)


def test_check_targets_reports_unmeasured_off_an_h100(smoke_run):
    _, rows = smoke_run
    lines = lora.check_targets(rows, {"device": "cpu"})
    verdict_lines = [line for line in lines[1:] if line.strip()]
    assert verdict_lines and all("unmeasured" in line for line in verdict_lines)


def test_issue_14_targets_report_unmeasured_off_an_h100(smoke_run):
    _, rows = smoke_run
    lines = lora.check_targets_4bit(rows, {"device": "cpu"})
    verdict_lines = [line for line in lines[1:] if line.strip()]
    assert len(verdict_lines) == 4 * len(lora.OURS)
    assert all("unmeasured" in line for line in verdict_lines)


def test_memory_rows_cover_both_bases_and_are_unmeasured_on_the_cpu(smoke_run):
    _, rows = smoke_run
    memory = [r for r in rows if r["case"] == "memory"]
    assert {(r["base"], r["mode"]) for r in memory} == {
        (base, mode) for base in ("bf16", "nf4") for mode in ("forward", "forward+backward")
    }
    for row in memory:
        assert row["peak_memory_bytes"] is None and row["note"].startswith("unmeasured: no CUDA"), row["note"]


def test_summary_quotes_the_seed_claim_beside_unmeasured_values(smoke_run):
    _, rows = smoke_run
    text = "\n".join(lora.seed_claim_summary(rows))
    assert lora.SEED_CLAIM in text and "unmeasured" in text


def test_flop_count_of_the_main_shape_matches_the_docstring_roofline():
    shape = lora.TARGET_SHAPE
    assert lora.flops(shape, "forward") / 1e9 == pytest.approx(279.2, abs=0.05)
    assert lora.flops(shape, "backward") / 1e9 == pytest.approx(283.5, abs=0.05)
    assert lora.flops(shape, "forward+backward", base_only=True) / 1e9 == pytest.approx(549.8, abs=0.05)
