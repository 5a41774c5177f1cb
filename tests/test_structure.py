"""The layering docs/design.md promises ("Rooms and doors"), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "casedesk"


def imports() -> dict[str, set[str]]:
    """Each casedesk module → the casedesk modules it imports (TYPE_CHECKING imports included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {module for module in found if module.startswith("casedesk")}
    return graph


def test_the_http_layer_imports_nothing_from_anthropic_or_translate() -> None:
    for module, deps in imports().items():
        if module.startswith("casedesk.http"):
            assert not [d for d in deps if d.startswith(("casedesk.anthropic", "casedesk.translate"))], module


def test_the_import_graph_has_no_cycle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            assert dep not in path, "import cycle: " + " → ".join([*path[path.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
    assert "casedesk.app" in graph and "casedesk.endpoints.messages" in graph  # the walk saw the package


def test_the_request_path_names_enum_members_by_module_globals() -> None:
    """docs/design.md, "The hot path": on Python 3.11 `Phase.IDLE` in code calls the enum
    metaclass's __getattribute__ (~850 instructions); the modules every request runs through
    name the members they test by module globals, defined once at module level."""
    hot = {
        "http/server.py": {"Phase", "Body"},
        "upstream/connection.py": {"ConnectionState"},
        "upstream/pool.py": {"ConnectionState"},
    }
    for module, enums in hot.items():
        tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert functions, module
        found = [
            f"{module}:{node.lineno} {node.value.id}.{node.attr}"
            for function in functions
            for node in ast.walk(function)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in enums
            and node.attr.isupper()
        ]
        assert not found, found
