"""Inner optimisers written for the K-, L- and S-steps of the DLRT integrators.

Any optax transform works as an inner optimiser (its state is transported into each new basis);
:func:`isotropic_adam` is transported exactly; :func:`reference_adam` is the paper's TensorFlow
step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dlrt_jax._factors import _is_traced

__all__ = ["isotropic_adam", "reference_adam", "scale_by_isotropic_adam"]


def _check(learning_rate, b1, b2, eps, name):
    if not callable(learning_rate) and not _is_traced(learning_rate):
        if not float(learning_rate) > 0:
            raise ValueError(f"{name}: `learning_rate` must be > 0, got {learning_rate!r}.")
    for label, v in (("b1", b1), ("b2", b2)):
        if not _is_traced(v) and not 0 <= float(v) < 1:
            raise ValueError(f"{name}: `{label}` must be in [0, 1), got {v!r}.")
    if not _is_traced(eps) and not float(eps) >= 0:
        raise ValueError(f"{name}: `eps` must be >= 0, got {eps!r}.")


def _active_mean_square(g: jax.Array, dtype) -> jax.Array:
    """Mean of ``g**2`` over the entries that are not exactly zero (the integrators mask the
    inactive rows and columns of a factor's gradient to zero; they must not dilute the mean)."""
    g = g.astype(dtype)
    active = jnp.maximum(jnp.sum(g != 0), 1).astype(dtype)
    return jnp.sum(jnp.square(g)) / active


class ScaleByIsotropicAdamState(NamedTuple):
    """State of :func:`scale_by_isotropic_adam`: step count, first moments, one ``nu`` per leaf."""

    count: jax.Array
    mu: Any
    nu_mean: Any  # a scalar per leaf: never transported (its shape is not the factor's)


def scale_by_isotropic_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""Adam's scaling with one second moment per leaf: ``m_hat / (sqrt(nu_hat) + eps)``.

    The mean square is taken over the gradient's non-zero entries (the inactive part of a factor
    is masked to zero and must not count).

    .. math::

        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        \nu_t = b_2 \nu_{t-1} + (1 - b_2)\,\mathrm{mean}(g_t^2)

    with Adam's bias corrections. ``nu`` is a scalar per leaf, so the update of a matrix factor is
    its momentum divided by the root mean square of its gradient: invariant under orthogonal
    changes of basis (``m -> M m N^T`` leaves ``mean(m^2)`` and the update's direction intact).
    """
    _check(1.0, b1, b2, eps, "scale_by_isotropic_adam")

    def init_fn(params):
        mu = jax.tree.map(jnp.zeros_like, params)
        nu = jax.tree.map(lambda p: jnp.zeros([], jnp.result_type(p, jnp.float32)), params)
        return ScaleByIsotropicAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(
            lambda v, g: b2 * v + (1 - b2) * _active_mean_square(g, v.dtype), state.nu_mean, updates
        )
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps).astype(m.dtype), mu, nu)
        return out, ScaleByIsotropicAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def isotropic_adam(
    learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""Adam with one second moment per factor: the basis-invariant inner optimiser.

    ``optax.chain(scale_by_isotropic_adam(b1, b2, eps), optax.scale_by_learning_rate(lr))``.
    Per-entry second moments (``optax.adam``) are tied to the coordinates of the current basis and
    can only be transported approximately, and a direction new to the basis gets the factor's
    typical second moment as a prior (:func:`~dlrt_jax._integrators.transport`). One second
    moment per factor needs neither: the step of a factor is ``lr`` times its momentum over the
    RMS of its gradient, the same in every basis.

    Args:
        learning_rate: a float or an optax schedule.
        b1: as for ``optax.adam``.
        b2: as for ``optax.adam``.
        eps: as for ``optax.adam``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax import isotropic_adam
        >>> tx = isotropic_adam(0.1)
        >>> g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
        >>> u, _ = tx.update(g, tx.init(g))
        >>> [round(float(v), 3) + 0.0 for v in u.ravel()]  # -lr g / rms(g), rms over non-zeros
        [-0.085, 0.0, 0.0, -0.113]
    """
    _check(learning_rate, b1, b2, eps, "isotropic_adam")
    return optax.chain(
        scale_by_isotropic_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)
    )


class ReferenceAdamState(NamedTuple):
    count: jax.Array


def reference_adam(
    learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    r"""The paper's TensorFlow step on ``K``, ``L``, ``S``: Adam with fresh slots every step.

    The reference code re-creates its ``K``, ``L``, ``S`` variables every step, so Keras Adam
    starts from zero moments each time while its step count ``t`` (global) keeps growing:

    .. math::

        u = -\eta \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\,
            \frac{(1 - b_1)\,g}{\sqrt{(1 - b_2)\,g^2} + \epsilon}
        \approx -\eta\,\frac{1 - b_1}{\sqrt{1 - b_2}}\,\mathrm{sign}(g)
        = -3.16\,\eta\,\mathrm{sign}(g).

    Use it as the inner optimiser with ``optax.adam(learning_rate)`` as ``other_optimizer`` to
    reproduce the dynamics behind the paper's MLP tables. It carries no moments, so nothing is
    transported.

    Args:
        learning_rate: a float or an optax schedule.
        b1: as for Keras Adam.
        b2: as for Keras Adam.
        eps: as for Keras Adam (its default 1e-7).

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax import reference_adam
        >>> tx = reference_adam(1e-3)
        >>> u, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
        >>> [round(float(v) / 1e-3, 2) for v in u]  # step 1: bias correction gives lr * sign
        [-1.0, 1.0]
        >>> late = state._replace(count=jnp.asarray(100_000))  # late in training: 3.16 lr
        >>> u, _ = tx.update(jnp.array([2.0, -0.5]), late)
        >>> [round(float(v) / 1e-3, 2) for v in u]
        [-3.16, 3.16]
    """
    _check(learning_rate, b1, b2, eps, "reference_adam")

    def init_fn(params):
        del params
        return ReferenceAdamState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(
            lambda g: (-step * (1 - b1) * g / (jnp.sqrt((1 - b2) * jnp.square(g)) + eps)).astype(
                g.dtype
            ),
            updates,
        )
        return out, ReferenceAdamState(count)

    return optax.GradientTransformation(init_fn, update_fn)
