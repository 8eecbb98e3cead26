"""Flax NNX layers, converter and training glue of dlrt_jax.nnx.

References are written independently here: dense ``x @ W^T + b`` and ``lax.conv_general_dilated``
/ ``nnx.Conv`` with the reconstructed kernel, and ``G = dL/dW`` by autodiff of the dense model.
"""

import functools
import logging
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dlrt_jax
from dlrt_jax import LowRank, is_lowrank
from dlrt_jax.nnx import (
    ConversionSummary,
    DLRTOptimizer,
    LowRankConv,
    LowRankLinear,
    LowRankParam,
    apply_capacity_policy,
    fit_capacity,
    make_grad_fn,
    to_dense,
    to_low_rank,
    train_step,
)

ATOL = 2e-5


def _normal_init(std=0.5):
    return nnx.initializers.normal(std)


def _orth_err(B):
    B = np.asarray(B, np.float64)
    return np.max(np.abs(B.T @ B - np.eye(B.shape[1])))


def _mask(lr):
    return np.arange(lr.capacity) < int(lr.rank)


# ---- LowRankParam and state handling -------------------------------------------------------------


class _Two(nnx.Module):
    def __init__(self, rngs):
        self.a = LowRankLinear(8, 6, rank=2, capacity=3, bias_init=_normal_init(), rngs=rngs)
        self.b = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_lowrank_param_state_split_merge_and_grad():
    model = _Two(nnx.Rngs(0))
    assert isinstance(model.a.kernel, LowRankParam) and isinstance(model.a.kernel, nnx.Param)

    factors = nnx.state(model, LowRankParam)
    assert list(factors.keys()) == ["a"] and list(factors["a"].keys()) == ["kernel"]
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(pure, is_leaf=is_lowrank)
    assert sum(is_lowrank(leaf) for leaf in leaves) == 1 and len(leaves) == 4  # factor, 3 arrays

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    merged = nnx.merge(graphdef, params, rest)
    np.testing.assert_allclose(merged(x), model(x), atol=ATOL)
    merged_pure = nnx.merge(graphdef, nnx.as_pure(params), rest)  # what grad_fn does
    assert isinstance(merged_pure.a.kernel, LowRankParam)
    np.testing.assert_allclose(merged_pure(x), model(x), atol=ATOL)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)

    grads = jax.grad(loss)(params)
    g = grads["a"]["kernel"]
    assert isinstance(g, LowRankParam) and is_lowrank(g.get_value())
    assert g.get_value().U.shape == (6, 3)
    assert float(g.get_value().rank) == 0.0

    with pytest.raises(TypeError, match="LowRankParam holds a dlrt_jax.LowRank"):
        LowRankParam(jnp.zeros((3, 3)))


def test_lowrank_param_ellipsis_index_gets_and_sets_the_factor():
    layer = LowRankLinear(8, 6, rank=2, capacity=3, rngs=nnx.Rngs(0))
    factor = layer.kernel[...]
    assert isinstance(factor, LowRank) and factor.shape == (6, 8) and factor.capacity == 3
    np.testing.assert_array_equal(factor.U, layer.kernel.get_value().U)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    new = LowRank.random(jax.random.key(2), (6, 8), rank=1, capacity=3)
    layer.kernel[...] = new
    assert int(layer.rank) == 1
    np.testing.assert_allclose(layer(x), x @ new.to_dense().T + layer.bias[...], atol=ATOL)
    # the same access inside nnx.jit
    rank = nnx.jit(lambda m: m.kernel[...].active_rank)(layer)
    assert int(rank) == 1
    with pytest.raises(TypeError, match="needs a LowRank, got ArrayImpl"):
        layer.kernel[...] = jnp.zeros((8, 6))
    with pytest.raises(TypeError, match=r"only the index `...`.*param\[...\].U"):
        layer.kernel[0]
    with pytest.raises(TypeError, match="only the index"):
        layer.kernel[0] = new


# ---- LowRankLinear -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(4,), (2, 3), ()])
def test_linear_equals_dense_formula(use_bias, batch_shape):
    layer = LowRankLinear(
        8, 6, rank=2, capacity=3, use_bias=use_bias, bias_init=_normal_init(), rngs=nnx.Rngs(0)
    )
    W = np.asarray(layer.factor.to_dense(), np.float64)
    x = np.asarray(jax.random.normal(jax.random.key(2), (*batch_shape, 8)))
    want = x @ W.T + (np.asarray(layer.bias[...]) if use_bias else 0.0)
    got = layer(jnp.asarray(x))
    assert got.shape == (*batch_shape, 6)
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert int(layer.rank) == 2 and layer.capacity == 3
    assert np.linalg.matrix_rank(W, tol=1e-5) == 2  # the inactive column is masked


def test_linear_defaults_and_paper_init():
    layer = LowRankLinear(8, 6, rngs=nnx.Rngs(0))
    lr = layer.factor
    assert lr.capacity == 3 and int(layer.rank) == 3  # floor(min/2), rank = capacity
    assert _orth_err(lr.U) < 1e-5 and _orth_err(lr.V) < 1e-5
    s = np.diag(np.asarray(lr.S))
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)  # sorted |N(0, 1)|
    np.testing.assert_allclose(np.asarray(lr.S), np.diag(s), atol=0)  # diagonal
    np.testing.assert_allclose(layer.bias[...], 0.0)
    scaled = LowRankLinear(8, 6, kernel_init=3.0, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(scaled.factor.S), 3.0 * np.asarray(lr.S), rtol=1e-6)
    # capacity follows a rank above the default
    assert LowRankLinear(8, 6, rank=4, rngs=nnx.Rngs(0)).capacity == 4


def test_linear_dense_initializer_is_truncated_by_svd():
    init = nnx.initializers.lecun_normal()
    layer = LowRankLinear(8, 6, rank=2, capacity=3, kernel_init=init, rngs=nnx.Rngs(5))
    kernel = init(nnx.Rngs(5).params(), (8, 6), jnp.float32)  # same key stream as the layer
    P, s, Qt = np.linalg.svd(np.asarray(kernel, np.float64).T)
    want = P[:, :2] @ np.diag(s[:2]) @ Qt[:2]
    np.testing.assert_allclose(layer.factor.to_dense(), want, atol=1e-5)


def test_linear_from_linear_full_rank_and_tol():
    dense = nnx.Linear(8, 6, bias_init=_normal_init(), rngs=nnx.Rngs(0))
    low = LowRankLinear.from_linear(dense, rank=6, capacity=6)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    np.testing.assert_allclose(low(x), dense(x), atol=ATOL)
    np.testing.assert_allclose(low.bias[...], dense.bias[...])

    # a rank-2 kernel is found by the tolerance rule; the truncation error is the tail norm
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 2)))[0]
    V = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 2)))[0]
    dense.kernel[...] = jnp.asarray(U @ np.diag([3.0, 1.0]) @ V.T, jnp.float32)
    low = LowRankLinear.from_linear(dense, tol=1e-4)
    assert int(low.rank) == 2 and low.capacity == 3
    np.testing.assert_allclose(low(x), dense(x), atol=ATOL)
    low1 = LowRankLinear.from_linear(dense, rank=1)
    err = np.linalg.norm(np.asarray(low1.factor.to_dense()).T - np.asarray(dense.kernel[...]))
    np.testing.assert_allclose(err, 1.0, rtol=1e-5)


def test_linear_dtype_and_precision():
    layer = LowRankLinear(8, 6, rank=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer(jnp.ones((2, 8))).dtype == jnp.bfloat16
    assert layer.factor.dtype == jnp.float32
    hi = LowRankLinear(8, 6, rank=2, precision="highest", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    np.testing.assert_allclose(hi(x), x @ hi.factor.to_dense().T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank=0), ValueError, r"`rank` must be an integer in \[1, min\(n, m\)=6\]"),
        (dict(rank=7), ValueError, r"\[1, min\(n, m\)=6\]"),
        (dict(rank=4, capacity=3), ValueError, "exceeds the capacity 3.*`capacity=`"),
        (dict(capacity=7), ValueError, r"`capacity` must be an integer in \[1, min\(n, m\)=6\]"),
        (dict(rank=2.5), ValueError, "`rank`"),
        (dict(kernel_init="orthogonal"), TypeError, "`kernel_init` must be None"),
        (dict(kernel_init=-1.0), ValueError, "must be > 0"),
        (dict(kernel_init=lambda k, s, d: jnp.zeros((3, 3))), ValueError, "dense kernel shape"),
        (
            dict(kernel_init=lambda k, s, d: LowRank.random(k, (8, 6), capacity=3)),
            ValueError,
            "needs shape",
        ),
    ],
)
def test_linear_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LowRankLinear(8, 6, rngs=nnx.Rngs(0), **kwargs)


def test_linear_bad_inputs():
    with pytest.raises(ValueError, match="`in_features` must be a positive integer"):
        LowRankLinear(0, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="`rngs` must be an nnx.Rngs"):
        LowRankLinear(4, 3, rngs=0)
    layer = LowRankLinear(8, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="nnx.Linear"):
        LowRankLinear.from_linear(layer)
    with pytest.raises(ValueError, match="at most one of `rank` and `tol`"):
        LowRankLinear.from_linear(nnx.Linear(8, 6, rngs=nnx.Rngs(0)), rank=1, tol=0.1)


# ---- LowRankConv ---------------------------------------------------------------------------------


def _conv_pair(kernel_size, strides, padding, rank=3, capacity=6, **kw):
    """A LowRankConv and an nnx.Conv holding the reconstructed kernel W^T."""
    cin, cout = 3, 6
    low = LowRankConv(
        cin,
        cout,
        kernel_size,
        strides,
        padding=padding,
        rank=rank,
        capacity=capacity,
        bias_init=_normal_init(),
        rngs=nnx.Rngs(0),
        **kw,
    )
    dense = nnx.Conv(cin, cout, kernel_size, strides, padding=padding, rngs=nnx.Rngs(1), **kw)
    W = low.factor.to_dense()  # (out, prod(k) * in)
    dense.kernel[...] = W.T.reshape(*kernel_size, cin, cout)
    dense.bias[...] = low.bias[...]
    return low, dense


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 5)])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 1))])
def test_conv_equals_nnx_conv(kernel_size, strides, padding):
    low, dense = _conv_pair(kernel_size, strides, padding)
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    got, want = low(x), dense(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "kernel_size, padding, kw, x_shape",
    [
        ((3, 3), "CIRCULAR", {}, (2, 9, 8, 3)),
        ((3, 3), "REFLECT", dict(kernel_dilation=2), (2, 9, 8, 3)),
        ((3,), "CAUSAL", dict(kernel_dilation=2), (2, 11, 3)),
        ((3, 3), ((1, 1), (2, 0)), dict(input_dilation=2), (2, 9, 8, 3)),
        ((3, 3), 1, {}, (2, 1, 9, 8, 3)),  # two batch axes
        ((3, 3), "SAME", {}, (9, 8, 3)),  # unbatched
    ],
)
def test_conv_other_configurations(kernel_size, padding, kw, x_shape):
    low, dense = _conv_pair(kernel_size, 1, padding, **kw)
    x = jax.random.normal(jax.random.key(4), x_shape)
    np.testing.assert_allclose(low(x), dense(x), atol=1e-4)


def test_conv_from_conv_full_rank():
    dense = nnx.Conv(3, 6, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
    low = LowRankConv.from_conv(dense, rank=6, capacity=6)  # W is 6 x 27
    assert low.strides == (2, 2) and low.padding == "VALID"
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    np.testing.assert_allclose(low(x), dense(x), atol=1e-5)


def test_conv_feature_groups_and_bad_args_raise():
    with pytest.raises(ValueError, match="feature_group_count=1"):
        LowRankConv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_group_count=2"):
        LowRankConv.from_conv(grouped)
    with pytest.raises(ValueError, match="`padding` must be one of"):
        LowRankConv(3, 4, (3, 3), padding="FULL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="CAUSAL"):
        LowRankConv(3, 4, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`strides` must be"):
        LowRankConv(3, 4, (3, 3), strides=(1, 2, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`rank`"):
        LowRankConv(3, 4, (3, 3), rank=5, rngs=nnx.Rngs(0))  # W is 4 x 27
    with pytest.raises(ValueError, match="in_features=3"):
        LowRankConv(3, 4, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 2)))


# ---- gradients: the DLRT slots against a dense-W autodiff reference ------------------------------


def _check_slots(g, lr, G):
    """grad.U = G V, grad.S = U^T G V, grad.V = G^T U, masked to the active rank."""
    mask = _mask(lr)
    U, S, V = (np.asarray(a, np.float64) for a in (lr.U, lr.S, lr.V))
    U, V = U * mask, V * mask
    G = np.asarray(G, np.float64)
    scale = np.max(np.abs(G))
    np.testing.assert_allclose(g.U, G @ V, atol=1e-4 * scale)
    np.testing.assert_allclose(g.S, U.T @ G @ V, atol=1e-4 * scale)
    np.testing.assert_allclose(g.V, G.T @ U, atol=1e-4 * scale)
    assert np.max(np.abs(np.asarray(g.U)[:, ~mask]), initial=0.0) == 0.0


def test_linear_model_grads_are_dlrt_slots():
    model = _Two(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    t = jax.random.normal(jax.random.key(2), (4, 3))

    def loss_fn(m):
        return jnp.mean((m(x) - t) ** 2)

    grads = nnx.grad(loss_fn)(model)
    lr = model.a.factor
    b, Wb, bb = model.a.bias[...], model.b.kernel[...], model.b.bias[...]

    def dense_loss(W):
        return jnp.mean((jnp.tanh(x @ W.T + b) @ Wb + bb - t) ** 2)

    G = jax.grad(dense_loss)(lr.to_dense())
    _check_slots(grads["a"]["kernel"].get_value(), lr, G)
    # the other parameters get ordinary gradients
    np.testing.assert_allclose(
        grads["b"]["kernel"][...],
        jax.grad(lambda Wb_: jnp.mean((jnp.tanh(model.a(x)) @ Wb_ + bb - t) ** 2))(Wb),
        atol=1e-6,
    )


def test_conv_grads_are_dlrt_slots():
    strides, padding = 2, "SAME"
    low = LowRankConv(3, 6, (3, 3), strides, padding=padding, rank=3, capacity=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    t = jax.random.normal(jax.random.key(2), low(x).shape)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum((m(x) - t) ** 2)))(low)
    lr = low.factor
    b = low.bias[...]

    def dense_loss(W):
        kernel = W.T.reshape(3, 3, 3, 6)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (strides, strides),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest",
        )
        return jnp.sum((y + b - t) ** 2)

    G = jax.jit(jax.grad(dense_loss))(lr.to_dense())
    _check_slots(grads["kernel"].get_value(), lr, G)


# ---- to_low_rank ---------------------------------------------------------------------------------


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.fc2 = nnx.Linear(6, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)

    def __call__(self, x):
        return self.norm(nnx.relu(self.fc2(x)))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)  # W is 6 x 27
        self.fc1 = nnx.Linear(6, 6, rngs=rngs)
        self.block = _Block(rngs)
        self.head = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        h = jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2))
        return self.head(self.block(nnx.relu(self.fc1(h))))


def _kinds(model):
    return {
        "conv": type(model.conv).__name__,
        "fc1": type(model.fc1).__name__,
        "fc2": type(model.block.fc2).__name__,
        "head": type(model.head).__name__,
        "norm": type(model.block.norm).__name__,
    }


@pytest.mark.parametrize(
    "filter, converted",
    [
        (lambda path, m: path[-1] != "head", {"conv", "fc1", "fc2"}),
        (lambda m: isinstance(m, nnx.Conv), {"conv"}),
        (nnx.Linear, {"fc1", "fc2", "head"}),
        ("fc1", {"fc1"}),
        (nnx.PathContains("block"), {"fc2"}),
    ],
)
def test_to_low_rank_replaces_exactly_the_matched_layers(filter, converted):
    model = _Net(nnx.Rngs(0))
    before = _kinds(model)
    new = to_low_rank(model, filter=filter, rank=4, capacity=4)
    assert _kinds(model) == before  # the input model is untouched
    kinds = _kinds(new)
    for name, kind in kinds.items():
        if name in converted:
            assert kind in ("LowRankLinear", "LowRankConv"), (name, kind)
            layer = new.block.fc2 if name == "fc2" else getattr(new, name)
            assert int(layer.rank) == 4 and layer.capacity == 4
        else:
            assert kind == before[name], (name, kind)
    # untouched layers are copies: training the new model does not move the old one
    new.block.norm.scale[...] += 1.0
    assert float(jnp.max(model.block.norm.scale[...])) == 1.0


def test_to_low_rank_full_rank_outputs_agree_and_svd_init():
    model = _Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    new = to_low_rank(model, filter=lambda path, m: path[-1] != "head", rank=6, capacity=6)
    np.testing.assert_allclose(new(x), model(x), atol=1e-4)
    np.testing.assert_allclose(new.fc1.bias[...], model.fc1.bias[...])
    np.testing.assert_allclose(new.fc1.factor.to_dense().T, model.fc1.kernel[...], atol=1e-5)
    low = to_low_rank(model, filter="fc1", tol=0.5)
    assert low.fc1.capacity == 3 and 1 <= int(low.fc1.rank) <= 3


def test_to_low_rank_random_init_and_errors():
    model = _Net(nnx.Rngs(0))
    new = to_low_rank(model, filter="fc1", rank=2, init="random", rngs=nnx.Rngs(3))
    lr = new.fc1.factor
    assert int(lr.rank) == 2 and lr.capacity == 3
    assert not np.allclose(lr.to_dense().T, model.fc1.kernel[...], atol=1e-2)
    with pytest.raises(ValueError, match="matched no convertible layer"):
        to_low_rank(model, filter="nope")
    with pytest.raises(ValueError, match="needs `rngs`"):
        to_low_rank(model, init="random")
    with pytest.raises(ValueError, match="`init` must be"):
        to_low_rank(model, init="zeros")
    with pytest.raises(ValueError, match="'head'.*`rank`"):
        to_low_rank(model, filter=nnx.Linear, rank=6)  # head is 4 x 6
    with pytest.raises(TypeError, match="`filter` must"):
        to_low_rank(model, filter=3)

    class Grouped(nnx.Module):
        def __init__(self, rngs):
            self.g = nnx.Conv(6, 6, (3, 3), feature_group_count=2, rngs=rngs)
            self.fc = nnx.Linear(6, 6, rngs=rngs)

    grouped = Grouped(nnx.Rngs(0))
    with pytest.raises(ValueError, match="'g'.*feature_group_count=2"):
        to_low_rank(grouped)
    assert type(to_low_rank(grouped, filter="fc", rank=2).fc) is LowRankLinear


def test_to_low_rank_sequential_shared_layers_and_root():
    seq = nnx.Sequential(
        nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    )
    new = to_low_rank(seq, filter=lambda path, m: path[-1] == 0, rank=6, capacity=6)
    assert [type(layer).__name__ for layer in new.layers[::2]] == ["LowRankLinear", "Linear"]
    x = jax.random.normal(jax.random.key(1), (4, 6))
    np.testing.assert_allclose(new(x), seq(x), atol=1e-5)

    class Shared(nnx.Module):
        def __init__(self, layer):
            self.a, self.b = layer, layer

    shared = to_low_rank(Shared(seq.layers[0]), rank=2)
    assert type(shared.a) is LowRankLinear and shared.a is shared.b  # sharing is kept
    assert type(to_low_rank(seq.layers[0], rank=2)) is LowRankLinear  # the root itself


@pytest.mark.parametrize(
    "filter, converted",
    [
        (nnx.Any("fc1", nnx.Conv), {"conv", "fc1"}),  # a string inside nnx.Any: a path pattern
        (nnx.All(nnx.Linear, nnx.Not("head")), {"fc1", "fc2"}),
        (["head", nnx.Conv], {"head", "conv"}),  # a list: any of
        ("fc[12]", {"fc1", "fc2"}),  # a regular expression over one path element
        ("block/fc2", {"fc2"}),  # ... or over the '/'-joined path
        (nnx.PathContains("fc", exact=False), {"fc1", "fc2"}),
        (True, {"conv", "fc1", "fc2", "head"}),
        (..., {"conv", "fc1", "fc2", "head"}),
    ],
)
def test_to_low_rank_takes_flax_filters(filter, converted):
    model = _Net(nnx.Rngs(0))
    new, summary = to_low_rank(model, filter=filter, rank=3, capacity=3, report=True)
    kinds = _kinds(new)
    got = {name for name, kind in kinds.items() if kind.startswith("LowRank")}
    assert got == converted
    excluded = {r.path.split("/")[-1] for r in summary.skipped if "filter" in r.note}
    assert excluded == {"conv", "fc1", "fc2", "head"} - converted


def test_to_low_rank_variable_type_filters_select_by_kernel_and_none_is_deprecated():
    model = _Net(nnx.Rngs(0))
    everything = {"conv", "fc1", "fc2", "head"}
    for filter, converted in [
        (nnx.Param, everything),  # every kernel is an nnx.Param
        (nnx.All(nnx.Param, "fc1"), {"fc1"}),
        (nnx.Not(nnx.Param), set()),
    ]:
        if not converted:
            with pytest.raises(ValueError, match="matched no convertible layer"):
                to_low_rank(model, filter=filter, rank=3, capacity=3)
            continue
        kinds = _kinds(to_low_rank(model, filter=filter, rank=3, capacity=3))
        assert {name for name, kind in kinds.items() if kind.startswith("LowRank")} == converted
    with pytest.warns(DeprecationWarning, match="pass `filter=...`"):
        kinds = _kinds(to_low_rank(model, filter=None, rank=3, capacity=3))
    assert {name for name, kind in kinds.items() if kind.startswith("LowRank")} == everything


def test_to_low_rank_filter_errors():
    model = _Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="matched no convertible layer"):
        to_low_rank(model, filter="fc", rank=2)  # a full match: 'fc' is not 'fc1'
    with pytest.raises(ValueError, match="not a valid regular expression"):
        to_low_rank(model, filter="fc[", rank=2)
    with pytest.raises(ValueError, match="matched no convertible layer"):
        to_low_rank(model, filter=False, rank=2)


class _Custom(nnx.Module):
    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))


class _Zoo(nnx.Module):
    """Layers to_low_rank must convert, and layers with parameters it must report as skipped."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(12, 10, rngs=rngs)
        self.conv = nnx.Conv(2, 6, (3, 3), rngs=rngs)  # W is 6 x 18
        self.head = nnx.Linear(10, 3, rngs=rngs)
        self.embed = nnx.Embed(7, 12, rngs=rngs)
        self.norm = nnx.LayerNorm(10, rngs=rngs)
        self.custom = _Custom(rngs)  # a kernel, but no converter for its type
        self.bn = nnx.BatchNorm(10, rngs=rngs)
        self.low = LowRankLinear(10, 10, rank=2, rngs=rngs)
        self.drop = nnx.Dropout(0.1)  # no parameters: not reported


def test_to_low_rank_summary_reports_every_layer_with_errors(caplog):
    model = _Zoo(nnx.Rngs(0))
    with caplog.at_level(logging.INFO, logger="dlrt_jax.nnx"):
        new, summary = to_low_rank(
            model, filter=lambda path, m: path[-1] != "head", rank=3, report=True
        )
    assert isinstance(summary, ConversionSummary)
    converted = {r.path: r for r in summary.converted}
    assert set(converted) == {"fc", "conv"}
    for name, (n, m) in (("fc", (10, 12)), ("conv", (6, 18))):
        rec, layer, dense = converted[name], getattr(new, name), getattr(model, name)
        assert rec.shape == (n, m) and rec.rank == int(layer.rank) == 3
        assert rec.capacity == layer.capacity == max(min(n, m) // 2, 3)
        W = np.asarray(dense.kernel[...], np.float64).reshape(-1, n).T
        Wr = np.asarray(layer.factor.to_dense(), np.float64)
        expected = np.linalg.norm(W - Wr) / np.linalg.norm(W)
        np.testing.assert_allclose(rec.rel_error, expected, rtol=1e-4)
        assert rec.rel_error > 0.05  # rank 3 of a random matrix: a real change, reported
    skipped = {r.path: r.note for r in summary.skipped}
    assert set(skipped) == {"head", "embed", "norm", "custom", "bn", "low"}
    assert skipped["head"] == "excluded by `filter`"
    assert "embedding" in skipped["embed"] and "no converter for Embed" in skipped["embed"]
    assert "scale" in skipped["norm"] and "no converter for _Custom" in skipped["custom"]
    assert "scale" in skipped["bn"] and skipped["low"] == "already a low-rank layer"
    assert summary.max_rel_error == max(r.rel_error for r in summary.converted)
    table = str(summary)
    assert table.startswith("to_low_rank: 2 layer(s) converted, 6 skipped")
    for path in ("fc", "conv", "head", "embed", "norm", "custom", "bn", "low"):
        assert any(line.startswith(path + " ") for line in table.splitlines()), path
    assert f"{converted['fc'].rel_error:.3g}" in table
    assert [r.getMessage() for r in caplog.records if r.name == "dlrt_jax.nnx"] == [table]
    assert not isinstance(to_low_rank(model, filter="fc", rank=3), tuple)  # report=False


def test_to_low_rank_tol_is_honoured_beyond_half_the_smaller_dimension():
    model = _Net(nnx.Rngs(0))
    W = np.asarray(model.fc1.kernel[...], np.float64).T  # 6 x 6, full rank
    sigma = np.linalg.svd(W, compute_uv=False)
    tails = np.append(np.sqrt(np.cumsum(sigma[::-1] ** 2)[::-1]), 0.0) / np.linalg.norm(W)
    tol = 0.5 * (tails[4] + tails[5])  # needs rank 5 > floor(6 / 2) = 3
    with pytest.warns(UserWarning, match=r"cannot train 'fc1' \(6 x 6: capacity 5 > 3\)"):
        new, summary = to_low_rank(model, filter="fc1", tol=tol, report=True)
    (rec,) = summary.converted
    assert rec.rank == int(new.fc1.rank) == 5 and rec.capacity == new.fc1.capacity == 5
    assert "fixed-rank integrators only" in rec.note
    err = np.linalg.norm(np.asarray(new.fc1.factor.to_dense()) - W) / np.linalg.norm(W)
    assert err <= tol and rec.rel_error <= tol
    np.testing.assert_allclose(rec.rel_error, tails[5], rtol=1e-4)
    # the same rule in from_linear (previously clamped at the capacity 3)
    assert int(LowRankLinear.from_linear(model.fc1, tol=tol).rank) == 5
    with pytest.raises(ValueError, match=r"'fc1'.*`tol`=.* needs rank 5.*`capacity=` >= 5"):
        to_low_rank(model, filter="fc1", tol=tol, capacity=3)
    # the rank-adaptive integrators refuse that capacity clearly, a fixed-rank one trains it
    with pytest.raises(ValueError, match=r"capacity <= floor\(min\(n, m\) / 2\)"):
        DLRTOptimizer(new, dlrt_jax.bug(optax.sgd(0.1), tau=0.1))
    DLRTOptimizer(new, dlrt_jax.bug(optax.sgd(0.1)))


def test_to_low_rank_default_rank_warns_with_each_layers_error():
    model = _Net(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"neither `rank` nor `tol`.*'fc1' 0\.\d+.*`tol=`"):
        _, summary = to_low_rank(model, filter="fc1", report=True)
    assert summary.converted[0].rel_error > 1e-3
    # an explicit rank or tol, or a default truncation that is exact, does not warn
    exact = _Net(nnx.Rngs(0))
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 2)))[0]
    exact.fc1.kernel[...] = jnp.asarray(U @ np.diag([2.0, 1.0]) @ U.T, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_low_rank(model, filter="fc1", rank=2)
        to_low_rank(model, filter="fc1", tol=0.2)
        _, summary = to_low_rank(exact, filter="fc1", report=True)
    assert summary.converted[0].rel_error < 1e-6


# ---- training through DLRTOptimizer --------------------------------------------------------------


class _MLP(nnx.Module):
    def __init__(self, rngs, rank=2, capacity=8):
        self.l1 = LowRankLinear(16, 32, rank=rank, capacity=capacity, rngs=rngs)
        self.l2 = LowRankLinear(32, 32, rank=rank, capacity=capacity, rngs=rngs)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _data():
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 16))
    return x, jnp.tanh(x @ jax.random.normal(kt, (16, 4)))


def _mse(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


INTEGRATORS = {
    "bug": lambda: dlrt_jax.bug(optax.adam(1e-2)),
    "bug_adaptive": lambda: dlrt_jax.bug(optax.adam(1e-2), tau=0.05),
    "parallel_bug": lambda: dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.05),
    "projector_splitting": lambda: dlrt_jax.projector_splitting(optax.adam(1e-2)),
}


def _spy(tx, record):
    """Records the tree structures that the optimiser passes to ``tx`` and ``grad_fn`` sees."""

    def structure(tree):
        return jax.tree.structure(tree, is_leaf=is_lowrank)

    def update(grads, state, params=None, *, grad_fn=None):
        record["params"] = structure(params)
        record["grads"] = structure(grads)
        record["lowrank_params"] = sum(
            is_lowrank(x) for x in jax.tree.leaves(params, is_leaf=is_lowrank)
        )

        def spied(p):
            record.setdefault("grad_fn_in", []).append(structure(p))
            out = grad_fn(p)
            record.setdefault("grad_fn_out", []).append(structure(out))
            return out

        return tx.update(grads, state, params, grad_fn=spied)

    return optax.GradientTransformationExtraArgs(tx.init, update)


@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_training_with_each_integrator_under_nnx_jit(name):
    x, y = _data()
    model = _MLP(nnx.Rngs(1))
    record = {}
    optimizer = DLRTOptimizer(model, _spy(INTEGRATORS[name](), record), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, batch):
        traces.append(1)
        return train_step(model, optimizer, _mse, batch)

    losses = [float(step(model, optimizer, (x, y))) for _ in range(25)]
    assert len(traces) == 1  # ranks move inside fixed shapes: no retracing
    assert losses[-1] < 0.8 * losses[0], losses
    for layer in (model.l1, model.l2):
        lr = layer.factor
        assert lr.capacity == 8 and 2 <= int(lr.rank) <= 8
        assert _orth_err(lr.U) < 1e-4 and _orth_err(lr.V) < 1e-4
        assert is_lowrank(lr)
    # what the optimiser passes as params and what grad_fn receives/returns have one structure
    assert record["lowrank_params"] == 2
    assert record["grads"] == record["params"]
    n_evals = {"bug": 1, "bug_adaptive": 1, "parallel_bug": 0, "projector_splitting": 2}[name]
    assert len(record.get("grad_fn_in", [])) == n_evals
    for s in record.get("grad_fn_in", []) + record.get("grad_fn_out", []):
        assert s == record["params"]
    assert int(optimizer.step[...]) == 25


def test_rank_changes_and_fit_capacity_then_training_continues():
    k1, k2 = jax.random.split(jax.random.key(3))
    singular_values = jnp.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.8])
    target = LowRank.random(k1, (16, 16), rank=6, singular_values=singular_values).to_dense()
    x = jax.random.normal(k2, (64, 16))
    batch = (x, x @ target.T)
    model = LowRankLinear(16, 16, rank=2, capacity=4, use_bias=False, rngs=nnx.Rngs(0))
    optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(0.1), tau=0.05))
    traces = []

    @nnx.jit
    def step(model, optimizer, batch):
        traces.append(1)
        return train_step(model, optimizer, _mse, batch)

    ranks, losses = [], []
    for _ in range(6):
        losses.append(float(step(model, optimizer, batch)))
        ranks.append(int(model.rank))
    assert ranks[-1] > 2 and max(ranks) <= 4, ranks  # the rank grew within the capacity
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(traces) == 1

    rank = int(model.rank)
    W_before = model.factor.to_dense()
    fit_capacity(model, optimizer, headroom=2.0, multiple=4)  # 4 -> 8 = floor(16 / 2)
    want = min(8, 4 * -(-2 * rank // 4))
    assert model.capacity == want > 4 and int(model.rank) == rank
    np.testing.assert_allclose(model.factor.to_dense(), W_before, atol=1e-5)
    assert _orth_err(model.factor.U) < 1e-5 and _orth_err(model.factor.V) < 1e-5
    state = nnx.as_pure(optimizer.opt_state)
    assert state.factors[0].S[0].mu.shape == (want, want)
    assert state.factors[0].K[0].nu.shape == (16, want)
    for _ in range(4):
        losses.append(float(step(model, optimizer, batch)))
    assert len(traces) == 2  # one retrace for the new shapes
    assert losses[-1] < losses[5], losses  # training continues
    assert int(model.rank) <= model.capacity == want
    assert _orth_err(model.factor.U) < 1e-4


class _Square(nnx.Module):
    """Two 32 x 32 factors (the rank-adaptive capacity limit is 16) and a dense head."""

    def __init__(self, rngs, rank, capacity):
        self.l1 = LowRankLinear(32, 32, rank=rank, capacity=capacity, rngs=rngs)
        self.l2 = LowRankLinear(32, 32, rank=rank, capacity=capacity, rngs=rngs)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _data32():
    kx, kt = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (128, 32))
    return x, jnp.tanh(x @ jax.random.normal(kt, (32, 4)))


def test_apply_capacity_policy_resizes_out_of_band_and_keeps_the_function():
    model = _Square(nnx.Rngs(1), rank=2, capacity=16)
    optimizer = DLRTOptimizer(model, dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.05))
    x, y = _data32()
    train_step(model, optimizer, _mse, (x, y))  # a non-trivial optimiser state (one eager step)
    ranks = [int(model.l1.rank), int(model.l2.rank)]
    policy = dlrt_jax.CapacityPolicy(every=5, headroom=1.0, min_free=2, multiple=4)
    out_before = model(x)
    state_before = jax.tree.map(np.asarray, nnx.as_pure(optimizer.opt_state))

    assert not apply_capacity_policy(policy, 3, model, optimizer)  # not a multiple of `every`
    assert model.l1.capacity == 16
    assert apply_capacity_policy(policy, 5, model, optimizer)
    for layer, rank in zip((model.l1, model.l2), ranks, strict=True):
        want = policy.target(layer.factor)
        assert layer.capacity == want < 16 and int(layer.rank) == rank
        assert layer.kernel.get_value().U.shape == (32, want)
        assert _orth_err(layer.factor.U) < 1e-5 and _orth_err(layer.factor.V) < 1e-5
    np.testing.assert_allclose(model(x), out_before, atol=1e-5)  # the same function
    state = nnx.as_pure(optimizer.opt_state)
    for i, name in enumerate(("l1", "l2")):  # one FactorState per factor, in leaf order
        c = getattr(model, name).capacity
        got, old = state.factors[i], state_before.factors[i]
        assert got.S[0].mu.shape == (c, c) and got.K[0].nu.shape == (32, c)
        np.testing.assert_array_equal(got.S[0].mu, old.S[0].mu[:c, :c])  # moments kept
    assert not apply_capacity_policy(policy, 10, model, optimizer)  # now in its band
    # a plain callable with the policy's signature is accepted too
    calls = []

    def spy(step, params, opt_state):
        calls.append(step)
        return params, opt_state, False

    assert not apply_capacity_policy(spy, 7, model, optimizer) and calls == [7]
    with pytest.raises(TypeError, match="`policy` must be"):
        apply_capacity_policy(None, 5, model, optimizer)
    plain = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)  # a LowRank moment per Variable
    with pytest.raises(TypeError, match="DLRTOptimizer"):
        apply_capacity_policy(policy, 5, model, plain)


def test_apply_capacity_policy_under_nnx_jit_compiles_once_per_capacity():
    x, y = _data32()
    model = _Square(nnx.Rngs(1), rank=16, capacity=16)  # starts at the maximal rank
    optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.3))
    policy = dlrt_jax.CapacityPolicy(every=2, headroom=1.0, min_free=2, multiple=4)
    traces = []

    @nnx.jit
    def step(model, optimizer, batch):
        traces.append((model.l1.capacity, model.l2.capacity))  # runs once per trace only
        return train_step(model, optimizer, _mse, batch)

    visited, ranks, resizes = [], [], 0
    for i in range(1, 13):
        caps = (model.l1.capacity, model.l2.capacity)
        if caps not in visited:
            visited.append(caps)
        step(model, optimizer, (x, y))
        ranks.append(int(model.l1.rank))
        resizes += apply_capacity_policy(policy, i, model, optimizer)
        assert int(model.l1.rank) <= model.l1.capacity and int(model.l2.rank) <= model.l2.capacity
    assert ranks[-1] < 16 and resizes >= 1, (ranks, resizes)  # the rank dropped and c followed
    assert model.l1.capacity < 16 and model.l2.capacity < 16
    assert len(visited) >= 2 and traces == visited  # one trace per set of capacities, in order
    assert int(optimizer.step[...]) == 12


def test_train_step_tree_mode_jit_matches_graph_mode():
    x, y = _data()
    graph_model, tree_model = _MLP(nnx.Rngs(1)), _MLP(nnx.Rngs(1))
    graph_opt = DLRTOptimizer(graph_model, dlrt_jax.bug(optax.adam(1e-2), tau=0.05))
    tree_opt = DLRTOptimizer(tree_model, dlrt_jax.bug(optax.adam(1e-2), tau=0.05))
    traces = []

    def step(model, optimizer, batch):
        traces.append(1)
        return train_step(model, optimizer, _mse, batch)

    graph_step, tree_step = nnx.jit(step), nnx.jit(step, graph=False)
    for _ in range(4):
        a = graph_step(graph_model, graph_opt, (x, y))
        b = tree_step(tree_model, tree_opt, (x, y))
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert len(traces) == 2 and int(tree_opt.step[...]) == 4
    got = jax.tree.leaves(nnx.state((tree_model, tree_opt)))
    want = jax.tree.leaves(nnx.state((graph_model, graph_opt)))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)


def test_train_step_keeps_the_state_the_loss_changes():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = LowRankLinear(16, 8, rank=4, capacity=4, rngs=rngs)
            self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.norm(self.fc(x)))

    x, _ = _data()
    model = Net(nnx.Rngs(0))
    optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1))
    loss_fn = lambda m, b: jnp.mean(m(b) ** 2)  # noqa: E731
    key_count = int(model.drop.rngs.count[...])
    train_step(model, optimizer, loss_fn, x)
    # batch statistics and the dropout RNG counter advance as under nnx.value_and_grad
    mean = np.asarray(model.fc(x)).mean(0)  # the first step's mean, up to the factor's update
    assert float(jnp.max(jnp.abs(model.norm.mean[...]))) > 0.1 * float(np.max(np.abs(mean)))
    assert int(model.drop.rngs.count[...]) == key_count + 1
    assert int(optimizer.step[...]) == 1


def test_make_grad_fn_matches_nnx_grad_and_a_plain_optax_state_is_rejected():
    x, y = _data()
    model = _MLP(nnx.Rngs(1))
    grad_fn = make_grad_fn(model, _mse, (x, y))
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    got = grad_fn(pure)
    want = nnx.as_pure(nnx.grad(_mse)(model, (x, y)))
    assert jax.tree.structure(got) == jax.tree.structure(pure)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        make_grad_fn(model, None, (x, y))

    # a plain optax optimiser in nnx.Optimizer holds a whole LowRank moment in one Variable
    plain = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    with pytest.raises(TypeError, match="DLRTOptimizer"):
        train_step(model, plain, _mse, (x, y))
    with pytest.raises(TypeError, match="DLRTOptimizer"):
        fit_capacity(model, plain)
    # ... and in DLRTOptimizer it trains the (U, S, V) entries as ordinary arrays
    sgd = DLRTOptimizer(model, optax.sgd(1e-3))
    assert float(train_step(model, sgd, _mse, (x, y))) > 0


@pytest.mark.parametrize("name", ["bug_adaptive", "parallel_bug"])
def test_plain_nnx_optimizer_holds_the_dlrt_state_like_dlrt_optimizer(name):
    x, y = _data()
    plain_model, alias_model = _MLP(nnx.Rngs(1), capacity=8), _MLP(nnx.Rngs(1), capacity=8)
    plain = nnx.Optimizer(plain_model, INTEGRATORS[name](), wrt=nnx.Param)
    alias = DLRTOptimizer(alias_model, INTEGRATORS[name]())
    for _ in range(2):  # Optimizer.update: the second update used to break a plain one's state
        for model, opt in ((plain_model, plain), (alias_model, alias)):
            grads = nnx.grad(_mse)(model, (x, y))
            opt.update(model, grads, grad_fn=make_grad_fn(model, _mse, (x, y)))
    step = nnx.jit(functools.partial(train_step, loss_fn=_mse))
    losses = [float(step(plain_model, plain, batch=(x, y))) for _ in range(2)]
    for _ in range(2):
        step(alias_model, alias, batch=(x, y))
    policy = dlrt_jax.CapacityPolicy(every=1, headroom=1.0, min_free=2, multiple=2)
    assert apply_capacity_policy(policy, 1, plain_model, plain)
    assert apply_capacity_policy(policy, 1, alias_model, alias)
    assert plain_model.l1.capacity < 8
    fit_capacity(plain_model, plain, headroom=4.0, multiple=4, max_capacity=8)
    fit_capacity(alias_model, alias, headroom=4.0, multiple=4, max_capacity=8)
    assert plain_model.l1.capacity == 8
    for _ in range(2):
        losses.append(float(step(plain_model, plain, batch=(x, y))))
        step(alias_model, alias, batch=(x, y))
    assert losses[-1] < losses[0], losses
    assert int(plain.step[...]) == int(alias.step[...]) == 6
    state = nnx.as_pure(plain.opt_state)
    assert isinstance(state.factors, tuple) and len(state.factors) == 2
    for fs, layer in zip(state.factors, (plain_model.l1, plain_model.l2), strict=True):
        c = layer.capacity
        assert fs.S[0].mu.shape == (c, c) and fs.K[0].nu.shape == (layer.factor.shape[0], c)
    # the same trajectory as DLRTOptimizer
    chex.assert_trees_all_close(
        nnx.as_pure(nnx.state(plain_model)), nnx.as_pure(nnx.state(alias_model)), atol=1e-5
    )
    chex.assert_trees_all_close(state, nnx.as_pure(alias.opt_state), atol=1e-5)


# ---- conversion safety and per-layer settings (issue 17) -----------------------------------------


def _stack(rngs):
    return nnx.Sequential(
        nnx.Linear(8, 16, rngs=rngs), nnx.relu, nnx.Linear(16, 12, rngs=rngs), nnx.relu,
        nnx.Linear(12, 4, rngs=rngs),
    )  # fmt: skip


def test_to_low_rank_never_touches_adapters_or_frozen_layers():
    """issue 17, problem 1: to_adapters then to_low_rank unfroze and truncated the base layers."""
    from dlrt_jax.adapters import FrozenParam, to_adapters

    model, x = _stack(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (5, 8))
    adapted = to_adapters(model, filter="layers/0", rank=2, freeze=False)
    lora = adapted.layers[0].lora
    lora[...] = lora[...].replace(S=jnp.diag(jnp.arange(1.0, 1.0 + lora.capacity)))  # trained
    before = adapted(x)
    with pytest.warns(UserWarning, match="cannot train 'layers/2'"):  # full rank: exact
        low, summary = to_low_rank(adapted, rank={"2": 12, "4": 4}, report=True)
    np.testing.assert_allclose(low(x), before, atol=1e-5)  # was changed by ~80 %
    assert type(low.layers[0].base) is nnx.Linear
    assert type(low.layers[0].base.kernel) is FrozenParam  # still frozen
    assert [r.path for r in summary.converted] == ["layers/2", "layers/4"]
    notes = {r.path: r.note for r in summary.skipped}
    assert notes.keys() == {"layers/0/base", "layers/0"}
    assert "inside the adapter at 'layers/0'" in notes["layers/0/base"]
    assert "an adapter" in notes["layers/0"]
    # frozen layers outside adapters are skipped too; with nothing left, the error lists them
    frozen = to_adapters(model, filter="layers/0", rank=2)  # freeze=True
    with pytest.raises(ValueError, match=r"(?s)matched no convertible layer.*layers/2 .*frozen "
                       r"\(its kernel is a FrozenParam, not an nnx.Param\)"):  # fmt: skip
        to_low_rank(frozen, rank=2)
    with pytest.raises(ValueError, match="matched no convertible layer"):
        to_low_rank(frozen, filter=FrozenParam, rank=2)  # even when asked for by type


def test_to_low_rank_per_layer_rank_and_capacity_by_path_pattern():
    """issue 17, problem 6: rank and capacity could not be set per layer."""
    model = _Net(nnx.Rngs(0))
    low, summary = to_low_rank(
        model,
        filter=nnx.Linear,
        rank={"block/fc2": 1, "fc.": 2, "head": 3},  # the first matching pattern wins
        capacity={"fc2": 2},
        report=True,
    )
    got = {r.path: (r.rank, r.capacity) for r in summary.converted}
    assert got == {"fc1": (2, 3), "block/fc2": (1, 2), "head": (3, 3)}
    assert (int(low.block.fc2.rank), low.block.fc2.capacity) == (1, 2)
    # layers no pattern matches get the default: `tol` with a rank mapping, else the capacity
    low = to_low_rank(model, filter=nnx.Linear, rank={"head": 1}, tol=0.0)
    assert int(low.head.rank) == 1 and int(low.fc1.rank) == 6
    low = to_low_rank(model, filter=nnx.Linear, rank={"head": 1}, capacity={"head": 2})
    assert int(low.fc1.rank) == low.fc1.capacity == 3 and low.head.capacity == 2
    # a pattern matches whole path elements, and one that matches nothing raises
    with pytest.raises(ValueError, match=r"`rank` pattern\(s\) \['c1'\] match no converted"):
        to_low_rank(model, filter=nnx.Linear, rank={"c1": 2, "fc1": 2})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        to_low_rank(model, capacity={"fc[": 2})
    with pytest.raises(TypeError, match=r"path patterns \(str\) as keys"):
        to_low_rank(model, rank={1: 2})
    with pytest.raises(ValueError, match=r"'head'.*rank"):  # values checked per layer, with path
        to_low_rank(model, filter=nnx.Linear, rank={"head": 5})


def test_to_low_rank_warns_for_layers_the_rank_adaptive_integrators_cannot_train():
    """issue 17, problem 6: such a layer was flagged at INFO level only."""
    model = _Net(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"cannot train 'fc1' \(6 x 6: capacity 4 > 3\)") as w:
        to_low_rank(model, filter="fc1|head", rank=2, capacity={"fc1": 4})
    assert "'head'" not in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_low_rank(model, filter="fc1|head", rank=2, capacity=2)


# ---- the NNX path end to end: to_dense, export, checkpoints (issue 17, problem 5) ----------------


def test_to_dense_turns_low_rank_layers_back_into_nnx_linear_and_conv():
    model = to_low_rank(_Net(nnx.Rngs(0)), filter="conv|fc1|head", rank=2)
    model.block.fc2 = LowRankLinear(6, 6, rank=2, bias_init=_normal_init(), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 3))
    dense = to_dense(model)
    assert _kinds(dense) == {
        "conv": "Conv", "fc1": "Linear", "fc2": "Linear", "head": "Linear", "norm": "LayerNorm"
    }  # fmt: skip
    assert _kinds(model)["fc1"] == "LowRankLinear"  # not modified
    np.testing.assert_allclose(dense(x), model(x), atol=1e-5)
    W = np.asarray(model.block.fc2.factor.to_dense())
    np.testing.assert_allclose(dense.block.fc2.kernel[...], W.T, atol=1e-6)
    np.testing.assert_allclose(dense.block.fc2.bias[...], model.block.fc2.bias[...])
    assert dense.conv.kernel.shape == (3, 3, 3, 6)
    assert nnx.state(dense, LowRankParam) == nnx.State({})


def _exportable(rngs, capacity=3):
    return nnx.Sequential(
        LowRankLinear(6, 8, rank=capacity, capacity=capacity, bias_init=_normal_init(), rngs=rngs),
        nnx.LayerNorm(8, rngs=rngs),
        LowRankLinear(8, 8, rank=capacity, capacity=capacity, rngs=rngs),
        nnx.Linear(8, 2, rngs=rngs),
    )


def test_export_low_rank_writes_the_active_rank_and_loads_into_a_fresh_model(tmp_path):
    from safetensors.numpy import load_file

    from dlrt_jax.nnx import export_low_rank, load_low_rank

    model = _exportable(nnx.Rngs(0))
    k = model.layers[0].kernel
    k[...] = k[...].replace(rank=2)  # as after rank-adaptive training: rank 2 of capacity 3
    x = jax.random.normal(jax.random.key(1), (4, 6))
    description = export_low_rank(model, tmp_path)
    assert description["factors"]["layers/0/kernel"] == {
        "shape": [8, 6], "rank": 2, "capacity": 3, "dtype": "float32"
    }  # fmt: skip
    tensors = load_file(tmp_path / "low_rank.safetensors")
    assert tensors["layers/0/kernel.U"].shape == (8, 2) and tensors["layers/0/kernel.S"].shape == (
        2,
        2,
    )
    assert tensors["layers/0/kernel.V"].shape == (6, 2) and "layers/3/kernel" in tensors
    assert set(description["arrays"]) == {
        "layers/0/bias", "layers/1/bias", "layers/1/scale", "layers/2/bias", "layers/3/bias",
        "layers/3/kernel",
    }  # fmt: skip
    fresh = _exportable(nnx.Rngs(5), capacity=4)  # other weights, a larger capacity
    assert load_low_rank(fresh, tmp_path) is fresh
    np.testing.assert_allclose(fresh(x), model(x), atol=1e-5)
    assert int(fresh.layers[0].rank) == 2 and fresh.layers[0].capacity == 4
    small = _exportable(nnx.Rngs(5), capacity=1)  # the capacity grows to the exported rank
    np.testing.assert_allclose(load_low_rank(small, tmp_path)(x), model(x), atol=1e-5)
    other = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"(?s)does not match.*layers/0/kernel: a low-rank factor"):
        load_low_rank(other, tmp_path)


def test_export_low_rank_names_the_install_line_without_safetensors(tmp_path, monkeypatch):
    import sys

    from dlrt_jax.nnx import export_low_rank

    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r'pip install "dlrt-jax\[peft\]"'):
        export_low_rank(_exportable(nnx.Rngs(0)), tmp_path)


def test_checkpoint_restores_into_a_fresh_model_across_a_capacity_change(tmp_path):
    from dlrt_jax.nnx import restore_checkpoint, save_checkpoint

    def build():
        model = _MLP(nnx.Rngs(0), rank=2, capacity=8)
        return model, nnx.Optimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.2), wrt=nnx.Param)

    x = jax.random.normal(jax.random.key(1), (16, 16))
    batch = (x, jnp.sin(x[:, :4]))
    loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
    policy = dlrt_jax.CapacityPolicy(every=2, headroom=1.0, min_free=2, multiple=2)
    model, optimizer = build()
    for step in range(1, 5):
        train_step(model, optimizer, loss_fn, batch)
        apply_capacity_policy(policy, step, model, optimizer)
    assert model.l1.capacity < 8  # the policy changed the capacities
    save_checkpoint(tmp_path, 4, model, optimizer, metadata={"tau": 0.2})
    fresh, fresh_optimizer = build()
    assert restore_checkpoint(tmp_path, fresh, fresh_optimizer, metadata={"tau": 0.2}) == 4
    assert (fresh.l1.capacity, fresh.l2.capacity) == (model.l1.capacity, model.l2.capacity)
    chex.assert_trees_all_equal(nnx.as_pure(nnx.state(fresh)), nnx.as_pure(nnx.state(model)))
    chex.assert_trees_all_equal(
        nnx.as_pure(nnx.state(fresh_optimizer)), nnx.as_pure(nnx.state(optimizer))
    )
    # training continues identically from the restored pair
    np.testing.assert_array_equal(
        train_step(fresh, fresh_optimizer, loss_fn, batch),
        train_step(model, optimizer, loss_fn, batch),
    )
    chex.assert_trees_all_equal(nnx.as_pure(nnx.state(fresh)), nnx.as_pure(nnx.state(model)))
    with pytest.raises(ValueError, match=r"metadata\['tau'\]"):
        restore_checkpoint(tmp_path, *build(), metadata={"tau": 0.3})


def test_register_converter_adds_a_layer_type_and_a_subclass_may_have_its_own():
    """issue 17: transformer wrote into nnx's private _CONVERTERS; the registry is public now."""
    from dlrt_jax.nnx import ConvertedLayer, register_converter

    class Scaled(nnx.Linear):  # a subclass: nnx.Linear's converter refuses it
        pass

    model = nnx.Sequential(Scaled(6, 6, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="subclass Scaled"):
        to_low_rank(model, rank=2)
    requests = []

    def convert(layer, request):
        requests.append(request)
        new = LowRankLinear(6, 6, rank=request.rank, rngs=nnx.Rngs(1))
        return ConvertedLayer(new, (6, 6), request.rank, new.capacity, None)

    assert register_converter(Scaled, convert) is convert
    low, summary = to_low_rank(model, rank={"0": 2}, report=True)
    assert type(low.layers[0]) is LowRankLinear and int(low.layers[0].rank) == 2
    assert requests[0].where == "to_low_rank at 'layers/0'" and requests[0].init == "svd"
    assert summary.converted[0].rank == 2
    with pytest.raises(TypeError, match="must be a class"):
        register_converter("Scaled", convert)
    with pytest.raises(TypeError, match="must be callable"):
        register_converter(Scaled, None)
