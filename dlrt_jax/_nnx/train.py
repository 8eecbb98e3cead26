"""The training glue of :mod:`dlrt_jax.nnx`: ``nnx.Optimizer`` and the DLRT integrators.

Implementation module of :mod:`dlrt_jax.nnx` (import the names from there): the gradient
function the integrators call, the training step, and capacity changes of a model and its
optimiser in place.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._capacity import fit_capacity as fit_capacity_pure
from dlrt_jax._step import make_train_step

__all__ = [
    "DLRTOptimizer",
    "apply_capacity_policy",
    "check_optimizer",
    "fit_capacity",
    "make_grad_fn",
    "pure_states",
    "train_step",
    "write_back",
]


def make_grad_fn(
    model: nnx.Module, loss_fn: Callable[[Any, Any], jax.Array], batch: Any, *, wrt: Any = nnx.Param
) -> Callable[[Any], Any]:
    """The ``grad_fn(params) -> grads`` that :func:`dlrt_jax.bug` / ``projector_splitting`` need.

    ``grad_fn(p)`` merges ``p`` (the pure state ``nnx.Optimizer.update`` passes to ``tx.update``,
    or one with ``Variable`` wrappers) into ``model`` split by ``wrt`` (the optimiser's), evaluates
    ``loss_fn(model, batch)`` and returns its gradient, a tree shaped like ``p`` (``LowRank``
    cotangents at the factors). The rest of the state (batch statistics, RNG counters) is the one
    at the time of the call and changes to it inside ``grad_fn`` are discarded, so every
    evaluation of a step sees the same dropout masks: build it before the step's first gradient.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear, make_grad_fn
        >>> model = LowRankLinear(6, 4, rank=2, rngs=nnx.Rngs(0))
        >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
        >>> grad_fn = make_grad_fn(model, loss_fn, (jnp.ones((5, 6)), jnp.zeros((5, 4))))
        >>> grads = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
        >>> grads["kernel"].U.shape, grads["bias"].shape  # grads["kernel"].U = G V
        ((4, 2), (4,))
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = nnx.as_pure(rest)  # new Variables inside each trace: the loss may write to them

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    def grad_fn(params):
        return jax.grad(loss_of)(params)

    return grad_fn


def _pure_init(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``init`` sees the pure state (no ``Variable`` wrappers)."""
    tx = optax.with_extra_args_support(tx)
    return optax.GradientTransformationExtraArgs(
        lambda params: tx.init(nnx.as_pure(params)), tx.update
    )


class DLRTOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` whose ``tx.init`` sees the pure state; kept for compatibility.

    The DLRT transforms (:func:`dlrt_jax.bug`, ...) work in a plain ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``: their state keeps one ``FactorState`` per factor in a flat tuple
    (:class:`dlrt_jax.DLRTState`), of which ``nnx.Optimizer`` wraps every array in its own
    ``OptArray``, so the structure survives its updates (flax 0.12.8, tested). ``DLRTOptimizer``
    is ``nnx.Optimizer(model, tx, wrt=wrt)`` with ``tx.init`` applied to the pure state
    ``nnx.as_pure(nnx.state(model, wrt))``; everything else is inherited (``update(model, grads,
    **kwargs)`` passes ``grad_fn=`` on to the integrator: build it with :func:`make_grad_fn`, or
    let :func:`train_step` do it).

    It is still needed for a *plain* optax transform (``optax.adam``, without a DLRT wrapper) on
    a model with :class:`LowRankParam`: plain ``nnx.Optimizer`` calls ``tx.init`` on the
    ``Variable`` objects and wraps each ``Variable`` of the returned state in one ``OptVariable``,
    so an Adam moment of a ``LowRankParam`` (a whole ``LowRank``) sits in one ``OptVariable``,
    which ``nnx.update`` turns into a nested ``State`` after the first update (the second then
    fails). :func:`train_step`, :func:`fit_capacity` and :func:`apply_capacity_policy` reject such
    an optimiser with a clear error.

    Args:
        model: the NNX model.
        tx: an optax transform, e.g. ``dlrt_jax.bug(optax.adam(1e-3), tau=0.09)``.
        wrt: the filter of the trained variables (default ``nnx.Param``, which includes
            :class:`LowRankParam`).
        **kwargs: passed to ``nnx.Optimizer`` (e.g. ``graph`` on flax versions that have it).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, make_grad_fn
        >>> model = LowRankLinear(12, 10, rank=3, capacity=5, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1))
        >>> batch = jax.random.normal(jax.random.key(1), (32, 12))
        >>> loss_fn = lambda m, x: jnp.mean((m(x) - x[:, :10]) ** 2)
        >>> plain = nnx.Optimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1), wrt=nnx.Param)
        >>> for _ in range(2):
        ...     for opt in (optimizer, plain):  # the same for both
        ...         grads = nnx.grad(loss_fn)(model, batch)
        ...         _ = opt.update(model, grads, grad_fn=make_grad_fn(model, loss_fn, batch))
        >>> int(optimizer.step[...]), int(plain.step[...])
        (2, 2)
    """

    def __init__(
        self, model: Any, tx: optax.GradientTransformation, *, wrt: Any = nnx.Param, **kwargs
    ):
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"`tx` must be an optax GradientTransformation, got {type(tx).__name__}."
            )
        super().__init__(model, _pure_init(tx), wrt=wrt, **kwargs)


def check_optimizer(optimizer: Any, where: str) -> None:
    """Reject a non-``nnx.Optimizer`` and an ``nnx.Optimizer`` whose state holds a whole subtree
    in one ``Variable`` (a plain optax state of a ``LowRank``; see :class:`DLRTOptimizer`)."""
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"{where}: `optimizer` must be an nnx.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(optimizer, DLRTOptimizer):
        return
    variables = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for v in variables:
        if isinstance(v, nnx.Variable):
            value = v.get_value()
            if value is not None and not isinstance(value, jax.Array | np.ndarray | numbers.Number):
                raise TypeError(
                    f"{where}: this nnx.Optimizer holds a {type(value).__name__} in one optimiser "
                    "Variable (a plain optax state of a LowRank factor), which its update "
                    "cannot keep intact (see DLRTOptimizer). Wrap the optax transform in a DLRT "
                    "transform (e.g. dlrt_jax.bug(tx)), or build the optimiser as "
                    "dlrt_jax.nnx.DLRTOptimizer(model, tx, wrt=...)."
                )


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
) -> jax.Array:
    """One training step of ``model`` through ``optimizer``; returns the loss before the step.

    :func:`dlrt_jax.make_train_step` on the pure state: the loss and gradient are taken with
    respect to ``optimizer.wrt``; ``grad_fn=`` evaluates the loss with the rest of the state as it
    was before the step (the same dropout masks); the new parameters, the rest as the loss left it
    (batch statistics, RNG counters), the optimiser state and ``optimizer.step`` are written back.
    Works eagerly and under ``nnx.jit`` (bind ``loss_fn`` with ``functools.partial``); the jitted
    step compiles once per set of capacities.

    ``nnx.jit`` adds to the functional step a host-side walk over the model's and optimiser's
    graphs per call (milliseconds; ``nnx.jit(..., graph=False)`` or ``nnx.cached_partial`` cut
    it: ``benchmarks/nnx_vs_functional.py``). The step's cost follows the capacities: shrink them
    with :func:`apply_capacity_policy` or :func:`fit_capacity` once the rank has dropped.

    Examples:
        >>> import functools, jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, train_step
        >>> model = LowRankLinear(12, 10, rank=4, capacity=5, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1))
        >>> x = jax.random.normal(jax.random.key(1), (32, 12))
        >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
        >>> step = nnx.jit(functools.partial(train_step, loss_fn=loss_fn))
        >>> losses = [float(step(model, optimizer, batch=(x, x[:, :10]))) for _ in range(20)]
        >>> losses[-1] < losses[0], 2 <= int(model.rank) <= 5
        (True, True)
    """
    check_optimizer(optimizer, "train_step")
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

    def pure_loss(p: Any, rest: Any, batch: Any) -> tuple[jax.Array, Any]:
        m = nnx.merge(graphdef, p, rest)
        return loss_fn(m, batch), nnx.as_pure(nnx.state(m, nnx.Not(optimizer.wrt)))

    step = make_train_step(pure_loss, optimizer.tx, jit=False, has_aux=True)
    params, rest, opt_state = nnx.as_pure((params, rest, optimizer.opt_state))
    new_params, new_opt_state, (loss, new_rest) = step(params, opt_state, rest, batch)
    nnx.update(model, new_rest)
    write_back(model, optimizer, new_params, new_opt_state)
    optimizer.step[...] += 1
    return loss


def fit_capacity(model: nnx.Module, optimizer: nnx.Optimizer, **kwargs: Any) -> None:
    """:func:`dlrt_jax.fit_capacity` for an NNX model and its ``nnx.Optimizer``, in place.

    Resizes the capacity of every factor in ``nnx.state(model, optimizer.wrt)`` to a bucket above
    its rank (``kwargs``: ``headroom``, ``multiple``, ``max_capacity``) and the ``K``/``L``/``S``
    optimiser moments in ``optimizer.opt_state`` with it, then writes both back; ``W`` is unchanged
    and training continues with the same optimiser. Call it outside ``jit`` (say every epoch); a
    jitted step recompiles once for the new shapes.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, fit_capacity
        >>> model = LowRankLinear(64, 64, rank=3, capacity=32, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.parallel_bug(optax.adam(1e-3), tau=0.1))
        >>> fit_capacity(model, optimizer, headroom=2.0, multiple=4)
        >>> model.capacity, int(model.rank), model.kernel.get_value().U.shape
        (8, 3, (64, 8))
    """
    check_optimizer(optimizer, "fit_capacity")
    params, opt_state = pure_states(model, optimizer)
    new_params, new_opt_state = fit_capacity_pure(params, opt_state, **kwargs)
    write_back(model, optimizer, new_params, new_opt_state)


def pure_states(model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[Any, Any]:
    """``(params, opt_state)``: the trained state of ``model`` (split by ``optimizer.wrt``) and
    the optimiser state, as pure trees (``LowRank`` / array leaves, no ``Variable``)."""
    return nnx.as_pure(nnx.state(model, optimizer.wrt)), nnx.as_pure(optimizer.opt_state)


def write_back(model: nnx.Module, optimizer: nnx.Optimizer, params: Any, opt_state: Any) -> None:
    """Write pure ``params`` / ``opt_state`` (new shapes allowed) into the model and optimiser."""
    nnx.update(model, params)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))


def apply_capacity_policy(
    policy: Callable[[int, Any, Any], tuple[Any, Any, bool]],
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
) -> bool:
    """Apply a :class:`dlrt_jax.CapacityPolicy` to an NNX model and its optimiser, in place.

    Call it outside ``jit`` after every training step with the number of steps done (1-based).
    It calls ``policy(step, params, opt_state)`` on the pure model and optimiser states and, when
    the policy resized, writes them back as :func:`fit_capacity` does (``W`` and the moments kept,
    only the capacities change; a jitted step compiles once per distinct set of capacities). With
    an ``every`` attribute (a ``CapacityPolicy``) the other steps return ``False`` at once, without
    reading any state or syncing with the device.

    Args:
        policy: a :class:`dlrt_jax.CapacityPolicy`, or any callable with its signature
            ``(step, params, opt_state) -> (params, opt_state, resized)``.
        step: the number of training steps done (1-based).
        model: the NNX model.
        optimizer: its ``nnx.Optimizer`` (or :class:`DLRTOptimizer`).

    Returns:
        Whether the capacities were changed.

    Examples:
        >>> import optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, apply_capacity_policy
        >>> model = LowRankLinear(64, 64, rank=3, capacity=32, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-3), tau=0.1))
        >>> policy = dlrt_jax.CapacityPolicy(every=10, headroom=1.25, min_free=4, multiple=8)
        >>> apply_capacity_policy(policy, 5, model, optimizer)  # ranks not read at step 5
        False
        >>> apply_capacity_policy(policy, 10, model, optimizer)  # rank 3: capacity 32 -> 8
        True
        >>> model.capacity, int(model.rank), model.kernel.get_value().U.shape
        (8, 3, (64, 8))
        >>> apply_capacity_policy(policy, 20, model, optimizer)  # in its band: unchanged
        False
    """
    if not callable(policy):
        raise TypeError(
            "`policy` must be a dlrt_jax.CapacityPolicy or a callable (step, params, opt_state) "
            f"-> (params, opt_state, resized), got {type(policy).__name__}."
        )
    if not _layers.is_int(step):
        try:
            step = int(step)  # e.g. a concrete jax scalar such as optimizer.step[...]
        except TypeError as e:
            raise TypeError(f"`step` must be an integer, got {type(step).__name__}.") from e
    every = getattr(policy, "every", None)
    if _layers.is_int(every) and every >= 1 and step % every:
        return False  # nothing to read on this step (CapacityPolicy returns unchanged here)
    check_optimizer(optimizer, "apply_capacity_policy")
    params, opt_state = pure_states(model, optimizer)
    new_params, new_opt_state, resized = policy(step, params, opt_state)
    if not resized:
        return False
    write_back(model, optimizer, new_params, new_opt_state)
    return True
