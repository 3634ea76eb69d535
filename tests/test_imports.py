"""What importing ettin's modules pulls in: no import loop, no upward import between the layers of
docs/DESIGN.md, and the light paths (parsers, the model) stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """ettin modules a module imports when it is imported: statements outside functions and
    classes (inside top-level if/try/with too), except ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # submodules
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """ettin module -> the ettin modules it imports at module level."""
    files = {_module_name(p): p for p in (SRC / "ettin").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        imports = _top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imports if m in files and m != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse(
        "from .x import y\nimport ettin.z\nif TYPE_CHECKING:\n    import ettin.t\ndef f():\n    import ettin.w\n"
    )
    assert _top_level_imports(tree, "ettin.data.m", False) == {"ettin.data.x", "ettin.data.x.y", "ettin.z"}


def test_no_import_cycle_among_ettin_modules():
    graph = import_graph()
    assert graph["ettin.data.tokenizer"] >= {"ettin.data.inputs"}
    assert graph["ettin.data.prepare"] >= {"ettin.data.inputs", "ettin.data.tokenizer"}
    assert find_cycles(graph) == []


# The layers of docs/DESIGN.md, bottom first: at module level a module imports only from its own
# layer's earlier rows or the layers below (lazy imports inside functions do not count).
LAYERS = [
    ["ettin.errors", "ettin.fileio", "ettin.logs", "ettin.layout"],
    ["ettin.config"],
    ["ettin.parallel"],
    ["ettin.attention"],
    ["ettin.model", "ettin.flops", "ettin.memory"],
    ["ettin.hf", "ettin.pretrained"],
    ["ettin.data"],
    ["ettin.train"],
    ["ettin.launch"],
    ["ettin.cli", "ettin.demo", "ettin.testing", "ettin"],
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer if m != "ettin"):
            return i
    return len(LAYERS) - 1


def test_modules_import_only_from_their_layer_or_below():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == [], "a module imports a layer above its own at module level (see docs/DESIGN.md, Layers)"


def imported_by(statement: str) -> set[str]:
    """The modules ``python -X importtime -c statement`` reports importing."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    return {
        line.split("|")[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


HEAVY = ("torch", "numba", "numpy", "streaming", "transformers", "pyarrow", "tokenizers", "zstandard")


def test_building_the_data_parser_imports_nothing_heavy():
    modules = imported_by(
        "import argparse, data_tools.__main__, data_tools.prepare, data_tools.train_tokenizer, data_tools.inspect;"
        "from ettin.data.commands import add_data_parser;"
        "add_data_parser(argparse.ArgumentParser(prog='ettin').add_subparsers())"
    )
    assert "ettin.data.commands" in modules
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def reached(graph: dict, start: str) -> set[str]:
    """Every ettin module ``start`` imports at module level, directly or not."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_the_model_and_the_collator_do_not_import_each_other():
    """IGNORE lives in ettin.config: the model loads no data pipeline (xxhash) and the collator no
    model (megatron)."""
    graph = import_graph()
    model, collate = reached(graph, "ettin.model"), reached(graph, "ettin.data.collate")
    assert "ettin.parallel" in model and not {m for m in model if m.startswith("ettin.data")}
    assert "ettin.config" in collate and not {"ettin.model", "ettin.parallel"} & collate
