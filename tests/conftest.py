import os

# jaxlib's CPU QR/SVD call OpenBLAS, whose threads fight XLA's on small machines (dlrt.md, sec. 5).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The tests' programs are small and compiled once or twice each: XLA's backend optimisations cost
# more time than they save there (test_cycle + test_step: 76 s -> 55 s). Same programs, same
# semantics; the benchmarks and users' runs keep the default level. Set before jax starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def run_notebook(name: str, monkeypatch, **env: str) -> str:
    """Execute ``notebooks/<name>`` with ``env`` set; the text of its code cells' outputs."""
    import pytest

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in {"MPLBACKEND": "Agg", **env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def pytest_configure(config):
    """One persistent compilation cache for the whole run, in a fresh directory: tests build the
    same jitted steps at the same small shapes again and again (each a new Python function, so
    JAX's in-memory cache does not see them), and XLA's compile dominates most tests on CPU. Both
    xdist workers share the directory. Results cannot depend on it (a hit returns the executable
    that compiling the same program would)."""
    import tempfile

    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if "DLRT_TEST_COMPILE_CACHE" not in os.environ:  # the controller (or a run without xdist)
        os.environ["DLRT_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="dlrt-jit-")
        config._dlrt_compile_cache = os.environ["DLRT_TEST_COMPILE_CACHE"]
    jax.config.update("jax_compilation_cache_dir", os.environ["DLRT_TEST_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()


def pytest_unconfigure(config):
    """The process that made the cache directory removes it."""
    import shutil

    path = getattr(config, "_dlrt_compile_cache", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("DLRT_TEST_COMPILE_CACHE", None)
