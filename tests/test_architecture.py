"""The layering rules of docs/architecture.md, checked on the source: what each wing may import, a first-line
docstring per module, a module map that lists every module with its one job, a `hf-medvis` command that starts
without torch, and a `core` of the standard library and fsspec only."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_medvis"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
ALLOWED = {  # wing -> the other wings it may import (docs/architecture.md); core is the shared foundation of all
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "evaluation": {"core", "data", "models"},
    "training": {"core", "data", "models", "infra"},
    "infra": {"core"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _wing(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _imported_wings(path: Path) -> set[str]:
    """Wings of hf_medvis imported anywhere in ``path`` (function-level imports included)."""
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package_parts[: len(package_parts) - node.level + 1])
            names = [".".join(base + ([node.module] if node.module else []))]
            if not node.module:  # from .. import data
                names = [f"{names[0]}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hf_medvis" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("wing", sorted(ALLOWED))
def test_wings_import_only_what_the_layering_allows(wing):
    wrong = {
        str(path.relative_to(PACKAGE)): sorted(_imported_wings(path) - ALLOWED[wing] - {wing})
        for path in _modules()
        if _wing(path) == wing
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_every_module_says_its_job():
    for path in _modules():
        source = path.read_text()
        if not source.strip():
            continue
        docstring = ast.get_docstring(ast.parse(source))
        assert docstring and docstring.split("\n")[0].strip(), f"{path.relative_to(PACKAGE)} has no docstring"


def _module_map() -> dict[str, str]:
    """The rows of docs/architecture.md's "Module map": `path relative to hf_medvis/` -> its one job."""
    section = ARCHITECTURE.read_text().split("## Module map", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([\w/]+\.py)` \| (\S.*?) \|$", section, flags=re.MULTILINE))


def test_the_module_map_lists_every_module_and_only_modules():
    listed = _module_map()
    present = {str(path.relative_to(PACKAGE)) for path in _modules() if path.read_text().strip()}
    assert not sorted(present - set(listed)), "modules missing from the Module map of docs/architecture.md"
    assert not sorted(set(listed) - present), "Module map rows naming no module"


def test_the_command_starts_without_the_training_stack():
    code = (
        "import sys, hf_medvis.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", sorted(f"hf_medvis.core.{path.stem}" for path in (PACKAGE / "core").glob("*.py")))
def test_core_imports_only_the_standard_library_and_fsspec(module):
    """core loads on a bare Python plus fsspec (storage I/O): no torch, transformers, datasets, yaml, ..."""
    module = module.removesuffix(".__init__")
    code = (
        f"import sys; before = set(sys.modules); import {module}; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) "
        "- {'hf_medvis', 'fsspec'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
