"""notebooks/quickstart.ipynb executes end to end (on a small subset, so it cannot rot)."""

import os

import pytest
from conftest import run_notebook


@pytest.mark.skipif(not os.environ.get("DLRT_DATA_DIR"), reason="needs MNIST via DLRT_DATA_DIR")
def test_quickstart_notebook_runs(monkeypatch):
    outputs = run_notebook(
        "quickstart.ipynb", monkeypatch, DLRT_NOTEBOOK_SUBSET="4096", DLRT_NOTEBOOK_EPOCHS="2"
    )
    assert "epoch 1:" in outputs and "compression" in outputs
    acc = float(outputs.split("epoch 1:")[1].split("test acc")[1].split()[0])
    assert acc > 0.6, outputs  # chance is 0.1
