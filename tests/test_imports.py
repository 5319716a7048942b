"""The layering rules of DESIGN.md, checked on the source (not on what happens to be imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "cluster": {"mlx", "mlx_lm", "mpi4py", "textual", "fastapi", "starlette", "uvicorn", "numpy"},
    "api": {"mlx", "mlx_lm", "mpi4py", "textual", "rank"},
    "tui": {"mlx", "mlx_lm", "mpi4py", "fastapi", "rank"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = imported_roots(path) & FORBIDDEN[package]
        if hits:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_no_pickle_anywhere() -> None:
    bad = []
    for package in ("cluster", "rank", "api", "tui"):
        for path in (ROOT / package).rglob("*.py"):
            if {"pickle", "cloudpickle", "dill", "marshal"} & imported_roots(path):
                bad.append(str(path.relative_to(ROOT)))
    assert not bad
