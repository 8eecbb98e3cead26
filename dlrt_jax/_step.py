"""One functional training step shared by every training loop of the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["make_train_step"]


def make_train_step(
    loss_fn: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    *,
    jit: bool = True,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any, Any]]:
    r"""``step(params, opt_state, *batch) -> (params, opt_state, loss)`` for any optax transform.

    The step computes ``loss, grads = value_and_grad(loss_fn)(params, *batch)`` and calls
    ``tx.update(grads, opt_state, params, grad_fn=grad_fn)`` with
    ``grad_fn = lambda p: jax.grad(loss_fn)(p, *batch)`` (the same batch), then
    ``optax.apply_updates``. Every call passes ``grad_fn``: :func:`dlrt_jax.bug` and
    :func:`dlrt_jax.projector_splitting` evaluate it at the intermediate points of their step, the
    one-pass integrators (:func:`dlrt_jax.parallel_bug`, ``bug`` with one evaluation) never call
    it, so it costs nothing there (under ``jit`` it is not even traced), and ``tx`` is wrapped in
    ``optax.with_extra_args_support`` so that plain optax optimisers ignore it. No call site has to
    ask whether its transform needs the gradient more than once.

    Args:
        loss_fn: ``loss_fn(params, *batch) -> scalar``.
        tx: any optax transform (a DLRT transform or a plain optimiser such as ``optax.adam``).
        jit: wrap the step in ``jax.jit`` (it traces once per set of parameter shapes, i.e. once
            per set of capacities).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns
            ``(params, opt_state, (loss, aux))`` with the ``aux`` of the first evaluation (as
            ``jax.value_and_grad(..., has_aux=True)``).

    Returns:
        The step function; ``opt_state`` comes from ``tx.init(params)``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import dlrt_jax
        >>> target = dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2).to_dense()
        >>> params = dlrt_jax.LowRank.random(jax.random.key(1), (8, 6), rank=3)
        >>> loss_fn = lambda w, x: jnp.mean((dlrt_jax.lowrank_apply(w, x) - x @ target.T) ** 2)
        >>> tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.05)  # evaluates grad_fn twice per step
        >>> step = dlrt_jax.make_train_step(loss_fn, tx)
        >>> state = tx.init(params)
        >>> x = jax.random.normal(jax.random.key(2), (64, 6))
        >>> losses = []
        >>> for _ in range(30):
        ...     params, state, loss = step(params, state, x)
        ...     losses.append(float(loss))
        >>> losses[-1] < 0.5 * losses[0]
        True
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`tx` must be an optax GradientTransformation, got {type(tx).__name__}.")
    for name, flag in (("jit", jit), ("has_aux", has_aux)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}.")
    tx = optax.with_extra_args_support(tx)

    def step(params: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *batch)

        def grad_fn(p: Any) -> Any:
            grads = jax.grad(loss_fn, has_aux=has_aux)(p, *batch)
            return grads[0] if has_aux else grads

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step) if jit else step
