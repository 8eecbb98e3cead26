"""The README's low-rank regression with Adam inside: final loss after 300 steps per integrator.

Rank-adaptive ``bug`` and ``parallel_bug`` (tau 0.05, start rank 6, capacity 10, target of rank
3), Adam at several learning rates, the paper's step (``k = 1``) and the cycle (``k = 10``), each
with its default ``new_moments`` and with the other one:

    OPENBLAS_NUM_THREADS=1 python benchmarks/adam_regression.py
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (256, 40))
W_TRUE = (
    jax.random.normal(jax.random.key(1), (30, 3)) @ jax.random.normal(jax.random.key(2), (3, 40))
) / 10
Y = X @ W_TRUE.T


def loss(params):
    return 0.5 * jnp.mean(jnp.sum((params["w"](X) + params["b"] - Y) ** 2, axis=-1))


def main() -> None:
    makes = {"bug": dlrt_jax.bug, "parallel_bug": dlrt_jax.parallel_bug}
    cases = [(1, "zero"), (1, "mean"), (10, "mean"), (10, "zero")]  # default first
    for (name, make), lr, (k, moments) in itertools.product(
        makes.items(), [1e-1, 3e-2, 1e-2], cases
    ):
        tx = make(optax.adam(lr), tau=0.05, augment_every=k, new_moments=moments)
        params = {"w": dlrt_jax.LowRank.random(KEY, (30, 40), rank=6, capacity=10)}
        params["b"] = jnp.zeros(30)
        step = dlrt_jax.make_train_step(lambda p: loss(p), tx)
        state = tx.init(params)
        for _ in range(300):
            params, state, _ = step(params, state)
        print(
            f"{name:13s} adam {lr:<5g} k {k:2d} {moments:4s}: loss {float(loss(params)):.2e}, rank "
            f"{int(params['w'].active_rank)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
