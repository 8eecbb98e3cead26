"""Rank from data: a linear teacher ``y = W* x + noise``, ``W*`` 256 x 512 of rank 16 (flat).

One low-rank layer is trained from start ranks 4, 16, 64 and 128 (capacity 128, the most the
rank-adaptive integrators allow for 256 x 512) by ``parallel_bug`` with the paper's per-step
truncation (``k = 1``) and with the augment-train-truncate cycle (``augment_every = k``), for
several inner optimisers; it prints the final ranks and the relative error of ``W``:

    OPENBLAS_NUM_THREADS=1 python benchmarks/teacher.py [--steps 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402

N, M, RANK, CAP = 256, 512, 16, 128


def teacher(key):
    ku, kv = jax.random.split(key)
    U = jnp.linalg.qr(jax.random.normal(ku, (N, RANK)))[0]
    V = jnp.linalg.qr(jax.random.normal(kv, (M, RANK)))[0]
    return U @ V.T  # flat spectrum: 16 singular values of 1


def run(make_tx, r0, W_true, steps, seed=0):
    params = {"w": dlrt_jax.LowRank.random(jax.random.key(seed + 1), (N, M), rank=r0, capacity=CAP)}
    params["w"] = params["w"].replace(S=0.1 * params["w"].S)

    def loss(p, x, y):
        return 0.5 * jnp.mean(jnp.sum((p["w"](x) - y) ** 2, axis=-1))

    tx = make_tx()
    step = dlrt_jax.make_train_step(loss, tx)
    state = tx.init(params)
    key = jax.random.key(seed + 2)
    for _ in range(steps):
        key, kx, kn = jax.random.split(key, 3)
        x = jax.random.normal(kx, (256, M))
        y = x @ W_true.T + 0.01 * jax.random.normal(kn, (256, N))
        params, state, _ = step(params, state, x, y)
    W = params["w"].to_dense()
    err = float(jnp.linalg.norm(W - W_true) / jnp.linalg.norm(W_true))
    return int(params["w"].rank), err


CONFIGS = {
    "k=1 adam 1e-2": lambda: dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.1),
    "k=10 adam 1e-2": lambda: dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.1, augment_every=10),
    "k=10 adam, zero": lambda: dlrt_jax.parallel_bug(
        optax.adam(1e-2), tau=0.1, augment_every=10, new_moments="zero"
    ),
    "k=10 adam, KLS": lambda: dlrt_jax.parallel_bug(
        optax.adam(1e-2), tau=0.1, augment_every=10, coefficient_steps="KLS"
    ),
    "k=1 sgd 0.5": lambda: dlrt_jax.parallel_bug(optax.sgd(0.5), tau=0.1),
    "k=10 sgd 0.5": lambda: dlrt_jax.parallel_bug(optax.sgd(0.5), tau=0.1, augment_every=10),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--starts", type=int, nargs="+", default=[4, 16, 64, 128])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    W_true = teacher(jax.random.key(0))
    rows = []
    for name, make in CONFIGS.items():
        out = [run(make, r0, W_true, args.steps) for r0 in args.starts]
        rows.append(
            {
                "config": name,
                "starts": args.starts,
                "ranks": [r for r, _ in out],
                "errors": [e for _, e in out],
            }
        )
        cells = ", ".join(f"{r0}->{r} ({e:.3f})" for r0, (r, e) in zip(args.starts, out))
        print(f"{name:16s} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
