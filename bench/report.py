"""BENCHMARKS.md from the JSON lines under bench/results/: `python -m bench.report [--results DIR] [--out P]`.

Input: one `<bench>.jsonl` per bench (rows as `bench.common.append_jsonl` writes them: the environment keys
device, cc, torch, triton, cuda, git_commit, git_dirty, timestamp in every row, then the bench's own fields).
Output: Markdown, a pure function of those rows (`render`), so the same files give the same bytes.

What counts as a measurement: a row from a GPU (device != "cpu"), not a smoke run, whose
`performance_claim` is not False (benches that write that field) and which holds a timing. CPU rows never
appear as performance; they are only counted in the list of files.

Runs: the rows of one bench invocation share the environment keys (one `environment()` call per run, so
one timestamp). Per bench, device and table — lora's suites (training/decode × bf16/nf4 base) and its
memory rows come from separate invocations, so each is its own table — the newest run is shown, with its
device, compute capability, versions and git commit.

Ceilings are those the run measured (`bench.common.measure_ceilings`: a large bf16 and e4m3 GEMM and a device
copy, stored in each row's "ceilings"). Where a row has FLOPs and bytes, its roofline floor is
max(flops / bf16 GEMM rate, bytes / copy rate) and the measured time is shown as a multiple of it.
Target verdicts are the benches' own: `check_targets` of lora (with `check_targets_4bit`), attention,
wgrad and lora_distill run on the shown rows; projection's are the verdicts its run stored in "targets"
(its check times a GEMMs-only row, so it cannot be re-run from the rows).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import all as bench_all
from bench import common

DEFAULT_OUT = common.REPO_ROOT / "BENCHMARKS.md"
ENV_KEYS = ("device", "cc", "torch", "triton", "cuda", "git_commit", "git_dirty", "timestamp")
# The benches this report has tables for, in the order they appear.
KERNELS = ("projection", "lora", "attention", "wgrad")
LOOPS = ("lora_distill", "latent_memory", "cdm")
REPORTED = KERNELS + LOOPS
LORA_SLOTS = ("training-bf16", "training-nf4", "decode-bf16", "decode-nf4", "memory")
GPU_CHECK = "bash bench/gpu_check.sh OUT bench"
# How each table's rows are produced on the GPU machine (bench.all's run names, `GPU_CHECK_BENCHES`).
COMMANDS = {
    "projection": f"GPU_CHECK_BENCHES=projection {GPU_CHECK}",
    "lora/training-bf16": f"GPU_CHECK_BENCHES=lora {GPU_CHECK}",
    "lora/training-nf4": f"GPU_CHECK_BENCHES=lora_4bit {GPU_CHECK}",
    "lora/memory": f"GPU_CHECK_BENCHES=lora_4bit {GPU_CHECK}",
    "lora/decode-bf16": f"GPU_CHECK_BENCHES=lora_decode {GPU_CHECK}",
    "lora/decode-nf4": f"GPU_CHECK_BENCHES=lora_decode {GPU_CHECK}",
    "attention": f"GPU_CHECK_BENCHES=attention {GPU_CHECK}",
    "wgrad": f"GPU_CHECK_BENCHES=wgrad {GPU_CHECK}",
    "lora_distill": f"GPU_CHECK_BENCHES=lora_distill {GPU_CHECK}",
    "latent_memory": f"GPU_CHECK_BENCHES=latent_memory {GPU_CHECK}",
    "cdm": f"GPU_CHECK_BENCHES=cdm {GPU_CHECK}",
}
# What a bench's rows carry for a roofline (read from the bench code that builds them).
SCHEMA_GAPS = {
    "wgrad": "records step times and ratios only: no FLOPs, bytes or ceilings, so no roofline",
    "lora_distill": "records tokens/s, ratios and peak memory: no FLOPs, bytes or ceilings, so no roofline",
    "latent_memory": "records peak memory (and the arithmetic estimate): no time, no ceilings",
    "cdm": "records prompts/s and peak memory: no FLOPs, bytes or ceilings",
    "ceilings": "the fp8 ceiling is a tensor-wise e4m3 `torch._scaled_mm`; no MX block-scaled GEMM ceiling "
    "is measured, so on sm_120 the mx path's fraction of its own peak is not known",
}
# Where to look first when a target is missed: pointers from the benches' docstrings, not predictions.
NEXT_STEPS = {
    "projection": "compare with the `scaled-mm-gemms-only` row: the gap to it is the fused sin/cos and "
    "feature quantisation; profile the kernel with ncu (tensor-pipe use, stalls) before changing tiles",
    "lora": "the `over base` column is the adapter's cost over the frozen Linear: profile the fused kernel's "
    "main loop with ncu; at decode sizes compare cdm-triton-splitk with cdm-triton-mainloop",
    "attention": "run the L2 hit-rate commands printed by `python -m bench.attention --ncu` for both launch "
    "orders; compare `vs plain` and the × floor column",
    "wgrad": "read the deferred row's overlap: near 0 means the side stream found no idle SMs (the note says "
    "so); `auto` should then have chosen sync",
}
SM_120_TEXT = """\
The package targets sm_120 (consumer Blackwell, RTX 5090-class) and is tested on sm_90 (Hopper). What differs:

- **Shared memory per block**: 101,376 B on sm_120 (as on sm_86/sm_89) against 232,448 B on sm_90
  (`cdm_fast/device.py`). Autotune configs are pruned per arch to fit; the fp32-operand and D = 256
  attention tiles are the ones that still fit sm_120 (`kernels/projection.py`, `kernels/lora.py`,
  `kernels/attention.py`).
- **No wgmma and no TMEM**: plain GEMMs compile to `mma.sync` on sm_120, `wgmma.mma_async` on sm_90
  (`kernels/registry.py` MMA_FORMS, checked ahead of time by `python -m bench.aot`).
- **MXFP8 path**: the "mx" fp8 recipe (`cdm_fast/float8.py`) stores one power-of-two ue8m0 scale per 32
  elements along K and runs the block-scaled MMA `mma.sync … kind::mxf8f6f4.block_scale … e4m3.e4m3 … ue8m0`
  (Triton `tl.dot_scaled`; `csrc/projection.cu` on sm_120a). sm_90 has no block-scaled MMA: its recipe is
  "rowwise" (one fp32 scale per row / column, `wgmma … e4m3`), and Triton upcasts mx operands to bf16 there.
  `default_scaling` picks mx on compute capability >= 10, rowwise below.
- **Ceilings**: `measure_ceilings` times a tensor-wise e4m3 `_scaled_mm`, not an MX block-scaled GEMM."""


class ReportError(ValueError):
    """A results file that is not one JSON object per line; the message names the file and the line."""


# ---------------------------------------------------------------- loading


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"non-standard JSON constant {constant}")


def load_results(directory: Path) -> dict[str, list[dict]]:
    """{file stem: rows} of every `*.jsonl` in `directory`, empty lines skipped; ReportError on a bad line."""
    results: dict[str, list[dict]] = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_reject_constant)
            except ValueError as error:
                raise ReportError(f"{path}:{number}: not a JSON line: {error}") from None
            if not isinstance(row, dict):
                raise ReportError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        results[path.stem] = rows
    return results


# ---------------------------------------------------------------- runs


def _number(value: Any) -> float | None:
    """The value as a float when it is a finite JSON number; None otherwise (missing, "inf", text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_gpu_row(row: Mapping[str, Any]) -> bool:
    """A row of a full run on a GPU: device not "cpu" and not smoke."""
    return row.get("device") not in (None, "cpu") and not row.get("smoke")


def is_measurement(row: Mapping[str, Any], key: str = "ms") -> bool:
    """A GPU row that claims performance and holds `key` as a number."""
    return is_gpu_row(row) and row.get("performance_claim") is not False and _number(row.get(key)) is not None


def _has_measurement(row: Mapping[str, Any]) -> bool:
    """Any of the benches' measured quantities: a time, a peak memory, prompts/s, latent_memory's peak."""
    measured = row.get("measured")
    return any(is_measurement(row, key) for key in ("ms", "peak_memory_bytes", "prompts_per_s")) or (
        isinstance(measured, dict) and is_gpu_row(row) and _number(measured.get("peak_gib")) is not None
    )


def _cc(row: Mapping[str, Any]) -> str:
    """Compute capability as "9.0": environment() writes "9.0"; [9, 0] is accepted too."""
    cc = row.get("cc")
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        return f"{cc[0]}.{cc[1]}"
    return "-" if cc is None else str(cc)


def _timestamp(row: Mapping[str, Any]) -> datetime.datetime:
    try:
        stamp = datetime.datetime.fromisoformat(str(row.get("timestamp")))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def _run_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(json.dumps(row.get(key), sort_keys=True) for key in ENV_KEYS)


def _slot(bench: str, row: Mapping[str, Any]) -> str:
    """The table a row belongs to: lora's suite-base or "memory", the bench's name otherwise."""
    if bench != "lora":
        return bench
    if row.get("case") == "memory":
        return "memory"
    return f"{row.get('suite', 'training')}-{row.get('base', 'bf16')}"


@dataclass(frozen=True)
class Run:
    """The newest GPU run of one bench's table on one device: its rows, in the order the bench wrote them."""

    bench: str
    slot: str
    rows: list[dict]

    @property
    def env(self) -> dict[str, Any]:
        return {key: self.rows[0].get(key) for key in ENV_KEYS}

    @property
    def ceilings(self) -> dict[str, float] | None:
        return next((r["ceilings"] for r in self.rows if isinstance(r.get("ceilings"), dict)), None)


def newest_runs(bench: str, rows: Sequence[dict]) -> dict[str, dict[str, Run]]:
    """{device: {slot: Run}}: per device and table, the GPU rows of the newest run (tie: the last written)."""
    runs: dict[tuple[str, str, tuple[str, ...]], list[dict]] = {}
    last_line: dict[tuple[str, str, tuple[str, ...]], int] = {}
    for index, row in enumerate(rows):
        if is_gpu_row(row):
            key = (str(row["device"]), _slot(bench, row), _run_key(row))
            runs.setdefault(key, []).append(row)
            last_line[key] = index
    # Ascending (timestamp, position in the file): the newest run of each (device, slot) is set last.
    chosen: dict[str, dict[str, Run]] = {}
    for key in sorted(runs, key=lambda k: (_timestamp(runs[k][0]), last_line[k])):
        device, slot, _ = key
        chosen.setdefault(device, {})[slot] = Run(bench, slot, runs[key])
    return {device: dict(sorted(slots.items())) for device, slots in sorted(chosen.items())}


# ---------------------------------------------------------------- numbers


def roofline(
    row: Mapping[str, Any], ceilings: Mapping[str, float] | None
) -> tuple[float | None, float | None]:
    """(floor ms, measured ms / floor) from the row's flops and bytes and the run's bf16 GEMM and copy rates.

    floor = max(flops / bf16_gemm_tflops, bytes / copy_gb_s); either term alone where only one is known.
    """
    ms = _number(row.get("ms"))
    if ms is None or not ceilings:
        return None, None
    times = []
    flops, nbytes = _number(row.get("flops")), _number(row.get("bytes"))
    gemm, copy_rate = _number(ceilings.get("bf16_gemm_tflops")), _number(ceilings.get("copy_gb_s"))
    if flops is not None and gemm:
        times.append(flops / (gemm * 1e9))
    if nbytes is not None and copy_rate:
        times.append(nbytes / (copy_rate * 1e6))
    if not times or max(times) <= 0:
        return None, None
    floor = max(times)
    return floor, ms / floor


def fraction(value: Any, ceiling: Any) -> float | None:
    value, ceiling = _number(value), _number(ceiling)
    return value / ceiling if value is not None and ceiling else None


def _fmt(value: Any, spec: str = "{}") -> str:
    """A cell: numbers through `spec`, None as "-", anything else (e.g. "inf") as text."""
    number = _number(value)
    if number is not None:
        return spec.format(value if isinstance(value, int) else number)
    return "-" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A Markdown table; `numeric` columns are right-aligned; "|" in a cell is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


@dataclass(frozen=True)
class Col:
    header: str
    cell: Callable[[dict], str]
    numeric: bool = True


def _table(rows: Sequence[dict], columns: Sequence[Col]) -> str:
    return markdown_table(
        [c.header for c in columns],
        [[c.cell(r) for c in columns] for r in rows],
        [c.numeric for c in columns],
    )


def _key(key: str, spec: str = "{}", numeric: bool = True, header: str | None = None) -> Col:
    return Col(header or key, lambda row: _fmt(row.get(key), spec), numeric)


def _mib(key: str, header: str) -> Col:
    return Col(header, lambda row: _fmt(common.mib(key)(row), "{:.0f}"))


def _rate_cols(ceilings: Mapping[str, float] | None) -> list[Col]:
    """TFLOP/s, GB/s, their fractions of the run's bf16 GEMM and copy ceilings, floor and × floor."""
    ceilings = ceilings or {}

    def floor(row: dict) -> tuple[float | None, float | None]:
        return roofline(row, ceilings)

    return [
        _key("tflops", "{:.3g}", header="TFLOP/s"),
        Col(
            "of bf16 GEMM",
            lambda r: _fmt(fraction(r.get("tflops"), ceilings.get("bf16_gemm_tflops")), "{:.0%}"),
        ),
        _key("gb_s", "{:.4g}", header="GB/s"),
        Col("of copy", lambda r: _fmt(fraction(r.get("gb_s"), ceilings.get("copy_gb_s")), "{:.0%}")),
        Col("floor ms", lambda r: _fmt(floor(r)[0], "{:.3f}")),
        Col("× floor", lambda r: _fmt(floor(r)[1], "{:.2f}")),
    ]


def _run_header(run: Run) -> str:
    env = run.env
    commit = f"{env['git_commit'] or 'unknown'}" + (" (dirty)" if env["git_dirty"] else "")
    text = (
        f"Run: {env['device']} (cc {_cc(env)}), torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, commit {commit}, {env['timestamp']}."
    )
    ceilings = run.ceilings
    if ceilings:
        parts = [
            f"bf16 GEMM {_fmt(ceilings.get('bf16_gemm_tflops'), '{:.4g}')} TFLOP/s",
            f"fp8 GEMM {_fmt(ceilings.get('fp8_gemm_tflops'), '{:.4g}')} TFLOP/s",
            f"copy {_fmt(ceilings.get('copy_gb_s'), '{:.4g}')} GB/s",
        ]
        text += " Measured ceilings: " + ", ".join(parts) + "."
    else:
        text += " No ceilings recorded in this run."
    return text


def _import(bench: str) -> ModuleType:
    # Imported only for benches with GPU rows: a bench module pulls torch, transformers, peft (seconds).
    return importlib.import_module(f"bench.{bench}")


def _run_check(check: Callable[[], list[str]]) -> tuple[list[str], str | None]:
    """(what the check returned, None), or ([], why it could not run): rows of an older bench schema must
    not stop the rest of the report."""
    try:
        return check(), None
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        return [], f"the check could not run on these rows: {type(error).__name__}: {error}"


def _code_block(lines: Sequence[str]) -> str:
    return "```\n" + "\n".join(line.rstrip() for line in lines).strip("\n") + "\n```"


# ---------------------------------------------------------------- per bench


@dataclass
class Section:
    """One bench's Markdown blocks, and a note per missed target (roofline and next step)."""

    text: list[str]
    missed: list[str]


def _projection(device: str, runs: dict[str, Run]) -> Section:
    module = _import("projection")
    run = runs["projection"]
    text, missed = [_run_header(run)], []
    ceilings = run.ceilings or {}

    def best_scaled_mm(row: dict) -> float | None:
        peers = [
            _number(r.get("ms"))
            for r in run.rows
            if r.get("impl") in module.SCALED_MM_PEERS
            and r.get("precision") == row.get("precision")
            and r.get("shape") == row.get("shape")
            and is_measurement(r)
        ]
        peers = [p for p in peers if p]
        ms = _number(row.get("ms"))
        return min(peers) / ms if peers and ms else None

    def floor(row: dict) -> float | None:
        # Compute at the measured GEMM rates of the operand types (peak_fraction = that time / ms), or the
        # op's bytes at the measured copy rate, whichever is longer.
        peak, ms = _number(row.get("peak_fraction")), _number(row.get("ms"))
        nbytes, copy_rate = _number(row.get("bytes")), _number(ceilings.get("copy_gb_s"))
        times = [
            t
            for t in (
                peak * ms if peak and ms else None,
                nbytes / (copy_rate * 1e6) if nbytes and copy_rate else None,
            )
            if t
        ]
        return max(times) if times else None

    def times_floor(row: dict) -> float | None:
        ms, lowest = _number(row.get("ms")), floor(row)
        return ms / lowest if ms and lowest else None

    columns = [
        _key("impl", numeric=False),
        _key("precision", numeric=False),
        _key("scaling", numeric=False),
        _key("ms", "{:.3f}"),
        _key("tflops", "{:.3g}", header="TFLOP/s"),
        _key("peak_fraction", "{:.0%}", header="of GEMM ceilings"),
        _key("gb_s", "{:.0f}", header="GB/s"),
        Col("of copy", lambda r: _fmt(fraction(r.get("gb_s"), ceilings.get("copy_gb_s")), "{:.0%}")),
        Col("floor ms", lambda r: _fmt(floor(r), "{:.3f}")),
        Col("× floor", lambda r: _fmt(times_floor(r), "{:.2f}")),
        _key("ratio", "{:.2f}x", header=f"vs {module.BASELINE}"),
        Col("vs best _scaled_mm", lambda r: _fmt(best_scaled_mm(r), "{:.2f}x")),
        _key("error_exact", "{:.2e}", header="err exact"),
        _key("error_quantized", "{:.2e}", header="err quant"),
    ]
    shapes = {json.dumps(r.get("shape"), sort_keys=True): r.get("shape") for r in reversed(run.rows)}
    for shape in dict.fromkeys(json.dumps(r.get("shape"), sort_keys=True) for r in run.rows):
        rows = [r for r in run.rows if json.dumps(r.get("shape"), sort_keys=True) == shape]
        text.append(f"Shape {_shape_text(shapes[shape])}:")
        text.append(_table([r for r in rows if is_measurement(r)], columns))
    text += _not_timed(run.rows)
    if not ceilings:
        text.append("No ceilings in this run: `of GEMM ceilings` and the floor are not computed.")
    judged = [r for r in run.rows if isinstance(r.get("targets"), dict)]
    lines = []
    if not any(r.get("precision") == "fp8" and is_measurement(r) for r in run.rows):
        lines.append("not checked: no fp8 row was timed in this run")
    elif not judged:
        lines.append("not judged: this run had no --check-targets")
    for row in judged:
        targets = row["targets"]
        for key, bound in module.TARGETS.items():
            value = _number(targets.get(key))
            verdict = "n/a" if value is None else ("PASS" if value >= bound else "FAIL")
            lines.append(
                f"{row['impl']:<11} {key:<20} {_fmt(value, '{:.2f}'):>6} (target >= {bound})  {verdict}"
            )
            if verdict == "FAIL":
                multiple = 1 / row["peak_fraction"] if _number(row.get("peak_fraction")) else None
                missed.append(
                    f"projection {row['impl']} {row['precision']}: {key} {value:.2f} < {bound}; measured "
                    f"{_fmt(row.get('ms'), '{:.3f}')} ms, compute floor {_fmt(floor(row), '{:.3f}')} ms "
                    f"({_fmt(multiple, '{:.2f}')}× floor). Next: {NEXT_STEPS['projection']}."
                )
    text.append("Targets (verdicts stored by the run's `--check-targets`: " + _targets_text(module) + "):")
    text.append(_code_block(lines))
    return Section(text, missed)


def _targets_text(module: ModuleType) -> str:
    return ", ".join(f"{k} >= {v}" for k, v in module.TARGETS.items())


def _shape_text(shape: Any) -> str:
    if not isinstance(shape, dict):
        return str(shape)
    if "projections" in shape:
        return (
            f"layer set ({len(shape['projections'])} projections) {shape.get('tokens')} tok r{shape.get('r')}"
        )
    if {"tokens", "in", "out", "r"} <= shape.keys():
        return f"{shape['tokens']} tok {shape['in']}→{shape['out']} r{shape['r']}"
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _not_timed(rows: Sequence[dict], name_key: str = "impl") -> list[str]:
    """A "Not timed" paragraph: one line per distinct (peer, note) of the rows that hold no measurement."""
    lines = sorted(
        dict.fromkeys(
            f"- `{r.get(name_key)}`: {r.get('note') or 'no timing recorded'}"
            for r in rows
            if not is_measurement(r)
        )
    )
    return ["Not timed in this run:\n" + "\n".join(lines)] if lines else []


def _verdict_missed(bench: str, rows: Sequence[dict], ceilings: Mapping[str, float] | None) -> list[str]:
    """Rows whose stored verdicts (after the bench's check) include "fail", with their roofline."""
    missed = []
    for row in rows:
        targets = row.get("targets")
        if not isinstance(targets, dict) or not is_measurement(row):
            continue
        verdicts = targets.get("verdicts") or {
            name: value.get("verdict") for name, value in targets.items() if isinstance(value, dict)
        }
        failed = sorted(name for name, verdict in verdicts.items() if verdict == "fail")
        if not failed:
            continue
        floor, multiple = roofline(row, ceilings)
        where = f"{_shape_text(row.get('shape'))} {row.get('mode')}"
        if bench == "attention":
            where += f" density {row.get('target_density')} entropy {row.get('entropy')}"
        elif bench == "lora":
            where = f"{row.get('suite')}-{row.get('base')} " + where
        missed.append(
            f"{bench} {row.get('impl')} at {where}: missed {', '.join(failed)}; measured "
            f"{_fmt(row.get('ms'), '{:.3f}')} ms, roofline floor {_fmt(floor, '{:.3f}')} ms "
            f"({_fmt(multiple, '{:.2f}')}× floor). Next: {NEXT_STEPS[bench]}."
        )
    return missed


def _judged_copies(runs: dict[str, Run]) -> list[dict]:
    """Deep copies of the runs' rows that claim performance, "targets" cleared so that the verdicts come
    from this check only (the kernel benches' checks judge every row they are given)."""
    rows = [
        copy.deepcopy(r) for run in runs.values() for r in run.rows if r.get("performance_claim") is not False
    ]
    for row in rows:
        row["targets"] = None
    return rows


def _lora(device: str, runs: dict[str, Run]) -> Section:
    module = _import("lora")
    text, missed = [], []
    for slot in LORA_SLOTS:
        run = runs.get(f"lora/{slot}")
        if run is None:
            continue
        text.append(
            f"#### {slot}"
            + ("" if slot == "memory" else f" (vs peft = {_lora_baseline(module, slot)} ms / ms)")
        )
        text.append(_run_header(run))
        if slot == "memory":
            columns = [
                _key("impl", numeric=False),
                _key("base", numeric=False),
                _key("mode", numeric=False),
                _mib("peak_memory_bytes", "peak MiB"),
                _mib("weights_bytes", "weights MiB"),
                _key("vram_vs_bf16_base", "{:+.0%}", header="vs bf16 base"),
            ]
            text.append(_table([r for r in run.rows if is_measurement(r, "peak_memory_bytes")], columns))
            text += _not_timed([r for r in run.rows if not is_measurement(r, "peak_memory_bytes")])
            continue
        columns = [
            Col("shape", lambda r: _shape_text(r.get("shape")), False),
            _key("mode", numeric=False),
            _key("impl", numeric=False),
            _key("ms", "{:.3f}"),
            *_rate_cols(run.ceilings),
            _key("ratio_vs_peft", "{:.2f}x", header="vs peft"),
            _key("overhead_vs_base", "{:+.1%}", header="over base"),
            _mib("peak_memory_bytes", "peak MiB"),
            _key("error_vs_float64", "{:.2e}", header="err fp64"),
        ]
        text.append(_table([r for r in run.rows if is_measurement(r)], columns))
        text += _not_timed(run.rows)
    rows = _judged_copies({k: v for k, v in runs.items() if k.startswith("lora/")})
    env = {"device": device}
    lines, error = _run_check(lambda: module.check_targets(rows, env) + module.check_targets_4bit(rows, env))
    lines = lines or [str(error)]
    text.append("Targets (verbatim from `bench.lora.check_targets` and `check_targets_4bit` on these rows):")
    text.append(_code_block(lines))
    for slot in LORA_SLOTS:
        run = runs.get(f"lora/{slot}")
        if run is not None:
            slot_rows = [r for r in rows if _slot("lora", r) == slot]
            missed += _verdict_missed("lora", slot_rows, run.ceilings)
    return Section(text, missed)


def _lora_baseline(module: ModuleType, slot: str) -> str:
    return module.SUITES[slot].baseline if slot in module.SUITES else module.BASELINE


def _attention(device: str, runs: dict[str, Run]) -> Section:
    module = _import("attention")
    run = runs["attention"]
    text = [_run_header(run)]
    columns = [
        Col("shape", lambda r: _shape_text(r.get("shape")), False),
        _key("mode", numeric=False),
        _key("density_of_causal", "{:.3f}", header="of causal"),
        _key("impl", numeric=False),
        Col("entropy", lambda r: "yes" if r.get("entropy") else "no", False),
        _key("ms", "{:.3f}"),
        *_rate_cols(run.ceilings),
        _key("vs_sdpa", "{:.2f}x", header="vs SDPA"),
        _key("vs_flex", "{:.2f}x", header="vs Flex"),
        _key("vs_plain_order", "{:.2f}x", header="vs plain order"),
        _key("entropy_overhead", "{:+.1%}", header="entropy +"),
        _mib("peak_memory_bytes", "peak MiB"),
        _key("error_out", "{:.2e}", header="err out"),
    ]
    text.append(_table([r for r in run.rows if is_measurement(r)], columns))
    text += _not_timed(run.rows)
    rows = _judged_copies(runs)
    lines, error = _run_check(lambda: module.check_targets(rows, {"device": device}))
    lines = lines or [str(error)]
    text.append("Targets (verbatim from `bench.attention.check_targets` on these rows):")
    text.append(_code_block(lines))
    return Section(text, _verdict_missed("attention", rows, run.ceilings))


def _wgrad(device: str, runs: dict[str, Run]) -> Section:
    module = _import("wgrad")
    run = runs["wgrad"]
    text = [_run_header(run)]
    columns = [
        _key("case", numeric=False),
        _key("tokens"),
        _key("mode", numeric=False),
        _key("ms", "{:.3f}"),
        _key("ratio_vs_sync", "{:.3f}", header="sync / this"),
        _key("overlap_fraction", "{:.2f}", header="overlap"),
        _key("note", numeric=False),
    ]
    text.append(_table([r for r in run.rows if is_measurement(r)], columns))
    text += _not_timed(run.rows, "mode")
    failures, error = _run_check(lambda: module.check_targets(copy.deepcopy(run.rows)))
    lines = [f"TARGET MISSED: {failure}" for failure in failures] or [error or "no target missed"]
    text.append(
        "Targets (verbatim from `bench.wgrad.check_targets`: lora-stack at "
        f"{module.LORA_TARGET_TOKENS} tokens deferred >= {module.LORA_TARGET_GAIN:.0%} faster than sync; "
        f"auto never > {module.AUTO_MAX_SLOWDOWN:.0%} slower):"
    )
    text.append(_code_block(lines))
    missed = [
        f"wgrad: {failure}. No roofline (the bench records no FLOPs or bytes). Next: {NEXT_STEPS['wgrad']}."
        for failure in failures
    ]
    return Section(text, missed)


def _lora_distill(device: str, runs: dict[str, Run]) -> Section:
    module = _import("lora_distill")
    run = runs["lora_distill"]
    text = [_run_header(run), f"Weights: {module.WEIGHTS} (every row says so)."]
    columns = [
        _key("case", numeric=False),
        _key("seq_len", header="seq"),
        _key("peer", numeric=False),
        _key("ms", "{:.2f}"),
        _key("tokens_per_s", "{:.0f}", header="tokens/s"),
        _key("ratio_vs_peft", "{:.3f}x", header="vs peft"),
        _mib("peak_memory_bytes", "peak MiB"),
    ]
    text.append(_table([r for r in run.rows if is_measurement(r)], columns))
    text += _not_timed(run.rows, "peer")
    failures, error = _run_check(lambda: module.check_targets(copy.deepcopy(run.rows)))
    lines = [f"TARGET MISSED: {failure}" for failure in failures]
    verdict = "FAILED" if failures else "pass (every applicable peer ran; no numeric target)"
    lines.append(error or f"targets: {verdict}")
    text.append("Targets (verbatim from `bench.lora_distill.check_targets`):")
    text.append(_code_block(lines))
    return Section(text, [])


def _latent_memory(device: str, runs: dict[str, Run]) -> Section:
    run = runs["latent_memory"]
    columns = [
        _key("tokens"),
        Col("measured peak GiB", lambda r: _fmt((r.get("measured") or {}).get("peak_gib"), "{:.2f}")),
        Col("arithmetic GiB", lambda r: _fmt((r.get("arithmetic") or {}).get("total_gib"), "{:.2f}")),
        Col(
            "arithmetic, chunked CE",
            lambda r: _fmt((r.get("arithmetic") or {}).get("total_chunked_ce_gib"), "{:.2f}"),
        ),
        _key("kind", numeric=False),
    ]
    rows = [r for r in run.rows if _number((r.get("measured") or {}).get("peak_gib")) is not None]
    text = [
        _run_header(run),
        _table(rows, columns),
        "The seed claimed under 48 GB; no check function judges it.",
    ]
    return Section(text, [])


def _cdm(device: str, runs: dict[str, Run]) -> Section:
    run = runs["cdm"]
    columns = [
        _key("model", numeric=False),
        _key("impl", numeric=False),
        _key("prompts"),
        _key("batch_size", header="batch"),
        _key("max_new_tokens", header="new tokens"),
        _key("noise_samples", header="noise samples"),
        _key("prompts_per_s", "{:.3g}", header="prompts/s"),
        _key("peak_memory_gib", "{:.2f}", header="peak GiB"),
    ]
    rows = [r for r in run.rows if is_measurement(r, "prompts_per_s")]
    return Section([_run_header(run), _table(rows, columns), "No target: reported for scale."], [])


RENDERERS: dict[str, Callable[[str, dict[str, Run]], Section]] = {
    "projection": _projection,
    "lora": _lora,
    "attention": _attention,
    "wgrad": _wgrad,
    "lora_distill": _lora_distill,
    "latent_memory": _latent_memory,
    "cdm": _cdm,
}
TITLES = {
    "projection": "Fourier projection (`bench.projection`)",
    "lora": "Fused LoRA (`bench.lora`)",
    "attention": "Block-sparse attention (`bench.attention`)",
    "wgrad": "Deferred weight gradients (`bench.wgrad`)",
    "lora_distill": "lora-distill training step (`bench.lora_distill`)",
    "latent_memory": "latent-distill peak memory (`bench.latent_memory`)",
    "cdm": "CDM scoring speed (`bench.cdm`)",
}


# ---------------------------------------------------------------- headline


def _find(runs: dict[str, Run], slot: str, **match: Any) -> list[dict]:
    run = runs.get(slot)
    if run is None:
        return []
    return [r for r in run.rows if all(r.get(k) == v for k, v in match.items())]


def _best(rows: Sequence[dict], impls: Sequence[str], key: str, lowest: bool = False) -> dict | None:
    """The row among `impls` with the highest (or lowest) number under `key`."""
    candidates = [
        r for r in rows if r.get("impl", r.get("peer")) in impls and _number(r.get(key)) is not None
    ]
    candidates = [r for r in candidates if is_measurement(r) or is_measurement(r, key)]
    if not candidates:
        return None
    pick = min if lowest else max
    return pick(candidates, key=lambda r: (_number(r[key]), str(r.get("impl", r.get("peer")))))


def _headlines(device_runs: dict[str, dict[str, Run]]) -> list[tuple[str, str, str]]:
    """(headline, device, value) for every headline and device with rows; value "unmeasured" without."""
    modules = {
        name: _import(name)
        for name in ("projection", "lora", "attention", "wgrad", "lora_distill")
        if any(k.split("/")[0] == name for runs in device_runs.values() for k in runs)
    }
    specs: list[tuple[str, Callable[[dict[str, Run]], str | None]]] = []

    def ratio(row: dict | None, key: str, spec: str, name_key: str = "impl") -> str | None:
        return None if row is None else f"{_fmt(row.get(key), spec)} ({row.get(name_key)})"

    def projection(runs: dict[str, Run]) -> str | None:
        if "projection" not in modules:
            return None
        module = modules["projection"]
        rows = _find(runs, "projection", precision="fp8", shape=module.SHAPES["cuda"][0].as_dict())
        row = _best(rows, module.KERNEL_PEERS, "ratio")
        if row is None:
            return None
        scaled = [
            _number(r.get("ms"))
            for r in rows
            if r.get("impl") in module.SCALED_MM_PEERS and is_measurement(r)
        ]
        vs_scaled = f"; {min(scaled) / row['ms']:.2f}x vs best _scaled_mm" if scaled else ""
        return f"{row['ratio']:.2f}x vs {module.BASELINE} ({row['impl']}){vs_scaled}"

    def lora(slot: str, shape_name: str, key: str, spec: str, lowest: bool = False):
        def value(runs: dict[str, Run]) -> str | None:
            if "lora" not in modules:
                return None
            module = modules["lora"]
            shape = getattr(module, shape_name).as_dict()
            mode = "forward" if slot.startswith("decode") else "forward+backward"
            rows = _find(runs, f"lora/{slot}", case="projection", mode=mode, shape=shape)
            return ratio(_best(rows, module.OURS, key, lowest), key, spec)

        return value

    def attention(mode: str, density: float, key: str):
        def value(runs: dict[str, Run]) -> str | None:
            if "attention" not in modules:
                return None
            module = modules["attention"]
            rows = _find(
                runs,
                "attention",
                mode=mode,
                target_density=density,
                entropy=False,
                shape=module.TARGET_SHAPE.as_dict(),
            )
            return ratio(_best(rows, module.OURS, key), key, "{:.2f}x")

        return value

    def wgrad(runs: dict[str, Run]) -> str | None:
        if "wgrad" not in modules:
            return None
        rows = _find(
            runs, "wgrad", case="lora-stack", tokens=modules["wgrad"].LORA_TARGET_TOKENS, mode="deferred"
        )
        row = next((r for r in rows if is_measurement(r)), None)
        return None if row is None else f"{row['ratio_vs_sync']:.3f}x (sync ms / deferred ms)"

    def lora_distill(runs: dict[str, Run]) -> str | None:
        if "lora_distill" not in modules:
            return None
        for case in reversed(modules["lora_distill"].CASES):
            rows = _find(runs, "lora_distill", case=case.model.name, seq_len=case.seq_len)
            row = _best(rows, ("cdm-fused", "cdm-fused+wgrad"), "ratio_vs_peft")
            if row is not None:
                return f"{row['ratio_vs_peft']:.2f}x ({row['peer']}, {case.model.name}, seq {case.seq_len})"
        return None

    def latent_memory(runs: dict[str, Run]) -> str | None:
        run = runs.get("latent_memory")
        peaks = [_number((r.get("measured") or {}).get("peak_gib")) for r in run.rows] if run else []
        peaks = [p for p in peaks if p is not None]
        return f"{max(peaks):.2f} GiB (seed's claim: under 48 GB)" if peaks else None

    specs = [
        ("projection fp8, ours vs torch eager bf16 (and vs `_scaled_mm`)", projection),
        (
            "lora training fwd+bwd 8192 tok 4096², r32, ours vs peft",
            lora("training-bf16", "TARGET_SHAPE", "ratio_vs_peft", "{:.2f}x"),
        ),
        (
            "lora 4-bit base fwd+bwd, ours vs peft + bitsandbytes",
            lora("training-nf4", "TARGET_SHAPE", "ratio_vs_peft", "{:.2f}x"),
        ),
        (
            "lora 1-token decode, bf16 base: overhead over the base",
            lora("decode-bf16", "DECODE_TARGET_SHAPE", "overhead_vs_base", "{:+.1%}", True),
        ),
        (
            "attention 12.5 % fwd+bwd, ours vs dense-causal SDPA",
            attention("forward+backward", 0.125, "vs_sdpa"),
        ),
        (
            "attention 12.5 % fwd+bwd, ours vs Flex (same BlockMask)",
            attention("forward+backward", 0.125, "vs_flex"),
        ),
        ("attention dense causal forward, ours vs SDPA flash", attention("forward", 1.0, "vs_sdpa")),
        ("wgrad lora-stack 2048 tokens, deferred vs sync", wgrad),
        ("lora-distill step tokens/s, ours vs peft", lora_distill),
        ("latent-distill step peak memory", latent_memory),
    ]
    table = []
    for label, value_of in specs:
        found = [(device, value_of(runs)) for device, runs in device_runs.items()]
        found = [(device, value) for device, value in found if value is not None]
        table += [(label, device, value) for device, value in found] or [(label, "-", "unmeasured")]
    return table


# ---------------------------------------------------------------- the document


def render(results: Mapping[str, list[dict]]) -> str:
    """BENCHMARKS.md text from {bench name (file stem): rows}; deterministic for the same rows."""
    per_bench = {bench: newest_runs(bench, rows) for bench, rows in sorted(results.items())}
    # {device: {"bench" or "lora/<slot>": Run}} for the benches this report has tables for.
    device_runs: dict[str, dict[str, Run]] = {}
    for bench in REPORTED:
        for device, slots in per_bench.get(bench, {}).items():
            for slot, run in slots.items():
                device_runs.setdefault(device, {})[f"lora/{slot}" if bench == "lora" else bench] = run
    device_runs = dict(sorted(device_runs.items()))
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/*.jsonl; do not edit by hand. -->",
        "",
        "Generated by `python -m bench.report` from the JSON lines in `bench/results/`. Only rows from a GPU "
        "run (not smoke, claiming performance) count; per bench, table and device the newest run is shown. "
        "Ratios > 1 mean ours is faster. Ceilings are those each run measured "
        "(`bench.common.measure_ceilings`).",
        "",
    ]
    if not any(
        _has_measurement(r) for runs in device_runs.values() for run in runs.values() for r in run.rows
    ):
        out += ["**No GPU measurement yet**: every bench below is unmeasured on a GPU.", ""]
    out += ["## Headline", ""]
    out.append(
        markdown_table(["headline", "device", "value"], _headlines(device_runs), [False, False, False])
    )
    out.append("")
    missed: list[str] = []
    for bench in REPORTED:
        out += [f"## {TITLES[bench]}", ""]
        measured = False
        for device, runs in device_runs.items():
            bench_runs = {k: v for k, v in runs.items() if k.split("/")[0] == bench}
            if not bench_runs:
                continue
            measured = True
            out += [f"### {device}", ""]
            section = RENDERERS[bench](device, bench_runs)
            for block in section.text:
                out += [block, ""]
            missed += section.missed
        if not measured:
            out += [f"Unmeasured: no GPU rows. Produce them with `{_commands(bench)[0]}`.", ""]
        if bench in SCHEMA_GAPS:
            out += [f"Recorded fields: this bench {SCHEMA_GAPS[bench]}.", ""]
    out += ["## Targets missed: roofline and next step", ""]
    out += [
        "\n".join(f"- {line}" for line in missed) if missed else "None judged missed in the rows shown.",
        "",
    ]
    out += ["## What sm_120 changes", "", SM_120_TEXT, ""]
    sm_120 = sorted(
        {
            f"{key.split('/')[0]} ({device})"
            for device, runs in device_runs.items()
            for key, run in runs.items()
            if _cc(run.env).startswith("12.")
        }
    )
    if sm_120:
        out += ["Benches with sm_120 rows: " + ", ".join(sm_120) + ".", ""]
    else:
        out += [
            "**Nothing has been measured on sm_120**: no bench has rows from a compute capability 12.x "
            "device. Every number above (if any) is from another arch; the mx path's speed, the 101,376 B "
            "tile choices and the `mma.sync` GEMMs are unmeasured there.",
            "",
        ]
    out += ["## Not measured", ""]
    out += _not_measured(device_runs, results)
    out += ["## Results files", ""]
    out.append(
        markdown_table(
            ["file", "rows", "GPU rows", "shown"],
            [
                [
                    f"bench/results/{bench}.jsonl",
                    str(len(rows)),
                    str(sum(is_gpu_row(r) for r in rows)),
                    "yes" if bench in REPORTED else "no (not a performance bench)",
                ]
                for bench, rows in sorted(results.items())
            ],
            [False, True, True, False],
        )
        if results
        else "No results files."
    )
    return "\n".join(out).rstrip("\n") + "\n"


def _commands(bench: str) -> list[str]:
    if bench == "lora":
        return [COMMANDS[f"lora/{slot}"] for slot in LORA_SLOTS]
    return [COMMANDS[bench]]


def _not_measured(device_runs: dict[str, dict[str, Run]], results: Mapping[str, list[dict]]) -> list[str]:
    present = {key for runs in device_runs.values() for key in runs}
    tables = [b for b in REPORTED if b != "lora"] + [f"lora/{slot}" for slot in LORA_SLOTS]
    missing = sorted(t for t in tables if t not in present)
    lines = []
    if missing:
        lines.append(
            "Tables with no GPU rows, and the command that produces them (run from the repository root):"
        )
        lines.append("")
        lines += [f"- {table}: `{COMMANDS[table]}`" for table in missing]
        lines.append("")
    else:
        lines += ["Every table has GPU rows.", ""]
    lines += [
        "`bash bench/gpu_check.sh OUT bench` runs `python -m bench.all --check-targets` (every run in "
        f"`bench.all.BENCHES`: {', '.join(bench_all.BENCHES)}); `GPU_CHECK_BENCHES=a,b` picks a subset "
        "(one or two fit a 10-minute call). The embedded model does not travel to the GPU machine: there "
        "bench.cdm scores with SmolLM2-135M's configuration and random weights (its rows name the model).",
        "",
        "Transformer Engine is not a peer: its wheel (276 MB) cannot travel to the GPU machine, so the "
        "projection bench's `te-fp8-linear` row and lora's `te-linear` row are skipped with that reason.",
        "",
    ]
    gaps = [f"- {name}: {text}" for name, text in SCHEMA_GAPS.items()]
    lines += ["Fields the rows do not record (so the report cannot show them):", ""] + gaps + [""]
    return lines


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="folder of <bench>.jsonl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file written")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"bench.report: error: --results {args.results} is not a folder", file=sys.stderr)
        return 2
    try:
        results = load_results(args.results)
    except ReportError as error:
        print(f"bench.report: error: {error}", file=sys.stderr)
        return 2
    text = render(results)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} from {len(results)} file(s) in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
