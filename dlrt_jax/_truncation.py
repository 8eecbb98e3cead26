"""The truncation rule of the rank-adaptive integrators (``docs/method.md``, "Truncation")."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["tail_norms", "truncation_rank"]


def tail_norms(sigma: jax.Array) -> jax.Array:
    r"""``t[rho] = sqrt(sum_{j > rho} sigma_j^2)`` for ``rho = 0 .. k-1`` (1-based ``j``).

    ``t[rho]`` is the Frobenius error of keeping the ``rho`` largest singular values; it includes
    the smallest singular value (the reference codes left it out). Computed as a reversed
    cumulative sum of squares, which is accurate for tails far below ``||sigma||``.
    """
    s = sigma.astype(jnp.float32) if sigma.dtype == jnp.bfloat16 else sigma
    # scaled by the largest value, so squares neither overflow (1e20) nor underflow (1e-30)
    smax = jnp.max(jnp.abs(s))
    scale = jnp.where(smax > 0, smax, jnp.ones_like(smax))
    return scale * jnp.sqrt(jnp.cumsum(jnp.square(s / scale)[::-1])[::-1])


def truncation_rank(
    sigma: jax.Array,
    tau: Any,
    *,
    absolute: bool = False,
    min_rank: Any = 1,
    max_rank: Any = None,
) -> jax.Array:
    r"""The new rank after truncating singular values ``sigma`` (descending).

    .. math::

        r_1 = \min\{\rho : \sqrt{\textstyle\sum_{j>\rho} \sigma_j^2} \le \theta\},\qquad
        \theta = \tau \|\sigma\|_2 \text{ (relative) or } \tau \text{ (absolute)},

    then clamped to ``[min_rank, max_rank]`` (``max_rank`` defaults to ``len(sigma)``). Works on
    traced values; returns an int32 scalar.

    Args:
        sigma: singular values in descending order, shape ``(k,)``.
        tau: tolerance (``>= 0``).
        absolute: use ``theta = tau`` instead of ``tau * ||sigma||_2``.
        min_rank: lower clamp.
        max_rank: upper clamp; ``None`` for ``k``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax import truncation_rank
        >>> int(truncation_rank(jnp.array([3.0, 2.0, 1.0, 0.1]), 0.15, absolute=True))
        3
        >>> int(truncation_rank(jnp.array([1.0, 1e-3]), 5e-4, absolute=True))
        2
    """
    sigma = jnp.asarray(sigma)
    if sigma.ndim != 1:
        raise ValueError(f"`sigma` must be a vector, got shape {sigma.shape}.")
    tails = tail_norms(sigma)
    theta = tau if absolute else tau * tails[0]
    # tails is non-increasing, so the number of rho with a tail above theta is the smallest
    # rho that passes (rho = k always passes: its tail is empty).
    r = jnp.sum(tails > theta).astype(jnp.int32)
    upper = sigma.shape[0] if max_rank is None else max_rank
    return jnp.clip(r, min_rank, upper).astype(jnp.int32)
