"""Checks of the NumPy reference integrators (tests/reference.py) against known answers."""

import numpy as np
import pytest

try:
    import reference as ref
except ImportError:  # tests/ imported as a package
    from tests import reference as ref


def dense(U, S, V):
    return U @ S @ V.T


def assert_orthonormal(Q, tol=1e-12):
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=tol)


def proj(B):
    """Orthogonal projector onto the columns of the orthonormal B."""
    return B @ B.T


def rank_k_target(rng, n=20, m=15, k=3):
    U, S, V = ref.random_lowrank(rng, n, m, k)
    return dense(U, S + np.eye(k), V)  # singular values >= 1, well separated from 0


# ----------------------------------------------------------------------------- helpers


def test_orth_and_random_lowrank():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((9, 4))
    Q = ref.orth(A)
    assert Q.shape == (9, 4)
    assert_orthonormal(Q)
    np.testing.assert_allclose(proj(Q) @ A, A, atol=1e-12)

    U, S, V = ref.random_lowrank(rng, 9, 7, 4)
    assert U.shape == (9, 4) and S.shape == (4, 4) and V.shape == (7, 4)
    assert_orthonormal(U)
    assert_orthonormal(V)
    s = np.diag(S)
    np.testing.assert_array_equal(S, np.diag(s))
    assert np.all(s > 0) and np.all(np.diff(s) <= 0)

    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    s_plain = np.diag(ref.random_lowrank(rng1, 9, 7, 4)[1])
    s_decay = np.diag(ref.random_lowrank(rng2, 9, 7, 4, decay=10.0)[1])
    np.testing.assert_allclose(s_decay, s_plain / 10.0 ** np.arange(4))


def test_losses_known_values_and_finite_differences():
    rng = np.random.default_rng(1)
    n, m, B = 5, 4, 7
    A = rng.standard_normal((n, m))
    loss, grad = ref.matrix_loss(A)
    assert loss(A) == 0.0
    W = rng.standard_normal((n, m))
    assert loss(W) == pytest.approx(0.5 * np.linalg.norm(W - A) ** 2)

    X = rng.standard_normal((B, m))
    Y = X @ A.T
    rloss, rgrad = ref.regression_loss(X, Y)
    assert rloss(A) == pytest.approx(0.0, abs=1e-24)
    np.testing.assert_allclose(rgrad(A), 0.0, atol=1e-12)

    E = rng.standard_normal((n, m))  # central differences along a random direction
    eps = 1e-6
    for f, g in [(loss, grad), (rloss, rgrad)]:
        fd = (f(W + eps * E) - f(W - eps * E)) / (2 * eps)
        assert fd == pytest.approx(np.sum(g(W) * E), rel=1e-7)


def test_gradient_descent_dense_known_answer():
    rng = np.random.default_rng(2)
    A, W0 = rng.standard_normal((2, 6, 5))
    _, grad = ref.matrix_loss(A)
    W = ref.gradient_descent_dense(W0, grad, 0.3, 7)
    np.testing.assert_allclose(W, A + 0.7**7 * (W0 - A), atol=1e-14)


# ----------------------------------------------------------------------------- truncation


def test_tail_norm():
    assert ref.tail_norm([4.0, 3.0], 0) == pytest.approx(5.0)
    assert ref.tail_norm([4.0, 3.0], 1) == pytest.approx(3.0)
    assert ref.tail_norm([4.0, 3.0], 2) == 0.0


@pytest.mark.parametrize(
    "sigma, tau, absolute, min_rank, max_rank, expected",
    [
        ([3, 2, 1, 0.1], 0.1, True, 2, None, 3),
        ([3, 2, 1, 0.1], 0.05, True, 2, None, 4),
        ([3, 2, 1, 0.1], 1.2, True, 2, None, 2),  # tail after 2: sqrt(1.01) = 1.005
        ([3, 2, 1, 0.1], 2.3, True, 0, None, 1),  # tail after 1: sqrt(5.01) = 2.238
        ([3, 2, 1, 0.1], 10.0, True, 0, None, 0),  # everything fits in the tolerance
        # relative: ||sigma|| = sqrt(14.01) = 3.743
        ([3, 2, 1, 0.1], 0.03, False, 2, None, 3),  # theta 0.112
        ([3, 2, 1, 0.1], 0.02, False, 2, None, 4),  # theta 0.075
        ([3, 2, 1, 0.1], 0.3, False, 2, None, 2),  # theta 1.12
        ([3, 2, 1, 0.1], 0.6, False, 1, None, 1),  # theta 2.246
        ([3, 2, 1, 0.1], 1.0, False, 0, None, 0),  # theta = ||sigma||: rank 0 passes
        ([3, 2, 1, 0.1], 0.0, False, 2, None, 4),  # tau = 0 keeps every nonzero value
        ([3, 2, 0, 0], 0.0, False, 0, None, 2),  # ... and drops exact zeros
        # the smallest singular value belongs to the tail
        ([1, 1e-3], 5e-4, True, 1, None, 2),
        ([1, 1e-3], 1e-3, True, 1, None, 1),
        # clamping
        ([3, 2, 1, 0.1], 0.6, False, 2, None, 2),  # min_rank lifts 1 -> 2
        ([3, 2, 1, 0.1], 10.0, True, 3, None, 3),  # min_rank lifts 0 -> 3
        ([3, 2, 1, 0.1], 0.0, False, 2, 3, 3),  # max_rank cuts 4 -> 3
        ([3, 2, 1, 0.1], 0.0, False, 2, 10, 4),  # max_rank above k is k
        ([3.0], 0.0, False, 2, None, 1),  # min_rank above k: never more than k
    ],
)
def test_truncation_rank_hand_made(sigma, tau, absolute, min_rank, max_rank, expected):
    r1 = ref.truncation_rank(
        np.array(sigma, float), tau, absolute=absolute, min_rank=min_rank, max_rank=max_rank
    )
    assert r1 == expected


def _random_augmented(rng, n=11, m=9, k=6):
    Uh = ref.orth(rng.standard_normal((n, k)))
    Vh = ref.orth(rng.standard_normal((m, k)))
    Sh = rng.standard_normal((k, k))  # not symmetric: P != Q
    return Uh, Sh, Vh


def test_truncate_full_rank_reproduces_matrix():
    rng = np.random.default_rng(3)
    Uh, Sh, Vh = _random_augmented(rng)
    U1, S1, V1 = ref.truncate(Uh, Sh, Vh, 0.0)
    assert S1.shape == (6, 6)
    np.testing.assert_allclose(dense(U1, S1, V1), dense(Uh, Sh, Vh), atol=1e-12)
    assert_orthonormal(U1)
    assert_orthonormal(V1)
    # the rows-instead-of-columns bug (V1 = Vh Qt[:, :r]) would not reproduce the matrix
    P, sigma, Qt = np.linalg.svd(Sh)
    wrong = dense(Uh @ P, np.diag(sigma), Vh @ Qt)
    assert np.linalg.norm(wrong - dense(Uh, Sh, Vh)) > 1e-1


@pytest.mark.parametrize("tau, absolute", [(0.05, False), (0.3, False), (0.5, True), (2.0, True)])
def test_truncation_error_is_tail_norm(tau, absolute):
    rng = np.random.default_rng(4)
    Uh, Sh, Vh = _random_augmented(rng)
    sigma = np.linalg.svd(Sh, compute_uv=False)
    theta = tau if absolute else tau * np.linalg.norm(sigma)
    U1, S1, V1 = ref.truncate(Uh, Sh, Vh, tau, absolute=absolute, min_rank=0)
    r1 = S1.shape[0]
    assert r1 == ref.truncation_rank(sigma, tau, absolute=absolute, min_rank=0)
    err = np.linalg.norm(dense(Uh, Sh, Vh) - dense(U1, S1, V1))
    assert err == pytest.approx(ref.tail_norm(sigma, r1), abs=1e-12)
    assert err <= theta + 1e-12
    if r1 > 0:  # r1 is the smallest admissible rank
        assert ref.tail_norm(sigma, r1 - 1) > theta
    np.testing.assert_allclose(np.diag(S1), sigma[:r1])


# ----------------------------------------------------------------------------- known answers


def _spy(grad_fn):
    """grad_fn that records the points it is evaluated at."""
    calls = []

    def g(W):
        calls.append(W.copy())
        return grad_fn(W)

    return g, calls


def test_augmentation_is_exact():
    """The S-step gradient of adaptive BUG is taken at U^ S^0 V^^T = U S V^T."""
    rng = np.random.default_rng(5)
    U, S, V = ref.random_lowrank(rng, 20, 15, 5)
    _, grad = ref.matrix_loss(rng.standard_normal((20, 15)))
    g, calls = _spy(grad)
    ref.adaptive_bug_step(U, S, V, g, 0.1, 0.0)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], dense(U, S, V), atol=1e-12)
    np.testing.assert_allclose(calls[0], dense(U, S, V), atol=0)


def test_gradient_evaluation_points():
    """BUG: G0 at U S V^T, G1 at U1 M S N^T V1^T = P_U1 W0 P_V1. KSL: three evaluations."""
    rng = np.random.default_rng(6)
    U, S, V = ref.random_lowrank(rng, 12, 10, 3)
    W0 = dense(U, S, V)
    _, grad = ref.matrix_loss(rng.standard_normal((12, 10)))
    g, calls = _spy(grad)
    U1, _, V1 = ref.bug_step(U, S, V, g, 0.2)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], proj(U1) @ W0 @ proj(V1), atol=1e-12)
    g, calls = _spy(grad)
    ref.ksl_step(U, S, V, g, 0.2)
    assert len(calls) == 3
    g, calls = _spy(grad)
    ref.parallel_bug_step(U, S, V, g, 0.2, 0.1)
    assert len(calls) == 1


STEPS = {
    "bug": lambda U, S, V, g, h: ref.bug_step(U, S, V, g, h),
    "ksl": lambda U, S, V, g, h: ref.ksl_step(U, S, V, g, h),
    "adaptive_fixed": lambda U, S, V, g, h: ref.adaptive_bug_step(U, S, V, g, h, None),
    "parallel_fixed": lambda U, S, V, g, h: ref.parallel_bug_step(U, S, V, g, h, None),
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_zero_step_is_identity_and_bases_orthonormal(name):
    rng = np.random.default_rng(7)
    U, S, V = ref.random_lowrank(rng, 12, 10, 3)
    _, grad = ref.matrix_loss(rng.standard_normal((12, 10)))
    U1, S1, V1 = STEPS[name](U, S, V, grad, 0.0)
    assert S1.shape == (3, 3)
    np.testing.assert_allclose(dense(U1, S1, V1), dense(U, S, V), atol=1e-12)
    U1, S1, V1 = STEPS[name](U, S, V, grad, 0.3)
    assert_orthonormal(U1)
    assert_orthonormal(V1)


def test_bug_h1_matrix_loss_known_answer():
    """h = 1, L = 0.5||W - A||^2: K1 = A V, L1 = A^T U, S1 = U1^T A V1, so W1 = P_U1 A P_V1."""
    rng = np.random.default_rng(8)
    A = rng.standard_normal((12, 10))
    U, S, V = ref.random_lowrank(rng, 12, 10, 4)
    U1, S1, V1 = ref.bug_step(U, S, V, ref.matrix_loss(A)[1], 1.0)
    np.testing.assert_allclose(proj(U1), proj(ref.orth(A @ V)), atol=1e-12)
    np.testing.assert_allclose(proj(V1), proj(ref.orth(A.T @ U)), atol=1e-12)
    np.testing.assert_allclose(dense(U1, S1, V1), proj(U1) @ A @ proj(V1), atol=1e-12)


@pytest.mark.parametrize("r", [3, 5])
def test_bug_reaches_target_in_one_step_when_bases_span_it(r):
    rng = np.random.default_rng(9)
    k = 3
    A = rank_k_target(rng, 20, 15, k)
    Ua, _, Vta = np.linalg.svd(A)
    # bases spanning range(A) / co-range(A) (plus extra directions when r > k), rotated
    U = ref.orth(
        np.hstack([Ua[:, :k], rng.standard_normal((20, r - k))])
        @ ref.orth(rng.standard_normal((r, r)))
    )
    V = ref.orth(Vta.T[:, :r] @ ref.orth(rng.standard_normal((r, r))))
    S = np.diag(rng.uniform(0.5, 2.0, r)) + 0.1 * rng.standard_normal((r, r))
    U1, S1, V1 = ref.bug_step(U, S, V, ref.matrix_loss(A)[1], 1.0)
    assert np.linalg.norm(dense(U1, S1, V1) - A) < 1e-12 * np.linalg.norm(A)


def test_ksl_h1_matrix_loss_known_answer():
    """h = 1, L = 0.5||W - A||^2: S~ = U1^T A V, L1 = A^T U1, so W1 = P_U1 A with U1 = orth(A V)."""
    rng = np.random.default_rng(10)
    A = rng.standard_normal((12, 10))
    U, S, V = ref.random_lowrank(rng, 12, 10, 4)
    U1, S1, V1 = ref.ksl_step(U, S, V, ref.matrix_loss(A)[1], 1.0)
    np.testing.assert_allclose(proj(U1), proj(ref.orth(A @ V)), atol=1e-12)
    np.testing.assert_allclose(dense(U1, S1, V1), proj(U1) @ A, atol=1e-12)


def test_adaptive_h1_matrix_loss_known_answer():
    """h = 1, tau = 0: S^1 = U^^T A V^, so W1 = P_U^ A P_V^ with U^ = orth([A V | U])."""
    rng = np.random.default_rng(11)
    A = rng.standard_normal((14, 12))
    U, S, V = ref.random_lowrank(rng, 14, 12, 3)
    U1, S1, V1 = ref.adaptive_bug_step(U, S, V, ref.matrix_loss(A)[1], 1.0, 0.0)
    assert S1.shape == (6, 6)  # the rank can double
    Uh = ref.orth(np.hstack([A @ V, U]))
    Vh = ref.orth(np.hstack([A.T @ U, V]))
    np.testing.assert_allclose(dense(U1, S1, V1), proj(Uh) @ A @ proj(Vh), atol=1e-12)


def test_parallel_h1_matrix_loss_is_tangent_projection():
    """h = 1, tau = 0: W1 = P_U A + A P_V - P_U A P_V (projection onto the tangent space)."""
    rng = np.random.default_rng(12)
    A = rng.standard_normal((14, 12))
    U, S, V = ref.random_lowrank(rng, 14, 12, 3)
    U1, S1, V1 = ref.parallel_bug_step(U, S, V, ref.matrix_loss(A)[1], 1.0, 0.0)
    assert S1.shape == (6, 6)
    assert_orthonormal(U1)
    assert_orthonormal(V1)
    expected = proj(U) @ A + A @ proj(V) - proj(U) @ A @ proj(V)
    np.testing.assert_allclose(dense(U1, S1, V1), expected, atol=1e-12)


def test_parallel_without_room_for_doubling():
    """2r > n: U~ has only n - r columns (the whole complement); W1 is still the tangent
    projection (h = 1, tau = 0), here of rank min(n, m)."""
    rng = np.random.default_rng(13)
    A = rng.standard_normal((10, 7))
    U, S, V = ref.random_lowrank(rng, 10, 7, 4)
    U1, S1, V1 = ref.parallel_bug_step(U, S, V, ref.matrix_loss(A)[1], 1.0, 0.0)
    assert U1.shape == (10, 7) and V1.shape == (7, 7)
    assert_orthonormal(U1)
    assert_orthonormal(V1)
    expected = proj(U) @ A + A @ proj(V) - proj(U) @ A @ proj(V)
    np.testing.assert_allclose(dense(U1, S1, V1), expected, atol=1e-12)


def _literal_complement(B, A):
    """The spec's recipe taken literally: orth((I - B B^T)(I - B B^T) A)."""
    P = A - B @ (B.T @ A)
    return ref.orth(P - B @ (B.T @ P))


def test_complement_basis_matches_spec_when_full_rank():
    rng = np.random.default_rng(21)
    B = ref.orth(rng.standard_normal((12, 3)))
    A = B @ rng.standard_normal((3, 3)) + 1e-6 * rng.standard_normal((12, 3))  # adds little
    Ut = ref.complement_basis(B, A)
    assert Ut.shape == (12, 3)
    assert_orthonormal(Ut)
    np.testing.assert_allclose(B.T @ Ut, 0.0, atol=1e-14)
    np.testing.assert_allclose(proj(Ut), proj(_literal_complement(B, A)), atol=1e-8)


def test_complement_basis_rank_deficient():
    """(I - B B^T) A of rank 1 < 3: the literal recipe's extra QR columns come from rounding noise
    and are not orthogonal to B; complement_basis stays orthogonal."""
    rng = np.random.default_rng(22)
    B = ref.orth(rng.standard_normal((12, 3)))
    c = rng.standard_normal((12, 1))
    c -= B @ (B.T @ c)
    A = B @ rng.standard_normal((3, 3)) + c @ rng.standard_normal((1, 3))
    Ut = ref.complement_basis(B, A)
    assert_orthonormal(Ut)
    np.testing.assert_allclose(B.T @ Ut, 0.0, atol=1e-14)
    np.testing.assert_allclose(proj(Ut) @ c, c, atol=1e-12)  # the span contains (I - BB^T) A
    assert np.abs(B.T @ _literal_complement(B, A)).max() > 1e-3  # the pitfall is real


# ----------------------------------------------------------------------------- rank adaptivity


def test_adaptive_rank_can_double():
    """tau = 0 keeps all 2r values: the rank grows to 2r (the 'keep old rank' bug would not)."""
    rng = np.random.default_rng(14)
    U, S, V = ref.random_lowrank(rng, 20, 15, 3)
    grad = ref.matrix_loss(rng.standard_normal((20, 15)))[1]
    assert ref.adaptive_bug_step(U, S, V, grad, 0.1, 0.0)[1].shape == (6, 6)
    assert ref.parallel_bug_step(U, S, V, grad, 0.1, 0.0)[1].shape == (6, 6)


def _run(step, U, S, V, steps):
    ranks = []
    for _ in range(steps):
        U, S, V = step(U, S, V)
        ranks.append(S.shape[0])
    return U, S, V, ranks


def test_adaptive_recovers_rank_k_target_from_above():
    rng = np.random.default_rng(15)
    A = rank_k_target(rng)
    grad = ref.matrix_loss(A)[1]
    U, S, V = ref.random_lowrank(rng, 20, 15, 6)
    step = lambda U, S, V: ref.adaptive_bug_step(U, S, V, grad, 1.0, 1e-10)
    U, S, V, ranks = _run(step, U, S, V, 3)
    assert ranks[-1] == 3
    assert np.linalg.norm(dense(U, S, V) - A) < 1e-10


def test_adaptive_rank_grows_from_one():
    rng = np.random.default_rng(16)
    A = rank_k_target(rng)
    grad = ref.matrix_loss(A)[1]
    U, S, V = ref.random_lowrank(rng, 20, 15, 1)
    step = lambda U, S, V: ref.adaptive_bug_step(U, S, V, grad, 1.0, 1e-10, min_rank=1)
    U, S, V, ranks = _run(step, U, S, V, 6)
    assert ranks[0] == 2  # 1 -> 2r = 2
    assert ranks[-1] == 3
    assert np.linalg.norm(dense(U, S, V) - A) < 1e-10


@pytest.mark.parametrize("start_rank, min_rank", [(6, 2), (1, 1)])
def test_parallel_recovers_rank_k_target(start_rank, min_rank):
    rng = np.random.default_rng(17)
    A = rank_k_target(rng)
    grad = ref.matrix_loss(A)[1]
    U, S, V = ref.random_lowrank(rng, 20, 15, start_rank)
    step = lambda U, S, V: ref.parallel_bug_step(U, S, V, grad, 1.0, 1e-10, min_rank=min_rank)
    U, S, V, ranks = _run(step, U, S, V, 20)
    assert ranks[-1] == 3
    assert np.linalg.norm(dense(U, S, V) - A) < 1e-10


# ----------------------------------------------------------------------------- consistency


def _local_errors(step, W_ref, U, S, V, grad, hs):
    return [np.linalg.norm(dense(*step(U, S, V, grad, h)) - W_ref(h)) for h in hs]


def test_ksl_tracks_gradient_descent_to_second_order():
    """G(W0) in the tangent space at W0: one KSL step = W0 - h G(W0) + O(h^2)."""
    rng = np.random.default_rng(18)
    n, m, r = 12, 10, 3
    U, S, V = ref.random_lowrank(rng, n, m, r)
    W0 = dense(U, S, V)
    A = W0 + U @ rng.standard_normal((r, m)) + rng.standard_normal((n, r)) @ V.T
    grad = ref.matrix_loss(A)[1]
    gd = lambda h: ref.gradient_descent_dense(W0, grad, h, 1)
    h = 1e-3
    e1, e2 = _local_errors(STEPS["ksl"], gd, U, S, V, grad, [h, h / 2])
    assert e1 > 1e-9  # not exact: the ratio below is meaningful
    assert 3.6 < e1 / e2 < 4.4


@pytest.mark.parametrize("name", sorted(STEPS))
def test_first_order_consistency_with_projected_gradient_descent(name):
    """Generic G: every fixed-rank step equals the best rank-r approximation of W0 - h G(W0)
    up to O(h^2) (both are W0 - h P_T G + O(h^2))."""
    rng = np.random.default_rng(19)
    n, m, r = 12, 10, 3
    U, S, V = ref.random_lowrank(rng, n, m, r)
    X = rng.standard_normal((30, m))
    Y = rng.standard_normal((30, n))
    grad = ref.regression_loss(X, Y)[1]

    def retracted_gd(h):
        P, s, Qt = np.linalg.svd(dense(U, S, V) - h * grad(dense(U, S, V)))
        return P[:, :r] @ np.diag(s[:r]) @ Qt[:r]

    h = 1e-4
    e1, e2 = _local_errors(STEPS[name], retracted_gd, U, S, V, grad, [h, h / 2])
    assert e1 > 1e-10
    assert 3.6 < e1 / e2 < 4.4


DESCENT = {
    **STEPS,
    "adaptive_tau0": lambda U, S, V, g, h: ref.adaptive_bug_step(U, S, V, g, h, 0.0, max_rank=6),
    "parallel_tau0": lambda U, S, V, g, h: ref.parallel_bug_step(U, S, V, g, h, 0.0, max_rank=6),
}


@pytest.mark.parametrize("name", sorted(DESCENT))
def test_loss_never_increases_for_small_h(name):
    rng = np.random.default_rng(20)
    n, m, B, r = 14, 12, 40, 3
    Wt = dense(*ref.random_lowrank(rng, n, m, 5))
    X = rng.standard_normal((B, m))
    Y = X @ Wt.T + 0.1 * rng.standard_normal((B, n))
    loss, grad = ref.regression_loss(X, Y)
    h = 0.5 / np.linalg.norm(X, 2) ** 2
    U, S, V = ref.random_lowrank(rng, n, m, r)
    losses = [loss(dense(U, S, V))]
    for _ in range(50):
        U, S, V = DESCENT[name](U, S, V, grad, h)
        losses.append(loss(dense(U, S, V)))
    losses = np.array(losses)
    assert np.all(np.diff(losses) <= 1e-12 * losses[0])
    assert losses[-1] < 0.5 * losses[0]
