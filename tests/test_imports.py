"""How the project's modules import each other: the package never imports the benchmarks (which
are scripts of the checkout, not installed), no import, at the top of a module or inside a
function, closes a cycle, and the fused kernels load only when a run uses them."""

import ast
import graphlib
import subprocess
import sys
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


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter, where no test has imported anything yet."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_run_on_the_torch_backend_never_loads_the_fused_kernels():
    """Registering the Triton ops imports torch's compiler stack, seconds of every start: a CPU
    run's imports, backend choice, forward and backward must not load them."""
    loaded = fresh_python("""
import sys, torch
from tinygpt import cli, generate, ops, train
from tinygpt.config import ModelConfig
from tinygpt.model import build_model
model = build_model(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=8),
                    ops.resolve_backend("auto", "cpu"))
model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
print([m for m in ("tinygpt.kernels.flash_attention", "tinygpt.kernels.layernorm",
                   "torch._inductor") if m in sys.modules])
""")
    assert loaded == "[]"


def test_the_loggers_and_plotting_load_only_when_asked_for():
    """tensorboard, wandb and matplotlib take seconds to import: a run without --log, and the
    command line, must not load them."""
    loaded = fresh_python("""
import sys
from tinygpt import cli, loggers, metrics, plot, train
print([m for m in ("tensorboard", "wandb", "matplotlib", "torch.utils.tensorboard")
       if m in sys.modules])
""")
    assert loaded == "[]"


def test_the_fused_ops_load_on_first_use_whatever_was_imported_before():
    """`tinygpt.kernels.attention` is the op, also after its module was imported by name."""
    assert fresh_python("""
from tinygpt.kernels import flash_attention, layernorm
from tinygpt import kernels
print(kernels.attention is flash_attention.attention, kernels.layer_norm is layernorm.layer_norm,
      kernels.TRITON_IMPORT_ERROR)
""") == "True True None"


def test_without_triton_the_package_imports_and_the_ops_say_why():
    said = fresh_python("""
import sys
sys.modules["triton"] = None  # what `import triton` meets where Triton is not installed
from tinygpt import kernels, ops
print(kernels.TRITON_IMPORT_ERROR)
try:
    kernels.layer_norm(None, None, None, 1e-5)
except ImportError as e:
    print(e)
try:
    ops.resolve_backend("triton", "cpu")
except Exception as e:
    print(e)
""").splitlines()
    assert said[0] == "ModuleNotFoundError: import of triton halted; None in sys.modules"
    assert said[1] == f"the Triton kernels are unavailable ({said[0]})"
    assert said[2] == f"backend 'triton' is not usable here: {said[0]}"
