"""Flax NNX adapter: low-rank layers, a model converter and the training glue.

* :class:`LowRankParam`: the ``nnx.Param`` subtype that holds a whole :class:`~dlrt_jax.LowRank`
  factor, so ``nnx.state(model, LowRankParam)`` / ``wrt=LowRankParam`` select the factors and the
  DLRT optax transforms see ``LowRank`` leaves in the state tree.
* :class:`LowRankLinear` and :class:`LowRankConv`: drop-in replacements of ``nnx.Linear`` and
  ``nnx.Conv`` (the maths is in the framework-neutral ``dlrt_jax._layers``; ``W`` is never formed).
* :func:`to_low_rank`: replace chosen layers of an existing model, with a per-layer summary
  (frozen weights and adapters are never touched); :func:`register_converter` adds layer types;
  :func:`to_dense` turns the low-rank layers back into ``nnx.Linear`` / ``nnx.Conv``.
* :func:`save_checkpoint` / :func:`restore_checkpoint`: a model and its optimiser, restored into
  a freshly built pair at the saved capacities; :func:`export_low_rank` / :func:`load_low_rank`:
  ``U``, ``S``, ``V`` at the active rank in safetensors, with a JSON of ranks and shapes.
* :class:`DLRTOptimizer`, :func:`make_grad_fn`, :func:`train_step`, :func:`fit_capacity`,
  :func:`apply_capacity_policy`: the glue between ``nnx.Optimizer`` and the integrators, which
  evaluate the gradient more than once per step or change the capacities. A plain
  ``nnx.Optimizer(model, dlrt_jax.bug(...), wrt=nnx.Param)`` holds the DLRT state;
  ``DLRTOptimizer`` stays for compatibility (and for plain optax transforms on factors).

Cost of a step: a jitted step costs in proportion to each factor's static *capacity*, not its rank.
The layers default to the capacity ``floor(min(n, m) / 2)`` so that the rank can start high; once
the rank has dropped, call :func:`apply_capacity_policy` with a :class:`dlrt_jax.CapacityPolicy`
after every step or :func:`fit_capacity` every epoch: the step then costs what the functional
path's step costs at the same capacities (``benchmarks/nnx_vs_functional.py``), and ``nnx.jit``
compiles once per set of capacities visited.
"""

from __future__ import annotations

from dlrt_jax import transformer as _transformer  # noqa: F401  (registers its converters)
from dlrt_jax._nnx.conversion import (
    ConversionRequest,
    ConversionSummary,
    LayerConversion,
    layer_predicate,
    register_converter,
    to_dense,
    to_low_rank,
)
from dlrt_jax._nnx.io import export_low_rank, load_low_rank, restore_checkpoint, save_checkpoint
from dlrt_jax._nnx.layers import (
    ConvertedLayer,
    LowRankConv,
    LowRankLayer,
    LowRankLinear,
    LowRankParam,
)
from dlrt_jax._nnx.train import (
    DLRTOptimizer,
    apply_capacity_policy,
    fit_capacity,
    make_grad_fn,
    train_step,
)

__all__ = [
    "ConversionRequest",
    "ConversionSummary",
    "ConvertedLayer",
    "DLRTOptimizer",
    "LayerConversion",
    "LowRankConv",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankParam",
    "apply_capacity_policy",
    "export_low_rank",
    "fit_capacity",
    "layer_predicate",
    "load_low_rank",
    "make_grad_fn",
    "register_converter",
    "restore_checkpoint",
    "save_checkpoint",
    "to_dense",
    "to_low_rank",
    "train_step",
]
