"""Cost of the cycle's kinds of step against the paper's step and a forward + backward pass.

The main job's MLP (784-500x4-10, batch 256) at capacity 64 in every factor; medians over 27 steps
after compilation, all in one process:

    OPENBLAS_NUM_THREADS=1 python benchmarks/cycle_cost.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402

K = 10


def median_ms(fn, *args, n=30):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[3:])


def main() -> None:
    key = jax.random.key(0)
    params = models.init_mlp(key, 500, max_rank=32, scale=0.1)
    params = dlrt_jax.resize_capacity(params, None, 64)[0]
    batch = (jax.random.normal(key, (256, 784)), jnp.zeros(256, jnp.int32))
    loss = models.cross_entropy_loss(models.mlp_apply)
    inner, other = optax.adam(3e-3), optax.adam(1e-3)
    res = {"forward + backward": median_ms(jax.jit(jax.value_and_grad(loss)), params, batch)}
    for name, tx in [
        ("paper's step (k = 1)", dlrt_jax.parallel_bug(inner, tau=0.09, other_optimizer=other)),
        ("s_only", dlrt_jax.s_only(inner, other_optimizer=other)),
    ]:
        res[name] = median_ms(dlrt_jax.make_train_step(loss, tx), params, tx.init(params), batch)
    tx = dlrt_jax.parallel_bug(inner, tau=0.09, augment_every=K, other_optimizer=other)
    step, state = dlrt_jax.make_train_step(loss, tx), tx.init(params)
    for name, count in [("augment", 0), ("coefficient", 1), ("coefficient + truncate", K - 1)]:
        s = state._replace(count=jnp.asarray(count, jnp.int32))
        res[f"cycle: {name}"] = median_ms(step, params, s, batch)
    mean = (res["cycle: augment"] + (K - 2) * res["cycle: coefficient"]) / K
    res[f"cycle: mean over k = {K}"] = mean + res["cycle: coefficient + truncate"] / K
    base = res["forward + backward"]
    for name, ms in res.items():
        print(f"{name:28s} {ms:7.2f} ms  {ms / base:5.2f}x forward + backward")


if __name__ == "__main__":
    main()
