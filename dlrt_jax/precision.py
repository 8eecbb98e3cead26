"""Mixed precision for DLRT: bfloat16 layer application, float32 factors and basis arithmetic.

The policy:

* **Stored in float32**: the factors ``U``, ``S``, ``V`` (and every other parameter), the
  optimiser state, the gradients handed to the integrator.
* **Computed in float32 at full precision, always**: all basis arithmetic of the integrators
  (QR, SVD, the basis-change matrices ``M = U1^T U0``, ``N = V1^T V0``, projections, truncation
  products). The core runs these with ``precision=HIGHEST`` on every backend (on GPUs the default
  float32 matmul is TF32, which leaves ``Q^T Q - I`` near ``1e-3``); nothing here changes that.
* **Computed in ``compute_dtype`` (e.g. bfloat16) where the user asks**: the application of a
  layer to activations, ``x -> x V S^T U^T``, and the backward products that give the projected
  gradients ``G V``, ``U^T G V``, ``G^T U``. :func:`mixed_apply` casts the input and a copy of the
  factors to ``compute_dtype``; the cast's transpose returns the gradients to float32 before the
  integrator sees them, so the factors never pass through bfloat16 storage.

Compute the loss (softmax, reductions) in float32: cast the logits back
(``output_dtype=jnp.float32`` on the last layer, or ``logits.astype(jnp.float32)``).

Examples:
    >>> import jax, jax.numpy as jnp
    >>> import dlrt_jax
    >>> from dlrt_jax.precision import mixed_apply
    >>> w = dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)
    >>> y = mixed_apply(w, jnp.ones((4, 6)))
    >>> y.dtype
    dtype(bfloat16)
    >>> g = jax.grad(lambda w: mixed_apply(w, jnp.ones((4, 6))).astype(jnp.float32).sum())(w)
    >>> g.U.dtype, g.S.dtype, g.V.dtype  # gradients for the integrator: float32
    (dtype('float32'), dtype('float32'), dtype('float32'))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dlrt_jax._factors import LowRank, lowrank_apply

__all__ = ["PrecisionPolicy", "cast_floating", "mixed_apply", "mixed_dense"]


def _check_dtype(dtype: Any, name: str):
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"`{name}` must be a floating dtype, got {dtype!r}.") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating dtype (bfloat16, float16, float32), got {dt}."
        )
    return dt


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point array leaf of ``tree`` to ``dtype`` (others unchanged).

    ``LowRank.rank`` keeps float32 (it holds a whole number that must stay exact).

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax.precision import cast_floating
        >>> out = cast_floating({"x": jnp.ones(2), "i": jnp.arange(2)}, jnp.bfloat16)
        >>> out["x"].dtype, out["i"].dtype
        (dtype(bfloat16), dtype('int32'))
    """
    dt = _check_dtype(dtype, "dtype")

    def one(x):
        if isinstance(x, LowRank):
            return LowRank(x.U.astype(dt), x.S.astype(dt), x.V.astype(dt), x.rank)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dt)
        return x

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, LowRank))


def mixed_apply(
    lr: LowRank, x: jax.Array, *, compute_dtype: Any = jnp.bfloat16, output_dtype: Any = None
) -> jax.Array:
    r"""``x W^T = ((x V) S^T) U^T`` computed in ``compute_dtype``; the factors stay float32.

    The input and a copy of ``U``, ``S``, ``V`` are cast to ``compute_dtype`` and applied with
    :func:`dlrt_jax.lowrank_apply`, whose custom VJP then forms the projected gradients
    (``G V``, ``U^T G V``, ``G^T U``) in ``compute_dtype``; the transpose of the cast returns them
    in the factors' dtype. The result has ``output_dtype`` (default: ``compute_dtype``).

    Args:
        lr: the factor (float32 storage).
        x: input, last axis of size ``m``.
        compute_dtype: dtype of the layer's matmuls (bfloat16 by default).
        output_dtype: dtype of the result; ``None`` keeps ``compute_dtype``.
    """
    if not isinstance(lr, LowRank):
        raise TypeError(f"`lr` must be a LowRank, got {type(lr).__name__}.")
    cd = _check_dtype(compute_dtype, "compute_dtype")
    od = cd if output_dtype is None else _check_dtype(output_dtype, "output_dtype")
    low = cast_floating(lr, cd)
    return lowrank_apply(low, jnp.asarray(x).astype(cd)).astype(od)


def mixed_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    compute_dtype: Any = jnp.bfloat16,
    output_dtype: Any = None,
) -> jax.Array:
    """``x kernel^T + bias`` for a dense ``(out, in)`` kernel, computed in ``compute_dtype``.

    The same layout as a ``LowRank`` (``W`` is out x in); parameters stay in their storage dtype
    and their gradients come back in it.

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax.precision import mixed_dense
        >>> mixed_dense(jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.zeros(4),
        ...             output_dtype=jnp.float32).tolist()
        [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
    """
    cd = _check_dtype(compute_dtype, "compute_dtype")
    od = cd if output_dtype is None else _check_dtype(output_dtype, "output_dtype")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2 or jnp.shape(x)[-1] != kernel.shape[1]:
        raise ValueError(
            f"`kernel` must be (out, in) with in = x.shape[-1] = {jnp.shape(x)[-1]}, got "
            f"{kernel.shape}."
        )
    y = jnp.asarray(x).astype(cd) @ kernel.astype(cd).T
    if bias is not None:
        y = y + jnp.asarray(bias).astype(cd)
    return y.astype(od)


class PrecisionPolicy(NamedTuple):
    """Which dtype layers compute in; storage and basis arithmetic stay float32 (see module doc).

    Attributes:
        compute_dtype: dtype of the layer matmuls and activations (``jnp.float32`` turns mixed
            precision off).
        output_dtype: dtype that :meth:`logits` casts to for the loss (float32).

    Examples:
        >>> import jax, jax.numpy as jnp, dlrt_jax
        >>> from dlrt_jax.precision import PrecisionPolicy
        >>> policy = PrecisionPolicy(jnp.bfloat16)
        >>> w = dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)
        >>> h = policy.apply(w, policy.cast(jnp.ones((4, 6))))
        >>> h.dtype, policy.logits(h).dtype
        (dtype(bfloat16), dtype('float32'))
    """

    compute_dtype: Any = jnp.bfloat16
    output_dtype: Any = jnp.float32

    def cast(self, x: jax.Array) -> jax.Array:
        """Cast an activation (or input batch) to the compute dtype."""
        return jnp.asarray(x).astype(_check_dtype(self.compute_dtype, "compute_dtype"))

    def apply(self, lr: LowRank, x: jax.Array) -> jax.Array:
        """:func:`mixed_apply` in the compute dtype (result in the compute dtype)."""
        return mixed_apply(lr, x, compute_dtype=self.compute_dtype)

    def dense(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """:func:`mixed_dense` in the compute dtype."""
        return mixed_dense(x, kernel, bias, compute_dtype=self.compute_dtype)

    def logits(self, y: jax.Array) -> jax.Array:
        """Cast the network output to ``output_dtype`` before the loss."""
        return jnp.asarray(y).astype(_check_dtype(self.output_dtype, "output_dtype"))
