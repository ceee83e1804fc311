"""The import rules of ARCHITECTURE.md, checked on the source: parts meet only where they should.

Of feedloop, each part imports itself and what ALLOWED names for it, nothing else:
- the core: nothing (server, trainer and demo build on it, never the other way round);
- the server: the core and the generated proto code; the trainer: the core. Server and trainer
  never import each other: they meet in the replay store and the model registry;
- the client: the generated proto code alone, whatever the file, and neither torch nor numpy
  (the base install has neither);
- the demo: the client (its simulated users talk to a real server through it) and the core (the
  simulated users split words with the tokenizer and draw prompts from the corpus; the
  in-process simulation samples the registry's policies and writes the replay store). It starts
  server and trainer as processes, never by import;
- the console: the client alone (it is a client of the server like any app), never torch.
Every part may import the package root `feedloop` (proto/feedloop/__init__.py: the version).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = "feedloop"

ALLOWED = {
    "core": (),
    "server": ("feedloop.core", "feedloop.v1"),
    "trainer": ("feedloop.core",),
    "client": ("feedloop.v1",),
    "demo": ("feedloop.client", "feedloop.core"),
    "console": ("feedloop.client",),
}
FORBIDDEN_LIBRARIES = {"client": ("torch", "numpy"), "console": ("torch", "numpy")}


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


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def may_import(part: str, name: str) -> bool:
    if within(name, FORBIDDEN_LIBRARIES.get(part, ())):
        return False
    if name == PACKAGE_ROOT or not within(name, (PACKAGE_ROOT,)):
        return True  # the version, or a library
    return within(name, (f"{PACKAGE_ROOT}.{part}", *ALLOWED[part]))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_parts_import_only_what_the_architecture_allows(part):
    offences = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(part)
        for name in sorted(imports_of(path))
        if not may_import(part, name)
    ]
    assert offences == []


def test_every_part_is_checked():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(ALLOWED)


def test_simulated_users_are_pure_python():
    assert not {
        n
        for n in imports_of(ROOT / "demo" / "simusers.py")
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
