"""The DLRT integrators, written per factor as in ``docs/method.md``, "The integrators".

Each integrator is a sequence of *phases*. A phase works on one factor: it takes the :class:`Carry`
of the previous phase and the projected gradients of the factor at the last evaluation point (the
slots of a ``LowRank`` cotangent: ``g.U = G V``, ``g.S = U^T G V``, ``g.V = G^T U``) and returns
the next :class:`Carry`, whose ``point`` is where the next gradient must be evaluated, or, last,
the :class:`Result`. Between phases the driver in ``_transforms.py`` evaluates the gradient of the
whole model once, at all factors' points together, and it runs every phase under
:func:`~dlrt_jax._linalg.full_precision`, so the products below are all at HIGHEST precision.

Every substep ("integrate") is one step of an inner optax transform on that factor (plain SGD
``x - h g`` by default). The inner optimiser state of ``K``, ``L`` and ``S`` is carried across basis
changes by *transport* into the new basis (see :func:`transport`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dlrt_jax._factors import LowRank
from dlrt_jax._linalg import (
    active_first_concat,
    column_mask,
    mask_block,
    mask_cols,
    orth_complement,
    orth_span,
    orthonormal_basis,
    qr_fast,
    svd,
)
from dlrt_jax._truncation import truncation_rank

# Fields of optax states that hold elementwise second moments (non-negative): Adam/AdamW/AdaBelief
# (`nu`), AMSGrad (`nu_max`), RMSProp (`nu`), Adagrad (`sum_of_squares`).
SECOND_MOMENT_FIELDS = frozenset({"nu", "nu_max", "sum_of_squares"})


class FactorState(NamedTuple):
    """Inner optimiser states of the three substeps of one factor."""

    K: Any
    L: Any
    S: Any


class Config(NamedTuple):
    """Configuration shared by the phases of one step.

    Attributes:
        tx: the inner optimiser of every substep.
        tau: truncation tolerance; ``None`` keeps every rank fixed.
        absolute: ``tau`` is absolute rather than relative to ``||sigma||_2``.
        min_rank, max_rank: the clamp of a truncated rank (``max_rank`` ``None``: the capacity).
        truncate: whether this step truncates by ``tau`` (a Python bool, or a traced bool that the
            step schedule computes). A step that does not truncate keeps the whole augmented
            rank (``2r``, at most the capacity): new directions are kept to be judged later.
        prior: whether a direction new to a basis starts its elementwise second moments at the
            typical (geometric-mean) value of the others (``True``, or a traced bool) or at zero
            (``False``):
            :func:`transport`.
    """

    tx: optax.GradientTransformation
    tau: Any
    absolute: bool
    min_rank: Any
    max_rank: Any
    truncate: Any = True
    prior: Any = False


class Carry(NamedTuple):
    """What one phase hands the next.

    Attributes:
        x: the factor at the start of the step.
        state: the inner optimiser states, advanced by the substeps so far.
        point: where the next gradient is evaluated (new bases, Galerkin starting ``S``).
        M: the map ``U_new^T U0`` from the old ``U`` into ``point.U`` (rows: new, columns: old).
        N: ``V_new^T V0``, likewise.
        rows: the rows of ``point.S`` the Galerkin S-step updates (BUG).
        cols: its columns.
    """

    x: LowRank
    state: FactorState
    point: LowRank | None = None
    M: jax.Array | None = None
    N: jax.Array | None = None
    rows: jax.Array | None = None
    cols: jax.Array | None = None


class Result(NamedTuple):
    """The factor after one step and its inner optimiser states, transported into its bases."""

    factor: LowRank
    state: FactorState


Phase = Callable[[Config, Carry, LowRank], "Carry | Result"]


class Integrator(NamedTuple):
    name: str
    phases: tuple[Phase, ...]
    augments: Callable[[Config], bool]  # builds 2c-column bases, so needs 2c <= min(n, m)
    # the gradient slots ("U": G V, "S": U^T G V, "V": G^T U) each phase reads. Only these are
    # checked for finiteness, so that under jit XLA drops the products of the others (the
    # S-step's evaluation then costs two of the three backward products of a layer less)
    reads: tuple[frozenset[str], ...]
    moves_bases: bool = True  # False: U and V stay as given (only S is trained)

    @property
    def num_evals(self) -> int:
        return len(self.phases)


def init_factor_state(tx: optax.GradientTransformation, x: LowRank) -> FactorState:
    U, S, V = x.masked()
    return FactorState(K=tx.init(U @ S), L=tx.init(V @ S.T), S=tx.init(S))


def transport(state: Any, shape: tuple[int, ...], left=None, right=None, prior=False) -> Any:
    r"""Carry an inner optimiser state into a new basis.

    A moment ``m`` of a factor with the factor's ``shape`` becomes ``left @ m @ right.T`` (either
    map may be absent), the same linear map that takes the factor's coordinates from the old basis
    to the new one: ``m_K -> m_K N^T``, ``m_L -> m_L M^T``, ``m_S -> M m_S N^T`` with ``M = U_1^T
    U_0`` and ``N = V_1^T V_0``. Elementwise second moments (fields named in
    ``SECOND_MOMENT_FIELDS``) are transported with the elementwise squares of the maps, ``(M∘M) nu
    (N∘N)^T``: the diagonal of the transported covariance when entries are uncorrelated. This keeps
    them non-negative and is exact when the basis change permutes or flips basis vectors. Directions
    new to the basis start with a zero first moment, and a zero second moment or, with ``prior``
    (a bool, or a traced one), the typical (geometric-mean) second moment of the old entries
    (:func:`_transport_second_moment`); directions dropped by truncation lose theirs. Other leaves
    (counts, hyperparameters) are left alone.
    """

    def move(path, leaf):
        if not hasattr(leaf, "shape") or tuple(leaf.shape) != tuple(shape):
            return leaf
        if any(getattr(k, "name", None) in SECOND_MOMENT_FIELDS for k in path):
            return _transport_second_moment(leaf, left, right, prior)
        out = leaf
        if left is not None:
            out = left.astype(leaf.dtype) @ out
        if right is not None:
            out = out @ right.astype(leaf.dtype).T
        return out

    return jax.tree_util.tree_map_with_path(move, state)


def _transport_second_moment(nu, left, right, prior):
    """``(M∘M) nu (N∘N)^T``; with ``prior``, plus the factor's typical second moment for what the
    old basis does not cover.

    An entry ``(i, j)`` of the new basis is covered by the old one with weight ``a_i b_j``
    (``a = (M∘M) 1``, ``b = (N∘N) 1``: 1 for a direction inside the old span, 0 for a direction
    new to it). Where ``prior`` holds, the uncovered weight ``1 - a_i b_j`` gets the geometric
    mean of the transported moments (weighted by coverage): the typical size of a squared
    gradient of this factor, a prior for a coordinate the optimiser has never seen. A zero there
    would make the first step of an elementwise-normalised optimiser (Adam) on a new direction as
    large as its learning rate, whatever the size of its gradient; the arithmetic mean is set by
    the few strongest coordinates (second moments span orders of magnitude) and slows every new
    direction down to their scale (measured: ``benchmarks/README.md``, "Training dynamics").
    """
    out, a, b = nu, jnp.ones(nu.shape[:1], nu.dtype), jnp.ones(nu.shape[1:], nu.dtype)
    if left is not None:
        sq = jnp.square(left).astype(nu.dtype)
        out, a = sq @ out, jnp.sum(sq, axis=1)
    if right is not None:
        sq = jnp.square(right).astype(nu.dtype)
        out, b = out @ sq.T, jnp.sum(sq, axis=1)
    if prior is False:  # a Python False: zeros for new directions, nothing more to compute
        return out
    covered = jnp.minimum(a[:, None] * b[None, :], 1.0)
    # the mean runs over covered entries that have seen a gradient (an exact zero has no log)
    weight = jnp.where(out > 0, covered, 0.0)
    logs = jnp.log(jnp.where(out > 0, out, 1.0))
    total = jnp.sum(weight)
    fill = jnp.where(total > 0, jnp.exp(jnp.sum(weight * logs) / jnp.maximum(total, 1e-30)), 0.0)
    return out + jnp.where(prior, (1.0 - covered) * fill, 0.0).astype(nu.dtype)


def _inner_step(tx, value, grad, state):
    """One step of the inner optimiser: ``value + tx.update(grad)``."""
    update, state = tx.update(grad, state, value)
    return value + update.astype(value.dtype), state


def _masked_s(x: LowRank) -> jax.Array:
    """``S`` zero outside its active block. ``U S`` and ``V S^T`` need no masking of the
    ``(n, c)`` bases then: their inactive columns (finite, orthonormal) meet zero rows of ``S``."""
    m = x.mask
    return mask_block(x.S, m, m)


def _kl_steps(cfg: Config, x: LowRank, st: FactorState, g: LowRank):
    """K- and L-steps from one gradient: ``K1 = U0 S0 - h G V0``, ``L1 = V0 S0^T - h G^T U0``."""
    m = x.mask
    U0, S0, V0 = x.U, _masked_s(x), x.V
    K1, st_k = _inner_step(cfg.tx, U0 @ S0, mask_cols(g.U, m), st.K)
    L1, st_l = _inner_step(cfg.tx, V0 @ S0.T, mask_cols(g.V, m), st.L)
    return mask_cols(K1, m), mask_cols(L1, m), st._replace(K=st_k, L=st_l)


def _svd_truncate(cfg: Config, Sh, capacity: int, rank, augmented_rank=None):
    """``Sh = P diag(sigma) Qt``, the new rank ``r1`` and ``S1 = diag(sigma[:r1])`` (c x c).

    ``r1`` is ``rank`` at a fixed rank (``tau=None``); else the truncation rank of ``sigma`` where
    ``cfg.truncate`` holds and ``augmented_rank`` where it does not (nothing is cut), both clamped
    to ``[min_rank, max_rank]`` and the capacity.
    """
    P, sigma, Qt = svd(Sh)
    if cfg.tau is None:
        r1 = rank.astype(jnp.int32)
    else:
        # min/max_rank may be traced (optax.inject_hyperparams injects every numeric argument)
        upper = capacity if cfg.max_rank is None else jnp.minimum(cfg.max_rank, capacity)
        lower = jnp.minimum(cfg.min_rank, capacity)
        if cfg.truncate is not True:  # nothing cut on this step, or on some steps (traced)
            kept = jnp.clip(augmented_rank, lower, upper).astype(jnp.int32)
        if cfg.truncate is not False:
            cut = truncation_rank(
                sigma, cfg.tau, absolute=cfg.absolute, min_rank=lower, max_rank=upper
            )
        if cfg.truncate is True or cfg.truncate is False:
            r1 = cut if cfg.truncate else kept
        else:
            r1 = jnp.where(cfg.truncate, cut, kept)
    m1 = column_mask(capacity, r1)
    S1 = jnp.diag(jnp.where(m1, sigma[:capacity], 0.0)).astype(Sh.dtype)
    return P, S1, Qt, r1


def _finish(cfg: Config, x: LowRank, new: LowRank, st: FactorState, M, N) -> Result:
    """Transport the K- and L-states (which live in the old bases) into the new ones.

    ``M = U1^T U0`` and ``N = V1^T V0`` restricted to the active columns (rows: the new rank,
    columns: the old one).
    """
    st_k = transport(st.K, (x.shape[0], x.capacity), right=N, prior=cfg.prior)
    st_l = transport(st.L, (x.shape[1], x.capacity), right=M, prior=cfg.prior)
    return Result(new, FactorState(st_k, st_l, st.S))


# ---- basis-update & Galerkin (unconventional KLS), fixed rank ----------------------------------


def _bug_basis_update(cfg: Config, carry: Carry, g: LowRank) -> Carry:
    """K- and L-steps, new bases ``U1 = orth(K1)``, ``V1 = orth(L1)``, ``S~ = M S0 N^T``."""
    x = carry.x
    m = x.mask
    K1, L1, st = _kl_steps(cfg, x, carry.state, g)
    U1, V1 = qr_fast(K1, m)[0], qr_fast(L1, m)[0]
    # x.U, x.V unmasked: their inactive columns only reach entries that mask_block zeroes
    M = mask_block(U1.T @ x.U, m, m)
    N = mask_block(V1.T @ x.V, m, m)
    point = LowRank._unchecked(U1, (M @ _masked_s(x)) @ N.T, V1, x.rank)
    st = st._replace(S=transport(st.S, (x.capacity, x.capacity), left=M, right=N, prior=cfg.prior))
    return Carry(x, st, point, M, N, rows=m, cols=m)


def _bug_galerkin(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """Galerkin S-step ``S1 = S~ - h U1^T G1 V1`` at the new bases."""
    x, st, point = carry.x, carry.state, carry.point
    S1, st_s = _inner_step(cfg.tx, point.S, mask_block(g.S, carry.rows, carry.cols), st.S)
    new = LowRank._unchecked(point.U, mask_block(S1, carry.rows, carry.cols), point.V, x.rank)
    return _finish(cfg, x, new, st._replace(S=st_s), carry.M, carry.N)


BUG_FIXED = Integrator(
    "bug",
    (_bug_basis_update, _bug_galerkin),
    lambda cfg: False,
    (frozenset("UV"), frozenset("S")),
)


# ---- rank-adaptive basis-update & Galerkin -------------------------------------------------------


def _bug_augment(cfg: Config, carry: Carry, g: LowRank) -> Carry:
    """``U^ = orth([K1 | U0])``, ``V^ = orth([L1 | V0])``, ``S~ = (U^^T U0) S0 (V0^T V^)``."""
    x = carry.x
    c = x.capacity
    K1, L1, st = _kl_steps(cfg, x, carry.state, g)
    U0, S0, V0 = x.masked()
    m, m2 = x.mask, column_mask(2 * c, 2 * x.rank)
    Uh, in_u = orth_span(active_first_concat(K1, U0, x.rank))
    Vh, in_v = orth_span(active_first_concat(L1, V0, x.rank))
    UhU0, VhV0 = Uh.T @ U0, Vh.T @ V0
    M, N = mask_block(UhU0, m2, m), mask_block(VhV0, m2, m)
    point = LowRank._unchecked(Uh, (M @ S0) @ N.T, Vh, 2 * x.rank)
    st = st._replace(S=transport(st.S, (c, c), left=M, right=N, prior=cfg.prior))
    # only directions of span([K1 | U0]) x span([L1 | V0]) get the Galerkin update
    return Carry(x, st, point, UhU0, VhV0, rows=in_u & m2, cols=in_v & m2)


def _bug_galerkin_truncate(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """Galerkin S-step ``S^1 = S^0 - h U^^T G1 V^`` in the augmented bases, then truncation."""
    x, st, point = carry.x, carry.state, carry.point
    S1, st_s = _inner_step(cfg.tx, point.S, mask_block(g.S, carry.rows, carry.cols), st.S)
    S1 = mask_block(S1, carry.rows, carry.cols)
    # U1 = U^ P[:, :c], V1 = V^ Q[:, :c] with U^, V^ orthonormal: every map into the new basis
    # is a small product (U1^T U^ = P[:, :c]^T, U1^T U0 = P[:, :c]^T (U^T U0)), none of size n
    # a step that cuts nothing keeps the directions in the spans, at most 2r of them
    spanned = (
        None if cfg.truncate is True else jnp.minimum(jnp.sum(carry.rows), jnp.sum(carry.cols))
    )
    # tau None (a cycle's fixed-rank step): back to the rank before the augmentation
    P, S1, Qt, r1 = _svd_truncate(cfg, S1, x.capacity, x.rank, spanned)
    Pc, Qc = P[:, : x.capacity], Qt[: x.capacity, :].T
    new = LowRank._unchecked(point.U @ Pc, S1, point.V @ Qc, r1.astype(jnp.float32))
    rows = new.mask[:, None]
    left, right = jnp.where(rows, Pc.T, 0.0), jnp.where(rows, Qc.T, 0.0)
    st_s = transport(st_s, point.S.shape, left=left, right=right, prior=cfg.prior)
    M = mask_block(Pc.T @ carry.M, new.mask, x.mask)
    N = mask_block(Qc.T @ carry.N, new.mask, x.mask)
    return _finish(cfg, x, new, st._replace(S=st_s), M, N)


BUG = Integrator(
    "bug",
    (_bug_augment, _bug_galerkin_truncate),
    lambda cfg: True,
    (frozenset("UV"), frozenset("S")),
)


# ---- parallel rank-adaptive BUG (one gradient evaluation) --------------------------------------


def _parallel_step(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """All substeps from ``(U0, S0, V0)`` and one gradient, then augmentation and truncation.

    ``K1``, ``L1``, ``S_ = S0 - h U0^T G0 V0``; ``U~ = orth((I - U0 U0^T) K1)``,
    ``U^ = [U0 | U~]``, ``S^ = [[S_, L1^T V~], [U~^T K1, 0]]``, then truncation.

    Computed in the basis ``U^ = [U | Q]`` made of *all* ``c`` columns of ``U`` (active and
    inactive: they are orthonormal) and ``Q = orth((I - U U^T) K1)`` (:func:`orth_complement`:
    one ``n x c`` QR instead of the QR of ``[U0 | K1]``); likewise ``V^ = [V | P]``. Its
    leading ``c + r`` columns contain ``span([U0 | K1])``. With ``K1 = U0 S0 + dK`` and
    ``L1 = V0 S0^T + dL`` (``dK``, ``dL`` the inner optimiser's steps),
    ``S^ = U^^T Y V^`` for the matrix the block form represents,
    ``Y = U0 S_ V0^T + (I - U0 U0^T) K1 V0^T + U0 L1^T (I - V0 V0^T)``, is, block by block,
    ``[[S_ + U_in^T dK + (V_in^T dL)^T, dL^T P], [Q^T dK, 0]]`` (``U_in^T dK``: the inactive
    rows of ``U^T dK``, in the active columns). ``U^ S^ V^^T = Y`` exactly, so the truncation
    gives the same factor as the ``2r``-column block form; the projections use ``dK``, ``dL``
    rather than ``K1``, ``L1`` (same result in exact arithmetic, full relative accuracy for
    small steps), and the maps into the new basis are leading blocks of the SVD factors.
    ``U`` and ``V`` are re-orthonormalised (Cholesky-QR, folded into ``c x c`` factors) at the
    start of every step, so that roundoff in the bases cannot accumulate.
    """
    x, st = carry.x, carry.state
    c = x.capacity
    m = x.mask
    U0, S0, V0 = x.U, _masked_s(x), x.V
    # K1 = U0 S0 + dK, L1 = V0 S0^T + dL: the augmentation uses the steps dK, dL themselves,
    # (I - U U^T) K1 = (I - U U^T) dK, which keeps full relative accuracy however small they are
    dK, st_k = cfg.tx.update(mask_cols(g.U, m), st.K, U0 @ S0)
    dL, st_l = cfg.tx.update(mask_cols(g.V, m), st.L, V0 @ S0.T)
    S_, st_s = _inner_step(cfg.tx, S0, mask_block(g.S, m, m), st.S)
    S_ = mask_block(S_, m, m)

    # all c columns of U, V are orthonormal; Uc = Ub LUinv^T restores that to roundoff so that
    # it cannot drift (folded into the small factors, never formed)
    Ub, LUinv = orthonormal_basis(x.U)
    Vb, LVinv = orthonormal_basis(x.V)
    U_tilde = orth_complement(Ub, LUinv, dK.astype(x.dtype), m)  # U^ = [Uc | U~]
    V_tilde = orth_complement(Vb, LVinv, dL.astype(x.dtype), m)  # V^ = [Vc | V~]
    # S^ = [[S_, L1^T V~], [U~^T K1, 0]] in the basis of all c columns: U~^T K1 = U~^T dK and
    # L1^T V~ = (V~^T dL)^T (U~ is orthogonal to U0), and the top-left block also takes the
    # steps dK, dL into the inactive columns of U, V: S_ + U_in^T dK + (V_in^T dL)^T
    inactive = ~m
    Ut_K1, Vt_L1 = U_tilde.QD, V_tilde.QD
    S_top = S_ + mask_block(U_tilde.UcD, inactive, m) + mask_block(V_tilde.UcD, inactive, m).T
    S_hat = jnp.block([[S_top, Vt_L1.T], [Ut_K1, jnp.zeros_like(Ut_K1)]])
    m2 = column_mask(2 * c, c + x.rank)
    S_hat = mask_block(S_hat, m2, m2)
    Pu, S1, Pvt, r1 = _svd_truncate(cfg, S_hat, c, x.rank, 2 * x.rank)
    Pu, Pv = Pu[:, :c], Pvt[:c, :].T
    U1 = U_tilde.basis_times(Ub, LUinv, Pu)  # U^ Pu
    V1 = V_tilde.basis_times(Vb, LVinv, Pv)  # V^ Pv
    new = LowRank._unchecked(U1, S1, V1, r1.astype(jnp.float32))
    # M = U1^T U0 = Pu[:c, :c]^T (U^T U0) with U^T U0 = [diag(m); 0]; N likewise.
    m1 = column_mask(c, r1)
    M = mask_block(Pu[:c].T, m1, m)
    N = mask_block(Pv[:c].T, m1, m)
    st_s = transport(st_s, (c, c), left=M, right=N, prior=cfg.prior)
    return _finish(cfg, x, new, FactorState(st_k, st_l, st_s), M, N)


PARALLEL = Integrator("parallel_bug", (_parallel_step,), lambda cfg: True, (frozenset("USV"),))


# ---- projector-splitting KSL (Lie-Trotter) -------------------------------------------------------


def _ksl_k(cfg: Config, carry: Carry, g: LowRank) -> Carry:
    """K-step ``K1 = U0 S0 - h G(U0 S0 V0^T) V0``, ``(U1, S^) = qr(K1)``."""
    x, st = carry.x, carry.state
    m = x.mask
    U0, S0, V0 = x.U, _masked_s(x), x.V
    K1, st_k = _inner_step(cfg.tx, U0 @ S0, mask_cols(g.U, m), st.K)
    U1, R = qr_fast(mask_cols(K1, m), m)
    M = mask_block(U1.T @ U0, m, m)
    point = LowRank._unchecked(U1, mask_block(R, m, m), V0, x.rank)
    return Carry(x, st._replace(K=st_k), point, M=M)


def _ksl_s(cfg: Config, carry: Carry, g: LowRank) -> Carry:
    """Backward S-step ``S~ = S^ + h U1^T G(U1 S^ V0^T) V0``."""
    x, st, point = carry.x, carry.state, carry.point
    m = x.mask
    st_s = transport(st.S, point.S.shape, left=carry.M, prior=cfg.prior)
    update, st_s = cfg.tx.update(mask_block(g.S, m, m), st_s, point.S)
    St = mask_block(point.S - update.astype(point.S.dtype), m, m)
    point = LowRank._unchecked(point.U, St, point.V, x.rank)
    return carry._replace(state=st._replace(S=st_s), point=point)


def _ksl_l(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """L-step ``L1 = V0 S~^T - h G(U1 S~ V0^T)^T U1``, ``(V1, S1^T) = qr(L1)``."""
    x, st, point = carry.x, carry.state, carry.point
    m = x.mask
    st_l = transport(st.L, (x.shape[1], x.capacity), right=carry.M, prior=cfg.prior)
    L1, st_l = _inner_step(cfg.tx, point.V @ point.S.T, mask_cols(g.V, m), st_l)
    V1, R = qr_fast(mask_cols(L1, m), m)
    new = LowRank._unchecked(point.U, mask_block(R.T, m, m), V1, x.rank)
    N = mask_block(V1.T @ point.V, m, m)
    st_s = transport(st.S, point.S.shape, right=N, prior=cfg.prior)
    st_k = transport(st.K, (x.shape[0], x.capacity), right=N, prior=cfg.prior)
    return Result(new, FactorState(st_k, st_l, st_s))


KSL = Integrator(
    "projector_splitting",
    (_ksl_k, _ksl_s, _ksl_l),
    lambda cfg: False,
    (frozenset("U"), frozenset("S"), frozenset("V")),
)


# ---- S-only fine-tuning --------------------------------------------------------------------------


def _s_only_step(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """``S1 = S0 - h U0^T G V0`` with the bases frozen."""
    x, st = carry.x, carry.state
    m = x.mask
    S1, st_s = _inner_step(cfg.tx, x.masked()[1], mask_block(g.S, m, m), st.S)
    new = LowRank._unchecked(x.U, mask_block(S1, m, m), x.V, x.rank)
    return Result(new, st._replace(S=st_s))


S_ONLY = Integrator(
    "s_only", (_s_only_step,), lambda cfg: False, (frozenset("S"),), moves_bases=False
)


# ---- the coefficient step of the augment-train-truncate cycle ----------------------------------


def _coefficient_step(cfg: Config, carry: Carry, g: LowRank) -> Result:
    """``S1 = S0 - h U0^T G V0`` in the fixed (augmented) bases; where ``cfg.truncate``, then
    ``S1 = P diag(sigma) Q^T`` truncated by ``tau``: ``U1 = U0 P``, ``V1 = V0 Q``.

    The rotation by the ``c x c`` SVD factors keeps all ``c`` columns orthonormal; the inner
    optimiser states are transported by ``M = P^T``, ``N = Q^T`` (restricted to the new rank).
    """
    result = _s_only_step(cfg, carry, g)
    if cfg.truncate is False:
        return result
    x, S1, st = carry.x, result.factor.S, result.state
    m = x.mask
    P, Sd, Qt, r1 = _svd_truncate(cfg, S1, x.capacity, x.rank, x.rank)
    new = LowRank._unchecked(x.U @ P, Sd, x.V @ Qt.T, r1.astype(jnp.float32))
    M, N = mask_block(P.T, new.mask, m), mask_block(Qt, new.mask, m)
    st = st._replace(S=transport(st.S, (x.capacity, x.capacity), left=M, right=N, prior=cfg.prior))
    return _finish(cfg, x, new, st, M, N)


COEFFICIENTS = Integrator(
    "coefficients", (_coefficient_step,), lambda cfg: False, (frozenset("S"),)
)
