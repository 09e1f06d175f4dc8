"""DESIGN.md's dependency rule, checked on the source: server -> engine -> scheduler -> runner -> models -> kernels,
weights/ and cache/ below the scheduler, wire/ at the bottom, trainer/ on wire/ only. Type-only imports count too:
an interface a lower layer consumes belongs to that layer (the import-cycle check skips them, so it cannot see one)."""

from __future__ import annotations

import ast
from pathlib import Path

import hotswap

PACKAGE = Path(hotswap.__file__).parent

# a package (or top-level module) may import only those of a lower rank; the top rank holds the entry points
RANK = {
    "errors": 0, "wire": 1, "sglang_server_args": 1, "sampling_params": 1, "gc_policy": 1, "config": 2, "protocol": 2,
    "kernels": 3, "models": 4, "cache": 4, "weights": 5, "runner": 6, "scheduler": 7, "engine": 8, "server": 9,
    "demo": 10, "testing": 10, "__init__": 10, "cli": 11,
}
TRAINER_MAY_IMPORT = {"wire"}


def imported_parts(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, first component under hotswap) of every absolute hotswap import, type-only ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module and node.module.split(".")[0] == "hotswap":
            parts = node.module.split(".")
            out += [(node.lineno, parts[1])] if len(parts) > 1 else [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("hotswap.")]
    return out


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, target in imported_parts(ast.parse(path.read_text(), str(path))):
            if target == layer or target not in RANK and layer != "trainer":
                continue
            if layer == "trainer" and target not in TRAINER_MAY_IMPORT or layer != "trainer" and RANK[target] >= RANK[layer]:
                found.append(f"{rel}:{line}: {layer} imports {target}")
    return found


def test_every_package_is_ranked():
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    layers |= {p.stem for p in PACKAGE.glob("*.py")}
    assert layers - {"trainer"} <= RANK.keys(), f"place {sorted(layers - RANK.keys() - {'trainer'})} in RANK (DESIGN.md's layers)"


def test_dependencies_point_down():
    assert upward_imports() == []
