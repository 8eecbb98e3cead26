"""Linear-algebra building blocks of the integrators.

Basis arithmetic (orthogonalisation, basis-change matrices, projections, truncation products) must
run at full float32 precision on every backend: on GPUs the default float32 matmul is TF32, which
leaves ``Q^T Q - I`` at about 1e-3 after one product (``docs/method.md``, "Full precision").
Every function here that forms products runs under :func:`full_precision`, which the integrator
driver enters once around each phase; the products themselves are written with ``@``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def full_precision():
    """The one precision context of the core: every matrix product traced inside it is HIGHEST.

    ``jax.default_matmul_precision`` sets the precision of each ``dot_general`` when it is traced,
    so it is written into the program (``precision = [HIGHEST, HIGHEST]`` in the lowered
    StableHLO) and holds on every backend; the user's model, traced outside, keeps its own.
    """
    return jax.default_matmul_precision("highest")


def _guard(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero out a non-finite input and report it: an iterative SVD can loop forever on NaN."""
    ok = jnp.all(jnp.isfinite(a))
    return jnp.where(ok, a, jnp.zeros((), a.dtype)), ok


def _poison(ok: jax.Array, *outs: jax.Array):
    """NaN-fill the outputs of a guarded call on a non-finite input (so the step is skipped)."""
    return tuple(jnp.where(ok, o, jnp.full((), jnp.nan, o.dtype)) for o in outs)


def qr(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced Householder QR. A direct method (so is Cholesky): on a non-finite input it returns
    non-finite outputs, which the driver's final check turns into a skipped step; no guard (a
    guard is a reduction and two selects per call, kernels that the compiler pays for)."""
    q, r = jnp.linalg.qr(a)
    return q, r


def svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``a = P diag(sigma) Qt``, NaN-safe: the SVD iterates, so a non-finite input is
    replaced by zeros before the call and the outputs are NaN-filled (the step is skipped)."""
    a, ok = _guard(a)
    return _poison(ok, *jnp.linalg.svd(a, full_matrices=False))


def orth(a: jax.Array) -> jax.Array:
    """Orthonormal basis from a reduced Householder QR (non-finite where ``a`` is: see :func:`qr`).

    Householder QR gives orthonormal columns even where columns of ``a`` are zero or dependent
    (an arbitrary completion there): every basis the integrators produce is orthonormal in full.
    """
    return qr(a)[0]


def column_norms(a: jax.Array) -> jax.Array:
    """Euclidean norms of the columns of ``a``, safe from over- and underflow."""
    scale = jnp.max(jnp.abs(a), axis=0)
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale * jnp.sqrt(jnp.sum(jnp.square(a / safe), axis=0))


def orth_span(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An orthonormal ``Q`` (all columns) whose flagged leading columns span exactly ``range(a)``.

    Returns ``(Q, in_span)``: the columns with ``in_span`` true (a prefix) are an orthonormal basis
    of the numerical range of ``a``, the others an arbitrary completion. The rank-adaptive BUG gives
    the completion no Galerkin update, so its step does not depend on roundoff when ``[K1 | U0]``
    is rank-deficient. A first Householder QR flags the columns numerically in the span of the
    previous ones (pivot ``|R_jj|`` at roundoff level relative to the column's own norm); a second
    QR runs on the columns reordered with the spanning ones first, since a dependent column in the
    middle makes QR insert a direction that later columns are orthogonalised against.
    """
    tol = 16.0 * jnp.finfo(a.dtype).eps * (a.shape[0] ** 0.5)

    def qr_flags(b):
        q, r = qr(b)
        return q, jnp.abs(jnp.diagonal(r)) > tol * column_norms(b)  # zero columns: False

    _, ok = qr_flags(a)
    return qr_flags(a[:, jnp.argsort(~ok, stable=True)])


def filler(shape: tuple[int, int], dtype) -> jax.Array:
    """A fixed pseudo-random ``(n, k)`` matrix with entries in ``[-1, 1)`` and columns of norm ~1.

    Put into the inactive (zero) columns of a matrix before a QR: LAPACK's Householder QR is about
    1.6x slower on exactly zero columns, and generic columns give the QR a well-defined completion.
    An integer hash of the indices (no PRNG state; XLA evaluates it for free).
    """
    n, k = shape
    i = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    j = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
    h = (i * jnp.uint32(0x9E3779B1)) ^ (j * jnp.uint32(0x85EBCA77) + jnp.uint32(0x165667B1))
    h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
    h = (h ^ (h >> 12)) * jnp.uint32(0x297A2D39)
    h = h ^ (h >> 15)
    u = h.astype(jnp.float32) * (2.0 / 4294967296.0) - 1.0  # uniform in [-1, 1)
    return (u * (3.0 / n) ** 0.5).astype(dtype)


def fill_cols(a: jax.Array, mask: jax.Array) -> jax.Array:
    """``a`` with its columns outside ``mask`` replaced by :func:`filler` columns."""
    return jnp.where(mask[None, :], a, filler(a.shape, a.dtype))


def select_or(ok: jax.Array, fast, slow: Callable[[], Any]):
    """``fast`` where ``ok``, else ``slow()`` (a pytree like ``fast``), computed only then.

    ``lax.cond(ok, lambda: fast, slow)`` with ``fast`` computed outside the branch costs XLA:CPU a
    copy of every returned array plus layout changes for the LAPACK calls in ``slow`` (about
    0.3 ms for a ``5120 x 32`` basis). Here the branch returns zeros on the fast path and the
    result is a ``select`` that XLA fuses into the neighbouring operations (about 0.05 ms).
    """
    fb = jax.lax.cond(ok, lambda _: jax.tree.map(jnp.zeros_like, fast), lambda _: slow(), None)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), fast, fb)


def _gram_cholesky(a: jax.Array):
    """``(L, L^{-1})`` with ``L L^T = a^T a`` (non-finite where ``a`` is: see :func:`qr`)."""
    eye = jnp.eye(a.shape[1], dtype=a.dtype)
    L = jnp.linalg.cholesky(a.T @ a)
    return L, jax.scipy.linalg.solve_triangular(L, eye, lower=True)


#: Gram matrices within this Frobenius distance of ``I`` are orthonormalised without a solver.
NEAR_IDENTITY = 0.1


def near_identity_inverse_cholesky(gram: jax.Array, steps: int = 3) -> tuple[jax.Array, jax.Array]:
    """``(Linv, ok)``: a lower-triangular ``Linv`` with ``Linv gram Linv^T = I``, matmuls only.

    For ``gram = I + E`` with ``||E||_F <= NEAR_IDENTITY`` (``ok``; also False where ``gram`` is
    not finite). Each step replaces ``Linv`` by ``(I - Phi(E_k)) Linv`` with ``E_k = Linv gram
    Linv^T - I`` and ``Phi(E)`` the lower triangle of ``E`` with half its diagonal (``Phi + Phi^T
    = E``), which squares the residual: ``||E_{k+1}|| = O(||E_k||^2)``, so three steps take
    ``0.1`` to below float32 roundoff. ``Linv`` is then ``L^{-1}`` of the Cholesky factor ``L L^T
    = gram`` to roundoff, without the ``potrf`` / triangular-solve calls of a Cholesky (a solver
    call and, on GPUs, a kernel launch each) or a branch.
    """
    c = gram.shape[0]
    eye = jnp.eye(c, dtype=gram.dtype)
    E = gram - eye
    # one reduction, no separate finiteness test: a NaN or Inf in E makes the norm fail the test
    ok = jnp.sqrt(jnp.sum(jnp.square(E))) <= NEAR_IDENTITY
    E = jnp.where(ok, E, jnp.zeros((), E.dtype))  # a failed input gives Linv = I (then unused)
    Linv = eye
    for k in range(steps):
        if k:
            E = Linv @ gram @ Linv.T - eye
            E = jnp.where(ok, 0.5 * (E + E.T), jnp.zeros((), E.dtype))
        Linv = Linv - (jnp.tril(E, -1) + 0.5 * jnp.diag(jnp.diagonal(E))) @ Linv
    return Linv, ok


@jax.jit
def orthonormal_basis(U: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, Linv)`` with ``B Linv^T`` orthonormal and spanning ``span(U)``; not formed.

    For the bases the integrators keep (orthonormal up to roundoff) ``B = U`` and ``Linv = L^{-1}``
    with ``L L^T = U^T U`` (:func:`near_identity_inverse_cholesky` of the Gram matrix, ``Linv = I +
    O(eps)``): folding ``Linv`` into later ``c x c`` factors re-orthonormalises ``U`` at the cost of
    its Gram matrix, so roundoff cannot accumulate over steps. Should ``U`` be far from
    orthonormal (a hand-made factor: ``||U^T U - I||_F > 0.1``), ``B`` is its Householder QR factor
    and ``Linv = I``. Non-finite input: non-finite output.
    """
    Linv, ok = near_identity_inverse_cholesky(U.T @ U)  # False where U is not finite
    return select_or(ok, (U, Linv), lambda: (orth(U), jnp.eye(U.shape[1], dtype=U.dtype)))


class CholeskyQR2(NamedTuple):
    """:func:`cholesky_qr2` up to its last product: ``Q = Q1 L2^{-T}``, ``Q1 = a L1^{-T}``."""

    Q1: jax.Array
    L1inv: jax.Array
    L2inv: jax.Array
    R: jax.Array  # L2^T L1^T
    ok: jax.Array  # finite, and Q1 close to orthonormal (||Q1^T Q1 - I||_F <= NEAR_IDENTITY)


def cholesky_qr2(a: jax.Array) -> CholeskyQR2:
    """Cholesky-QR2 of ``a`` in factored form: ``a = Q R`` from two passes of ``Q = a L^{-T}``.

    Matrix products and one Cholesky only (the second pass, on a ``Q1`` orthonormal to about
    ``eps cond(a)^2``, is :func:`near_identity_inverse_cholesky`), so it runs at matmul speed
    where Householder QR does not, but it is only accurate for well-conditioned ``a``
    (``cond(a) << eps^{-1/2}``, about 3e3 in float32): where ``ok`` is False the caller must use
    Householder QR.
    """
    L1, L1inv = _gram_cholesky(a)
    q1 = a @ L1inv.T
    gram2 = q1.T @ q1
    L2inv, ok2 = near_identity_inverse_cholesky(gram2)
    L2 = jnp.tril(gram2 @ L2inv.T)  # = L2inv^{-1}, since L2inv gram2 L2inv^T = I
    ok = ok2  # a non-finite a or L1inv (a failed Cholesky) makes gram2 non-finite: ok2 False
    return CholeskyQR2(q1, L1inv, L2inv, L2.T @ L1.T, ok)


def qr_fast(a: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Reduced QR ``a = Q R``: :func:`cholesky_qr2` where ``a`` is well-conditioned, else
    Householder (:func:`qr`). Non-finite input: non-finite output.

    With ``mask``, the columns outside it are replaced by :func:`filler` first (a zero column makes
    the Cholesky factor singular); ``Q``'s columns there are an orthonormal completion and ``R`` is
    meaningful on ``mask`` only. The two paths differ only by the signs of ``Q``'s columns.
    """
    if mask is not None:
        a = fill_cols(a, mask)
    f = cholesky_qr2(a)
    return select_or(f.ok, (f.Q1 @ f.L2inv.T, f.R), lambda: qr(a))


class Complement(NamedTuple):
    """An orthonormal ``Q = U F + B G`` orthogonal to ``Uc`` (see :func:`orth_complement`)."""

    UcD: jax.Array  # Uc^T D, on the used columns of D
    B: jax.Array
    F: jax.Array
    G: jax.Array
    QD: jax.Array  # Q^T D, on the used columns of D

    def basis_times(self, U: jax.Array, Linv: jax.Array, P: jax.Array) -> jax.Array:
        """``[Uc | Q] P`` for a ``2c x k`` matrix ``P``, with two ``n x c x k`` products."""
        c = U.shape[1]
        return U @ (Linv.T @ P[:c] + self.F @ P[c:]) + self.B @ (self.G @ P[c:])


@jax.jit
def orth_complement(U: jax.Array, Linv: jax.Array, D: jax.Array, mask: jax.Array) -> Complement:
    """An orthonormal ``Q`` (``n x c``) orthogonal to the ``c`` columns of ``Uc = U Linv^T``, whose
    leading ``r`` columns span ``(I - Uc Uc^T) D[:, :r]`` (``mask``: the leading ``r``).

    ``[Uc | Q]`` is then an orthonormal basis of ``2c`` columns whose leading ``c + r`` contain
    ``span([Uc | D[:, :r]])``: the parallel BUG's augmented basis at the cost of one ``n x c`` QR
    instead of ``n x 2c``. Neither ``Uc`` nor, usually, ``Q`` is formed: ``Q = U F + B G``
    (:class:`Complement`, ``F``, ``G`` are ``c x c``), the columns of ``D`` outside ``mask`` taken
    as zero.

    ``B = (I - Uc Uc^T) D`` with the zero and inactive columns of ``D`` replaced by :func:`filler`
    first (same span; a generic completion orthogonal to ``Uc``). Fast path: ``B = Qh R`` by
    Cholesky-QR2, ``T = Uc^T Qh = (Uc^T B) R^{-1}`` is at roundoff level and one correction
    ``Q = Qh - Uc T`` makes ``Q`` orthogonal to ``Uc``: ``G = R^{-1}``, ``F = -Linv^T T``,
    ``Q^T D = R``. Slow path (one branch, straight-line; ``Q`` formed, ``B = Q``, ``F = 0``,
    ``G = I``), where Cholesky-QR2 fails (``B`` ill-conditioned or rank-deficient) or ``T`` is not
    small: ``Q`` = the last ``c`` columns of the Householder QR of ``[Uc | B]``, orthonormal and
    orthogonal to ``Uc`` whatever the rank of ``B``.
    """
    c = D.shape[1]
    eye = jnp.eye(c, dtype=D.dtype)
    D = mask_cols(D, mask)
    keep = mask & jnp.any(D != 0, axis=0)
    Df = fill_cols(D, keep)
    UcDf = Linv @ (U.T @ Df)
    B = Df - U @ (Linv.T @ UcDf)
    f = cholesky_qr2(B)  # Qh = Q1 L2^{-T}, R = L2^T L1^T
    Rinv = f.L1inv.T @ f.L2inv.T
    T = (Linv @ (U.T @ B)) @ Rinv  # Uc^T Qh
    tiny = jnp.max(jnp.abs(T)) <= 1e-3  # False for NaN / Inf (max propagates NaN)

    def slow():
        Q = orth(jnp.concatenate([U @ Linv.T, B], axis=1))[:, c:]
        return Q, jnp.zeros_like(eye), eye, Q.T @ D

    fast = (B, -(Linv.T @ T), Rinv, mask_cols(f.R, keep))
    return Complement(mask_cols(UcDf, keep), *select_or(f.ok & tiny, fast, slow))


def column_mask(capacity: int, rank: jax.Array) -> jax.Array:
    """Boolean vector ``[j < rank for j in range(capacity)]``."""
    return jnp.arange(capacity) < rank


def mask_cols(a: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask[None, :], a, jnp.zeros((), a.dtype))


def mask_block(a: jax.Array, row_mask: jax.Array, col_mask: jax.Array) -> jax.Array:
    return jnp.where(row_mask[:, None] & col_mask[None, :], a, jnp.zeros((), a.dtype))


def active_first_concat(a: jax.Array, b: jax.Array, rank: jax.Array) -> jax.Array:
    """``[a | b]`` (both ``(n, c)``) as ``(n, 2c)`` with columns ``a[:, :r], b[:, :r]`` first, so
    that the augmented basis built from it has its ``2r`` active columns as a prefix."""
    c = a.shape[1]
    r = rank.astype(jnp.int32)
    j = jnp.arange(2 * c)
    idx = jnp.where(j < r, j, jnp.where(j < 2 * r, c + j - r, jnp.where(j < c + r, j - r, j)))
    return jnp.take(jnp.concatenate([a, b], axis=1), idx, axis=1)
