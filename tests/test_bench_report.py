"""bench.report on rows in memory: what counts as a measurement, the newest run, numbers, verdicts, CLI."""

from __future__ import annotations

import copy

import pytest

from bench import attention, common, lora, projection, report, wgrad

H100 = "NVIDIA H100 80GB HBM3"
ENV = {
    "device": H100,
    "cc": "9.0",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "cuda": "13.0",
    "git_commit": "abc1234",
    "git_dirty": False,
    "timestamp": "2026-12-01T10:00:00+00:00",
}
CPU_ENV = {**ENV, "device": "cpu", "cc": None, "cuda": None, "timestamp": "2026-12-02T10:00:00+00:00"}
# Round ceilings so that the expected numbers below can be worked out by hand.
CEILINGS = {"bf16_gemm_tflops": 800.0, "fp8_gemm_tflops": 1600.0, "copy_gb_s": 3000.0}


def projection_rows(env: dict = ENV) -> list[dict]:
    """What bench.projection writes for one shape (with --check-targets): eager, _scaled_mm, ours, skips."""
    shape = {"N": 16384, "d_in": 8192, "m": 2048, "d_out": 1536}
    base = {**env, "bench": "projection", "shape": shape, "ceilings": CEILINGS, "targets": None, "note": ""}
    base.update(min_ms=None, repeats=100, timing="cuda-events-median", error_quantized=None, error_exact=1e-3)
    # Bytes inflated past the shape's real ~0.37 GB so that the memory floor (1.5 ms at 3000 GB/s) is the
    # larger one for cdm-cuda, whose compute floor is 1.0 ms.
    base.update(flops=int(7.56e11), bytes=4.5e9, gb_s=None)
    rows = [
        {**base, "impl": "torch-eager-bf16", "precision": "bf16", "scaling": None, "ms": 4.0,
         "tflops": 100.0, "peak_fraction": 0.25, "ratio": 1.0},
        {**base, "impl": "scaled-mm-fp8", "precision": "fp8", "scaling": "rowwise", "ms": 2.5,
         "tflops": 160.0, "peak_fraction": 0.4, "ratio": 1.6},
        {**base, "impl": "te-fp8-linear", "precision": "fp8", "scaling": None, "ms": None, "tflops": None,
         "peak_fraction": None, "ratio": None, "note": f"skipped: {projection.TE_MISSING}"},
        {**base, "impl": "cdm-cuda", "precision": "fp8", "scaling": "rowwise", "ms": 2.0, "tflops": 200.0,
         "peak_fraction": 0.5, "ratio": 2.0,
         "targets": {"vs_eager": 2.0, "vs_scaled_mm": 1.25, "of_scaled_mm_gemms": 0.5,
                     "scaled_mm_peer": "scaled-mm-fp8", "met": False}},
    ]  # fmt: skip
    for row in rows:
        row["gb_s"] = row["bytes"] / row["ms"] / 1e6 if row["ms"] else None
    return rows


def lora_rows(env: dict = ENV) -> list[dict]:
    """bench.lora's training-bf16 suite at the target shape, forward+backward (the fields of `_new_row`)."""
    shape = lora.TARGET_SHAPE.as_dict()
    base = {**env, "bench": "lora", "case": "projection", "shape": shape, "mode": "forward+backward"}
    base.update(suite="training", base="bf16", dtype="bfloat16", dropout_p=0.0, scaling=2.0, note="")
    base.update(performance_claim=True, smoke=False, ceilings=CEILINGS, targets=None, error_vs_float64=2e-3)
    base.update(
        min_ms=None, repeats=50, timing="cuda-events-median", weights_bytes=None, vram_vs_bf16_base=None
    )
    # 8e11 FLOPs at 800 TFLOP/s: 1.0 ms; 1.5e9 bytes at 3000 GB/s: 0.5 ms; the floor is 1.0 ms.
    flops, nbytes = 8e11, 1.5e9
    rows = []
    for impl, ms, peak in (("peft-default", 2.0, 200), ("cdm-auto", 1.25, 100), ("base-linear", 1.0, 50)):
        rows.append(
            {**base, "impl": impl, "ms": ms, "flops": flops, "bytes": nbytes, "tflops": flops / ms / 1e9,
             "gb_s": nbytes / ms / 1e6, "peak_fraction": flops / ms / 1e9 / 800.0, "ratio_vs_peft": 2.0 / ms,
             "overhead_vs_base": ms / 1.0 - 1, "peak_memory_bytes": peak * 2**20}
        )  # fmt: skip
    rows.append({**rows[1], "impl": "te-linear", "ms": None, "tflops": None, "note": "skipped: no TE"})
    return rows


def attention_rows(env: dict = ENV) -> list[dict]:
    """bench.attention at its target shape: dense forward vs SDPA, 12.5 % fwd+bwd vs SDPA and Flex."""
    base = {**env, "bench": "attention", "shape": attention.TARGET_SHAPE.as_dict(), "dtype": "bfloat16"}
    base.update(block_size=128, causal=True, performance_claim=True, smoke=False, ceilings=CEILINGS, note="")
    base.update(
        targets=None, entropy=False, vs_plain_order=None, entropy_overhead=None, peak_memory_bytes=None
    )
    base.update(error_out=1e-3, error_entropy=None, gb_s=500.0, bytes=1e9)
    return [
        {**base, "impl": attention.SDPA, "mode": "forward", "target_density": 1.0, "density_of_causal": 1.0,
         "ms": 2.0, "flops": 1.6e12, "tflops": 800.0, "vs_sdpa": 1.0, "vs_flex": None},
        {**base, "impl": "cdm-triton", "mode": "forward", "target_density": 1.0, "density_of_causal": 1.0,
         "ms": 2.5, "flops": 1.6e12, "tflops": 640.0, "vs_sdpa": 0.8, "vs_flex": None},
        {**base, "impl": "cdm-triton", "mode": "forward+backward", "target_density": 0.125,
         "density_of_causal": 0.125, "ms": 1.0, "flops": 4e11, "tflops": 400.0, "vs_sdpa": 7.0,
         "vs_flex": 1.5},
    ]  # fmt: skip


def wgrad_rows(env: dict = ENV, sync_ms: float = 10.0) -> list[dict]:
    """bench.wgrad's lora-stack case at the target tokens: deferred only 5 % faster (the target is 10 %)."""
    base = {**env, "bench": "wgrad", "case": "lora-stack", "tokens": wgrad.LORA_TARGET_TOKENS, "note": ""}
    base.update(
        shape={"width": 4096, "depth": 8, "tokens": 2048, "rank": 32}, smoke=False, performance_claim=True
    )
    times = {"sync": sync_ms, "deferred": sync_ms * 0.95, "auto": sync_ms * 1.01}
    return [
        {**base, "mode": mode, "ms": ms, "min_ms": ms, "timing": "cuda-events-median",
         "ratio_vs_sync": sync_ms / ms, "overlap_fraction": 0.3 if mode == "deferred" else None}
        for mode, ms in times.items()
    ]  # fmt: skip


def lora_distill_rows(env: dict = ENV) -> list[dict]:
    """bench.lora_distill's 1B-class case at seq 1024: peft, ours, ours + wgrad, and a peer that raised."""
    base = {**env, "bench": "lora_distill", "case": "1b-class", "seq_len": 1024, "weights": "random weights"}
    base.update(
        smoke=False, peak_total_bytes=None, first_losses=[10.0, 9.9], tokens=4096, note="random weights"
    )
    rows = []
    for peer, ms in (("peft", 100.0), ("cdm-fused", 80.0), ("cdm-fused+wgrad", 75.0)):
        rows.append(
            {**base, "peer": peer, "ms": ms, "tokens_per_s": 4096 / (ms / 1e3), "ratio_vs_peft": 100.0 / ms,
             "peak_memory_bytes": 2**30, "status": "ran", "performance_claim": True}
        )  # fmt: skip
    rows.append(
        {**base, "peer": "peft+compile", "ms": None, "tokens_per_s": None, "ratio_vs_peft": None,
         "peak_memory_bytes": None, "status": "failed", "performance_claim": False,
         "note": "random weights; failed: RuntimeError: boom"}
    )  # fmt: skip
    return rows


def latent_memory_rows(env: dict = ENV) -> list[dict]:
    arithmetic = {"total_gib": 46.99, "total_chunked_ce_gib": 39.16}
    measured = {"peak_gib": 41.5, "params": 1507284480}
    return [{**env, "bench": "latent_memory", "tokens": 8192, "arithmetic": arithmetic, "measured": measured,
             "kind": "measured: torch.cuda.max_memory_allocated, bf16 student, torch path"}]  # fmt: skip


def gpu_results() -> dict[str, list[dict]]:
    return {
        "projection": projection_rows(),
        "lora": lora_rows(),
        "attention": attention_rows(),
        "wgrad": wgrad_rows(),
        "lora_distill": lora_distill_rows(),
        "latent_memory": latent_memory_rows(),
    }


def table_line(text: str, *cells: str) -> str:
    """The one Markdown table line holding every cell in `cells` (as whole cells)."""
    found = [line for line in text.splitlines() if all(f"| {cell} |" in line for cell in cells)]
    assert len(found) == 1, (cells, found)
    return found[0]


# ---------------------------------------------------------------- what counts


def test_cpu_and_smoke_rows_are_never_rendered_as_measurements():
    cpu = [{**row, "ms": 987.654, "performance_claim": False, "smoke": True} for row in lora_rows(CPU_ENV)]
    smoke_gpu = [{**row, "ms": 123.456, "smoke": True} for row in wgrad_rows()]
    no_claim = [{**row, "performance_claim": False, "ms": 55.125} for row in attention_rows()]
    text = report.render({"lora": cpu, "wgrad": smoke_gpu, "attention": no_claim})
    assert "987.654" not in text and "123.456" not in text and "55.125" not in text
    assert "No GPU measurement yet" in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert headline.count("| unmeasured |") == 10 and H100 not in headline
    assert "| bench/results/lora.jsonl | 4 | 0 | yes |" in text


def test_gpu_rows_with_performance_claim_false_are_listed_as_not_timed_not_as_numbers():
    text = report.render({"lora_distill": lora_distill_rows()})
    assert "- `peft+compile`: random weights; failed: RuntimeError: boom" in text
    assert "| peft+compile |" not in text


def test_newest_run_wins_whatever_the_order_in_the_file():
    newer = [
        {**row, "timestamp": "2026-12-03T08:00:00+00:00", "git_commit": "newer11"} for row in wgrad_rows()
    ]
    older = [
        {**row, "timestamp": "2026-12-01T08:00:00+00:00", "git_commit": "older22", "git_dirty": True}
        for row in wgrad_rows(sync_ms=55.5)
    ]
    text = report.render({"wgrad": newer + older})
    assert "| 55.500 |" not in text and "| 10.000 |" in text
    assert "commit newer11, 2026-12-03T08:00:00+00:00" in text and "older22" not in text


def test_lora_suites_from_separate_runs_are_each_shown_from_their_own_newest_run():
    training = lora_rows()
    decode = [
        {**row, "suite": "decode", "mode": "forward", "shape": lora.DECODE_TARGET_SHAPE.as_dict(),
         "timestamp": "2026-12-02T10:00:00+00:00", "git_commit": "dec0de1"}
        for row in lora_rows()
    ]  # fmt: skip
    text = report.render({"lora": training + decode})
    assert "#### training-bf16" in text and "#### decode-bf16" in text
    assert "commit abc1234" in text and "commit dec0de1" in text
    assert "+25.0% (cdm-auto)" in text  # the decode headline: 1.25 ms over the 1.0 ms base


# ---------------------------------------------------------------- the numbers


def test_roofline_floor_is_the_larger_of_compute_and_memory_time():
    row = {"ms": 2.0, "flops": 8e11, "bytes": 6e9}  # compute 1.0 ms, memory 2.0 ms at CEILINGS
    floor, multiple = report.roofline(row, CEILINGS)
    assert floor == pytest.approx(2.0) and multiple == pytest.approx(1.0)
    assert report.roofline({"ms": 2.0, "flops": 8e11}, CEILINGS) == pytest.approx((1.0, 2.0))
    assert report.roofline({"ms": 2.0, "flops": 8e11}, None) == (None, None)
    assert report.roofline({"ms": None, "flops": 8e11, "bytes": 1.0}, CEILINGS) == (None, None)


def test_lora_row_shows_rates_fractions_of_the_ceilings_floor_and_ratio():
    text = report.render({"lora": lora_rows()})
    line = table_line(text, "cdm-auto", "1.250")
    # 640 TFLOP/s = 80 % of 800; 1200 GB/s = 40 % of 3000; floor 1.0 ms; 1.25x the floor; peft 2.0 / 1.25.
    for cell in ("640", "80%", "1200", "40%", "1.000", "1.25", "1.60x", "+25.0%", "100"):
        assert f"| {cell} |" in line, (cell, line)
    assert "bf16 GEMM 800 TFLOP/s, fp8 GEMM 1600 TFLOP/s, copy 3000 GB/s" in text
    assert "| te-linear |" not in text and "- `te-linear`: skipped: no TE" in text


def test_projection_row_shows_the_larger_floor_and_ratio_to_the_best_scaled_mm():
    text = report.render({"projection": projection_rows()})
    line = table_line(text, "cdm-cuda", "2.000")
    # peak_fraction 0.5: compute floor 1.0 ms; 4.5e9 B at 3000 GB/s: memory floor 1.5 ms, the larger, so
    # 2.0 / 1.5 = 1.33x; 2250 GB/s is 75% of the copy rate; eager 4.0 / 2.0; best _scaled_mm 2.5 / 2.0.
    for cell in ("50%", "2250", "75%", "1.500", "1.33", "2.00x", "1.25x"):
        assert f"| {cell} |" in line, (cell, line)
    # eager: compute floor 0.25 · 4.0 = 1.0 ms < memory floor 1.5 ms
    assert "| 1.500 | 2.67 |" in table_line(text, "torch-eager-bf16", "4.000")
    words = " ".join(text.split())
    assert "cdm-cuda of_scaled_mm_gemms 0.50 (target >= 0.6) FAIL" in words
    assert "cdm-cuda vs_eager 2.00 (target >= 1.6) PASS" in words
    assert "276 MB" in text


def test_attention_rows_show_ratios_and_the_floor():
    text = report.render({"attention": attention_rows()})
    line = table_line(text, "cdm-triton", "7.00x")
    # 4e11 FLOPs at 800 TFLOP/s: 0.5 ms, 1e9 B at 3000 GB/s: 0.333 ms; floor 0.5 ms, 2x; 400 TFLOP/s = 50 %.
    for cell in ("0.125", "1.000", "400", "50%", "0.500", "2.00", "1.50x"):
        assert f"| {cell} |" in line, (cell, line)


# ---------------------------------------------------------------- verdicts and headline


def test_target_lines_are_the_benches_own_check_functions_verbatim():
    results = gpu_results()
    text = report.render(results)
    env = {"device": H100}
    lora_copy = copy.deepcopy(results["lora"])
    for line in lora.check_targets(lora_copy, env) + lora.check_targets_4bit(lora_copy, env):
        assert line.strip() in text, line
    for line in attention.check_targets(copy.deepcopy(results["attention"]), env):
        assert line.strip() in text, line
    assert "TARGET MISSED: lora-stack 2048 tokens: deferred/sync 0.950" in text
    assert "TARGET MISSED: 1b-class seq 1024 peft+compile: random weights; failed: RuntimeError: boom" in text
    assert "targets: FAILED" in text


def test_rows_of_an_older_schema_give_a_line_saying_the_check_could_not_run():
    rows = [{k: v for k, v in row.items() if k != "dtype"} for row in lora_rows()]
    text = report.render({"lora": rows})
    assert "the check could not run on these rows: KeyError: 'dtype'" in text
    assert "| 1.250 |" in text


def test_every_missed_target_has_its_roofline_note_and_next_step():
    text = report.render(gpu_results())
    missed = text.split("## Targets missed: roofline and next step")[1].split("\n## ")[0]
    lines = [line for line in missed.splitlines() if line.startswith("- ")]
    assert any(
        line.startswith("- lora cdm-auto at training-bf16")
        and "overhead_vs_base" in line
        and "1.25× floor" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("- attention cdm-triton") and "dense_forward_vs_sdpa" in line for line in lines
    )
    assert any(line.startswith("- projection cdm-cuda fp8: of_scaled_mm_gemms 0.50 < 0.6") for line in lines)
    assert any(line.startswith("- wgrad: lora-stack 2048 tokens") for line in lines)
    assert all("Next: " in line for line in lines)


def test_headline_quotes_the_ratios_with_the_device_and_unmeasured_where_no_row():
    text = report.render(gpu_results())
    assert f"| lora training fwd+bwd 8192 tok 4096², r32, ours vs peft | {H100} | 1.60x (cdm-auto) |" in text
    assert "| 2.00x vs torch-eager-bf16 (cdm-cuda); 1.25x vs best _scaled_mm |" in text
    assert "| 7.00x (cdm-triton) |" in text and "| 1.50x (cdm-triton) |" in text
    assert "| 1.053x (sync ms / deferred ms) |" in text
    assert "| 1.33x (cdm-fused+wgrad, 1b-class, seq 1024) |" in text
    assert "| 41.50 GiB (seed's claim: under 48 GB) |" in text
    assert "| lora 4-bit base fwd+bwd, ours vs peft + bitsandbytes | - | unmeasured |" in text


def test_sm_120_section_lists_benches_with_sm_120_rows_and_says_so_when_there_are_none():
    text = report.render(gpu_results())
    assert "**Nothing has been measured on sm_120**" in text
    assert "101,376 B" in text and "232,448 B" in text and "kind::mxf8f6f4.block_scale" in text
    rtx = {**ENV, "device": "NVIDIA GeForce RTX 5090", "cc": [12, 0]}
    text = report.render({"wgrad": wgrad_rows(rtx)})
    assert "Benches with sm_120 rows: wgrad (NVIDIA GeForce RTX 5090)." in text
    assert "(cc 12.0)" in text


# ---------------------------------------------------------------- CLI


def test_empty_results_dir_gives_a_report_where_every_bench_is_unmeasured(tmp_path):
    results, out = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    results.mkdir()
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "No GPU measurement yet" in text and "No results files." in text
    assert text.count("Unmeasured: no GPU rows.") == len(report.REPORTED)
    for table in report.COMMANDS:
        assert f"- {table}: `{report.COMMANDS[table]}`" in text


def test_main_writes_the_same_bytes_twice(tmp_path):
    results = tmp_path / "results"
    for bench, rows in gpu_results().items():
        common.append_jsonl(results / f"{bench}.jsonl", rows)
    common.append_jsonl(results / "cdm.jsonl", [{**CPU_ENV, "bench": "cdm", "prompts_per_s": 0.04}])
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    assert report.main(["--results", str(results), "--out", str(first)]) == 0
    assert report.main(["--results", str(results), "--out", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert "| bench/results/cdm.jsonl | 1 | 0 | yes |" in first.read_text()


@pytest.mark.parametrize(
    "bad_line, message", [("{not json", "not a JSON line"), ("[1, 2]", "expected a JSON object, got list")]
)
def test_a_malformed_line_is_an_error_naming_the_file_and_line(tmp_path, capsys, bad_line, message):
    path = tmp_path / "lora.jsonl"
    path.write_text('{"device": "cpu"}\n\n' + bad_line + "\n")
    with pytest.raises(report.ReportError, match=f"lora.jsonl:3: {message}"):
        report.load_results(tmp_path)
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "B.md")]) == 2
    assert f"lora.jsonl:3: {message}" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_committed_benchmarks_md_is_what_the_report_generates_from_the_committed_results():
    # BENCHMARKS.md is generated, never edited: after new rows or a report change, `python -m bench.report`.
    expected = report.render(report.load_results(common.RESULTS_DIR))
    assert report.DEFAULT_OUT.read_text(encoding="utf-8") == expected
