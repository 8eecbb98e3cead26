"""dlrt_jax.precision: bfloat16 layer application with float32 factors and basis arithmetic."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax.precision import PrecisionPolicy, cast_floating, mixed_apply, mixed_dense


def _orth_error(lr):
    U, V = np.asarray(lr.U, np.float64), np.asarray(lr.V, np.float64)
    c = U.shape[1]
    return max(np.abs(U.T @ U - np.eye(c)).max(), np.abs(V.T @ V - np.eye(c)).max())


def test_mixed_apply_values_dtypes_and_gradients():
    w = dlrt_jax.LowRank.random(jax.random.key(0), (12, 10), rank=3, capacity=5)
    x = jax.random.normal(jax.random.key(1), (7, 10))
    y32 = dlrt_jax.lowrank_apply(w, x)
    y16 = mixed_apply(w, x)
    assert y16.dtype == jnp.bfloat16
    assert mixed_apply(w, x, output_dtype=jnp.float32).dtype == jnp.float32
    rel = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert 1e-4 < rel < 2e-2  # really computed in bfloat16, and close

    def loss(w, f):
        return jnp.sum(jnp.sin(f(w, x).astype(jnp.float32)))

    g32 = jax.grad(loss)(w, dlrt_jax.lowrank_apply)
    g16 = jax.grad(loss)(w, mixed_apply)
    for a, b in zip((g16.U, g16.S, g16.V), (g32.U, g32.S, g32.V), strict=True):
        assert a.dtype == jnp.float32  # the integrator receives float32 gradients
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 3e-2
    # inactive columns get no gradient in either precision
    assert float(jnp.abs(g16.U[:, 3:]).max()) == 0.0 and float(jnp.abs(g16.S[3:, :]).max()) == 0.0


def test_training_in_bf16_keeps_float32_orthonormal_factors():
    policy = PrecisionPolicy(jnp.bfloat16)
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "l1": dlrt_jax.LowRank.random(k[0], (32, 24), capacity=8),
        "b1": jnp.zeros(32),
        "out": 0.2 * jax.random.normal(k[1], (4, 32)),
    }
    x = jax.random.normal(k[2], (64, 24))
    y = jax.random.randint(k[3], (64,), 0, 4)

    def loss(p):
        h = jax.nn.relu(policy.apply(p["l1"], policy.cast(x)) + policy.cast(p["b1"]))
        logits = policy.logits(policy.dense(h, p["out"]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        u, s = tx.update(grads, s, p, grad_fn=jax.grad(loss))
        return optax.apply_updates(p, u), s

    l0 = float(loss(params))
    for _ in range(40):
        params, state = step(params, state)
    lr = params["l1"]
    assert lr.U.dtype == lr.S.dtype == lr.V.dtype == jnp.float32
    assert params["b1"].dtype == jnp.float32
    assert _orth_error(lr) < 1e-4
    assert int(state.num_skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(params))
    assert float(loss(params)) < 0.7 * l0
    assert 2 <= int(lr.rank) < 8  # the rank adapted


def _mnist_subset():
    from dlrt_jax.mnist.data import DatasetNotFoundError, load_dataset, preprocess

    if not os.environ.get("DLRT_DATA_DIR"):
        pytest.skip("DLRT_DATA_DIR is not set (MNIST location; CI sets it)")
    try:
        ds = load_dataset("mnist", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"MNIST not found under DLRT_DATA_DIR: {e}")
    x = preprocess(ds.train_images[:10000], normalize=True)
    xt = preprocess(ds.test_images, normalize=True)
    return x, ds.train_labels[:10000].astype(np.int32), xt, ds.test_labels.astype(np.int32)


def test_mnist_bf16_matches_f32_accuracy():
    """784-64-64-10 MLP, both hidden layers LowRank (capacity 16), adaptive BUG + Adam 3e-3,
    300 steps of batch 128 on 10k training images; test accuracy on all 10k test images."""
    from dlrt_jax.mnist.data import batch_iterator

    x_train, y_train, x_test, y_test = _mnist_subset()

    def init(key):
        k = jax.random.split(key, 3)
        return {
            "l1": dlrt_jax.LowRank.random(k[0], (64, 784), capacity=16),
            "b1": jnp.zeros(64),
            "l2": dlrt_jax.LowRank.random(k[1], (64, 64), capacity=16),
            "b2": jnp.zeros(64),
            "out": jax.random.normal(k[2], (10, 64)) / 8.0,
            "bo": jnp.zeros(10),
        }

    def apply(p, x, pol):
        h = jax.nn.relu(pol.apply(p["l1"], pol.cast(x)) + pol.cast(p["b1"]))
        h = jax.nn.relu(pol.apply(p["l2"], h) + pol.cast(p["b2"]))
        return pol.logits(pol.dense(h, p["out"], p["bo"]))

    def run(dtype):
        pol = PrecisionPolicy(dtype)

        def loss(p, x, y):
            logits = apply(p, x, pol)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        tx = dlrt_jax.bug(optax.adam(3e-3), tau=0.1)
        p = init(jax.random.key(0))
        s = tx.init(p)

        @jax.jit
        def step(p, s, x, y):
            grad_fn = lambda q: jax.grad(loss)(q, x, y)
            u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
            return optax.apply_updates(p, u), s

        n, epoch = 0, 0
        while n < 300:
            for xb, yb in batch_iterator(x_train, y_train, 128, seed=0, epoch=epoch):
                p, s = step(p, s, xb, yb)
                n += 1
                if n == 300:
                    break
            epoch += 1
        pred = jnp.argmax(jax.jit(lambda p, x: apply(p, x, pol))(p, x_test), axis=-1)
        return 100.0 * float(jnp.mean(pred == y_test)), p, s

    acc32, p32, s32 = run(jnp.float32)
    acc16, p16, s16 = run(jnp.bfloat16)
    assert acc32 > 88.0, acc32  # the run learned something
    assert abs(acc16 - acc32) <= 0.3, (acc16, acc32)
    for p, s in ((p32, s32), (p16, s16)):
        assert int(s.num_skipped) == 0
        for k in ("l1", "l2"):
            assert p[k].U.dtype == jnp.float32 and _orth_error(p[k]) < 1e-4


def test_cast_dense_policy_and_errors():
    w = dlrt_jax.LowRank.random(jax.random.key(0), (6, 4), rank=2)
    t = cast_floating({"w": w, "i": jnp.arange(3), "f": jnp.ones(2)}, jnp.bfloat16)
    assert t["w"].U.dtype == jnp.bfloat16 and t["w"].rank.dtype == jnp.float32
    assert t["i"].dtype == jnp.int32 and t["f"].dtype == jnp.bfloat16
    x = jnp.arange(12.0).reshape(3, 4)
    k = jnp.arange(8.0).reshape(2, 4) / 10
    np.testing.assert_allclose(
        np.asarray(mixed_dense(x, k, jnp.ones(2), output_dtype=jnp.float32)),
        np.asarray(x @ k.T + 1),
        rtol=1e-2,
    )
    g = jax.grad(lambda k: mixed_dense(x, k).astype(jnp.float32).sum())(k)
    assert g.dtype == jnp.float32
    pol = PrecisionPolicy(jnp.float32)  # mixed precision off: exact float32 path
    np.testing.assert_array_equal(np.asarray(pol.apply(w, x)), np.asarray(w(x)))
    with pytest.raises(TypeError, match="`compute_dtype` must be a floating dtype"):
        mixed_apply(w, x, compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match="`lr` must be a LowRank"):
        mixed_apply(jnp.ones((6, 4)), x)
    with pytest.raises(ValueError, match=r"`kernel` must be \(out, in\)"):
        mixed_dense(x, jnp.ones((2, 3)))
