"""The attention bench's CPU smoke mode: strict JSON lines with every field, every peer timed or skipped."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_smoke_rows, assert_timed_or_skipped, run_bench_smoke

from bench import attention, common
from cdm_fast.ops.attention import reference

REQUIRED_KEYS = {
    "device", "cc", "torch", "triton", "cuda", "git_commit", "timestamp", "bench", "shape", "mode", "dtype",
    "block_size", "causal", "target_density", "density", "density_of_causal", "window_blocks",
    "visible_elements", "flops", "bytes", "impl", "entropy", "ms", "tflops", "gb_s", "vs_sdpa", "vs_flex",
    "vs_plain_order", "entropy_overhead", "peak_memory_bytes", "error_out", "error_entropy", "compile_s",
    "targets", "note", "performance_claim", "smoke", "error_slice",
}  # fmt: skip
ALWAYS_TIMED = ("cdm-auto",)  # the torch backend runs on the CPU


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "attention.jsonl"
    return run_bench_smoke(attention.main, out, "--check-targets", "--repeats", "1")


pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU smoke test; on a GPU run `python -m bench.attention` itself"
)


def test_smoke_run_succeeds_and_writes_strict_json_rows_with_every_field(smoke_run):
    assert_smoke_rows(*smoke_run, REQUIRED_KEYS)


def test_every_peer_is_timed_or_skipped_with_a_reason_in_every_case(smoke_run):
    _, rows = smoke_run
    cases = {(json.dumps(r["shape"]), r["mode"], r["target_density"]) for r in rows}
    assert len(cases) == len(attention.SHAPES["smoke"]) * len(attention.MODES) * len(attention.DENSITIES)
    for shape, mode, density in cases:
        case_rows = [
            r
            for r in rows
            if (json.dumps(r["shape"]), r["mode"], r["target_density"]) == (shape, mode, density)
        ]
        expected = {
            (name, entropy)
            for name, peer in attention.PEERS.items()
            if density == 1.0 or not peer.dense_only
            for entropy in peer.entropy
        }
        assert {(r["impl"], r["entropy"]) for r in case_rows} == expected
        for row in case_rows:
            assert_timed_or_skipped(row, mode, density)
            if row["ms"] is not None:
                assert row["error_out"] < 2e-2, row
                assert (row["error_entropy"] is not None) == row["entropy"]
        by_impl = {(r["impl"], r["entropy"]): r for r in case_rows}
        for impl in ALWAYS_TIMED:
            assert by_impl[(impl, False)]["ms"] is not None and by_impl[(impl, True)]["ms"] is not None
            assert by_impl[(impl, True)]["error_entropy"] < 1e-3
            assert by_impl[(impl, True)]["entropy_overhead"] is not None
            assert by_impl[(impl, False)]["vs_sdpa"] is not None


def test_layouts_hit_the_requested_fraction_of_the_causal_blocks(smoke_run):
    _, rows = smoke_run
    for row in rows:
        assert row["density_of_causal"] == pytest.approx(row["target_density"], abs=0.05), row
        if row["target_density"] == 1.0:
            assert row["window_blocks"] is None
            assert row["visible_elements"] == row["shape"]["S"] * (row["shape"]["S"] + 1) // 2
        else:
            assert row["window_blocks"] >= 1
        forward_flops = (
            4 * row["shape"]["B"] * row["shape"]["Hq"] * row["shape"]["D"] * row["visible_elements"]
        )
        assert row["flops"] == (forward_flops if row["mode"] == "forward" else int(3.5 * forward_flops))


def test_targets_are_unmeasured_off_the_h100():
    lines = attention.check_targets([], {"device": "cpu"})
    verdicts = [line for line in lines[1:] if line.strip()]
    assert len(verdicts) == len(attention.OURS) * 5
    assert all("unmeasured: device is cpu" in line for line in verdicts)


def test_ncu_commands_cover_both_launch_orders():
    commands = [line for line in attention.ncu_commands() if line.strip().startswith("ncu ")]
    assert len(commands) == 2
    assert all("lts__t_sector_hit_rate.pct" in c for c in commands)
    assert {c.split("--peer ")[1].split()[0] for c in commands} == {"cdm-triton", attention.PLAIN}


@pytest.mark.parametrize("target_density", attention.DENSITIES)
def test_flex_block_mask_from_the_layout_matches_create_block_mask(target_density):
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len, block_size = 512, 16
    layout, _ = attention._layout(seq_len, block_size, target_density)
    blocks = layout[0, 0]

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[q_idx // block_size, kv_idx // block_size] & (kv_idx <= q_idx)

    ours = attention.block_mask_from_layout(layout, seq_len, block_size)
    expected = create_block_mask(mask_mod, None, None, seq_len, seq_len, device="cpu", BLOCK_SIZE=block_size)
    assert torch.equal(ours.to_dense(), expected.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, expected.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, expected.kv_num_blocks)
    q = torch.randn(1, 2, seq_len, 32)
    k, v = torch.randn(2, 1, 2, seq_len, 32)
    shape = attention.Shape(1, 2, 2, seq_len, 32)
    case = attention.make_case(shape, "forward", target_density, block_size, torch.device("cpu"), False)
    with torch.no_grad():
        out = attention.flex_attention_peer(case, False).forward(q, k, v)
    ref, _ = reference(q, k, v, layout, block_size=block_size, causal=True)
    assert common.rel_error(out, ref) < 1e-5
