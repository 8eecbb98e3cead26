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
    "check",
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
        faults: an int32 vector with one entry per factor (leaf order): the bits
            :data:`FAULT_NONFINITE`, :data:`FAULT_RANK` and :data:`FAULT_BASES` of every fault the
            step found in the params it was given, OR-ed over the steps (a step that finds one
            changes nothing and counts as skipped). Read by :func:`check`, which raises with the
            cause; nothing in the step talks to the host.
    """

    count: jax.Array
    num_skipped: jax.Array
    factors: Any
    other: Any
    faults: jax.Array


#: ``DLRTState.faults`` bit: ``U``, ``S`` or ``V`` of the factor held NaN or Inf.
FAULT_NONFINITE = 1
#: ``DLRTState.faults`` bit: the factor's rank was not a whole number in ``[1, capacity]``.
FAULT_RANK = 2
#: ``DLRTState.faults`` bit: active columns of ``U`` or ``V`` were off unit norm.
FAULT_BASES = 4


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


def _check_hyperparams(tau, absolute, min_rank, max_rank, truncate_every, augment_every) -> None:
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
    k = _check_int(augment_every, "augment_every", 1)
    t = _check_int(truncate_every, "truncate_every", 1)
    if tau is None and not _is_traced(k) and k > 1:
        raise ValueError(
            f"`augment_every`={k} needs a rank-adaptive transform (a `tau`): a cycle augments the "
            "bases and truncates by `tau`. Pass `tau`, or leave augment_every=1 for a fixed rank."
        )
    if not _is_traced(k) and not _is_traced(t) and k > 1 and t > 1:
        raise ValueError(
            f"`augment_every`={k} and `truncate_every`={t} are two truncation schedules; pass "
            "one (augment_every: augment, train S for k - 1 steps, truncate; truncate_every: "
            "augment every step, truncate every k-th)."
        )


NEW_MOMENTS = ("zero", "mean")
COEFFICIENT_STEPS = ("S", "KLS")


def _prior(new_moments: str | None, augment_every: Any) -> Any:
    """``Config.prior`` from ``new_moments``; its default: ``"mean"`` in a cycle (``k > 1``, a
    traced bool where ``k`` is injected), ``"zero"`` for the paper's step."""
    if new_moments is None:
        if _is_traced(augment_every) or not isinstance(augment_every, numbers.Integral):
            return jnp.asarray(augment_every) > 1
        return augment_every > 1
    if new_moments not in NEW_MOMENTS:
        raise ValueError(
            f"`new_moments` must be one of {NEW_MOMENTS} or None (the default: 'mean' with "
            f"augment_every > 1, 'zero' otherwise), got {new_moments!r}."
        )
    return new_moments == "mean"


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


class _FaultDetails(NamedTuple):
    codes: jax.Array  # int32 (..., num_factors): FAULT_* bits
    ranks: jax.Array
    errs: jax.Array  # max |norm - 1| of the active columns of U and V


def _factor_faults(params: Any, count: jax.Array) -> _FaultDetails:
    """What is wrong with each factor of ``params``: a traced computation, no host round-trip.

    Non-finite entries are a fault at any step. From the second step on (``count > 0``), a factor
    must also be what a DLRT step leaves: a whole rank in ``[1, capacity]`` and unit active columns
    of ``U`` and ``V`` (a hand-made factor is accepted at the first step, which orthonormalises
    it). A transform after DLRT in a chain (``optax.scale``, weight decay) breaks both, since it
    scales the updates ``new - old`` of the rank and the bases.
    """
    factors = [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_lowrank) if is_lowrank(x)]
    codes, ranks, errs = [], [], []
    for x in factors:
        finite = _all_finite([x.U, x.S, x.V, x.rank])
        rank = jnp.asarray(x.rank, jnp.float32)
        bad_rank = (rank != jnp.round(rank)) | (rank < 1) | (rank > x.capacity)
        mask = x.mask

        def unit_cols_err(a, mask=mask):  # of the active columns
            return jnp.max(jnp.where(mask, jnp.abs(jnp.linalg.norm(a, axis=0) - 1), 0.0))

        err = jnp.maximum(unit_cols_err(x.U), unit_cols_err(x.V))
        tol = max(1e-3, 16 * float(jnp.finfo(x.dtype).eps))
        checked = count > 0
        code = jnp.where(
            finite,
            jnp.where(checked & bad_rank, FAULT_RANK, 0)
            | jnp.where(checked & ~(err <= tol), FAULT_BASES, 0),
            FAULT_NONFINITE,
        )
        codes.append(code.astype(jnp.int32))
        ranks.append(rank)
        errs.append(err)
    return _FaultDetails(jnp.stack(codes), jnp.stack(ranks), jnp.stack(errs))


def _fault_message(where: str, path: str, code: int, capacity: int, rank=None, err=None) -> str:
    """The cause of one factor's fault, and what to change."""
    if code & FAULT_NONFINITE:
        return (
            f"{where}: {path} holds NaN or Inf entries in U, S or V (changed outside the DLRT "
            "step, e.g. by jax.tree.map or a bad restore). Steps from it are skipped: rebuild the "
            "factor (LowRank.from_dense / LowRank.random) or restore a good checkpoint."
        )
    problems = []
    if code & FAULT_RANK:
        got = "" if rank is None else f" {float(rank):.7g}"
        problems.append(f"its rank{got} is not a whole number in [1, {capacity}]")
    if code & FAULT_BASES:
        got = "" if err is None else f" by up to {float(err):.2g}"
        problems.append(f"the active columns of U and V are off unit norm{got}")
    return (
        f"{where}: {path} is not a factor a DLRT step leaves: {' and '.join(problems)}. A "
        "transform after the DLRT transform in an optax.chain changed its updates (each is new - "
        "old factor, rank included): DLRT must be the last member of the chain, with gradient "
        "clipping, reduce_on_plateau and other gradient processing before it, and its updates "
        "must reach optax.apply_updates unchanged. The step that found it was skipped."
    )


def _factor_paths(params: Any) -> list[tuple[str, LowRank]]:
    """``(path, factor)`` of every ``LowRank`` of ``params``, in leaf order."""
    return [
        (_path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
        if is_lowrank(x)
    ]


def _raise_faults(where: str, params: Any, details: _FaultDetails) -> None:
    """Raise ``ValueError`` for the first faulty factor (concrete ``details``)."""
    paths = _factor_paths(params)
    codes, ranks, errs = (np.asarray(a).reshape(-1, len(paths)) for a in details)
    for row, col in zip(*np.nonzero(codes)):  # batched under vmap: a row per member
        (path, x), code = paths[col], int(codes[row, col])
        raise ValueError(
            _fault_message(where, path, code, x.capacity, ranks[row, col], errs[row, col])
        )


def check(opt_state: Any, params: Any = None) -> None:
    """Raise if a DLRT step found a fault in the factors it was given.

    The step itself never talks to the host: it records each factor's faults in
    ``DLRTState.faults`` (non-finite entries; a rank or bases that a DLRT step does not leave,
    which is what a transform after DLRT in an ``optax.chain`` causes) and skips the step. Call
    ``check`` where the host syncs anyway (at the end of an epoch, at a capacity check:
    :class:`CapacityPolicy` calls it) to turn the record into an error that names the cause.
    Outside ``jit`` the transforms raise at once.

    Args:
        opt_state: an optimiser state that contains one or more :class:`DLRTState` (inside
            ``optax.chain``, ``inject_hyperparams``, ``nnx.Optimizer`` state ...).
        params: the params, optional: with them the error names the factor's path and, from the
            current params, its rank and the bases' error.

    Raises:
        ValueError: naming the first faulty factor, its cause and what to change.

    Examples:
        >>> import jax, optax, dlrt_jax
        >>> params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
        >>> tx = optax.chain(dlrt_jax.parallel_bug(0.1, tau=0.1), optax.scale(0.5))  # wrong order
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jax.numpy.ones_like, params)
        >>> step = jax.jit(lambda p, s: tx.update(grads, s, p))
        >>> for _ in range(2):
        ...     updates, state = step(params, state)
        ...     params = optax.apply_updates(params, updates)
        >>> dlrt_jax.check(state, params)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: dlrt_jax.check: params['w'] is not a factor a DLRT step leaves: ...
    """
    states = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, DLRTState))
        if isinstance(s, DLRTState)
    ]
    for st in states:
        codes = np.asarray(jax.device_get(st.faults))
        if not codes.any():
            continue
        n = codes.shape[-1]
        flat = codes.reshape(-1, n)
        row, col = (int(i[0]) for i in np.nonzero(flat))
        code = int(flat[row, col])
        path, capacity, rank, err = f"factor {col} (leaf order)", "capacity", None, None
        if params is not None:
            paths = _factor_paths(params)
            if len(paths) == n:
                path, x = paths[col]
                capacity = x.capacity
                details = lambda p: _factor_faults(p, jnp.ones([], jnp.int32))
                for _ in range(codes.ndim - 1):  # stacked params (an ensemble under vmap)
                    details = jax.vmap(details)
                d = details(params)
                rank = np.asarray(d.ranks).reshape(-1, n)[row, col]
                err = np.asarray(d.errs).reshape(-1, n)[row, col]
        raise ValueError(_fault_message("dlrt_jax.check", path, code, capacity, rank, err))


def _all_finite(trees) -> jax.Array:
    """Whether every inexact leaf of ``trees`` is finite, in few reductions.

    The leaves are flattened and concatenated into vectors of at most the largest leaf's size
    (XLA fuses each concatenation into its reduction), so the check costs a few kernels however
    many arrays it covers (a reduction per array made the finiteness checks the largest part of
    the step's program and compile time) and allocates nothing larger than the largest leaf.
    """
    leaves = [
        jnp.ravel(leaf)
        for leaf in jax.tree_util.tree_leaves(trees)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    cap = max((leaf.size for leaf in leaves), default=0)
    bins, current, size = [], [], 0
    for leaf in leaves:
        if current and size + leaf.size > cap:
            bins.append(current)
            current, size = [], 0
        current.append(leaf.astype(jnp.float32))
        size += leaf.size
    bins += [current] if current else []
    ok = jnp.array(True)
    for b in bins:
        ok = ok & jnp.all(jnp.isfinite(jnp.concatenate(b)))
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


class Schedule(NamedTuple):
    """When a step augments and when it truncates (ints, or arrays under ``inject_hyperparams``).

    ``augment_every = k > 1`` is the augment-train-truncate cycle: step ``t`` of the run is an
    integrator step (augmentation, nothing cut) when ``t % k == 0``, a coefficient step (``S`` only,
    bases fixed) otherwise, and the last step of each cycle (``t % k == k - 1``) truncates.
    ``truncate_every = k > 1``: every step augments, every ``k``-th truncates. Both 1: the paper's
    step (augment and truncate every step). ``coefficient_steps="KLS"``: the steps between
    augmentations are the integrator's step at a fixed rank (the last one truncating by ``tau``)
    instead of ``S``-only steps.
    """

    augment_every: Any = 1
    truncate_every: Any = 1
    coefficient_steps: str = "S"

    def flags(self, count: jax.Array) -> tuple[Any, Any]:
        """``(augment, truncate)`` for the step after ``count`` steps: Python bools where static."""
        k, t = self.augment_every, self.truncate_every
        static = not any(_is_traced(v) or not isinstance(v, numbers.Integral) for v in (k, t))
        if static and k == 1:
            return True, True if t == 1 else (count + 1) % t == 0
        k, t = jnp.asarray(k, jnp.int32), jnp.asarray(t, jnp.int32)
        p = count % k
        truncate = jnp.where(k == 1, (count + 1) % t == 0, p == k - 1)
        return p == 0, truncate


def _per_factor_step(
    integrator: _int.Integrator,
    cfg: _int.Config,
    factors: list[LowRank],
    factor_states: tuple,
    g: list[LowRank],
    evaluate: Callable[[list[LowRank]], list[LowRank]],
) -> tuple[list[LowRank], tuple, jax.Array]:
    """The phases of ``integrator`` on every factor; ``evaluate(points)`` between phases.

    Returns the new factors, their inner states and whether every gradient slot read was finite
    (one check over all of them).
    """
    reads = []
    carries = [_int.Carry(x, fs) for x, fs in zip(factors, factor_states)]
    for k, (phase, slots) in enumerate(zip(integrator.phases, integrator.reads)):
        if k:  # the gradient of the whole model at every factor's new point
            g = evaluate([carry.point for carry in carries])
        reads += [getattr(gi, s) for gi in g for s in "USV" if s in slots]
        with full_precision():
            carries = [phase(cfg, carry, gi) for carry, gi in zip(carries, g)]
    new_factors = [result.factor for result in carries]  # the last phase returns Results
    return new_factors, tuple(result.state for result in carries), _all_finite(reads)


def _factor_step(
    integrator: _int.Integrator,
    cfg: _int.Config,
    schedule: Schedule,
    count: jax.Array,
    factors: list[LowRank],
    factor_states: tuple,
    g: list[LowRank],
    evaluate: Callable[[list[LowRank]], list[LowRank]],
    fresh_gradient: Callable[[], list[LowRank]] | None,
) -> tuple[list[LowRank], tuple, jax.Array]:
    """One step of every factor as the schedule says: an integrator step, or a coefficient step.

    With a cycle (``augment_every > 1``) the two kinds are the branches of one ``lax.switch``: a
    coefficient step runs no factorisation (and, with ``fresh_gradient``, reads only ``U^T G V``
    of the gradient passed in; the integrator step evaluates its own, so that the products
    ``G V`` and ``G^T U`` are computed on augmentation steps only).
    """
    augment, truncate = schedule.flags(count)
    if augment is True:
        return _per_factor_step(
            integrator, cfg._replace(truncate=truncate), factors, factor_states, g, evaluate
        )

    def integrate():
        # an augmentation step truncates only when the cycle is one step long (k traced)
        cut = False if isinstance(schedule.augment_every, numbers.Integral) else truncate
        g_aug = g if fresh_gradient is None else fresh_gradient()
        return _per_factor_step(
            integrator, cfg._replace(truncate=cut), factors, factor_states, g_aug, evaluate
        )

    def coefficients(cut):
        if schedule.coefficient_steps == "KLS":  # the integrator's step, at a fixed rank or cut
            c = cfg._replace(truncate=True) if cut else cfg._replace(tau=None)
            return lambda: _per_factor_step(integrator, c, factors, factor_states, g, evaluate)
        return lambda: _per_factor_step(
            _int.COEFFICIENTS, cfg._replace(truncate=cut), factors, factor_states, g, evaluate
        )

    index = jnp.where(augment, 2, jnp.where(truncate, 1, 0))
    return jax.lax.switch(index, [coefficients(False), coefficients(True), integrate])


def _skip_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old`` (leafwise)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _run(
    integrator: _int.Integrator,
    cfg: _int.Config,
    schedule: Schedule,
    other: optax.GradientTransformation,
    grads: Any,
    state: DLRTState,
    params: Any,
    grad_fn: GradFn | None,
) -> tuple[Any, Any, DLRTState]:
    """One step of ``integrator`` on every ``LowRank`` of ``params`` and of ``other`` elsewhere.

    Returns ``(new_params, updates, new_state)``. A step whose gradients or result are not finite,
    or whose params have a fault (:func:`check`), leaves ``params`` and the inner states as they
    are: the updates are zero and only the counters (and ``faults``) move. Every phase runs
    under :func:`~dlrt_jax._linalg.full_precision`; ``grad_fn`` (the user's model) outside it.
    """
    # s_only never moves the bases: only non-finite entries are a fault there
    count = state.count if integrator.moves_bases else jnp.zeros([], jnp.int32)
    details = _factor_faults(params, count)
    if not _is_traced(details.codes):  # outside jit: raise at once
        _raise_faults(f"{integrator.name}.update", params, details)
    faults = details.codes
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_lowrank)
    g_leaves = treedef.flatten_up_to(grads)
    idx = [i for i, leaf in enumerate(leaves) if is_lowrank(leaf)]
    factor_states = _check_factor_states(state.factors, params, leaves, idx)
    factors = [leaves[i] for i in idx]

    def evaluate(points: list[LowRank]) -> list[LowRank]:
        full = list(leaves)
        for i, x in zip(idx, points):
            full[i] = x
        full = treedef.unflatten(full)
        evaluated = grad_fn(full)
        _check_grads(evaluated, full, "grad_fn")
        evaluated = treedef.flatten_up_to(evaluated)
        return [evaluated[i] for i in idx]

    fresh = None if grad_fn is None else (lambda: evaluate(factors))
    new_factors, new_factor_states, finite = _factor_step(
        integrator,
        cfg,
        schedule,
        state.count,
        factors,
        factor_states,
        [g_leaves[i] for i in idx],
        evaluate,
        fresh,
    )

    # the other leaves: one step of their optimiser with the first gradient
    others = [None if is_lowrank(leaf) else leaf for leaf in leaves]
    other_grads = [None if is_lowrank(leaf) else gl for leaf, gl in zip(leaves, g_leaves)]
    other_updates, other_state = other.update(
        treedef.unflatten(other_grads), state.other, treedef.unflatten(others)
    )
    other_updates = treedef.flatten_up_to(other_updates)
    finite = finite & _all_finite([other_grads, [(x.U, x.S, x.V) for x in new_factors]])

    ok = finite & ~jnp.any(faults != 0)
    new_leaves, update_leaves = list(leaves), list(other_updates)
    for i, new in zip(idx, new_factors):
        old = leaves[i]
        delta = LowRank._unchecked(new.U - old.U, new.S - old.S, new.V - old.V, new.rank - old.rank)
        update_leaves[i] = _skip_if(ok, delta, jax.tree.map(jnp.zeros_like, delta))
        new_leaves[i] = _skip_if(ok, new, old)
    for i, leaf in enumerate(leaves):
        if not is_lowrank(leaf):
            update_leaves[i] = _skip_if(ok, update_leaves[i], jnp.zeros_like(update_leaves[i]))
            new_leaves[i] = leaf + update_leaves[i]

    new_state = DLRTState(
        count=optax.safe_increment(state.count),
        num_skipped=state.num_skipped + jnp.where(ok, 0, 1).astype(jnp.int32),
        factors=_skip_if(ok, new_factor_states, factor_states),
        other=_skip_if(ok, other_state, state.other),
        faults=state.faults | faults,
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
    augment_every: Any = 1,
    new_moments: str | None = None,
    coefficient_steps: str = "S",
):
    """Validate the hyperparameters; return the config, schedule, other optimiser and ``init``."""
    _check_hyperparams(tau, absolute, min_rank, max_rank, truncate_every, augment_every)
    if coefficient_steps not in COEFFICIENT_STEPS:
        raise ValueError(
            f"`coefficient_steps` must be one of {COEFFICIENT_STEPS} ('S': only S moves between "
            "augmentations, no factorisation; 'KLS': the integrator's step at a fixed rank), got "
            f"{coefficient_steps!r}."
        )
    tx = _as_transform(optimizer, "optimizer")
    other = tx if other_optimizer is None else _as_transform(other_optimizer, "other_optimizer")
    cfg = _int.Config(
        tx, tau, absolute, min_rank, max_rank, prior=_prior(new_moments, augment_every)
    )
    schedule = Schedule(augment_every, truncate_every, coefficient_steps)

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
        count = jnp.zeros([], jnp.int32)
        details = _factor_faults(params, count)
        if not _is_traced(details.codes):
            _raise_faults(f"{name}.init", params, details)
        with full_precision():
            factors = tuple(
                _int.init_factor_state(tx, leaf) for _, leaf in paths_leaves if is_lowrank(leaf)
            )
        others = jax.tree.map(lambda x: None if is_lowrank(x) else x, params, is_leaf=is_lowrank)
        num_skipped = jnp.zeros([], jnp.int32)  # count and num_skipped: two buffers
        return DLRTState(count, num_skipped, factors, other.init(others), details.codes)

    return cfg, schedule, other, init_fn


def _dlrt_transform(
    integrator: _int.Integrator,
    name: str,
    optimizer: Any,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    cfg, schedule, other, init_fn = _build(integrator, name, optimizer, **kwargs)

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
        _, new_updates, new_state = _run(
            integrator, cfg, schedule, other, updates, state, params, grad_fn
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bug(
    optimizer: Any,
    *,
    tau: float | None = None,
    absolute: bool = False,
    min_rank: int = 2,
    max_rank: int | None = None,
    other_optimizer: Any = None,
    augment_every: int = 1,
    truncate_every: int = 1,
    new_moments: str | None = None,
    coefficient_steps: str = "S",
) -> optax.GradientTransformationExtraArgs:
    r"""Basis-update & Galerkin (the unconventional KLS integrator), fixed-rank or rank-adaptive.

    One step from ``(U0, S0, V0)`` with the gradient ``G0`` passed to ``update``:

    1. K-step ``K1 = U0 S0 - h G0 V0`` and L-step ``L1 = V0 S0^T - h G0^T U0`` (independent).
    2. Fixed rank (``tau=None``): ``U1 = orth(K1)``, ``V1 = orth(L1)``,
       ``S~ = (U1^T U0) S0 (V0^T V1)``. Rank-adaptive: ``U^ = orth([K1 | U0])``,
       ``V^ = orth([L1 | V0])`` (``2r`` columns), ``S~ = (U^^T U0) S0 (V0^T V^)``.
    3. Galerkin S-step ``S1 = S~ - h U1^T G1 V1`` with ``G1`` evaluated at ``U1 S~ V1^T`` through
       ``grad_fn``; the adaptive variant then truncates ``S1`` by SVD to the tolerance ``tau``:
       the new rank is the smallest ``rho`` with ``sqrt(sum_{j > rho} sigma_j^2) <= theta``,
       ``theta = tau ||sigma||_2`` (``tau`` with ``absolute=True``), clamped to
       ``[min_rank, max_rank]``.

    ``h`` stands for one step of the inner optimiser. Two gradient evaluations per step: the one
    passed in and one through the keyword-only extra argument ``grad_fn(params) -> grads`` (leaves
    that are not ``LowRank`` are held at their current values in that evaluation). The adaptive
    variant needs ``capacity <= floor(min(n, m) / 2)`` for every factor.

    **The augment-train-truncate cycle** (``augment_every = k > 1``, rank-adaptive only): step
    ``t`` with ``t % k == 0`` is the step above without truncation (the rank grows to ``2r``, at
    most the capacity); the other steps train only ``S`` in the fixed bases,
    ``S1 = S0 - h U^T G V`` (one gradient evaluation, no factorisation); the last step of each
    cycle (``t % k == k - 1``) then truncates ``S1 = P diag(sigma) Q^T`` by ``tau``,
    ``U1 = U P``, ``V1 = V Q``. New directions get ``k`` steps to grow before they are judged. The
    capacity must leave room for ``2r``. ``k = 1`` is the step above. ``truncate_every = k > 1``
    instead augments every step and truncates every ``k``-th.

    Args:
        optimizer: inner optax transform of every substep, or a learning rate / schedule for
            plain SGD.
        tau: truncation tolerance; ``None`` keeps every rank fixed. A relative ``tau`` must lie
            in ``[0, 1)``.
        absolute: ``theta = tau`` rather than ``tau * ||sigma||_2``.
        min_rank: lower bound on every rank (at most each factor's capacity).
        max_rank: upper bound; default each factor's capacity.
        other_optimizer: optimiser for the leaves that are not ``LowRank`` (default:
            ``optimizer``, a separate state); one step per ``update`` with the first gradient.
        augment_every: the cycle length ``k`` (1: augment and truncate every step).
        truncate_every: augment every step, truncate on every ``k``-th only.
        new_moments: how a direction new to a basis starts the inner optimiser's elementwise
            second moments (Adam's ``nu``): ``"mean"``, the geometric mean of the factor's
            others, so that its first steps are in proportion to its gradient; or ``"zero"``,
            which makes Adam's first step there as large as its learning rate whatever the
            gradient. Default: ``"mean"`` in a cycle (``augment_every > 1``; with zeros the
            cycle's ranks grow to the capacity), ``"zero"`` otherwise (the paper's step as
            before).
        coefficient_steps: the steps between augmentations in a cycle: ``"S"`` (default) trains
            ``S`` alone in the fixed bases (one gradient read, no factorisation); ``"KLS"`` runs
            the integrator's step at a fixed rank (``K``, ``L`` and ``S`` move; the rank stays
            ``2r``), and the cycle's last step truncates by ``tau``: the bases follow the
            gradient at every step, at the cost of the paper's step each time.

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, *, grad_fn, **extra_args) -> (updates, state)``.

    Each ``LowRank`` update is the difference new - old factor, rank included, so the transform
    must be the last member of an ``optax.chain`` (clipping and ``reduce_on_plateau`` go before it;
    a transform after it is recorded as a fault that :func:`check` reports; ``docs/method.md``,
    "What the integrators guarantee"). A step with non-finite gradients or result changes
    nothing and counts in ``state.num_skipped``. Inner optimisers: ``optax.sgd`` (with
    momentum), ``adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adabelief``, ``lion``; their state
    is transported into each new basis.

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
        tickets", NeurIPS 2022; Schotthöfer et al., "GeoLoRA", ICLR 2025 (the cycle).
    """
    return _dlrt_transform(
        _int.BUG_FIXED if tau is None else _int.BUG,
        "bug",
        optimizer,
        other_optimizer=other_optimizer,
        tau=tau,
        absolute=absolute,
        min_rank=min_rank,
        max_rank=max_rank,
        truncate_every=truncate_every,
        augment_every=augment_every,
        new_moments=new_moments,
        coefficient_steps=coefficient_steps,
    )


kls = bug


def parallel_bug(
    optimizer: Any,
    *,
    tau: float | None = None,
    absolute: bool = False,
    min_rank: int = 2,
    max_rank: int | None = None,
    other_optimizer: Any = None,
    augment_every: int = 1,
    truncate_every: int = 1,
    new_moments: str | None = None,
    coefficient_steps: str = "S",
) -> optax.GradientTransformationExtraArgs:
    r"""The parallel rank-adaptive BUG integrator: one gradient evaluation per step.

    All substeps start from ``(U0, S0, V0)`` and the gradient ``G0`` passed to ``update``:

    1. ``K1 = U0 S0 - h G0 V0``, ``L1 = V0 S0^T - h G0^T U0``, ``S_ = S0 - h U0^T G0 V0``.
    2. ``U~ = orth((I - U0 U0^T) K1)``, ``V~ = orth((I - V0 V0^T) L1)`` (projected twice);
       ``U^ = [U0 | U~]``, ``V^ = [V0 | V~]``, ``S^ = [[S_, L1^T V~], [U~^T K1, 0]]``
       (``2r x 2r``).
    3. Truncation of ``S^`` by SVD to ``tau`` as in :func:`bug` (``tau=None``: back to the
       current rank).

    A plain optax transform: no extra arguments needed. Needs
    ``capacity <= floor(min(n, m) / 2)`` for every factor.

    **The augment-train-truncate cycle** (``augment_every = k > 1``): the step above without
    truncation every ``k`` steps, ``S``-only steps in the fixed bases in between, truncation of
    ``S`` at the last step of each cycle (see :func:`bug`). With ``grad_fn`` passed (as
    :func:`make_train_step` does) the augmentation step evaluates its own gradient, so that the
    coefficient steps need only ``U^T G V`` of the gradient passed in.

    Args:
        optimizer: inner optax transform of every substep, or a learning rate / schedule.
        tau: truncation tolerance; ``None`` keeps every rank fixed. A relative ``tau`` must lie
            in ``[0, 1)``.
        absolute: ``theta = tau`` rather than ``tau * ||sigma||_2``.
        min_rank: lower bound on every rank (at most each factor's capacity).
        max_rank: upper bound; default each factor's capacity.
        other_optimizer: optimiser for the leaves that are not ``LowRank`` (default:
            ``optimizer``, a separate state).
        augment_every: the cycle length ``k`` (1: augment and truncate every step).
        truncate_every: augment every step, truncate on every ``k``-th only.
        new_moments: ``"mean"`` or ``"zero"``: the second moments a new direction starts with
            (see :func:`bug`; default ``"mean"`` with ``augment_every > 1``, else ``"zero"``).
        coefficient_steps: ``"S"`` or ``"KLS"``: what moves between augmentations (see
            :func:`bug`).

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, **extra_args) -> (updates, state)``.

    Composition, skipped steps and inner optimisers as for :func:`bug`.

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
        approximation", SIAM J. Sci. Comput. 46 (2024); Schotthöfer et al., "GeoLoRA", ICLR 2025.
    """
    return _dlrt_transform(
        _int.PARALLEL,
        "parallel_bug",
        optimizer,
        other_optimizer=other_optimizer,
        tau=tau,
        absolute=absolute,
        min_rank=min_rank,
        max_rank=max_rank,
        truncate_every=truncate_every,
        augment_every=augment_every,
        new_moments=new_moments,
        coefficient_steps=coefficient_steps,
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
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, *, grad_fn, **extra_args) -> (updates, state)``.

    Composition, skipped steps and inner optimisers as for :func:`bug`.

    References:
        Lubich & Oseledets, "A projector-splitting integrator for dynamical low-rank
        approximation", BIT 54 (2014).
    """
    return _dlrt_transform(
        _int.KSL, "projector_splitting", optimizer, other_optimizer=other_optimizer
    )


ksl = projector_splitting


def s_only(optimizer: Any, *, other_optimizer: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""Train only ``S`` with the bases frozen (the paper's fine-tuning after the rank search).

    ``S1 = S0 - h U0^T G V0``; ranks, ``U`` and ``V`` do not change. One gradient evaluation.

    Args:
        optimizer: inner optax transform, or a learning rate / schedule.
        other_optimizer: optimiser for the leaves that are not ``LowRank``.

    Returns:
        An ``optax.GradientTransformationExtraArgs``;
        ``update(grads, state, params, **extra_args) -> (updates, state)``.

    Composition and skipped steps as for :func:`bug`.
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
    if integrator is _int.BUG and kwargs.get("tau") is None:
        integrator = _int.BUG_FIXED
    cfg, schedule, other, init_fn = _build(
        integrator, name, learning_rate, **{"min_rank": 2, **kwargs}
    )
    grads = grad_fn(params)
    _check_grads(grads, params, name)
    return _run(integrator, cfg, schedule, other, grads, init_fn(params), params, grad_fn)[0]
