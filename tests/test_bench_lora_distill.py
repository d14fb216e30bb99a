"""The lora-distill step bench's smoke mode on the CPU: a row per case and peer, random weights, targets."""

from __future__ import annotations

import pytest
import torch
from conftest import strict_json_rows

from bench import lora_distill

REQUIRED_KEYS = {
    "device", "cc", "torch", "triton", "cuda", "peft", "transformers", "git_commit", "git_dirty", "timestamp",
    "bench", "case", "weights", "shape", "seq_len", "peer", "base_dtype", "autocast", "attention",
    "lora_backend", "ms", "min_ms", "timing", "repeats", "tokens", "completion_tokens", "tokens_per_s",
    "ratio_vs_peft", "peak_memory_bytes", "peak_total_bytes", "first_losses", "status", "note", "smoke",
    "performance_claim",
}  # fmt: skip
CUDA_ONLY = {"peft+compile", "cdm-fused+wgrad"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU the bench times real steps")
def test_smoke_on_cpu_times_every_cpu_peer_with_random_weights_and_the_same_first_two_losses(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CDM_FAST_BACKEND", "torch")  # the fused op must not go through the Triton interpreter
    # One sequence length keeps the test within ~30 s on 2 shared cores; the other runs the same code.
    monkeypatch.setattr(lora_distill, "SMOKE_CASES", lora_distill.SMOKE_CASES[:1])
    out = tmp_path / "lora_distill.jsonl"
    assert lora_distill.main(["--smoke", "--repeats", "1", "--out", str(out), "--check-targets"]) == 0
    rows = strict_json_rows(out)
    cases = {(c.model.name, c.seq_len) for c in lora_distill.SMOKE_CASES}
    assert len(rows) == len(cases) * len(lora_distill.PEERS)
    assert {(r["case"], r["seq_len"], r["peer"]) for r in rows} == {
        (name, seq_len, peer) for name, seq_len in cases for peer in lora_distill.PEERS
    }
    for row in rows:
        assert REQUIRED_KEYS <= row.keys()
        assert row["device"] == "cpu" and row["git_commit"] and row["torch"] == torch.__version__
        assert row["weights"] == "random weights" and "random weights" in row["note"]
        assert row["smoke"] and not row["performance_claim"] and row["lora_backend"] == "torch"
        if row["peer"] in CUDA_ONLY:
            assert row["status"] == "skipped" and row["tokens_per_s"] is None
            continue
        assert row["status"] == "ran", row["note"]
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["ratio_vs_peft"] > 0
        assert row["tokens"] == row["shape"]["batch"] * row["shape"]["seq_len"]
        assert row["completion_tokens"] == row["shape"]["batch"] * row["shape"]["seq_len"] // 2
    for name, seq_len in cases:
        losses = {r["peer"]: r["first_losses"] for r in rows if (r["case"], r["seq_len"]) == (name, seq_len)}
        assert len(losses["cdm-fused"]) == 2  # the second loss follows one AdamW update through the fused op
        assert losses["cdm-fused"] == pytest.approx(losses[lora_distill.BASELINE], rel=1e-4)
    printed = capsys.readouterr().out
    assert "peft/this" in printed and "random weights" in printed and "targets: pass" in printed


def test_check_targets_fails_only_on_a_peer_that_raised():
    rows = [
        {"case": "tiny", "seq_len": 16, "peer": "peft", "status": "ran", "note": "random weights"},
        {"case": "tiny", "seq_len": 16, "peer": "peft+compile", "status": "skipped", "note": "skipped: CUDA"},
        {
            "case": "tiny",
            "seq_len": 16,
            "peer": "cdm-fused",
            "status": "failed",
            "note": "failed: RuntimeError",
        },
    ]
    failures = lora_distill.check_targets(rows)
    assert len(failures) == 1 and "cdm-fused" in failures[0]
