"""The DLRT integrators as optax gradient transformations, and as pure step functions."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrt_jax import _integrators as _int
from dlrt_jax._factors import LowRank, is_lowrank

__all__ = [
    "DLRTState",
    "bug",
    "bug_step",
    "kls",
    "ksl",
    "ksl_step",
    "parallel_bug",
    "parallel_bug_step",
    "parallel_kls",
    "projector_splitting",
    "s_only",
]

GradFn = Callable[[Any], Any]


class DLRTState(NamedTuple):
    """State of every DLRT transform.

    Attributes:
        count: number of ``update`` calls.
        num_skipped: number of steps skipped because a gradient the step reads, or the result, was
            not finite.
        factors: a tree shaped like the params with a ``FactorState(K, L, S)`` (the inner optimiser
            states of the three substeps) at each ``LowRank`` and ``None`` elsewhere.
        other: the state of the optimiser of the leaves that are not ``LowRank``.
    """

    count: jax.Array
    num_skipped: jax.Array
    factors: Any
    other: Any


# ---- validation ----------------------------------------------------------------------------------


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_transform(optimizer: Any, name: str) -> optax.GradientTransformation:
    """An optax transform, or a learning rate / schedule turned into ``optax.sgd``."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if isinstance(optimizer, numbers.Real | jax.Array) or (
        hasattr(optimizer, "shape") and getattr(optimizer, "shape", None) == ()
    ):
        if not _is_traced(optimizer) and not float(optimizer) > 0:
            raise ValueError(f"`{name}` as a learning rate must be > 0, got {float(optimizer)}.")
        return optax.sgd(optimizer)
    if callable(optimizer):  # a schedule
        return optax.sgd(optimizer)
    raise TypeError(
        f"`{name}` must be an optax GradientTransformation, a learning rate (float) or a "
        f"schedule (callable), got {type(optimizer).__name__}."
    )


def _check_truncation(tau, absolute, min_rank, max_rank) -> None:
    if tau is not None and not _is_traced(tau):
        t = float(jnp.asarray(tau))
        if not t >= 0:  # also rejects NaN
            raise ValueError(f"`tau` must be >= 0 (or None for a fixed rank), got {t}.")
    if not isinstance(absolute, bool | np.bool_) and not _is_traced(absolute):
        raise TypeError(f"`absolute` must be a bool, got {type(absolute).__name__}.")
    relative = not _is_traced(absolute) and not bool(absolute)
    if tau is not None and not _is_traced(tau) and relative and float(jnp.asarray(tau)) >= 1:
        raise ValueError(
            f"`tau`={float(jnp.asarray(tau)):g} with the relative rule (absolute=False) cuts every "
            "rank to `min_rank`: the threshold tau * ||sigma||_2 is at least the norm of all "
            "singular values. A relative `tau` must be in [0, 1) (e.g. 0.09, as in the paper); "
            "pass absolute=True for a threshold on the tail norm itself."
        )
    if _is_traced(min_rank) or _is_traced(max_rank):
        return  # injected by optax.inject_hyperparams: checked when first built, concretely
    if not _is_whole(min_rank) or int(min_rank) < 1:
        raise ValueError(f"`min_rank` must be an integer >= 1, got {min_rank!r}.")
    if max_rank is not None and (not _is_whole(max_rank) or int(max_rank) < int(min_rank)):
        raise ValueError(
            f"`max_rank` must be None or an integer >= min_rank={int(min_rank)}, got {max_rank!r}."
        )


def _is_whole(x: Any) -> bool:
    """An integer, or a 0-d integer array (``inject_hyperparams`` turns ints into arrays)."""
    if isinstance(x, numbers.Integral):
        return True
    return hasattr(x, "dtype") and np.ndim(x) == 0 and np.issubdtype(x.dtype, np.integer)


def _check_factor(x: LowRank, path: str, integrator: _int.Integrator, cfg: _int.Config) -> None:
    n, m = x.shape
    c = x.capacity
    if integrator.augments(cfg) and 2 * c > min(n, m):
        raise ValueError(
            f"{path}: `{integrator.name}` augments the bases to 2 * capacity columns, so it needs "
            f"capacity <= floor(min(n, m) / 2) = {min(n, m) // 2} for this {n} x {m} factor; got "
            f"capacity={c}. Build the factor with a smaller `capacity`, or use `bug` with "
            "tau=None or `projector_splitting` (fixed rank, any capacity)."
        )
    if cfg.tau is not None and not _is_traced(cfg.min_rank) and int(cfg.min_rank) > c:
        raise ValueError(
            f"{path}: `min_rank`={cfg.min_rank} exceeds the capacity {c} of this factor; lower "
            "`min_rank` or build the factor with a larger `capacity`."
        )


def _path_str(path) -> str:
    return "params" + jax.tree_util.keystr(path)


def _split(tree: Any):
    """Leaves (``LowRank`` kept whole) and the treedef."""
    return jax.tree_util.tree_flatten(tree, is_leaf=is_lowrank)


def _check_grads(grads: Any, params: Any, where: str) -> None:
    """Same tree structure and leaf shapes, with ``LowRank`` cotangents where params have them."""
    p_paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
    p_def = jax.tree_util.tree_structure(params, is_leaf=is_lowrank)
    g_def = jax.tree_util.tree_structure(grads, is_leaf=is_lowrank)
    if p_def != g_def:
        raise ValueError(
            f"{where}: the gradient tree does not match the params tree.\n  params: {p_def}\n"
            f"  grads:  {g_def}\nPass gradients of the same params (e.g. `jax.grad(loss)(params)`)."
        )
    for (path, p), g in zip(p_paths, jax.tree_util.tree_leaves(grads, is_leaf=is_lowrank)):
        if is_lowrank(p):
            if not is_lowrank(g):
                raise ValueError(
                    f"{where}: {_path_str(path)} is a LowRank but its gradient is not."
                )
            shapes = [(a.shape, b.shape) for a, b in ((p.U, g.U), (p.S, g.S), (p.V, g.V))]
        else:
            shapes = [(jnp.shape(p), jnp.shape(g))]
        for ps, gs in shapes:
            if ps != gs:
                raise ValueError(
                    f"{where}: gradient of {_path_str(path)} has shape {gs}, params have {ps}."
                )


def _read_slots(g: LowRank, slots: frozenset[str]) -> list[jax.Array]:
    """The gradient slots of ``g`` a phase reads (the others are never used)."""
    return [getattr(g, name) for name in "USV" if name in slots]


def _all_finite(trees) -> jax.Array:
    ok = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(trees):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


# ---- the driver ----------------------------------------------------------------------------------


def _run(
    integrator: _int.Integrator,
    cfg: _int.Config,
    other: optax.GradientTransformation,
    grads: Any,
    state: DLRTState,
    params: Any,
    grad_fn: GradFn | None,
):
    """One step of ``integrator`` on every ``LowRank`` of ``params`` and of ``other`` elsewhere.

    Returns ``(new_params, updates, new_state)``; on a non-finite gradient or result, ``new_params``
    equals ``params``, the updates are zero and only the counters move.
    """
    leaves, treedef = _split(params)
    g_leaves = treedef.flatten_up_to(grads)
    st_leaves = treedef.flatten_up_to(state.factors)
    idx = [i for i, leaf in enumerate(leaves) if is_lowrank(leaf)]
    for i in idx:
        if not isinstance(st_leaves[i], _int.FactorState):
            path = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0][i][0]
            raise ValueError(
                f"The DLRT optimiser state of {_path_str(path)} is a "
                f"{type(st_leaves[i]).__name__}, not a FactorState: the state was restructured "
                "after `init`. With Flax NNX, build the optimiser as "
                "`dlrt_jax.nnx.DLRTOptimizer(model, tx, wrt=...)`."
            )

    k = cfg.truncate_every
    if cfg.tau is not None and (not isinstance(k, numbers.Integral) or k > 1):
        # between truncation steps nothing is cut (tau = 0: the rank grows up to the capacity),
        # so that new directions can accumulate over `truncate_every` steps before being judged
        # (k may be an array: optax.inject_hyperparams injects every numeric argument)
        due = (state.count + 1) % jnp.asarray(k, jnp.int32) == 0
        cfg = cfg._replace(tau=jnp.where(due, jnp.asarray(cfg.tau, jnp.float32), 0.0))
    carries = [(leaves[i], st_leaves[i]) for i in idx]
    g = [g_leaves[i] for i in idx]
    # only what the step uses is checked: the non-factor gradients and the slots each phase reads
    finite = _all_finite([gl for leaf, gl in zip(leaves, g_leaves) if not is_lowrank(leaf)])
    finite = finite & _all_finite([_read_slots(gi, integrator.reads[0]) for gi in g])
    for k, phase in enumerate(integrator.phases):
        outs = [phase(cfg, carry, gi) for carry, gi in zip(carries, g)]
        carries = [o[0] for o in outs]
        if k + 1 < len(integrator.phases):
            points = list(leaves)
            for i, o in zip(idx, outs):
                points[i] = o[1]
            eval_grads = grad_fn(treedef.unflatten(points))
            _check_grads(eval_grads, treedef.unflatten(points), "grad_fn")
            eval_leaves = treedef.flatten_up_to(eval_grads)
            g = [eval_leaves[i] for i in idx]
            finite = finite & _all_finite([_read_slots(gi, integrator.reads[k + 1]) for gi in g])

    others = [None if is_lowrank(leaf) else leaf for leaf in leaves]
    other_grads = [None if is_lowrank(leaf) else gl for leaf, gl in zip(leaves, g_leaves)]
    other_updates, other_state = other.update(
        treedef.unflatten(other_grads), state.other, treedef.unflatten(others)
    )
    other_updates = treedef.flatten_up_to(other_updates)

    new_leaves = list(leaves)
    update_leaves = list(other_updates)
    new_factor_states = list(st_leaves)
    for i, (new, fst) in zip(idx, carries):
        new_leaves[i] = new
        new_factor_states[i] = fst
    finite = finite & _all_finite([new_leaves[i] for i in idx])

    def keep(new, old):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

    for i in idx:
        old, new = leaves[i], new_leaves[i]
        delta = LowRank._unchecked(new.U - old.U, new.S - old.S, new.V - old.V, new.rank - old.rank)
        update_leaves[i] = keep(delta, jax.tree_util.tree_map(jnp.zeros_like, delta))
        new_leaves[i] = keep(new, old)
    for i, leaf in enumerate(leaves):
        if not is_lowrank(leaf):
            update_leaves[i] = jnp.where(finite, update_leaves[i], jnp.zeros_like(update_leaves[i]))
            new_leaves[i] = leaf + update_leaves[i]

    new_state = DLRTState(
        count=optax.safe_increment(state.count),
        num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        factors=keep(treedef.unflatten(new_factor_states), state.factors),
        other=keep(other_state, state.other),
    )
    return treedef.unflatten(new_leaves), treedef.unflatten(update_leaves), new_state


def _build(
    integrator: _int.Integrator,
    optimizer: Any,
    other_optimizer: Any,
    tau: Any,
    absolute: bool,
    min_rank: int,
    max_rank: int | None,
    name: str,
    truncate_every: int = 1,
):
    """Validate the hyperparameters; return the config, the other optimiser and ``init``."""
    _check_truncation(tau, absolute, min_rank, max_rank)
    if not _is_traced(truncate_every) and (
        isinstance(truncate_every, bool) or not _is_whole(truncate_every) or int(truncate_every) < 1
    ):
        raise ValueError(f"`truncate_every` must be an integer >= 1, got {truncate_every!r}.")
    tx = _as_transform(optimizer, "optimizer")
    other = tx if other_optimizer is None else _as_transform(other_optimizer, "other_optimizer")
    cfg = _int.Config(
        tx=tx,
        tau=tau,
        absolute=absolute,
        min_rank=min_rank,
        max_rank=max_rank,
        truncate_every=truncate_every,
    )

    def init_fn(params):
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
        if not any(is_lowrank(leaf) for _, leaf in leaves_with_paths):
            raise ValueError(
                f"{name}: params contain no LowRank factor; wrap the weights to train with DLRT "
                "(e.g. `LowRank.random` / `LowRank.from_dense`) or use a plain optax optimiser."
            )
        for path, leaf in leaves_with_paths:
            if is_lowrank(leaf):
                _check_factor(leaf, _path_str(path), integrator, cfg)
        factors = jax.tree_util.tree_map(
            lambda x: _int.init_factor_state(tx, x) if is_lowrank(x) else None,
            params,
            is_leaf=is_lowrank,
        )
        others = jax.tree_util.tree_map(
            lambda x: None if is_lowrank(x) else x, params, is_leaf=is_lowrank
        )
        return DLRTState(
            count=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            factors=factors,
            other=other.init(others),
        )

    return cfg, other, init_fn


def _dlrt_transform(
    integrator: _int.Integrator,
    optimizer: Any,
    other_optimizer: Any,
    tau: Any,
    absolute: bool,
    min_rank: int,
    max_rank: int | None,
    name: str,
    truncate_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    cfg, other, init_fn = _build(
        integrator,
        optimizer,
        other_optimizer,
        tau,
        absolute,
        min_rank,
        max_rank,
        name,
        truncate_every,
    )
    needs_grad_fn = integrator.num_evals > 1

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        # optax's ExtraArgs convention: extra arguments meant for other members of a chain (e.g.
        # `value=` for reduce_on_plateau or a line search) are accepted and ignored
        del extra_args
        if params is None:
            raise ValueError(f"{name}.update needs `params` (the current factors).")
        if needs_grad_fn and grad_fn is None:
            raise TypeError(
                f"{name} evaluates the gradient {integrator.num_evals} times per step and needs "
                "the keyword argument `grad_fn`: a function from params to gradients, e.g. "
                "`tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))`."
            )
        if grad_fn is not None and not callable(grad_fn):
            raise TypeError(f"`grad_fn` must be callable, got {type(grad_fn).__name__}.")
        _check_grads(updates, params, f"{name}.update")
        _, new_updates, new_state = _run(integrator, cfg, other, updates, state, params, grad_fn)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_COMMON_DOC = """
    The transform returns updates that ``optax.apply_updates`` turns into the new factors (each
    ``LowRank`` update is the difference new - old, ranks included), so it must be the *last*
    member of an ``optax.chain``; gradient clipping and other gradient processing go before it.
    Inner optimisers: every substep on ``K``, ``L`` and ``S`` is one step of ``optimizer`` with its
    own state (``optax.sgd``, with or without momentum, ``optax.adam``/``adamw``, ``rmsprop``,
    ``adagrad``, ``adabelief``, ``lion`` and ``optax.inject_hyperparams`` wrappers of them work);
    moments are transported into each new basis (see ``DLRTState`` and ``_integrators.transport``).
    Optimisers with factored or shape-changing state (``adafactor``) and weight decay added before
    this transform in a chain are not supported. Leaves that are not ``LowRank`` (biases, dense
    layers, norms) are trained by ``other_optimizer`` (default: ``optimizer``, separate state) once
    per step with the first gradient. :func:`isotropic_adam` (one second moment per factor, exactly
    transported) and :func:`reference_adam` (the paper's TensorFlow step) are written for this
    setting; ``benchmarks/README.md`` ("End to end") compares them with the others on the
    paper's MLP. Adam's per-entry step on ``K``, ``L``, ``S`` moves ``W`` by about ``sqrt(r / m)``
    of a dense Adam step of the same learning rate, so a factor learning rate about 3x the dense
    one is a good start (the main job's default).

    Extra arguments of ``update`` other than ``grad_fn`` (``value=`` for
    ``optax.contrib.reduce_on_plateau``, a line search's arguments) are accepted and ignored.

    A step whose gradients (or result) contain NaN or Inf changes nothing and increments
    ``state.num_skipped``. Under ``optax.masked``/``partition`` the transform would see other
    groups' leaves as ``MaskedNode`` and cannot evaluate ``grad_fn``: give it the whole params tree.
"""


def _trunc_doc() -> str:
    return """
        tau: truncation tolerance for the rank-adaptive variant; ``None`` keeps every rank fixed.
            The new rank is the smallest ``rho`` with ``sqrt(sum_{j > rho} sigma_j^2) <= theta``,
            ``theta = tau * ||sigma||_2`` (or ``tau`` with ``absolute=True``), clamped to
            ``[min_rank, max_rank]``. A relative ``tau`` must lie in ``[0, 1)``.
        absolute: use an absolute tolerance.
        min_rank: lower bound on every rank (default 2, at most each factor's capacity).
        max_rank: upper bound; default each factor's capacity.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.
        truncate_every: truncate with ``tau`` on every ``k``-th step only (default 1: every
            step); the steps in between cut nothing, so ranks rise to the capacity there and new
            directions accumulate over ``k`` steps before they are judged. Read ranks (and run a
            :class:`CapacityPolicy` with ``every`` a multiple of ``k``) right after a truncation
            step, or compress with :meth:`LowRank.truncate`."""


def bug(
    optimizer: Any,
    *,
    tau: Any = None,
    absolute: bool = False,
    min_rank: int = 2,
    max_rank: int | None = None,
    other_optimizer: Any = None,
    truncate_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Basis-update & Galerkin (the unconventional KLS integrator), fixed-rank or rank-adaptive.

    One step from ``(U0, S0, V0)`` with the gradient ``G0`` passed to ``update``:

    1. K-step ``K1 = U0 S0 - h G0 V0`` and L-step ``L1 = V0 S0^T - h G0^T U0`` (independent).
    2. Fixed rank (``tau=None``): ``U1 = orth(K1)``, ``V1 = orth(L1)``,
       ``S~ = (U1^T U0) S0 (V0^T V1)``. Rank-adaptive: ``U^ = orth([K1 | U0])``,
       ``V^ = orth([L1 | V0])`` (``2r`` columns), ``S~ = (U^T U0) S0 (V0^T V^)``.
    3. Galerkin S-step ``S1 = S~ - h U1^T G1 V1`` with ``G1`` evaluated at ``U1 S~ V1^T`` through
       ``grad_fn``; the adaptive variant then truncates ``S1`` by SVD to the tolerance ``tau``.

    ``h`` stands for one step of the inner optimiser. Two gradient evaluations per step: the one
    passed in and one through the keyword-only extra argument ``grad_fn(params) -> grads`` (leaves
    that are not ``LowRank`` are held at their current values in that evaluation). The adaptive
    variant needs ``capacity <= floor(min(n, m) / 2)`` for every factor.

    Args:
        optimizer: inner optax transform of every substep, or a learning rate / schedule for
            plain SGD.
    """
    return _dlrt_transform(
        _int.BUG,
        optimizer,
        other_optimizer,
        tau,
        absolute,
        min_rank,
        max_rank,
        "bug",
        truncate_every,
    )


bug.__doc__ += (
    _trunc_doc()
    + """

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, grad_fn)``.
"""
    + _COMMON_DOC
    + """
    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import dlrt_jax
        >>> A = jnp.outer(jnp.arange(1.0, 9.0), jnp.arange(1.0, 7.0))  # rank-1 target
        >>> params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=3)}
        >>> loss = lambda p: 0.5 * jnp.sum((p["w"].to_dense() - A) ** 2)
        >>> grad_fn = jax.grad(loss)
        >>> tx = dlrt_jax.bug(1.0, tau=1e-3, min_rank=1)
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        ...     params = optax.apply_updates(params, updates)
        >>> int(params["w"].active_rank), float(loss(params)) < 1e-6
        (1, True)

    References:
        Ceruti & Lubich, "An unconventional robust integrator for dynamical low-rank
        approximation", BIT 62 (2022); Ceruti, Kusch & Lubich, "A rank-adaptive robust integrator
        for dynamical low-rank approximation", BIT 62 (2022); Schotthöfer et al., "Low-rank lottery
        tickets", NeurIPS 2022.
"""
)

kls = bug


def parallel_bug(
    optimizer: Any,
    *,
    tau: Any = None,
    absolute: bool = False,
    min_rank: int = 2,
    max_rank: int | None = None,
    other_optimizer: Any = None,
    truncate_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""The parallel rank-adaptive BUG integrator: one gradient evaluation per step.

    All substeps start from ``(U0, S0, V0)`` and the gradient ``G0`` passed to ``update``:
    ``K1 = U0 S0 - h G0 V0``, ``L1 = V0 S0^T - h G0^T U0``, ``S_ = S0 - h U0^T G0 V0``;
    ``U~ = orth((I - U0 U0^T) K1)`` and ``V~ = orth((I - V0 V0^T) L1)`` (projected twice);
    ``U^ = [U0 | U~]``, ``V^ = [V0 | V~]``,
    ``S^ = [[S_, L1^T V~], [U~^T K1, 0]]`` (``2r x 2r``), then truncation by SVD to ``tau``
    (``tau=None`` truncates back to the current rank). A plain optax transform: no extra
    arguments needed (a ``grad_fn`` passed anyway is not used). Needs
    ``capacity <= floor(min(n, m) / 2)`` for every factor.

    Args:
        optimizer: inner optax transform of every substep, or a learning rate / schedule.
    """
    return _dlrt_transform(
        _int.PARALLEL,
        optimizer,
        other_optimizer,
        tau,
        absolute,
        min_rank,
        max_rank,
        "parallel_bug",
        truncate_every,
    )


parallel_bug.__doc__ += (
    _trunc_doc()
    + """

    Returns:
        An ``optax.GradientTransformationExtraArgs``.
"""
    + _COMMON_DOC
    + """
    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import dlrt_jax
        >>> params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
        >>> loss = lambda p: 0.5 * jnp.sum((p["w"].to_dense() - jnp.eye(8, 6)) ** 2)
        >>> tx = dlrt_jax.parallel_bug(0.5, tau=0.05)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> 2 <= int(params["w"].active_rank) <= 3
        True

    References:
        Ceruti, Kusch & Lubich, "A parallel rank-adaptive integrator for dynamical low-rank
        approximation", SIAM J. Sci. Comput. 46 (2024).
"""
)

parallel_kls = parallel_bug


def projector_splitting(
    optimizer: Any, *, other_optimizer: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""The projector-splitting KSL integrator (Lie-Trotter order), fixed rank.

    1. K-step ``K1 = U0 S0 - h G(U0 S0 V0^T) V0``; ``(U1, S^) = qr(K1)``.
    2. S-step backward in time: ``S~ = S^ + h U1^T G(U1 S^ V0^T) V0``.
    3. L-step ``L1 = V0 S~^T - h G(U1 S~ V0^T)^T U1``; ``(V1, S1^T) = qr(L1)``.

    Three gradient evaluations per step, each at the current intermediate point: the one passed
    to ``update`` and two through the keyword-only extra argument ``grad_fn``. The backward
    S-step subtracts the inner optimiser's update (for SGD, ``+ h`` times the gradient).

    Args:
        optimizer: inner optax transform of every substep, or a learning rate / schedule.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, grad_fn)``.

    References:
        Lubich & Oseledets, "A projector-splitting integrator for dynamical low-rank
        approximation", BIT 54 (2014).
    """
    return _dlrt_transform(
        _int.KSL, optimizer, other_optimizer, None, False, 1, None, "projector_splitting"
    )


projector_splitting.__doc__ += _COMMON_DOC
ksl = projector_splitting


def s_only(optimizer: Any, *, other_optimizer: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""Train only ``S`` with the bases frozen (the paper's fine-tuning after the rank search).

    ``S1 = S0 - h U0^T G V0``; ranks, ``U`` and ``V`` do not change. One gradient evaluation.

    Args:
        optimizer: inner optax transform, or a learning rate / schedule.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.
    """
    return _dlrt_transform(_int.S_ONLY, optimizer, other_optimizer, None, False, 1, None, "s_only")


s_only.__doc__ += _COMMON_DOC


# ---- pure step functions -------------------------------------------------------------------------


def bug_step(params: Any, grad_fn: GradFn, learning_rate: float, **kwargs) -> Any:
    """One plain-SGD step of :func:`bug` on every ``LowRank`` in ``params`` (a pure function).

    ``grad_fn(params) -> grads``; ``kwargs`` as for :func:`bug` (``tau``, ``min_rank``, ...).
    Returns the new params. Non-``LowRank`` leaves take an SGD step.
    """
    return _step(_int.BUG, params, grad_fn, learning_rate, kwargs, "bug_step")


def parallel_bug_step(params: Any, grad_fn: GradFn, learning_rate: float, **kwargs) -> Any:
    """One plain-SGD step of :func:`parallel_bug` (a pure function); see :func:`bug_step`."""
    return _step(_int.PARALLEL, params, grad_fn, learning_rate, kwargs, "parallel_bug_step")


def ksl_step(params: Any, grad_fn: GradFn, learning_rate: float) -> Any:
    """One plain-SGD step of :func:`projector_splitting` (a pure function)."""
    return _step(_int.KSL, params, grad_fn, learning_rate, {}, "ksl_step")


def _step(integrator, params, grad_fn, learning_rate, kwargs, name):
    if not callable(grad_fn):
        raise TypeError(f"{name}: `grad_fn` must be callable, got {type(grad_fn).__name__}.")
    unknown = set(kwargs) - {"tau", "absolute", "min_rank", "max_rank"}
    if unknown:
        raise TypeError(f"{name} got unexpected keyword arguments {sorted(unknown)}.")
    cfg, other, init_fn = _build(
        integrator,
        learning_rate,
        None,
        kwargs.get("tau"),
        kwargs.get("absolute", False),
        kwargs.get("min_rank", 2),
        kwargs.get("max_rank"),
        name,
    )
    state = init_fn(params)
    grads = grad_fn(params)
    _check_grads(grads, params, name)
    return _run(integrator, cfg, other, grads, state, params, grad_fn)[0]
