"""Orthonormality of the bases over 10,000 float32 steps of every integrator.

All ``c`` columns of ``U`` and ``V`` (active ones and the inactive completion) must stay
orthonormal: the integrators rely on it and roundoff must not accumulate over a long run. On a
small regression problem (``Y = X W*^T + noise``, ``W*`` of rank 6, ``W`` 40 x 30 at capacity 10,
starting at rank 4) this runs ``--steps`` SGD steps of each integrator in float32 inside one
``lax.scan`` and records, after every step, ``||U^T U - I||_F`` and ``||V^T V - I||_F``; it
reports their maximum over the run (target < 1e-4), the final loss (beside the loss of the dense
least-squares fit, a lower bound for every rank) and the final rank.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/orthonormality.py            # 10,000 steps each
    python benchmarks/orthonormality.py --steps 500 --no-save            # quick check
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
N, M, CAP, R0, TARGET_RANK, SAMPLES = 40, 30, 10, 4, 6, 200


def integrators(lr: float) -> dict:
    return {
        "bug_fixed": dlrt_jax.bug(lr),
        "bug_adaptive": dlrt_jax.bug(lr, tau=0.02, min_rank=1),
        "parallel_fixed": dlrt_jax.parallel_bug(lr),
        "parallel_adaptive": dlrt_jax.parallel_bug(lr, tau=0.02, min_rank=1),
        "ksl": dlrt_jax.projector_splitting(lr),
        "bug_adaptive_adam": dlrt_jax.bug(optax.adam(1e-2), tau=0.02, min_rank=1),
        "parallel_adaptive_adam": dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.02, min_rank=1),
    }


def problem(seed: int):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((N, TARGET_RANK)))[0]
    V = np.linalg.qr(rng.standard_normal((M, TARGET_RANK)))[0]
    W_true = U @ np.diag(np.linspace(3.0, 0.5, TARGET_RANK)) @ V.T
    X = rng.standard_normal((SAMPLES, M))
    Y = X @ W_true.T + 0.01 * rng.standard_normal((SAMPLES, N))
    lr = 0.5 / np.linalg.norm(X, 2) ** 2
    return X, Y, lr


def orth_errors(w: dlrt_jax.LowRank) -> tuple[jax.Array, jax.Array]:
    eye = jnp.eye(w.capacity, dtype=w.dtype)
    hi = jax.lax.Precision.HIGHEST
    eu = jnp.linalg.norm(jnp.matmul(w.U.T, w.U, precision=hi) - eye)
    ev = jnp.linalg.norm(jnp.matmul(w.V.T, w.V, precision=hi) - eye)
    return eu, ev


def run(name: str, tx, X, Y, steps: int, seed: int) -> dict:
    Xj, Yj = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
    params = {"w": dlrt_jax.LowRank.random(jax.random.key(seed), (N, M), rank=R0, capacity=CAP)}

    def loss_fn(p):
        return 0.5 * jnp.sum((dlrt_jax.lowrank_apply(p["w"], Xj) - Yj) ** 2)

    step = dlrt_jax.make_train_step(loss_fn, tx, jit=False)  # jitted with the scan

    def body(carry, _):
        p, s, _ = step(*carry)
        eu, ev = orth_errors(p["w"])
        return (p, s), (eu, ev, p["w"].rank)

    @jax.jit
    def scan(p, s):
        return jax.lax.scan(body, (p, s), None, length=steps)

    t = time.perf_counter()
    (params, state), (eu, ev, ranks) = scan(params, tx.init(params))
    eu, ev = np.asarray(eu), np.asarray(ev)
    elapsed = time.perf_counter() - t
    return {
        "integrator": name,
        "steps": steps,
        "max_orth_err_U": float(eu.max()),
        "max_orth_err_V": float(ev.max()),
        "final_orth_err_U": float(eu[-1]),
        "final_orth_err_V": float(ev[-1]),
        "final_loss": float(loss_fn(params)),
        "final_rank": int(params["w"].rank),
        "rank_range": [int(np.min(ranks)), int(np.max(ranks))],
        "num_skipped": int(state.num_skipped),
        "seconds": elapsed,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1e-4, help="max ||U^T U - I||_F allowed")
    p.add_argument("--only", nargs="+", default=None, help="subset of integrators")
    p.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    X, Y, lr = problem(args.seed)
    # reference: the loss of the dense least-squares fit (a lower bound for every rank)
    W_ls = np.linalg.lstsq(X, Y, rcond=None)[0].T
    loss_ls = 0.5 * float(np.sum((X @ W_ls.T - Y) ** 2))
    txs = integrators(lr)
    names = args.only or list(txs)
    rows = []
    print(
        f"{N} x {M} weight, capacity {CAP}, {args.steps} float32 steps, lr {lr:.3g}; "
        f"dense least-squares loss {loss_ls:.4g}"
    )
    print(
        f"{'integrator':24} {'max|UtU-I|':>11} {'max|VtV-I|':>11} {'final loss':>11} "
        f"{'rank':>5} {'skipped':>7} {'s':>6}"
    )
    for name in names:
        r = run(name, txs[name], X, Y, args.steps, args.seed)
        rows.append(r)
        print(
            f"{name:24} {r['max_orth_err_U']:11.2e} {r['max_orth_err_V']:11.2e} "
            f"{r['final_loss']:11.4g} {r['final_rank']:5d} {r['num_skipped']:7d} "
            f"{r['seconds']:6.1f}",
            flush=True,
        )
    worst = max(max(r["max_orth_err_U"], r["max_orth_err_V"]) for r in rows)
    ok = worst < args.target and all(r["num_skipped"] == 0 for r in rows)
    print(f"worst {worst:.2e} (target < {args.target:g}): {'PASS' if ok else 'FAIL'}")
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "shape": [N, M],
            "capacity": CAP,
            "dtype": "float32",
            "lr": lr,
            "dense_lstsq_loss": loss_ls,
            "target": args.target,
            "worst": worst,
            "passed": ok,
            "jax": jax.__version__,
            "rows": rows,
        }
        path = out / "speed_orthonormality.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    if not ok:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
