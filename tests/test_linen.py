"""Flax Linen low-rank layers of dlrt_jax.linen against dense references written here."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank, is_lowrank
from dlrt_jax.linen import LowRankConv, LowRankDense


def _orth_err(B):
    B = np.asarray(B, np.float64)
    return np.max(np.abs(B.T @ B - np.eye(B.shape[1])))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(LowRankDense(16, rank=3, capacity=4, name="fc1")(x))
        return nn.Dense(3, name="head")(x)


def test_dense_params_and_output():
    layer = LowRankDense(6, rank=2, capacity=3, bias_init=nn.initializers.normal(0.5))
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    variables = layer.init(jax.random.key(0), x)
    w = variables["params"]["kernel"]
    assert is_lowrank(w) and w.shape == (6, 8) and w.capacity == 3 and int(w.rank) == 2
    assert _orth_err(w.U) < 1e-5 and _orth_err(w.V) < 1e-5
    b = np.asarray(variables["params"]["bias"])
    want = np.asarray(x) @ np.asarray(w.to_dense()).T + b
    np.testing.assert_allclose(layer.apply(variables, x), want, atol=2e-5)
    # the params tree is what the optax transforms see: one LowRank leaf, one array
    leaves = jax.tree.leaves(variables["params"], is_leaf=is_lowrank)
    assert sorted(type(leaf).__name__ for leaf in leaves) == ["ArrayImpl", "LowRank"]


@pytest.mark.parametrize(
    "kernel_size, strides, padding", [((3, 3), 2, "SAME"), ((5, 5), 1, ((1, 2), (0, 1)))]
)
def test_conv_equals_dense_conv(kernel_size, strides, padding):
    conv = LowRankConv(6, kernel_size, strides, padding, rank=3, capacity=6)
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    variables = conv.init(jax.random.key(0), x)
    w = variables["params"]["kernel"]
    dense = nn.Conv(6, kernel_size, strides, padding)
    kernel = w.to_dense().T.reshape(*kernel_size, 3, 6)
    want = dense.apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]}}, x)
    np.testing.assert_allclose(conv.apply(variables, x), want, atol=1e-4)


def test_grads_are_lowrank_cotangents_in_dlrt_slots():
    model = _MLP()
    x = jax.random.normal(jax.random.key(1), (5, 8))
    t = jax.random.normal(jax.random.key(2), (5, 3))
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x) - t) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    g = grads["fc1"]["kernel"]
    assert is_lowrank(g) and g.U.shape == (16, 4)
    w = params["fc1"]["kernel"]
    b = params["fc1"]["bias"]
    head = params["head"]

    def dense_loss(W):
        h = nn.relu(x @ W.T + b)
        return jnp.mean((h @ head["kernel"] + head["bias"] - t) ** 2)

    G = np.asarray(jax.jit(jax.grad(dense_loss))(w.to_dense()), np.float64)
    mask = np.arange(4) < 3
    U, V = np.asarray(w.U) * mask, np.asarray(w.V) * mask
    scale = np.max(np.abs(G))
    np.testing.assert_allclose(g.U, G @ V, atol=1e-4 * scale)
    np.testing.assert_allclose(g.S, U.T @ G @ V, atol=1e-4 * scale)
    np.testing.assert_allclose(g.V, G.T @ U, atol=1e-4 * scale)


def test_parallel_bug_steps_on_linen_params():
    model = _MLP()
    x = jax.random.normal(jax.random.key(1), (64, 8))
    t = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (8, 3)))
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x) - t) ** 2)

    tx = dlrt_jax.parallel_bug(optax.adam(3e-2), tau=0.1)
    state = tx.init(params)

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    p = params
    losses = [float(loss(p))]
    for _ in range(10):
        p, state = step(p, state)
        losses.append(float(loss(p)))
    assert losses[-1] < 0.8 * losses[0], losses
    w = p["fc1"]["kernel"]
    assert isinstance(w, LowRank) and w.capacity == 4 and 2 <= int(w.rank) <= 4
    assert _orth_err(w.U) < 1e-4 and _orth_err(w.V) < 1e-4
    assert int(state.count) == 10 and int(state.num_skipped) == 0


def test_bad_args_raise():
    x = jnp.ones((1, 5, 5, 3))
    with pytest.raises(ValueError, match="feature_group_count=1"):
        LowRankConv(6, (3, 3), feature_group_count=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`rank`"):
        LowRankDense(4, rank=5).init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="`padding`"):
        LowRankConv(6, (3, 3), padding="FULL").init(jax.random.key(0), x)
    layer = LowRankDense(4)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(flax.errors.ScopeParamShapeError):  # W is 4 x 8, the input has 6
        layer.apply(variables, jnp.ones((1, 6)))
    bad = {"params": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(4)}}
    with pytest.raises((TypeError, flax.errors.ScopeParamShapeError)):
        layer.apply(bad, jnp.ones((1, 8)))
