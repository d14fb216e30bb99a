"""Fourier projection bench: `python -m bench.projection [--bf16] [--fp8] [--fp8-features]`.

    y = concat(sin(2π·x@freqs), cos(2π·x@freqs)) / sqrt(m) @ weight + bias
    x (N, d_in), freqs (d_in, m), weight (2m, d_out); FLOPs = 2·N·d_in·m + 2·N·2m·d_out

Times every peer below in one process on the same fresh random inputs (x ~ N(0, 1), freqs ~ N(0, 1/d_in)
so that phases are O(1) turns, weight ~ N(0, 1/(2m)), bias ~ N(0, 0.01/(2m)): a tenth of y's scale, so
the error measures the GEMMs rather than the exact bias add), in bf16. Ratios are against torch-eager-bf16.
Errors are ||y - ref|| / ||ref|| against `cdm_fast.ops.projection.reference` in float64 on the bench's
device, over up to --error-rows evenly spaced rows (rows are independent, so this is exact for them):
"exact" against the unquantised function, "quant" against the reference fed the same e4m3-rounded
operands (same recipe), for peers that follow a package recipe. No precision flag: bf16 and fp8.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import cdm_fast
from bench import common
from cdm_fast import dispatch
from cdm_fast.dispatch import BackendUnavailable
from cdm_fast.float8 import E4M3_MAX, FEATURE_SCALE, FLOAT8_SCALINGS, default_scaling, quantize_rowwise
from cdm_fast.ops.projection import OP, PRECISIONS, reference


class Shape(NamedTuple):
    n: int
    d_in: int
    m: int
    d_out: int

    def as_dict(self) -> dict[str, int]:
        return {"N": self.n, "d_in": self.d_in, "m": self.m, "d_out": self.d_out}

    @property
    def gemm_flops(self) -> tuple[int, int]:
        return 2 * self.n * self.d_in * self.m, 2 * self.n * 2 * self.m * self.d_out

    @property
    def min_bytes(self) -> int:
        """The op's bf16 operands read once and its output written once: what any implementation moves."""
        return 2 * (
            self.n * self.d_in
            + self.d_in * self.m
            + 2 * self.m * self.d_out
            + self.d_out
            + self.n * self.d_out
        )


SHAPES = {
    "cuda": [Shape(16384, 8192, 2048, 1536)],  # teacher latents (d_in 8192) to student width (1536)
    "cpu": [Shape(256, 512, 128, 192)],
}
BASELINE = "torch-eager-bf16"
TARGETS = {"vs_eager": 1.6, "vs_scaled_mm": 1.15, "of_scaled_mm_gemms": 0.60}
TE_MISSING = (
    "transformer-engine not installed (its core wheel is 276 MB and cannot be carried to the GPU machine)"
)

Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    shape: Shape
    precision: str
    scaling: str  # the package recipe asked for with --scaling
    device: torch.device
    compile_cpu: bool


@dataclass(frozen=True)
class Candidate:
    fn: Projection
    scaling: str | None  # the fp8 recipe it actually uses; None for bf16
    note: str = ""


class Skip(Exception):
    """This peer cannot run here; the message says why."""


# ---------------------------------------------------------------- peers


def _torch_projection(x, freqs, weight, bias):
    angle = (2 * math.pi) * (x @ freqs)
    features = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    return (features @ weight) / math.sqrt(freqs.shape[1]) + bias


def torch_eager(case: Case, inputs) -> Candidate:
    return Candidate(_torch_projection, scaling=None)


def torch_compile(case: Case, inputs) -> Candidate:
    if case.device.type != "cuda" and not case.compile_cpu:
        raise Skip("torch.compile is not timed on the CPU (compiling takes minutes there); --compile-cpu")
    return Candidate(torch.compile(_torch_projection, dynamic=False), scaling=None)


@functools.cache
def _scaled_mm_support(device: torch.device) -> tuple[str, bool]:
    """("rowwise" | "tensorwise", bias fused?): the best form of torch._scaled_mm this device accepts."""
    a = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn).t()
    bias = torch.randn(32, device=device, dtype=torch.bfloat16)
    scales = {
        "rowwise": (torch.ones(32, 1, device=device), torch.ones(1, 32, device=device)),
        "tensorwise": (torch.ones((), device=device), torch.ones((), device=device)),
    }
    for mode, fused in (("rowwise", True), ("rowwise", False), ("tensorwise", True), ("tensorwise", False)):
        try:
            common.scaled_mm(a, b, *scales[mode], bias=bias if fused else None)
            torch.cuda.synchronize(device)
            return mode, fused
        except (RuntimeError, ValueError, NotImplementedError):
            continue
    raise Skip("torch._scaled_mm accepts neither row-wise nor tensor-wise scales on this device")


def _quantize(t: torch.Tensor, dim: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and fp32 scales: one per slice along `dim` (rowwise) or one for the tensor."""
    if mode == "rowwise":
        return quantize_rowwise(t, dim)
    t32 = t.float()
    amax = t32.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_mm_projection(x, freqs, weight, bias, *, precision: str, mode: str, bias_fused: bool):
    """The unfused fp8 path: quantise, _scaled_mm, sin/cos in bf16, quantise features, _scaled_mm."""
    m = freqs.shape[1]
    if precision == "fp8":
        x_codes, x_scale = _quantize(x, 1, mode)
        freqs_codes, freqs_scale = _quantize(freqs, 0, mode)
        phase = common.scaled_mm(x_codes, _column_major(freqs_codes), x_scale, freqs_scale)
    else:
        phase = x @ freqs
    angle = (2 * math.pi) * phase
    features = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    feature_codes = (features * FEATURE_SCALE).to(torch.float8_e4m3fn)
    weight_codes, weight_scale = _quantize(weight, 0, mode)
    # The fixed feature scale and 1/sqrt(m) fold into GEMM2's A scale.
    feature_scale = 1.0 / (FEATURE_SCALE * math.sqrt(m))
    if mode == "rowwise":
        scale_a = torch.full((x.shape[0], 1), feature_scale, device=x.device)
    else:
        scale_a = torch.full((), feature_scale, device=x.device)
    y = common.scaled_mm(
        feature_codes, _column_major(weight_codes), scale_a, weight_scale, bias=bias if bias_fused else None
    )
    return y if bias_fused else y + bias


def _fp8_gemm_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "torch._scaled_mm is timed on a GPU with compute capability >= 8.9 only"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return f"fp8 needs compute capability >= 8.9, device has {cc[0]}.{cc[1]}"
    return None


def scaled_mm_fp8(case: Case, inputs, *, compiled: bool = False) -> Candidate:
    reason = _fp8_gemm_unavailable(case.device)
    if reason:
        raise Skip(reason)
    if any(size % 16 for size in case.shape[1:]):
        raise Skip(f"torch._scaled_mm needs d_in, m, d_out divisible by 16, got {case.shape}")
    mode, bias_fused = _scaled_mm_support(case.device)
    fn = functools.partial(_scaled_mm_projection, precision=case.precision, mode=mode, bias_fused=bias_fused)
    if compiled:
        fn = torch.compile(fn, dynamic=False)
    note = "" if mode == "rowwise" else "row-wise _scaled_mm unsupported here: tensor-wise scales"
    return Candidate(fn, scaling=mode, note=note)


def cdm_backend(case: Case, inputs, *, backend: str) -> Candidate:
    if case.device.type != "cuda" and backend != "torch":
        try:
            dispatch.select(OP, backend, *inputs, case.precision, case.scaling)
            reason = "the Triton interpreter on the CPU is not timed"
        except BackendUnavailable as error:
            reason = str(error)
        raise Skip(reason)

    def fn(x, freqs, weight, bias):
        return cdm_fast.fourier_projection(
            x, freqs, weight, bias, precision=case.precision, fp8_scaling=case.scaling, backend=backend
        )

    return Candidate(fn, scaling=None if case.precision == "bf16" else case.scaling)


def transformer_engine_fp8(case: Case, inputs) -> Candidate:
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling
    except ImportError:
        raise Skip(TE_MISSING) from None
    if case.device.type != "cuda":
        raise Skip("Transformer Engine needs a GPU")
    _, d_in, m, d_out = case.shape
    x, freqs, weight, bias = inputs
    first = te.Linear(d_in, m, bias=False, params_dtype=torch.bfloat16, device=case.device)
    second = te.Linear(2 * m, d_out, bias=True, params_dtype=torch.bfloat16, device=case.device)
    with torch.no_grad():
        first.weight.copy_(freqs.t())
        second.weight.copy_(weight.t() / math.sqrt(m))
        second.bias.copy_(bias)
    recipe = DelayedScaling()

    def fn(x, freqs, weight, bias):
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
            angle = (2 * math.pi) * first(x)
            return second(torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1))

    note = "TE modules hold freqs/weight (loaded from the first input set, not rotated); delayed scaling"
    return Candidate(fn, scaling="te-delayed", note=note)


@dataclass(frozen=True)
class Peer:
    build: Callable[[Case, tuple], Candidate]
    precisions: tuple[str, ...]
    baseline: bool = False  # timed whatever precisions were asked for


PEERS: dict[str, Peer] = {
    BASELINE: Peer(torch_eager, ("bf16",), baseline=True),
    "torch-compile-bf16": Peer(torch_compile, ("bf16",), baseline=True),
    "scaled-mm-fp8": Peer(scaled_mm_fp8, ("fp8", "fp8-features")),
    "scaled-mm-fp8-compiled": Peer(functools.partial(scaled_mm_fp8, compiled=True), ("fp8", "fp8-features")),
    "te-fp8-linear": Peer(transformer_engine_fp8, ("fp8",)),
    "cdm-torch": Peer(functools.partial(cdm_backend, backend="torch"), PRECISIONS),
    "cdm-triton": Peer(functools.partial(cdm_backend, backend="triton"), PRECISIONS),
    "cdm-cuda": Peer(functools.partial(cdm_backend, backend="cuda"), PRECISIONS),
}
SCALED_MM_PEERS = ("scaled-mm-fp8", "scaled-mm-fp8-compiled")
KERNEL_PEERS = ("cdm-triton", "cdm-cuda")


# ---------------------------------------------------------------- running


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple:
    n, d_in, m, d_out = shape
    x = torch.randn(n, d_in, device=device, dtype=dtype)
    freqs = torch.randn(d_in, m, device=device, dtype=dtype) / math.sqrt(d_in)
    weight = torch.randn(2 * m, d_out, device=device, dtype=dtype) / math.sqrt(2 * m)
    bias = torch.randn(d_out, device=device, dtype=dtype) * (0.1 / math.sqrt(2 * m))
    return x, freqs, weight, bias


class References:
    """float64 references on a row subset of the first input set, computed once per (precision, scaling)."""

    def __init__(self, inputs: tuple, max_rows: int):
        x, freqs, weight, bias = inputs
        n = x.shape[0]
        step = 1 if max_rows <= 0 else max(1, math.ceil(n / max_rows))
        self.rows = torch.arange(0, n, step, device=x.device)
        self.inputs64 = (x[self.rows].double(), freqs.double(), weight.double(), bias.double())
        self.description = f"{len(self.rows)} of {n} rows" + (f" (one in {step})" if step > 1 else "")
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, precision: str, scaling: str = "rowwise") -> torch.Tensor:
        key = ("bf16", "rowwise") if precision == "bf16" else (precision, scaling)
        if key not in self._cache:
            self._cache[key] = reference(*self.inputs64, precision=key[0], fp8_scaling=key[1])
        return self._cache[key]

    def errors(self, y: torch.Tensor, precision: str, scaling: str | None) -> tuple[float, float | None]:
        rows = y.reshape(-1, y.shape[-1])[self.rows]
        exact = common.rel_error(rows, self.get("bf16"))
        quantized = None
        if precision != "bf16" and scaling in FLOAT8_SCALINGS:
            quantized = common.rel_error(rows, self.get(precision, scaling))
        return exact, quantized


def _plan(precisions: list[str]) -> list[tuple[str, str]]:
    plan = []
    for precision in PRECISIONS:
        for name, peer in PEERS.items():
            if precision in peer.precisions and (precision in precisions or peer.baseline):
                plan.append((name, precision))
    return plan


def _peak_fraction(
    shape: Shape, precision: str, ms: float, ceilings: dict[str, float] | None
) -> float | None:
    """Time both GEMMs would take at this GPU's measured GEMM rate for their operand types, over ms."""
    if not ceilings or (precision != "bf16" and "fp8_gemm_tflops" not in ceilings):
        return None
    rates = {
        "bf16": ("bf16_gemm_tflops", "bf16_gemm_tflops"),
        "fp8": ("fp8_gemm_tflops", "fp8_gemm_tflops"),
        "fp8-features": ("bf16_gemm_tflops", "fp8_gemm_tflops"),
    }[precision]
    ideal_ms = sum(flops / ceilings[rate] / 1e9 for flops, rate in zip(shape.gemm_flops, rates, strict=True))
    return ideal_ms / ms


def _new_row(env: dict, shape: Shape, impl: str, precision: str, **fields) -> dict:
    """One JSON line with every key present (None where it does not apply)."""
    row = {**env, "bench": "projection", "shape": shape.as_dict(), "precision": precision, "scaling": None}
    row.update(impl=impl, ms=None, min_ms=None, repeats=None, timing=None, tflops=None, peak_fraction=None)
    row.update(flops=sum(shape.gemm_flops), bytes=shape.min_bytes, gb_s=None)
    row.update(ratio=None, error_exact=None, error_quantized=None, targets=None, note="", **fields)
    return row


def _record_timing(row: dict, timing: common.Timing, shape: Shape) -> None:
    row.update(ms=timing.ms, min_ms=timing.min_ms, repeats=timing.repeats, timing=timing.method)
    row["tflops"] = sum(shape.gemm_flops) / timing.ms / 1e9
    row["gb_s"] = shape.min_bytes / timing.ms / 1e6


def run_shape(shape: Shape, args, device: torch.device, env: dict, ceilings) -> tuple[list[dict], bool]:
    """Time every planned (peer, precision) on `shape`; returns the rows and whether any peer failed."""
    sets = common.rotating_input_sets(lambda: make_inputs(shape, device), device)
    refs = References(sets[0], args.error_rows)
    failed = False
    rows = []
    for name, precision in _plan(args.precisions):
        case = Case(shape, precision, args.scaling, device, args.compile_cpu)
        row = _new_row(env, shape, name, precision, input_sets=len(sets), error_rows=len(refs.rows))
        try:
            candidate = PEERS[name].build(case, sets[0])
            row["scaling"], row["note"] = candidate.scaling, candidate.note
            y = candidate.fn(*sets[0])
            row["error_exact"], row["error_quantized"] = refs.errors(y, precision, candidate.scaling)
            del y
            _record_timing(row, common.time_fn(candidate.fn, sets, device, repeats=args.repeats), shape)
            row["peak_fraction"] = _peak_fraction(shape, precision, row["ms"], ceilings)
        except (Skip, BackendUnavailable) as reason:
            row["note"] = f"skipped: {reason}"
        except Exception as error:
            failed = True
            row["note"] = f"failed: {type(error).__name__}: {error}".strip()
            traceback.print_exc()
        rows.append(row)
    baseline = next((r["ms"] for r in rows if r["impl"] == BASELINE and r["ms"]), None)
    for row in rows:
        if baseline and row["ms"]:
            row["ratio"] = baseline / row["ms"]
    target_lines = []
    if args.check_targets:
        gemms_rows, target_lines = _check_targets(shape, sets, rows, args, device, env)
        rows.extend(gemms_rows)
    print(_describe(shape, env, refs, sets, device))
    print(_table(rows))
    if target_lines:
        print("\n".join(target_lines))
    return rows, failed


# ---------------------------------------------------------------- targets (fp8 path, GPU only)


def _scaled_mm_gemms_row(shape: Shape, sets, args, device, env) -> dict:
    """The two _scaled_mm GEMMs alone, on pre-quantised operands: the fp8 GEMM rate cuBLAS reaches here."""
    mode, _ = _scaled_mm_support(device)
    operands = []
    for x, freqs, weight, _bias in sets:
        x_codes, x_scale = _quantize(x, 1, mode)
        freqs_codes, freqs_scale = _quantize(freqs, 0, mode)
        angle = (2 * math.pi) * (x @ freqs)
        features = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
        feature_codes = (features * FEATURE_SCALE).to(torch.float8_e4m3fn)
        feature_scale = torch.full(
            (x.shape[0], 1) if mode == "rowwise" else (), 1 / FEATURE_SCALE, device=device
        )
        weight_codes, weight_scale = _quantize(weight, 0, mode)
        operands.append(
            (x_codes, _column_major(freqs_codes), x_scale, freqs_scale)
            + (feature_codes, _column_major(weight_codes), feature_scale, weight_scale)
        )

    def gemms(a1, b1, scale_a1, scale_b1, a2, b2, scale_a2, scale_b2):
        common.scaled_mm(a1, b1, scale_a1, scale_b1)
        return common.scaled_mm(a2, b2, scale_a2, scale_b2)

    row = _new_row(env, shape, "scaled-mm-gemms-only", "fp8", input_sets=len(operands), error_rows=None)
    row["scaling"] = mode
    row["note"] = "the two _scaled_mm GEMMs alone on pre-quantised operands (no sin/cos): not the op"
    _record_timing(row, common.time_fn(gemms, operands, device, repeats=args.repeats), shape)
    return row


def _check_targets(shape: Shape, sets, rows, args, device, env) -> tuple[list[dict], list[str]]:
    """The issue's targets for the fp8 kernels: (the GEMMs-only row it timed, if any; lines to print).

    Also stores each fp8 kernel row's verdicts under row["targets"].
    """
    lines = [f"\ntargets for the fp8 path at {_shape_text(shape)}:"]
    reason = _fp8_gemm_unavailable(device) or ("fp8" not in args.precisions and "no fp8 run (--fp8)")
    if reason:
        lines.append(f"  not checked: {reason}")
        return [], lines
    timed = [r for r in rows if r["ms"] and r["precision"] in ("fp8", "bf16")]
    eager = next((r for r in timed if r["impl"] == BASELINE), None)
    scaled_mm_rows = [r for r in timed if r["impl"] in SCALED_MM_PEERS and r["precision"] == "fp8"]
    scaled = min(scaled_mm_rows, key=lambda r: r["ms"], default=None)
    gemms = _scaled_mm_gemms_row(shape, sets, args, device, env)
    kernels = [r for r in timed if r["impl"] in KERNEL_PEERS and r["precision"] == "fp8"]
    if not kernels:
        lines.append("  no fp8 kernel was timed (see the notes above)")
    for row in kernels:
        checks = {
            "vs_eager": (eager["ms"] / row["ms"]) if eager else None,
            "vs_scaled_mm": (scaled["ms"] / row["ms"]) if scaled else None,
            "of_scaled_mm_gemms": row["tflops"] / gemms["tflops"],
        }
        labels = {
            "vs_eager": f"speed-up vs {BASELINE}",
            "vs_scaled_mm": f"speed-up vs {scaled['impl'] if scaled else 'scaled-mm-fp8 (not timed)'}",
            "of_scaled_mm_gemms": f"TFLOP/s vs the _scaled_mm GEMMs alone ({gemms['tflops']:.3g})",
        }
        for key, value in checks.items():
            target = TARGETS[key]
            verdict = "n/a" if value is None else ("PASS" if value >= target else "FAIL")
            shown = "-" if value is None else f"{value:.2f}"
            lines.append(f"  {row['impl']:<11} {labels[key]:<58} {shown:>6} (target >= {target})  {verdict}")
        row["targets"] = {
            **checks,
            "scaled_mm_peer": scaled["impl"] if scaled else None,
            "met": all(v is not None and v >= TARGETS[k] for k, v in checks.items()),
        }
    return [gemms], lines


# ---------------------------------------------------------------- printing and CLI


def _shape_text(shape: Shape) -> str:
    return f"N={shape.n} d_in={shape.d_in} m={shape.m} d_out={shape.d_out}"


def _describe(shape: Shape, env: dict, refs: References, sets, device: torch.device) -> str:
    commit = env["git_commit"] or "unknown"
    if env["git_dirty"]:
        commit += " (dirty)"
    device_text = f"{env['device']} (cc {env['cc']})" if env["cc"] else "cpu"
    versions = f"torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}"
    clock = "CUDA events" if device.type == "cuda" else "CPU wall time"
    gemm1, gemm2 = shape.gemm_flops
    return "\n".join(
        [
            "",
            f"projection  {_shape_text(shape)}  bf16 inputs  GFLOP {gemm1 / 1e9:.3g} + {gemm2 / 1e9:.3g}",
            f"{device_text}  {versions}  commit {commit}",
            f"timing: median of per-call {clock}, {len(sets)} rotating input set(s); "
            f"errors over {refs.description}, float64 reference on {device}",
        ]
    )


def _table(rows: list[dict]) -> str:
    columns = [
        common.Column("impl", "impl"),
        common.Column("precision", "precision"),
        common.Column("scaling", "scaling"),
        common.Column("ms", "ms", "{:.3f}"),
        common.Column("TFLOP/s", "tflops", "{:.3g}"),
        common.Column("of peak", "peak_fraction", "{:.0%}"),
        common.Column("vs eager", "ratio", "{:.2f}x"),
        common.Column("err exact", "error_exact", "{:.2e}"),
        common.Column("err quant", "error_quantized", "{:.2e}"),
        common.Column("note", "note_ref"),
    ]
    return common.format_table_with_notes(rows, columns)


def parse_shape(text: str) -> Shape:
    try:
        values = [int(v) for v in text.split(",")]
        shape = Shape(*values)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected N,d_in,m,d_out (four integers), got {text!r}") from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def parse_args(argv: list[str] | None, device: torch.device) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.projection", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    for precision in PRECISIONS:
        parser.add_argument(
            f"--{precision}",
            dest="precisions",
            action="append_const",
            const=precision,
            help=f"time {precision}",
        )
    parser.add_argument(
        "--shape",
        dest="shapes",
        action="append",
        type=parse_shape,
        help="N,d_in,m,d_out (repeatable); default: SHAPES for the device",
    )
    parser.add_argument("--scaling", choices=FLOAT8_SCALINGS, help="fp8 recipe; default: the device's best")
    parser.add_argument("--out", type=Path, default=common.default_results_path("projection"))
    parser.add_argument(
        "--repeats", type=int, help="timed calls per peer (default 100 on a GPU, 5 on the CPU)"
    )
    parser.add_argument(
        "--error-rows", type=int, default=4096, help="rows compared with the float64 reference (0: all)"
    )
    parser.add_argument("--compile-cpu", action="store_true", help="also time torch.compile on the CPU")
    parser.add_argument(
        "--check-targets", action="store_true", help="print the fp8 kernels' targets (GPU only)"
    )
    args = parser.parse_args(argv)
    args.precisions = sorted(set(args.precisions or ["bf16", "fp8"]), key=PRECISIONS.index)
    args.shapes = args.shapes or SHAPES[device.type]
    args.scaling = args.scaling or default_scaling(device)
    args.repeats = args.repeats or (100 if device.type == "cuda" else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    device = common.default_device()
    args = parse_args(argv, device)
    if device.type != "cuda":
        print(common.NO_GPU_NOTICE)
    env = common.environment(device)
    ceilings = common.measure_ceilings(device)
    if ceilings:
        print("ceilings: " + "  ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    all_rows, failed = [], False
    with torch.no_grad():
        for shape in args.shapes:
            rows, shape_failed = run_shape(shape, args, device, env, ceilings)
            for row in rows:
                row["ceilings"] = ceilings
            all_rows.extend(rows)
            failed = failed or shape_failed
    path = common.append_jsonl(args.out, all_rows)
    print(f"\nappended {len(all_rows)} rows to {path}")
    if device.type != "cuda":
        print(common.NO_GPU_NOTICE)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
