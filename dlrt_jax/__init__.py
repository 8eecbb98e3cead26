"""dlrt_jax: dynamical low-rank training (DLRT) for JAX.

Low-rank factors ``W = U S V^T`` (:class:`LowRank`), the robust DLRT integrators as optax
gradient transformations (:func:`bug`, :func:`parallel_bug`, :func:`projector_splitting`,
:func:`s_only`), their pure step functions, and capacity management outside ``jit``.
"""

from dlrt_jax._budget import RankBudgetState, budget_cost, factor_ranks, with_rank_budget
from dlrt_jax._capacity import CapacityPolicy, fit_capacity, resize_capacity
from dlrt_jax._factors import LowRank, default_capacity, is_lowrank, lowrank_apply, lowrank_map
from dlrt_jax._inner import isotropic_adam, reference_adam, scale_by_isotropic_adam
from dlrt_jax._step import make_train_step
from dlrt_jax._transforms import (
    DLRTState,
    bug,
    bug_step,
    check,
    kls,
    ksl,
    ksl_step,
    parallel_bug,
    parallel_bug_step,
    parallel_kls,
    projector_splitting,
    s_only,
)
from dlrt_jax._truncation import tail_norms, truncation_rank

__version__ = "0.1.0"

_SUBMODULES = (
    "adapters",
    "checkpoint",
    "data",
    "ensemble",
    "linen",
    "models",
    "nnx",
    "parallel",
    "precision",
    "transformer",
)


def __getattr__(name):  # lazy submodules: `dlrt_jax.nnx` without importing flax up front
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"dlrt_jax.{name}")
    raise AttributeError(f"module 'dlrt_jax' has no attribute {name!r}")


__all__ = [
    "CapacityPolicy",
    "DLRTState",
    "LowRank",
    "RankBudgetState",
    "budget_cost",
    "bug",
    "bug_step",
    "check",
    "default_capacity",
    "factor_ranks",
    "fit_capacity",
    "is_lowrank",
    "isotropic_adam",
    "kls",
    "ksl",
    "ksl_step",
    "lowrank_apply",
    "lowrank_map",
    "make_train_step",
    "parallel_bug",
    "parallel_bug_step",
    "parallel_kls",
    "projector_splitting",
    "reference_adam",
    "resize_capacity",
    "s_only",
    "scale_by_isotropic_adam",
    "tail_norms",
    "truncation_rank",
    "with_rank_budget",
]
