"""Ahead-of-time build check, no GPU needed: `python -m bench.aot [--all] [--jobs N] [--out PATH]`.

Triton: every kernel of `cdm_fast.kernels.registry` × variant × autotune config × arch (sm_90, sm_120) is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`. Recorded: shared memory
(`metadata.shared`), registers and local memory (the cubin's `cuobjdump --dump-resource-usage`; local memory
is where spills go), the MMA forms in the PTX, and whether the kernel's own shared-memory pruning, asked as
if on that arch, keeps the config. Violations: a failed compile; a config the pruner keeps that does not fit
the arch's per-block shared memory; a required instruction missing or a forbidden one present; local memory
in a config the pruner keeps. A config the pruner drops although it fits is a note, not a violation.
Without --all, variants marked `every_config=False` compile, per arch, the first config the pruner keeps.

CUDA extension: the ptxas log installed beside `cdm_fast._C` (registers, static shared memory, spill bytes
per kernel and arch) and the MMA opcodes of each kernel's SASS (`cuobjdump --dump-sass`), against
`registry.EXTENSION_SASS`.

Prints a table, then appends one JSON line per row to bench/results/aot.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench import common
from cdm_fast import device as devices

try:  # Triton >= 3.2 (3.6 on the GPU machine, 3.9 here) has both at these paths.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:  # pragma: no cover - depends on the installed Triton
    triton = GPUTarget = ASTSource = None
    _IMPORT_ERROR: str | None = f"triton's AOT compiler is not importable: {error}"
else:
    _IMPORT_ERROR = None

_TORCH_DTYPES = {
    "*bf16": torch.bfloat16,
    "*fp16": torch.float16,
    "*fp32": torch.float32,
    "*fp8e4nv": torch.float8_e4m3fn,
    "*u8": torch.uint8,
}
_MMA_FORM = re.compile(r"(?:wgmma\.mma_async\.sync|mma\.sync)\.aligned\.\S+?(?=[\s;])")
COLUMNS = [
    common.Column("kernel", "kernel"),
    common.Column("arch", "arch"),
    common.Column("variant", "variant"),
    common.Column("config", "config"),
    common.Column("pruner", "pruner"),
    common.Column("smem", "smem"),
    common.Column("regs", "regs"),
    common.Column("spills", "spills"),
    common.Column("instructions", "instructions"),
    common.Column("ok", "ok"),
]


def unavailable_reason() -> str | None:
    """None when this process can compile Triton kernels ahead of time, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if devices.triton_interpret():
        return "TRITON_INTERPRET is set: kernels are interpreted functions; run with TRITON_INTERPRET=0"
    return None


def arch_name(arch: tuple[int, int]) -> str:
    return f"sm_{arch[0]}{arch[1]}"


def shared_memory_limit(arch: tuple[int, int]) -> int:
    return devices.MAX_SHARED_MEMORY_PER_BLOCK[arch]


def config_name(config) -> str:
    meta = config.kwargs
    blocks = [str(meta[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if name in meta]
    tile = "x".join(blocks or [str(value) for value in meta.values()])
    return f"{tile} s{config.num_stages} w{config.num_warps}"


# ---------------------------------------------------------------- pruning, as on a given arch


@contextmanager
def _pretend_device(arch: tuple[int, int]):
    """`cdm_fast.device` answering as a GPU of `arch` would: its capability and shared memory limit."""
    with (
        mock.patch.object(devices, "capability", lambda device=None: arch),
        mock.patch.object(devices, "shared_memory_limit", lambda device=None: shared_memory_limit(arch)),
    ):
        yield


def _fake_arguments(variant) -> dict[str, Any]:
    """Arguments as the launcher passes them, by name: empty tensors of the signature's dtypes."""
    args: dict[str, Any] = {}
    for name, kind in variant.signature.items():
        if kind in _TORCH_DTYPES:
            args[name] = torch.empty(0, dtype=_TORCH_DTYPES[kind])
        elif kind == "fp32":
            args[name] = 1.0
        elif kind != "constexpr":
            args[name] = 16
    return args


def pruner_keeps(kernel, variant, arch: tuple[int, int]) -> list[bool]:
    """For each of `kernel.configs`, whether the kernel's `early_config_prune` keeps it on `arch`."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return [True] * len(kernel.configs)
    with _pretend_device(arch):
        kept = prune(kernel.configs, _fake_arguments(variant), **variant.constexprs)
    return [any(config is k for k in kept) for config in kernel.configs]


# ---------------------------------------------------------------- compiling and measuring


@functools.cache
def _cuda_tool(name: str) -> str | None:
    if triton is not None:
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return shutil.which(name)


def _resource_usage(binary: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": n, "LOCAL": bytes, "SHARED": bytes, ...}} from `cuobjdump --dump-resource-usage`."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return {}
    text = subprocess.run([tool, "--dump-resource-usage", binary], capture_output=True, text=True).stdout
    usage: dict[str, dict[str, int]] = {}
    function = None
    for line in text.splitlines():
        if match := re.match(r"\s*Function (\S+?):?\s*$", line):
            function = match[1]
        elif function and "REG:" in line:
            usage[function] = {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def compile_kernel(fn, variant, config, arch: tuple[int, int]):
    """triton.compile of `fn` (a JITFunction) for one variant, config and arch."""
    # Constexprs keyed by argument index: the form every Triton since 3.2 accepts (3.6 on the GPU machine).
    values = {**variant.constexprs, **config.kwargs}
    constexprs = {(fn.arg_names.index(name),): value for name, value in values.items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in variant.divisible_by_16}
    source = ASTSource(fn, variant.signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch[0] * 10 + arch[1], 32), options=options)


def measure(kernel_name: str, fn, variant, config, arch: tuple[int, int], kept: bool) -> dict[str, Any]:
    """One row: compile, measure, check. `kept`: the pruner keeps this config on `arch` (the autotuner
    may pick it), so it must fit and must not spill."""
    row: dict[str, Any] = {
        "source": "triton",
        "kernel": kernel_name,
        "arch": arch_name(arch),
        "variant": variant.name,
        "config": config_name(config),
        "pruner": "keeps" if kept else "drops",
        "limit": shared_memory_limit(arch),
    }
    violations: list[str] = []
    notes: list[str] = []
    started = time.perf_counter()
    try:
        compiled = compile_kernel(fn, variant, config, arch)
    except Exception as error:  # every compile failure is a finding, reported in the row
        row.update(compile_s=round(time.perf_counter() - started, 2), notes=[], ok=False)
        row["violations"] = [f"compile: {type(error).__name__}: {(str(error).splitlines() or [''])[-1]}"]
        return row
    row["compile_s"] = round(time.perf_counter() - started, 2)
    smem = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _resource_usage(str(cubin)).get(compiled.metadata.name, {})
    ptx = compiled.asm["ptx"]
    row.update(
        smem=smem,
        regs=usage.get("REG"),
        spills=usage.get("LOCAL"),
        instructions=" ".join(sorted(set(_MMA_FORM.findall(ptx)))) or None,
    )
    fits = smem <= row["limit"]
    if kept and not fits:
        violations.append(f"shared memory: the pruner keeps it, but it needs {smem} B > {row['limit']} B")
    if not kept and fits:
        notes.append(f"shared memory: the pruner drops it, but it fits ({smem} B <= {row['limit']} B)")
    for pattern in variant.required.get(arch, ()):
        if not re.search(pattern, ptx):
            violations.append(f"instructions: /{pattern}/ is required but not in the PTX")
    for pattern in variant.forbidden:
        if re.search(pattern, ptx):
            violations.append(f"instructions: /{pattern}/ is forbidden but in the PTX")
    if usage and kept and usage.get("LOCAL", 0):
        violations.append(f"spills: {usage['LOCAL']} B of local memory per thread")
    if not usage:
        notes.append("no cuobjdump: registers and spills not measured")
    row.update(violations=violations, notes=notes, ok=not violations)
    return row


# ---------------------------------------------------------------- the registry's jobs


@functools.cache
def _entries() -> dict[str, Any]:
    from cdm_fast.kernels import registry

    return {entry.name: entry for entry in registry.kernels()}


def jobs(every_config: bool = False) -> list[tuple[str, str, int, tuple[int, int]]]:
    """(kernel, variant, config index, arch) to compile: every config of the variants marked so (all of
    them with `every_config`), else per arch the first config the pruner keeps there."""
    from cdm_fast.kernels import registry

    todo = []
    for entry in registry.kernels():
        for variant in entry.variants:
            for arch in registry.ARCHS:
                if every_config or variant.every_config:
                    indices = range(len(entry.configs))
                else:
                    indices = [pruner_keeps(entry.kernel, variant, arch).index(True)]
                todo += [(entry.name, variant.name, index, arch) for index in indices]
    return todo


def run_job(job: tuple[str, str, int, tuple[int, int]]) -> dict[str, Any]:
    kernel_name, variant_name, index, arch = job
    entry = _entries()[kernel_name]
    variant = next(v for v in entry.variants if v.name == variant_name)
    kept = pruner_keeps(entry.kernel, variant, arch)[index]
    return measure(kernel_name, entry.fn, variant, entry.configs[index], arch, kept)


def triton_records(every_config: bool = False, num_jobs: int | None = None) -> list[dict[str, Any]]:
    todo = jobs(every_config)
    num_jobs = num_jobs or os.cpu_count() or 1
    if num_jobs == 1:
        return [run_job(job) for job in todo]
    # Fresh interpreters: nothing of this process's Triton or torch state is shared with the compilers.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_jobs, mp_context=context) as pool:
        return list(pool.map(run_job, todo))


# ---------------------------------------------------------------- the CUDA extension


def extension_paths() -> tuple[Path, Path] | None:
    """(the built `cdm_fast._C` library, its ptxas log), or None when the extension is not built."""
    import cdm_fast

    folder = Path(cdm_fast.__file__).parent
    libraries = sorted(folder.glob("_C.*.so")) + sorted(folder.glob("_C.*.pyd"))
    log = folder / "_C_build.log"
    return (libraries[0], log) if libraries and log.is_file() else None


def parse_ptxas_log(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, arch): {"regs", "smem", "spills"}} from an `-Xptxas -v` log."""
    report: dict[tuple[str, str], dict[str, int]] = {}
    kernel = arch = None
    spills = 0
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            kernel, arch = match.groups()
        elif match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = int(match[1]) + int(match[2])
        elif (match := re.search(r"Used (\d+) registers", line)) and kernel is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            report[(kernel, arch)] = {
                "regs": int(match[1]),
                "smem": int(smem[1]) if smem else 0,
                "spills": spills,
            }
            kernel = None
    return report


def sass_opcodes(library: Path) -> dict[tuple[str, str], set[str]]:
    """{(mangled kernel, arch): MMA opcodes with their modifiers} from `cuobjdump --dump-sass`."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return {}
    text = subprocess.run([tool, "--dump-sass", str(library)], capture_output=True, text=True).stdout
    found: dict[tuple[str, str], set[str]] = {}
    arch = function = None
    for line in text.splitlines():
        if match := re.match(r"\s*code for (sm_\w+)", line):
            arch = match[1]
        elif match := re.match(r"\s*Function : (\S+)", line):
            function = match[1]
            found.setdefault((function, arch), set())
        elif function and (match := re.search(r"\b([A-Z]*MMA(?:\.\w+)*)", line)):
            found[(function, arch)].add(match[1])
    return found


def _is_opcode(op: str, opcode: str) -> bool:
    """`op` (QMMA.SF.16832.F32...) is `opcode` with modifiers; plain QMMA is not matched by QMMA.SF."""
    if not (op == opcode or op.startswith(opcode + ".")):
        return False
    return ".SF" in opcode or not op.startswith(opcode + ".SF")


def _demangled(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    tool = shutil.which("c++filt")
    if tool is None:
        return {name: name for name in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"cdm_fast::|\(anonymous namespace\)::|^void ", "", line) for line in out]
    return dict(zip(names, short, strict=True))


def extension_records() -> list[dict[str, Any]]:
    """One row per (extension kernel, arch); [] when the extension is not built."""
    from cdm_fast.kernels import registry

    paths = extension_paths()
    if paths is None:
        return []
    library, log = paths
    report = parse_ptxas_log(log.read_text())
    opcodes = sass_opcodes(library)
    names = _demangled({kernel for kernel, _ in report})
    rows = []
    for (kernel, arch), usage in sorted(report.items(), key=lambda item: (names[item[0][0]], item[0][1])):
        readable = names[kernel]
        family = re.match(r"(\w+)", readable)[1]
        signature = readable[len(family) :]
        template = signature[: signature.find("(")] if "(" in signature else signature
        found = opcodes.get((kernel, arch), set())
        scaling = ("mx" if "Epilogue<true" in template else "rowwise") if "Epilogue<" in template else ""
        expected = registry.EXTENSION_SASS.get((family, scaling), {}).get(arch, {})
        violations = [f"spills: {usage['spills']} B of spill stores and loads"] if usage["spills"] else []
        for opcode in expected.get("required", ()):
            if not any(_is_opcode(op, opcode) for op in found):
                violations.append(f"instructions: SASS {opcode} is required but absent")
        notes = [expected["note"]] if expected.get("note") else []
        if opcodes and (kernel, arch) not in opcodes:
            violations.append("compile: no SASS for this kernel and arch in the library")
        rows.append(
            {
                "source": "cuda-extension",
                "kernel": family,
                "arch": arch,
                "variant": f"{scaling} {template.strip('<> ')}".strip(),
                "config": None,
                "pruner": None,
                "smem": usage["smem"],
                "regs": usage["regs"],
                "spills": usage["spills"],
                "instructions": " ".join(sorted(found)) or None,
                "violations": violations,
                "notes": notes,
                "ok": not violations,
            }
        )
    return rows


# ---------------------------------------------------------------- CLI


def summary(rows: list[dict[str, Any]]) -> str:
    bad = [row for row in rows if not row["ok"]]
    noted = [row for row in rows if row.get("notes")]
    lines = [f"{len(rows)} rows, {len(bad)} with violations, {len(noted)} with notes"]
    for row in bad + noted:
        where = f"{row['kernel']} {row['arch']} {row['variant']} {row.get('config') or ''}".rstrip()
        lines += [f"  {where}: {message}" for message in row["violations"] + row.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every config of every variant")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: all cores)")
    parser.add_argument("--skip-extension", action="store_true", help="only the Triton kernels")
    parser.add_argument("--out", type=Path, default=common.default_results_path("aot"))
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    environment = common.environment(torch.device("cpu"))
    rows = triton_records(args.all, args.jobs)
    if not args.skip_extension:
        rows += extension_records()
    print(common.format_table(rows, COLUMNS))
    print(summary(rows))
    common.append_jsonl(args.out, ({**environment, **row} for row in rows))
    print(f"appended {len(rows)} rows to {args.out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
