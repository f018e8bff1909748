"""The layers of DESIGN.md hold: no module imports a layer above its own, and edge/ and hub/
never import each other (the `konsul` command in cli/ sits above both).

Every import in every module is read from its syntax tree, including imports inside
functions, so an import made lazily for start-up speed counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> import name, as pyproject.toml maps them.
PACKAGES = {
    "cli": "konsul.cli",
    "edge": "konsul.edge",
    "hub": "konsul.hub",
    "protocols": "konsul.protocols",
    "sync": "konsul.sync",
}
# What each layer may not import: the layers above it, and its sibling program.
FORBIDDEN = {
    "konsul.cli": (),
    "konsul.edge": ("konsul.cli", "konsul.hub"),
    "konsul.hub": ("konsul.cli", "konsul.edge"),
    "konsul.protocols": ("konsul.cli", "konsul.edge", "konsul.hub"),
    "konsul.sync": ("konsul.cli", "konsul.edge", "konsul.hub", "konsul.protocols"),
}


def modules() -> Iterator[tuple[str, str, Path]]:
    """``(layer, module name, path)`` for every module of every layer."""
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield package, ".".join([package, *parts]), path


def imported_names(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, relative ones resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from konsul import hub` names the package in the alias
                yield node.lineno, f"{target}.{alias.name}"


def violations(layer: str, module: str, path: Path) -> list[str]:
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for line, name in imported_names(module, path):
        for above in FORBIDDEN[layer]:
            if name == above or name.startswith(above + "."):
                found.append(f"{where}:{line} imports {name}")
    return found


def test_every_layer_has_modules():
    layers = {layer for layer, _module, _path in modules()}
    assert layers == set(PACKAGES.values())


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_of_a_layer_above_or_of_the_sibling_program(layer: str):
    found = [v for owner, module, path in modules() if owner == layer for v in violations(owner, module, path)]
    assert found == []


def test_the_check_sees_relative_and_lazy_imports(tmp_path: Path):
    edge = tmp_path / "edge"
    edge.mkdir()
    (edge / "bad.py").write_text(
        "def later():\n    from ..hub import agent\n    import konsul.hub.sites\n\nfrom konsul import hub\n"
    )
    found = violations("konsul.edge", "konsul.edge.bad", edge / "bad.py")
    assert sorted(entry.split(" imports ")[1] for entry in found) == [
        "konsul.hub", "konsul.hub", "konsul.hub.agent", "konsul.hub.sites",
    ]
