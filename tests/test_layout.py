"""The package's layout is its architecture (README, *Architecture*): these rules keep it so as code is added."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_stthree

PACKAGE = Path(lightning_stthree.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
MAX_LINES = 450  # one concept per module, a few hundred lines


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is imported (module level; not inside functions or under
    ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "use absolute imports"
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_stthree"):
            found.add(node.module)
            for alias in node.names:  # `from lightning_stthree.core import checks` imports the module `checks`
                candidate = f"{node.module}.{alias.name}"
                stem = PACKAGE.parent / candidate.replace(".", "/")
                if stem.with_suffix(".py").exists() or (stem / "__init__.py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_stthree")}
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_450_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_module_imports_have_no_cycle() -> None:
    graph = {_module_name(p): _package_imports(p) for p in MODULES}
    # Importing `a.b.c` from outside `a.b` runs `a/b/__init__` first: an edge too (from inside, it is already
    # being imported).
    for name in list(graph):
        for imported in list(graph[name]):
            parts = imported.split(".")
            parents = {".".join(parts[:i]) for i in range(2, len(parts))}
            graph[name] |= {p for p in parents if p != name and not name.startswith(p + ".")}
    graph = {name: {m for m in imports if m in graph and m != name} for name, imports in graph.items()}
    # The top-level package only re-exports (its submodules never need it): leave it out, as Python resolves it.
    graph.pop("lightning_stthree")
    for imports in graph.values():
        imports.discard("lightning_stthree")
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(name) :], name])}"
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_functional_core_and_the_methods_maths_import_no_lightning() -> None:
    # In a fresh interpreter: these modules must be usable with torch alone.
    modules = [
        "lightning_stthree.core.schedule",
        "lightning_stthree.core.threshold",
        "lightning_stthree.core.tracking",
        "lightning_stthree.core.flops",
        "lightning_stthree.methods.st3",
        "lightning_stthree.methods.str",
        "lightning_stthree.methods.measure",
    ]
    # The package's __init__ imports the callbacks; block it to see what the modules alone need.
    code = (
        "import sys, types, importlib.util\n"
        "spec = importlib.util.find_spec('lightning_stthree')\n"
        "package = types.ModuleType('lightning_stthree'); package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['lightning_stthree'] = package\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "lightning = ('lightning', 'pytorch_lightning', 'lightning_fabric')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in lightning))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_public_surface_is_small_and_everything_in_it_exists() -> None:
    assert len(lightning_stthree.__all__) <= 25
    assert all(hasattr(lightning_stthree, name) for name in lightning_stthree.__all__)
    assert not [name for name in lightning_stthree.__all__ if name.startswith("_")]


# The layers of README's *Architecture*, in order: a module imports only from its own layer or the ones before it.
LAYERS = [
    ("lightning_stthree.core",),
    ("lightning_stthree.methods",),
    ("lightning_stthree.report", "lightning_stthree.plots"),
    ("lightning_stthree.inference",),
    ("lightning_stthree.callbacks",),
    ("lightning_stthree.recipes", "lightning_stthree.__main__"),
]


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_to_the_same_layer_or_below(path: Path) -> None:
    own = _layer(_module_name(path))
    if own is None:
        return  # the top-level package and its alias machinery sit above every layer
    # The top-level package imports every layer: importing it from inside one is importing upward.
    upward = [m for m in _package_imports(path) if m == "lightning_stthree" or (_layer(m) or 0) > own]
    assert upward == []
