"""Property-based and fault-injection tests of the integrators' invariants.

Invariants after every step, over random ranks, tolerances, step sizes, scales and seeds (shapes
and capacities from a fixed set, so that each compiled step is reused across examples):
orthonormal bases (all capacity columns), rank a whole number in [min_rank, capacity] (unchanged
by the fixed-rank integrators), S zero outside its active block, finite factors. Truncation: the
rank is the smallest passing one and the error equals the tail norm.

Faults: NaN/Inf in any gradient slot a step reads (also only in the second evaluation) skip the
step exactly (params and optimiser state unchanged bit for bit, ``num_skipped`` + 1) and the next
clean step works; in a slot it never reads they change nothing (the clean step, bit for bit);
zero gradients, rank-deficient and duplicated bases, and scales of 1e-30 and 1e30 leave a finite,
orthonormal state. Same seed, same result.

Regression tests pin two bugs found this way (fixed): scale-dependent truncation (squares of
singular values over/underflowing) and a round-off-dependent Galerkin subspace in the adaptive BUG.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlrt_jax

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# name -> (factory(lr, tau), (n, m, capacity), min_rank, adaptive)
CONFIGS = {
    "bug_sgd": (lambda lr, tau: dlrt_jax.bug(optax.sgd(lr), tau=tau, min_rank=2), (12, 8, 4), 2),
    "bug_adam": (lambda lr, tau: dlrt_jax.bug(optax.adam(lr), tau=tau, min_rank=1), (9, 14, 3), 1),
    "parallel_sgd": (
        lambda lr, tau: dlrt_jax.parallel_bug(optax.sgd(lr), tau=tau, min_rank=1),
        (10, 10, 5),
        1,
    ),
    "bug_fixed": (lambda lr, tau: dlrt_jax.bug(optax.sgd(lr)), (7, 12, 3), None),
    "ksl": (lambda lr, tau: dlrt_jax.projector_splitting(optax.sgd(lr)), (11, 6, 4), None),
}


def _loss(params, A):
    return 0.5 * jnp.sum((params["w"].to_dense() + params["b"][:, None] - A) ** 2)


@functools.cache
def _stepper(name):
    """One jitted step of integrator ``name`` with traced lr and tau (one compilation)."""
    factory = CONFIGS[name][0]

    @jax.jit
    def run(params, A, lr, tau, gscale=1.0):
        tx = factory(lr, tau)
        state = tx.init(params)
        scale = lambda g: jax.tree_util.tree_map(lambda x: x * gscale, g)
        grad_fn = lambda p: scale(jax.grad(_loss)(p, A))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return [optax.apply_updates(params, updates)], state

    return run


def _problem(name, seed, rank, scale):
    n, m, c = CONFIGS[name][1]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = dlrt_jax.LowRank.random(k1, (n, m), rank=rank, capacity=c, scale=scale)
    A = scale * jax.random.normal(k2, (n, m)) @ jnp.diag(jnp.exp(-jnp.arange(m) / 2.0))
    return {"w": w, "b": 0.1 * scale * jax.random.normal(k3, (n,))}, A


def _orth_error(lr):
    U, V = np.asarray(lr.U, np.float64), np.asarray(lr.V, np.float64)
    c = U.shape[1]
    return max(np.abs(U.T @ U - np.eye(c)).max(), np.abs(V.T @ V - np.eye(c)).max())


def _check_invariants(lr, capacity, min_rank, fixed_rank=None):
    r = float(lr.rank)
    assert r.is_integer(), r
    lo = 1 if min_rank is None else min_rank
    assert lo <= r <= capacity, (r, lo, capacity)
    if fixed_rank is not None:
        assert int(r) == fixed_rank
    for a in (lr.U, lr.S, lr.V):
        assert bool(jnp.all(jnp.isfinite(a)))
    assert _orth_error(lr) < 2e-5, _orth_error(lr)
    S = np.asarray(lr.S)
    k = int(r)
    assert np.all(S[k:, :] == 0) and np.all(S[:, k:] == 0)


# ---- integrator invariants -----------------------------------------------------------------------


@SETTINGS
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    seed=st.integers(0, 2**16),
    rank_frac=st.floats(0.0, 1.0),
    tau=st.floats(0.0, 0.5),
    log_lr=st.floats(-4.0, 0.0),
    log_scale=st.floats(-4.0, 4.0),
)
def test_integrator_invariants(name, seed, rank_frac, tau, log_lr, log_scale):
    _, (n, m, c), min_rank = CONFIGS[name]
    rank = max(min_rank or 1, 1 + int(rank_frac * (c - 1)))
    params, A = _problem(name, seed, rank, 10.0**log_scale)
    outs, state = _stepper(name)(params, A, 10.0**log_lr, tau)
    assert int(state.num_skipped) == 0 and int(state.count) == 1
    for p in outs:
        _check_invariants(p["w"], c, min_rank, None if min_rank is not None else rank)
        assert bool(jnp.all(jnp.isfinite(p["b"])))


@SETTINGS
@given(
    sigma=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12),
    tau=st.floats(0.0, 1.0),
    absolute=st.booleans(),
    min_rank=st.integers(1, 4),
)
def test_truncation_rank_is_minimal_and_error_is_tail_norm(sigma, tau, absolute, min_rank):
    s = jnp.asarray(sorted(sigma, reverse=True), jnp.float32)
    k = s.shape[0]
    min_rank = min(min_rank, k)
    r = int(dlrt_jax.truncation_rank(s, tau, absolute=absolute, min_rank=min_rank))
    tails = np.sqrt(np.cumsum(np.asarray(s, np.float64)[::-1] ** 2)[::-1])
    tails = np.append(tails, 0.0)  # tails[rho] = error of keeping rho values
    theta = tau if absolute else tau * tails[0]
    assert min_rank <= r <= k
    rho = next(j for j in range(k + 1) if tails[j] <= theta * (1 + 1e-6))  # smallest passing
    assert r == max(rho, min_rank) or abs(tails[rho] - theta) <= 1e-5 * tails[0]
    # the same rule through LowRank.from_dense: the truncation error is the tail norm
    n = k + 2
    Q1 = np.linalg.qr(np.random.default_rng(k).standard_normal((n, k)))[0]
    Q2 = np.linalg.qr(np.random.default_rng(k + 1).standard_normal((k, k)))[0]
    W = jnp.asarray(Q1 @ np.diag(np.asarray(s, np.float64)) @ Q2.T, jnp.float32)
    lr = dlrt_jax.LowRank.from_dense(
        W, tol=tau, relative=not absolute, capacity=k // 2 if k >= 2 else 1, min_rank=1
    )
    r2 = int(lr.rank)
    err = float(np.linalg.norm(np.asarray(W, np.float64) - np.asarray(lr.to_dense(), np.float64)))
    assert abs(err - tails[r2]) <= 1e-4 * tails[0] + 1e-6


# ---- faults --------------------------------------------------------------------------------------


@functools.cache
def _fault_step(name):
    """One jitted step whose first gradient (or second evaluation) can be corrupted."""
    factory = CONFIGS[name][0]
    tx = factory(0.05, 0.1)

    @jax.jit
    def step(params, state, A, slot, index, value, second_only):
        def corrupt(g):  # set one entry of one gradient leaf (U, S, V slot or bias) to `value`
            leaves, treedef = jax.tree_util.tree_flatten(g)
            arrays = [x for x in leaves if x.ndim > 0]  # not the rank slot
            out, k = [], 0
            for x in leaves:
                if x.ndim > 0:
                    flat = x.reshape(-1)
                    bad = flat.at[index % flat.shape[0]].set(value).reshape(x.shape)
                    # later evaluations feed only the factors: corrupt a U, S or V slot there
                    target = jnp.where(second_only, 1 + slot % 3, slot % len(arrays))
                    x = jnp.where(target == k, bad, x)
                    k += 1
                out.append(x)
            return jax.tree_util.tree_unflatten(treedef, out)

        clean = lambda p: jax.grad(_loss)(p, A)
        first = jax.lax.cond(second_only, lambda g: g, corrupt, clean(params))

        def grad_fn(p):  # the evaluations after the first; corrupted when second_only
            g = clean(p)
            return jax.lax.cond(second_only, corrupt, lambda g: g, g)

        updates, state = tx.update(first, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return tx, step


# The gradient slots each evaluation of an integrator reads ("b": the bias, by the other
# optimiser, from the first evaluation only). Only read slots are checked for finiteness.
READS = {
    "bug_adam": ("bUV", "S"),
    "bug_sgd": ("bUV", "S"),
    "parallel_sgd": ("bUSV",),
    "ksl": ("bU", "S", "V"),
}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(["bug_adam", "parallel_sgd", "ksl", "bug_sgd"]),
    slot=st.integers(0, 4),
    index=st.integers(0, 10**6),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    second_only=st.booleans(),
)
def test_nonfinite_gradient_skips_step_exactly(name, slot, index, value, second_only):
    """A non-finite value in a slot the step reads skips it exactly; in a slot it never reads
    (e.g. ``U^T G V`` of the BUG's first evaluation), the step is the clean step bit for bit."""
    if second_only and name == "parallel_sgd":
        second_only = False  # one gradient evaluation only
    tx, step = _fault_step(name)
    params, A = _problem(name, 0, CONFIGS[name][1][2], 1.0)
    state = tx.init(params)
    params, state = step(params, state, A, 0, 0, 0.0, False)  # a clean step first (moments)
    p1, s1 = step(params, state, A, slot, index, value, second_only)
    # which leaf was corrupted (leaves: b, U, S, V) and whether the step reads it there
    leaf = "bUSV"[1 + slot % 3] if second_only else "bUSV"[slot % 4]
    evals = READS[name][1:] if second_only else READS[name][:1]
    if not any(leaf in reads for reads in evals):
        # the same step with a finite value written there instead
        p0, s0 = step(params, state, A, slot, index, 0.0, second_only)
        for a, b in zip(jax.tree_util.tree_leaves((p1, s1)), jax.tree_util.tree_leaves((p0, s0))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(s1.num_skipped) == int(state.num_skipped)
        return
    assert int(s1.num_skipped) == int(state.num_skipped) + 1
    assert int(s1.count) == int(state.count) + 1
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fields = ("factors", "other")
    for f in fields:
        for a, b in zip(
            jax.tree_util.tree_leaves(getattr(s1, f)),
            jax.tree_util.tree_leaves(getattr(state, f)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p2, s2 = step(p1, s1, A, 0, 0, 0.0, False)  # recovers: the next clean step is taken
    assert int(s2.num_skipped) == int(s1.num_skipped)
    assert float(_loss(p2, A)) < float(_loss(p1, A))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_gradient_keeps_w(name):
    _, (n, m, c), min_rank = CONFIGS[name]
    params, A = _problem(name, 1, c, 1.0)
    outs, state = _stepper(name)(params, A, 0.1, 0.1, 0.0)  # gradients scaled to exactly 0
    W0 = np.asarray(params["w"].to_dense(), np.float64)
    for p in outs:
        _check_invariants(p["w"], c, min_rank, None if min_rank is not None else c)
        W1 = np.asarray(p["w"].to_dense(), np.float64)
        # adaptive variants may truncate, by at most tau * ||W|| per step (here tau = 0.1)
        tol = 1e-5 if min_rank is None else 0.1 * np.linalg.norm(W0) + 1e-5
        assert np.linalg.norm(W1 - W0) <= tol
        W0 = W1
    assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["zero_singular_values", "duplicated_augmentation"])
def test_rank_deficient_and_duplicated_augmented_bases(name, kind):
    _, (n, m, c), min_rank = CONFIGS[name]
    params, A = _problem(name, 2, c, 1.0)
    w = params["w"]
    gscale = 1.0
    if kind == "zero_singular_values":  # S singular: K1, L1 and [K1 | U0] rank-deficient
        w = dlrt_jax.LowRank(w.U, w.S.at[1:, 1:].set(0.0), w.V, w.rank)
    else:  # S = I and a zero gradient: K1 = U0, so [K1 | U0] = [U0 | U0] (duplicated columns)
        w = dlrt_jax.LowRank(w.U, jnp.eye(c), w.V, w.rank)
        gscale = 0.0
    outs, state = _stepper(name)({**params, "w": w}, A, 0.1, 0.1, gscale)
    assert int(state.num_skipped) == 0
    for p in outs:
        _check_invariants(p["w"], c, min_rank, None if min_rank is not None else c)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_non_orthonormal_input_basis(name):
    """Hostile input: a LowRank whose U and V have a duplicated column (not orthonormal).

    Every integrator orthonormalises its new bases by QR, so the output is orthonormal again.
    """
    _, (n, m, c), min_rank = CONFIGS[name]
    params, A = _problem(name, 2, c, 1.0)
    w = params["w"]
    U = w.U.at[:, 1].set(w.U[:, 0])
    V = w.V.at[:, 1].set(w.V[:, 0])
    outs, state = _stepper(name)({**params, "w": dlrt_jax.LowRank(U, w.S, V, w.rank)}, A, 0.1, 0.1)
    for p in outs:
        _check_invariants(p["w"], c, min_rank, None if min_rank is not None else c)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_stay_finite_and_orthonormal(name, scale):
    _, (n, m, c), min_rank = CONFIGS[name]
    params, A = _problem(name, 3, c, scale)
    outs, state = _stepper(name)(params, A, 0.1, 0.1)
    for p in outs:  # a step either applies (finite, orthonormal) or is skipped (unchanged)
        _check_invariants(p["w"], c, min_rank, None if min_rank is not None else c)
    if int(state.num_skipped) == 1:
        np.testing.assert_array_equal(np.asarray(outs[-1]["w"].U), np.asarray(params["w"].U))


def test_same_seed_same_result():
    name = "bug_adam"
    runs = []
    for _ in range(2):
        params, A = _problem(name, 11, 2, 1.0)
        runs.append(_stepper(name)(params, A, 0.01, 0.2))
    fresh = jax.jit(_stepper(name).__wrapped__)  # a second, separately compiled function
    params, A = _problem(name, 11, 2, 1.0)
    runs.append(fresh(params, A, 0.01, 0.2))
    for other in runs[1:]:
        for a, b in zip(
            jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(other), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params2, _ = _problem(name, 12, 2, 1.0)
    assert not np.array_equal(np.asarray(params2["w"].U), np.asarray(params["w"].U))


# ---- regression tests for fixed core bugs (see the module docstring) ---------------------------


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_truncation_rank_is_scale_invariant(scale):
    s = jnp.array([3.0, 2.0, 1.0, 0.1])
    assert int(dlrt_jax.truncation_rank(s * scale, 0.1)) == int(dlrt_jax.truncation_rank(s, 0.1))


def test_adaptive_bug_is_scale_invariant():
    tx = dlrt_jax.bug(0.5, tau=0.05, min_rank=1)

    @jax.jit
    def step(p, A):
        loss = lambda p: 0.5 * jnp.sum((p["w"].to_dense() - A) ** 2)
        u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p, grad_fn=jax.grad(loss))
        return optax.apply_updates(p, u)["w"].to_dense()

    def trajectory(scale):
        A = (
            scale
            * dlrt_jax.LowRank.random(
                jax.random.key(1), (12, 10), rank=3, capacity=5, singular_values=[3.0, 2.0, 1.0]
            ).to_dense()
        )
        p = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (12, 10), capacity=5, scale=scale)}
        return np.asarray(step(p, A), np.float64) / scale

    ref = trajectory(1.0)
    for scale in (1e-6, 1e6):
        np.testing.assert_allclose(trajectory(scale), ref, atol=1e-5)


def test_orth_span_flagged_columns_span_the_input():
    from dlrt_jax._linalg import orth_span

    B = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 3)))[0]
    a = np.stack([B[:, 0], B[:, 1], B[:, 0] + B[:, 1], B[:, 2]], axis=1).astype(np.float32)
    q, ok = orth_span(jnp.asarray(a))
    Qf = np.asarray(q)[:, np.asarray(ok)]
    assert Qf.shape[1] == 3
    np.testing.assert_allclose(Qf @ (Qf.T @ B), B, atol=1e-5)
