"""Build step of cdm-fast: the metadata is in pyproject.toml; this file adds the CUDA extension.

`cdm_fast._C` (csrc/*.cu + csrc/bindings.cpp) is compiled with nvcc, pybind11 and ninja whenever a CUDA
compiler is found: $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc, first
found wins. It includes no torch header and links cudart statically, so it builds on a machine without a
GPU and one build serves every torch version. Without a CUDA compiler the package is pure Python (and
says so); a compiler that is found and fails is an error.

Environment:
    CDM_FAST_CUDA_ARCHS   targets, ';' or ',' separated (default "89;90a;120a"): SASS for each, PTX for
                          the highest. `_C.built_archs()` reports them.
    CDM_FAST_NO_CUDA=1    skip the extension.

The ptxas report (-Xptxas -v: registers, shared memory, spills per kernel) is written per arch into the
build directory and installed as cdm_fast/_C_build.log beside the extension.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "89;90a;120a"
BUILD_LOG_NAME = "_C_build.log"
_ENTRY_FUNCTION = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_SPILLS = re.compile(r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")


def _notice(message: str) -> None:
    print(f"cdm-fast: {message}", file=sys.stderr, flush=True)


def find_nvcc() -> Path | None:
    candidates = [
        Path(os.environ[var], "bin", "nvcc") for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)
    ]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def cuda_archs() -> list[str]:
    value = os.environ.get("CDM_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = list(dict.fromkeys(a for a in re.split(r"[;,\s]+", value) if a))
    if not archs or not all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs):
        raise SystemExit(
            f"CDM_FAST_CUDA_ARCHS: expected compute capabilities like {DEFAULT_CUDA_ARCHS!r}, got {value!r}"
        )
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    highest = max(archs, key=lambda arch: int(re.match(r"\d+", arch).group()))
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    return [*flags, f"-gencode=arch=compute_{highest},code=compute_{highest}"]


def _ninja_executable() -> str:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR, "ninja"))
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise CompileError(
                "cdm-fast: building the CUDA extension needs ninja (pip install ninja), "
                "or set CDM_FAST_NO_CUDA=1 to install without it"
            ) from None
        return found


def _ninja_path(path: Path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _command(arguments: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in arguments).replace("$", "$$")


def _split_by_arch(log: str) -> dict[str, list[str]]:
    """ptxas lines grouped by target. nvcc compiles the targets one after another, so each line belongs
    to the arch of the entry function before it ("0 bytes gmem" opens a target, to the one after it)."""
    by_arch: dict[str, list[str]] = {}
    current, pending = None, []
    for line in log.splitlines():
        match = _ENTRY_FUNCTION.search(line)
        if match:
            current = match["arch"]
            by_arch.setdefault(current, []).extend(pending)
            pending = []
        if current is None or ("bytes gmem" in line and not match):
            pending.append(line)
        else:
            by_arch[current].append(line)
    if pending:
        by_arch.setdefault(current or "unknown", []).extend(pending)
    return by_arch


class BuildCudaExtension(build_ext):
    """Builds cdm_fast._C with nvcc through a generated build.ninja (parallel, incremental)."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        nvcc = find_nvcc()
        archs = cuda_archs()
        build_dir = Path(self.build_temp).resolve() / "cdm_fast_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        library = build_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
        defines = [
            f'-DCDM_FAST_CUDA_ARCHS="{";".join(archs)}"',
            f'-DCDM_FAST_VERSION="{self.distribution.get_version()}"',
        ]
        host = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", *defines]
        python_includes = dict.fromkeys(sysconfig.get_paths()[key] for key in ("include", "platinclude"))
        device = [*host, "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v", *gencode_flags(archs)]
        bindings = [*host, f"-I{pybind11.get_include()}", *(f"-I{path}" for path in python_includes)]
        link = ["-shared", "-cudart=static", "-ldl", "-lpthread", "-lrt", "-Xlinker", "--exclude-libs,ALL"]

        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {_command([str(nvcc)])}",
            f"device_flags = {_command(device)}",
            f"bindings_flags = {_command(bindings)}",
            f"link_flags = {_command(link)}",
            "rule device",
            # -Xptxas -v goes to stderr: keep it as this object's log, show it only when nvcc fails.
            "  command = $nvcc $device_flags -MD -MF $out.d -c $in -o $out > $out.log 2>&1"
            " || { cat $out.log; exit 1; }",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule bindings",
            "  command = $nvcc $bindings_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule link",
            "  command = $nvcc $link_flags $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for source in map(Path, ext.sources):
            rule = "device" if source.suffix == ".cu" else "bindings"
            target = build_dir / f"{source.name}.o"
            objects.append(target)
            lines.append(f"build {_ninja_path(target)}: {rule} {_ninja_path(ROOT / source)}")
        lines.append(f"build {_ninja_path(library)}: link {' '.join(map(_ninja_path, objects))}")
        lines.append(f"default {_ninja_path(library)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        _notice(f"building cdm_fast._C with {nvcc} for {', '.join(f'sm_{a}' for a in archs)} in {build_dir}")
        if subprocess.run([_ninja_executable(), "-C", str(build_dir)]).returncode != 0:
            raise CompileError(
                f"cdm-fast: compiling the CUDA extension with {nvcc} failed (compiler output above). "
                "This is a bug to report; CDM_FAST_NO_CUDA=1 installs the package without the extension."
            )

        log = "".join(Path(f"{obj}.log").read_text() for obj in objects if obj.name.endswith(".cu.o"))
        for arch, arch_lines in _split_by_arch(log).items():
            (build_dir / f"ptxas_{arch}.log").write_text("\n".join(arch_lines) + "\n")
        self._report(log)

        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, output)
        output.chmod(0o755)
        output.with_name(BUILD_LOG_NAME).write_text(log)

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the build log follows the extension into the source tree."""
        super().copy_extensions_to_source()
        for ext in self.extensions:
            built = Path(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
            in_place = Path(self.get_ext_fullpath(ext.name))
            self.copy_file(str(built.with_name(BUILD_LOG_NAME)), str(in_place.with_name(BUILD_LOG_NAME)))

    @staticmethod
    def _report(log: str) -> None:
        kernels = _ENTRY_FUNCTION.findall(log)
        spills = [int(m["stores"]) + int(m["loads"]) for m in _SPILLS.finditer(log)]
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
        _notice(
            f"ptxas: {len(kernels)} kernel builds, at most {max(registers, default=0)} registers, "
            f"{sum(spills)} spill bytes"
        )
        if any(spills):
            _notice("WARNING: some kernels spill registers; see cdm_fast/_C_build.log")
        for line in log.splitlines():
            if "warning" in line.lower():
                _notice(line)


def _remove_in_place_extension() -> None:
    """A pure build must not leave an earlier editable build's extension importable from the source tree."""
    for stale in [*(ROOT / "cdm_fast").glob("_C.*.so"), ROOT / "cdm_fast" / BUILD_LOG_NAME]:
        if stale.is_file():
            stale.unlink()
            _notice(f"removed {stale.relative_to(ROOT)} left by an earlier build")


def _ext_modules() -> list[Extension]:
    if os.environ.get("CDM_FAST_NO_CUDA", "0") not in ("", "0"):
        _notice("CDM_FAST_NO_CUDA is set: building the pure-Python package (no cdm_fast._C)")
        _remove_in_place_extension()
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        _notice(
            "no CUDA compiler found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): building the pure-Python "
            "package; the 'cuda' backend will be unavailable"
        )
        _remove_in_place_extension()
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    depends = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cuh"))
    return [Extension("cdm_fast._C", sources=[*sources, "csrc/bindings.cpp"], depends=depends)]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildCudaExtension})
