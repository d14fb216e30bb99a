"""No top-level name of this repository hides an installed distribution from code run at the repo root.

`python -m bench.<name>` and pytest (`pythonpath = ["."]`) put the root first on sys.path, so a root
folder with an `__init__.py` (or a root `.py` file) wins over site-packages. transformers imports Hugging
Face's `kernels` package; our Triton sources live in a root `kernels/` folder, which is therefore a plain
folder (no `__init__.py`): a namespace portion, which an installed regular package always outranks. The
package `cdm_fast.kernels` reaches it through the link `cdm_fast/kernels`.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run at the root exactly as `python -m` does: '' (the current folder) first on sys.path.
_RESOLVE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
print(json.dumps(out))
"""


def _root_import_names() -> set[str]:
    names = set()
    for entry in REPO.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


def _other_distributions_import_names() -> dict[str, list[str]]:
    own = "cdm-fast"
    return {
        name: dists
        for name, dists in importlib.metadata.packages_distributions().items()
        if any(dist.lower().replace("_", "-") != own for dist in dists)
    }


def _is_root_entry(place: str, name: str) -> bool:
    """Whether `place` is the repository's own top-level `name` (folder or module), not merely somewhere
    under the root (CI's venv lives in the clone)."""
    path = Path(place).resolve()
    return path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in (name, f"{name}.py")


def _resolved_from_root(names: list[str]) -> dict[str, list[str] | None]:
    result = subprocess.run(
        [sys.executable, "-c", _RESOLVE, *names], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def test_no_root_name_shadows_an_installed_distribution():
    installed = _other_distributions_import_names()
    clashing = sorted(_root_import_names() & installed.keys())
    resolved = _resolved_from_root(clashing)
    shadowed = {
        name: (installed[name], places)
        for name, places in resolved.items()
        if places is not None and any(_is_root_entry(place, name) for place in places if place)
    }
    assert shadowed == {}, f"the repository root shadows installed distributions: {shadowed}"


def test_kernels_folder_is_no_regular_package_and_cdm_fast_kernels_is_it():
    assert not (REPO / "kernels" / "__init__.py").exists()
    resolved = _resolved_from_root(["cdm_fast.kernels.registry"])["cdm_fast.kernels.registry"]
    assert resolved is not None and Path(resolved[0]).resolve() == REPO / "kernels" / "registry.py"


def test_transformers_sees_the_installed_kernels_package_from_the_root():
    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("Hugging Face's kernels is not installed: nothing for kernels/ to shadow")
    result = subprocess.run(
        [sys.executable, "-c", "import kernels, transformers.activations; print(kernels.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not _is_root_entry(result.stdout.strip(), "kernels")
