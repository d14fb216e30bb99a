#!/usr/bin/env bash
# The GPU machine's check, run from the repository root:
#
#     bash bench/gpu_check.sh OUTDIR [STEP ...]    STEP: env build tests sanitizer bench report (default: all)
#
# (deps)     first in every call when .whl/ exists (bench/gpu_wheels.sh fills it here; carry it): the
#            packages the GPU image lacks, installed into $GPU_CHECK_SITE (default /tmp/cdm_fast_site),
#            which goes on PYTHONPATH for the steps                               -> OUTDIR/build.log
# env        nvidia-smi, python/torch/triton/nvcc/compute-sanitizer versions      -> OUTDIR/summary.txt
# build      pip install -e . for this GPU's arch only, then `cdm-fast doctor`     -> OUTDIR/build.log
# tests      pytest -m gpu                                                         -> OUTDIR/tests.log
# sanitizer  compute-sanitizer memcheck + racecheck over one small call of the
#            "cuda" backend, then of the "triton" one (skipped when unavailable)  -> OUTDIR/sanitizer.log
# bench      python -m bench.all --check-targets (GPU_CHECK_BENCHES=lora,attention picks a subset of
#            projection lora lora_4bit lora_decode wgrad attention lora_distill latent_memory cdm);
#            JSON lines in OUTDIR, and appended to bench/results/                -> OUTDIR/bench.log
# report     python -m bench.report: BENCHMARKS.md from bench/results/, copied     -> OUTDIR/BENCHMARKS.md
#            to OUTDIR (its output goes to bench.log)
#
# A failing step does not stop the next; each step's exit status and seconds go to OUTDIR/summary.txt.
# Every step runs under `timeout`, and all of them within GPU_CHECK_BUDGET_S seconds (default 1500 = 25 min);
# a step that would start with less than 30 s left is skipped (and a step's timeout is cut to what is left).
# Where one command may run 10 minutes at most, pass GPU_CHECK_BUDGET_S=570, or run the steps over several
# calls (e.g. `env build tests`, then `sanitizer bench report` while the machine is still warm). OUTDIR stays
# flat with few files (the GPU machine hands back at most 8). PYTHON picks the interpreter (default python3).
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [env|build|tests|sanitizer|bench|report ...]" >&2
    exit 2
fi
if [[ ! -f pyproject.toml || ! -d bench ]]; then
    echo "gpu_check.sh: run it from the repository root" >&2
    exit 2
fi
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
shift
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(env build tests sanitizer bench report)
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-1500}
START_S=$(date +%s)
SUMMARY=$OUT_DIR/summary.txt
FAILED=0
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# run_step NAME LIMIT_S LOG COMMAND...: run COMMAND under timeout, append its output to LOG and a line to SUMMARY.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - START_S)))
    if ((left < 30)); then
        printf '%-18s skipped: %ss of the %ss budget left\n' "$name" "$left" "$BUDGET_S" >>"$SUMMARY"
        FAILED=1
        return 124
    fi
    ((limit > left)) && limit=$left
    local began=$(date +%s)
    echo "=== $name (timeout ${limit}s): $*" >>"$log"
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict="TIMEOUT after ${limit}s"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
    printf '%-18s rc=%-3s %5ss  %s  (%s)\n' "$name" "$rc" "$(($(date +%s) - began))" "$verdict" \
        "$(basename "$log")" >>"$SUMMARY"
    ((rc != 0)) && FAILED=1
    return $rc
}

step_env() {
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  steps: ${STEPS[*]}  budget ${BUDGET_S}s"
        nvidia-smi || echo "nvidia-smi failed"
        "$PYTHON" - <<'EOF' || echo "python/torch check failed"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", p.multi_processor_count, "SMs",
          f"L2 {getattr(p, 'L2_cache_size', 0) >> 20} MiB", f"{p.total_memory >> 30} GiB")
else:
    print("torch sees no CUDA device")
EOF
        nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
        "$SANITIZER" --version 2>&1 | tail -n 1 || echo "compute-sanitizer not found"
        echo
    } >>"$SUMMARY" 2>&1
}

step_deps() {
    local site=${GPU_CHECK_SITE:-/tmp/cdm_fast_site} archives
    shopt -s nullglob
    archives=(.whl/*.whl .whl/*.tar.gz)
    shopt -u nullglob
    ((${#archives[@]})) || return 0
    # No index there: no build isolation either (pycosat compiles against the image's setuptools).
    run_step deps 300 "$OUT_DIR/build.log" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --no-build-isolation --upgrade --target "$site" "${archives[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

step_build() {
    local archs=${CDM_FAST_CUDA_ARCHS:-}
    if [[ -z $archs ]]; then
        archs=$("$PYTHON" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}" + ("a" if major >= 9 else ""))' 2>>"$OUT_DIR/build.log")
    fi
    echo "CDM_FAST_CUDA_ARCHS=$archs" >>"$OUT_DIR/build.log"
    run_step build 600 "$OUT_DIR/build.log" env CDM_FAST_CUDA_ARCHS="$archs" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
    run_step doctor 120 "$OUT_DIR/build.log" "$PYTHON" -m cdm_fast doctor
}

step_tests() {
    # A test module that cannot be imported (a package missing there) must not stop the others' GPU tests.
    run_step tests 360 "$OUT_DIR/tests.log" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
        --continue-on-collection-errors
    (($? == 5)) && echo "                   (pytest rc 5: no test marked gpu was collected)" >>"$SUMMARY"
}

step_sanitizer() {
    local log=$OUT_DIR/sanitizer.log driver
    driver=$(mktemp -d)/sanitizer_driver.py
    cat >"$driver" <<'EOF'
"""One small call per projection precision and lora dropout on BACKEND (argv[1]); exit 3 when it serves none."""
import sys

import torch

import cdm_fast
from cdm_fast.dispatch import BackendUnavailable

backend = sys.argv[1]
n, d_in, m, d_out = 77, 256, 64, 96  # n odd: partial tiles
x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
freqs = torch.randn(d_in, m, device="cuda", dtype=torch.bfloat16) / d_in**0.5
weight = torch.randn(2 * m, d_out, device="cuda", dtype=torch.bfloat16) / (2 * m) ** 0.5
bias = torch.randn(d_out, device="cuda", dtype=torch.bfloat16)
served = 0
for precision in ("bf16", "fp8", "fp8-features"):
    try:
        y = cdm_fast.fourier_projection(x, freqs, weight, bias, precision=precision, backend=backend)
    except BackendUnavailable as reason:
        print(f"{backend} {precision}: skipped: {reason}")
        continue
    torch.cuda.synchronize()
    print(f"{backend} {precision}: ran, output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
    served += 1
rank, d_out = 16, 200  # d_out not a multiple of 16: partial tiles
lora_A = torch.randn(rank, d_in, device="cuda") / d_in**0.5
lora_B = torch.randn(d_out, rank, device="cuda") / rank**0.5
lora_weight = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in**0.5
for dropout_p in (0.0, 0.1):
    try:
        y = cdm_fast.lora_linear(
            x, lora_weight, lora_A, lora_B, 0.5, dropout_p=dropout_p, training=True, backend=backend
        )
    except BackendUnavailable as reason:
        print(f"{backend} lora p={dropout_p}: skipped: {reason}")
        continue
    torch.cuda.synchronize()
    print(f"{backend} lora p={dropout_p}: ran, output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
    served += 1
sys.exit(0 if served else 3)
EOF
    local backend
    for backend in cuda triton; do
        echo "=== $backend: a plain run first (does the backend serve any call here?)" >>"$log"
        local left=$((BUDGET_S - ($(date +%s) - START_S)))
        ((left < 30)) && break
        timeout $((left < 300 ? left : 300)) "$PYTHON" "$driver" "$backend" >>"$log" 2>&1
        local rc=$?
        if ((rc == 3)); then
            printf '%-18s skipped: backend "%s" serves no call here (sanitizer.log)\n' "sanitizer-$backend" \
                "$backend" >>"$SUMMARY"
            continue
        elif ((rc != 0)); then
            printf '%-18s rc=%-3s FAILED without the sanitizer (sanitizer.log)\n' "plain-$backend" "$rc" >>"$SUMMARY"
            FAILED=1
            continue
        fi
        # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees out-of-bounds accesses.
        local tool
        for tool in memcheck racecheck; do
            run_step "$tool-$backend" 180 "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" "$driver" "$backend"
        done
    done
}

step_bench() {
    run_step bench 480 "$OUT_DIR/bench.log" "$PYTHON" -m bench.all --out-dir "$OUT_DIR" --check-targets \
        ${GPU_CHECK_BENCHES:+--only "$GPU_CHECK_BENCHES"}
    local results
    results=$(cd bench/results 2>/dev/null && pwd)
    if [[ $results != "$OUT_DIR" ]]; then
        mkdir -p bench/results
        local file
        for file in "$OUT_DIR"/*.jsonl; do
            [[ -f $file ]] && cat "$file" >>"bench/results/$(basename "$file")"
        done
    fi
}

# BENCHMARKS.md is generated from every row in bench/results/ (this run's appended there by step_bench).
step_report() {
    run_step report 120 "$OUT_DIR/bench.log" "$PYTHON" -m bench.report && cp BENCHMARKS.md "$OUT_DIR/"
}

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[[ -d .whl ]] && step_deps
for step in "${STEPS[@]}"; do
    case $step in
    env | build | tests | sanitizer | bench | report) "step_$step" ;;
    *)
        echo "unknown step: $step" >>"$SUMMARY"
        FAILED=1
        ;;
    esac
done
echo "total $(($(date +%s) - START_S))s; $( ((FAILED)) && echo 'some steps FAILED' || echo 'all steps ok')" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
