"""Imports flow one way: config (a leaf) <- kernels <- memory <- nn <- model <- train; data and
eval beside. Every import statement of the package counts, including those inside functions."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "memjax"

# What each top-level part of memjax may import (itself included).
ALLOWED = {
    "config": {"config"},
    "kernels": {"config", "kernels"},
    "memory": {"config", "kernels", "memory"},
    "nn": {"config", "kernels", "memory", "nn"},
    "model": {"config", "kernels", "memory", "nn", "model"},
    "data": {"config", "data"},
    "eval": {"config", "data", "eval"},
    "train": {"config", "kernels", "memory", "nn", "model", "data", "eval", "train"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = ("memjax",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The longest memjax module that ``name`` refers to (``from pkg import submodule`` included)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):  # every import, at any depth
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # a submodule (``from pkg import mod``) or else a name that the package itself defines
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(_resolve(n) for n in names if n == "memjax" or n.startswith("memjax."))
    out.discard(module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root, which may import anything


def test_every_part_is_known():
    unknown = {_part(m) for m in MODULES} - set(ALLOWED) - {None, "__main__"}
    assert not unknown, f"new top-level parts need a place in ALLOWED: {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m)))
def test_no_upward_import(module):
    part = _part(module)
    bad = sorted(t for t in GRAPH[module] if _part(t) is not None and _part(t) not in ALLOWED[part])
    bad += sorted(t for t in GRAPH[module] if t == "memjax")
    assert not bad, f"{module} ({part}) imports {bad}; {part} may import only {sorted(ALLOWED[part])}"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    src = "def f():\n    from memjax.train.loop import build\n"
    tree = ast.parse(src)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and _resolve("memjax.train.loop.build") == "memjax.train.loop"
    assert "memjax.nn.registry" in GRAPH["memjax.model.lm"] and "memjax.config" in GRAPH["memjax.model.lm"]
