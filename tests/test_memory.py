"""Training a LowRank layer never forms W or its gradient (peak memory of a fresh process).

A 32,768 x 32,768 float32 weight is 4 GiB (8 GiB with its gradient); the factors at rank 16 are
4 MiB. ``benchmarks/memory_65k.py`` trains such a layer with two integrators in a subprocess and
exits non-zero if its peak resident memory passes the limit or the loss does not decrease.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_65k.py"


def test_large_lowrank_layer_trains_in_small_memory(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OUT=str(tmp_path))
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--n",
        "32768",
        "--rank",
        "16",
        "--batch",
        "32",
        "--steps",
        "2",
        "--integrators",
        "bug",
        "parallel_bug",
        "--limit-gib",
        "1.5",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "speed_memory_65k.json").read_text())
    assert record["passed"]
    assert record["dense_weight_gib"] == 4.0
    assert record["peak_rss_mib"] < 1.5 * 1024  # far below the 4 GiB of the dense weight
    for run in record["runs"]:
        assert run["losses"][-1] < run["losses"][0]
