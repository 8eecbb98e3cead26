"""Changing the static capacity of ``LowRank`` factors outside ``jit``.

Inside a jitted step the rank moves within a fixed capacity, so the step's cost follows the
capacity. Between jitted segments (say once per epoch), :func:`fit_capacity` shrinks or grows each
capacity to a bucket just above the current rank; ``jit`` then compiles once per distinct set of
capacities, which the bucketing keeps small.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlrt_jax._factors import (
    LowRank,
    _check_int,
    _resolve_capacity,
    default_capacity,
    is_lowrank,
)
from dlrt_jax._integrators import FactorState
from dlrt_jax._linalg import full_precision
from dlrt_jax._transforms import DLRTState, check

__all__ = ["CapacityPolicy", "fit_capacity", "resize_capacity"]


def _resize_factor(x: LowRank, c1: int, path: str) -> LowRank:
    c0, rank = x.capacity, int(x.rank)
    try:  # the capacity rule of LowRank
        c1 = _resolve_capacity(c1, x.shape)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if c1 < rank:
        raise ValueError(
            f"{path}: the new capacity {c1} is below the factor's rank={rank}; keep it in "
            f"[rank, min(n, m)={min(x.shape)}]."
        )
    if c1 <= c0:
        return LowRank(x.U[:, :c1], x.S[:c1, :c1], x.V[:, :c1], x.rank)

    def complete(B, key):  # c1 - c0 orthonormal columns orthogonal to all columns of B
        A = jax.random.normal(key, (B.shape[0], c1 - c0), jnp.float32).astype(B.dtype)
        with full_precision():
            for _ in range(2):
                A = A - B @ (B.T @ A)
            q = jnp.linalg.qr(A)[0]
            q = q - B @ (B.T @ q)
        return jnp.concatenate([B, jnp.linalg.qr(q)[0]], axis=1)

    ku, kv = jax.random.split(jax.random.key(c1 * 7919 + c0))
    S = jnp.zeros((c1, c1), x.dtype).at[:c0, :c0].set(x.S)
    return LowRank(complete(x.U, ku), S, complete(x.V, kv), x.rank)


def _resize_leaf(leaf: Any, old: tuple[int, ...], new: tuple[int, ...]) -> Any:
    """Slice or zero-pad a state leaf of shape ``old`` to ``new``."""
    if not hasattr(leaf, "shape") or tuple(leaf.shape) != old:
        return leaf
    out = leaf[tuple(slice(0, min(a, b)) for a, b in zip(old, new))]
    pad = [(0, b - min(a, b)) for a, b in zip(old, new)]
    return jnp.pad(out, pad)


def _resize_factor_state(fs: FactorState, x: LowRank, c1: int) -> FactorState:
    n, m = x.shape
    c0 = x.capacity

    def resize(state, old, new):
        return jax.tree_util.tree_map(lambda leaf: _resize_leaf(leaf, old, new), state)

    return FactorState(
        K=resize(fs.K, (n, c0), (n, c1)),
        L=resize(fs.L, (m, c0), (m, c1)),
        S=resize(fs.S, (c0, c0), (c1, c1)),
    )


def resize_capacity(
    params: Any, opt_state: Any = None, capacity: int | Callable[[LowRank], int] = None
) -> tuple[Any, Any]:
    """Set the capacity of every ``LowRank`` in ``params`` (and its optimiser state). Not jittable.

    Shrinking drops inactive columns (the active ones are kept exactly); growing appends an
    orthonormal completion to ``U`` and ``V`` and zeros to ``S``, so ``W`` is unchanged either way.
    Every ``DLRTState`` found in ``opt_state`` (also inside ``optax.chain`` or
    ``optax.inject_hyperparams`` states) has its ``K``/``L``/``S`` moments sliced or zero-padded
    to match, so training continues with the same optimiser.

    Args:
        params: a pytree with ``LowRank`` leaves (concrete arrays).
        opt_state: the optimiser state built for ``params`` by a DLRT transform, or ``None``.
        capacity: an int for every factor, or a function ``LowRank -> int``.

    Returns:
        ``(new_params, new_opt_state)``.

    Examples:
        >>> import jax
        >>> from dlrt_jax import LowRank, resize_capacity
        >>> p = {"w": LowRank.random(jax.random.key(0), (20, 16), rank=3, capacity=8)}
        >>> p2, _ = resize_capacity(p, None, 4)
        >>> p2["w"].capacity, int(p2["w"].active_rank)
        (4, 3)
    """
    if capacity is None:
        raise TypeError("`capacity` is required: an int or a function LowRank -> int.")
    cap_fn = capacity if callable(capacity) else (lambda _x: capacity)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)
    paths = [p for p, _ in leaves]
    xs = [leaf for _, leaf in leaves]
    if not any(is_lowrank(x) for x in xs):
        raise ValueError("`params` contain no LowRank factor.")
    caps = [cap_fn(x) if is_lowrank(x) else None for x in xs]
    new_xs = [
        _resize_factor(x, c, "params" + jax.tree_util.keystr(p)) if is_lowrank(x) else x
        for p, x, c in zip(paths, xs, caps)
    ]
    new_params = treedef.unflatten(new_xs)
    if opt_state is None:
        return new_params, None

    def fix(node):
        if not isinstance(node, DLRTState):
            return node
        resized = [(x, c) for x, c in zip(xs, caps) if is_lowrank(x)]
        if not isinstance(node.factors, tuple | list) or len(node.factors) != len(resized):
            raise ValueError(
                "`opt_state` holds a DLRT state whose per-factor states do not match the "
                f"{len(resized)} LowRank factors of `params`; pass the params the state was "
                "built for (`tx.init(params)`)."
            )
        new_fstates = tuple(
            _resize_factor_state(fs, x, c) for fs, (x, c) in zip(node.factors, resized)
        )
        return node._replace(factors=new_fstates)

    new_state = jax.tree_util.tree_map(fix, opt_state, is_leaf=lambda s: isinstance(s, DLRTState))
    return new_params, new_state


def fit_capacity(
    params: Any,
    opt_state: Any = None,
    *,
    headroom: float = 2.0,
    multiple: int = 8,
    max_capacity: int | None = None,
) -> tuple[Any, Any]:
    """Resize every capacity to ``ceil(headroom * rank)`` rounded up to a ``multiple``.

    The result is clipped to ``[rank, limit]`` with ``limit = max_capacity`` or, by default,
    :func:`default_capacity` (``floor(min(n, m) / 2)``, what the rank-adaptive integrators allow).
    Call it outside ``jit`` every few epochs: the step's cost then follows the rank, and ``jit``
    compiles once per distinct set of capacities. A ``headroom`` of 2 leaves room for the rank to
    double before the next call (the adaptive integrators cannot exceed the capacity).

    Args:
        params: a pytree with ``LowRank`` leaves (concrete arrays).
        opt_state: the optimiser state built for ``params`` by a DLRT transform, or ``None``.
        headroom: capacity as a multiple of the rank (>= 1).
        multiple: bucket width (>= 1).
        max_capacity: optional upper limit of every capacity.

    Returns:
        ``(new_params, new_opt_state)``, as :func:`resize_capacity`.
    """
    # the capacity rule is CapacityPolicy's (which validates), without its free-column minimum
    rule = CapacityPolicy(
        headroom=headroom, min_free=0, multiple=multiple, max_capacity=max_capacity
    )
    return resize_capacity(params, opt_state, rule.target)


def _bucket(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


@dataclasses.dataclass
class CapacityPolicy:
    r"""When and how to resize capacities during training, so that a step's cost follows the rank.

    A jitted DLRT step costs in proportion to each factor's static capacity ``c``, not its rank
    ``r``; the rank-adaptive integrators can raise a rank to at most ``c``. The policy keeps each
    capacity in a band above its rank:

    * target ``t(r) = bucket(max(ceil(headroom * r), r + min_free))``, rounded up to a multiple of
      ``multiple`` and clipped to the factor's limit (``max_capacity`` or
      :func:`default_capacity`);
    * every ``every`` steps the ranks are read (one host sync) and the factors are resized to
      ``t(r)`` when any capacity has left its band: ``c < t(r)`` (the rank is near the capacity:
      grow at once), or, to shrink, ``c >= shrink_at * t(r)`` and ``c > t(r) + multiple`` (at
      least two buckets too large) when the rank has stopped falling, ``c > 2 t(r)`` while it
      falls (a step at a large capacity costs many small ones: follow a falling rank early).

    Each resize costs a compile of the step (seconds; ten or more for the paper's MLP on a 2-core
    CPU) and a smaller capacity saves a fraction of a step's time, so shrinking is worth it only
    for a large step: with ``shrink_at = 1.5`` a run visits few capacity sets, a rank that
    wobbles at a bucket edge does not resize back and forth, and a rank that falls for many steps
    (the first epoch from a high start) is followed by one or two resizes, not one per check.

    The policy remembers the ranks of its last check (to tell a falling rank); use one policy
    object per training run, and call :meth:`observe` on the initial params so that the first
    check can tell a rank that is falling from its start.

    Every resize keeps ``W`` and the optimiser moments exactly (:func:`resize_capacity`). ``jit``
    compiles once per distinct set of capacities and keeps every compiled step in its cache, so a
    run compiles at most once per bucket it visits.

    Args:
        every: check the ranks every ``every`` steps (>= 1).
        headroom: capacity as a multiple of the rank (>= 1). The default 1 relies on
            ``min_free`` alone: a step's cost grows quickly with the capacity (the paper's MLP
            at rank 55: capacity 64 / 80 / 96 cost 1.06 / 1.49 / 1.89 dense Adam steps on the
            2-core CPU of ``benchmarks/README.md``), and the rank can outgrow the capacity for at
            most ``every`` steps before the next check grows it.
        min_free: at least this many inactive columns above the rank (>= 0).
        multiple: bucket width (>= 1).
        max_capacity: optional upper limit of every capacity.
        shrink_at: shrink a settled rank's capacity only once it is this multiple of its target
            (> 1).

    Examples:
        >>> import jax
        >>> from dlrt_jax import CapacityPolicy, LowRank
        >>> policy = CapacityPolicy(every=1, headroom=1.25, min_free=4, multiple=8)
        >>> params = {"w": LowRank.random(jax.random.key(0), (64, 64), rank=5, capacity=32)}
        >>> policy.target(params["w"])  # max(ceil(1.25 * 5), 5 + 4) = 9 -> 16
        16
        >>> params, _, changed = policy(1, params)
        >>> params["w"].capacity, changed
        (16, True)
    """

    every: int = 10
    headroom: float = 1.0
    min_free: int = 8
    multiple: int = 8
    max_capacity: int | None = None
    shrink_at: float = 1.5

    _previous: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        for name, low in (("every", 1), ("min_free", 0), ("multiple", 1), ("max_capacity", 1)):
            if getattr(self, name) is not None or name != "max_capacity":
                setattr(self, name, _check_int(getattr(self, name), name, low))
        if not self.headroom >= 1:
            raise ValueError(f"`headroom` must be >= 1, got {self.headroom!r}.")
        if not self.shrink_at > 1:
            raise ValueError(
                f"`shrink_at` must be > 1 (a capacity at its target never shrinks), got "
                f"{self.shrink_at!r}."
            )

    def _limit(self, x: LowRank) -> int:
        limit = default_capacity(x.shape) if self.max_capacity is None else self.max_capacity
        return min(limit, min(x.shape))

    def target(self, x: LowRank, rank: int | None = None) -> int:
        """The capacity this policy wants for ``x`` (at ``rank``, default its current rank)."""
        r = int(x.rank) if rank is None else int(rank)
        want = _bucket(max(math.ceil(self.headroom * r), r + self.min_free), self.multiple)
        return max(r, min(want, self._limit(x)))

    def needs_resize(self, x: LowRank, rank: int | None = None, falling: bool = False) -> bool:
        """Whether the capacity of ``x`` has left its band (see the class docstring).

        ``falling``: the rank fell since the previous check. A capacity at most twice its target
        then waits for the rank to settle, so that a rank that falls over many
        steps (the first epoch of a run that starts at a high rank) is followed by a few resizes
        (few compiles) rather than one at every check.
        """
        t, c = self.target(x, rank), x.capacity
        if c < t:
            return True
        if falling:
            return c > 2 * t
        return c > t + self.multiple and c >= self.shrink_at * t

    def observe(self, params: Any) -> None:
        """Record the ranks of ``params`` as those of the last check (one host sync).

        Call it before training: the first check then tells a rank that has been falling since
        the start (the rank-adaptive integrators drop most of a high initial rank within tens of
        steps) and waits for it to settle instead of compiling an intermediate capacity.
        """
        factors = [
            x for x in jax.tree_util.tree_leaves(params, is_leaf=is_lowrank) if is_lowrank(x)
        ]
        self._previous = [int(r) for r in jax.device_get([x.rank for x in factors])]

    def __call__(self, step: int, params: Any, opt_state: Any = None) -> tuple[Any, Any, bool]:
        """After training step ``step`` (1-based): ``(params, opt_state, resized)``.

        Reads the ranks only when ``step`` is a multiple of ``every``; resizes every factor to its
        target when any factor needs it (all at once: one recompile instead of several). At a
        check it also runs :func:`dlrt_jax.check` on ``opt_state``: a fault that a jitted step
        recorded (non-finite factors, a transform after DLRT in the chain) raises here.
        """
        if step % self.every:
            return params, opt_state, False
        if opt_state is not None:  # the host syncs here anyway: report a fault the step recorded
            check(opt_state, params)
        factors = [
            x for x in jax.tree_util.tree_leaves(params, is_leaf=is_lowrank) if is_lowrank(x)
        ]
        ranks = [int(r) for r in jax.device_get([x.rank for x in factors])]
        previous = self._previous if len(self._previous) == len(ranks) else ranks
        self._previous = ranks
        falling = [r < q for r, q in zip(ranks, previous)]
        if not any(self.needs_resize(x, r, f) for x, r, f in zip(factors, ranks, falling)):
            return params, opt_state, False
        params, opt_state = resize_capacity(params, opt_state, lambda x: self.target(x))
        return params, opt_state, True
