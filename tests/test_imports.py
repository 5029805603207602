"""How the project's modules import each other: the package never imports the benchmarks (which
are scripts of the checkout, not installed), and no import, at the top of a module or inside a
function, closes a cycle."""

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tinygpt": "tinygpt", "kernels": "tinygpt.kernels", "benchmarks": "benchmarks"}


def modules() -> dict[str, Path]:
    """Every module of the package, its kernels and the benchmarks, by its import name."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([name, *(p for p in parts if p != "__init__")])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    wanted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            wanted |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    found = set()
    for module in wanted:
        while module and module not in known:  # `from pkg import name`: name may be a module
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)
    return found


def test_the_package_never_imports_the_benchmarks():
    known = modules()
    for name, path in known.items():
        if name.startswith("tinygpt"):
            assert not {m for m in imports(name, path, known) if m.startswith("benchmarks")}, name


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
