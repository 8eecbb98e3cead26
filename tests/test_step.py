"""Tests of ``dlrt_jax.make_train_step``: one step for every transform, ``grad_fn`` passed."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import dlrt_jax


def _problem():
    target = dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2).to_dense()
    params = {
        "w": dlrt_jax.LowRank.random(jax.random.key(1), (8, 6), rank=3),
        "b": jnp.zeros(8),
    }
    x = jax.random.normal(jax.random.key(2), (32, 6))
    y = x @ target.T

    def loss_fn(p, x, y):
        return jnp.mean((dlrt_jax.lowrank_apply(p["w"], x) + p["b"] - y) ** 2)

    return params, loss_fn, x, y


def _manual_step(loss_fn, tx, params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)  # noqa: E731
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, loss


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: dlrt_jax.bug(optax.adam(1e-2), tau=0.1),
        lambda: dlrt_jax.parallel_bug(optax.sgd(0.1), tau=0.1),
        _PS := lambda: dlrt_jax.projector_splitting(optax.sgd(0.1)),  # eagerly: jit=False
    ],
    ids=["bug", "parallel_bug", "projector_splitting"],
)
def test_step_matches_the_hand_written_update(make_tx):
    params, loss_fn, x, y = _problem()
    tx = make_tx()
    step = dlrt_jax.make_train_step(loss_fn, tx, jit=make_tx is not _PS)
    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for _ in range(3):
        p1, s1, l1 = step(p1, s1, x, y)
        p2, s2, l2 = _manual_step(loss_fn, tx, p2, s2, x, y)
        chex.assert_trees_all_close(l1, l2, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_plain_optax_optimiser_ignores_grad_fn():
    params, loss_fn, x, y = _problem()
    dense = {"w": params["w"].to_dense(), "b": params["b"]}
    dense_loss = lambda p, x, y: jnp.mean((x @ p["w"].T + p["b"] - y) ** 2)  # noqa: E731
    tx = optax.sgd(0.05)  # a plain GradientTransformation: update takes no grad_fn
    step = dlrt_jax.make_train_step(dense_loss, tx)
    new, _, loss = step(dense, tx.init(dense), x, y)
    grads = jax.grad(dense_loss)(dense, x, y)
    chex.assert_trees_all_close(
        new, jax.tree.map(lambda a, g: a - 0.05 * g, dense, grads), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(loss, dense_loss(dense, x, y), rtol=1e-6)


@pytest.mark.parametrize(
    ("make_tx", "grad_evals"),
    [
        (lambda: dlrt_jax.parallel_bug(optax.sgd(0.1), tau=0.1), 0),
        (lambda: dlrt_jax.bug(optax.sgd(0.1), tau=0.1), 1),
    ],
    ids=["parallel_bug", "bug"],
)
def test_grad_fn_is_traced_only_when_the_integrator_needs_it(make_tx, grad_evals):
    params, loss_fn, x, y = _problem()
    traces = []

    def counted(p, x, y):
        traces.append(1)
        return loss_fn(p, x, y)

    tx = make_tx()
    step = dlrt_jax.make_train_step(counted, tx)
    step(params, tx.init(params), x, y)
    # one trace for value_and_grad, one per extra evaluation (bug: the K/L step's new point)
    assert len(traces) == 1 + grad_evals


def test_jitted_step_compiles_once_across_rank_changes():
    params, loss_fn, x, y = _problem()
    tx = dlrt_jax.bug(optax.adam(5e-2), tau=0.2)
    traces = []

    def counted(p, x, y):
        traces.append(1)
        return loss_fn(p, x, y)

    step = dlrt_jax.make_train_step(counted, tx)
    state = tx.init(params)
    ranks = [int(params["w"].active_rank)]
    for _ in range(10):
        params, state, _ = step(params, state, x, y)
        ranks.append(int(params["w"].active_rank))
    assert len(set(ranks)) > 1  # the rank moved within the capacity ...
    assert len(traces) == 2  # ... and the step was traced once (value_and_grad + grad_fn)


def test_has_aux_returns_the_first_evaluations_aux():
    params, loss_fn, x, y = _problem()
    tx = dlrt_jax.bug(optax.sgd(0.1), tau=0.1)  # grad_fn is evaluated: it must drop the aux
    with_aux = lambda p, x, y: (loss_fn(p, x, y), {"b_sum": jnp.sum(p["b"]) + 1.0})  # noqa: E731
    step = dlrt_jax.make_train_step(with_aux, tx, has_aux=True)
    new, _, (loss, aux) = step(params, tx.init(params), x, y)
    ref, _, ref_loss = dlrt_jax.make_train_step(loss_fn, tx)(params, tx.init(params), x, y)
    chex.assert_trees_all_close(new, ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((loss, aux["b_sum"]), (ref_loss, 1.0), rtol=1e-6)


def test_step_with_donated_params_and_state():
    # jit(donate_argnums=(0, 1)) fails if two leaves of the state share one buffer
    params, loss_fn, x, y = _problem()
    tx = dlrt_jax.parallel_bug(optax.sgd(0.1), tau=0.1)
    step = jax.jit(dlrt_jax.make_train_step(loss_fn, tx, jit=False), donate_argnums=(0, 1))
    state = tx.init(params)
    for _ in range(2):
        params, state, _ = step(params, state, x, y)
    assert int(state.count) == 2


def test_invalid_arguments_are_rejected():
    params, loss_fn, *_ = _problem()
    with pytest.raises(TypeError, match="loss_fn"):
        dlrt_jax.make_train_step(None, optax.sgd(0.1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        dlrt_jax.make_train_step(loss_fn, lambda g: g)
    with pytest.raises(TypeError, match="jit"):
        dlrt_jax.make_train_step(loss_fn, optax.sgd(0.1), jit=1)
    with pytest.raises(TypeError, match="has_aux"):
        dlrt_jax.make_train_step(loss_fn, optax.sgd(0.1), has_aux=None)
