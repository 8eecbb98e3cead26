"""Ensembles of DLRT models trained at once with ``jax.vmap``.

``E`` members are stored as one pytree whose every leaf has a leading axis of size ``E`` (a
``LowRank`` then holds ``U`` of shape ``(E, n, c)``, ``rank`` of shape ``(E,)``, ...). One jitted,
vmapped step trains all members: each keeps its own rank (ranks are data, capacities are shared
static shapes), its own optimiser state and its own hyperparameters. Hyperparameters that the
transforms accept as traced values (``tau``, learning rates) can differ per member: the step
builds the transform from each member's hyperparameters inside ``vmap``. The same in plain JAX
(``vmap`` of :func:`dlrt_jax.make_train_step`) and what this module adds: ``docs/recipes.md``.

Examples:
    >>> import jax, jax.numpy as jnp, optax, dlrt_jax
    >>> from dlrt_jax import ensemble
    >>> def init_fn(key):
    ...     return {"w": dlrt_jax.LowRank.random(key, (8, 6), rank=3)}
    >>> def make_tx(h):
    ...     return dlrt_jax.bug(optax.sgd(0.1), tau=h["tau"], min_rank=1)
    >>> def loss_fn(p, batch):
    ...     x, y = batch
    ...     return jnp.mean((dlrt_jax.lowrank_apply(p["w"], x) - y) ** 2)
    >>> hparams = {"tau": jnp.array([0.01, 0.3, 0.6])}
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> params, opt_state = ensemble.init_ensemble(init_fn, make_tx, keys, hparams)
    >>> step = ensemble.make_ensemble_step(make_tx, loss_fn)
    >>> batch = (jax.random.normal(jax.random.key(1), (16, 6)), jnp.zeros((16, 8)))
    >>> params, opt_state, losses = step(params, opt_state, batch, hparams)
    >>> losses.shape, params["w"].rank.shape
    ((3,), (3,))
    >>> ranks = params["w"].rank.tolist()  # one rank per member: larger tau, smaller rank
    >>> ranks[0] >= ranks[1] >= ranks[2]
    True
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dlrt_jax._step import make_train_step

__all__ = [
    "ensemble_size",
    "init_ensemble",
    "make_ensemble_step",
    "member",
    "resolve_strategy",
    "stack_members",
]


def ensemble_size(tree: Any) -> int:
    """The number of members ``E`` (the common leading axis of every leaf)."""
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of an ensemble must have the same leading (member) axis; found leading "
            f"sizes {sorted(sizes, key=str)}."
        )
    return sizes.pop()


def member(tree: Any, i: int) -> Any:
    """Member ``i`` of an ensemble (a pytree of ordinary, unbatched leaves).

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax.ensemble import member
        >>> member({"a": jnp.arange(6.0).reshape(3, 2)}, 1)["a"].tolist()
        [2.0, 3.0]
    """
    e = ensemble_size(tree)
    if not -e <= i < e:
        raise IndexError(f"member index {i} out of range for an ensemble of {e}.")
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack_members(trees: Sequence[Any]) -> Any:
    """Stack ``E`` pytrees of the same structure and shapes into one ensemble pytree."""
    trees = list(trees)
    if not trees:
        raise ValueError("`trees` must contain at least one member.")
    structure = jax.tree_util.tree_structure(trees[0])
    for i, t in enumerate(trees[1:], start=1):
        if jax.tree_util.tree_structure(t) != structure:
            raise ValueError(f"member {i} has another tree structure than member 0.")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def init_ensemble(
    init_fn: Callable[[jax.Array], Any],
    make_tx: Callable[[Any], optax.GradientTransformation],
    keys: jax.Array,
    hparams: Any = None,
) -> tuple[Any, Any]:
    """Initialise ``E = len(keys)`` members: ``(params, opt_state)``, both stacked.

    Args:
        init_fn: ``key -> params`` of one member.
        make_tx: ``hparams -> optax transform`` of one member (called inside ``vmap`` with that
            member's hyperparameters; it may ignore them).
        keys: ``E`` PRNG keys (e.g. ``jax.random.split(key, E)``).
        hparams: a pytree with leading axis ``E`` (per-member values), or ``None``.
    """
    e = int(jnp.shape(keys)[0])
    if hparams is not None and ensemble_size(hparams) != e:
        raise ValueError(f"`hparams` has {ensemble_size(hparams)} members but {e} keys were given.")
    params = jax.vmap(init_fn)(keys)
    opt_state = jax.vmap(
        lambda p, h: make_tx(h).init(p), in_axes=(0, None if hparams is None else 0)
    )(params, hparams)
    return params, opt_state


def _batched_lapack_may_deadlock() -> bool:
    """jaxlib 0.10.x on CPU: batched QR/SVD may deadlock XLA's intra-op thread pool.

    Its CPU LAPACK kernels split a batch over the intra-op pool and block until the pieces
    finish; several such calls at once (the integrators' independent QRs) can occupy every pool
    thread and wait forever. jaxlib 0.11.1 removed that path.
    """
    import jaxlib

    version = tuple(int(v) for v in re.findall(r"\d+", jaxlib.__version__)[:3])
    return jax.default_backend() == "cpu" and (0, 10, 0) <= version < (0, 11, 1)


def resolve_strategy(strategy: str = "auto") -> str:
    """The strategy ``"auto"`` stands for here: ``"vmap"``, or ``"map"`` where vmap may hang.

    ``"auto"`` is ``"vmap"`` except on the CPU with jaxlib 0.10.x (see :func:`make_ensemble_step`),
    where it is ``"map"``.
    """
    if strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'map', got {strategy!r}.")
    if strategy == "auto":
        return "map" if _batched_lapack_may_deadlock() else "vmap"
    return strategy


def make_ensemble_step(
    make_tx: Callable[[Any], optax.GradientTransformation],
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    batch_axis: int | None = None,
    strategy: str = "auto",
    jit: bool = True,
) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """One training step of every member at once, compiled as one program.

    ``step(params, opt_state, batch, hparams=None) -> (params, opt_state, losses)``, with
    ``losses`` of shape ``(E,)``. Each member runs exactly the step it would run alone:
    ``tx = make_tx(its hparams)``, gradient, ``tx.update(..., grad_fn=...)`` (DLRT transforms get
    the ``grad_fn`` of the member's loss on the batch), ``optax.apply_updates``.

    Strategies: ``"vmap"`` batches the members with ``jax.vmap`` (one batched matmul, QR and
    SVD per operation: the fast path); ``"map"`` runs them one after the other inside the same
    compiled program with ``jax.lax.map`` (one dispatch, no batched linear algebra).
    ``"auto"`` (default) picks ``"vmap"``, except on the CPU with jaxlib 0.10.x, whose batched
    LAPACK kernels can deadlock XLA's CPU thread pool when several run at once (observed here
    with ``(8, 784, 32)`` QRs on 2 cores; jaxlib >= 0.11.1 does not have that code path); there
    it picks ``"map"``. The chosen strategy is the attribute ``step.strategy``.

    Args:
        make_tx: ``hparams -> optax transform`` for one member; may read traced per-member
            values such as ``tau`` or a learning rate.
        loss_fn: ``(params, batch) -> scalar`` loss of one member.
        batch_axis: ``None`` (all members see the same batch) or ``0`` (the batch has a leading
            member axis: a different batch per member).
        strategy: ``"auto"``, ``"vmap"`` or ``"map"``.
        jit: compile the step (default).
    """
    if not callable(make_tx) or not callable(loss_fn):
        raise TypeError("`make_tx` and `loss_fn` must be callable.")
    if batch_axis not in (None, 0):
        raise ValueError(f"`batch_axis` must be None (shared batch) or 0, got {batch_axis!r}.")
    resolved = resolve_strategy(strategy)

    def one(params, opt_state, batch, hparams):
        return make_train_step(loss_fn, make_tx(hparams), jit=False)(params, opt_state, batch)

    def step(params, opt_state, batch, hparams=None):
        if resolved == "vmap":
            axes = (0, 0, batch_axis, None if hparams is None else 0)
            return jax.vmap(one, in_axes=axes)(params, opt_state, batch, hparams)
        per_member = batch if batch_axis == 0 else None
        return jax.lax.map(
            lambda a: one(a[0], a[1], batch if batch_axis is None else a[2], a[3]),
            (params, opt_state, per_member, hparams),
        )

    fn = jax.jit(step) if jit else step
    run = functools.partial(fn)  # a fresh object that takes the `strategy` attribute
    run.strategy = resolved
    return run
