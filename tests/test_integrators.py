"""The JAX integrators against the independent float64 NumPy reference (tests/reference.py).

Both sides start from the same factors; the JAX factor carries extra capacity (inactive columns)
so the masking is exercised. Compared: W = U S V^T (basis-independent) and the ranks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank

try:
    import reference as ref
except ImportError:  # pragma: no cover - depends on pytest's import mode
    from tests import reference as ref

N, M, R, CAP = 20, 16, 3, 8


def _target(rng):
    """Rank 4 with well-separated singular values 4, 3, 2, 1 (clear truncation decisions)."""
    U, _, V = ref.random_lowrank(rng, N, M, 4)
    return U @ np.diag([4.0, 3.0, 2.0, 1.0]) @ V.T


def _problem(kind, rng):
    if kind == "matrix":
        A = _target(rng) + 0.01 * rng.standard_normal((N, M))
        loss_np, grad_np = ref.matrix_loss(A)
        A_j = jnp.asarray(A, jnp.float32)

        def loss_j(W):
            return 0.5 * jnp.sum((W - A_j.astype(W.dtype)) ** 2)

        return loss_np, grad_np, loss_j, 1.0
    X = rng.standard_normal((40, M))
    W_true = _target(rng)
    Y = X @ W_true.T + 0.01 * rng.standard_normal((40, N))
    loss_np, grad_np = ref.regression_loss(X, Y)
    X_j, Y_j = jnp.asarray(X), jnp.asarray(Y)

    def loss_j(W):
        return 0.5 * jnp.sum((X_j.astype(W.dtype) @ W.T - Y_j.astype(W.dtype)) ** 2)

    return loss_np, grad_np, loss_j, 0.5 / np.linalg.norm(X, 2) ** 2


def _to_jax(U, S, V, rank, capacity, dtype):
    x = LowRank(jnp.asarray(U, dtype), jnp.asarray(S, dtype), jnp.asarray(V, dtype), rank)
    return dlrt_jax.resize_capacity({"w": x}, None, capacity)[0]["w"]


INTEGRATORS = {
    "bug": (ref.bug_step, lambda h: dlrt_jax.bug(h), None),
    "bug_adaptive": (
        lambda U, S, V, g, h: ref.adaptive_bug_step(U, S, V, g, h, 0.05, min_rank=1, max_rank=CAP),
        lambda h: dlrt_jax.bug(h, tau=0.05, min_rank=1),
        0.05,
    ),
    "ksl": (ref.ksl_step, lambda h: dlrt_jax.projector_splitting(h), None),
    "parallel_bug": (
        lambda U, S, V, g, h: ref.parallel_bug_step(U, S, V, g, h, 0.05, min_rank=1, max_rank=CAP),
        lambda h: dlrt_jax.parallel_bug(h, tau=0.05, min_rank=1),
        0.05,
    ),
    "parallel_bug_fixed": (
        lambda U, S, V, g, h: ref.parallel_bug_step(U, S, V, g, h, None),
        lambda h: dlrt_jax.parallel_bug(h),
        None,
    ),
    "s_only": (ref.s_only_step, lambda h: dlrt_jax.s_only(h), None),
}


def _run_jax(make_tx, x, loss_j, h, steps, use_jit):
    params = {"w": x}

    def loss(p):
        return loss_j(p["w"].to_dense())

    grad_fn = jax.grad(loss)
    tx = make_tx(h)
    state = tx.init(params)

    def step(p, s):
        updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

    if use_jit:
        step = jax.jit(step)
    ranks = []
    for _ in range(steps):
        params, state = step(params, state)
        ranks.append(int(params["w"].rank))
    return params["w"], ranks, state


def _run_ref(ref_step, U, S, V, grad_np, h, steps):
    ranks = []
    for _ in range(steps):
        U, S, V = ref_step(U, S, V, grad_np, h)
        ranks.append(S.shape[0])
    return U @ S @ V.T, ranks


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
@pytest.mark.parametrize("kind", ["matrix", "regression"])
@pytest.mark.parametrize("steps", [1, 50])
def test_matches_reference_float32(name, kind, steps):
    rng = np.random.default_rng(0)
    loss_np, grad_np, loss_j, h = _problem(kind, rng)
    U, S, V = ref.random_lowrank(rng, N, M, R)
    ref_step, make_tx, _ = INTEGRATORS[name]
    W_ref, ranks_ref = _run_ref(ref_step, U, S, V, grad_np, h, steps)
    x = _to_jax(U, S, V, R, CAP, jnp.float32)
    x1, ranks, state = _run_jax(make_tx, x, loss_j, h, steps, use_jit=steps > 1)
    assert ranks == ranks_ref
    err = np.linalg.norm(np.asarray(x1.to_dense(), np.float64) - W_ref) / np.linalg.norm(W_ref)
    assert err < 1e-4, err
    assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
@pytest.mark.parametrize("steps,tol", [(1, 1e-10), (5, 1e-9)])
def test_matches_reference_float64(name, steps, tol):
    """Float64 on both sides agrees to roundoff, over several steps.

    This needs the augmented bases of the adaptive BUG to be bases of exactly
    ``span([K1 | U0])``: once the rank exceeds the new information in the gradient,
    ``(I - U0 U0^T) K1`` is rank-deficient and a QR completion adds roundoff-determined
    directions on which the S-step gradient is not zero (both sides exclude them).
    """
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        loss_np, grad_np, loss_j, h = _problem("regression", rng)
        U, S, V = ref.random_lowrank(rng, N, M, R)
        ref_step, make_tx, _ = INTEGRATORS[name]
        W_ref, ranks_ref = _run_ref(ref_step, U, S, V, grad_np, h, steps)
        x = _to_jax(U, S, V, R, CAP, jnp.float64)
        x1, ranks, _ = _run_jax(make_tx, x, loss_j, h, steps, use_jit=False)
        assert x1.dtype == jnp.float64
        assert ranks == ranks_ref
        err = np.linalg.norm(np.asarray(x1.to_dense()) - W_ref) / np.linalg.norm(W_ref)
        assert err < tol, err


@pytest.mark.parametrize("name", sorted(set(INTEGRATORS) - {"s_only"}))  # no pure s_only step
def test_pure_step_functions_match_transform(name):
    rng = np.random.default_rng(2)
    _, _, loss_j, h = _problem("matrix", rng)
    U, S, V = ref.random_lowrank(rng, N, M, R)
    x = _to_jax(U, S, V, R, CAP, jnp.float32)
    _, make_tx, tau = INTEGRATORS[name]
    x1, _, _ = _run_jax(make_tx, x, loss_j, h, 1, use_jit=False)

    def grad_fn(p):
        return jax.grad(lambda q: loss_j(q["w"].to_dense()))(p)

    kwargs = {} if tau is None else {"tau": tau, "min_rank": 1}
    if name.startswith("bug"):
        y = dlrt_jax.bug_step({"w": x}, grad_fn, h, **kwargs)["w"]
    elif name.startswith("parallel"):
        y = dlrt_jax.parallel_bug_step({"w": x}, grad_fn, h, **kwargs)["w"]
    else:
        y = dlrt_jax.ksl_step({"w": x}, grad_fn, h)["w"]
    np.testing.assert_allclose(y.to_dense(), x1.to_dense(), atol=1e-5)
    assert int(y.rank) == int(x1.rank)


def _orth_err(x):
    U, V = np.asarray(x.U, np.float64), np.asarray(x.V, np.float64)
    eye = np.eye(x.capacity)
    return max(np.linalg.norm(U.T @ U - eye), np.linalg.norm(V.T @ V - eye))


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_bases_stay_orthonormal_and_inactive_parts_zero(name):
    rng = np.random.default_rng(3)
    _, _, loss_j, h = _problem("regression", rng)
    U, S, V = ref.random_lowrank(rng, N, M, R)
    x = _to_jax(U, S, V, R, CAP, jnp.float32)
    _, make_tx, _ = INTEGRATORS[name]
    x1, _, _ = _run_jax(make_tx, x, loss_j, h, 200, use_jit=True)
    assert _orth_err(x1) < 1e-4
    r = int(x1.rank)
    S1 = np.asarray(x1.S)
    assert np.all(S1[r:, :] == 0) and np.all(S1[:, r:] == 0)


def test_rank_k_target_recovered_with_rank_settling_at_k():
    rng = np.random.default_rng(4)
    Ua, Sa, Va = ref.random_lowrank(rng, N, M, 3)
    A = jnp.asarray(Ua @ Sa @ Va.T, jnp.float32)
    for make_tx, steps in (
        (lambda: dlrt_jax.bug(1.0, tau=1e-3, min_rank=1), 5),
        (lambda: dlrt_jax.parallel_bug(1.0, tau=1e-3, min_rank=1), 30),
    ):
        for start in (6, 1):  # shrink from above, grow from below
            x = LowRank.random(jax.random.key(start), (N, M), rank=start, capacity=CAP)
            x1, ranks, _ = _run_jax(
                lambda h, make_tx=make_tx: make_tx(),
                x,
                lambda W: 0.5 * jnp.sum((W - A) ** 2),
                1.0,
                steps,
                use_jit=True,
            )
            assert ranks[-1] == 3, (start, ranks)
            assert float(jnp.linalg.norm(x1.to_dense() - A)) < 1e-4 * float(jnp.linalg.norm(A))
            if start == 1:
                assert ranks[0] == 2  # grows by at most a factor 2 per step (augmentation)


def test_loss_never_increases_with_tau_zero_and_small_step():
    rng = np.random.default_rng(5)
    _, _, loss_j, h = _problem("regression", rng)
    U, S, V = ref.random_lowrank(rng, N, M, 2)
    for make_tx in (
        lambda: dlrt_jax.bug(h, tau=0.0, min_rank=1),
        lambda: dlrt_jax.parallel_bug(h, tau=0.0, min_rank=1),
        lambda: dlrt_jax.bug(h),
        lambda: dlrt_jax.ksl(h),
    ):
        params = {"w": _to_jax(U, S, V, 2, CAP, jnp.float32)}
        grad_fn = jax.grad(lambda p: loss_j(p["w"].to_dense()))
        tx = make_tx()
        state = tx.init(params)

        @jax.jit
        def step(params, state, tx=tx, grad_fn=grad_fn):
            updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        losses = [float(loss_j(params["w"].to_dense()))]
        for _ in range(50):
            params, state = step(params, state)
            losses.append(float(loss_j(params["w"].to_dense())))
        assert np.all(np.diff(losses) <= 1e-6 * losses[0]), losses
        assert losses[-1] < 0.5 * losses[0]


def test_augmentation_is_exact():
    """The S-step of adaptive BUG evaluates the gradient at U^ S^0 V^T == U0 S0 V0^T."""
    x = LowRank.random(jax.random.key(0), (N, M), rank=R, capacity=CAP)
    A = jax.random.normal(jax.random.key(1), (N, M))
    seen = []

    def grad_fn(p):
        seen.append(p["w"])
        return jax.grad(lambda q: 0.5 * jnp.sum((q["w"].to_dense() - A) ** 2))(p)

    tx = dlrt_jax.bug(0.1, tau=0.05)
    params = {"w": x}
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    point = seen[-1]
    assert point.capacity == 2 * CAP and int(point.rank) == 2 * R
    np.testing.assert_allclose(point.to_dense(), x.to_dense(), atol=1e-6)
    Uh = np.asarray(point.U)
    np.testing.assert_allclose(Uh.T @ Uh, np.eye(2 * CAP), atol=1e-5)


def test_number_of_gradient_evaluations():
    x = LowRank.random(jax.random.key(0), (N, M), rank=R, capacity=CAP)
    A = jax.random.normal(jax.random.key(1), (N, M))
    for make_tx, extra in (
        (lambda: dlrt_jax.bug(0.1), 1),
        (lambda: dlrt_jax.bug(0.1, tau=0.1), 1),
        (lambda: dlrt_jax.ksl(0.1), 2),
        (lambda: dlrt_jax.parallel_bug(0.1), 0),
    ):
        calls = []

        def grad_fn(p, calls=calls):
            calls.append(1)
            return jax.grad(lambda q: 0.5 * jnp.sum((q["w"].to_dense() - A) ** 2))(p)

        params = {"w": x}
        tx = make_tx()
        grads = jax.grad(lambda q: 0.5 * jnp.sum((q["w"].to_dense() - A) ** 2))(params)
        tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
        assert len(calls) == extra


@pytest.mark.parametrize(
    "make_tx", [lambda: dlrt_jax.bug(0.1, tau=0.0), lambda: dlrt_jax.parallel_bug(0.1, tau=0.0)]
)
def test_truncation_at_full_rank_reproduces_w(make_tx):
    """Zero gradient and tau = 0: the SVD truncation must give back W (columns of Q, not rows)."""
    x = LowRank.random(jax.random.key(11), (N, M), rank=R, capacity=CAP)
    S = jnp.zeros((CAP, CAP)).at[:R, :R].set(jax.random.normal(jax.random.key(12), (R, R)))
    x = x.replace(S=S)  # a full (non-diagonal) S: its SVD has non-trivial P and Q
    params = {"w": x}
    tx = make_tx()
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, state = tx.update(
        grads, tx.init(params), params, grad_fn=lambda p: jax.tree_util.tree_map(jnp.zeros_like, p)
    )
    new = optax.apply_updates(params, updates)["w"]
    np.testing.assert_allclose(new.to_dense(), x.to_dense(), atol=1e-5)
    assert int(state.num_skipped) == 0
    # the singular values are the same, in the diagonal S (the new bases are singular vectors)
    s_new = np.sort(np.diag(np.asarray(new.S)))[::-1][:R]
    np.testing.assert_allclose(
        s_new, np.linalg.svd(np.asarray(S), compute_uv=False)[:R], rtol=1e-5, atol=1e-5
    )
