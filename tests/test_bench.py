"""The benches run on a CPU-only machine: the projection bench's table, notice and JSON lines; the helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import common  # noqa: E402

REQUIRED_KEYS = {
    "device", "cc", "torch", "triton", "cuda", "git_commit", "timestamp", "shape", "precision", "scaling",
    "impl", "ms", "tflops", "ratio", "error_exact", "error_quantized", "note", "flops", "bytes", "gb_s",
}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on a GPU the bench times real kernels")
def test_projection_bench_on_cpu_says_kernels_were_not_timed_and_writes_parseable_rows(tmp_path):
    out = tmp_path / "p.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CDM_FAST_BACKEND")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.projection", "--fp8", "--out", str(out), "--repeats", "2"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton and CUDA kernels were not timed" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(REQUIRED_KEYS <= row.keys() for row in rows), rows
    by_impl = {(row["impl"], row["precision"]): row for row in rows}
    assert all(row["device"] == "cpu" for row in rows)
    assert set(by_impl) >= {("torch-eager-bf16", "bf16"), ("cdm-triton", "fp8"), ("cdm-cuda", "fp8")}
    eager = by_impl[("torch-eager-bf16", "bf16")]
    assert eager["ms"] > 0 and eager["ratio"] == pytest.approx(1.0) and eager["error_exact"] < 0.05
    for impl in ("cdm-triton", "cdm-cuda"):
        assert by_impl[(impl, "fp8")]["ms"] is None and by_impl[(impl, "fp8")]["note"].startswith("skipped")
    # The torch backend follows the package's fp8 recipe, so it matches the quantised reference closely.
    assert by_impl[("cdm-torch", "fp8")]["error_quantized"] < 1e-2


def test_append_jsonl_appends_strict_json_lines_with_non_finite_floats_as_strings(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    common.append_jsonl(path, [{"a": 1.5, "err": math.inf}])
    common.append_jsonl(path, [{"a": None, "err": [math.nan]}])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"a": 1.5, "err": "inf"}, {"a": None, "err": ["nan"]}]


def test_format_table_aligns_columns_and_prints_missing_values_as_dashes():
    rows = [{"impl": "a", "ms": 1.25}, {"impl": "longer-name", "ms": None}]
    columns = [common.Column("impl", "impl"), common.Column("ms", "ms", "{:.2f}")]
    lines = common.format_table(rows, columns).splitlines()
    assert lines[0].split() == ["impl", "ms"]
    assert lines[2] == "a            1.25"
    assert lines[3] == "longer-name     -"


def test_rel_error_is_zero_for_equal_tensors_and_infinite_for_nan():
    ref = torch.randn(5, 3)
    assert common.rel_error(ref, ref) == 0.0
    bad = ref.clone()
    bad[2, 1] = math.nan
    assert common.rel_error(bad, ref) == math.inf


def test_bench_all_runs_each_entry_with_its_arguments_into_its_results_file(tmp_path, monkeypatch):
    from bench import all as bench_all

    calls = []

    class FakeModule:
        def __init__(self, name):
            self.name = name

        def main(self, argv):
            calls.append((self.name, argv))
            return 1 if self.name == "bench.wgrad" else 0

    monkeypatch.setattr(bench_all.importlib, "import_module", FakeModule)
    status = bench_all.main(
        ["--out-dir", str(tmp_path), "--check-targets", "--only", "lora,lora_decode,wgrad,latent_memory"]
    )
    assert status == 1  # wgrad failed; the others still ran
    assert calls == [
        ("bench.lora", ["--out", str(tmp_path / "lora.jsonl"), "--check-targets"]),
        ("bench.lora", ["--decode", "--4bit", "--out", str(tmp_path / "lora.jsonl"), "--check-targets"]),
        ("bench.wgrad", ["--out", str(tmp_path / "wgrad.jsonl"), "--check-targets"]),
        ("bench.latent_memory", ["--out", str(tmp_path / "latent_memory.jsonl")]),
    ]


def test_bench_all_entries_name_real_modules_with_a_main():
    import importlib

    from bench import all as bench_all

    for name, bench in bench_all.BENCHES.items():
        assert callable(importlib.import_module(bench.module).main), name


def test_format_table_with_notes_numbers_distinct_notes_and_leaves_the_rows_alone():
    rows = [
        {"impl": "a", "bytes": 2**21, "note": "skipped: x"},
        {"impl": "b", "bytes": None, "note": ""},
        {"impl": "c", "bytes": 2**20, "note": "skipped: x"},
        {"impl": "d", "bytes": 0, "note": "slow"},
    ]
    before = [dict(row) for row in rows]
    columns = [
        common.Column("impl", "impl"),
        common.Column("MiB", "mib", "{:.1f}"),
        common.Column("n", "note_ref"),
    ]
    text = common.format_table_with_notes(rows, columns, {"mib": common.mib("bytes")})
    lines = text.splitlines()
    assert lines[2].split() == ["a", "2.0", "[1]"] and lines[3].split() == ["b", "-", "-"]
    assert lines[4].split() == ["c", "1.0", "[1]"] and lines[5].split() == ["d", "0.0", "[2]"]
    assert lines[6:] == ["[1] skipped: x", "[2] slow"]
    assert rows == before
