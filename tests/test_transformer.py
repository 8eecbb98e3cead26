"""Low-rank nnx.LinearGeneral / nnx.Einsum and the conversion of a Flax transformer block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dlrt_jax
from dlrt_jax.nnx import DLRTOptimizer, to_low_rank, train_step
from dlrt_jax.transformer import (
    LowRankEinsum,
    LowRankLinearGeneral,
    NotConvertible,
    matricise,
)

D, HEADS, HEAD_DIM, HIDDEN = 16, 2, 8, 32


class Block(nnx.Module):
    """A pre-norm transformer block with an embedding and an output head (tiny dims)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, D, rngs=rngs)
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            HEADS, D, qkv_features=HEADS * HEAD_DIM, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, D, rngs=rngs)
        self.head = nnx.Linear(D, 11, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
        return self.head(x)


def _loss(model, batch):
    tokens, targets = batch
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _batch(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (4, 6), 0, 11)
    return tokens, jnp.roll(tokens, 1, axis=1)


# ---- layers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_features, out_features, axis, x_shape",
    [
        (D, (HEADS, HEAD_DIM), -1, (3, 5, D)),  # query / key / value
        ((HEADS, HEAD_DIM), D, (-2, -1), (3, 5, HEADS, HEAD_DIM)),  # attention output
        (4, (2, 3), 1, (2, 4, 5)),  # a contracted axis that is not the last one
    ],
)
def test_linear_general_at_full_rank_equals_dense(in_features, out_features, axis, x_shape):
    dense = nnx.LinearGeneral(in_features, out_features, axis=axis, rngs=nnx.Rngs(0))
    dense.bias[...] = jax.random.normal(jax.random.key(1), dense.bias.shape)
    n, m = matricise(dense).shape
    low = LowRankLinearGeneral.from_linear_general(dense, rank=min(n, m), capacity=min(n, m))
    x = jax.random.normal(jax.random.key(2), x_shape)
    chex.assert_trees_all_close(low(x), dense(x), atol=1e-5)
    chex.assert_shape(low.bias[...], dense.bias.shape)


def test_linear_general_gradient_is_the_projected_dense_gradient():
    """Oracle: grad of the factor = (G V, U^T G V, G^T U) with G = dL/dW of the dense matrix."""
    layer = LowRankLinearGeneral(
        (HEADS, HEAD_DIM), 12, axis=(-2, -1), rank=3, capacity=4, rngs=nnx.Rngs(0)
    )
    mat = layer.matricisation
    x = jax.random.normal(jax.random.key(1), (3, 5, HEADS, HEAD_DIM))
    t = jax.random.normal(jax.random.key(2), (3, 5, 12))

    def loss_lowrank(factor):
        return jnp.sum(jnp.sin(mat.apply(factor, x) - t))

    def loss_dense(W):  # the same loss through nnx.LinearGeneral's own dot_general
        kernel = mat.to_kernel(W)
        y = jax.lax.dot_general(x, kernel, (((2, 3), (0, 1)), ((), ())))
        return jnp.sum(jnp.sin(y - t))

    factor = layer.factor
    g = jax.jit(jax.grad(loss_lowrank))(factor)
    U, S, V = factor.masked()
    G = jax.jit(jax.grad(loss_dense))(U @ S @ V.T)
    mask = factor.mask
    chex.assert_trees_all_close(g.U, (G @ V) * mask, atol=1e-4)
    chex.assert_trees_all_close(g.S, U.T @ G @ V, atol=1e-4)
    chex.assert_trees_all_close(g.V, (G.T @ U) * mask, atol=1e-4)
    assert float(jnp.abs(g.U).max()) > 1e-3  # not trivially zero


def test_einsum_matrix_product_converts_and_others_are_refused():
    dense = nnx.Einsum("btd,ndh->btnh", (HEADS, D, HEAD_DIM), (HEADS, HEAD_DIM), rngs=nnx.Rngs(0))
    dense.bias[...] = jax.random.normal(jax.random.key(1), dense.bias.shape)
    low = LowRankEinsum.from_einsum(dense, rank=16, capacity=16)
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    chex.assert_trees_all_close(low(x), dense(x), atol=1e-5)
    chex.assert_trees_all_close(
        low.matricisation.to_kernel(low.matricisation.to_matrix(dense.kernel[...])),
        dense.kernel[...],
    )
    converted = to_low_rank(dense, rank=16, capacity=16)  # through to_low_rank's table
    assert isinstance(converted, LowRankEinsum)
    chex.assert_trees_all_close(converted(x), dense(x), atol=1e-5)
    per_head = nnx.Einsum("bnd,ndh->bnh", (HEADS, D, HEAD_DIM), rngs=nnx.Rngs(0))
    with pytest.raises(NotConvertible, match="batch of matrices"):
        matricise(per_head)
    with pytest.raises(ValueError, match="batch of matrices"):  # names the layer and why
        to_low_rank(per_head, rank=2)
    with pytest.raises(NotConvertible, match="summed"):
        matricise(nnx.Einsum("bd,dk->b", (D, 4), rngs=nnx.Rngs(0)))
    with pytest.raises(NotConvertible, match="batch_axis"):
        matricise(nnx.LinearGeneral(D, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0)))
    with pytest.raises(NotConvertible, match="embedding"):
        matricise(nnx.Embed(4, D, rngs=nnx.Rngs(0)))


# ---- a transformer block -------------------------------------------------------------------------


def test_transformer_block_converts_and_lists_what_it_skips():
    model = Block(nnx.Rngs(0))
    low, summary = to_low_rank(model, rank=4, report=True)
    converted = {r.path: r.layer for r in summary.converted}
    assert converted == {
        "attn/query": "LinearGeneral",
        "attn/key": "LinearGeneral",
        "attn/value": "LinearGeneral",
        "attn/out": "LinearGeneral",
        "fc1": "Linear",
        "fc2": "Linear",
        "head": "Linear",
    }
    skipped = {r.path for r in summary.skipped}
    assert {"embed", "ln1", "ln2"} <= skipped  # listed with a reason, not silently
    assert all(r.note for r in summary.skipped)
    assert isinstance(low.attn.query, LowRankLinearGeneral)
    assert low.attn.out.factor.shape == (D, HEADS * HEAD_DIM)
    tokens, _ = _batch()
    chex.assert_shape(low(tokens), (4, 6, 11))
    full = to_low_rank(model, tol=0.0)  # full rank: the same function
    chex.assert_trees_all_close(full(tokens), model(tokens), atol=1e-4)


@pytest.mark.parametrize(
    "name, make_tx",
    [
        pytest.param(name, make_tx, id=name)
        for name, make_tx in [
            ("bug", lambda: dlrt_jax.bug(optax.adam(1e-2), tau=0.5)),
            ("parallel_bug", lambda: dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.5)),
            ("projector_splitting", lambda: dlrt_jax.projector_splitting(optax.adam(1e-2))),
            ("s_only", lambda: dlrt_jax.s_only(optax.adam(1e-2))),
        ]
    ],
)
def test_transformer_block_trains_with_every_integrator_in_one_trace(name, make_tx):
    model = to_low_rank(Block(nnx.Rngs(0)), filter=nnx.Not("head"), rank=4)
    optimizer = DLRTOptimizer(model, make_tx())
    shapes = [jnp.shape(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    chex.clear_trace_counter()  # the counter is per code location, shared by the parameters

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def step(model, optimizer, batch):
        return train_step(model, optimizer, _loss, batch)

    losses, ranks = [], []
    for seed in range(3):
        losses.append(float(step(model, optimizer, _batch(seed))))
        ranks.append({k: int(v) for k, v in _ranks(model).items()})
    assert np.all(np.isfinite(losses))
    assert [jnp.shape(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))] == shapes
    q = model.attn.query.factor
    chex.assert_trees_all_close(q.U.T @ q.U, jnp.eye(q.capacity), atol=1e-4)
    chex.assert_trees_all_close(q.V.T @ q.V, jnp.eye(q.capacity), atol=1e-4)
    all_ranks = [r for step_ranks in ranks for r in step_ranks.values()]
    if name in ("bug", "parallel_bug"):  # the rank moved, and the step compiled once
        assert set(all_ranks) != {4}
    else:
        assert set(all_ranks) == {4}
    assert float(jax.jit(_loss)(model, _batch(0))) != pytest.approx(losses[0], rel=1e-6)


def _ranks(model):
    return {
        "/".join(map(str, path)): node.rank
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LowRankLinearGeneral | dlrt_jax.nnx.LowRankLinear)
    }


def test_to_dense_turns_the_block_back_into_flax_layers():
    """issue 17, problem 5: nothing turned a trained low-rank model back into Flax layers."""
    from dlrt_jax.nnx import to_dense

    model = Block(nnx.Rngs(0))
    low = to_low_rank(model, rank=3)
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    dense = to_dense(low)
    for name in ("query", "key", "value", "out"):
        assert type(getattr(low.attn, name)) is LowRankLinearGeneral
        assert type(getattr(dense.attn, name)) is nnx.LinearGeneral
    assert type(dense.fc1) is nnx.Linear
    np.testing.assert_allclose(dense(tokens), low(tokens), atol=1e-5)
    einsum = LowRankEinsum("btd,ndh->btnh", (2, 16, 8), (2, 8), rank=3, rngs=nnx.Rngs(2))
    einsum.bias[...] = jax.random.normal(jax.random.key(3), (2, 8))
    x = jax.random.normal(jax.random.key(4), (3, 5, 16))
    back = einsum.as_dense_layer()
    assert type(back) is nnx.Einsum and back.kernel.shape == (2, 16, 8)
    np.testing.assert_allclose(back(x), einsum(x), atol=1e-5)
