"""The picture of docs/ARCHITECTURE.md, checked on the imports: data flows shards -> train/ -> models/, and the only
thing train/ knows of data_prep/ is its data contract, data_prep/schema.py (standard library only)."""

import ast
import sys
from pathlib import Path

from conftest import REPO

NAMESPACE = "condmoe."  # the installed names (setup.cfg package_dir): condmoe.train is the folder train/


def raw_imports(path: Path, root: Path = REPO) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); relative imports resolved."""
    names = set()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """``raw_imports`` with the namespace taken off, so names match the repository's folders (``train.data``)."""
    return {name.removeprefix(NAMESPACE) for name in raw_imports(path, root)}


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def data_prep_imports_beyond_the_schema(paths: list[Path], root: Path = REPO) -> dict[str, list[str]]:
    offenders = {}
    for path in paths:
        bad = sorted(name for name in imported_modules(path, root)
                     if name.split(".")[0] == "data_prep" and name not in ("data_prep", "data_prep.schema")
                     and not name.startswith("data_prep.schema."))
        if bad:
            offenders[str(path.relative_to(root))] = bad
    return offenders


def test_train_reads_data_prep_only_through_its_schema():
    assert not data_prep_imports_beyond_the_schema(sources("train"))


def test_the_schema_needs_the_standard_library_only():
    path = REPO / "data_prep" / "schema.py"
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots - set(sys.stdlib_module_names)


def test_models_hold_architecture_only():
    """models/ never imports train/ or data_prep/ (and so never reads a config file, a rank or a shard)."""
    offenders = {str(p.relative_to(REPO)): sorted(n for n in imported_modules(p) if n.split(".")[0] in
                                                  ("train", "data_prep")) for p in sources("models")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checks above cannot pass by overlooking imports: lazy and relative ones are found."""
    (tmp_path / "train").mkdir()
    probe = tmp_path / "train" / "probe.py"
    probe.write_text("from condmoe.data_prep import schema\n\n\ndef f():\n"
                     "    from condmoe.data_prep.video import decode_clip\n    from ..data_prep import merge\n")
    assert data_prep_imports_beyond_the_schema([probe], tmp_path) == {
        "train/probe.py": ["data_prep.merge", "data_prep.video", "data_prep.video.decode_clip"]}


FIRST_PARTY = ("train", "models", "data_prep")


def test_first_party_code_imports_the_namespaced_names():
    """No file imports a bare ``train``/``models``/``data_prep``: installed, those names are a user's own packages."""
    paths = [p for folder in (*FIRST_PARTY, "tests", "bench") for p in sorted((REPO / folder).rglob("*.py"))]
    bare = {str(p.relative_to(REPO)): sorted(n for n in raw_imports(p) if n.split(".")[0] in FIRST_PARTY)
            for p in paths}
    assert not {k: v for k, v in bare.items() if v}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    paths = [p for folder in FIRST_PARTY for p in sorted((root / folder).rglob("*.py"))]
    modules = {module_name(p, root): p for p in paths}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path, root):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported not in FIRST_PARTY:  # a package __init__ is no module here
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one path per strongly connected component of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
