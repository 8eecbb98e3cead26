"""Small linear-algebra helpers used by the integrators.

Basis arithmetic (orthogonalisation, basis-change matrices, projections, truncation products)
runs at full float32 precision on every backend: on GPUs the default float32 matmul is TF32,
which leaves ``Q^T Q - I`` at about 1e-3 after one product (``docs/method.md``,
"Full precision").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix product at full precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def mmt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` at full precision."""
    return jnp.matmul(a, b.T, precision=HIGHEST)


def tmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` at full precision."""
    return jnp.matmul(a.T, b, precision=HIGHEST)


def _guard(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero out a non-finite input and report it: LAPACK's QR/SVD can loop forever on NaN."""
    ok = jnp.all(jnp.isfinite(a))
    return jnp.where(ok, a, jnp.zeros((), a.dtype)), ok


def _poison(ok: jax.Array, *outs: jax.Array):
    """NaN-fill the outputs of a guarded call on a non-finite input (so the step is skipped)."""
    return tuple(jnp.where(ok, o, jnp.full((), jnp.nan, o.dtype)) for o in outs)


def qr(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR, NaN-safe: a non-finite input gives NaN outputs instead of a LAPACK call on it."""
    a, ok = _guard(a)
    return _poison(ok, *jnp.linalg.qr(a))


def svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``a = P diag(sigma) Qt``, NaN-safe like :func:`qr`."""
    a, ok = _guard(a)
    return _poison(ok, *jnp.linalg.svd(a, full_matrices=False))


def orth(a: jax.Array) -> jax.Array:
    """Orthonormal basis from a reduced Householder QR (NaN-safe, see :func:`qr`).

    Householder QR returns a ``Q`` with orthonormal columns even where columns of ``a`` are zero or
    linearly dependent (those columns of ``Q`` are then an arbitrary orthonormal completion), which
    the integrators rely on: every basis they produce has all of its columns orthonormal.
    """
    return qr(a)[0]


def column_norms(a: jax.Array) -> jax.Array:
    """Euclidean norms of the columns of ``a``, safe from over- and underflow."""
    scale = jnp.max(jnp.abs(a), axis=0)
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale * jnp.sqrt(jnp.sum(jnp.square(a / safe), axis=0))


def orth_span(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An orthonormal ``Q`` (all columns) whose flagged leading columns span exactly ``range(a)``.

    Returns ``(Q, in_span)``: ``Q`` has ``a.shape[1]`` orthonormal columns, and the columns with
    ``in_span`` true (a prefix) are an orthonormal basis of the numerical range of ``a``; the others
    are an arbitrary orthonormal completion. The rank-adaptive BUG gives the completion no Galerkin
    update, so its step does not depend on roundoff when ``[K1 | U0]`` is rank-deficient.

    A first Householder QR flags the columns of ``a`` that are (numerically) in the span of the
    previous ones: pivot ``|R_jj|`` at roundoff level relative to the column's own norm, so the
    test does not depend on the scale of ``K1`` against ``U0``. A dependent column in the middle
    makes QR insert an arbitrary direction that later columns are orthogonalised against, so a
    second QR runs on the columns reordered with the spanning ones first.
    """
    tol = 16.0 * jnp.finfo(a.dtype).eps * (a.shape[0] ** 0.5)

    def qr_flags(b):
        q, r = qr(b)
        return q, jnp.abs(jnp.diagonal(r)) > tol * column_norms(b)  # zero columns: False

    _, ok = qr_flags(a)
    return qr_flags(a[:, jnp.argsort(~ok, stable=True)])


def filler(shape: tuple[int, int], dtype) -> jax.Array:
    """A fixed pseudo-random ``(n, k)`` matrix with entries in ``[-1, 1)`` and columns of norm ~1.

    Put into the inactive (zero) columns of a matrix before a QR: LAPACK's Householder QR is
    about 1.6x slower on exactly zero columns, and generic columns give the QR a well-defined
    orthonormal completion there. Built from an integer hash of the indices (no PRNG state;
    XLA evaluates it for free), so it is the same on every call.
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

    ``lax.cond(ok, lambda: fast, slow)`` with ``fast`` computed outside the branch costs XLA:CPU
    a full copy of every returned array plus layout changes for the LAPACK calls in ``slow``
    (about 0.3 ms for a ``5120 x 32`` basis, three times per basis and step). Here the branch
    returns zeros on the fast path and the result is a ``select`` that XLA fuses into the
    neighbouring operations (about 0.05 ms).
    """
    fb = jax.lax.cond(
        ok, lambda _: jax.tree_util.tree_map(jnp.zeros_like, fast), lambda _: slow(), None
    )
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), fast, fb)


def orthonormal_basis(U: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, Linv)`` with ``B Linv^T`` orthonormal and spanning ``span(U)``; the product is not
    formed.

    For the bases the integrators keep (orthonormal up to roundoff) ``B = U`` and ``Linv = L^{-1}``
    with ``L L^T = U^T U`` (Cholesky-QR: ``Linv = I + O(eps)``); folding ``Linv`` into later
    ``c x c`` factors re-orthonormalises ``U`` at the cost of its Gram matrix, so roundoff cannot
    accumulate over steps. Should ``U`` be far from orthonormal (a hand-made or corrupted factor:
    a pivot of ``L`` below 1/2), ``B`` is its Householder QR factor and ``Linv = I``.
    NaN-safe like :func:`qr`.
    """
    c = U.shape[1]
    eye = jnp.eye(c, dtype=U.dtype)
    gram, finite = _guard(tmm(U, U))
    L = jnp.linalg.cholesky(jnp.where(finite, gram, eye))
    Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
    ok = finite & jnp.all(jnp.isfinite(Linv)) & (jnp.min(jnp.diagonal(L)) > 0.5)
    return select_or(ok, (U, Linv), lambda: (orth(U), eye))


def cholesky_qr2(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cholesky-QR2: ``a = Q R`` from two passes of ``Q = a L^{-T}``, ``L L^T = a^T a``.

    Matrix products only (full precision), so it runs at matmul speed where LAPACK's
    Householder QR does not, but it is only accurate for well-conditioned ``a``
    (``cond(a) << eps^{-1/2}``, about 3e3 in float32). Returns ``(Q, R, ok)``: ``ok`` is False
    when the first pass left ``Q`` far from orthonormal (``max |Q^T Q - I| > 0.1``: ``a``
    too ill-conditioned or rank-deficient) or anything is not finite; the caller must then use
    Householder QR instead.
    """
    q1, _, Linv2, r, ok = _cholesky_qr2_parts(a)
    return mmt(q1, Linv2), r, ok


def qr_fast(a: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Reduced QR ``a = Q R``: :func:`cholesky_qr2` (matrix products) when ``a`` is
    well-conditioned, else Householder (:func:`qr`). NaN-safe like :func:`qr`.

    With ``mask``, the columns outside it are replaced by :func:`filler` first (a zero column
    would make the Cholesky factor singular); ``Q``'s columns there are then an orthonormal
    completion and ``R`` is only meaningful on ``mask``. Both give a valid QR, so the result
    differs between the two paths only by the signs of ``Q``'s columns and ``R``'s rows.
    """
    if mask is not None:
        a = fill_cols(a, mask)
    q, r, ok = cholesky_qr2(a)
    return select_or(ok, (q, r), lambda: qr(a))


def orth_complement(U: jax.Array, Linv: jax.Array, D: jax.Array, mask: jax.Array):
    """An orthonormal ``Q`` (``n x c``) orthogonal to the ``c`` columns of ``Uc = U Linv^T``,
    whose leading ``r`` columns span ``(I - Uc Uc^T) D[:, :r]`` (``mask`` = the leading ``r``),
    returned in factored form.

    ``Uc`` (orthonormal: see :func:`orthonormal_basis`) is never formed, and neither, usually,
    is ``Q``: returns ``(Bm, F, G, Uc^T D, Q^T D)`` with ``Q = U F + Bm G`` (``F``, ``G``
    ``c x c``) and the columns of ``D`` outside ``mask`` taken as zero. ``[Uc | Q]`` is then an
    orthonormal basis of ``2c`` columns whose leading ``c + r`` columns contain
    ``span([Uc | D[:, :r]])``: the parallel BUG's augmented basis at the cost of one ``n x c``
    QR instead of ``n x 2c``. A caller needing ``[Uc | Q] P`` forms it with two products,
    ``U (Linv^T P_top + F P_bot) + Bm (G P_bot)``.

    ``B = (I - Uc Uc^T) D``, the zero and inactive columns of ``D`` replaced by :func:`filler`
    first (that does not change the span, avoids LAPACK's slow path on zero columns and gives
    the QR a generic completion orthogonal to ``Uc``). Usually (fast path) ``B = Qh R`` by
    Cholesky-QR2, ``Qh = B R^{-1}``, ``T = Uc^T Qh = (Uc^T B) R^{-1}`` is at roundoff level and
    one correction ``Q = Qh - Uc T`` makes ``Q`` orthogonal to ``Uc``: ``Bm = B``,
    ``G = R^{-1}``, ``F = -Linv^T T``, ``Q^T D = R`` (on the used columns). Neither ``Qh`` nor
    ``Q`` is formed, which saves two of the ``n x c x c`` products. Otherwise (slow path, ``Q``
    formed: ``Bm = Q``, ``F = 0``, ``G = I``): Householder where Cholesky-QR2 fails; where the
    QR had to complete rank-deficient columns (directions picked freely in ``R^n``), ``T`` is
    large and ``Qh - Uc T`` is re-orthonormalised by Cholesky-QR (same span) and, should a
    completion lie numerically inside ``span(Uc)`` (the Cholesky factor then being singular),
    the QR of the ``n x 2c`` matrix ``[Uc | B]`` is used instead.
    """
    c = D.shape[1]
    eye = jnp.eye(c, dtype=D.dtype)
    D = mask_cols(D, mask)
    keep = mask & jnp.any(D != 0, axis=0)
    Df = fill_cols(D, keep)
    Af = mm(Linv, tmm(U, Df))  # Uc^T Df
    B = Df - mm(U, tmm(Linv, Af))
    A = mask_cols(Af, keep)
    # Cholesky-QR2 of B up to its last product: Qh = Q1 L2^{-T}, Q1 = B L1^{-T}
    q1, Linv1, Linv2, Rc, well_conditioned = _cholesky_qr2_parts(B)
    Rinv = mm(Linv1.T, Linv2.T)  # R = L2^T L1^T
    T = mm(mm(Linv, tmm(U, B)), Rinv)  # Uc^T Qh
    tiny = jnp.all(jnp.isfinite(T)) & (jnp.max(jnp.abs(T)) <= 1e-3)

    def slow():
        Qh = select_or(well_conditioned, mmt(q1, Linv2), lambda: qr(B)[0])
        T = mm(Linv, tmm(U, Qh))
        Q0 = Qh - mm(U, tmm(Linv, T))
        gram, finite = _guard(tmm(Q0, Q0))
        L = jnp.linalg.cholesky(jnp.where(finite, gram, eye))
        ok = finite & jnp.all(jnp.isfinite(L)) & (jnp.min(jnp.diagonal(L)) > 0.25)
        small = jnp.max(jnp.abs(T)) <= 1e-3

        def clean(_):
            Li = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
            return jnp.where(small, Q0, mmt(Q0, Li))

        def robust(_):
            Uc = mmt(U, Linv)
            return orth(jnp.concatenate([Uc, B], axis=1))[:, c:]

        Q = jax.lax.cond(ok, clean, robust, None)
        return Q, jnp.zeros_like(eye), eye, tmm(Q, D)

    fast = (B, -tmm(Linv, T), Rinv, mask_cols(Rc, keep))
    return (A, *select_or(well_conditioned & tiny, fast, slow))


def _cholesky_qr2_parts(a: jax.Array):
    """:func:`cholesky_qr2` up to its last product: ``(Q1, L1^{-1}, L2^{-1}, R, ok)`` with
    ``Q1 = a L1^{-T}`` and ``Q = Q1 L2^{-T}``."""
    c = a.shape[1]
    eye = jnp.eye(c, dtype=a.dtype)

    def factor(x):
        gram, finite = _guard(tmm(x, x))
        L = jnp.linalg.cholesky(jnp.where(finite, gram, eye))
        Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
        return L, Linv, gram, finite & jnp.all(jnp.isfinite(Linv))

    L1, Linv1, _, ok1 = factor(a)
    q1 = mmt(a, Linv1)
    L2, Linv2, gram2, ok2 = factor(q1)
    ok = ok1 & ok2 & (jnp.max(jnp.abs(gram2 - eye)) <= 0.1)
    return q1, Linv1, Linv2, mm(L2.T, L1.T), ok


def column_mask(capacity: int, rank: jax.Array) -> jax.Array:
    """Boolean vector ``[j < rank for j in range(capacity)]``."""
    return jnp.arange(capacity) < rank


def mask_cols(a: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask[None, :], a, jnp.zeros((), a.dtype))


def mask_block(a: jax.Array, row_mask: jax.Array, col_mask: jax.Array) -> jax.Array:
    return jnp.where(row_mask[:, None] & col_mask[None, :], a, jnp.zeros((), a.dtype))


def active_first_concat(a: jax.Array, b: jax.Array, rank: jax.Array) -> jax.Array:
    """Concatenate ``[a | b]`` (both ``(n, c)``) with the active columns of both first.

    Returns an ``(n, 2c)`` matrix whose columns are ``a[:, :r], b[:, :r]`` followed by the inactive
    columns, so that the augmented basis built from it has its ``2r`` active columns as a prefix.
    """
    c = a.shape[1]
    r = rank.astype(jnp.int32)
    j = jnp.arange(2 * c)
    idx = jnp.where(
        j < r,
        j,
        jnp.where(j < 2 * r, c + j - r, jnp.where(j < c + r, j - r, j)),
    )
    return jnp.take(jnp.concatenate([a, b], axis=1), idx, axis=1)
