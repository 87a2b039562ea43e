"""The daemon's module graph: dependencies run one way (pure <- storage <- engine <- HTTP <-
process), no cycles, small modules that say their job on their first line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROXY = REPO / "proxy" / "nwbcache_proxy"
CLIENT = REPO / "client" / "nwbcache"

# Lower layers never import higher ones. Within a layer, any order without cycles.
LAYERS: dict[str, set[str]] = {
    "pure": {
        "__init__",
        "adminauth",
        "blockfile",
        "breaker",
        "buffers",
        "checkreport",
        "conditional",
        "credentials",
        "errors",
        "freshness",
        "httphead",
        "httprange",
        "layout",
        "lru",
        "marks",
        "mapfile",
        "objectmeta",
        "policy",
        "batching",
        "readahead",
        "rangereader",
        "readfor",
        "recent",
        "retry",
        "s3api",
        "footprint",
        "sizes",
        "usage",
        "validate",
        "version",
    },
    "settings": {"config", "cpus", "flags", "logs"},
    "storage": {
        "accounting",
        "aio",
        "aiowrite",
        "batchsql",
        "blockio",
        "catalog",
        "claims",
        "index",
        "inflight",
        "jobs",
        "migrate",
        "openversions",
        "pins",
        "reconcile",
        "schema",
        "sparse",
        "spanlocks",
        "staging",
        "store",
        "trace",
        "unlinker",
        "versionfile",
        "wholeversions",
    },
    "engine": {
        "access",
        "admin",
        "blocks",
        "cache",
        "dandi_resolver",
        "exchange",
        "fetcher",
        "filling",
        "metafiles",
        "metrics",
        "parents",
        "reader",
        "s3listing",
        "session",
        "status",
        "upkeep",
        "upstream",
        "versions",
        "warmfile",
        "warming",
        "wire",
        "wireconn",
        "warmworkers",
    },
    "http": {"adminserver", "appkeys", "observe", "s3server", "sending", "server", "targets"},
    "process": {"__main__", "app", "check", "runner"},
}
ORDER = list(LAYERS)
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
# What a pure module may not import: they do no I/O and know no web framework.
IMPURE = {"aiohttp", "asyncio", "aiofiles", "sqlite3", "socket", "threading", "concurrent"}
MAX_LINES = 400


def _imports(path: Path, package: str) -> tuple[set[str], set[str]]:
    """(sibling modules, other top-level packages) that a module imports."""
    siblings: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    siblings.add(node.module.split(".")[0])
                else:
                    siblings.update(a.name for a in node.names if a.name != "__version__")
            elif node.module and node.module.split(".")[0] == package:
                siblings.add(node.module.split(".")[1])
            elif node.module:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            others.update(a.name.split(".")[0] for a in node.names)
    return siblings, others


def _graph(folder: Path) -> dict[str, set[str]]:
    return {f.stem: _imports(f, folder.name)[0] for f in sorted(folder.glob("*.py"))}


def test_every_daemon_module_has_a_layer() -> None:
    assert set(_graph(PROXY)) == set(LAYER_OF), "add new modules to LAYERS"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_dependencies_run_one_way(module: str) -> None:
    deps = _graph(PROXY)[module]
    mine = ORDER.index(LAYER_OF[module])
    upward = {d: LAYER_OF[d] for d in deps if ORDER.index(LAYER_OF[d]) > mine}
    assert not upward, f"{module} ({LAYER_OF[module]}) imports higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(LAYERS["pure"]))
def test_pure_modules_do_no_io(module: str) -> None:
    _, others = _imports(PROXY / f"{module}.py", PROXY.name)
    assert not others & IMPURE


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, set())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("folder", [PROXY, CLIENT], ids=["daemon", "client"])
def test_no_import_cycles(folder: Path) -> None:
    assert _cycle(_graph(folder)) is None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PROXY.glob("*.py")), ids=lambda p: p.name)
def test_daemon_modules_are_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize(
    "path", sorted([*PROXY.glob("*.py"), *CLIENT.glob("*.py")]), ids=lambda p: p.name
)
def test_every_module_says_its_job(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} has no docstring"
    assert len(doc.splitlines()[0]) >= 20
