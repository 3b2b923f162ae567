"""The layering of the codebase (docs/architecture.md): api <- render <- handlers; the torch-free core never
imports the operator or the runtimes; the operator never imports torch; the runtimes never
import the operator.

import-linter would be the usual tool, but its graph builder (grimp) does not see namespace
subpackages, and kubetune.operator / kubetune.trainer are exactly that (no __init__.py at their
roots, see docs/architecture.md). So the direct imports are read from the source with ``ast`` here, and
test_imports.py checks the transitive effect at run time (sys.modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {
    "torch-free core": (
        [
            ROOT / "kubetune" / "api",
            ROOT / "kubetune" / "storage",
            ROOT / "kubetune" / "run",
            ROOT / "kubetune" / "errors.py",
        ],
        (
            "kubetune.operator",
            "kubetune.trainer",
            "kubetune.local",
            "torch",
            "transformers",
            "deepspeed",
            "kopf",
            "kubernetes",
        ),
    ),
    "operator": (
        [ROOT / "operator"],
        ("kubetune.trainer", "kubetune.local", "torch", "transformers", "deepspeed", "peft", "llmcompressor"),
    ),
    "runtimes": ([ROOT / "trainer"], ("kubetune.operator", "kopf")),
    "local mode": ([ROOT / "kubetune" / "local"], ("kubetune.operator", "kopf")),
}


def python_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violates(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_nothing_it_must_not(layer: str) -> None:
    paths, forbidden = LAYERS[layer]
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in python_files(paths)
        for module in sorted(imported_modules(path))
        if violates(module, forbidden)
    ]
    assert not offences, f"{layer} layer breaks its contract:\n" + "\n".join(offences)


def test_the_operator_has_no_init_at_its_root() -> None:
    # A top-level operator/__init__.py would shadow the standard library's operator module.
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "trainer" / "__init__.py").exists()
