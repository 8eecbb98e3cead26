"""Small linear-algebra helpers used by the integrators.

Basis arithmetic (orthogonalisation, basis-change matrices, projections, truncation products)
runs at full float32 precision on every backend: on GPUs the default float32 matmul is TF32,
which leaves ``Q^T Q - I`` at about 1e-3 after one product (``dlrt.md`` section 5).
"""

from __future__ import annotations

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


def orth_span(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``orth(a)`` and a boolean vector of the columns of ``Q`` that come from ``a``.

    Column ``j`` of ``Q`` is flagged ``False`` when the QR pivot ``|R_jj|`` is at roundoff level
    relative to the largest pivot, i.e. when column ``j`` of ``a`` lies (numerically) in the span
    of the previous columns. Those columns of ``Q`` are an arbitrary completion, not part of the
    span of ``a``; the rank-adaptive BUG gives them no Galerkin update, so its step does not depend
    on roundoff when ``[K1 | U0]`` is rank-deficient.
    """
    q, r = qr(a)
    d = jnp.abs(jnp.diagonal(r))
    eps = jnp.finfo(a.dtype).eps
    tol = 16.0 * eps * (a.shape[0] ** 0.5) * jnp.max(d)
    return q, d > tol


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
