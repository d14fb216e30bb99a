"""The wgrad bench's smoke mode on the CPU: every case and mode timed, strict JSON lines, targets judged."""

from __future__ import annotations

from conftest import strict_json_rows

from bench import wgrad

REQUIRED_KEYS = {
    "device", "torch", "git_commit", "timestamp", "bench", "case", "shape", "tokens", "mode", "ms",
    "ratio_vs_sync", "overlap_fraction", "note", "smoke", "performance_claim",
}  # fmt: skip


def test_smoke_writes_one_row_per_case_and_mode(tmp_path, capsys):
    out = tmp_path / "wgrad.jsonl"
    assert wgrad.main(["--smoke", "--repeats", "1", "--out", str(out), "--check-targets"]) == 0
    rows = strict_json_rows(out)
    assert len(rows) == 3 * len(wgrad.SMOKE_CASES)
    assert {(r["case"], r["tokens"]) for r in rows} == {(c.name, c.tokens) for c in wgrad.SMOKE_CASES}
    for row in rows:
        assert REQUIRED_KEYS <= row.keys()
        assert row["ms"] > 0 and row["smoke"] and not row["performance_claim"]
    assert "sync/this" in capsys.readouterr().out


def test_check_targets_flags_a_slow_lora_step_and_a_slow_auto():
    base = {"performance_claim": True, "case": "lora-stack", "tokens": wgrad.LORA_TARGET_TOKENS}
    rows = [
        {**base, "mode": "deferred", "ratio_vs_sync": 1.05},
        {**base, "mode": "auto", "ratio_vs_sync": 0.95},
        {**base, "case": "mlp-stack", "mode": "auto", "ratio_vs_sync": 0.99},
    ]
    failures = wgrad.check_targets(rows)
    assert len(failures) == 2 and "deferred/sync" in failures[0] and "auto/sync" in failures[1]


def test_check_targets_flags_a_gpu_run_without_the_target_row_and_passes_a_met_target():
    base = {"performance_claim": True, "case": "mlp-stack", "tokens": wgrad.LORA_TARGET_TOKENS}
    (failure,) = wgrad.check_targets([{**base, "mode": "deferred", "ratio_vs_sync": 1.3}])
    assert "no timed deferred row" in failure
    met = {
        **base,
        "case": "lora-stack",
        "mode": "deferred",
        "ratio_vs_sync": 1 / (1 - wgrad.LORA_TARGET_GAIN) + 0.01,
    }
    assert wgrad.check_targets([met]) == []
    # CPU rows claim nothing: nothing is judged, nothing fails
    assert wgrad.check_targets([{**met, "performance_claim": False, "ratio_vs_sync": 0.5}]) == []
