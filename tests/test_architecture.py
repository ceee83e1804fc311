"""The import rules of ARCHITECTURE.md, checked on the source: parts meet only where they should.

- the core depends on neither server, trainer nor client;
- server and trainer never import each other (they meet in the store and the registry);
- the client library needs only the generated proto code: no core, no torch, no numpy
  (the demo, an application built on the client, may use the core's pure-Python simulated users).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"core": "core", "server": "server", "trainer": "trainer", "client": "client"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


FORBIDDEN = {
    "core": ("feedloop.server", "feedloop.trainer", "feedloop.client"),
    "server": ("feedloop.trainer", "feedloop.client"),
    "trainer": ("feedloop.server", "feedloop.client"),
    "client": ("feedloop.server", "feedloop.trainer", "feedloop.core", "torch", "numpy"),
}
# The demo drives the whole system (starts server and trainer as processes) and uses the core's
# simulated users; the dispatcher only names other parts' command modules as strings.
CLIENT_APPLICATIONS = ("demo",)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_parts_import_only_what_the_architecture_allows(part):
    offences = []
    for path in modules(PARTS[part]):
        if part == "client" and path.stem.startswith(CLIENT_APPLICATIONS):
            continue
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[part]):
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offences == []


def test_simulated_users_are_pure_python():
    assert not {
        n
        for n in imports_of(ROOT / "core" / "simusers.py")
        if n.split(".")[0] in ("torch", "numpy")
    }


def core_module_name(path: Path) -> str:
    """The import name of a file under core/ (a package's __init__ is the package)."""
    parts = path.relative_to(ROOT / "core").with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("feedloop.core", *parts))


def core_import_graph() -> dict[str, set[str]]:
    """Each core module -> the core modules it imports, at the top or inside a function alike
    (a deferred import still ties the two modules together). `from package import name` counts
    as importing the submodule when `name` is one."""
    files = {core_module_name(path): path for path in modules("core")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in files else node.module)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def test_the_core_has_no_import_cycles():
    graph = core_import_graph()
    assert "feedloop.core.registry.factory" in graph  # the walk sees the subpackages
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError("import cycle: " + " -> ".join(exc.args[1])) from None
