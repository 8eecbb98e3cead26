"""A global rank budget across factors: keep the largest singular values of all layers together."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrt_jax._factors import LowRank, is_lowrank
from dlrt_jax._linalg import full_precision

__all__ = ["RankBudgetState", "budget_cost", "factor_ranks", "with_rank_budget"]


class RankBudgetState(NamedTuple):
    """State of :func:`with_rank_budget`: the wrapped transform's state, untouched."""

    inner: Any


def _factors(tree: Any) -> list[LowRank]:
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lowrank) if is_lowrank(x)]


def budget_cost(params: Any) -> int:
    """The parameter count :func:`with_rank_budget` charges: ``sum_l r_l (n_l + m_l)``.

    ``r_l (n_l + m_l)`` is what factor ``l`` of rank ``r_l`` costs as a LoRA pair (``B``:
    ``n x r``, ``A``: ``r x m``); the ``r x r`` core ``S`` is left out (``r << n + m``). Reads the
    ranks, so call it outside ``jit``.

    Examples:
        >>> import jax
        >>> from dlrt_jax import LowRank
        >>> from dlrt_jax.adapters import budget_cost
        >>> p = {"a": LowRank.random(jax.random.key(0), (8, 6), rank=2),
        ...      "b": LowRank.random(jax.random.key(1), (4, 4), rank=1)}
        >>> budget_cost(p)  # 2 * (8 + 6) + 1 * (4 + 4)
        36
    """
    return int(sum(int(x.active_rank) * (x.shape[0] + x.shape[1]) for x in _factors(params)))


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def factor_ranks(params: Any) -> dict[str, int]:
    """``{path: rank}`` of every ``LowRank`` in a pytree (path parts joined by ``/``).

    The per-layer report of a global budget (or of any rank-adaptive run); for an NNX model pass
    ``nnx.as_pure(nnx.state(model, nnx.Param))``. Reads the ranks, so call it outside ``jit``.

    Examples:
        >>> import jax
        >>> from dlrt_jax import LowRank, factor_ranks
        >>> factor_ranks({"fc1": {"kernel": LowRank.random(jax.random.key(0), (8, 6), rank=2)}})
        {'fc1/kernel': 2}
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
    return {
        "/".join(_key_name(k) for k in path): int(x.active_rank)
        for path, x in flat
        if is_lowrank(x)
    }


def _diagonalise(x: LowRank) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U', sigma, V')`` with ``U S V^T = U' diag(sigma) V'^T`` over the active block.

    After a rank-adaptive step ``S`` is already ``diag(sigma)`` with ``sigma`` sorted (the SVD
    truncation leaves it so): then ``U`` and ``V`` are returned unchanged (no basis change, so the
    inner optimiser's moments stay valid). Otherwise (fixed-rank integrators) ``S = P diag(sigma)
    Q^T`` by SVD and the bases are rotated, ``U P``, ``V Q``.
    """
    U, S, V = x.masked()
    d = jnp.diagonal(S)
    off = S - jnp.diag(d)
    scale = jnp.max(jnp.abs(S))
    tol = 1e-6 * jnp.where(scale > 0, scale, 1.0)
    is_sorted_diag = (
        (jnp.max(jnp.abs(off)) <= tol) & jnp.all(d >= 0) & jnp.all(d[:-1] >= d[1:] - tol)
    )

    def rotate(_):  # basis arithmetic at full precision, like the integrators' (TF32 on GPUs)
        P, sigma, Qt = jnp.linalg.svd(S)
        with full_precision():
            return x.U @ P.astype(x.dtype), sigma.astype(x.dtype), x.V @ Qt.T.astype(x.dtype)

    def keep(_):
        return x.U, d, x.V

    return jax.lax.cond(is_sorted_diag, keep, rotate, None)


def _select(sigmas, costs, ranks, min_ranks, budget):
    """Per-factor ranks: the largest ``sigma`` of all factors, cumulative cost ``<= budget``.

    Every factor keeps its first ``min_ranks`` values first (their cost counted first). Static
    shapes: the candidate vectors are concatenated (length ``sum c_l``), sorted, accumulated and
    masked.
    """
    caps = [s.shape[0] for s in sigmas]
    vals = jnp.concatenate([s.astype(jnp.float32) for s in sigmas])
    owner = np.concatenate([np.full(c, i) for i, c in enumerate(caps)])
    pos = np.concatenate([np.arange(c) for c in caps])
    cost = jnp.asarray(np.concatenate([np.full(c, k) for c, k in zip(caps, costs)]), jnp.int32)
    rank = jnp.stack(ranks)[owner]
    active = jnp.asarray(pos) < rank
    forced = active & (jnp.asarray(pos) < jnp.asarray(min_ranks)[owner])
    priority = jnp.where(forced, jnp.inf, jnp.where(active, vals, -jnp.inf))
    order = jnp.argsort(-priority, stable=True)
    cum = jnp.cumsum(jnp.where(active, cost, 0)[order])  # int32: exact up to 2^31 parameters
    keep_sorted = (active[order] & (cum <= budget)) | forced[order]
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    counts = jax.ops.segment_sum(keep.astype(jnp.int32), jnp.asarray(owner), len(caps))
    return [counts[i] for i in range(len(caps))]


def with_rank_budget(
    tx: optax.GradientTransformation, budget: int, *, min_rank: int = 1
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap a DLRT transform so that all factors together stay within a parameter budget.

    After each step of ``tx`` (a rank-adaptive DLRT transform, typically
    ``dlrt_jax.parallel_bug(opt, tau=...)``), the singular values of *all* factors are pooled
    and the largest are kept while the cumulative cost ``sum_l r_l (n_l + m_l)`` stays within
    ``budget`` (:func:`budget_cost`: what the kept ranks cost as LoRA pairs ``A``, ``B``); each
    factor keeps at least ``min_rank`` values. So ranks move to the layers whose updates have the
    larger singular values: a global allocation instead of the per-layer tolerance ``tau``. Both
    apply: ``tau`` first (in ``tx``), the budget then cuts further. Use a small ``tau`` (or
    ``tau=0.0``, keeping everything up to the capacity) to let the budget alone decide.
    :func:`factor_ranks` reports the ranks per layer.

    The comparison across layers is only as meaningful as the singular values the inner optimiser
    produces: plain or momentum SGD keeps them proportional to the gradients, while Adam (per
    entry) and :func:`dlrt_jax.isotropic_adam` (per factor) normalise the steps, so a direction
    with a tiny gradient grows about as fast as a large one and the allocation is noisier
    (``tests/test_adapters.py`` has a two-layer case that SGD allocates 4 / 1 and Adam 3 / 2).

    The wrapper *is* the DLRT transform as far as a chain is concerned: it returns deltas
    (new - old) that ``optax.apply_updates`` turns into the budgeted factors, so put it last in an
    ``optax.chain`` as ``tx`` itself; ``grad_fn`` and other extra arguments are passed to ``tx``.
    Jittable with fixed shapes: the candidate values of all factors (one per column of capacity)
    are concatenated, sorted by value, their costs accumulated and a mask cuts at the budget; the
    ranks are traced, nothing recompiles when they change.

    After a rank-adaptive step ``S`` is ``diag(sigma)`` with ``sigma`` sorted (the truncation's
    SVD), so cutting a factor to ``r`` zeroes the tail of ``S`` and changes no basis. If ``S`` is
    not diagonal (``tx`` is ``bug`` with ``tau=None``, ``projector_splitting`` or ``s_only``),
    the factor is first re-diagonalised, ``U P``, ``diag(sigma)``, ``V Q`` from the SVD of ``S``;
    the inner optimiser's ``K``/``L`` moments are then not rotated with it, and these integrators
    cannot raise a rank again anyway: use a rank-adaptive one.

    Args:
        tx: the DLRT transform (``bug``/``parallel_bug`` with ``tau``).
        budget: the total parameter budget, ``sum_l r_l (n_l + m_l)``, of all ``LowRank``
            factors in the params (for adapters: the trainable parameters of the exported LoRA).
        min_rank: the rank every factor keeps whatever the budget (default 1, the least a
            ``LowRank`` has). Give ``tx`` the same ``min_rank`` (``parallel_bug``'s default is
            2), or its truncation raises ranks the budget then cuts again every step.

    Returns:
        An ``optax.GradientTransformationExtraArgs``. ``init`` raises ``ValueError`` when
        ``budget`` cannot pay for ``min_rank`` in every factor.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import dlrt_jax
        >>> from dlrt_jax.adapters import budget_cost, with_rank_budget
        >>> key1, key2 = jax.random.split(jax.random.key(0))
        >>> params = {"a": dlrt_jax.LowRank.random(key1, (16, 16), rank=4),
        ...           "b": dlrt_jax.LowRank.random(key2, (16, 16), rank=4,
        ...                                         singular_values=jnp.full(4, 0.01))}
        >>> tx = with_rank_budget(dlrt_jax.parallel_bug(1e-3, tau=0.0), budget=6 * 32)
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.zeros_like, params)
        >>> updates, state = jax.jit(tx.update)(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> int(params["a"].active_rank), int(params["b"].active_rank), budget_cost(params)
        (4, 2, 192)

    References:
        Schotthöfer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric integration for
        parameter efficient fine-tuning", ICLR 2025 (arXiv 2410.18720).
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"`tx` must be a DLRT optax transform (e.g. dlrt_jax.parallel_bug(...)), got "
            f"{type(tx).__name__}."
        )
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise ValueError(f"`budget` must be a positive integer (parameters), got {budget!r}.")
    if budget >= 2**31:
        raise ValueError(f"`budget` must be below 2**31 parameters, got {budget}.")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int | np.integer) or min_rank < 1:
        raise ValueError(f"`min_rank` must be an integer >= 1, got {min_rank!r}.")
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        factors = _factors(params)
        if not factors:
            raise ValueError("with_rank_budget: params contain no LowRank factor.")
        need = sum(min(min_rank, x.capacity) * (x.shape[0] + x.shape[1]) for x in factors)
        if need > budget:
            raise ValueError(
                f"with_rank_budget: `budget`={budget} cannot pay for min_rank={min_rank} in "
                f"every factor ({need} parameters); raise the budget or lower `min_rank`."
            )
        return RankBudgetState(inner=tx.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("with_rank_budget.update needs `params` (the current factors).")
        inner_updates, inner_state = tx.update(updates, state.inner, params, **extra_args)
        stepped = optax.apply_updates(params, inner_updates)
        leaves, treedef = jax.tree_util.tree_flatten(stepped, is_leaf=is_lowrank)
        old = treedef.flatten_up_to(params)
        upd = treedef.flatten_up_to(inner_updates)
        idx = [i for i, leaf in enumerate(leaves) if is_lowrank(leaf)]
        diag = [_diagonalise(leaves[i]) for i in idx]
        ranks = [leaves[i].active_rank for i in idx]
        costs = [leaves[i].shape[0] + leaves[i].shape[1] for i in idx]
        mins = [min(min_rank, leaves[i].capacity) for i in idx]
        new_ranks = _select([d[1] for d in diag], costs, ranks, mins, int(budget))
        for i, (U, sigma, V), r in zip(idx, diag, new_ranks, strict=True):
            r = jnp.minimum(r, leaves[i].active_rank)
            keep = jnp.arange(sigma.shape[0]) < r
            S = jnp.diag(jnp.where(keep, sigma, 0.0)).astype(leaves[i].dtype)
            new = LowRank._unchecked(U, S, V, r.astype(jnp.float32))
            upd[i] = jax.tree_util.tree_map(lambda a, b: a - b, new, old[i])
        return treedef.unflatten(upd), RankBudgetState(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
