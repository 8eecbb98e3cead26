"""The package's layers and what each may import (``docs/architecture.md``), and old module names.

core (``dlrt_jax/_*.py``)  <-  framework adapters (``nnx`` with ``dlrt_jax/_nnx/``, ``transformer``,
``adapters``, ``linen``)  <-  application (``dlrt_jax.mnist``). The rules checked here:

* the core imports no framework and no application dependency;
* nothing outside the application imports it (except the three alias modules of its old names);
* no import cycle between the package's modules (imports inside functions count too);
* no private name (``_x``) of a module is used by another module, except the core's private
  helpers (the documented core-to-adapter seam: the core and the adapters share the core's
  validation and factor internals);
* ``linen`` never imports the NNX side (``nnx``, ``_nnx``, ``transformer``, ``adapters``).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dlrt_jax"
ALIASES = {"data.py", "models.py", "train_mnist.py"}
APP_ONLY = ("tqdm", "matplotlib", "pooch")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _package_edges(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (``from dlrt_jax.a import b`` names ``a.b`` if
    ``b`` is a module); the parent packages of a module below the top level are imported too."""
    out = set()
    for name in _imports(path):
        if not name.startswith("dlrt_jax."):
            continue
        parts = name.split(".")
        out.update(".".join(parts[:k]) for k in range(2, len(parts) + 1))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("dlrt_jax"):
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m in modules and m != _module_name(path)}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _package_edges(p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n] if n in stack else [m, n]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # the cycle that used to be here: nnx imported transformer, which wrote into nnx's table
    assert "dlrt_jax.nnx" not in graph["dlrt_jax.transformer"]


def _is_core(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[1].startswith("_") and parts[1] != "__init__"


def _private_uses(path: Path, modules: dict[str, Path]) -> set[str]:
    """``module._name`` for every private name of another package module that ``path`` uses."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> package module
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_"):
                    used.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            used.add(f"{aliases[node.value.id]}.{node.attr}")
    return used


def test_no_private_names_across_modules_except_the_core_seam():
    modules = _modules()
    bad = {}
    for name, path in modules.items():
        uses = {u for u in _private_uses(path, modules) if not _is_core(u.rsplit(".", 1)[0])}
        if uses:
            bad[name] = sorted(uses)
    assert not bad, f"private names used across modules (make them public): {bad}"


def test_linen_never_imports_the_nnx_side():
    modules = _modules()
    nnx_side = ("dlrt_jax.nnx", "dlrt_jax._nnx", "dlrt_jax.transformer", "dlrt_jax.adapters")
    bad = {m for m in _package_edges(modules["dlrt_jax.linen"], modules) if m.startswith(nnx_side)}
    assert not bad, f"dlrt_jax.linen imports {sorted(bad)}"
    assert not any(n.startswith("flax.nnx") or n == "flax.nnx" for n in _imports(PKG / "linen.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "dlrt_jax":
                names.update(f"dlrt_jax.{a.name}" for a in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _core_modules() -> list[Path]:
    return sorted(p for p in PKG.glob("_*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.name)
def test_core_imports_no_framework_or_application(path):
    bad = {
        n
        for n in _imports(path)
        if _top(n) in ("flax", *APP_ONLY)
        or n.startswith(("dlrt_jax.mnist", "dlrt_jax.nnx", "dlrt_jax.linen"))
    }
    assert not bad, f"{path.name} is core and must not import {sorted(bad)}"


def test_only_the_application_imports_the_application():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "mnist" or str(rel) in ALIASES:
            continue
        bad = {n for n in _imports(path) if n.startswith("dlrt_jax.mnist") or _top(n) in APP_ONLY}
        assert not bad, f"dlrt_jax/{rel} is library code and must not import {sorted(bad)}"


def test_importing_the_core_loads_no_framework_or_application_dependency():
    code = (
        "import sys, dlrt_jax; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'flax', 'tqdm', 'matplotlib', 'pooch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_old_module_names_are_aliases():
    import dlrt_jax
    import dlrt_jax.data
    import dlrt_jax.models
    import dlrt_jax.train_mnist
    from dlrt_jax.mnist import data, models, train

    assert dlrt_jax.data is data and dlrt_jax.models is models and dlrt_jax.train_mnist is train
    assert dlrt_jax.models.init_mlp is models.init_mlp


def test_python_m_train_mnist_still_runs():
    out = subprocess.run(
        [sys.executable, "-m", "dlrt_jax.train_mnist", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--epochs" in out.stdout and "default" in out.stdout
