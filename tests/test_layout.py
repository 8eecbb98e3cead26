"""The package's layers and what each may import (README "Architecture"), and the old module names.

core (``dlrt_jax/_*.py``)  <-  framework adapters (``nnx``, ``linen``)  <-  application
(``dlrt_jax.mnist``). The core imports no framework and no application dependency; nothing outside
the application imports it (except the three alias modules that keep its old names).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dlrt_jax"
ALIASES = {"data.py", "models.py", "train_mnist.py"}
APP_ONLY = ("tqdm", "matplotlib", "pooch")


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
