"""The DLRT transforms inside optax's containers: chain, reduce_on_plateau, MultiSteps,
apply_if_finite, inject_hyperparams; and a transform wrongly placed after DLRT is caught."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank

N, M, CAP = 12, 10, 5


def _target(rank, key=1):
    k1, k2 = jax.random.split(jax.random.key(key))
    U = jnp.linalg.qr(jax.random.normal(k1, (N, rank)))[0]
    V = jnp.linalg.qr(jax.random.normal(k2, (M, rank)))[0]
    return U @ jnp.diag(jnp.linspace(3.0, 1.0, rank)) @ V.T


A = _target(3)


def _params(rank=3):
    w = LowRank.random(jax.random.key(0), (N, M), rank=rank, capacity=CAP)
    return {"w": w, "b": jnp.zeros((N,))}


def _loss(p, target=A):
    return 0.5 * jnp.sum((p["w"].to_dense() + p["b"][:, None] - target) ** 2)


grad_fn = jax.grad(_loss)


def _on_manifold(w):
    U, V = np.asarray(w.U), np.asarray(w.V)
    np.testing.assert_allclose(U.T @ U, np.eye(CAP), atol=1e-5)
    np.testing.assert_allclose(V.T @ V, np.eye(CAP), atol=1e-5)
    assert float(w.rank) == round(float(w.rank))


def test_clipping_before_dlrt_is_dlrt_on_the_clipped_gradient():
    params = _params()
    grads = grad_fn(params)
    dlrt = dlrt_jax.bug(0.5, tau=0.05)
    tx = optax.chain(optax.clip_by_global_norm(0.1), dlrt)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    norm = optax.tree.norm(grads)
    assert float(norm) > 1.0  # so the clip acts
    clipped = jax.tree.map(lambda g: g * (0.1 / norm), grads)
    expected, _ = dlrt.update(clipped, dlrt.init(params), params, grad_fn=grad_fn)
    chex.assert_trees_all_close(updates, expected, atol=1e-6)


def test_reduce_on_plateau_before_dlrt_gets_value_and_scales_the_step():
    """``value=`` reaches reduce_on_plateau through a jitted chain that ends in DLRT."""
    params = _params()
    dlrt = dlrt_jax.parallel_bug(0.2, tau=0.05)
    plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5, cooldown=0)
    tx = optax.chain(plateau, dlrt)

    @jax.jit
    def step(p, state, value):
        updates, state = tx.update(grad_fn(p), state, p, value=value)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p = params
    for _ in range(4):  # a loss that does not improve: the plateau halves the scale
        p, state = step(p, state, jnp.asarray(1.0))
    assert float(state[0].scale) < 1.0
    # a step is DLRT on the gradient scaled by the plateau's current scale
    updates, new_state = tx.update(grad_fn(p), state, p, value=jnp.asarray(1.0))
    scale = float(new_state[0].scale)
    scaled = jax.tree.map(lambda g: scale * g, grad_fn(p))
    expected, _ = dlrt.update(scaled, state[1], p)
    chex.assert_trees_all_close(updates, expected, atol=1e-6)


@pytest.mark.parametrize("make", [dlrt_jax.bug, dlrt_jax.parallel_bug], ids=["bug", "parallel"])
def test_multisteps_changes_params_every_second_step_on_the_manifold(make):
    params = _params()
    targets = [_target(3, key=1), _target(2, key=2)]
    tx = optax.MultiSteps(make(0.3, tau=0.05), every_k_schedule=2)

    @jax.jit
    def step(p, state, target):
        g = jax.grad(_loss)(p, target)
        updates, state = tx.update(g, state, p, grad_fn=lambda q: jax.grad(_loss)(q, target))
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p = params
    history = [p]
    for i in range(6):
        p, state = step(p, state, targets[i % 2])
        history.append(p)
        _on_manifold(p["w"])
    for i in range(1, 7):
        moved = not np.array_equal(history[i]["w"].S, history[i - 1]["w"].S)
        assert moved == (i % 2 == 0), i  # only every 2nd step applies an update
    assert int(state.inner_opt_state.count) == 3 and int(state.inner_opt_state.num_skipped) == 0
    # the applied step is the DLRT step on the mean of the two accumulated gradients
    g = [jax.grad(_loss)(params, t) for t in targets]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *g)
    inner = make(0.3, tau=0.05)
    u, _ = inner.update(
        mean, inner.init(params), params, grad_fn=lambda q: jax.grad(_loss)(q, targets[1])
    )
    chex.assert_trees_all_close(history[2], optax.apply_updates(params, u), atol=1e-5)


def test_apply_if_finite_skips_a_nan_step_and_continues():
    params = _params()
    tx = optax.apply_if_finite(dlrt_jax.bug(0.3, tau=0.05), max_consecutive_errors=3)

    @jax.jit
    def step(p, state, poison):
        g = grad_fn(p)
        g["w"] = g["w"].replace(S=g["w"].S * poison)
        updates, state = tx.update(g, state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p, state = step(params, state, jnp.nan)
    chex.assert_trees_all_equal(p, params)
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    assert int(state.inner_state.count) == 0  # the DLRT transform did not run
    p, state = step(p, state, 1.0)
    assert int(state.notfinite_count) == 0 and int(state.inner_state.count) == 1
    assert float(_loss(p)) < float(_loss(params))
    _on_manifold(p["w"])


def test_injected_tau_changes_between_steps_without_recompiling():
    params = _params(rank=4)
    tx = optax.inject_hyperparams(dlrt_jax.parallel_bug)(optimizer=0.1, tau=0.0)

    @jax.jit
    @chex.assert_max_traces(n=1)  # a second trace (a recompile) raises
    def step(p, state):
        updates, state = tx.update(grad_fn(p), state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p, state = step(params, state)
    assert int(p["w"].rank) >= 4  # tau = 0 truncates nothing
    state.hyperparams["tau"] = jnp.asarray(0.9, jnp.float32)
    p, state = step(p, state)
    assert int(p["w"].rank) <= 2  # a large tolerance cuts the rank


def test_update_signature_follows_the_optax_convention():
    for tx in (dlrt_jax.bug(0.1), dlrt_jax.parallel_bug(0.1), dlrt_jax.ksl(0.1)):
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
        sig = inspect.signature(tx.update)
        assert sig.parameters["grad_fn"].kind is inspect.Parameter.KEYWORD_ONLY
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


# ---- a transform after DLRT ----------------------------------------------------------------------


def _after_dlrt(dlrt):
    return optax.chain(dlrt, optax.scale(0.5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: dlrt_jax.bug(0.5, tau=0.05),
        lambda: dlrt_jax.parallel_bug(0.5, tau=0.05),
        lambda: dlrt_jax.bug(0.5),
        lambda: dlrt_jax.ksl(0.5),
    ],
    ids=["bug", "parallel", "bug_fixed", "ksl"],
)
def test_a_transform_after_dlrt_is_caught_at_the_next_step(make):
    params = _params()
    tx = _after_dlrt(make())
    state = tx.init(params)
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    p = optax.apply_updates(params, updates)  # off the manifold now
    with pytest.raises(ValueError, match=r"params\['w'\].*must be the last member"):
        tx.update(grad_fn(p), state, p, grad_fn=grad_fn)

    @jax.jit
    def step(p, state):
        updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

    # under jit the step records the fault in its state and changes nothing (no host callback);
    # dlrt_jax.check reads it where the host syncs anyway
    p2, state2 = step(p, state)
    chex.assert_trees_all_equal(p2, p)
    dlrt_state = state2[0]
    assert int(dlrt_state.num_skipped) == 1 and int(dlrt_state.faults[0]) != 0
    with pytest.raises(ValueError, match=r"params\['w'\].*must be the last member"):
        dlrt_jax.check(state2, p2)
    with pytest.raises(ValueError, match=r"factor 0 .*must be the last member"):
        dlrt_jax.check(state2)
    dlrt_jax.check(state)  # the state before the faulty step has none


def test_the_same_transform_before_dlrt_is_fine():
    params = _params()
    tx = optax.chain(optax.scale(0.5), dlrt_jax.bug(0.1, tau=0.05))
    state = tx.init(params)
    step = jax.jit(
        lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
            *tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        )
    )
    p = params
    for _ in range(5):
        p, state = step(p, state)
    _on_manifold(p["w"])
    assert float(_loss(p)) < float(_loss(params))


def test_hand_made_bases_are_accepted_at_the_first_step():
    """Only factors a DLRT step produced are checked: a hand-made factor with non-orthonormal
    bases starts training (the step orthonormalises it), and ``s_only`` never moves the bases."""
    key_u, key_v = jax.random.split(jax.random.key(3))
    U = 1.5 * jax.random.normal(key_u, (N, CAP)) / N**0.5  # columns of norm about 1.5
    w = LowRank(U, jnp.eye(CAP), 1.5 * jax.random.normal(key_v, (M, CAP)) / M**0.5, 3)
    params = {"w": w, "b": jnp.zeros((N,))}
    for tx in (dlrt_jax.parallel_bug(0.02, tau=0.05), dlrt_jax.s_only(0.02)):
        state = tx.init(params)
        p = params
        for _ in range(3):
            updates, state = tx.update(grad_fn(p), state, p)
            p = optax.apply_updates(p, updates)
        assert int(state.count) == 3 and float(_loss(p)) < float(_loss(params))


def test_the_check_under_vmap_names_the_factor_and_passes_correct_use():
    """One ensemble member per row: the jitted, vmapped step raises for a wrong chain only."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), _params(), _params(rank=2))
    wrong = optax.chain(dlrt_jax.parallel_bug(0.5, tau=0.05), optax.scale(0.5))
    for tx, fails in ((wrong, True), (dlrt_jax.parallel_bug(0.5, tau=0.05), False)):

        def step(p, s, tx=tx):
            updates, s = tx.update(grad_fn(p), s, p)
            return optax.apply_updates(p, updates), s

        vstep = jax.jit(jax.vmap(step))
        p, state = vstep(stacked, jax.vmap(tx.init)(stacked))
        if fails:
            p2, state2 = vstep(p, state)
            faults = np.asarray(state2[0].faults)
            assert faults.shape == (2, 1) and np.all(faults != 0), faults
            with pytest.raises(ValueError, match=r"params\['w'\] is not a factor"):
                dlrt_jax.check(state2, p2)
        else:
            p, state = vstep(p, state)
            assert np.all(np.asarray(state.num_skipped) == 0)
