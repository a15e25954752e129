"""The core never imports Ray or DeepSpeed (STYLE 1): it must run and test without them."""

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parents[1] / "loramix").rglob("*.py"))
FORBIDDEN = {"ray", "deepspeed"}


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_module_imports_no_ray_or_deepspeed(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    assert not found & FORBIDDEN, f"{path.name} imports {sorted(found & FORBIDDEN)}"


def test_core_modules_stay_small():
    long = {p.name: n for p in CORE if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules by concept: {long}"


# ------------------------------------------------------------------------ imports point down only
ROOT = Path(__file__).resolve().parents[1]
# core <- (actors, serve_app) <- pipelines <- benchmarks <- the CLI, which composes everything
# (it is the one module allowed to import the benchmarks, for `loramix bench`).
LAYERS = {"loramix": 0, "tune_spaces": 1, "actors": 1, "serve_app": 1, "pipelines": 2, "benchmarks": 3}
TOP = {"pipelines.cli": 4}
ALLOWED = {"serve_app": {"loramix", "serve_app"}}  # a Serve replica needs the core only


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str) -> set[str]:
    """The project modules ``name`` imports at run time, at any depth (function-level too); an
    ``if TYPE_CHECKING:`` block is for annotations only and does not count."""
    path, found = MODULES[name], set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def runtime_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def layer(name: str) -> int:
    return TOP.get(name, LAYERS[name.split(".")[0]])


def test_imports_point_down():
    upward = []
    for name in MODULES:
        pkg = name.split(".")[0]
        for dep in imports(name):
            dep_pkg = dep.split(".")[0]
            if dep_pkg != pkg and (layer(dep) >= layer(name) or dep_pkg not in ALLOWED.get(pkg, {dep_pkg})):
                upward.append(f"{name} -> {dep}")
    assert not upward, f"imports must point down (core <- actors/serve_app <- pipelines <- benchmarks): {upward}"


def test_no_import_cycles():
    graph = {name: imports(name) for name in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, f"import cycles: {cycles}"


def test_every_function_level_import_says_why():
    """An import inside a function is an exception (a cycle, a slow or optional dependency, an
    order that matters); the line says which, or the import belongs at the top of the module."""
    silent = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        said = lines[node.lineno - 1 : node.end_lineno]
                        if not any("#" in line for line in said):
                            silent.append(f"{name}:{node.lineno}")
    assert not silent, f"function-level imports without a reason: {silent}"
