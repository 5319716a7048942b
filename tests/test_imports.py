"""The layering rules of DESIGN.md, checked on the source (not on what happens to be imported).

Each folder has an allowlist: the standard library, the folders it may use and the third-party packages
it uses today, named one by one. A new dependency is a decision, so it fails here until it is added to
its folder's list. Every `import` counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(slots=True, frozen=True)
class Allowed:
    """What one folder may import: whole packages (with their submodules) and single modules."""

    packages: frozenset[str]
    modules: frozenset[str] = frozenset()

    def allows(self, module: str) -> bool:
        root = module.split(".")[0]
        return root in STDLIB or root in self.packages or module in self.modules


RULES = {
    # the pure core: no MLX, MPI, web or UI; msgpack is the bus codec and the manifest's encoding;
    # llguidance (pure computation) checks a request's schema or grammar before it is queued
    "cluster": Allowed(frozenset({"cluster", "msgpack", "llguidance"})),
    # the HTTP side of rank 0: never MLX or the engine's internals
    "api": Allowed(
        frozenset({"api", "cluster", "fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"})
    ),
    # the dashboard: an HTTP client that shares only the snapshot schema with the server
    "tui": Allowed(frozenset({"tui", "httpx", "textual", "rich"}), frozenset({"cluster.snapshot"})),
    # the process: everything above, plus what runs the model (rank 0 hosts the API)
    "rank": Allowed(
        frozenset(
            {
                "rank",
                "cluster",
                "api",
                "mlx",
                "mlx_lm",
                "mpi4py",
                "numpy",  # CPU kernels, SSD block files, transport buffers
                "psutil",  # pulse: CPU and memory of the rank
                "tokenizers",
                "jinja2",  # chat templates
                "transformers",  # tokenizers of models without tokenizer.json
                "huggingface_hub",  # --model org/name when the weights are not in the local cache yet
                "llguidance",  # constrained decoding: token masks (rank/grammar.py)
            }
        )
    ),
}


def imports(path: Path, source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`; `from pkg import name` counts as `pkg.name` when
    that is one of our modules, so `from cluster import snapshot` is the module `cluster.snapshot`."""
    package = path.relative_to(ROOT).parent.parts
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{module}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py"
                ).exists()
                found.append((node.lineno, sub if is_module else module))
    return found


def violations(path: Path, source: str) -> list[str]:
    folder = path.relative_to(ROOT).parts[0]
    rule = RULES[folder]
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {module}, which {folder}/ may not import"
        for line, module in imports(path, source)
        if not rule.allows(module)
    ]


@pytest.mark.parametrize("folder", sorted(RULES))
def test_layering(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad += violations(path, path.read_text())
    assert not bad, "\n".join(bad)


def test_every_package_has_rules() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(RULES)


@pytest.mark.parametrize(
    ("path", "source", "flagged"),
    [
        ("cluster/fake.py", "import mlx.core as mx\n", ["cluster/fake.py:1: imports mlx.core"]),
        (
            "cluster/fake.py",
            "def f():\n    from fastapi import FastAPI\n",
            ["cluster/fake.py:2: imports fastapi"],
        ),
        ("api/fake.py", "import json\nfrom mlx import core\n", ["api/fake.py:2: imports mlx"]),
        (
            "api/fake.py",
            "from rank.tokenizer import ChatTokenizer\n",
            ["api/fake.py:1: imports rank.tokenizer"],
        ),
        ("tui/fake.py", "from cluster.stats import X\n", ["tui/fake.py:1: imports cluster.stats"]),
        ("tui/fake.py", "import cluster\n", ["tui/fake.py:1: imports cluster,"]),
        ("tui/fake.py", "from api import app\n", ["tui/fake.py:1: imports api.app"]),
        ("tui/fake.py", "from cluster import snapshot\nfrom cluster.snapshot import JobSnapshot\n", []),
        ("tui/fake.py", "from . import widgets\nfrom .fmt import x\nimport textual.app\n", []),
        ("rank/fake.py", "import mlx.core\nfrom api.app import create_app\nimport numpy\n", []),
        ("rank/fake.py", "import textual\n", ["rank/fake.py:1: imports textual"]),
    ],
)
def test_the_checker_flags_file_line_and_module(path: str, source: str, flagged: list[str]) -> None:
    found = violations(ROOT / path, source)
    assert len(found) == len(flagged), found
    for message, expected in zip(found, flagged, strict=True):
        assert message.startswith(expected), message


def test_no_pickle_anywhere() -> None:
    bad = []
    for folder in sorted(RULES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in imports(path, path.read_text()):
                if module.split(".")[0] in {"pickle", "cloudpickle", "dill", "marshal", "shelve"}:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)
