"""The package is layered: every module imports only from its own layer and the ones below.

Read bottom to top, the layers are what a newcomer learns in order (docs/architecture.md
draws the same table). The test parses every module's imports, lazy ones inside
functions included, so an upward import fails here the day it is written.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zo_fx"

#: bottom to top; a module may import from its own layer and every layer before it
LAYERS = [
    ["zo_fx.files", "zo_fx.checks", "zo_fx.locks", "zo_fx.rewards"],
    ["zo_fx.streams"],
    ["zo_fx.kernels"],
    ["zo_fx.ops", "zo_fx.losses"],
    ["zo_fx.passes"],
    ["zo_fx.compile", "zo_fx.decoding"],
    ["zo_fx.optim"],
    ["zo_fx.integrations"],
    ["zo_fx.tasks", "zo_fx.models"],
    ["zo_fx.finetune"],
    ["zo_fx.cli", "zo_fx.__main__"],
    ["zo_fx"],  # the package root re-exports the public names: nothing inside may import it
]


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every zo_fx import in ``path``; ``from pkg import name`` resolves to
    ``pkg.name`` when that is a module."""
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                as_path = PACKAGE.parent / Path(*sub.split("."))
                is_module = as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else target))
    return [(line, m) for line, m in found if m == "zo_fx" or m.startswith("zo_fx.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    here = module_name(path)
    if here == "zo_fx":
        return  # the root re-exports from every layer
    mine = layer_of(here)
    upward = [f"line {line}: {target} (layer {layer_of(target)} > {mine})"
              for line, target in imported_modules(path) if layer_of(target) > mine]
    assert not upward, f"{here} (layer {mine}) imports from above: " + "; ".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The parser resolves relative, absolute and lazy imports (a checker that cannot fail proves nothing)."""
    fake = PACKAGE / "streams" / "_layering_probe.py"
    source = "def f():\n    from ..optim import base\n    import zo_fx.compile\n    from zo_fx import kernels\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else _read(self))
    found = {m for _, m in imported_modules(fake)}
    assert found == {"zo_fx.optim.base", "zo_fx.compile", "zo_fx.kernels"}
    assert all(layer_of(m) > layer_of("zo_fx.streams._layering_probe") for m in found)


_read = Path.read_text
