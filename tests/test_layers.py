"""The package's layering, read from the source with `ast`: every module imports only from its
own layer or the layers below, no module-level import circle, no mixprec import inside a
function (the usual way to dodge a circle), and `import mixprec` loads no optional library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS: tuple[str, ...] = (
    "core",
    "parallel",
    "engine",
    "learner",
    "inspect",
    "integrations",
    "cli",
)
FACADE = "facade"  # mixprec/__init__.py, __main__.py and the contract path mixprec.callbacks


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted((SRC / "mixprec").rglob("*.py"))}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return FACADE


def rank(layer: str) -> int:
    return len(LAYERS) if layer == FACADE else LAYERS.index(layer)


def resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The mixprec modules `node` imports (a name that is a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mixprec"]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "mixprec":
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def imports_of(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at module level, incl. under `if TYPE_CHECKING`; (line, module) of
    mixprec imports inside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in resolve(module, is_package, child):
                    if in_function:
                        nested.append((child.lineno, target))
                    else:
                        top.add(target)
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, inside)

    visit(tree, False)
    return top, nested


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_subpackage_is_a_known_layer():
    subpackages = {p.name for p in (SRC / "mixprec").iterdir() if (p / "__init__.py").exists()}
    assert subpackages - {"callbacks"} == set(LAYERS) - ({"integrations"} - subpackages)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_its_layer_or_below(module):
    layer = layer_of(module)
    upward = [
        f"{module} ({layer}) imports {target} ({layer_of(target)})"
        for target in sorted(GRAPH[module][0])
        if target != "mixprec" or layer != FACADE
        if rank(layer_of(target)) > rank(layer) or (target == "mixprec" and module != "mixprec")
    ]
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_mixprec_import_inside_a_function(module):
    nested = GRAPH[module][1]
    assert not nested, f"{module} imports mixprec modules inside functions: {nested}"


def test_no_import_circle():
    edges = {m: {t for t in GRAPH[m][0] if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ importing its own submodules is how re-exports work, not a circle
    # in the code: drop the edges from a package to what lies inside it.
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checks_see_real_imports():
    """The reader finds what a module imports (so the tests above cannot pass vacuously)."""
    top, _ = GRAPH["mixprec.engine.optimizer"]
    assert {"mixprec.core.scaler", "mixprec.core.master", "mixprec.engine.forensics"} <= top
    assert layer_of("mixprec.engine.optimizer") == "engine"
    assert layer_of("mixprec.callbacks.fp16") == FACADE


def test_import_mixprec_loads_no_optional_dependency():
    code = (
        "import sys, mixprec, mixprec.callbacks.fp16; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
        "'accelerate', 'peft', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
