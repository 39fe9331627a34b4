"""The package's import graph, read from the source (nothing is imported): no circles between its modules, and
no lower layer importing a higher one (training/ never imports nodes/ or bench/; nodes/ never imports bench/)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_lora_trainer"
LAYERS = {"training": {"nodes", "bench"}, "nodes": {"bench"}}  # layer -> layers it must not import


def package_modules() -> dict[str, str]:
    """Dotted module name (without the package) -> file, for every .py file of the package (tests excluded)."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        top = "" if rel == "." else rel.split(os.sep)[0]
        if top.startswith(".") or top in ("tests", "web", "example_workflows", "build") or top.endswith(".egg-info"):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for name in files:
            if name.endswith(".py"):
                parts = [] if rel == "." else rel.split(os.sep)
                if name != "__init__.py":
                    parts.append(name[:-3])
                modules[".".join(parts)] = os.path.join(folder, name)
    return modules


def imports_of(name: str, path: str, modules: dict) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (top level or inside functions), with the
    packages whose ``__init__`` such an import runs."""
    is_package = os.path.basename(path) == "__init__.py"
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found = set()

    def add(dotted: str):
        # "a.b.c" may name a module or a name inside a module; take the longest module prefix
        parts = dotted.split(".") if dotted else []
        while parts and ".".join(parts) not in modules:
            parts.pop()
        target = ".".join(parts)
        if target in modules and target != name:
            found.add(target)
        # importing a.b.c runs the packages a and a.b first (unless this module is inside them already)
        for i in range(1, len(parts)):
            package_name = ".".join(parts[:i])
            if package_name in modules and not (name + ".").startswith(package_name + "."):
                found.add(package_name)

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name[len(PACKAGE) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    continue
                prefix = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                prefix = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:  # "from . import x" imports module x when there is one
                add(f"{prefix}.{alias.name}" if prefix else alias.name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a readable path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # walk inside the component back to its first module
        members, start = set(component), component[0]
        path, seen, node = [start], {start}, start
        while True:
            nxt = sorted(w for w in graph[node] if w in members)
            back = [w for w in nxt if w == start]
            if back and len(path) > 1:
                break
            node = next((w for w in nxt if w not in seen), nxt[0])
            if node in seen:
                path = path[path.index(node):]
                break
            path.append(node)
            seen.add(node)
        cycles.append(path + [path[0]])
    return cycles


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "training.loop" in graph and "nodes.train" in graph and "bench.run" in graph
    assert "training.config" in graph["training.loop"]  # relative imports are resolved
    assert "training.formats" in graph["training.models.families"]  # the package whose __init__ an import runs
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for name, targets in import_graph().items():
        forbidden = LAYERS.get(name.split(".")[0], set())
        bad += [f"{name} -> {t}" for t in sorted(targets) if t.split(".")[0] in forbidden]
    assert not bad, "a lower layer imports a higher one: " + ", ".join(bad)
