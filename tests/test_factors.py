"""LowRank: constructors, masking, application and its DLRT gradients; the truncation rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlrt_jax
from dlrt_jax import LowRank


def test_random_factor_shapes_orthonormal_and_masked():
    x = LowRank.random(jax.random.key(0), (12, 9), rank=3, capacity=4)
    assert x.U.shape == (12, 4) and x.S.shape == (4, 4) and x.V.shape == (9, 4)
    assert int(x.active_rank) == 3 and x.capacity == 4 and x.shape == (12, 9)
    np.testing.assert_allclose(x.U.T @ x.U, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(x.V.T @ x.V, np.eye(4), atol=1e-6)
    s = np.diag(np.asarray(x.S))
    assert np.all(np.diff(s[:3]) <= 0) and np.all(s[:3] > 0) and s[3] == 0
    assert LowRank.random(jax.random.key(0), (12, 9)).capacity == 4  # floor(min / 2)


def test_random_with_explicit_singular_values_and_scale():
    x = LowRank.random(jax.random.key(1), (8, 6), rank=2, singular_values=[3.0, 1.0], scale=0.5)
    np.testing.assert_allclose(np.diag(x.S)[:2], [1.5, 0.5])
    np.testing.assert_allclose(
        jnp.linalg.svd(x.to_dense(), compute_uv=False)[:3], [1.5, 0.5, 0], atol=1e-6
    )


def test_inactive_columns_never_influence_results():
    x = LowRank.random(jax.random.key(2), (10, 7), rank=2, capacity=3)
    garbage = x.replace(S=x.S.at[2, 2].set(100.0).at[0, 2].set(5.0))
    xin = jax.random.normal(jax.random.key(3), (4, 7))
    np.testing.assert_allclose(garbage(xin), x(xin), atol=1e-6)
    np.testing.assert_allclose(garbage.to_dense(), x.to_dense(), atol=1e-6)
    # finite, non-orthonormal inactive columns of U and V (only S and the (batch, c)
    # intermediates are masked in lowrank_apply): same output and same gradient slots
    junk = garbage.replace(U=x.U.at[:, 2].set(7.0), V=x.V.at[:, 2].set(-3.0))
    np.testing.assert_allclose(junk(xin), x(xin), atol=1e-5)

    def loss(w):
        return jnp.sum(jnp.sin(w(xin)))

    g_junk, g = jax.grad(loss)(junk), jax.grad(loss)(x)
    for a, b in zip((g_junk.U, g_junk.S, g_junk.V), (g.U, g.S, g.V)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.all(np.asarray(g_junk.U)[:, 2] == 0) and np.all(np.asarray(g_junk.S)[2] == 0)


def test_from_dense_rank_and_tolerance():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 8))
    x = LowRank.from_dense(jnp.asarray(A, jnp.float32), tol=1e-5)
    assert int(x.rank) == 3 and x.capacity == 4
    np.testing.assert_allclose(x.to_dense(), A, atol=1e-4)
    y = LowRank.from_dense(jnp.asarray(A, jnp.float32), rank=2)
    sigma = np.linalg.svd(A, compute_uv=False)
    err = np.linalg.norm(np.asarray(y.to_dense()) - A)
    np.testing.assert_allclose(err, sigma[2], rtol=1e-4)  # the tail norm
    # under jit the tolerance-rank is traced but the result is the same
    z = jax.jit(lambda W: LowRank.from_dense(W, tol=1e-5))(jnp.asarray(A, jnp.float32))
    assert int(z.rank) == 3


def test_apply_matches_dense_with_batch_axes():
    x = LowRank.random(jax.random.key(4), (6, 5), rank=2, capacity=2)
    xin = jax.random.normal(jax.random.key(5), (3, 4, 5))
    np.testing.assert_allclose(dlrt_jax.lowrank_apply(x, xin), xin @ x.to_dense().T, atol=1e-5)


def _dense_grad(loss_of_W, x):
    return jax.grad(loss_of_W)(x.to_dense())


@pytest.mark.parametrize("via", ["apply", "to_dense"])
def test_gradient_slots_are_the_dlrt_gradients(via):
    """grad.U = G V, grad.S = U^T G V, grad.V = G^T U (masked), G = dL/dW."""
    x = LowRank.random(jax.random.key(6), (7, 5), rank=2, capacity=2)
    x = dlrt_jax.resize_capacity({"w": x}, None, 3)[0]["w"]  # one inactive column
    xin = jax.random.normal(jax.random.key(7), (11, 5))
    target = jax.random.normal(jax.random.key(8), (11, 7))

    def loss_W(W):
        return jnp.sum(jnp.tanh(xin @ W.T - target) ** 2)

    if via == "apply":
        g = jax.grad(lambda z: jnp.sum(jnp.tanh(z(xin) - target) ** 2))(x)
    else:
        g = jax.grad(lambda z: loss_W(z.to_dense()))(x)
    G = _dense_grad(loss_W, x)
    U, _, V = x.masked()
    np.testing.assert_allclose(g.U, G @ V, atol=1e-5)
    np.testing.assert_allclose(g.V, G.T @ U, atol=1e-5)
    np.testing.assert_allclose(g.S, U.T @ G @ V, atol=1e-5)
    assert float(g.rank) == 0.0
    assert np.all(np.asarray(g.U)[:, 2] == 0)  # inactive column masked


def _conv_phi(x, V):
    k = V.reshape(3, 3, 2, V.shape[1])
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_lowrank_map_convolution_gradients():
    """A layer linear in W (a convolution): output and all gradient slots vs. the dense kernel."""
    x = LowRank.random(jax.random.key(9), (4, 18), rank=2, capacity=2)
    xin = jax.random.normal(jax.random.key(10), (2, 5, 5, 2))

    def dense_conv(W):  # W: out x (kh kw in)
        return jax.lax.conv_general_dilated(
            xin, W.T.reshape(3, 3, 2, 4), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y = dlrt_jax.lowrank_map(x, xin, _conv_phi)
    np.testing.assert_allclose(y, dense_conv(x.to_dense()), atol=1e-5)

    def loss_W(W):
        return jnp.sum(jnp.sin(dense_conv(W)))

    g, gx = jax.grad(
        lambda z, a: jnp.sum(jnp.sin(dlrt_jax.lowrank_map(z, a, _conv_phi))), argnums=(0, 1)
    )(x, xin)
    G = jax.grad(loss_W)(x.to_dense())
    np.testing.assert_allclose(g.U, G @ x.V, atol=1e-4)
    np.testing.assert_allclose(g.V, G.T @ x.U, atol=1e-4)
    np.testing.assert_allclose(g.S, x.U.T @ G @ x.V, atol=1e-4)
    gx_dense = jax.grad(
        lambda a: jnp.sum(
            jnp.sin(
                jax.lax.conv_general_dilated(
                    a,
                    x.to_dense().T.reshape(3, 3, 2, 4),
                    (1, 1),
                    "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )
            )
        )
    )(xin)
    np.testing.assert_allclose(gx, gx_dense, atol=1e-4)


def test_truncation_rank_rule():
    t = dlrt_jax.truncation_rank
    assert int(t(jnp.array([3.0, 2.0, 1.0, 0.1]), 0.11, absolute=True)) == 3
    assert int(t(jnp.array([3.0, 2.0, 1.0, 0.1]), 0.05, absolute=True)) == 4
    # the smallest singular value belongs to the tail
    assert int(t(jnp.array([1.0, 1e-3]), 5e-4, absolute=True)) == 2
    # relative: ||sigma|| = 5, tails [5, 3, 1.8]; theta = 0.5 * 5 = 2.5 -> rho = 2
    assert int(t(jnp.array([4.0, 2.4, 1.8]), 0.5)) == 2
    assert int(t(jnp.array([4.0, 2.4, 1.8]), 0.61)) == 1  # theta 3.05 >= 3
    sigma = jnp.array([4.0, 2.4, 1.8])
    tails = np.sqrt(np.cumsum(np.asarray(sigma)[::-1] ** 2)[::-1])
    assert np.allclose(dlrt_jax.tail_norms(sigma), tails)
    # clamps
    assert int(t(jnp.array([1.0, 1e-9, 1e-9]), 0.5, min_rank=2)) == 2
    assert int(t(jnp.array([1.0, 1.0, 1.0]), 0.0, max_rank=2)) == 2


def test_truncation_rank_relative_hand_computed():
    sigma = jnp.array([4.0, 2.0, 1.0, 0.5])  # ||sigma|| = sqrt(21.25) = 4.61
    # tails: rho=0: 4.61, rho=1: sqrt(5.25)=2.29, rho=2: sqrt(1.25)=1.118, rho=3: 0.5
    assert int(dlrt_jax.truncation_rank(sigma, 0.3)) == 2  # theta 1.38
    assert int(dlrt_jax.truncation_rank(sigma, 0.2)) == 3  # theta 0.92
    assert int(dlrt_jax.truncation_rank(sigma, 0.1)) == 4  # theta 0.461 < 0.5 = last tail
    assert int(dlrt_jax.truncation_rank(sigma, 0.109)) == 3  # theta 0.5025 >= 0.5
    assert int(dlrt_jax.truncation_rank(sigma, 0.0)) == 4


def test_truncation_error_equals_tail_norm():
    rng = np.random.default_rng(1)
    A = jnp.asarray(rng.standard_normal((9, 7)), jnp.float32)
    x = LowRank.from_dense(A, tol=0.3, capacity=7)
    r = int(x.rank)
    sigma = np.linalg.svd(np.asarray(A), compute_uv=False)
    err = float(jnp.linalg.norm(x.to_dense() - A))
    np.testing.assert_allclose(err, np.sqrt(np.sum(sigma[r:] ** 2)), rtol=1e-4)
    assert err <= 0.3 * np.linalg.norm(sigma) + 1e-5
    assert np.sqrt(np.sum(sigma[r - 1 :] ** 2)) > 0.3 * np.linalg.norm(sigma)  # smallest rank


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_ranks_and_capacities():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="rank"):
        LowRank.random(key, (6, 4), rank=0)
    with pytest.raises(ValueError, match=r"`rank`=3 exceeds the capacity 2.*larger `capacity=`"):
        LowRank.random(key, (6, 4), rank=3)
    with pytest.raises(ValueError, match=r"`rank` must be an integer >= 1, got 0"):
        LowRank(jnp.zeros((6, 2)), jnp.zeros((2, 2)), jnp.zeros((5, 2)), rank=0)
    with pytest.raises(ValueError, match=r"capacity.*min\(n, m\)=4"):
        LowRank.random(key, (6, 4), rank=2, capacity=5)
    with pytest.raises(ValueError, match="capacity"):
        LowRank(jnp.zeros((3, 4)), jnp.zeros((4, 4)), jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="rank"):
        LowRank(jnp.zeros((6, 2)), jnp.zeros((2, 2)), jnp.zeros((5, 2)), rank=2.5)
    with pytest.raises(ValueError, match="shape"):
        LowRank.random(key, (6,), rank=1)


def test_bad_dtypes_and_shapes():
    with pytest.raises(TypeError, match="floating dtype"):
        LowRank(jnp.zeros((6, 2), jnp.int32), jnp.zeros((2, 2)), jnp.zeros((5, 2)))
    with pytest.raises(TypeError, match="floating"):
        LowRank.random(jax.random.key(0), (6, 4), rank=1, dtype=jnp.int32)
    with pytest.raises(ValueError, match="Inconsistent factor shapes"):
        LowRank(jnp.zeros((6, 2)), jnp.zeros((3, 3)), jnp.zeros((5, 2)))
    x = LowRank.random(jax.random.key(0), (6, 4), rank=1)
    with pytest.raises(ValueError, match="last axis must have size m=4"):
        x(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="exactly one"):
        LowRank.from_dense(jnp.ones((4, 4)))
    with pytest.raises(TypeError, match="floating"):
        LowRank.from_dense(jnp.ones((4, 4), jnp.int32), rank=1)


@pytest.mark.parametrize("slot", ["U", "S", "V"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_factors_are_rejected_when_concrete(slot, value):
    x = LowRank.random(jax.random.key(0), (6, 4), rank=2)
    bad = {k: getattr(x, k) for k in ("U", "S", "V")}
    bad[slot] = bad[slot].at[1, 0].set(value)
    with pytest.raises(ValueError, match=f"`{slot}` contains 1 NaN or Inf entries"):
        LowRank(**bad, rank=2)
    with pytest.raises(ValueError, match=f"`{slot}` contains 1 NaN or Inf"):
        x.replace(**{slot: bad[slot]})
    # traced arrays are not checked: the same construction runs under jit
    out = jax.jit(lambda U, S, V: LowRank(U, S, V, 2).to_dense())(**bad)
    assert not bool(jnp.all(jnp.isfinite(out)))


def test_replace_on_a_gradient_keeps_its_zero_rank_slot():
    x = LowRank.random(jax.random.key(0), (6, 4), rank=2, capacity=2)
    xin = jax.random.normal(jax.random.key(1), (3, 4))
    g = jax.grad(lambda w: jnp.sum(jnp.sin(w(xin))))(x)
    assert float(g.rank) == 0.0  # a cotangent, not a factor
    clipped = g.replace(S=0.5 * g.S, U=jnp.clip(g.U, -0.1, 0.1))
    assert isinstance(clipped, LowRank) and float(clipped.rank) == 0.0
    np.testing.assert_allclose(clipped.S, 0.5 * np.asarray(g.S))
    np.testing.assert_allclose(clipped.U, np.clip(np.asarray(g.U), -0.1, 0.1))
    np.testing.assert_array_equal(clipped.V, g.V)
    assert float(g.replace(U=g.U.at[0, 0].set(jnp.nan)).rank) == 0.0  # NaN gradients: skipped
    with pytest.raises(ValueError, match="Inconsistent factor shapes"):
        g.replace(S=jnp.zeros((3, 3)))  # shapes are still checked
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        g.replace(rank=0)  # a rank given explicitly is validated
    assert int(g.replace(rank=1).active_rank) == 1
    # an ordinary factor is validated as before, naming the argument to change
    with pytest.raises(ValueError, match=r"`rank`=3 exceeds the capacity 2.*`capacity=`"):
        x.replace(rank=3)
