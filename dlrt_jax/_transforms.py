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
from dlrt_jax._factors import LowRank, _check_int, _is_traced, is_lowrank
from dlrt_jax._linalg import full_precision

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
        factors: a tuple with one ``FactorState(K, L, S)`` (the inner optimiser states of the
            three substeps) per ``LowRank`` of the params, in leaf order (the order of
            ``jax.tree_util.tree_leaves(params, is_leaf=dlrt_jax.is_lowrank)``). A flat tuple, not
            a tree shaped like the params, so that containers that wrap each array of the state
            (``flax.nnx.Optimizer``) keep it intact.
        other: the state of the optimiser of the leaves that are not ``LowRank``.
    """

    count: jax.Array
    num_skipped: jax.Array
    factors: Any
    other: Any


# ---- validation (once, at the public boundary) ---------------------------------------------------


def _as_transform(optimizer: Any, name: str) -> optax.GradientTransformation:
    """An optax transform, or a learning rate / schedule turned into ``optax.sgd``."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if (
        isinstance(optimizer, numbers.Real)
        or np.shape(optimizer) == ()
        and hasattr(optimizer, "dtype")
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


def _check_hyperparams(tau, absolute, min_rank, max_rank, truncate_every) -> None:
    """Traced values (``optax.inject_hyperparams`` under ``jit``) were checked when first built."""
    if not isinstance(absolute, bool | np.bool_):
        raise TypeError(f"`absolute` must be a bool, got {type(absolute).__name__}.")
    if tau is not None and not _is_traced(tau):
        t = float(jnp.asarray(tau))
        if not t >= 0:  # also rejects NaN
            raise ValueError(f"`tau` must be >= 0 (or None for a fixed rank), got {t}.")
        if not absolute and t >= 1:
            raise ValueError(
                f"`tau`={t:g} with the relative rule (absolute=False) cuts every rank to "
                "`min_rank`: the threshold tau * ||sigma||_2 is at least the norm of all "
                "singular values. A relative `tau` must be in [0, 1) (e.g. 0.09, as in the "
                "paper); pass absolute=True for a threshold on the tail norm itself."
            )
    min_rank = _check_int(min_rank, "min_rank", 1)
    if max_rank is not None and not _is_traced(min_rank):
        _check_int(max_rank, "max_rank", min_rank, fix=" (or None: each factor's capacity)")
    _check_int(truncate_every, "truncate_every", 1)


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


def _check_grads(grads: Any, params: Any, where: str) -> None:
    """Same tree structure and leaf shapes, with ``LowRank`` cotangents where params have them."""
    p_paths, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)
    g_leaves, g_def = jax.tree_util.tree_flatten(grads, is_leaf=is_lowrank)
    if p_def != g_def:
        raise ValueError(
            f"{where}: the gradient tree does not match the params tree.\n  params: {p_def}\n"
            f"  grads:  {g_def}\nPass gradients of the same params (e.g. `jax.grad(loss)(params)`)."
        )
    for (path, p), g in zip(p_paths, g_leaves):
        if is_lowrank(p) and not is_lowrank(g):
            raise ValueError(f"{where}: {_path_str(path)} is a LowRank but its gradient is not.")
        pairs = zip((p.U, p.S, p.V), (g.U, g.S, g.V)) if is_lowrank(p) else [(p, g)]
        for a, b in pairs:
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"{where}: gradient of {_path_str(path)} has shape {jnp.shape(b)}, params "
                    f"have {jnp.shape(a)}."
                )


def _check_on_manifold(name: str, params: Any, count: jax.Array) -> None:
    """Raise if a factor is not what a DLRT step leaves (checked from the second step on).

    A whole rank in ``[1, capacity]`` and unit active columns of ``U`` and ``V``: a transform after
    DLRT in a chain (``optax.scale``, weight decay, clipping) breaks both, since it scales the
    updates ``new - old`` of the rank and the bases. Concrete params raise ``ValueError`` here;
    under ``jit`` a ``jax.debug.callback`` raises it when the step runs (only then: the callback
    sits in a ``lax.cond`` branch), which surfaces as a ``JaxRuntimeError`` carrying the message.
    """
    paths_leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
    factors = [(_path_str(p), x) for p, x in paths_leaves if is_lowrank(x)]
    tols = [max(1e-3, 16 * float(jnp.finfo(x.dtype).eps)) for _, x in factors]

    def unit_cols_err(a, mask):  # of the active columns
        return jnp.max(jnp.where(mask, jnp.abs(jnp.linalg.norm(a, axis=0) - 1), 0.0))

    ranks = jnp.stack([jnp.asarray(x.rank, jnp.float32) for _, x in factors])
    errs = jnp.stack(
        [jnp.maximum(unit_cols_err(x.U, x.mask), unit_cols_err(x.V, x.mask)) for _, x in factors]
    )
    caps = jnp.asarray([x.capacity for _, x in factors], jnp.float32)
    bad = (ranks != jnp.round(ranks)) | (ranks < 1) | (ranks > caps) | ~(errs <= jnp.asarray(tols))
    bad = bad & (count > 0)

    def report(bad, ranks, errs):  # batched under vmap: a row per member
        bad, ranks, errs = (np.asarray(a).reshape(-1, len(factors)) for a in (bad, ranks, errs))
        for row, col in zip(*np.nonzero(bad)):
            (path, x), r, e = factors[col], ranks[row, col], errs[row, col]
            raise ValueError(
                f"{name}.update: {path} is not a factor a DLRT step leaves: rank {r:.7g} (a "
                f"whole number in [1, {x.capacity}] expected), active columns of U and V off "
                f"unit norm by up to {e:.2g}. A transform after the DLRT transform in an "
                "optax.chain changed its updates (each is new - old factor, rank included): "
                "DLRT must be the last member of the chain, with gradient clipping, "
                "reduce_on_plateau and other gradient processing before it, and its updates "
                "must reach optax.apply_updates unchanged."
            )

    if not any(_is_traced(a) for a in (bad, count)):
        report(*jax.device_get((bad, ranks, errs)))
    else:
        args = (bad, ranks, errs)
        jax.lax.cond(jnp.any(bad), lambda: jax.debug.callback(report, *args), lambda: None)


def _all_finite(trees) -> jax.Array:
    ok = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(trees):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def _check_factor_states(factors: Any, params: Any, leaves: list, idx: list[int]) -> tuple:
    """``DLRTState.factors`` as a tuple of ``FactorState``, one per ``LowRank`` of ``params``."""
    fix = (
        "the state must come from this transform's `init` on params with the same factors "
        "(rebuild it with `tx.init(params)`, or resize it with the params via "
        "`dlrt_jax.resize_capacity` / `fit_capacity`)."
    )
    if not isinstance(factors, tuple | list):
        raise ValueError(
            "The DLRT optimiser state must hold its per-factor states in a tuple (one FactorState "
            f"per LowRank, in leaf order), got a {type(factors).__name__}: {fix}"
        )
    if len(factors) != len(idx):
        raise ValueError(
            f"The DLRT optimiser state holds {len(factors)} per-factor states, but the params "
            f"have {len(idx)} LowRank factors: {fix}"
        )
    for j, (i, fs) in enumerate(zip(idx, factors)):
        if not isinstance(fs, _int.FactorState):
            path = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0][i][0]
            raise ValueError(
                f"The DLRT optimiser state of {_path_str(path)} (factor {j}) is a "
                f"{type(fs).__name__}, not a FactorState: the state was restructured after "
                f"`init`; {fix}"
            )
    return tuple(factors)


# ---- the driver ----------------------------------------------------------------------------------


def _run(
    integrator: _int.Integrator,
    cfg: _int.Config,
    other: optax.GradientTransformation,
    grads: Any,
    state: DLRTState,
    params: Any,
    grad_fn: GradFn | None,
) -> tuple[Any, Any, DLRTState]:
    """One step of ``integrator`` on every ``LowRank`` of ``params`` and of ``other`` elsewhere.

    Returns ``(new_params, updates, new_state)``; on a non-finite gradient or result, ``new_params``
    equals ``params``, the updates are zero and only the counters move. Every phase runs under
    :func:`~dlrt_jax._linalg.full_precision`; ``grad_fn`` (the user's model) runs outside it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_lowrank)
    g_leaves = treedef.flatten_up_to(grads)
    idx = [i for i, leaf in enumerate(leaves) if is_lowrank(leaf)]
    factor_states = _check_factor_states(state.factors, params, leaves, idx)

    k = cfg.truncate_every
    if cfg.tau is not None and (not isinstance(k, numbers.Integral) or k > 1):
        # between truncation steps nothing is cut (tau = 0: the rank grows up to the capacity),
        # so that new directions can accumulate over `truncate_every` steps before being judged
        # (k may be an array: optax.inject_hyperparams injects every numeric argument)
        due = (state.count + 1) % jnp.asarray(k, jnp.int32) == 0
        cfg = cfg._replace(tau=jnp.where(due, jnp.asarray(cfg.tau, jnp.float32), 0.0))
    # only what the step uses is checked: the non-factor gradients and the slots each phase reads
    finite = _all_finite([gl for leaf, gl in zip(leaves, g_leaves) if not is_lowrank(leaf)])
    g = [g_leaves[i] for i in idx]
    carries = [_int.Carry(leaves[i], fs) for i, fs in zip(idx, factor_states)]
    for k, (phase, reads) in enumerate(zip(integrator.phases, integrator.reads)):
        if k:  # the gradient of the whole model at every factor's new point
            points = list(leaves)
            for i, carry in zip(idx, carries):
                points[i] = carry.point
            points = treedef.unflatten(points)
            evaluated = grad_fn(points)
            _check_grads(evaluated, points, "grad_fn")
            g = [treedef.flatten_up_to(evaluated)[i] for i in idx]
        finite = finite & _all_finite([[getattr(gi, s) for s in "USV" if s in reads] for gi in g])
        with full_precision():
            carries = [phase(cfg, carry, gi) for carry, gi in zip(carries, g)]

    others = [None if is_lowrank(leaf) else leaf for leaf in leaves]
    other_grads = [None if is_lowrank(leaf) else gl for leaf, gl in zip(leaves, g_leaves)]
    other_updates, other_state = other.update(
        treedef.unflatten(other_grads), state.other, treedef.unflatten(others)
    )
    update_leaves = treedef.flatten_up_to(other_updates)
    new_leaves, new_factor_states = list(leaves), []
    for i, (new_x, new_fs) in zip(idx, carries):  # the last phase returns (factor, state)
        new_leaves[i] = new_x
        new_factor_states.append(new_fs)
    new_factor_states = tuple(new_factor_states)
    finite = finite & _all_finite([new_leaves[i] for i in idx])

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    for i, (old, new) in enumerate(zip(leaves, new_leaves)):
        if is_lowrank(old):
            delta = LowRank._unchecked(
                new.U - old.U, new.S - old.S, new.V - old.V, new.rank - old.rank
            )
            update_leaves[i] = keep(delta, jax.tree.map(jnp.zeros_like, delta))
            new_leaves[i] = keep(new, old)
        else:
            update_leaves[i] = keep(update_leaves[i], jnp.zeros_like(update_leaves[i]))
            new_leaves[i] = old + update_leaves[i]

    new_state = DLRTState(
        count=optax.safe_increment(state.count),
        num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        factors=keep(new_factor_states, factor_states),
        other=keep(other_state, state.other),
    )
    return treedef.unflatten(new_leaves), treedef.unflatten(update_leaves), new_state


def _build(
    integrator: _int.Integrator,
    name: str,
    optimizer: Any,
    other_optimizer: Any = None,
    tau: Any = None,
    absolute: bool = False,
    min_rank: Any = 1,
    max_rank: Any = None,
    truncate_every: Any = 1,
):
    """Validate the hyperparameters; return the config, the other optimiser and ``init``."""
    _check_hyperparams(tau, absolute, min_rank, max_rank, truncate_every)
    tx = _as_transform(optimizer, "optimizer")
    other = tx if other_optimizer is None else _as_transform(other_optimizer, "other_optimizer")
    cfg = _int.Config(tx, tau, absolute, min_rank, max_rank, truncate_every)

    def init_fn(params: optax.Params) -> DLRTState:
        paths_leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
        if not any(is_lowrank(leaf) for _, leaf in paths_leaves):
            raise ValueError(
                f"{name}: params contain no LowRank factor; wrap the weights to train with DLRT "
                "(e.g. `LowRank.random` / `LowRank.from_dense`) or use a plain optax optimiser."
            )
        for path, leaf in paths_leaves:
            if is_lowrank(leaf):
                _check_factor(leaf, _path_str(path), integrator, cfg)
        with full_precision():
            factors = tuple(
                _int.init_factor_state(tx, leaf) for _, leaf in paths_leaves if is_lowrank(leaf)
            )
        others = jax.tree.map(lambda x: None if is_lowrank(x) else x, params, is_leaf=is_lowrank)
        count, num_skipped = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)  # two buffers
        return DLRTState(count, num_skipped, factors, other.init(others))

    return cfg, other, init_fn


def _dlrt_transform(
    integrator: _int.Integrator, name: str, optimizer: Any, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    cfg, other, init_fn = _build(integrator, name, optimizer, **kwargs)

    def update_fn(
        updates: optax.Updates,
        state: DLRTState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, DLRTState]:
        # optax's ExtraArgs convention: extra arguments meant for other members of a chain (e.g.
        # `value=` for reduce_on_plateau or a line search) are accepted and ignored
        del extra_args
        if params is None:
            raise ValueError(f"{name}.update needs `params` (the current factors).")
        if integrator.num_evals > 1 and grad_fn is None:
            raise TypeError(
                f"{name} evaluates the gradient {integrator.num_evals} times per step and needs "
                "the keyword argument `grad_fn`: a function from params to gradients, e.g. "
                "`tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))`."
            )
        if grad_fn is not None and not callable(grad_fn):
            raise TypeError(f"`grad_fn` must be callable, got {type(grad_fn).__name__}.")
        _check_grads(updates, params, f"{name}.update")
        if integrator.moves_bases:
            _check_on_manifold(name, params, state.count)
        _, new_updates, new_state = _run(integrator, cfg, other, updates, state, params, grad_fn)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_DOC_PARTS = {
    "{truncation_args}": """tau: truncation tolerance for the rank-adaptive variant; ``None``
            keeps every rank fixed. The new rank is the smallest ``rho`` with
            ``sqrt(sum_{j > rho} sigma_j^2) <= theta``, ``theta = tau * ||sigma||_2`` (or ``tau``
            with ``absolute=True``), clamped to ``[min_rank, max_rank]``. A relative ``tau``
            must lie in ``[0, 1)``.
        absolute: use an absolute tolerance.
        min_rank: lower bound on every rank (default 2, at most each factor's capacity).
        max_rank: upper bound; default each factor's capacity.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.
        truncate_every: truncate with ``tau`` on every ``k``-th step only (default 1: every
            step); the steps in between cut nothing, so ranks rise to the capacity there and new
            directions accumulate over ``k`` steps before they are judged. Read ranks (and run a
            :class:`CapacityPolicy` with ``every`` a multiple of ``k``) right after a truncation
            step, or compress with :meth:`LowRank.truncate`.""",
    "{usage}": """Each ``LowRank`` update is the difference new - old factor, ranks included, for
    ``optax.apply_updates``; so the transform must be the *last* member of an ``optax.chain``
    (gradient clipping, ``optax.contrib.reduce_on_plateau`` and other gradient processing go
    before it). A transform after it (``optax.scale``, weight decay) would leave factors off the
    manifold: the next ``update`` raises then (a ``JaxRuntimeError`` under ``jit``). Extra
    arguments of ``update`` other than ``grad_fn`` (``value=``, a line search's) are accepted and
    ignored; ``optax.inject_hyperparams``, ``optax.MultiSteps`` (whose ``grad_fn`` evaluations
    see the batch of the step that applies the accumulated gradient) and ``optax.apply_if_finite``
    wrap it. A step whose gradients (or result) are not finite changes nothing and increments
    ``state.num_skipped``. Under ``optax.masked``/``partition`` the transform would see other
    groups' leaves as ``MaskedNode`` and cannot evaluate ``grad_fn``: give it the whole params.

    Inner optimisers: every substep on ``K``, ``L`` and ``S`` is one step of ``optimizer`` with
    its own state, transported into each new basis (``optax.sgd`` with or without momentum,
    ``adam``/``adamw``, ``rmsprop``, ``adagrad``, ``adabelief``, ``lion`` work; ``adafactor`` and
    weight decay before this transform do not). :func:`isotropic_adam` (exactly transported) and
    :func:`reference_adam` (the paper's TensorFlow step) are written for this setting. Adam moves
    ``W`` by about ``sqrt(r / m)`` of a dense Adam step of the same learning rate, so a factor
    learning rate about 3x the dense one is a good start. Leaves that are not ``LowRank`` take
    one step of ``other_optimizer`` (default: ``optimizer``, separate state) with the first
    gradient. The method: ``docs/method.md``.""",
}


def _fill_doc(fn):
    """Put the argument and usage texts shared by the transforms into ``fn``'s docstring."""
    for marker, text in _DOC_PARTS.items():
        fn.__doc__ = fn.__doc__.replace(marker, text)
    return fn


@_fill_doc
def bug(
    optimizer: Any,
    *,
    tau: float | None = None,
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
        {truncation_args}

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, *, grad_fn, **extra_args) -> (updates, state)``.

    {usage}

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
    return _dlrt_transform(_int.BUG, "bug", **locals())


kls = bug


@_fill_doc
def parallel_bug(
    optimizer: Any,
    *,
    tau: float | None = None,
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
        {truncation_args}

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, **extra_args) -> (updates, state)``.

    {usage}

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
    return _dlrt_transform(_int.PARALLEL, "parallel_bug", **locals())


parallel_kls = parallel_bug


@_fill_doc
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
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, *, grad_fn, **extra_args) -> (updates, state)``.

    {usage}

    References:
        Lubich & Oseledets, "A projector-splitting integrator for dynamical low-rank
        approximation", BIT 54 (2014).
    """
    return _dlrt_transform(
        _int.KSL, "projector_splitting", optimizer, other_optimizer=other_optimizer
    )


ksl = projector_splitting


@_fill_doc
def s_only(optimizer: Any, *, other_optimizer: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""Train only ``S`` with the bases frozen (the paper's fine-tuning after the rank search).

    ``S1 = S0 - h U0^T G V0``; ranks, ``U`` and ``V`` do not change. One gradient evaluation.

    Args:
        optimizer: inner optax transform, or a learning rate / schedule.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, **extra_args) -> (updates, state)``.

    {usage}
    """
    return _dlrt_transform(_int.S_ONLY, "s_only", optimizer, other_optimizer=other_optimizer)


# ---- pure step functions -------------------------------------------------------------------------


def bug_step(params: Any, grad_fn: GradFn, learning_rate: float, **kwargs: Any) -> Any:
    """One plain-SGD step of :func:`bug` on every ``LowRank`` in ``params`` (a pure function).

    ``grad_fn(params) -> grads``; ``kwargs`` as for :func:`bug` (``tau``, ``min_rank``, ...).
    Returns the new params. Non-``LowRank`` leaves take an SGD step.
    """
    return _step(_int.BUG, params, grad_fn, learning_rate, kwargs, "bug_step")


def parallel_bug_step(params: Any, grad_fn: GradFn, learning_rate: float, **kwargs: Any) -> Any:
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
    cfg, other, init_fn = _build(integrator, name, learning_rate, **{"min_rank": 2, **kwargs})
    grads = grad_fn(params)
    _check_grads(grads, params, name)
    return _run(integrator, cfg, other, grads, init_fn(params), params, grad_fn)[0]
