"""The import rules of docs/design.md, enforced: `protos <- cluster <- {router, workers} <- deploy` (router and
workers never import each other), the gateway (the serve process) never imports the router actor's engine, the
expert channel or the encoder actor, and no import cycle between modules. Every import counts, function-local ones
too; only `if TYPE_CHECKING:` blocks (never run) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "cluster", "router", "workers", "deploy")
ALLOWED = {  # package -> the first-party packages it may import
    "protos": {"protos"},
    "cluster": {"protos", "cluster"},
    "router": {"protos", "cluster", "router"},
    "workers": {"protos", "cluster", "workers"},
    "deploy": set(PACKAGES),
}
GATEWAY_MAY_NOT = ("router.engine", "router.experts", "router.encoder", "router.router_actor")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The first-party modules `path` imports (a `from pkg import name` of a submodule counts as that module)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "_pb2" not in p.name]
    modules = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports_of(p, modules) if m in modules} for p in files}


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        pkg = mod.split(".")[0]
        bad += [f"{mod} imports {d}" for d in sorted(deps) if d.split(".")[0] not in ALLOWED[pkg]]
        if mod.startswith("router.gateway"):
            bad += [f"{mod} (serve process) imports {d}" for d in sorted(deps) if d.startswith(GATEWAY_MAY_NOT)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle to break."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_go_one_way():
    assert forbidden(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    "module, source, problem",
    [
        ("cluster/probe.py", "from router.engine.engine import Engine\n", "cluster.probe imports router.engine.engine"),
        ("workers/probe.py", "import router.request.messages\n", "workers.probe imports router.request.messages"),
        ("router/gateway/probe.py", "def f():\n    from router.engine import sampler\n", "(serve process)"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, module, source, problem):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "router" / "engine").mkdir()
    (tmp_path / "router" / "gateway").mkdir()
    for name in ("router/engine/engine.py", "router/engine/sampler.py", "router/request/messages.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "router" / "engine" / "__init__.py").write_text("")
    (tmp_path / module).write_text(source)
    graph = {module_name_in(tmp_path, p): deps for p, deps in _graph_files(tmp_path)}
    assert any(problem in line for line in forbidden(graph))


def test_a_cycle_is_caught():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def module_name_in(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph_files(root: Path):
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    modules = {module_name_in(root, p) for p in files}
    return [(p, {m for m in imports_of(p, modules) if m in modules}) for p in files]
