"""Input formats (ettin.data.inputs), and what importing ettin's modules pulls in."""

from __future__ import annotations

import ast
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ettin.data.inputs import (
    INPUT_FORMATS,
    PLAIN_TEXT_KIND,
    BadRecord,
    Document,
    InputError,
    find_inputs,
    input_suffixes,
    iter_records,
)

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------------------------
# The format table


def test_every_format_is_found_by_its_suffixes_and_named_in_the_help(tmp_path):
    kinds = [fmt.kind for fmt in INPUT_FORMATS]
    assert len(set(kinds)) == len(kinds) and PLAIN_TEXT_KIND in kinds
    suffixes = [s for fmt in INPUT_FORMATS for s in fmt.suffixes]
    assert len(set(suffixes)) == len(suffixes)
    assert input_suffixes() == ".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt"
    for fmt in INPUT_FORMATS:
        for suffix in fmt.suffixes:
            (tmp_path / f"x{suffix}").touch()
    (tmp_path / "x.csv").touch()
    found = {Path(s.path).name: s.kind for s in find_inputs([tmp_path])}
    assert found == {f"x{s}": fmt.kind for fmt in INPUT_FORMATS for s in fmt.suffixes}

    from ettin.data.commands import build_parser

    for tool in ("prepare", "train-tokenizer"):
        help_text = " ".join(build_parser(tool).format_help().split())
        assert f"{input_suffixes()} files, or directories holding them" in help_text


def test_an_unknown_suffix_names_every_format(tmp_path):
    (tmp_path / "x.csv").touch()
    with pytest.raises(InputError, match=f"expected {input_suffixes()} \\(or pass it with"):
        find_inputs([tmp_path / "x.csv"])
    with pytest.raises(InputError, match=f"expected {input_suffixes()} files"):
        find_inputs([tmp_path])


def test_records_of_each_reader(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one", "id": "x"}) + "\n\n{oops\n" + json.dumps([1]) + "\n")
    (tmp_path / "b.txt").write_text("two")
    (tmp_path / "c.jsonl").write_text('{"text": "   "}\n')
    a, b, c = find_inputs([tmp_path])
    assert list(iter_records(a)) == [
        Document(1, "x", "one", 3),
        BadRecord("invalid_json", 3, "Expecting property name enclosed in double quotes at column 2"),
        BadRecord("missing_text", 4, "the line is a JSON list, not an object"),
    ]
    assert list(iter_records(b)) == [Document(1, b.name, "two", 3)]
    assert list(iter_records(c)) == [BadRecord("empty_text", 1, "'text' is empty or whitespace")]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n')[:-6])
    with pytest.raises(InputError, match="cannot read input .*a.jsonl.gz"):
        list(iter_records(find_inputs([tmp_path / "a.jsonl.gz"])[0]))


# ---------------------------------------------------------------------------------------------
# Imports


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
        "import argparse; from ettin.data.commands import add_data_parser, build_parser;"
        "add_data_parser(argparse.ArgumentParser(prog='ettin').add_subparsers());"
        "[build_parser(name) for name in ('prepare', 'train-tokenizer', 'inspect')]"
    )
    assert "ettin.data.commands" in modules
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def test_importing_the_model_does_not_import_the_data_pipeline():
    """IGNORE lives in ettin.model: the model no longer loads collate (and its xxhash)."""
    graph, seen, todo = import_graph(), set(), ["ettin.model"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert "ettin.parallel" in seen and not {m for m in seen if m.startswith("ettin.data")}
