import os

# jaxlib's CPU QR/SVD call OpenBLAS, whose threads fight XLA's on small machines (dlrt.md, sec. 5).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
