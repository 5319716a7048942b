"""STYLE rule 8: `cluster/` type-checks and the tree is ruff clean (run by the suite so CI enforces it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    out = subprocess.run(
        [str(BIN / "ruff"), "check", "cluster", "rank", "api", "tui", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_cluster() -> None:
    out = subprocess.run([str(BIN / "mypy"), "cluster"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
