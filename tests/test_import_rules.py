"""The layout's dependency rules, read from every import statement (also lazy ones and those
under TYPE_CHECKING): config -> mesh -> model -> stages -> schedule -> loop, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "parallel", "launcher", "hydra_plugins")
ENTRY_POINTS = tuple(f"launcher.{m}" for m in ("train", "plan", "convert", "plot", "bench"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports (`from a.b import c` counts a.b, and a.b.c if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES} - {""}
    return found


def _all_imports() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _every_import_statement(pkg: str) -> list[tuple[Path, str]]:
    out = []
    for path in (REPO / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                out.append((path, node.module))
    return out


def test_models_import_nothing_distributed_or_above() -> None:
    bad = [
        (p.name, m)
        for p, m in _every_import_statement("models")
        if _under(m, ("torch.distributed", "parallel", "launcher", "data", "hydra"))
    ]
    assert not bad, bad


def test_parallel_never_imports_launcher() -> None:
    bad = [
        (str(p.relative_to(REPO)), m)
        for p, m in _every_import_statement("parallel")
        if _under(m, ("launcher", "hydra", "omegaconf"))
    ]
    assert not bad, bad


def test_data_imports_neither_parallel_nor_launcher() -> None:
    bad = [
        (p.name, m)
        for p, m in _every_import_statement("data")
        if _under(m, ("parallel", "launcher"))
    ]
    assert not bad, bad


def test_run_library_never_imports_entry_points() -> None:
    graph = _all_imports()
    bad = [
        (m, sorted(set(deps) & set(ENTRY_POINTS)))
        for m, deps in graph.items()
        if m.startswith("launcher.run") and set(deps) & set(ENTRY_POINTS)
    ]
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph = {
        m: {d for d in deps if d in _modules() and d != m and not m.startswith(d + ".")}
        for m, deps in _all_imports().items()
    }
    # a package's __init__ importing its own submodules is not a cycle with them
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# What each part of parallel/ may import of parallel/: the flat building blocks (mesh, TP, CP,
# DP, init, loss, ...) import none of the parts above them; pipeline/ only the blocks; the
# composition (parallelize.py) both; the cost model (plan/) and checkpoint I/O build on them.
# A new sub-package adds its row (the test refuses one it does not know).
PARALLEL_PARTS = {
    "parallel": set(),
    "parallel.pipeline": {"parallel"},
    "parallel.parallelize": {"parallel", "parallel.pipeline"},
    "parallel.plan": {"parallel", "parallel.pipeline"},
    "parallel.checkpoint": {"parallel", "parallel.parallelize"},
    "parallel.observe": {"parallel"},  # watches c10d from outside: imports no other part
}


def _part(module: str) -> str:
    """The part of parallel/ a module belongs to: its sub-package, parallelize, or the blocks."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (REPO / "parallel" / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return "parallel.parallelize" if module == "parallel.parallelize" else "parallel"


def test_no_import_runs_back_up_inside_parallel() -> None:
    bad = []
    for module, deps in _all_imports().items():
        if not _under(module, ("parallel",)):
            continue
        part = _part(module)
        assert part in PARALLEL_PARTS, f"{part}: give it a row in PARALLEL_PARTS"
        for dep in deps:
            if dep != "parallel" and _under(dep, ("parallel",)) and _part(dep) != part:
                if _part(dep) not in PARALLEL_PARTS[part]:
                    bad.append((module, dep))
    assert not bad, bad


def test_no_loop_between_top_level_packages() -> None:
    edges: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    for module, deps in _all_imports().items():
        edges[module.split(".")[0]] |= {d.split(".")[0] for d in deps} - {module.split(".")[0]}
    # the order data flows in: each package imports only those before it
    order = ("models", "data", "parallel", "hydra_plugins", "launcher")
    bad = [(a, b) for a, bs in edges.items() for b in bs if order.index(b) > order.index(a)]
    assert not bad, bad
