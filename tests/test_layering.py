"""The import graph keeps its shape: no cycles, libraries below the service, wire types alone.

Every ``import`` statement of every module counts, wherever it is: at the top, inside a
function, under ``if TYPE_CHECKING``. A lazy or type-only import still ties two modules
together. ``import a.b`` is an arrow to ``a.b`` (the parent package's ``__init__`` runs
too, but ours are empty or load lazily); ``from a import b`` is an arrow to the module
``a.b`` when there is one, else to ``a``.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The project's packages: cycles are looked for among all of their modules.
PACKAGES = ("server", "duplex", "media", "vad")
#: Plain libraries: arrays and bytes in, values out. What they must not import.
LIBRARIES = ("media", "vad")
FORBIDDEN_IN_LIBRARIES = ("server", "duplex", "asyncio")
#: ``duplex.protocol`` is the one part of ``duplex`` the libraries may use (the SDK is
#: asyncio-based): ``duplex`` itself (its names load the SDK) and the rest are forbidden.
ALLOWED_IN_LIBRARIES = ("duplex.protocol",)
WIRE_TYPES = "duplex.protocol"


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (ours) or top-level name (anything else)
    path: Path
    line: int


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module of ours that ``name`` denotes (its nearest existing ancestor), or ``name``."""
    probe = name
    while probe and probe not in modules:
        probe = probe.rpartition(".")[0]
    return probe or name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the module's source, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                if node.level > len(base):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join([*base, *([node.module] if node.module else [])])
            else:
                parent = node.module or ""
            for alias in node.names:
                sub = f"{parent}.{alias.name}"
                targets.append(sub if sub in modules else parent)
        else:
            continue
        resolved = dict.fromkeys(_resolve(t, modules) for t in targets)  # once per statement
        found += [Import(module, t, path, node.lineno) for t in resolved]
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, list[Import]]:
    """Module -> its imports (all of them, ours or not)."""
    modules = find_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as the imports along it) per strongly connected group of modules."""
    edges = {
        m: sorted({i.target for i in imps if i.target in graph and i.target != m})
        for m, imps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_one_cycle(group, graph) for group in groups]


def _one_cycle(group: list[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A shortest way around the group from its first module back to it (breadth first)."""
    members = set(group)
    start = group[0]
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for imp in graph[v]:
                if imp.target == start:
                    path = [imp]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if imp.target in members and imp.target not in came:
                    came[imp.target] = imp
                    nxt.append(imp.target)
        frontier = nxt
    raise AssertionError(f"no cycle in {group}")  # pragma: no cover - a group has one


def describe(imports: list[Import], root: Path) -> str:
    return "\n".join(
        f"  {i.source} -> {i.target}  ({i.path.relative_to(root)}:{i.line})" for i in imports
    )


def library_violations(graph: dict[str, list[Import]]) -> list[Import]:
    """Imports from media/ or vad/ of the service, the SDK or asyncio."""
    bad = []
    for module, imps in graph.items():
        if module.split(".")[0] not in LIBRARIES:
            continue
        for imp in imps:
            top = imp.target.split(".")[0]
            allowed = any(
                imp.target == a or imp.target.startswith(a + ".") for a in ALLOWED_IN_LIBRARIES
            )
            if top in FORBIDDEN_IN_LIBRARIES and not allowed:
                bad.append(imp)
    return bad


def wire_type_violations(graph: dict[str, list[Import]]) -> list[Import]:
    """Imports of anything of ours by the wire types."""
    return [i for i in graph.get(WIRE_TYPES, []) if i.target.split(".")[0] in PACKAGES]


# ---- the project ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return import_graph(ROOT, PACKAGES)


def test_no_import_cycles(graph: dict[str, list[Import]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(describe(c, ROOT) for c in found)


def test_libraries_import_neither_the_service_nor_the_sdk(graph: dict[str, list[Import]]) -> None:
    bad = library_violations(graph)
    assert not bad, "media/ and vad/ must stay plain libraries:\n" + describe(bad, ROOT)


def test_wire_types_import_nothing_of_ours(graph: dict[str, list[Import]]) -> None:
    assert WIRE_TYPES in graph
    bad = wire_type_violations(graph)
    assert not bad, "duplex/protocol.py must import nothing of ours:\n" + describe(bad, ROOT)


def test_modes_and_session_do_not_import_each_other(graph: dict[str, list[Import]]) -> None:
    """The session builds its mode through the factory the app chose (SessionServices.modes)."""
    session_side = {"server.session", "server.turn_runner", "server.media_inputs"}
    modes = {m for m in graph if m.startswith("server.modes.")}
    concrete = modes - {"server.modes.base"}
    into_session = [
        i for m in modes | session_side for i in graph[m] if i.target == "server.session"
    ]
    into_modes = [i for i in graph["server.session"] if i.target in concrete]
    assert not into_session and not into_modes, describe(into_session + into_modes, ROOT)


# ---- the checker itself, on made-up trees ----------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "files",
    [
        {  # function-level import back
            "server/__init__.py": "",
            "server/a.py": "from server.b import B\n",
            "server/b.py": "def f():\n    from server.a import A\n",
        },
        {  # type-only import back, through a package-relative import
            "server/__init__.py": "",
            "server/modes/__init__.py": "",
            "server/modes/m.py": "from ..s import S\n",
            "server/s.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from server.modes import m\n"
            ),
        },
        {  # three modules, one arrow as `import x.y`
            "duplex/__init__.py": "",
            "duplex/a.py": "import duplex.b\n",
            "duplex/b.py": "from . import c\n",
            "duplex/c.py": "from duplex.a import x\n",
        },
    ],
)
def test_checker_finds_cycles(tmp_path: Path, files: dict[str, str]) -> None:
    write_tree(tmp_path, files)
    found = cycles(import_graph(tmp_path, ("server", "duplex")))
    assert len(found) == 1
    cycle = found[0]
    assert cycle[0].source == cycle[-1].target  # a closed path
    assert all(a.target == b.source for a, b in itertools.pairwise(cycle))


def test_checker_accepts_a_layered_tree(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "server/__init__.py": "",
            "server/base.py": "import asyncio\n",
            "server/top.py": "from server import base\nfrom server.base import X\n",
            "duplex/__init__.py": "def __getattr__(n):\n    from duplex import sdk\n",
            "duplex/sdk.py": "from duplex.protocol import M\n",
            "duplex/protocol.py": "import json\n",
            "media/__init__.py": "",
            "media/audio.py": "import numpy\nfrom duplex.protocol import M\n",
        },
    )
    graph = import_graph(tmp_path, PACKAGES)
    assert cycles(graph) == []
    assert library_violations(graph) == []
    assert wire_type_violations(graph) == []


def test_checker_finds_library_and_wire_type_violations(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "server/__init__.py": "",
            "server/x.py": "",
            "duplex/__init__.py": "",
            "duplex/sdk.py": "",
            "duplex/protocol.py": "def f():\n    from server import x\n",
            "media/__init__.py": "",
            "media/a.py": "def f():\n    import server.x\n",
            "vad/__init__.py": "",
            "vad/b.py": "from duplex import Client\nimport asyncio\nfrom duplex.sdk import S\n",
        },
    )
    graph = import_graph(tmp_path, PACKAGES)
    assert sorted((i.source, i.target) for i in library_violations(graph)) == [
        ("media.a", "server.x"),
        ("vad.b", "asyncio"),
        ("vad.b", "duplex"),
        ("vad.b", "duplex.sdk"),
    ]
    assert [(i.source, i.target) for i in wire_type_violations(graph)] == [
        ("duplex.protocol", "server.x")
    ]
