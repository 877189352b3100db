"""The import structure: runner -> tasks -> core, and no cycles between the subpackages of core.

Rules: core imports neither ray nor tasks nor runner; tasks imports neither runner nor ray (Ray is
the runner's); the subpackages of core (core.flow, core.models, ...) import each other without a
cycle.

Every import statement counts, at module level or inside a function (a deferred import is still a
dependency), read from the source with `ast`: nothing is imported to check it. The checker itself
is tested on a small synthetic tree, so it is known to fail where it must.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "tasks", "runner")
FORBIDDEN = {"core": ("ray", "tasks", "runner"), "tasks": ("runner", "ray")}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> set[str]:
    """The absolute names of every module imported anywhere in `path` (relative imports resolved)."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from core import flow`
    return found


def core_unit(name: str) -> str | None:
    """The subpackage of core a module belongs to (core.flow.seeds -> core.flow; core.state stays)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "core" and len(parts) >= 2 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check_tree(root: Path) -> list[str]:
    """Every violation of the import rules under root's core/, tasks/ and runner/, as sentences."""
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            name = module_name(root, path)
            for target in sorted(imports(root, path)):
                top = target.split(".")[0]
                if top in FORBIDDEN.get(layer, ()):
                    problems.append(f"{name} imports {target}: {layer} must not import {top}")
                src, dst = core_unit(name), core_unit(target)
                if src and dst and src != dst:
                    graph.setdefault(src, set()).add(dst)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("cycle between subpackages of core: " + " -> ".join(cycle))
    return problems


def test_the_repository_follows_the_import_rules():
    assert check_tree(REPO) == []


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    write(
        tmp_path,
        {
            "core/__init__.py": "",
            "core/a/__init__.py": "",
            "core/a/x.py": "from core.b.y import f\n",
            "core/b/__init__.py": "",
            # the way back is a function-local, relative import: it still closes the cycle
            "core/b/y.py": "def f():\n    from ..a import x\n    return x\n",
            "core/c/__init__.py": "",
            "core/c/z.py": "import torch\n\ndef g():\n    import ray\n    from tasks.t import h\n",
            "tasks/__init__.py": "",
            "tasks/t.py": "from core.c.z import g\nfrom runner import r\n",
            "runner/__init__.py": "",
            "runner/r.py": "import ray\nfrom tasks.t import h\n",
        },
    )
    problems = check_tree(tmp_path)
    assert problems == [
        "core.c.z imports ray: core must not import ray",
        "core.c.z imports tasks.t: core must not import tasks",
        "core.c.z imports tasks.t.h: core must not import tasks",
        "tasks.t imports runner: tasks must not import runner",
        "tasks.t imports runner.r: tasks must not import runner",
        "cycle between subpackages of core: core.a -> core.b -> core.a",
    ]


def test_a_clean_synthetic_tree_passes(tmp_path):
    write(
        tmp_path,
        {
            "core/a/x.py": "from core.b.y import f\nimport torch\n",
            "core/b/y.py": "from . import other\n",
            "core/b/other.py": "",
            "tasks/t.py": "from core.a.x import f\n",
            "runner/r.py": "import ray\nfrom tasks.t import h\nfrom core.b import y\n",
        },
    )
    assert check_tree(tmp_path) == []
