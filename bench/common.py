"""What every bench shares: the environment record, timing, rotating inputs, errors, ceilings, output.

Timing on CUDA is the median of per-call CUDA-event times after a warm-up, cycling through enough copies
of the inputs that they do not fit in L2 (see `rotating_input_sets`). On the CPU it is the median wall
time of a few calls: correct, but never a performance claim. Results are JSON lines, one per
(impl, case), appended to `bench/results/<name>.jsonl`; non-finite floats are written as the strings
"inf" / "nan" so that every line is strict JSON.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdm_fast import device as devices

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
NO_GPU_NOTICE = "no GPU: Triton and CUDA kernels were not timed; CPU timings are not performance claims"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_results_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.jsonl"


def peak_memory(fn: Callable, args: tuple, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


# ---------------------------------------------------------------- environment


def git_commit() -> tuple[str | None, bool | None]:
    """(short hash, dirty) of the checkout the bench runs from; (None, None) without git or a repository."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head or None, bool(status.strip())


def environment(device: torch.device) -> dict[str, Any]:
    """Device, compute capability, versions, git commit and a UTC timestamp; no hostname."""
    triton_version = None
    if devices.triton_available():
        import triton

        triton_version = triton.__version__
    info = devices.device_info(device) if device.type == "cuda" else None
    commit, dirty = git_commit()
    return {
        "device": info.name if info else "cpu",
        "cc": f"{info.capability[0]}.{info.capability[1]}" if info else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- inputs and timing


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def rotating_input_sets(
    make_inputs: Callable[[], Sequence[Any]],
    device: torch.device,
    *,
    l2_multiple: float = 2.0,
    max_sets: int = 32,
) -> list[tuple[Any, ...]]:
    """Independent input sets from `make_inputs()`, enough that together they exceed `l2_multiple` × L2.

    Timing cycles through them, so no call finds its inputs left in L2 by the call before. One set on
    the CPU, and one set when a single set is already that large.
    """
    first = tuple(make_inputs())
    if device.type != "cuda":
        return [first]
    info = devices.device_info(device)
    l2_bytes = info.l2_cache_bytes if info and info.l2_cache_bytes else 64 * 2**20
    count = min(max_sets, max(1, math.ceil(l2_multiple * l2_bytes / max(1, tensor_bytes(first)))))
    return [first] + [tuple(make_inputs()) for _ in range(count - 1)]


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    min_ms: float
    repeats: int
    method: str  # "cuda-events-median" | "cpu-wall-median"


def time_fn(
    fn: Callable[..., Any],
    input_sets: Sequence[Sequence[Any]],
    device: torch.device,
    *,
    repeats: int,
    warmup_ms: float = 25.0,
) -> Timing:
    """Median time of `fn(*input_sets[i % k])`, after warm-up (which also absorbs compilation/autotuning)."""
    if device.type == "cuda":
        return _time_cuda(fn, input_sets, repeats, warmup_ms)
    return _time_cpu(fn, input_sets, repeats)


def _time_cuda(fn, input_sets, repeats, warmup_ms) -> Timing:
    count = len(input_sets)
    fn(*input_sets[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    warm = 0
    while warm < 3 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn(*input_sets[warm % count])
        warm += 1
        torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    for i, (begin, end) in enumerate(events):
        args = input_sets[i % count]
        begin.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    times = [begin.elapsed_time(end) for begin, end in events]
    return Timing(
        ms=statistics.median(times), min_ms=min(times), repeats=repeats, method="cuda-events-median"
    )


def _time_cpu(fn, input_sets, repeats) -> Timing:
    count = len(input_sets)
    fn(*input_sets[0])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(*input_sets[i % count])
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(ms=statistics.median(times), min_ms=min(times), repeats=repeats, method="cpu-wall-median")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (on out's device); NaN or Inf anywhere counts as infinite error."""
    out64, ref64 = out.detach().double(), ref.detach().to(device=out.device, dtype=torch.float64)
    if not torch.isfinite(out64).all():
        return math.inf
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------- ceilings


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """e4m3 a (M, K) row-major @ e4m3 b (K, N) column-major -> bf16, fp32 accumulation (no fast accum).

    Scales are fp32: 0-d tensors (tensor-wise) or (M, 1) and (1, N) (row-wise, where the device has it).
    """
    return torch._scaled_mm(
        a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=False
    )


def measure_ceilings(device: torch.device, size: int = 8192) -> dict[str, float] | None:
    """What this GPU reaches on a large GEMM (bf16, and e4m3 tensor-wise on cc >= 8.9) and a device copy.

    Returns {"bf16_gemm_tflops", "fp8_gemm_tflops" (absent below cc 8.9), "copy_gb_s"} or None on the
    CPU. The copy counts bytes read plus bytes written. Random data, never zeros.
    """
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    gemm_flops = 2 * size**3
    ceilings = {"bf16_gemm_tflops": gemm_flops / time_fn(torch.matmul, [(a, b)], device, repeats=20).ms / 1e9}
    if torch.cuda.get_device_capability(device) >= (8, 9):
        one = torch.ones((), device=device)
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().t().to(torch.float8_e4m3fn)
        fp8 = time_fn(lambda p, q: scaled_mm(p, q, one, one), [(a8, b8)], device, repeats=20)
        ceilings["fp8_gemm_tflops"] = gemm_flops / fp8.ms / 1e9
    del a, b
    source = torch.randn(2**28, device=device)
    target = torch.empty_like(source)
    copy = time_fn(lambda s, t: t.copy_(s), [(source, target)], device, repeats=20)
    ceilings["copy_gb_s"] = 2 * tensor_bytes([source]) / copy.ms / 1e6
    return ceilings


# ---------------------------------------------------------------- output


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Append one strict-JSON line per row to `path` (folders created as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
    return path


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    format: str = "{}"  # applied to non-None values; None prints as "-"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Plain-text table: numbers right-aligned, text left-aligned, "-" for missing values."""
    cells = []
    for row in rows:
        value_cells = []
        for column in columns:
            value = row.get(column.key)
            value_cells.append("-" if value is None else column.format.format(value))
        cells.append(value_cells)
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c.key), (int, float)) or row.get(c.key) is None for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    header = line([c.header for c in columns])
    return "\n".join([header, "-" * len(header)] + [line(r) for r in cells])


def mib(key: str) -> Callable[[dict[str, Any]], float | None]:
    """A `format_table_with_notes` cell: the row's byte count under `key` in MiB (None stays None)."""
    return lambda row: None if row.get(key) is None else row[key] / 2**20


def format_table_with_notes(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    derived: Mapping[str, Callable[[dict[str, Any]], Any]] | None = None,
) -> str:
    """`format_table` with each distinct note as a numbered footnote under the table, referenced as [i] from
    the column whose key is "note_ref". `derived` adds computed cells (key -> function of the row). The rows
    themselves are not changed (they are also the JSON lines)."""
    notes: list[str] = []
    shown = []
    for row in rows:
        cells = {**row, **{key: cell(row) for key, cell in (derived or {}).items()}, "note_ref": None}
        if row.get("note"):
            if row["note"] not in notes:
                notes.append(row["note"])
            cells["note_ref"] = f"[{notes.index(row['note']) + 1}]"
        shown.append(cells)
    return format_table(shown, columns) + "".join(f"\n[{i}] {note}" for i, note in enumerate(notes, 1))
