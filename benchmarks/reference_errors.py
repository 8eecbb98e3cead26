"""Max relative error of each integrator against the float64 NumPy reference (tests/reference.py).

Runs the configurations of tests/test_integrators.py (matrix and regression problems, 1 and 50
steps, float32 with capacity 8 > rank) and prints the largest ||W_jax - W_ref||_F / ||W_ref||_F
and whether the ranks agreed, per integrator.

    OPENBLAS_NUM_THREADS=1 python benchmarks/reference_errors.py
"""

import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"


def _load(name: str):
    """Import tests/<name>.py (the reference lives with the tests, which are not a package)."""
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ref = _load("reference")
    t = _load("test_integrators")

    print(f"{'integrator':20s} {'max rel. error':>15s}  ranks equal  gradient evaluations/step")
    evals = {"bug": 2, "bug_adaptive": 2, "ksl": 3, "parallel_bug": 1, "parallel_bug_fixed": 1}
    for name in sorted(t.INTEGRATORS):
        worst, same = 0.0, True
        for kind in ("matrix", "regression"):
            for steps in (1, 50):
                rng = np.random.default_rng(0)
                _, grad_np, loss_j, h = t._problem(kind, rng)
                U, S, V = ref.random_lowrank(rng, t.N, t.M, t.R)
                ref_step, make_tx, _ = t.INTEGRATORS[name]
                W_ref, ranks_ref = t._run_ref(ref_step, U, S, V, grad_np, h, steps)
                x = t._to_jax(U, S, V, t.R, t.CAP, jnp.float32)
                x1, ranks, _ = t._run_jax(make_tx, x, loss_j, h, steps, use_jit=True)
                W = np.asarray(x1.to_dense(), np.float64)
                worst = max(worst, np.linalg.norm(W - W_ref) / np.linalg.norm(W_ref))
                same &= ranks == ranks_ref
        print(f"{name:20s} {worst:15.2e}  {str(same):11s}  {evals[name]}")


if __name__ == "__main__":
    main()
