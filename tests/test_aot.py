"""The build, checked ahead of time without a GPU (`bench.aot`): every kernel of `cdm_fast.kernels.registry` ×
variant × autotune config compiles for sm_90 and sm_120, every config its pruner keeps fits the arch's shared
memory and does not spill, and the PTX holds the MMA form the variant is for; the CUDA extension's kernels do
not spill and their SASS holds the intended MMAs. Probes prove the shared-memory and instruction checks fail.

Triton compiles only outside the interpreter, so the Triton checks run `python -m bench.aot` once per session
in a subprocess with TRITON_INTERPRET=0 (CI: the main GEMM modes with every config, the rest with the first
config the pruner keeps per arch; see `registry.Variant.every_config`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bench import aot
from cdm_fast.kernels import registry

REPO = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = sorted((REPO / "kernels").glob("*.py"))
VARIANTS = [(entry.name, variant.name) for entry in registry.kernels() for variant in entry.variants]
IDS = [f"{kernel.split('.')[-1]}-{variant}" for kernel, variant in VARIANTS]

# Violations the check found in the kernels, failing until fixed (strict: the fix turns these into failures
# that ask for the entry to be removed).
requires_aot = pytest.mark.skipif(
    aot._IMPORT_ERROR is not None, reason=aot._IMPORT_ERROR or "triton's AOT compiler is importable"
)


def _jit_functions(path: Path) -> set[str]:
    """Names of the functions decorated with triton.jit (bare or called) in a source file."""

    def is_jit(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return (
            isinstance(target, ast.Attribute | ast.Name)
            and getattr(target, "attr", None) == "jit"
            or (isinstance(target, ast.Name) and target.id == "jit")
        )

    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any(is_jit(d) for d in node.decorator_list)
    }


def test_every_jit_function_is_a_registered_kernel_or_a_declared_helper():
    found = set().union(*(_jit_functions(path) for path in KERNEL_SOURCES))
    registered = {entry.fn.__name__ for entry in registry.kernels()}
    assert found - registered - registry.HELPERS == set(), "add these kernels to kernels/registry.py"
    assert registered | registry.HELPERS <= found, "the registry names functions kernels/ no longer has"
    assert not registered & registry.HELPERS


@pytest.mark.parametrize(("kernel", "variant"), VARIANTS, ids=IDS)
def test_variant_signature_types_every_argument_in_order(kernel, variant):
    entry = next(e for e in registry.kernels() if e.name == kernel)
    spec = next(v for v in entry.variants if v.name == variant)
    assert list(spec.signature) == list(entry.fn.arg_names)
    constexprs = {name for name, kind in spec.signature.items() if kind == "constexpr"}
    assert constexprs == set(spec.constexprs) | set(entry.configs[0].kwargs)
    assert set(spec.required) == set(registry.ARCHS)


def _run_without_interpreter(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def triton_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.jsonl"
    jobs = str(min(os.cpu_count() or 1, 8))
    command = [sys.executable, "-m", "bench.aot", "--skip-extension", "--jobs", jobs, "--out", str(out)]
    result = _run_without_interpreter(command, timeout=1200)
    assert result.returncode in (0, 1) and out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    print("\n".join(result.stdout.splitlines()[-30:]))
    return _read_jsonl(out)


def _rows_of(rows: list[dict], kernel: str, variant: str) -> list[dict]:
    return [row for row in rows if row["kernel"] == kernel and row["variant"] == variant]


def _violations(rows: list[dict], kind: str) -> list[str]:
    return [
        f"{row['arch']} {row['config']}: {message}"
        for row in rows
        for message in row["violations"]
        if message.startswith(kind + ":")
    ]


@requires_aot
@pytest.mark.parametrize(("kernel", "variant"), VARIANTS, ids=IDS)
def test_compiles_for_sm_90_and_sm_120(triton_rows, kernel, variant):
    rows = _rows_of(triton_rows, kernel, variant)
    assert {row["arch"] for row in rows} == {aot.arch_name(arch) for arch in registry.ARCHS}
    assert _violations(rows, "compile") == []


@requires_aot
@pytest.mark.parametrize(
    ("kernel", "variant"),
    VARIANTS,
    ids=IDS,
)
def test_configs_the_pruner_keeps_fit_the_arch_shared_memory(triton_rows, kernel, variant):
    rows = _rows_of(triton_rows, kernel, variant)
    assert rows
    assert _violations(rows, "shared memory") == []
    # The pruner may be conservative (drop a config that fits): reported, not failed.
    dropped_but_fit = [f"{row['arch']} {row['config']}: {note}" for row in rows for note in row["notes"]]
    if dropped_but_fit:
        warnings.warn(f"{kernel} {variant}: {dropped_but_fit}", stacklevel=1)


@requires_aot
@pytest.mark.parametrize(("kernel", "variant"), VARIANTS, ids=IDS)
def test_ptx_has_the_intended_mma_form(triton_rows, kernel, variant):
    rows = _rows_of(triton_rows, kernel, variant)
    assert rows
    assert _violations(rows, "instructions") == []


@requires_aot
@pytest.mark.parametrize(("kernel", "variant"), VARIANTS, ids=IDS)
def test_configs_the_pruner_keeps_do_not_spill(triton_rows, kernel, variant):
    rows = _rows_of(triton_rows, kernel, variant)
    assert rows and all(row.get("regs") for row in rows if row["ok"]), "cuobjdump measured no registers"
    assert _violations(rows, "spills") == []


@pytest.fixture(scope="module")
def probe_rows(tmp_path_factory) -> dict[tuple[str, str, str], dict]:
    out = tmp_path_factory.mktemp("aot_probes") / "probes.jsonl"
    result = _run_without_interpreter([sys.executable, str(REPO / "tests" / "aot_probes.py"), str(out)], 600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {(row["kernel"], row["variant"], row["arch"]): row for row in _read_jsonl(out)}


@requires_aot
@pytest.mark.parametrize("arch", [aot.arch_name(arch) for arch in registry.ARCHS])
def test_instruction_check_rejects_a_bf16_dot_where_e4m3_is_required(probe_rows, arch):
    wrong = probe_rows[("probe._bf16_dot_kernel", "bf16-dot-held-to-e4m3", arch)]
    control = probe_rows[("probe._bf16_dot_kernel", "bf16-dot-held-to-bf16", arch)]
    assert not wrong["ok"] and _violations([wrong], "instructions"), wrong
    assert control["ok"], control


@requires_aot
@pytest.mark.parametrize("arch", [aot.arch_name(arch) for arch in registry.ARCHS])
def test_shared_memory_check_rejects_an_oversized_config(probe_rows, arch):
    row = probe_rows[("probe.oversized_matmul", "bf16-a-row-major", arch)]
    assert row["smem"] > row["limit"]
    assert not row["ok"] and _violations([row], "shared memory"), row


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(aot.extension_paths() is None, reason="the CUDA extension is not built (no nvcc)")
@pytest.mark.skipif(aot._cuda_tool("cuobjdump") is None, reason="no cuobjdump to read the extension's SASS")
def test_extension_kernels_do_not_spill_and_use_the_intended_mma():
    rows = aot.extension_records()
    assert rows
    assert [
        f"{row['kernel']} {row['arch']} {row['variant']}: {row['violations']}"
        for row in rows
        if not row["ok"]
    ] == []
    checked = {(row["kernel"], row["variant"].split()[0], row["arch"]) for row in rows}
    for (family, scaling), by_arch in registry.EXTENSION_SASS.items():
        for arch in {row["arch"] for row in rows} & set(by_arch):
            assert (family, scaling, arch) in checked, (family, scaling, arch)
