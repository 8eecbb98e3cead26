"""notebooks/quickstart.ipynb executes end to end (on a small subset, so it cannot rot)."""

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.skipif(not os.environ.get("DLRT_DATA_DIR"), reason="needs MNIST via DLRT_DATA_DIR")
def test_quickstart_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DLRT_NOTEBOOK_SUBSET", "4096")
    monkeypatch.setenv("DLRT_NOTEBOOK_EPOCHS", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "epoch 1:" in outputs and "compression" in outputs
    acc = float(outputs.split("epoch 1:")[1].split("test acc")[1].split()[0])
    assert acc > 0.6, outputs  # chance is 0.1
