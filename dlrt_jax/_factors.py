"""The low-rank factor pytree ``LowRank`` and its application without forming ``W``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlrt_jax import _linalg
from dlrt_jax._truncation import truncation_rank

__all__ = [
    "LowRank",
    "default_capacity",
    "is_lowrank",
    "lowrank_apply",
    "lowrank_map",
]


def default_capacity(shape: Sequence[int]) -> int:
    """The default capacity ``max(1, floor(min(n, m) / 2))`` of an ``n x m`` factor.

    With this capacity the augmented bases of the rank-adaptive integrators (``2c`` columns) fit
    in ``min(n, m)`` dimensions, as in the paper's code (``max_rank = floor(min(n, m) / 2)``).
    """
    n, m = shape
    return max(1, min(n, m) // 2)


def _is_traced(x: Any) -> bool:
    """The one "is it traced" test: validation skips traced values (they were checked, or are
    checked, where they are concrete)."""
    return isinstance(x, jax.core.Tracer)


def _check_int(
    value: Any, name: str, low: int, high: int | None = None, *, upper: str = "", fix: str = ""
) -> Any:
    """The one integer check: ``value`` (an int, a whole float or a 0-d array of one) is a whole
    number in ``[low, high]``; returns it as an ``int`` (a traced value: unchecked, unchanged).

    The message names the argument and its bounds (``upper`` describes ``high``), then ``fix``.
    """
    if _is_traced(value):
        return value
    v = np.asarray(value)
    if v.shape == () and np.issubdtype(v.dtype, np.number) and float(v).is_integer():
        if low <= int(v) and (high is None or int(v) <= high):
            return int(v)
    got = v.item() if v.shape == () else value
    bounds = f">= {low}" if high is None else f"in [{low}, {upper or high}]"
    raise ValueError(f"`{name}` must be an integer {bounds}, got {got!r}.{fix}")


def _check_rank_value(rank: Any, capacity: int, name: str = "rank") -> None:
    """The rank rule: a whole number in ``[1, capacity]`` (traced ranks are not checked)."""
    r = _check_int(rank, name, 1)
    if not _is_traced(r) and r > capacity:
        raise ValueError(
            f"`{name}`={r} exceeds the capacity {capacity} (the number of columns of U and V; "
            f"`{name}` must be in [1, capacity]); pass a larger `capacity=` or a smaller "
            f"`{name}=`."
        )


def _resolve_capacity(capacity: int | None, shape: Sequence[int]) -> int:
    """The capacity rule: :func:`default_capacity` or an integer in ``[1, min(n, m)]``."""
    n, m = shape
    if capacity is None:
        return default_capacity(shape)
    bound = f"min(n, m)={min(n, m)}"
    return _check_int(capacity, "capacity", 1, min(n, m), upper=bound, fix=f" ({n} x {m} matrix)")


def _check_arrays(U: jax.Array, S: jax.Array, V: jax.Array, finite: bool = True) -> int:
    """Validate shapes, dtypes and (concrete arrays, with ``finite``) finiteness; return ``c``."""
    for name, a in (("U", U), ("S", S), ("V", V)):
        if a.ndim != 2:
            raise ValueError(f"`{name}` must be a 2-D array, got shape {a.shape}.")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(
                f"`{name}` must have a floating dtype (float32, float64, bfloat16, ...), got "
                f"{a.dtype}. Cast it first, e.g. `{name}.astype(jnp.float32)`."
            )
    (n, c), m = U.shape, V.shape[0]
    if V.shape[1] != c or S.shape != (c, c):
        raise ValueError(
            f"Inconsistent factor shapes U {U.shape}, S {S.shape}, V {V.shape}: expected "
            "U (n, c), S (c, c), V (m, c) with the same capacity c."
        )
    if not U.dtype == S.dtype == V.dtype:
        raise TypeError(f"U, S, V must share one dtype, got {U.dtype}, {S.dtype}, {V.dtype}.")
    if c > min(n, m):
        raise ValueError(
            f"capacity c={c} must be <= min(n, m) = {min(n, m)} for an {n} x {m} factor."
        )
    for name, a in (("U", U), ("S", S), ("V", V)) if finite else ():
        if _is_traced(a):
            continue
        with jax.ensure_compile_time_eval():  # concrete inside a traced function, too
            bad = int(jnp.sum(~jnp.isfinite(a)))
        if bad:
            raise ValueError(
                f"`{name}` contains {bad} NaN or Inf entries; a LowRank factor must be finite "
                "(every training step from it would be skipped as non-finite). Check the "
                f"arrays you pass (e.g. `jnp.isfinite({name}).all()`) or rebuild the factor with "
                "LowRank.from_dense / LowRank.random."
            )
    return c


@jax.tree_util.register_pytree_node_class
class LowRank:
    r"""A rank-``r`` matrix ``W = U S V^T`` stored with a static capacity ``c >= r``.

    ``U`` is ``(n, c)``, ``S`` is ``(c, c)`` and ``V`` is ``(m, c)`` (``W`` is ``n x m``, out x in).
    Only the leading ``r`` columns of ``U`` and ``V`` and the leading ``r x r`` block of ``S`` are
    active; ``r`` is a traced scalar (``rank``), so a jitted training step keeps one set of shapes
    while the rank moves. The inactive parts never influence results: ``S`` is masked to its active
    block wherever the factor is used, and so are the small ``(batch, c)`` intermediates of
    :func:`lowrank_apply` (masking the ``(n, c)`` bases instead costs a pass over them per use);
    the inactive columns of ``U`` and ``V`` must therefore be finite. The integrators keep all
    ``c`` columns of ``U`` and ``V`` orthonormal (the inactive ones are an orthonormal completion)
    and ``S`` zero outside its active block.

    Args:
        U: ``(n, c)`` basis of the column space.
        S: ``(c, c)`` core.
        V: ``(m, c)`` basis of the row space.
        rank: active rank in ``[1, c]`` (default ``c``). Stored as a float32 scalar holding a
            whole number, so that ``jax.grad`` accepts a pytree of ``LowRank`` leaves;
            ``active_rank`` gives it as int32.

    **Validation.** The constructor (and :meth:`replace`) raises ``ValueError`` for ``U``, ``S``
    or ``V`` containing NaN or Inf (a non-finite factor makes every later training step non-finite,
    and the transforms skip those), and for a ``rank`` outside ``[1, capacity]``. Both checks need
    concrete values: under ``jit`` tracing they are skipped.

    **Gradients.** Read the factor only through :func:`lowrank_apply`, :func:`lowrank_map` or
    :meth:`to_dense`. Their custom VJPs make ``jax.grad`` return, in the slots of a ``LowRank``,
    the three projected gradients the DLRT integrators need (``docs/method.md``, "Three projected
    gradients"), with ``G = dL/dW``, masked to the active rank and ``grad.rank`` 0:

    .. math::

        \text{grad.U} = G V, \qquad \text{grad.S} = U^T G V, \qquad \text{grad.V} = G^T U

    These are *not* the partial derivatives with respect to the entries of ``U``, ``S``, ``V``: a
    loss that reads ``lr.U`` directly gets ordinary partials there, which the integrators would
    misread.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from dlrt_jax import LowRank
        >>> w = LowRank.random(jax.random.key(0), (6, 4), rank=2)
        >>> w.U.shape, w.S.shape, w.V.shape, int(w.active_rank), w.capacity
        ((6, 2), (2, 2), (4, 2), 2, 2)
        >>> y = w(jnp.ones((3, 4)))  # x -> U (S (V^T x)) over the last axis
        >>> y.shape
        (3, 6)
    """

    __slots__ = ("U", "S", "V", "rank")

    def __init__(self, U: jax.Array, S: jax.Array, V: jax.Array, rank: Any = None):
        U, S, V = jnp.asarray(U), jnp.asarray(S), jnp.asarray(V)
        c = _check_arrays(U, S, V)
        if rank is None:
            rank = c
        _check_rank_value(rank, c)
        self.U, self.S, self.V = U, S, V
        self.rank = jnp.asarray(rank, dtype=jnp.float32)

    # -- pytree ---------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.U, self.S, self.V, self.rank), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.U, obj.S, obj.V, obj.rank = children
        return obj

    @classmethod
    def _unchecked(cls, U, S, V, rank) -> LowRank:
        """Build without validation (for deltas and intermediate points inside the integrators)."""
        return cls.tree_unflatten(None, (U, S, V, rank))

    # -- properties -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``: the shape of ``W``."""
        return (self.U.shape[0], self.V.shape[0])

    @property
    def capacity(self) -> int:
        """The static number of columns ``c`` of ``U`` and ``V``."""
        return self.U.shape[1]

    @property
    def dtype(self):
        return self.U.dtype

    @property
    def active_rank(self) -> jax.Array:
        """The rank as an int32 scalar."""
        return jnp.asarray(self.rank).astype(jnp.int32)

    @property
    def mask(self) -> jax.Array:
        """Boolean ``(c,)`` vector of the active columns."""
        return _linalg.column_mask(self.capacity, self.rank)

    def masked(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(U, S, V)`` with the inactive columns and the inactive part of ``S`` set to zero."""
        mask = self.mask
        return (
            _linalg.mask_cols(self.U, mask),
            _linalg.mask_block(self.S, mask, mask),
            _linalg.mask_cols(self.V, mask),
        )

    def __repr__(self) -> str:
        if not all(hasattr(a, "shape") for a in (self.U, self.S, self.V)):
            # leaves that are not arrays, e.g. after `jax.tree.map(jnp.shape, state)`
            return f"LowRank(U={self.U!r}, S={self.S!r}, V={self.V!r}, rank={self.rank!r})"
        try:
            rank = int(self.rank)
        except Exception:  # traced or abstract
            rank = "?"
        return (
            f"LowRank(shape={self.shape}, capacity={self.capacity}, rank={rank}, "
            f"dtype={self.dtype})"
        )

    def replace(self, **changes) -> LowRank:
        """A copy with some of ``U``, ``S``, ``V``, ``rank`` replaced (validated).

        The result is validated as the constructor validates (shapes, dtypes, finite entries,
        ``rank`` in ``[1, capacity]``), except for a *gradient* ``LowRank`` (the cotangent
        ``jax.grad`` returns, whose ``rank`` slot is 0): replacing its ``U``, ``S`` or ``V``
        keeps the rank slot 0 and checks only shapes and dtypes, so gradients can be edited
        (clipped, rescaled) with ``replace``, NaN included (the transforms skip such steps).

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from dlrt_jax import LowRank, lowrank_apply
            >>> w = LowRank.random(jax.random.key(0), (6, 4), rank=2)
            >>> int(w.replace(rank=1).active_rank)
            1
            >>> g = jax.grad(lambda w: jnp.sum(lowrank_apply(w, jnp.ones((3, 4)))))(w)
            >>> float(g.rank), float(g.replace(S=0.5 * g.S).rank)  # a cotangent stays one
            (0.0, 0.0)
        """
        fields = {"U": self.U, "S": self.S, "V": self.V, "rank": self.rank}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"LowRank.replace got unknown fields {sorted(unknown)}.")
        fields.update(changes)
        if (
            "rank" not in changes
            and not _is_traced(self.rank)
            and np.ndim(self.rank) == 0
            and float(self.rank) == 0
        ):
            U, S, V = (jnp.asarray(fields[k]) for k in ("U", "S", "V"))
            _check_arrays(U, S, V, finite=False)  # a cotangent (rank slot 0): NaN are skipped
            return LowRank._unchecked(U, S, V, self.rank)
        return LowRank(**fields)

    def truncate(self, tau: Any, *, absolute: bool = False, min_rank: int = 1) -> LowRank:
        r"""The factor truncated by the DLRT rule, in the same capacity (jittable).

        ``S = P diag(sigma) Q^T`` (active block); the new rank is the smallest ``rho`` with
        ``sqrt(sum_{j > rho} sigma_j^2) <= theta`` (:func:`truncation_rank`), clamped to
        ``[min_rank, capacity]``; ``U P``, ``diag(sigma)``, ``V Q`` are the new factors. Use it
        to compress a model for evaluation or export (for example after training with
        ``truncate_every > 1``, whose ranks between truncations sit at the capacity). It does not
        touch an optimiser state.

        Args:
            tau: tolerance (relative to ``||sigma||_2`` unless ``absolute``).
            absolute: use ``theta = tau``.
            min_rank: lower clamp of the new rank.

        Returns:
            A ``LowRank`` of the same capacity, rank at most the current one.

        Examples:
            >>> import jax.numpy as jnp
            >>> from dlrt_jax import LowRank
            >>> w = LowRank.random(jax.random.key(0), (8, 6), rank=3,
            ...                    singular_values=jnp.array([1.0, 0.5, 1e-4]))
            >>> int(w.truncate(1e-3).active_rank), int(w.truncate(0.6).active_rank)
            (2, 1)
        """
        P, sigma, Qt = _linalg.svd(self.masked()[1])
        c = self.capacity
        r1 = truncation_rank(
            sigma, tau, absolute=absolute, min_rank=min(int(min_rank), c), max_rank=c
        )
        r1 = jnp.minimum(r1, self.active_rank)
        S1 = jnp.diag(jnp.where(_linalg.column_mask(c, r1), sigma, 0.0)).astype(self.dtype)
        with _linalg.full_precision():
            U1, V1 = self.U @ P, self.V @ Qt.T
        return LowRank._unchecked(U1, S1, V1, r1.astype(jnp.float32))

    # -- use ------------------------------------------------------------------------------------
    def to_dense(self) -> jax.Array:
        """``W = U S V^T`` (``n x m``) over the active rank. Differentiable as described above."""
        return _to_dense(*self.masked())

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x -> x W^T``, i.e. ``U (S (V^T x))`` over the last axis; see :func:`lowrank_apply`."""
        return lowrank_apply(self, x)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        key: jax.Array,
        shape: Sequence[int],
        rank: int | None = None,
        *,
        capacity: int | None = None,
        singular_values: Any = None,
        scale: float = 1.0,
        dtype: Any = jnp.float32,
    ) -> LowRank:
        """A random factor: orthonormal ``U``, ``V`` (QR of Gaussians) and diagonal ``S``.

        Args:
            key: a JAX PRNG key.
            shape: ``(n, m)`` of ``W``.
            rank: active rank; defaults to the capacity (the paper starts adaptive layers at
                their maximal rank).
            capacity: static capacity; default :func:`default_capacity`.
            singular_values: ``None`` for the paper's initialisation (sorted ``|N(0, 1)|``
                samples, descending), or an array of ``rank`` values for the diagonal of ``S``.
            scale: multiplies the singular values.
            dtype: floating dtype of the factors.

        Examples:
            >>> import jax
            >>> from dlrt_jax import LowRank
            >>> w = LowRank.random(jax.random.key(0), (8, 6), rank=2, capacity=3)
            >>> int(w.active_rank), w.capacity
            (2, 3)
        """
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(f"`shape` must be (n, m) with positive integers, got {shape}.")
        n, m = (_check_int(d, "shape", 1) for d in shape)
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"`dtype` must be a floating dtype, got {jnp.dtype(dtype)}.")
        c = _resolve_capacity(capacity, (n, m))
        if rank is None:
            rank = c
        _check_rank_value(rank, c)
        ku, kv, ks = jax.random.split(key, 3)
        U = _linalg.orth(jax.random.normal(ku, (n, c), jnp.float32))
        V = _linalg.orth(jax.random.normal(kv, (m, c), jnp.float32))
        if singular_values is None:
            s = jnp.sort(jnp.abs(jax.random.normal(ks, (c,), jnp.float32)))[::-1]
        else:
            s = jnp.asarray(singular_values, jnp.float32).reshape(-1)
            if not _is_traced(rank) and s.shape[0] != int(rank):
                raise ValueError(
                    f"`singular_values` must have `rank`={int(rank)} entries, got {s.shape[0]}."
                )
            s = jnp.zeros((c,), jnp.float32).at[: s.shape[0]].set(s)
        mask = _linalg.column_mask(c, rank)
        S = jnp.diag(jnp.where(mask, s * scale, 0.0))
        return cls(U.astype(dtype), S.astype(dtype), V.astype(dtype), rank)

    @classmethod
    def from_dense(
        cls,
        W: jax.Array,
        *,
        rank: int | None = None,
        tol: float | None = None,
        relative: bool = True,
        capacity: int | None = None,
        min_rank: int = 1,
    ) -> LowRank:
        """Truncated SVD of a dense ``n x m`` matrix, at a fixed ``rank`` or a tolerance ``tol``.

        With ``tol``, the rank is the smallest ``rho`` whose tail norm
        ``sqrt(sum_{j > rho} sigma_j^2)`` is at most ``tol * ||sigma||_2`` (``relative=True``) or
        ``tol`` (``relative=False``), clamped to ``[min_rank, capacity]``; the same rule the
        rank-adaptive integrators use. Works under ``jit`` (the rank is then traced).

        Args:
            W: the ``n x m`` matrix (finite, floating).
            rank: a fixed rank in ``[1, capacity]``.
            tol: a truncation tolerance (``>= 0``), instead of ``rank``.
            relative: ``tol`` relative to ``||sigma||_2`` (default) or absolute.
            capacity: static capacity; default :func:`default_capacity`.
            min_rank: lower clamp of the rank found for ``tol``.

        Examples:
            >>> import jax.numpy as jnp
            >>> from dlrt_jax import LowRank
            >>> W = jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3))  # rank 1
            >>> w = LowRank.from_dense(W, tol=1e-6)
            >>> int(w.active_rank), bool(jnp.allclose(w.to_dense(), W, atol=1e-5))
            (1, True)
        """
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"`W` must be a 2-D matrix, got shape {W.shape}.")
        if not jnp.issubdtype(W.dtype, jnp.floating):
            raise TypeError(f"`W` must have a floating dtype, got {W.dtype}.")
        if (rank is None) == (tol is None):
            raise ValueError("Give exactly one of `rank` (fixed rank) or `tol` (truncation).")
        c = _resolve_capacity(capacity, W.shape)
        _check_int(min_rank, "min_rank", 1, c, upper=f"capacity={c}")
        if not _is_traced(W) and not bool(jnp.all(jnp.isfinite(W))):
            raise ValueError("`W` contains NaN or Inf; cannot take its SVD.")
        P, sigma, Qt = _linalg.svd(W)
        if rank is None:
            if not _is_traced(tol) and float(tol) < 0:
                raise ValueError(f"`tol` must be >= 0, got {tol}.")
            rank = truncation_rank(
                sigma, tol, absolute=not relative, min_rank=min_rank, max_rank=c
            ).astype(jnp.float32)
        else:
            _check_rank_value(rank, c)
        mask = _linalg.column_mask(c, rank)
        S = jnp.diag(jnp.where(mask, sigma[:c], 0.0)).astype(W.dtype)
        return cls(P[:, :c], S, Qt[:c, :].T, rank)


def is_lowrank(x: Any) -> bool:
    """``True`` for a :class:`LowRank` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LowRank)


# ---- application with DLRT gradients ------------------------------------------------------------


@jax.custom_vjp
def _to_dense(U, S, V):
    return (U @ S) @ V.T


def _to_dense_fwd(U, S, V):
    return _to_dense(U, S, V), (U, V)


def _to_dense_bwd(res, G):
    U, V = res
    GV = G @ V
    return GV, U.T @ GV, G.T @ U


_to_dense.defvjp(_to_dense_fwd, _to_dense_bwd)


def _dense_phi(x: jax.Array, V: jax.Array) -> jax.Array:
    return x @ V


def _sum_outer(a: jax.Array, b: jax.Array) -> jax.Array:
    """``sum over all leading axes of a[..., i] b[..., j]`` -> ``(i, j)``."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(phi, U, S, V, x, mask):
    return _apply_fwd(phi, U, S, V, x, mask)[0]


def _apply_fwd(phi, U, S, V, x, mask):
    # Only the small (..., c) intermediates are masked, never the (n, c) bases: ``S`` is zero
    # outside its active block, so the inactive columns of U and V (finite and orthonormal, as
    # every factor keeps them) do not reach the output, and masking z and dy U gives the
    # projected gradients of the masked factor.
    z = phi(x, V)
    z = jnp.where(mask, z, jnp.zeros((), z.dtype))
    return (z @ S.T) @ U.T, (U, S, V, x, z, mask)


def _apply_bwd(phi, res, dy):
    U, S, V, x, z, mask = res
    dyU = dy @ U  # (..., c)
    dyU = jnp.where(mask, dyU, jnp.zeros((), dyU.dtype))
    _, phi_vjp = jax.vjp(phi, x, V)
    dx = phi_vjp(dyU @ S)[0]  # dL/dx = dy W
    gU = _sum_outer(dy, z)  # G V
    gS = _sum_outer(dyU, z)  # U^T G V
    gV = phi_vjp(dyU)[1]  # G^T U
    return gU, gS, gV, dx, None


_apply.defvjp(_apply_fwd, _apply_bwd)


def lowrank_map(
    lr: LowRank, x: jax.Array, phi: Callable[[jax.Array, jax.Array], jax.Array]
) -> jax.Array:
    r"""Apply a layer that is linear in its kernel ``W = U S V^T``, without forming ``W``.

    ``phi(x, V)`` must be the layer applied with the ``c`` "filters" in the columns of ``V`` and
    must be linear in ``V`` (for a dense layer ``phi(x, V) = x @ V``; for a convolution, the
    convolution with ``V`` reshaped to ``c`` filters). The result is ``phi(x, V) S^T U^T`` over the
    last axis. The custom VJP returns the DLRT gradients of :class:`LowRank`: with ``z = phi(x, V)``
    and output cotangent ``dy``, ``grad.U = sum dy^T z`` (``= G V``), ``grad.S = sum (dy U)^T z``
    (``= U^T G V``), ``grad.V = phi^T(dy U)`` (``= G^T U``), and ``dx = phi_x^T(dy U S)``.

    Args:
        lr: the factor.
        x: the layer's input.
        phi: ``phi(x, V)``, a static (hashed) argument: pass the same function object on every
            call, not a new lambda, so that ``jit`` does not retrace.

    Returns:
        ``phi(x, V) S^T U^T``: the layer's output with the kernel ``W``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from dlrt_jax import LowRank, lowrank_map
        >>> w = LowRank.random(jax.random.key(0), (5, 4), rank=2)
        >>> dense = lambda x, V: x @ V
        >>> x = jnp.ones((3, 4))
        >>> bool(jnp.allclose(lowrank_map(w, x, dense), x @ w.to_dense().T, atol=1e-5))
        True
    """
    if not isinstance(lr, LowRank):
        raise TypeError(f"`lr` must be a LowRank, got {type(lr).__name__}.")
    mask = lr.mask
    return _apply(phi, lr.U, _linalg.mask_block(lr.S, mask, mask), lr.V, x, mask)


def lowrank_apply(lr: LowRank, x: jax.Array) -> jax.Array:
    r"""``x W^T = ((x V) S^T) U^T`` over the last axis of ``x`` (any leading batch axes).

    Cost ``O(c (n + m))`` per row of ``x``; ``W`` is never formed. Gradients as documented in
    :class:`LowRank`.

    Args:
        lr: the factor (``W`` is ``n x m``).
        x: an array whose last axis has size ``m``.

    Returns:
        ``x W^T``, the last axis of size ``n``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from dlrt_jax import LowRank, lowrank_apply
        >>> w = LowRank.random(jax.random.key(1), (5, 4), rank=2)
        >>> x = jnp.ones((2, 7, 4))
        >>> lowrank_apply(w, x).shape
        (2, 7, 5)
    """
    if not isinstance(lr, LowRank):
        raise TypeError(f"`lr` must be a LowRank, got {type(lr).__name__}.")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != lr.shape[1]:
        raise ValueError(
            f"Input's last axis must have size m={lr.shape[1]} (W is {lr.shape[0]} x "
            f"{lr.shape[1]}), got input shape {x.shape}."
        )
    return lowrank_map(lr, x, _dense_phi)
