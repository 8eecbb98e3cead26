"""The optax transforms: jit stability, inner optimisers, composition, capacity, bad input, NaNs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank
from dlrt_jax._integrators import transport

N, M, CAP = 16, 12, 6


def _lowrank_target(key, rank):
    k1, k2 = jax.random.split(key)
    U = jnp.linalg.qr(jax.random.normal(k1, (N, rank)))[0]
    V = jnp.linalg.qr(jax.random.normal(k2, (M, rank)))[0]
    return U @ jnp.diag(jnp.linspace(3.0, 1.0, rank)) @ V.T


def _params(rank=3, key=0):
    return {
        "w": LowRank.random(jax.random.key(key), (N, M), rank=rank, capacity=CAP),
        "b": jnp.zeros((N,)),
    }


def _loss(p, A):
    bias = p["b"][:, None] if "b" in p else 0.0
    return 0.5 * jnp.sum((p["w"].to_dense() + bias - A) ** 2)


def _make_step(tx, counter=None):
    def step(params, state, A):
        if counter is not None:
            counter.append(1)  # runs once per trace
        grad_fn = jax.grad(lambda p: _loss(p, A))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: dlrt_jax.bug(1.0, tau=0.02, min_rank=1),
        lambda: dlrt_jax.parallel_bug(0.5, tau=0.02, min_rank=1),
    ],
    ids=["bug", "parallel_bug"],
)
def test_adaptive_ranks_move_up_and_down_under_one_trace(make_tx):
    targets = [_lowrank_target(jax.random.key(1), 2), _lowrank_target(jax.random.key(2), 5)]
    params = {"w": _params(rank=3)["w"]}
    tx = make_tx()
    state = tx.init(params)
    traces = []
    step = _make_step(tx, traces)
    ranks = []
    for i in range(60):
        params, state = step(params, state, targets[(i // 15) % 2])
        ranks.append(int(params["w"].rank))
    assert len(traces) == 1
    assert 2 in ranks and 5 in ranks
    assert ranks[14] == 2 and ranks[29] == 5 and ranks[44] == 2 and ranks[59] == 5, ranks
    assert int(state.count) == 60 and int(state.num_skipped) == 0


def test_nan_or_inf_gradient_skips_the_step_and_counts_it():
    params = _params()
    tx = dlrt_jax.bug(0.1, tau=0.1)
    state = tx.init(params)
    A = _lowrank_target(jax.random.key(1), 2)
    grad_fn = jax.grad(lambda p: _loss(p, A))
    grads = grad_fn(params)
    bad = jax.tree_util.tree_map(lambda g: g, grads)
    bad["w"] = bad["w"]._unchecked(
        bad["w"].U.at[0, 0].set(jnp.nan), bad["w"].S, bad["w"].V, bad["w"].rank
    )

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    new, state1 = step(params, state, bad)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert int(state1.num_skipped) == 1 and int(state1.count) == 1

    # an Inf appearing only in the second (S-step) evaluation is caught too
    def inf_grad_fn(p):
        g = grad_fn(p)
        w = g["w"]
        g["w"] = w._unchecked(w.U, w.S.at[0, 0].set(jnp.inf), w.V, w.rank)
        return g

    updates, state2 = tx.update(grads, state, params, grad_fn=inf_grad_fn)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates))
    assert int(state2.num_skipped) == 1
    # and a good step afterwards works
    new, state3 = step(params, state1, grads)
    assert int(state3.num_skipped) == 1 and float(_loss(new, A)) < float(_loss(params, A))


@pytest.mark.parametrize(
    "inner",
    [optax.sgd(0.05, momentum=0.9), optax.adam(0.05), optax.rmsprop(0.01)],
    ids=["momentum", "adam", "rmsprop"],
)
@pytest.mark.parametrize(
    "make_tx",
    [
        lambda o: dlrt_jax.bug(o, tau=0.05),
        lambda o: dlrt_jax.bug(o),
        lambda o: dlrt_jax.parallel_bug(o, tau=0.05),
        lambda o: dlrt_jax.ksl(o),
    ],
    ids=["bug_adaptive", "bug", "parallel_bug", "ksl"],
)
def test_inner_optimisers_train(inner, make_tx):
    A = _lowrank_target(jax.random.key(3), 3)
    params = _params(rank=4)
    tx = make_tx(inner)
    state = tx.init(params)
    step = _make_step(tx)
    l0 = float(_loss(params, A))
    for _ in range(150):
        params, state = step(params, state, A)
    assert float(_loss(params, A)) < 0.1 * l0
    U = np.asarray(params["w"].U)
    np.testing.assert_allclose(U.T @ U, np.eye(CAP), atol=1e-4)


def test_transport_maps_first_moments_linearly_and_second_moments_quadratically():
    state = optax.adam(1e-3).init(jnp.zeros((3, 3)))
    mu = jnp.arange(9.0).reshape(3, 3)
    state = (state[0]._replace(mu=mu, nu=mu**2, count=jnp.array(7)), state[1])
    left = jnp.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.6]])
    right = jnp.array([[0.8, 0.6, 0.0], [-0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    out = transport(state, (3, 3), left=left, right=right)
    np.testing.assert_allclose(out[0].mu, left @ mu @ right.T, atol=1e-6)
    moved = (left**2) @ (mu**2) @ (right**2).T
    np.testing.assert_allclose(out[0].nu, moved, rtol=1e-6)
    assert int(out[0].count) == 7
    assert np.all(np.asarray(out[0].nu) >= 0)
    # with the prior, row 2 of `left` (0.36 of an old direction, 0.64 new) gets 0.64 x the
    # geometric mean of the covered, non-zero moments (weighted by their coverage)
    out = transport(state, (3, 3), left=left, right=right, prior=True)
    np.testing.assert_allclose(out[0].mu, left @ mu @ right.T, atol=1e-6)
    moved = np.asarray(moved, np.float64)
    covered = np.outer([1.0, 1.0, 0.36], [1.0, 1.0, 1.0])
    w = np.where(moved > 0, covered, 0.0)
    typical = np.exp(np.sum(w * np.log(np.where(moved > 0, moved, 1.0))) / np.sum(w))
    np.testing.assert_allclose(out[0].nu, moved + (1 - covered) * typical, rtol=1e-5)


def test_transport_gives_new_directions_the_typical_second_moment():
    """A direction new to the basis (a zero row of the map) starts with the typical (geometric
    mean) second moment of the old entries, so Adam's first step there is in proportion to its
    gradient, not lr-sized."""
    tx = optax.adam(1.0)
    old = jnp.array([[4.0, 2.0], [1.0, 3.0], [0.0, 0.0]])  # row 2 inactive
    _, state = tx.update(old, tx.init(old))
    embed = jnp.diag(jnp.array([1.0, 1.0, 0.0]))  # keeps 2 old directions, row 2 is new
    moved = transport(state, (3, 2), left=embed, prior=True)
    nu, nu_old = np.asarray(moved[0].nu), np.asarray(state[0].nu)
    np.testing.assert_allclose(nu[:2], nu_old[:2], rtol=1e-6)
    typical = np.exp(np.mean(np.log(nu_old[:2].astype(np.float64))))
    np.testing.assert_allclose(nu[2], np.full(2, typical), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(moved[0].mu)[2], 0.0)
    small = jnp.array([[4.0, 2.0], [1.0, 3.0], [0.01, -0.01]])
    step, _ = tx.update(small, moved)
    # zero moments there would give a step of 0.74, about the learning rate
    assert float(jnp.max(jnp.abs(step[2]))) < 0.05


def test_momentum_is_carried_across_basis_changes():
    """With momentum, a second step differs from a momentum-free one (state not reset)."""
    A = _lowrank_target(jax.random.key(4), 3)
    params = _params()
    outs = []
    for inner in (optax.sgd(0.1, momentum=0.9), optax.sgd(0.1)):
        tx = dlrt_jax.bug(inner, tau=0.05)
        state = tx.init(params)
        p = params
        step = _make_step(tx)
        for _ in range(2):
            p, state = step(p, state, A)
        outs.append(p["w"].to_dense())
        if inner is not None:
            fs = state.factors[0]
    assert float(jnp.linalg.norm(outs[0] - outs[1])) > 1e-3
    assert fs.K is not None


def test_composes_with_chain_and_inject_hyperparams():
    A = _lowrank_target(jax.random.key(5), 3)
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(dlrt_jax.bug)(optimizer=optax.sgd(0.5), tau=0.05),
    )
    state = tx.init(params)
    step = _make_step(tx)
    l0 = float(_loss(params, A))
    for _ in range(30):
        params, state = step(params, state, A)
    assert float(_loss(params, A)) < 0.5 * l0
    # a learning-rate schedule injected into the inner optimiser: lr 0 leaves the factors alone
    tx0 = dlrt_jax.bug(optax.inject_hyperparams(optax.sgd)(learning_rate=0.0))
    state0 = tx0.init(params)
    p1, _ = _make_step(tx0)(params, state0, A)
    np.testing.assert_allclose(p1["w"].to_dense(), params["w"].to_dense(), atol=1e-5)
    # tau injected as a traced hyperparameter
    txi = optax.inject_hyperparams(dlrt_jax.parallel_bug)(optimizer=0.5, tau=0.05)
    si = txi.init(params)
    pi, si = _make_step(txi)(params, si, A)
    assert np.isclose(float(si.hyperparams["tau"]), 0.05)


def test_other_leaves_take_one_step_of_their_optimiser_with_the_first_gradient():
    A = _lowrank_target(jax.random.key(6), 3)
    params = _params()
    tx = dlrt_jax.bug(0.1, tau=0.05, other_optimizer=optax.sgd(0.3))
    state = tx.init(params)
    grads = jax.grad(lambda p: _loss(p, A))(params)
    grad_fn = jax.grad(lambda p: _loss(p, A))
    updates, _ = tx.update(grads, state, params, grad_fn=grad_fn)
    np.testing.assert_allclose(updates["b"], -0.3 * grads["b"], rtol=1e-6)


def test_capacity_shrink_and_grow_keeps_w_and_state_and_bounds_recompiles():
    A = _lowrank_target(jax.random.key(7), 2)
    params = _params(rank=5)
    tx = dlrt_jax.bug(optax.adam(0.02), tau=0.1)
    state = tx.init(params)
    traces = []
    step = _make_step(tx, traces)
    for _ in range(40):
        params, state = step(params, state, A)
    r = int(params["w"].rank)
    assert r <= 3
    W = params["w"].to_dense()
    small, small_state = dlrt_jax.fit_capacity(params, state, headroom=1.5, multiple=1)
    c = small["w"].capacity
    assert c == min(-(-3 * r // 2), 6) and c < CAP
    np.testing.assert_allclose(small["w"].to_dense(), W, atol=1e-6)
    assert small_state.factors[0].K[0].mu.shape == (N, c)
    assert small_state.factors[0].L[0].nu.shape == (M, c)
    assert small_state.factors[0].S[0].nu.shape == (c, c)
    U = np.asarray(small["w"].U)
    np.testing.assert_allclose(U.T @ U, np.eye(c), atol=1e-5)
    for _ in range(5):
        small, small_state = step(small, small_state, A)
    grown, grown_state = dlrt_jax.resize_capacity(small, small_state, CAP)
    np.testing.assert_allclose(grown["w"].to_dense(), small["w"].to_dense(), atol=1e-6)
    U = np.asarray(grown["w"].U)
    np.testing.assert_allclose(U.T @ U, np.eye(CAP), atol=1e-5)
    l_before = float(_loss(grown, A))
    for _ in range(5):
        grown, grown_state = step(grown, grown_state, A)
    assert len(traces) == 2  # capacity CAP (compiled once, reused after growing) and c
    assert float(_loss(grown, A)) < l_before


def test_resize_capacity_validates():
    params = _params(rank=3)
    with pytest.raises(ValueError, match="rank=3"):
        dlrt_jax.resize_capacity(params, None, 2)
    with pytest.raises(ValueError, match="no LowRank"):
        dlrt_jax.resize_capacity({"b": jnp.zeros(3)}, None, 2)


# ---- bad input ----------------------------------------------------------------------------------


def test_hyperparameters_are_validated_at_construction():
    with pytest.raises(ValueError, match="tau"):
        dlrt_jax.bug(0.1, tau=-0.1)
    with pytest.raises(ValueError, match="tau"):
        dlrt_jax.parallel_bug(0.1, tau=float("nan"))
    with pytest.raises(ValueError, match="min_rank"):
        dlrt_jax.bug(0.1, tau=0.1, min_rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        dlrt_jax.bug(0.1, tau=0.1, min_rank=3, max_rank=2)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        dlrt_jax.bug(-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        dlrt_jax.bug("adam")


@pytest.mark.parametrize("make", [dlrt_jax.bug, dlrt_jax.parallel_bug])
def test_relative_tau_of_one_or_more_is_rejected_absolute_is_not(make):
    for tau in (1.0, 2.5, np.float32(1.0)):
        with pytest.raises(ValueError, match=r"relative `tau` must be in \[0, 1\).*absolute=True"):
            make(0.1, tau=tau)
    make(0.1, tau=0.99)  # just below 1: a valid relative tolerance
    # an absolute tolerance is a threshold on the tail norm: 1.0 and more are meaningful
    params = _params(rank=3)
    tx = make(0.1, tau=1.0, absolute=True)
    tx.init(params)


def test_factor_constraints_checked_at_init():
    wide = {"w": LowRank.random(jax.random.key(0), (N, M), rank=2, capacity=8)}
    with pytest.raises(ValueError, match=r"capacity <= floor\(min\(n, m\) / 2\) = 6"):
        dlrt_jax.bug(0.1, tau=0.1).init(wide)
    with pytest.raises(ValueError, match="capacity"):
        dlrt_jax.parallel_bug(0.1).init(wide)
    dlrt_jax.bug(0.1).init(wide)  # fixed rank: any capacity
    dlrt_jax.ksl(0.1).init(wide)
    small = {"w": LowRank.random(jax.random.key(0), (N, M), rank=1, capacity=2)}
    with pytest.raises(ValueError, match="min_rank"):
        dlrt_jax.bug(0.1, tau=0.1, min_rank=3).init(small)
    with pytest.raises(ValueError, match="no LowRank"):
        dlrt_jax.bug(0.1).init({"b": jnp.zeros(3)})


def test_update_arguments_are_validated():
    A = _lowrank_target(jax.random.key(8), 2)
    params = _params()
    grad_fn = jax.grad(lambda p: _loss(p, A))
    grads = grad_fn(params)
    for tx in (dlrt_jax.bug(0.1), dlrt_jax.bug(0.1, tau=0.1), dlrt_jax.ksl(0.1)):
        state = tx.init(params)
        with pytest.raises(TypeError, match="grad_fn"):
            tx.update(grads, state, params)
    tx = dlrt_jax.parallel_bug(0.1)
    state = tx.init(params)
    plain = tx.update(grads, state, params)  # no extra argument needed
    # optax's ExtraArgs convention: arguments for other members of a chain are ignored
    extra = tx.update(grads, state, params, value=1.0, unused="x")
    chex.assert_trees_all_equal(plain, extra)
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="does not match the params tree"):
        tx.update({"w": grads["w"]}, state, params)
    bad = dict(grads, b=jnp.zeros((N + 1,)))
    with pytest.raises(ValueError, match=r"gradient of params\['b'\] has shape"):
        tx.update(bad, state, params)
    with pytest.raises(ValueError, match=r"params\['w'\] is a LowRank but its gradient is not"):
        tx.update(dict(grads, w=jnp.zeros((N, M))), state, params)
    txb = dlrt_jax.bug(0.1)
    with pytest.raises(ValueError, match="grad_fn: the gradient tree"):
        txb.update(grads, txb.init(params), params, grad_fn=lambda p: {"w": grads["w"]})


def test_state_holds_one_factor_state_per_lowrank_in_leaf_order_and_rejects_a_mismatch():
    A = _lowrank_target(jax.random.key(8), 2)
    params = {"v": LowRank.random(jax.random.key(3), (N, M), rank=2, capacity=CAP), **_params()}
    grads = jax.grad(lambda p: _loss(p, A))(params)
    tx = dlrt_jax.parallel_bug(optax.adam(0.1), tau=0.1)
    state = tx.init(params)
    leaves = jax.tree.leaves(params, is_leaf=dlrt_jax.is_lowrank)
    order = [x for x in leaves if isinstance(x, LowRank)]
    assert isinstance(state.factors, tuple) and len(state.factors) == 2
    for fs, x in zip(state.factors, order, strict=True):
        chex.assert_shape(fs.K[0].mu, (x.shape[0], x.capacity))
    assert [int(x.rank) for x in order] == [2, 3]  # "v" before "w"
    _, new_state = tx.update(grads, state, params)
    assert isinstance(new_state.factors, tuple) and len(new_state.factors) == 2
    with pytest.raises(ValueError, match="holds 1 per-factor states, but the params have 2"):
        tx.update(grads, state._replace(factors=state.factors[:1]), params)
    as_tree = {"v": state.factors[0], "w": state.factors[1]}  # the layout before the tuple
    with pytest.raises(ValueError, match="in a tuple .* got a dict"):
        tx.update(grads, state._replace(factors=as_tree), params)
    nested = state._replace(factors=(state.factors[0], dict(state.factors[1]._asdict())))
    with pytest.raises(ValueError, match=r"params\['w'\] \(factor 1\) is a dict, not a FactorSt"):
        tx.update(grads, nested, params)
    with pytest.raises(ValueError, match="do not match the 2 LowRank"):
        dlrt_jax.resize_capacity(params, state._replace(factors=state.factors[:1]), 4)


def test_extra_arguments_of_optax_chains_pass_through():
    """``value=`` (reduce_on_plateau, line searches) reaches a chain that contains DLRT."""
    A = _lowrank_target(jax.random.key(9), 2)
    params = _params()
    loss = lambda p: _loss(p, A)
    for dlrt in (dlrt_jax.parallel_bug(0.1, tau=0.1), dlrt_jax.bug(0.1, tau=0.1)):
        tx = optax.chain(
            optax.clip_by_global_norm(1.0), optax.contrib.reduce_on_plateau(patience=2), dlrt
        )
        state = tx.init(params)
        p = params
        for _ in range(3):
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = tx.update(grads, state, p, value=value, grad_fn=jax.grad(loss))
            p = optax.apply_updates(p, updates)
        assert float(loss(p)) < float(loss(params))


# ---- precision -----------------------------------------------------------------------------------


def _dots(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return [line for line in text.splitlines() if "dot_general" in line]


@pytest.mark.parametrize(
    "make",
    [
        lambda: dlrt_jax.bug(optax.adam(0.1), tau=0.1),
        lambda: dlrt_jax.bug(0.1),
        lambda: dlrt_jax.parallel_bug(0.1, tau=0.1),
        lambda: dlrt_jax.ksl(0.1),
    ],
    ids=["bug", "bug_fixed", "parallel_bug", "ksl"],
)
def test_every_product_of_a_step_is_highest_precision_and_the_model_keeps_its_own(make):
    """The lowered program carries the precision of each dot, so this holds on every backend
    (on GPUs the default float32 product is TF32, too coarse for basis arithmetic)."""
    params = {"w": LowRank.random(jax.random.key(0), (N, M), rank=3, capacity=CAP)}
    tx = make()
    state = tx.init(params)

    def no_product_grads(p):  # stands in for a model, without products of its own
        w = p["w"]
        return {"w": w._unchecked(0.1 * w.U, 0.1 * w.S, 0.1 * w.V, jnp.zeros(()))}

    def step(p, s, grad_fn):
        return tx.update(grad_fn(p), s, p, grad_fn=grad_fn)

    dots = _dots(lambda p, s: step(p, s, no_product_grads), params, state)
    assert len(dots) >= 2
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots
    # a model's own products (to_dense in the loss) are left at the default precision
    model = jax.grad(lambda p: jnp.sum(p["w"].to_dense() ** 2))
    dots = _dots(lambda p, s: step(p, s, model), params, state)
    assert any("HIGHEST" not in d for d in dots)


# ---- faults: recorded in the state, named by dlrt_jax.check ------------------------------------


def test_a_nan_factor_is_named_at_init_and_recorded_by_a_jitted_step():
    params = _params()
    bad = dict(
        params,
        w=params["w"]._unchecked(
            params["w"].U.at[0, 0].set(jnp.nan), params["w"].S, params["w"].V, params["w"].rank
        ),
    )
    tx = dlrt_jax.parallel_bug(0.1, tau=0.1)
    with pytest.raises(ValueError, match=r"params\['w'\] holds NaN or Inf"):
        tx.init(bad)
    state = jax.jit(tx.init)(bad)  # traced: recorded, not raised
    assert int(state.faults[0]) == dlrt_jax._transforms.FAULT_NONFINITE
    A = _lowrank_target(jax.random.key(1), 2)
    p, state = _make_step(tx)(bad, tx.init(params), A)
    assert int(state.num_skipped) == 1
    assert int(state.faults[0]) == dlrt_jax._transforms.FAULT_NONFINITE
    np.testing.assert_array_equal(np.asarray(p["w"].S), np.asarray(bad["w"].S))  # untouched
    with pytest.raises(ValueError, match=r"params\['w'\] holds NaN or Inf") as info:
        dlrt_jax.check(state, p)
    assert "optax.chain" not in str(info.value)  # not mistaken for a chain-order problem


def test_a_scaled_update_names_the_bases_and_not_a_whole_rank():
    """A rank that is still whole is not reported as a bad rank (the bases are the problem)."""
    params = {"w": _params(rank=CAP)["w"]}  # full rank: 0.5 * (r - r) keeps the rank whole
    A = _lowrank_target(jax.random.key(1), CAP)
    tx = optax.chain(dlrt_jax.bug(0.5), optax.scale(0.5))
    grad_fn = jax.grad(lambda p: _loss(p, A))
    state = tx.init(params)
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    p = optax.apply_updates(params, updates)
    with pytest.raises(ValueError, match="off unit norm") as info:
        tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
    assert "whole number" not in str(info.value)
