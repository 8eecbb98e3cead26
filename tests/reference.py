"""Independent float64 NumPy reference for the DLRT integrators (docs/method.md, "The integrators").

Plain exact-rank arrays: U (n x r) and V (m x r) orthonormal, S (r x r), W = U S V^T (n x m).
``grad_fn`` maps a dense W to G = dL/dW (n x m). Every substep is one plain SGD step of size h.
Written from the equations only; nothing here is padded, masked or jitted.
"""

import numpy as np

# ----------------------------------------------------------------------------- basics


def orth(A):
    """Orthonormal basis Q of the columns of A: reduced QR A = Q R, R dropped."""
    return np.linalg.qr(A, mode="reduced")[0]


def span_basis(A, rtol=1e-10):
    """Orthonormal basis of exactly the column span of A (SVD; drops directions with
    sigma <= rtol * sigma_max). Unlike orth() it adds no arbitrary completion when A is
    rank-deficient, so a Galerkin step on it is uniquely defined."""
    P, sigma, _ = np.linalg.svd(A, full_matrices=False)
    return P[:, sigma > rtol * sigma[0]]


def _tails(sigma):
    """tails[rho] = sqrt(sum_{j > rho} sigma_j^2) for rho = 0..k (1-based j; tails[k] = 0)."""
    sq = np.asarray(sigma, dtype=np.float64) ** 2
    suffix = np.cumsum(sq[::-1])[::-1]  # suffix[i] = sum_{j >= i} sq[j] (0-based)
    return np.sqrt(np.append(suffix, 0.0))


def tail_norm(sigma, r):
    """Truncation error of keeping r singular values: sqrt(sum_{j > r} sigma_j^2) (1-based j)."""
    return float(_tails(sigma)[r])


def truncation_rank(sigma, tau, *, absolute=False, min_rank=2, max_rank=None):
    """New rank r1 = min{rho in 0..k : sqrt(sum_{j > rho} sigma_j^2) <= theta}, then clamped.

    theta = tau * ||sigma||_2 (relative, default) or theta = tau (absolute); sigma descending,
    k = len(sigma). Clamp: r1 <- min(max(r1, min_rank), max_rank), with max_rank = k when None and
    never above k (so max_rank wins over min_rank if they conflict).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if tau < 0:
        raise ValueError("tau must be >= 0")
    k = sigma.shape[0]
    theta = tau if absolute else tau * np.linalg.norm(sigma)
    r1 = int(np.argmax(_tails(sigma) <= theta))  # tails[k] = 0 <= theta, so one always passes
    upper = k if max_rank is None else min(max_rank, k)
    return min(max(r1, min_rank), upper)


def truncate_to_rank(Uh, Sh, Vh, r1):
    """SVD Sh = P diag(sigma) Q^T; U1 = Uh P[:, :r1], S1 = diag(sigma[:r1]), V1 = Vh Q[:, :r1]."""
    P, sigma, Qt = np.linalg.svd(Sh, full_matrices=False)
    Q = Qt.T  # numpy returns Q^T: the right singular vectors are the COLUMNS of Q = ROWS of Qt
    return Uh @ P[:, :r1], np.diag(sigma[:r1]), Vh @ Q[:, :r1]


def truncate(Uh, Sh, Vh, tau, *, absolute=False, min_rank=2, max_rank=None):
    """Truncate Uh Sh Vh^T: SVD Sh = P diag(sigma) Q^T, r1 = truncation_rank(sigma, tau, ...).

    Returns (Uh P[:, :r1], diag(sigma_1..sigma_r1), Vh Q[:, :r1]); the error in Frobenius norm is
    tail_norm(sigma, r1) <= theta (when the clamps do not bind).
    """
    sigma = np.linalg.svd(Sh, compute_uv=False)
    r1 = truncation_rank(sigma, tau, absolute=absolute, min_rank=min_rank, max_rank=max_rank)
    return truncate_to_rank(Uh, Sh, Vh, r1)


def _truncate_or_keep(Uh, Sh, Vh, r, tau, absolute, min_rank, max_rank):
    """tau None: fixed-rank variant, truncate to exactly the old rank r; else `truncate`."""
    if tau is None:
        return truncate_to_rank(Uh, Sh, Vh, r)
    return truncate(Uh, Sh, Vh, tau, absolute=absolute, min_rank=min_rank, max_rank=max_rank)


# ----------------------------------------------------------------------------- integrators


def bug_step(U, S, V, grad_fn, h):
    """Fixed-rank unconventional KLS (BUG). Two gradient evaluations.

    K-step: G0 = G(U S V^T); K1 = U S - h G0 V;    U1 = orth(K1); M = U1^T U.
    L-step: (same G0)        L1 = V S^T - h G0^T U; V1 = orth(L1); N = V1^T V.
    S-step: S~ = M S N^T;    S1 = S~ - h U1^T G(U1 S~ V1^T) V1.
    """
    G0 = grad_fn(U @ S @ V.T)
    # K-step
    K1 = U @ S - h * G0 @ V
    U1 = orth(K1)
    M = U1.T @ U
    # L-step
    L1 = V @ S.T - h * G0.T @ U
    V1 = orth(L1)
    N = V1.T @ V
    # S-step (Galerkin, forward in time)
    S_t = M @ S @ N.T
    G1 = grad_fn(U1 @ S_t @ V1.T)
    S1 = S_t - h * U1.T @ G1 @ V1
    return U1, S1, V1


def adaptive_bug_step(U, S, V, grad_fn, h, tau, *, absolute=False, min_rank=2, max_rank=None):
    """Rank-adaptive BUG (DLRT default). Two gradient evaluations, then truncation.

    K-step: K1 = U S - h G0 V;    U^ = orth([K1 | U])  (n x 2r), G0 = G(U S V^T).
    L-step: L1 = V S^T - h G0^T U; V^ = orth([L1 | V])  (m x 2r).
    U^ and V^ are bases of exactly span([K1 | U]) and span([L1 | V]) (span_basis): when those are
    rank-deficient (at most 2r columns), a QR completion would add arbitrary directions on which
    the S-step gradient is not zero, and the step would depend on roundoff.
    S-step: S^0 = (U^^T U) S (V^T V^);  S^1 = S^0 - h U^^T G(U^ S^0 V^^T) V^.
    Truncate: truncate(U^, S^1, V^, tau, ...); tau None keeps exactly the old rank r.
    """
    r = S.shape[0]
    G0 = grad_fn(U @ S @ V.T)
    # K-step (augmented with the old basis U, not U S)
    K1 = U @ S - h * G0 @ V
    Uh = span_basis(np.hstack([K1, U]))
    # L-step
    L1 = V @ S.T - h * G0.T @ U
    Vh = span_basis(np.hstack([L1, V]))
    # S-step on the augmented bases (augmentation is exact: Uh Sh0 Vh^T = U S V^T)
    Sh0 = (Uh.T @ U) @ S @ (V.T @ Vh)
    G1 = grad_fn(Uh @ Sh0 @ Vh.T)
    Sh1 = Sh0 - h * Uh.T @ G1 @ Vh
    return _truncate_or_keep(Uh, Sh1, Vh, r, tau, absolute, min_rank, max_rank)


def ksl_step(U, S, V, grad_fn, h):
    """Projector-splitting KSL (Lie-Trotter). Three gradient evaluations, fixed rank.

    K-step: K1 = U S - h G(U S V^T) V;           (U1, S^) = qr(K1).
    S-step: S~ = S^ + h U1^T G(U1 S^ V^T) V       (backward in time).
    L-step: L0 = V S~^T; L1 = L0 - h G(U1 L0^T)^T U1; (V1, R) = qr(L1); S1 = R^T.
    """
    # K-step
    K1 = U @ S - h * grad_fn(U @ S @ V.T) @ V
    U1, S_hat = np.linalg.qr(K1, mode="reduced")
    # S-step, backward in time
    S_t = S_hat + h * U1.T @ grad_fn(U1 @ S_hat @ V.T) @ V
    # L-step
    L0 = V @ S_t.T
    L1 = L0 - h * grad_fn(U1 @ L0.T).T @ U1
    V1, R = np.linalg.qr(L1, mode="reduced")
    return U1, R.T, V1


def complement_basis(B, A):
    """Orthonormal U~, orthogonal to B, whose span contains (I - B B^T) A; B (n x r) orthonormal.

    U~ = C orth(C^T A), C = the last n - r columns of a complete QR of B (an orthonormal basis of
    range(B)'s complement); U~ has min(cols(A), n - r) columns. Span-wise this is the spec's
    orth((I - B B^T)(I - B B^T) A) whenever that projection has full column rank. Unlike that
    literal recipe it stays orthogonal to B when the projection is rank-deficient (QR of a matrix
    with numerically zero columns returns columns NOT orthogonal to B; this happens structurally
    from the second parallel step on, see test_complement_basis_rank_deficient).
    """
    C = np.linalg.qr(B, mode="complete")[0][:, B.shape[1] :]
    return C @ orth(C.T @ A)


def parallel_bug_step(U, S, V, grad_fn, h, tau, *, absolute=False, min_rank=2, max_rank=None):
    """Parallel rank-adaptive BUG. One gradient G0 = G(U S V^T); all substeps start from (U, S, V).

    K1 = U S - h G0 V;  L1 = V S^T - h G0^T U;  S_ = S - h U^T G0 V.
    U~ = orth((I - U U^T) K1), V~ = orth((I - V V^T) L1), computed robustly by complement_basis.
    U^ = [U | U~], V^ = [V | V~], S^ = [[S_, L1^T V~], [U~^T K1, 0]] (2r x 2r when 2r <= n, m);
    then truncate(U^, S^, V^, tau, ...); tau None keeps exactly the old rank r.
    Before truncation U^ S^ V^^T = W0 - h (P_U G0 + G0 P_V - P_U G0 P_V), whatever basis U~ is.
    """
    r = S.shape[0]
    G0 = grad_fn(U @ S @ V.T)
    # K-step
    K1 = U @ S - h * G0 @ V
    U_t = complement_basis(U, K1)
    # L-step
    L1 = V @ S.T - h * G0.T @ U
    V_t = complement_basis(V, L1)
    # S-step
    S_ = S - h * U.T @ G0 @ V
    Uh = np.hstack([U, U_t])
    Vh = np.hstack([V, V_t])
    Sh = np.block([[S_, L1.T @ V_t], [U_t.T @ K1, np.zeros((U_t.shape[1], V_t.shape[1]))]])
    return _truncate_or_keep(Uh, Sh, Vh, r, tau, absolute, min_rank, max_rank)


def s_only_step(U, S, V, grad_fn, h):
    """S fine-tuning: S1 = S - h U^T G(U S V^T) V with U and V fixed."""
    return U, S - h * U.T @ grad_fn(U @ S @ V.T) @ V, V


def cycle(
    U, S, V, grad_fn, h, tau, k, steps, *, augment_step, min_rank=2, max_rank=None, hold=False
):
    """The augment-train-truncate cycle: `steps` steps from (U, S, V).

    Returns (U, S, V, history) with history[t] = (rank, W) after step t.

    Step t (from 0): if t % k == 0, `augment_step` (an adaptive integrator step above) with nothing
    cut (tau = 0, absolute: the rank grows to 2r, at most max_rank); otherwise the coefficient step
    S <- S - h U^T G(U S V^T) V with U, V fixed. Then, if t % k == k - 1, truncate(U, S, V, tau)
    (SVD of S). k = 1 is the integrator's own step: the same singular values are cut.

    hold=True: the steps between augmentations are `augment_step` itself, truncated back to the
    current rank (tau None), and the last one of each cycle is `augment_step`
    with tau: the bases move at every step, the rank only at the cycle's two ends.
    """
    history = []
    for t in range(steps):
        last = t % k == k - 1
        if t % k == 0:
            U, S, V = augment_step(
                U, S, V, grad_fn, h, 0.0, absolute=True, min_rank=min_rank, max_rank=max_rank
            )
        elif hold and last:
            U, S, V = augment_step(U, S, V, grad_fn, h, tau, min_rank=min_rank, max_rank=max_rank)
        elif hold:  # tau None: truncated back to the current rank
            U, S, V = augment_step(U, S, V, grad_fn, h, None)
        else:
            S = S - h * U.T @ grad_fn(U @ S @ V.T) @ V
        if last and not hold:
            U, S, V = truncate(U, S, V, tau, min_rank=min_rank, max_rank=max_rank)
        history.append((S.shape[0], U @ S @ V.T))
    return U, S, V, history


def gradient_descent_dense(W, grad_fn, h, steps):
    """Dense gradient descent: W_{k+1} = W_k - h G(W_k), `steps` times."""
    for _ in range(steps):
        W = W - h * grad_fn(W)
    return W


# ----------------------------------------------------------------------------- problems


def matrix_loss(A):
    """(loss, grad) with loss(W) = 0.5 ||W - A||_F^2, grad(W) = W - A."""
    return (lambda W: 0.5 * float(np.sum((W - A) ** 2))), (lambda W: W - A)


def regression_loss(X, Y):
    """(loss, grad) with loss(W) = 0.5 ||X W^T - Y||_F^2, grad(W) = (X W^T - Y)^T X.

    X is (B x m), Y is (B x n), W is (n x m).
    """

    def loss(W):
        return 0.5 * float(np.sum((X @ W.T - Y) ** 2))

    def grad(W):
        return (X @ W.T - Y).T @ X

    return loss, grad


def random_lowrank(rng, n, m, r, *, decay=None):
    """(U, S, V): U = orth(N(0,1)^{n x r}), V = orth(N(0,1)^{m x r}), S = diag(s).

    s = |N(0,1)| samples sorted descending; with `decay`, s_k <- s_k / decay^k (k = 0..r-1).
    """
    U = orth(rng.standard_normal((n, r)))
    V = orth(rng.standard_normal((m, r)))
    s = np.sort(np.abs(rng.standard_normal(r)))[::-1]
    if decay is not None:
        s = s / float(decay) ** np.arange(r)
    return U, np.diag(s), V
