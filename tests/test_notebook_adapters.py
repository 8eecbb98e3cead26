"""notebooks/adapters.ipynb runs end to end on a small subset (fine-tuning with DLRT adapters)."""

import re

import pytest
from conftest import run_notebook


def test_adapters_notebook_runs(monkeypatch):
    pytest.importorskip("safetensors")  # export_peft / import_peft
    out = run_notebook("adapters.ipynb", monkeypatch, DLRT_NOTEBOOK_STEPS="40")
    assert "adapted == pretrained at step 0: True" in out
    assert "merged == adapted: True" in out
    assert "PEFT round trip equal: True" in out
    assert "adapter_config.json" in out and "adapter_model.safetensors" in out
    fine, before = map(
        float, re.search(r"fine-tuned: docs ([\d.]+) .*pretrained ([\d.]+)", out).groups()
    )
    assert fine < before, out  # fine-tuning on the docs text lowers its validation loss
    ranks = [int(r) for r in re.findall(r"rank\s+(\d+)\s+#", out)]
    assert len(ranks) == 12 and all(1 <= r <= 8 for r in ranks), out  # 2 blocks x 6 adapters
