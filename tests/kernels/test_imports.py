"""The kernels package has no import cycle: its modules import each other (at module level
or inside functions) along a DAG, and each imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import text4vpr.kernels

PACKAGE = Path(text4vpr.kernels.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _kernel_imports(module: str) -> set[str]:
    """Sibling modules that `module` imports anywhere in its source (lazy imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("text4vpr.kernels."):
            out.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("text4vpr.kernels.")}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path of names, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_kernels_import_graph_is_acyclic():
    graph = {m: _kernel_imports(m) for m in MODULES}
    assert "common" in MODULES and not graph["common"], graph  # the shared helpers import no sibling
    assert _cycle(graph) is None, _cycle(graph)


@pytest.mark.parametrize("module", MODULES)
def test_each_kernels_module_imports_alone(module):
    if module == "group_topk_triton":
        pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", f"import text4vpr.kernels.{module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
