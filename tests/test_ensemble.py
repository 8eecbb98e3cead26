"""dlrt_jax.ensemble: E members trained in one vmapped, jitted step equal E separate runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import ensemble

N_OUT, N_IN, CAP = 16, 12, 4
TAUS = [0.02, 0.1, 0.2, 0.3]
LRS = [1e-2, 2e-2, 1e-2, 5e-3]
STEPS = 5
TOL = 1e-5


def init_fn(key):
    k1, k2 = jax.random.split(key)
    return {
        "h": dlrt_jax.LowRank.random(k1, (N_OUT, N_IN), rank=CAP, capacity=CAP),
        "hb": jnp.zeros(N_OUT),
        "o": 0.3 * jax.random.normal(k2, (3, N_OUT)),
    }


def loss_fn(p, batch):
    x, y = batch
    h = jnp.tanh(dlrt_jax.lowrank_apply(p["h"], x) + p["hb"])
    return jnp.mean((h @ p["o"].T - y) ** 2)


def make_tx(h):
    return dlrt_jax.bug(optax.adam(h["lr"]), tau=h["tau"])


def _batch(key, n=32):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, N_IN)), jax.random.normal(ky, (n, 3))


@jax.jit
def _single_step(p, s, batch, lr, tau):
    """One ordinary (un-vmapped) step of one model; lr and tau as arguments: one compilation."""
    tx = dlrt_jax.bug(optax.adam(lr), tau=tau)
    grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
    u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s


def _separate_run(key, lr, tau, batches):
    p = init_fn(key)
    s = dlrt_jax.bug(optax.adam(lr), tau=tau).init(p)
    for b in batches:
        p, s = _single_step(p, s, b, lr, tau)
    return p, s


def _result_diff(a, b):
    """Max difference of W = U S V^T, the active factor parts, and the other leaves."""
    worst = 0.0
    for x, y in zip(
        jax.tree_util.tree_leaves(a, is_leaf=dlrt_jax.is_lowrank),
        jax.tree_util.tree_leaves(b, is_leaf=dlrt_jax.is_lowrank),
        strict=True,
    ):
        pairs = (
            [(x.to_dense(), y.to_dense()), *zip(x.masked(), y.masked(), strict=True)]
            if dlrt_jax.is_lowrank(x)
            else [(x, y)]
        )
        for u, v in pairs:
            worst = max(worst, float(np.max(np.abs(np.asarray(u) - np.asarray(v)))))
    return worst


@pytest.mark.parametrize(
    ("strategy", "per_member_batches"), [("vmap", False), ("vmap", True), ("map", True)]
)
def test_ensemble_step_equals_separate_runs(strategy, per_member_batches):
    e = len(TAUS)
    keys = jax.random.split(jax.random.key(0), e)
    hp = {"tau": jnp.array(TAUS), "lr": jnp.array(LRS)}
    if per_member_batches:
        batches = [
            ensemble.stack_members([_batch(jax.random.key(100 * i + t)) for i in range(e)])
            for t in range(STEPS)
        ]
    else:
        batches = [_batch(jax.random.key(t)) for t in range(STEPS)]
    params, opt_state = ensemble.init_ensemble(init_fn, make_tx, keys, hp)
    assert params["h"].U.shape == (e, N_OUT, CAP) and params["h"].rank.shape == (e,)
    traces = []

    def counting_loss(p, batch):
        traces.append(1)
        return loss_fn(p, batch)

    step = ensemble.make_ensemble_step(
        make_tx, counting_loss, batch_axis=0 if per_member_batches else None, strategy=strategy
    )
    assert step.strategy == strategy
    for b in batches:
        params, opt_state, losses = step(params, opt_state, b, hp)
    assert losses.shape == (e,)
    assert len(traces) == 2, "the ensemble step was traced more than once"

    ranks = [int(r) for r in params["h"].rank]
    assert len(set(ranks)) >= 3, f"members should end at different ranks, got {ranks}"
    for i in range(e):
        member_batches = [ensemble.member(b, i) for b in batches] if per_member_batches else batches
        p, s = _separate_run(keys[i], LRS[i], TAUS[i], member_batches)
        mp, ms = ensemble.member(params, i), ensemble.member(opt_state, i)
        assert int(mp["h"].rank) == int(p["h"].rank) == ranks[i]
        assert _result_diff(mp, p) <= TOL, f"member {i}"
        for a, b in zip(jax.tree_util.tree_leaves(ms), jax.tree_util.tree_leaves(s), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)
        U = np.asarray(mp["h"].U, np.float64)
        np.testing.assert_allclose(U.T @ U, np.eye(CAP), atol=1e-5)


def test_traced_tau_parallel_bug():
    """Members differing in seed and tau with the one-evaluation integrator: own ranks."""
    e = 3
    keys = jax.random.split(jax.random.key(3), e)
    hp = {"tau": jnp.array([0.0, 0.05, 0.5])}
    mk = lambda h: dlrt_jax.parallel_bug(optax.sgd(0.05), tau=h["tau"], min_rank=1)
    params, opt_state = ensemble.init_ensemble(init_fn, mk, keys, hp)
    step = ensemble.make_ensemble_step(mk, loss_fn, strategy="vmap")
    batch = _batch(jax.random.key(9))
    for _ in range(3):
        params, opt_state, _ = step(params, opt_state, batch, hp)
    for i in range(e):
        U = np.asarray(ensemble.member(params, i)["h"].U, np.float64)
        np.testing.assert_allclose(U.T @ U, np.eye(CAP), atol=1e-5)
    r = [int(x) for x in params["h"].rank]
    assert r[0] == CAP and r[2] <= r[1] < CAP, r  # larger tau, smaller rank


def test_without_hparams():
    keys = jax.random.split(jax.random.key(0), 2)
    tx = dlrt_jax.bug(0.1, tau=0.1)
    params, opt_state = ensemble.init_ensemble(init_fn, lambda _: tx, keys)
    step = ensemble.make_ensemble_step(lambda _: tx, loss_fn)
    params2, _, losses = step(params, opt_state, _batch(jax.random.key(1)))
    assert losses.shape == (2,)
    assert not np.allclose(np.asarray(params2["o"][0]), np.asarray(params2["o"][1]))


def test_helpers_and_errors():
    tree = {"a": jnp.zeros((3, 2)), "b": jnp.ones((3,))}
    assert ensemble.ensemble_size(tree) == 3
    assert ensemble.member(tree, -1)["a"].shape == (2,)
    stacked = ensemble.stack_members([ensemble.member(tree, i) for i in range(3)])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, stacked, tree))
    with pytest.raises(IndexError, match="out of range for an ensemble of 3"):
        ensemble.member(tree, 3)
    with pytest.raises(ValueError, match="same leading"):
        ensemble.ensemble_size({"a": jnp.zeros((3, 2)), "b": jnp.ones((2,))})
    with pytest.raises(ValueError, match="at least one member"):
        ensemble.stack_members([])
    with pytest.raises(ValueError, match="another tree structure"):
        ensemble.stack_members([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="`strategy` must be"):
        ensemble.make_ensemble_step(make_tx, loss_fn, strategy="pmap")
    import jaxlib

    old_cpu_jaxlib = jax.default_backend() == "cpu" and jaxlib.__version__.startswith("0.10.")
    assert ensemble.resolve_strategy() == ("map" if old_cpu_jaxlib else "vmap")
    with pytest.raises(ValueError, match="`batch_axis`"):
        ensemble.make_ensemble_step(make_tx, loss_fn, batch_axis=1)
    with pytest.raises(ValueError, match="2 members but 3 keys"):
        ensemble.init_ensemble(
            init_fn, make_tx, jax.random.split(jax.random.key(0), 3), {"tau": jnp.ones(2)}
        )
