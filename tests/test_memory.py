"""Training a LowRank layer never forms W or its gradient.

A 32,768 x 32,768 float32 weight is 4 GiB (8 GiB with its gradient); its factors at rank 16 are
2 MiB each. The jitted training step of such a layer, with each kind of integrator, is checked
here directly: no value in the traced step (forward, gradient, integrator) has anywhere near
``n * n`` elements, XLA's compiled memory plan stays in MiB, and two real steps lower the loss.
(``benchmarks/memory_65k.py`` measures the peak resident memory of a whole process at 65,536.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax

N, RANK, BATCH = 32768, 16, 32


def _problem(tx):
    kw, kt, kx = jax.random.split(jax.random.key(0), 3)
    teacher = dlrt_jax.LowRank.random(kt, (N, N), rank=4, capacity=4)
    params = {"w": dlrt_jax.LowRank.random(kw, (N, N), rank=RANK, capacity=RANK, scale=0.1)}

    def loss_fn(p, x):
        err = dlrt_jax.lowrank_apply(p["w"], x) - dlrt_jax.lowrank_apply(teacher, x)
        return 0.5 * jnp.mean(jnp.sum(err**2, axis=-1)) / N

    x = jax.random.normal(kx, (BATCH, N), jnp.float32)
    return params, tx.init(params), x, dlrt_jax.make_train_step(loss_fn, tx)


def _jaxprs(value):
    """The jaxprs inside an equation parameter (``cond`` branches, ``custom_vjp`` bodies, ...)."""
    for v in value if isinstance(value, tuple | list) else (value,):
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(getattr(v, "jaxpr", None), "eqns"):
            yield v.jaxpr


def _largest_value(jaxpr) -> int:
    """The most elements of any value in a jaxpr, its sub-jaxprs included."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        sizes += [_largest_value(j) for p in eqn.params.values() for j in _jaxprs(p)]
    return max(sizes)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: dlrt_jax.bug(optax.sgd(20.0)),
        lambda: dlrt_jax.parallel_bug(optax.sgd(20.0), tau=0.05),
    ],
    ids=["bug", "parallel_bug"],
)
def test_large_lowrank_layer_step_never_forms_w(make_tx):
    params, state, x, step = _problem(make_tx())
    # every value of the traced step is at most batch x n or n x (2 * rank): never n x n
    jaxpr = jax.make_jaxpr(step)(params, state, x).jaxpr
    largest = _largest_value(jaxpr)
    assert 0 < largest <= max(BATCH, 2 * RANK) * N, largest
    assert largest < N * N // 512
    # XLA's memory plan for the compiled step: MiB, not the GiB of W (4 GiB) and its gradient
    mem = step.lower(params, state, x).compile().memory_analysis()
    if mem is not None:  # the CPU backend reports it; some backends do not
        total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        assert total < 64 * 2**20, total
    losses = []
    for _ in range(2):
        params, state, loss = step(params, state, x)
        losses.append(float(loss))
    assert losses[1] < losses[0]
    assert int(state.num_skipped) == 0
