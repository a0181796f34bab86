"""The package's import graph, every import counted (function-level ones too): no cycle, the
library never imports the trainer or the CLI, the trainer never imports the CLI, and the CLI
reaches the trainer only through `cli/train.py`."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "text4vpr"
LIBRARY = ("text4vpr.data", "text4vpr.models", "text4vpr.losses", "text4vpr.kernels", "text4vpr.retrieval",
           "text4vpr.utils", "text4vpr.config")
APPLICATION = ("text4vpr.train", "text4vpr.cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file; a module that imports by
    name (`import_module`) imports every package module its string constants name."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        text = path.read_text()
        by_name = "import_module(" in text
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule `pkg.sub` where there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            elif by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in files:
                targets = [node.value]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            if _in(src, LIBRARY) and _in(dst, APPLICATION):
                bad.append(f"library {src} imports {dst}")
            if _in(src, ("text4vpr.train",)) and _in(dst, ("text4vpr.cli",)):
                bad.append(f"trainer {src} imports the CLI {dst}")
            if _in(src, ("text4vpr.cli",)) and src != "text4vpr.cli.train" and _in(dst, ("text4vpr.train",)):
                bad.append(f"CLI {src} imports the trainer {dst} (only cli.train does)")
    return sorted(bad)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_layers_import_downwards_only():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_lazy_imports_and_cycles(tmp_path):
    """The graph counts an import inside a function, and a cycle through one is found."""
    pkg = tmp_path / "text4vpr"
    (pkg / "train").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("def main():\n    from text4vpr.cli import errors\n")
    (pkg / "cli" / "__init__.py").write_text("import importlib\nimportlib.import_module('text4vpr.cli.errors')\n")
    (pkg / "cli" / "errors.py").write_text("def f():\n    import text4vpr.train\n")
    graph = import_graph(pkg)
    assert graph["text4vpr.train"] == {"text4vpr.cli.errors"} and graph["text4vpr.cli"] == {"text4vpr.cli.errors"}
    assert find_cycle(graph) in (["text4vpr.cli.errors", "text4vpr.train", "text4vpr.cli.errors"],
                                 ["text4vpr.train", "text4vpr.cli.errors", "text4vpr.train"])
    assert layer_violations(graph) == ["CLI text4vpr.cli.errors imports the trainer text4vpr.train (only cli.train does)",
                                       "trainer text4vpr.train imports the CLI text4vpr.cli.errors"]
