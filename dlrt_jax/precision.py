"""Mixed precision: layers applied in bfloat16, factors and basis arithmetic kept in float32.

The factors ``U``, ``S``, ``V``, the optimiser state and the gradients the integrators see stay
float32, and the integrators' basis arithmetic (QR, SVD, basis changes) always runs in float32 at
``precision=HIGHEST``. Only the application of a layer to activations, ``x -> x V S^T U^T``, and
its backward products ``G V``, ``U^T G V``, ``G^T U`` run in ``compute_dtype``: :func:`mixed_apply`
casts the input and a *copy* of the factors, and the transpose of that cast returns the gradients
in float32. Compute the loss in float32 (:meth:`PrecisionPolicy.logits`). The same in three
lines of plain JAX, and why it is safe, in ``docs/recipes.md``.

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


def _floating(dtype: Any, name: str) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"`{name}` must be a floating dtype (bfloat16, float32, ...), got {dtype}.")
    return dt


def _cast(tree: Any, dt: jnp.dtype) -> Any:
    def one(x):
        if isinstance(x, LowRank):  # the rank stays a float32 whole number
            return LowRank.tree_unflatten(None, (*(a.astype(dt) for a in (x.U, x.S, x.V)), x.rank))
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dt)
        return x

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, LowRank))


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
    return _cast(tree, _floating(dtype, "dtype"))


def mixed_apply(
    lr: LowRank, x: jax.Array, *, compute_dtype: Any = jnp.bfloat16, output_dtype: Any = None
) -> jax.Array:
    r"""``x W^T = ((x V) S^T) U^T`` computed in ``compute_dtype``; the factors stay float32.

    :func:`dlrt_jax.lowrank_apply` on a ``compute_dtype`` copy of ``x`` and of the factors: the
    projected gradients are formed in ``compute_dtype`` and come back in the factors' dtype. The
    result has ``output_dtype`` (default: ``compute_dtype``).
    """
    if not isinstance(lr, LowRank):
        raise TypeError(f"`lr` must be a LowRank, got {type(lr).__name__}.")
    cd = _floating(compute_dtype, "compute_dtype")
    od = cd if output_dtype is None else _floating(output_dtype, "output_dtype")
    return lowrank_apply(_cast(lr, cd), jnp.asarray(x).astype(cd)).astype(od)


def mixed_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    compute_dtype: Any = jnp.bfloat16,
    output_dtype: Any = None,
) -> jax.Array:
    """``x kernel^T + bias`` for a dense ``(out, in)`` kernel (a ``LowRank``'s layout), computed
    in ``compute_dtype``; the parameters and their gradients keep their storage dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> from dlrt_jax.precision import mixed_dense
        >>> mixed_dense(jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.zeros(4),
        ...             output_dtype=jnp.float32).tolist()
        [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
    """
    cd = _floating(compute_dtype, "compute_dtype")
    od = cd if output_dtype is None else _floating(output_dtype, "output_dtype")
    if jnp.ndim(kernel) != 2 or jnp.shape(x)[-1] != jnp.shape(kernel)[1]:
        raise ValueError(
            f"`kernel` must be (out, in) with in = x.shape[-1] = {jnp.shape(x)[-1]}, got "
            f"{jnp.shape(kernel)}."
        )
    y = jnp.asarray(x).astype(cd) @ jnp.asarray(kernel).astype(cd).T
    return (y if bias is None else y + jnp.asarray(bias).astype(cd)).astype(od)


class PrecisionPolicy(NamedTuple):
    """Which dtype layers compute in; storage and basis arithmetic stay float32.

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
        return jnp.asarray(x).astype(_floating(self.compute_dtype, "compute_dtype"))

    def apply(self, lr: LowRank, x: jax.Array) -> jax.Array:
        """:func:`mixed_apply` in the compute dtype (result in the compute dtype)."""
        return mixed_apply(lr, x, compute_dtype=self.compute_dtype)

    def dense(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """:func:`mixed_dense` in the compute dtype."""
        return mixed_dense(x, kernel, bias, compute_dtype=self.compute_dtype)

    def logits(self, y: jax.Array) -> jax.Array:
        """Cast the network output to ``output_dtype`` before the loss."""
        return jnp.asarray(y).astype(_floating(self.output_dtype, "output_dtype"))
