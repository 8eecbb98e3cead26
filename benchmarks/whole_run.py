"""Whole-process wall time of the main job against its dense baseline, compiles included.

Runs ``python -m dlrt_jax.train_mnist`` (the default DLRT job) and ``--integrator dense`` back to
back as separate processes, each timed from outside (interpreter start to exit). Per round:
DLRT and dense with an empty compilation cache ("cold": every step compiles), then both again on
the cache the first pair filled ("warm": a second run of the same job). Ratios are taken within a
round, so that both sides of a ratio ran under the same machine load.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/whole_run.py --epochs 3 --rounds 1
    python benchmarks/whole_run.py --epochs 1 --subset 2048 --width 64     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def one_run(integrator: str, epochs: int, cache: Path, out: Path, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "dlrt_jax.train_mnist", "--epochs", str(epochs)]
    argv += ["--integrator", integrator, "--no-progress", "--out", str(out)]
    argv += ["--compile-cache", str(cache), *extra]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    saved = json.loads(next(out.glob(f"mnist_{integrator}_*.json")).read_text())
    final = saved["final"]
    return {
        "integrator": integrator,
        "process_wall_s": wall,
        "job_wall_s": final["wall_time_s"],
        "train_s": final["train_time_s"],
        "compiled_steps": final.get("compiled_steps"),
        "test_acc": final["test_acc"],
        "ranks": final["ranks"],
        "eval_params": final["eval_params"],
        "step_median_ms": 1000 * saved["history"][-1]["step_time_median_s"],
        "epoch_s": [h["epoch_time_s"] for h in saved["history"][1:]],
        "resizes": [h.get("resizes", []) for h in saved["history"][1:]],
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-warm", action="store_true", help="cold runs only")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default=None, help="result file name: whole_run_<tag>.json")
    args, extra = p.parse_known_args(argv)  # the rest goes to train_mnist (e.g. --subset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(args.rounds):
            caches = {name: tmp / f"cache{k}_{name}" for name in ("parallel_bug", "dense")}
            phases = ["cold"] if args.no_warm else ["cold", "warm"]
            for phase in phases:
                for name in ("parallel_bug", "dense"):
                    out = tmp / f"out{k}_{phase}_{name}"
                    row = one_run(name, args.epochs, caches[name], out, extra)
                    row.update(round=k, cache=phase)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'round':>5} {'cache':>5} {'DLRT s':>8} {'dense s':>8} {'ratio':>6} {'compiles':>8}")
    for k in range(args.rounds):
        for phase in ("cold", "warm"):
            pair = [r for r in rows if r["round"] == k and r["cache"] == phase]
            if len(pair) == 2:
                d, b = pair
                print(
                    f"{k:>5} {phase:>5} {d['process_wall_s']:>8.1f} {b['process_wall_s']:>8.1f} "
                    f"{d['process_wall_s'] / b['process_wall_s']:>6.2f} {d['compiled_steps']:>8}"
                )
    if args.tag:
        path = Path(args.out) / f"whole_run_{args.tag}.json"
        path.write_text(json.dumps({"epochs": args.epochs, "extra": extra, "rows": rows}, indent=1))
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
