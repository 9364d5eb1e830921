"""The architecture, written down once and checked: each package of llamad has a rank, and no
module imports from a higher rank (imports under `if TYPE_CHECKING:` and inside functions
count too). docs/design.md's package map says the same in words."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llamad"

# Lowest first. The foundation is the root's plain modules; app and __main__ sit on top.
RANKS = {
    "foundation": 0,  # config, errors, log, redact, safetext, sizes, background, statefile
    "systemd": 1,
    "catalog": 2,
    "memory": 3,
    "supervisor": 4,
    "http": 5,
    "observe": 6,
    "api": 7,
    "cli": 8,
    "app": 9,
    "__main__": 10,
}
FOUNDATION = {"__init__", "config", "errors", "log", "redact", "safetext", "sizes", "background",
              "statefile"}


def layer(module: str) -> str:
    """`llamad.http.keys` -> 'http'; `llamad.config` -> 'foundation'."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in FOUNDATION:
        return "foundation"
    return parts[0]


def module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every llamad module the file imports, wherever the import stands."""
    here = module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            # `from llamad.http import keys` imports the module llamad.http.keys
            found += [(node.lineno, _submodule(base, a.name)) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "llamad"]


def _submodule(base: str, name: str) -> str:
    where = PACKAGE.parent.joinpath(*base.split("."), name)
    return f"{base}.{name}" if where.is_dir() or where.with_suffix(".py").is_file() else base


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_rank() -> None:
    for path in modules():
        assert layer(module_of(path)) in RANKS, f"{path}: add its package to RANKS"


def test_nothing_imports_upward() -> None:
    upward = []
    for path in modules():
        mine = layer(module_of(path))
        for line, name in imports(path):
            theirs = layer(name)
            if RANKS[theirs] > RANKS[mine]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} imports "
                              f"{name} ({theirs})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The test above could pass by reading nothing: show it reads what it must.
    path = PACKAGE / "systemd" / "units.py"
    assert ("llamad.systemd.bus" in {name for _, name in imports(path)})
    assert RANKS[layer("llamad.api.proxy")] > RANKS[layer("llamad.systemd.bus")]


def test_no_import_cycle() -> None:
    """No module reaches itself through imports (TYPE_CHECKING ones included): a cycle is
    two concerns that cannot be read, tested or changed apart."""
    graph = {module_of(p): {name for _, name in imports(p)} for p in modules()}
    for module, targets in graph.items():  # `from llamad.x import y`: y's module, or x
        graph[module] = {t for t in targets if t in graph and t != module}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_modules_stay_small() -> None:
    """One module per concern, each small enough to read in one sitting."""
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in modules()
           if (n := len(p.read_text().splitlines())) > 500]
    assert not big, "split these by concern: " + ", ".join(big)
