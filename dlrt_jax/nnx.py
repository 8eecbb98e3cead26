"""Flax NNX layers for dynamical low-rank training, a model converter and the training glue.

* :class:`LowRankParam`: the ``nnx.Param`` subtype that holds a whole :class:`~dlrt_jax.LowRank`
  factor, so ``nnx.state(model, LowRankParam)`` / ``wrt=LowRankParam`` select the factors and the
  DLRT optax transforms see ``LowRank`` leaves in the state tree.
* :class:`LowRankLinear` and :class:`LowRankConv`: drop-in replacements of ``nnx.Linear`` and
  ``nnx.Conv`` evaluated through :func:`~dlrt_jax.lowrank_apply` / :func:`~dlrt_jax.lowrank_map`
  (``W`` is never formed).
* :func:`to_low_rank`: replace chosen ``nnx.Linear`` / ``nnx.Conv`` layers of an existing model.
* :class:`DLRTOptimizer` (``nnx.Optimizer`` for the DLRT transforms), :func:`make_grad_fn`,
  :func:`train_step`, :func:`fit_capacity`, :func:`apply_capacity_policy`: the glue between the
  optimiser and the integrators that evaluate the gradient more than once per step or change the
  capacities.

Cost of a step: a jitted step costs in proportion to each factor's static *capacity*, not its rank.
:func:`to_low_rank` and the layers default to the capacity ``floor(min(n, m) / 2)`` (250 for a
500 x 500 layer) so that the rank can start high; once the rank has dropped (say to 55), call
:func:`apply_capacity_policy` with a :class:`dlrt_jax.CapacityPolicy` after every step (it reads the
ranks only every ``policy.every`` steps) or :func:`fit_capacity` every epoch, as the functional
training loop does: the step then costs what the functional path's step costs at the same
capacities (``benchmarks/nnx_vs_functional.py``), and ``nnx.jit`` compiles once per set of
capacities visited.

How ``nnx.Optimizer`` and the integrators fit together (flax 0.12): ``Optimizer.update(model,
grads, **kw)`` calls ``tx.update(grads, opt_state, params, **kw)`` with ``params =
nnx.as_pure(nnx.state(model, wrt))``, a ``State`` whose leaves are raw arrays and whole ``LowRank``
factors; the integrators call ``grad_fn`` on trees of exactly that structure (the intermediate
points of a step), so ``grad_fn`` must merge such a state back into a model, evaluate the loss and
return gradients of the same structure: :func:`make_grad_fn` builds it. ``nnx.Optimizer`` itself
cannot hold a DLRT state, because it calls ``tx.init`` on the state *with* ``Variable`` wrappers:
each factor's optimiser state (a ``FactorState`` of inner optax states) then sits inside one
``OptVariable``, and the first ``update`` (``nnx.update(opt_state, nnx.state(new_opt_state))``)
turns it into a nested ``State`` dict, which breaks the second step. :class:`DLRTOptimizer` is
``nnx.Optimizer`` with ``tx.init`` applied to the pure state; everything else is inherited.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dlrt_jax._capacity import fit_capacity as _fit_capacity
from dlrt_jax._factors import LowRank, default_capacity, lowrank_apply, lowrank_map

__all__ = [
    "ConversionSummary",
    "DLRTOptimizer",
    "LayerConversion",
    "LowRankConv",
    "LowRankLinear",
    "LowRankParam",
    "apply_capacity_policy",
    "fit_capacity",
    "make_grad_fn",
    "to_low_rank",
    "train_step",
]


# ---- the Variable type ---------------------------------------------------------------------------


class LowRankParam(nnx.Param):
    """An ``nnx.Param`` whose value is a whole :class:`~dlrt_jax.LowRank` factor.

    The factor stays one value, so ``nnx.state`` / ``nnx.split`` give ``LowRank`` leaves (inside a
    ``LowRankParam``; ``nnx.as_pure`` strips the wrapper), ``jax.grad`` over such a state gives
    ``LowRank`` cotangents in the DLRT slots (``grad.U = G V``, ``grad.S = U^T G V``,
    ``grad.V = G^T U``), and ``DLRTOptimizer(model, dlrt_jax.bug(...), wrt=nnx.Param)`` hands the
    factors to the integrator whole. Being a subtype of ``nnx.Param``, a factor is trained by
    ``wrt=nnx.Param``; ``wrt=LowRankParam`` selects the factors only (as ``nnx.LoRAParam`` does for
    LoRA weights). Attribute access is forwarded to the factor (``param.U``, ``param.capacity``).
    ``param[...]`` (flax's recommended access, now that ``.value`` is deprecated) returns the
    factor, as ``param.get_value()`` does, and ``param[...] = factor`` replaces it with another
    ``LowRank``; other indices are refused (index the factor's arrays instead, e.g.
    ``param[...].U[:, :2]``).

    Only the default variable mode is supported (no ``ref=True`` / ``hijax=True``
    ``nnx.var_defaults``).

    Examples:
        >>> import jax
        >>> from flax import nnx
        >>> from dlrt_jax import LowRank
        >>> from dlrt_jax.nnx import LowRankLinear, LowRankParam
        >>> layer = LowRankLinear(8, 6, rank=2, rngs=nnx.Rngs(0))
        >>> isinstance(layer.kernel, LowRankParam), layer.kernel.capacity
        (True, 3)
        >>> factors = nnx.as_pure(nnx.state(layer, LowRankParam))  # the bias is left out
        >>> list(factors.keys()), factors["kernel"]
        (['kernel'], LowRank(shape=(6, 8), capacity=3, rank=2, dtype=float32))
        >>> layer.kernel[...]
        LowRank(shape=(6, 8), capacity=3, rank=2, dtype=float32)
        >>> layer.kernel[...] = layer.kernel[...].replace(rank=1)
        >>> int(layer.rank)
        1
    """

    def __init__(self, value: Any, **metadata: Any):
        if not isinstance(value, LowRank):
            raise TypeError(
                f"LowRankParam holds a dlrt_jax.LowRank factor, got {type(value).__name__}; use "
                "nnx.Param for plain arrays."
            )
        super().__init__(value, **metadata)

    def __getitem__(self, key: Any) -> LowRank:
        """``param[...]``: the whole factor (the only index a ``LowRank`` value takes)."""
        _check_whole_index(key)
        return self.get_value()

    def __setitem__(self, key: Any, value: Any) -> None:
        """``param[...] = factor``: replace the whole factor by another ``LowRank``."""
        _check_whole_index(key)
        if not isinstance(value, LowRank):
            raise TypeError(
                f"LowRankParam holds a dlrt_jax.LowRank factor; `param[...] = value` needs a "
                f"LowRank, got {type(value).__name__}."
            )
        self.set_value(value)


def _check_whole_index(key: Any) -> None:
    if key is not Ellipsis:
        raise TypeError(
            f"A LowRankParam holds a whole LowRank factor and takes only the index `...`, got "
            f"{key!r}; index the factor's arrays instead, e.g. `param[...].U[:, :2]`."
        )


# ---- shared helpers (also used by dlrt_jax.linen) ------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _resolve_rank_capacity(
    rank: int | None, capacity: int | None, shape: tuple[int, int], where: str
) -> tuple[int, int]:
    """``(rank, capacity)`` of an ``n x m`` factor; see :class:`LowRankLinear` for the rules."""
    n, m = shape
    limit = min(n, m)
    if rank is not None and not (_is_int(rank) and 1 <= rank <= limit):
        raise ValueError(
            f"{where}: `rank` must be None or an integer in [1, min(n, m)={limit}] for the "
            f"{n} x {m} matrix W, got {rank!r}."
        )
    if capacity is not None and not (_is_int(capacity) and 1 <= capacity <= limit):
        raise ValueError(
            f"{where}: `capacity` must be None or an integer in [1, min(n, m)={limit}] for the "
            f"{n} x {m} matrix W, got {capacity!r}."
        )
    if capacity is None:
        capacity = max(default_capacity(shape), rank or 0)
    if rank is None:
        rank = capacity
    if rank > capacity:
        raise ValueError(
            f"{where}: `rank`={rank} exceeds `capacity`={capacity}; pass a larger `capacity=` or "
            "a smaller `rank=`."
        )
    return int(rank), int(capacity)


def _check_kernel_init(kernel_init: Any) -> None:
    if kernel_init is None or callable(kernel_init):
        return
    if isinstance(kernel_init, numbers.Real) and not isinstance(kernel_init, bool):
        if not float(kernel_init) > 0:
            raise ValueError(f"`kernel_init` as a scale must be > 0, got {kernel_init}.")
        return
    raise TypeError(
        "`kernel_init` must be None (the paper's initialisation), a positive float (scale of the "
        "singular values) or a callable init(key, shape, dtype) returning a dense kernel or a "
        f"LowRank, got {type(kernel_init).__name__}."
    )


def _init_factor(
    kernel_init: Any,
    key: jax.Array,
    kernel_shape: tuple[int, ...],
    rank: int,
    capacity: int,
    param_dtype: Any,
) -> LowRank:
    """The initial factor of a layer whose dense kernel has shape ``kernel_shape`` (``..., out``).

    ``W`` is ``out x prod(kernel_shape[:-1])``: the dense kernel reshaped to ``(-1, out)`` and
    transposed.
    """
    n = kernel_shape[-1]
    m = int(np.prod(kernel_shape[:-1]))
    if kernel_init is None or isinstance(kernel_init, numbers.Real):
        scale = 1.0 if kernel_init is None else float(kernel_init)
        return LowRank.random(key, (n, m), rank, capacity=capacity, scale=scale, dtype=param_dtype)
    out = kernel_init(key, kernel_shape, param_dtype)
    if isinstance(out, LowRank):
        if out.shape != (n, m) or out.capacity != capacity:
            raise ValueError(
                f"`kernel_init` returned a LowRank of shape {out.shape} and capacity "
                f"{out.capacity}; this layer needs shape {(n, m)} (out x in) and capacity "
                f"{capacity}."
            )
        return _cast(out, param_dtype)
    out = jnp.asarray(out)
    if out.shape != tuple(kernel_shape):
        raise ValueError(
            f"`kernel_init` returned an array of shape {out.shape}; expected the dense kernel "
            f"shape {tuple(kernel_shape)} (or a LowRank)."
        )
    W = out.reshape(m, n).T
    return _cast(LowRank.from_dense(W, rank=rank, capacity=capacity), param_dtype)


def _cast(lr: LowRank, dtype: Any) -> LowRank:
    """``lr`` with ``U``, ``S``, ``V`` in ``dtype`` (the rank stays float32); differentiable."""
    if lr.dtype == jnp.dtype(dtype):
        return lr
    leaves, treedef = jax.tree.flatten(lr)
    U, S, V, rank = leaves
    return jax.tree.unflatten(treedef, [U.astype(dtype), S.astype(dtype), V.astype(dtype), rank])


def _promote(x: jax.Array, lr: LowRank, bias: jax.Array | None, dtype: Any):
    """Cast inputs, factor and bias to ``dtype`` (default: their common result type)."""
    x = jnp.asarray(x)
    if dtype is None:
        dtype = jnp.result_type(x.dtype, lr.dtype, *(() if bias is None else (bias.dtype,)))
    x = x.astype(dtype)
    lr = _cast(lr, dtype)
    bias = None if bias is None else bias.astype(dtype)
    return x, lr, bias


@dataclasses.dataclass(frozen=True)
class _DensePhi:
    """``phi(x, V) = x @ V`` at a given matmul precision (hashable, equal by value)."""

    precision: Any

    def __call__(self, x: jax.Array, V: jax.Array) -> jax.Array:
        return jnp.matmul(x, V, precision=self.precision)


def _dense_forward(lr: LowRank, bias, x, dtype, precision) -> jax.Array:
    x, lr, bias = _promote(x, lr, bias, dtype)
    if x.ndim < 1 or x.shape[-1] != lr.shape[1]:
        raise ValueError(
            f"Input's last axis must have size in_features={lr.shape[1]}, got input shape "
            f"{x.shape}."
        )
    if precision is None:
        y = lowrank_apply(lr, x)
    else:
        y = lowrank_map(lr, x, _DensePhi(_hashable(precision)))
    if bias is not None:
        y = y + bias
    return y


def _hashable(x: Any) -> Any:
    if isinstance(x, list | tuple):
        return tuple(_hashable(a) for a in x)
    return x


def _as_tuple(x: Any, k: int, name: str) -> tuple[int, ...]:
    if x is None:  # nnx.Conv accepts None as "1"
        x = 1
    if _is_int(x):
        out = (int(x),) * k
    else:
        out = tuple(x)
    if len(out) != k or not all(_is_int(a) and a >= 1 for a in out):
        raise ValueError(
            f"`{name}` must be a positive integer or a sequence of {k} positive integers, "
            f"got {x!r}."
        )
    return tuple(int(a) for a in out)


_ZEROS = nnx.initializers.zeros_init()
_STRING_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", "SAME_LOWER")


def _canonical_padding(padding: Any, k: int) -> str | tuple[tuple[int, int], ...]:
    """A padding string, or ``k`` ``(low, high)`` pairs (hashable)."""
    if isinstance(padding, str):
        if padding not in _STRING_PADDINGS:
            raise ValueError(
                f"`padding` must be one of {_STRING_PADDINGS} or explicit, got {padding!r}."
            )
        if padding == "CAUSAL" and k != 1:
            raise ValueError("`padding='CAUSAL'` is only implemented for 1-D convolutions.")
        return padding
    if _is_int(padding):
        return ((int(padding), int(padding)),) * k
    if isinstance(padding, Sequence) and len(padding) == k:
        pairs = []
        for p in padding:
            if _is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(_is_int(a) for a in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == k:
            return tuple(pairs)
    raise ValueError(
        f"`padding` must be a string, an int, or a sequence of {k} ints or (low, high) pairs, "
        f"got {padding!r}."
    )


@dataclasses.dataclass(frozen=True)
class _ConvPhi:
    """``phi(x, V)``: convolution of ``x`` (``N, *spatial, in``) with the ``c`` columns of ``V``.

    ``V`` (``prod(kernel_size) * in, c``) is reshaped to the kernel ``(*kernel_size, in, c)``. A
    hashable value object, so equal configurations give equal ``phi`` for ``lowrank_map``.
    """

    kernel_size: tuple[int, ...]
    in_features: int
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    precision: Any

    def __call__(self, x: jax.Array, V: jax.Array) -> jax.Array:
        kernel = V.reshape(*self.kernel_size, self.in_features, V.shape[-1])
        nd = x.ndim
        lhs = (0, nd - 1, *range(1, nd - 1))
        rhs = (nd - 1, nd - 2, *range(0, nd - 2))
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            self.strides,
            self.padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=jax.lax.ConvDimensionNumbers(lhs, rhs, lhs),
            precision=self.precision,
        )


def _conv_forward(
    lr: LowRank,
    bias,
    x,
    *,
    kernel_size: tuple[int, ...],
    in_features: int,
    strides: tuple[int, ...],
    padding: Any,
    input_dilation: tuple[int, ...],
    kernel_dilation: tuple[int, ...],
    dtype: Any,
    precision: Any,
) -> jax.Array:
    """The low-rank convolution ``conv(x, V) S^T U^T + b`` with ``nnx.Conv``'s conventions."""
    x, lr, bias = _promote(x, lr, bias, dtype)
    k = len(kernel_size)
    if x.ndim < k + 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"Input must have shape (*batch, {k} spatial axes, in_features={in_features}), got "
            f"{x.shape}."
        )
    num_batch = x.ndim - (k + 1)
    batch_shape = x.shape[:num_batch]
    if num_batch != 1:
        x = x.reshape((-1, *x.shape[num_batch:]))
    pad = padding
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(kk - 1) * d + 1 for kk, d in zip(kernel_size, kernel_dilation, strict=True)]
        pads = [(0, 0)] + [((kk - 1) // 2, kk // 2) for kk in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap" if pad == "CIRCULAR" else "reflect")
        pad = "VALID"
    elif pad == "CAUSAL":
        left = kernel_dilation[0] * (kernel_size[0] - 1)
        x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
        pad = "VALID"
    phi = _ConvPhi(
        kernel_size,
        in_features,
        strides,
        pad,
        input_dilation,
        kernel_dilation,
        _hashable(precision),
    )
    y = lowrank_map(lr, x, phi)
    if bias is not None:
        y = y + bias
    if num_batch != 1:
        y = y.reshape(batch_shape + y.shape[1:])
    return y


# ---- layers --------------------------------------------------------------------------------------


class _FactorAccessors:
    """``factor``, ``rank``, ``capacity`` of a layer whose ``kernel`` is a :class:`LowRankParam`."""

    @property
    def factor(self) -> LowRank:
        """The :class:`~dlrt_jax.LowRank` ``W = U S V^T`` of the kernel (out x in)."""
        return self.kernel.get_value()

    @property
    def rank(self) -> jax.Array:
        """The active rank (an int32 scalar array; ``int(layer.rank)`` outside ``jit``)."""
        return self.factor.active_rank

    @property
    def capacity(self) -> int:
        """The static capacity ``c`` (changes only through :func:`fit_capacity`)."""
        return self.factor.capacity


def _check_features(in_features: Any, out_features: Any) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not (_is_int(v) and v >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")


def _check_rngs(rngs: Any) -> None:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"`rngs` must be an nnx.Rngs, got {type(rngs).__name__}.")


def _bias_param(use_bias, bias_init, rngs, out_features, param_dtype):
    """The layer's bias ``nnx.Param`` (``(out_features,)``), or ``nnx.data(None)`` without one."""
    if use_bias:
        return nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    return nnx.data(None)


class LowRankLinear(_FactorAccessors, nnx.Module):
    r"""A low-rank drop-in for ``nnx.Linear``: ``y = x W^T + b`` with ``W = U S V^T`` never formed.

    ``W`` is ``out_features x in_features`` (``nnx.Linear``'s ``kernel`` is ``W^T``), stored as a
    :class:`~dlrt_jax.LowRank` with a static capacity ``c`` and a traced rank ``r <= c`` in the
    :class:`LowRankParam` ``kernel``; the bias is an ``nnx.Param`` as in ``nnx.Linear``. The call
    computes ``((x V) S^T) U^T + b`` over the last axis at cost ``O(c (n + m))`` per row; its custom
    VJP gives the DLRT gradients (see :class:`~dlrt_jax.LowRank`). Train it with the DLRT optax
    transforms (:func:`dlrt_jax.bug`, ...) through :class:`DLRTOptimizer`; see :func:`train_step`.

    Args:
        in_features: ``m``, the size of the input's last axis.
        out_features: ``n``.
        rank: initial active rank ``r``; default: the capacity (the paper starts adaptive layers at
            their maximal rank).
        capacity: static capacity ``c`` in ``[rank, min(n, m)]``; default
            ``max(floor(min(n, m) / 2), rank)``. The rank-adaptive integrators need
            ``c <= floor(min(n, m) / 2)``; the fixed-rank ``bug`` and ``projector_splitting`` take
            any capacity.
        use_bias: add a bias.
        dtype: computation dtype (default: the common dtype of inputs and parameters).
        param_dtype: storage dtype of ``U``, ``S``, ``V`` and the bias (the rank is float32).
        precision: matmul precision of the input contraction ``x V`` (``None``: default). The small
            products with ``S`` and ``U`` use the default precision.
        kernel_init: ``None`` for the paper's initialisation (orthonormal ``U``, ``V`` from QR of
            Gaussians, ``S = diag`` of sorted ``|N(0, 1)|`` samples); a positive float to scale
            those singular values; or a callable ``init(key, shape, dtype)`` (an
            ``nnx.initializers`` initialiser) returning either the dense kernel of shape
            ``(in_features, out_features)``, which is then truncated by SVD to ``rank``, or a
            ``LowRank`` of shape ``(out_features, in_features)`` and the layer's capacity.
        bias_init: initialiser of the bias.
        rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear
        >>> layer = LowRankLinear(16, 8, rank=2, capacity=4, rngs=nnx.Rngs(0))
        >>> jax.tree.map(jnp.shape, nnx.as_pure(nnx.state(layer)))["kernel"].U
        (8, 4)
        >>> w = layer.kernel.get_value()
        >>> w.U.shape, w.S.shape, w.V.shape, layer.bias.shape
        ((8, 4), (4, 4), (16, 4), (8,))
        >>> int(layer.rank), layer.capacity
        (2, 4)
        >>> layer(jnp.ones((3, 16))).shape
        (3, 8)

    References:
        Schotthöfer et al., "Low-rank lottery tickets: finding efficient low-rank neural networks
        via matrix differential equations", NeurIPS 2022.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | None = None,
        capacity: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = None,
        bias_init: Callable = _ZEROS,
        rngs: nnx.Rngs,
    ):
        _check_features(in_features, out_features)
        _check_rngs(rngs)
        _check_kernel_init(kernel_init)
        rank, capacity = _resolve_rank_capacity(
            rank, capacity, (out_features, in_features), "LowRankLinear"
        )
        self.kernel = LowRankParam(
            _init_factor(
                kernel_init,
                rngs.params(),
                (in_features, out_features),
                rank,
                capacity,
                param_dtype,
            )
        )
        self.bias: nnx.Param | None = _bias_param(
            use_bias, bias_init, rngs, out_features, param_dtype
        )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W^T + bias`` over the last axis (any leading batch axes)."""
        bias = self.bias[...] if self.bias is not None else None
        return _dense_forward(self.factor, bias, inputs, self.dtype, self.precision)

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        *,
        rank: int | None = None,
        tol: float | None = None,
        capacity: int | None = None,
    ) -> LowRankLinear:
        """A :class:`LowRankLinear` initialised by truncated SVD of ``linear``'s dense kernel.

        ``W = linear.kernel^T`` is truncated at ``rank``, or at the smallest rank whose relative
        tail norm ``sqrt(sum_{j > r} sigma_j^2) / ||sigma||_2`` (the relative weight error
        ``||W - W_r||_F / ||W||_F``) is ``<= tol``; with neither, at the capacity. ``capacity``
        defaults as in the constructor, ``max(floor(min(n, m) / 2), rank)``: with ``tol`` it
        grows to the rank the tolerance needs (above ``floor(min(n, m) / 2)`` only the
        fixed-rank integrators can train the layer), and an explicit ``capacity`` below that rank
        raises ``ValueError`` (the tolerance is never silently missed). The bias, ``dtype``,
        ``param_dtype`` and ``precision`` are copied. At ``rank = capacity = min(n, m)`` the layer
        computes what ``linear`` computes.

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from dlrt_jax.nnx import LowRankLinear
            >>> dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
            >>> low = LowRankLinear.from_linear(dense, rank=4, capacity=4)
            >>> x = jnp.ones((2, 6))
            >>> bool(jnp.allclose(low(x), dense(x), atol=1e-5))
            True
        """
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"`linear` must be an nnx.Linear, got {type(linear).__name__}.")
        _check_linear_supported(linear, "from_linear")
        W = jnp.asarray(linear.kernel[...]).T
        lr = _factor_from_dense(W, rank, tol, capacity, "LowRankLinear.from_linear")
        bias = None if linear.bias is None else linear.bias[...]
        return cls(
            linear.in_features,
            linear.out_features,
            rank=int(lr.rank),
            capacity=lr.capacity,
            use_bias=bias is not None,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            precision=linear.precision,
            kernel_init=lambda _key, _shape, _dtype: lr,
            bias_init=lambda _key, _shape, dtype: jnp.asarray(bias, dtype),
            rngs=nnx.Rngs(0),  # not used: both initialisers return given values
        )


class LowRankConv(_FactorAccessors, nnx.Module):
    r"""A low-rank drop-in for ``nnx.Conv``: a convolution with ``c`` filters, then a 1x1 mix.

    The kernel ``(*kernel_size, in, out)`` is matricised as ``W`` (``out x prod(kernel_size) *
    in``; the dense kernel is ``W^T`` reshaped) and stored as a :class:`~dlrt_jax.LowRank`. The
    layer convolves the input with the ``c`` columns of ``V`` reshaped to filters
    ``(*kernel_size, in, c)`` and applies ``S^T U^T`` to the ``c`` channels (a 1x1 convolution),
    through :func:`~dlrt_jax.lowrank_map`: cost ``O(c (prod(kernel_size) in + out))`` per output
    pixel and no kernel materialised. The result equals ``nnx.Conv`` with the kernel
    ``W^T.reshape(*kernel_size, in, out)``.

    Args:
        in_features: input channels.
        out_features: output channels.
        kernel_size: an int (1-D) or a sequence of ints.
        strides: as ``nnx.Conv``.
        padding: as ``nnx.Conv``: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
            ``'CAUSAL'`` (1-D), an int, or a sequence of ints / ``(low, high)`` pairs.
        input_dilation: as ``nnx.Conv``.
        kernel_dilation: as ``nnx.Conv``.
        feature_group_count: must be 1 (grouped convolutions have no single matrix ``W``).
        rank: as :class:`LowRankLinear`, with ``n = out`` and ``m = prod(kernel_size) * in``.
        capacity: as :class:`LowRankLinear`.
        use_bias: as :class:`LowRankLinear`.
        dtype: as :class:`LowRankLinear`.
        param_dtype: as :class:`LowRankLinear`.
        precision: as :class:`LowRankLinear`.
        bias_init: as :class:`LowRankLinear`.
        rngs: as :class:`LowRankLinear`.
        kernel_init: as :class:`LowRankLinear`; a callable gets the dense kernel shape
            ``(*kernel_size, in, out)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankConv
        >>> conv = LowRankConv(3, 16, (3, 3), rank=4, capacity=8, rngs=nnx.Rngs(0))
        >>> w = conv.kernel.get_value()  # W is 16 x (3 * 3 * 3)
        >>> w.U.shape, w.S.shape, w.V.shape, conv.bias.shape
        ((16, 8), (8, 8), (27, 8), (16,))
        >>> conv(jnp.ones((2, 10, 10, 3))).shape
        (2, 10, 10, 16)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = 1,
        *,
        padding: Any = "SAME",
        input_dilation: int | Sequence[int] | None = 1,
        kernel_dilation: int | Sequence[int] | None = 1,
        feature_group_count: int = 1,
        rank: int | None = None,
        capacity: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = None,
        bias_init: Callable = _ZEROS,
        rngs: nnx.Rngs,
    ):
        _check_features(in_features, out_features)
        if feature_group_count != 1:
            raise ValueError(
                "LowRankConv supports only `feature_group_count=1` (a grouped convolution has no "
                f"single kernel matrix to factorise), got {feature_group_count!r}."
            )
        _check_rngs(rngs)
        kernel_size = (kernel_size,) if _is_int(kernel_size) else tuple(kernel_size)
        k = len(kernel_size)
        if k < 1 or not all(_is_int(a) and a >= 1 for a in kernel_size):
            raise ValueError(f"`kernel_size` must be positive integers, got {kernel_size!r}.")
        strides_t = _as_tuple(strides, k, "strides")
        input_dilation_t = _as_tuple(input_dilation, k, "input_dilation")
        kernel_dilation_t = _as_tuple(kernel_dilation, k, "kernel_dilation")
        padding_c = _canonical_padding(padding, k)
        _check_kernel_init(kernel_init)
        m = int(np.prod(kernel_size)) * in_features
        rank, capacity = _resolve_rank_capacity(rank, capacity, (out_features, m), "LowRankConv")
        self.kernel = LowRankParam(
            _init_factor(
                kernel_init,
                rngs.params(),
                (*kernel_size, in_features, out_features),
                rank,
                capacity,
                param_dtype,
            )
        )
        self.bias: nnx.Param | None = _bias_param(
            use_bias, bias_init, rngs, out_features, param_dtype
        )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel_size = tuple(int(a) for a in kernel_size)
        self.strides = strides_t
        self.padding = padding_c
        self.input_dilation = input_dilation_t
        self.kernel_dilation = kernel_dilation_t
        self.feature_group_count = 1
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The convolution of ``inputs`` (``*batch, *spatial, in_features``), channels last."""
        bias = self.bias[...] if self.bias is not None else None
        return _conv_forward(
            self.factor,
            bias,
            inputs,
            kernel_size=self.kernel_size,
            in_features=self.in_features,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            dtype=self.dtype,
            precision=self.precision,
        )

    @classmethod
    def from_conv(
        cls,
        conv: nnx.Conv,
        *,
        rank: int | None = None,
        tol: float | None = None,
        capacity: int | None = None,
    ) -> LowRankConv:
        """A :class:`LowRankConv` initialised by truncated SVD of ``conv``'s matricised kernel.

        Rank rules as :meth:`LowRankLinear.from_linear`; strides, padding, dilations, bias,
        dtypes and precision are copied. Raises ``ValueError`` for ``feature_group_count != 1``
        and for a ``mask``.

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from dlrt_jax.nnx import LowRankConv
            >>> dense = nnx.Conv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
            >>> low = LowRankConv.from_conv(dense, rank=4, capacity=4)  # W is 4 x 18: exact
            >>> x = jnp.ones((1, 8, 8, 2))
            >>> bool(jnp.allclose(low(x), dense(x), atol=1e-5))
            True
        """
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"`conv` must be an nnx.Conv, got {type(conv).__name__}.")
        _check_conv_supported(conv, "from_conv")
        kernel = jnp.asarray(conv.kernel[...])
        out = kernel.shape[-1]
        W = kernel.reshape(-1, out).T
        lr = _factor_from_dense(W, rank, tol, capacity, "LowRankConv.from_conv")
        bias = None if conv.bias is None else conv.bias[...]
        return cls(
            conv.in_features,
            conv.out_features,
            conv.kernel_size,
            conv.strides,
            padding=conv.padding,
            input_dilation=conv.input_dilation,
            kernel_dilation=conv.kernel_dilation,
            rank=int(lr.rank),
            capacity=lr.capacity,
            use_bias=bias is not None,
            dtype=conv.dtype,
            param_dtype=conv.param_dtype,
            precision=conv.precision,
            kernel_init=lambda _key, _shape, _dtype: lr,
            bias_init=lambda _key, _shape, dtype: jnp.asarray(bias, dtype),
            rngs=nnx.Rngs(0),  # not used: both initialisers return given values
        )


class _Fit(NamedTuple):
    """Rank, capacity and relative weight error ``||W - W_r||_F / ||W||_F`` of a truncation."""

    rank: int
    capacity: int
    rel_error: float | None


def _fit_rank(W: jax.Array, rank: Any, tol: Any, capacity: Any, where: str) -> _Fit:
    """The rank and capacity of the truncated SVD of ``W``, and its relative error.

    With ``tol``: the smallest rank whose relative tail norm is ``<= tol``; the capacity defaults
    to ``max(floor(min(n, m) / 2), rank)`` and an explicit ``capacity`` below that rank raises.
    Otherwise ``rank`` and ``capacity`` as the constructors resolve them.
    """
    if rank is not None and tol is not None:
        raise ValueError(f"{where}: give at most one of `rank` and `tol`, got both.")
    if tol is not None and not (
        isinstance(tol, numbers.Real) and not isinstance(tol, bool) and 0 <= tol < np.inf
    ):
        raise ValueError(f"{where}: `tol` must be a number >= 0, got {tol!r}.")
    n, m = W.shape
    if not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError(f"{where}: the dense kernel contains NaN or Inf; cannot take its SVD.")
    Wf = W if W.dtype == jnp.float64 else W.astype(jnp.float32)
    sigma = np.asarray(jnp.linalg.svd(Wf, compute_uv=False), np.float64)
    tails = np.append(np.sqrt(np.cumsum(sigma[::-1] ** 2)[::-1]), 0.0)  # tails[r]: error at r
    norm = tails[0]
    if tol is None:
        rank, capacity = _resolve_rank_capacity(rank, capacity, (n, m), where)
    else:
        ok = np.nonzero(tails[1:] <= float(tol) * norm)[0]
        rank = int(ok[0]) + 1 if ok.size else min(n, m)
        _resolve_rank_capacity(None, capacity, (n, m), where)  # validates `capacity`
        if capacity is None:
            capacity = max(default_capacity((n, m)), rank)
        elif rank > capacity:
            raise ValueError(
                f"{where}: `tol`={tol:g} needs rank {rank} for this {n} x {m} matrix W (relative "
                f"error {tails[rank] / norm:.3g}), above `capacity`={capacity}; pass "
                f"`capacity=` >= {rank} (or leave it out), or a larger `tol=`."
            )
    rel_error = float(tails[rank] / norm) if norm > 0 else 0.0
    return _Fit(int(rank), int(capacity), rel_error)


def _factor_from_dense(W, rank, tol, capacity, where) -> LowRank:
    fit = _fit_rank(W, rank, tol, capacity, where)
    return LowRank.from_dense(W, rank=fit.rank, capacity=fit.capacity)


def _check_linear_supported(linear: nnx.Linear, where: str) -> None:
    if type(linear) is not nnx.Linear:
        raise TypeError(
            f"{where}: only plain nnx.Linear layers can be converted, got the subclass "
            f"{type(linear).__name__} (its behaviour may differ from x @ kernel + bias)."
        )
    dot_general = getattr(linear, "dot_general", jax.lax.dot_general)
    if dot_general is not jax.lax.dot_general:
        raise ValueError(f"{where}: nnx.Linear with a custom `dot_general` is not supported.")
    if getattr(linear, "preferred_element_type", None) is not None:
        raise ValueError(f"{where}: nnx.Linear with `preferred_element_type` is not supported.")


def _check_conv_supported(conv: nnx.Conv, where: str) -> None:
    if type(conv) is not nnx.Conv:
        raise TypeError(
            f"{where}: only plain nnx.Conv layers can be converted, got the subclass "
            f"{type(conv).__name__}."
        )
    if conv.feature_group_count != 1:
        raise ValueError(
            f"{where}: nnx.Conv with feature_group_count={conv.feature_group_count} is not "
            "supported (a grouped convolution has no single kernel matrix to factorise)."
        )
    if getattr(conv, "mask", None) is not None:
        raise ValueError(f"{where}: nnx.Conv with a `mask` is not supported.")
    fn = getattr(conv, "conv_general_dilated", jax.lax.conv_general_dilated)
    if fn is not jax.lax.conv_general_dilated:
        raise ValueError(
            f"{where}: nnx.Conv with a custom `conv_general_dilated` is not supported."
        )
    if getattr(conv, "preferred_element_type", None) is not None:
        raise ValueError(f"{where}: nnx.Conv with `preferred_element_type` is not supported.")


# ---- model conversion ----------------------------------------------------------------------------

_LOGGER = logging.getLogger(__name__)
_WARN_ERROR = 1e-3  # relative weight error above which the default rank is warned about


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


@dataclasses.dataclass(frozen=True)
class _PathRegex:
    """``(path, x) -> bool``: ``pattern`` fully matches a path element or the ``/``-joined path."""

    pattern: str

    def __call__(self, path: tuple, x: Any) -> bool:
        rx = re.compile(self.pattern)
        parts = [str(p) for p in path]
        return any(rx.fullmatch(p) for p in parts) or bool(rx.fullmatch("/".join(parts)))


def _strings_as_paths(predicate: Any) -> Any:
    """``predicate`` with flax's tag filters (what strings become) read as path patterns."""
    filterlib = nnx.filterlib
    if isinstance(predicate, filterlib.WithTag):
        return _PathRegex(predicate.tag)
    if isinstance(predicate, filterlib.Any | filterlib.All):
        return type(predicate)(*(_strings_as_paths(p) for p in predicate.predicates))
    if isinstance(predicate, filterlib.Not):
        return filterlib.Not(_strings_as_paths(predicate.predicate))
    return predicate


def _to_predicate(filter: Any) -> Callable[[tuple, Any], bool]:
    """``filter`` (flax's filter language; see :func:`to_low_rank`) as a predicate."""
    if filter is None:  # dlrt_jax's historical default: every nnx.Linear / nnx.Conv
        return lambda path, module: True
    if isinstance(filter, str):
        try:
            re.compile(filter)
        except re.error as e:
            raise ValueError(f"`filter` {filter!r} is not a valid regular expression: {e}.") from e
        return _PathRegex(filter)
    if isinstance(filter, list | tuple):
        return _strings_as_paths(nnx.filterlib.Any(*(_to_predicate(f) for f in filter)))
    if isinstance(filter, type | bool) or filter is Ellipsis:
        return nnx.filterlib.to_predicate(filter)
    if callable(filter):
        flax_filters = (nnx.filterlib.WithTag, nnx.filterlib.Any, nnx.filterlib.All)
        if isinstance(filter, (*flax_filters, nnx.filterlib.Not)):
            return _strings_as_paths(filter)
        try:
            params = inspect.signature(filter).parameters.values()
        except (TypeError, ValueError) as e:
            raise TypeError(
                "`filter` must be a predicate whose signature can be inspected: (path, module) "
                "-> bool or (module) -> bool."
            ) from e
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        if len(positional) == 1 and not varargs:
            return lambda path, module: filter(module)
        if len(positional) == 2 or varargs:
            return filter
        raise TypeError(
            "`filter` must take (path, module) or (module), got a callable with "
            f"{len(positional)} required positional parameters."
        )
    raise TypeError(
        "`filter` must be None, a flax filter (a type such as nnx.Linear, a path pattern (str), "
        "nnx.PathContains(...), nnx.Any(...) / nnx.All(...) / nnx.Not(...), a list of filters, "
        f"True, ...) or a predicate (path, module) -> bool, got {type(filter).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class LayerConversion:
    """One layer in a :class:`ConversionSummary`: converted by :func:`to_low_rank`, or skipped.

    Attributes:
        path: the layer's path in the model (``'block/fc1'``; ``'<root>'`` for the model itself).
        layer: the original layer's type name (``'Linear'``, ``'LayerNorm'``, ...).
        converted: whether the layer was replaced by a low-rank layer.
        shape: ``(n, m)`` of the matrix ``W`` (out x in) of a converted layer, else ``None``.
        rank: the new factor's rank (``None`` when skipped).
        capacity: the new factor's capacity (``None`` when skipped).
        rel_error: ``||W - W_r||_F / ||W||_F`` of the truncated SVD (``init='svd'``); ``None``
            when skipped or for ``init='random'`` (a fresh layer).
        note: why the layer was skipped, or a remark on a converted one.
    """

    path: str
    layer: str
    converted: bool
    shape: tuple[int, int] | None = None
    rank: int | None = None
    capacity: int | None = None
    rel_error: float | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What :func:`to_low_rank` did, layer by layer; ``str(summary)`` is a table.

    Attributes:
        layers: one :class:`LayerConversion` per converted layer and per skipped layer with
            parameters, in the model's order.
    """

    layers: tuple[LayerConversion, ...]

    @property
    def converted(self) -> tuple[LayerConversion, ...]:
        """The converted layers."""
        return tuple(r for r in self.layers if r.converted)

    @property
    def skipped(self) -> tuple[LayerConversion, ...]:
        """The layers with parameters left as they were, each with the reason in ``note``."""
        return tuple(r for r in self.layers if not r.converted)

    @property
    def max_rel_error(self) -> float:
        """The largest relative weight error of a converted layer (0.0 when none is known)."""
        return max((r.rel_error for r in self.converted if r.rel_error is not None), default=0.0)

    def __str__(self) -> str:
        head = ("path", "layer", "W (n x m)", "rank", "capacity", "rel. error", "note")
        rows = [head]
        for r in self.layers:
            rows.append(
                (
                    r.path,
                    r.layer,
                    "-" if r.shape is None else f"{r.shape[0]} x {r.shape[1]}",
                    "-" if r.rank is None else str(r.rank),
                    "-" if r.capacity is None else str(r.capacity),
                    "-" if r.rel_error is None else f"{r.rel_error:.3g}",
                    ("" if r.converted else "skipped: ") + r.note,
                )
            )
        widths = [max(len(row[j]) for row in rows) for j in range(len(head) - 1)]
        lines = [
            f"to_low_rank: {len(self.converted)} layer(s) converted, {len(self.skipped)} skipped"
        ]
        for row in rows:
            cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        return "\n".join(lines)


def _dense_matrix(node: nnx.Linear | nnx.Conv) -> jax.Array:
    """``W`` (out x in) of an ``nnx.Linear`` or ``nnx.Conv``: the kernel reshaped, transposed."""
    kernel = jnp.asarray(node.kernel[...])
    return kernel.reshape(-1, kernel.shape[-1]).T


def _own_params(node: Any) -> list[str]:
    """Names of the ``nnx.Param`` attributes a module holds itself (not through submodules)."""
    return [k for k, v in vars(node).items() if isinstance(v, nnx.Param)]


def _skip_reason(node: Any) -> str | None:
    """Why ``to_low_rank`` leaves a module with parameters alone (``None``: no parameters)."""
    if isinstance(node, LowRankLinear | LowRankConv):
        return "already a low-rank layer"
    if not isinstance(node, nnx.Module):
        return None
    names = _own_params(node)
    if not names:
        return None
    return f"has parameters ({', '.join(sorted(names))}); no converter for {type(node).__name__}"


class _Request(NamedTuple):
    """What :func:`to_low_rank` asks of every converted layer."""

    rank: int | None
    tol: float | None
    capacity: int | None
    init: str
    rngs: nnx.Rngs | None


class _Converted(NamedTuple):
    """A converter's result: the new layer, ``W``'s shape ``(n, m)`` and the rank it got."""

    layer: Any
    shape: tuple[int, int]
    fit: _Fit


def _choose(W: jax.Array, request: _Request, where: str) -> _Fit:
    """The rank and capacity of the new factor of ``W`` (``rel_error`` ``None`` if random)."""
    if request.init == "svd":
        return _fit_rank(W, request.rank, request.tol, request.capacity, where)
    r, c = _resolve_rank_capacity(request.rank, request.capacity, W.shape, where)
    return _Fit(r, c, None)


def _convert_linear(node: nnx.Linear, request: _Request, where: str) -> _Converted:
    _check_linear_supported(node, where)
    W = _dense_matrix(node)
    fit = _choose(W, request, where)
    if request.init == "svd":
        new = LowRankLinear.from_linear(node, rank=fit.rank, capacity=fit.capacity)
    else:
        new = LowRankLinear(
            node.in_features,
            node.out_features,
            rank=fit.rank,
            capacity=fit.capacity,
            use_bias=node.bias is not None,
            dtype=node.dtype,
            param_dtype=node.param_dtype,
            precision=node.precision,
            rngs=request.rngs,
        )
    return _Converted(new, W.shape, fit)


def _convert_conv(node: nnx.Conv, request: _Request, where: str) -> _Converted:
    _check_conv_supported(node, where)
    W = _dense_matrix(node)
    fit = _choose(W, request, where)
    if request.init == "svd":
        new = LowRankConv.from_conv(node, rank=fit.rank, capacity=fit.capacity)
    else:
        new = LowRankConv(
            node.in_features,
            node.out_features,
            node.kernel_size,
            node.strides,
            padding=node.padding,
            input_dilation=node.input_dilation,
            kernel_dilation=node.kernel_dilation,
            rank=fit.rank,
            capacity=fit.capacity,
            use_bias=node.bias is not None,
            dtype=node.dtype,
            param_dtype=node.param_dtype,
            precision=node.precision,
            rngs=request.rngs,
        )
    return _Converted(new, W.shape, fit)


#: The layer types :func:`to_low_rank` converts, each with its converter
#: ``converter(layer, request, where) -> _Converted`` (``where`` prefixes error messages). A layer
#: is converted by the first entry it is an instance of; a converter raises ``TypeError`` /
#: ``ValueError`` for a configuration it cannot represent.
_CONVERTERS: dict[type, Callable[[Any, _Request, str], _Converted]] = {
    nnx.Linear: _convert_linear,
    nnx.Conv: _convert_conv,
}


def _kinds() -> str:
    return " / ".join(f"nnx.{t.__name__}" for t in _CONVERTERS)


def _converter_for(node: Any) -> Callable[[Any, _Request, str], _Converted] | None:
    if isinstance(node, LowRankLinear | LowRankConv):
        return None
    return next((f for t, f in _CONVERTERS.items() if isinstance(node, t)), None)


def to_low_rank(
    model: Any,
    *,
    filter: Any = None,
    rank: int | None = None,
    tol: float | None = None,
    capacity: int | None = None,
    init: str = "svd",
    rngs: nnx.Rngs | None = None,
    report: bool = False,
) -> Any:
    r"""Replace chosen ``nnx.Linear`` / ``nnx.Conv`` layers of a model by low-rank layers.

    Returns a **new** model (built with ``nnx.recursive_map`` on an ``nnx.clone`` of ``model``);
    ``model`` itself is not modified, and the layers that are not replaced are copies (new
    ``Variable`` objects, shared immutable arrays). Shared layers stay shared.

    **Which layers.** Only ``nnx.Linear`` and ``nnx.Conv`` are converted; ``filter`` chooses
    among them, in flax's filter language (``nnx.filterlib``) applied to ``(path, module)``:

    * a type (``nnx.Conv``) selects its instances; ``nnx.PathContains('block')``,
      ``nnx.Any(...)``, ``nnx.All(...)``, ``nnx.Not(...)``, a list or tuple (any of), ``True`` /
      ``...`` (all) and a predicate ``filter(path, module) -> bool`` mean what they mean in flax;
    * a string is a regular expression that must fully match one element of the path or the
      ``/``-joined path: ``'fc1'`` matches ``('fc1',)`` and ``('block', 'fc1')`` (not ``fc10``),
      ``'fc[12]'`` both ``fc1`` and ``fc2``, ``'layers/[01]'`` the first two entries of
      ``layers``. (In flax a string is a ``Variable`` tag, which modules do not have; strings
      inside ``nnx.Any`` / ``nnx.All`` / ``nnx.Not`` and lists are read as path patterns too.)
    * ``None`` (the default) selects every ``nnx.Linear`` / ``nnx.Conv``; note that in flax
      ``None`` selects nothing. A one-argument callable ``filter(module)`` is also accepted.

    Every other module with parameters (``nnx.Embed``, ``nnx.LayerNorm``, ``nnx.LinearGeneral``,
    ``nnx.Einsum``, a custom module, ...) and every ``Linear`` / ``Conv`` the filter leaves out is
    kept as it is and listed in the summary as *skipped*, with the reason.

    **Which rank.** With ``init='svd'`` each selected layer's matrix ``W`` (out x in; a
    convolution kernel matricised as in :class:`LowRankConv`) is replaced by its truncated SVD
    ``W_r``; the relative weight error ``||W - W_r||_F / ||W||_F = sqrt(sum_{j > r}
    sigma_j^2) / ||sigma||_2`` of every layer is in the summary.

    * ``tol``: ``r`` is the smallest rank with relative error ``<= tol``, and the capacity is
      ``max(floor(min(n, m) / 2), r)`` (or ``capacity``, which must then be ``>= r``, else
      ``ValueError``). When ``r > floor(min(n, m) / 2)`` the layer gets capacity ``r`` and the
      summary says so: the rank-adaptive :func:`dlrt_jax.bug` / :func:`dlrt_jax.parallel_bug`
      (``tau`` given) augment to ``2c`` columns and need ``c <= floor(min(n, m) / 2)``, so train
      such a model with a fixed-rank integrator (``tau=None`` or
      :func:`dlrt_jax.projector_splitting`) or convert it with a larger ``tol``.
    * ``rank``: that rank in every layer (capacity ``max(floor(min(n, m) / 2), rank)`` or
      ``capacity``).
    * neither: every layer keeps its capacity's worth, ``floor(min(n, m) / 2)`` (or
      ``capacity``), of singular values, whatever that costs in accuracy: a ``UserWarning`` lists
      the layers whose relative weight error exceeds ``1e-3``. Pass ``tol`` to bound the change.

    The summary (a :class:`ConversionSummary`) is logged at ``INFO`` level on the
    ``'dlrt_jax.nnx'`` logger on every call, and returned with ``report=True``.

    Args:
        model: an NNX module (or graph of modules).
        filter: which ``nnx.Linear`` / ``nnx.Conv`` layers to replace (see above).
        rank: rank of every new factor (at most one of ``rank`` and ``tol``).
        tol: relative weight error bound of the truncated SVD (``init='svd'`` only).
        capacity: capacity of every new factor; default ``max(floor(min(n, m) / 2), rank)`` per
            layer, the rank being the one ``rank`` or ``tol`` gives.
        init: ``'svd'`` (truncated SVD of the dense kernel; bias, dtypes, precision copied) or
            ``'random'`` (the constructors' paper initialisation and a zero bias: a fresh layer of
            the same configuration; the summary has no relative error then).
        rngs: ``nnx.Rngs`` for ``init='random'``.
        report: also return the :class:`ConversionSummary`.

    Returns:
        The new model; with ``report=True``, ``(model, summary)``.

    Raises:
        ValueError: when the filter matches no layer, when a matched ``nnx.Conv`` has
            ``feature_group_count != 1`` or a ``mask``, when ``tol`` needs a rank above an
            explicit ``capacity``, or for invalid ranks (the message names the layer's path).
        TypeError: when a matched layer is a subclass of ``nnx.Linear`` / ``nnx.Conv``, or for a
            ``filter`` that is not one.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear, to_low_rank
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc1 = nnx.Linear(16, 16, rngs=rngs)
        ...         self.norm = nnx.LayerNorm(16, rngs=rngs)
        ...         self.out = nnx.Linear(16, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.out(self.norm(nnx.relu(self.fc1(x))))
        >>> model = MLP(nnx.Rngs(0))
        >>> low, summary = to_low_rank(model, filter="fc1", tol=0.4, report=True)
        >>> type(low.fc1).__name__, type(low.out).__name__, type(model.fc1).__name__
        ('LowRankLinear', 'Linear', 'Linear')
        >>> print(summary)  # doctest: +NORMALIZE_WHITESPACE
        to_low_rank: 1 layer(s) converted, 2 skipped
        path  layer      W (n x m)  rank  capacity  rel. error  note
        fc1   Linear     16 x 16    7     8         0.374
        norm  LayerNorm  -          -     -         -           skipped: has parameters (bias,
          scale); no converter for LayerNorm
        out   Linear     -          -     -         -           skipped: excluded by `filter`
        >>> summary.converted[0].rank == int(low.fc1.rank), summary.max_rel_error <= 0.4
        (True, True)
        >>> int(to_low_rank(model, filter=nnx.PathContains("fc1"), rank=4).fc1.rank)
        4
    """
    if init not in ("svd", "random"):
        raise ValueError(f"`init` must be 'svd' or 'random', got {init!r}.")
    if init == "random":
        if tol is not None:
            raise ValueError("`tol` applies to init='svd' only; give `rank` for init='random'.")
        if not isinstance(rngs, nnx.Rngs):
            raise ValueError("init='random' needs `rngs` (an nnx.Rngs).")
    if rank is not None and tol is not None:
        raise ValueError("Give at most one of `rank` and `tol`, got both.")
    if not isinstance(report, bool):
        raise TypeError(f"`report` must be a bool, got {type(report).__name__}.")
    predicate = _to_predicate(filter)
    request = _Request(rank, tol, capacity, init, rngs)
    records: list[LayerConversion] = []

    def convert(path, node):
        converter = _converter_for(node)
        if converter is None:
            reason = _skip_reason(node)
            if reason is not None:
                records.append(
                    LayerConversion(_path_str(path), type(node).__name__, False, None, note=reason)
                )
            return node
        if not predicate(path, node):
            records.append(
                LayerConversion(
                    _path_str(path), type(node).__name__, False, note="excluded by `filter`"
                )
            )
            return node
        where = f"to_low_rank at {_path_str(path)!r}"
        new, shape, fit = _wrap_errors(where, converter, node, request, where)
        note = ""
        if fit.capacity > default_capacity(shape):
            note = (
                f"capacity > floor(min(n, m) / 2) = {default_capacity(shape)}: fixed-rank "
                "integrators only (the rank-adaptive ones need 2 * capacity <= min(n, m))"
            )
        records.append(
            LayerConversion(
                _path_str(path),
                type(node).__name__,
                True,
                shape,
                fit.rank,
                fit.capacity,
                fit.rel_error,
                note,
            )
        )
        return new

    new_model = nnx.recursive_map(convert, nnx.clone(model))
    summary = ConversionSummary(tuple(records))
    if not summary.converted:
        candidates = [r.path for r in summary.skipped if r.note == "excluded by `filter`"]
        raise ValueError(
            f"to_low_rank: `filter` matched no convertible layer ({_kinds()}; the filter is "
            "applied "
            f"to those only). Candidate layers: {candidates or 'none'}.\n{summary}"
        )
    _LOGGER.info("%s", summary)
    if init == "svd" and rank is None and tol is None:
        large = [r for r in summary.converted if r.rel_error > _WARN_ERROR]
        if large:
            listed = ", ".join(f"{r.path!r} {r.rel_error:.3g}" for r in large)
            warnings.warn(
                "to_low_rank: with neither `rank` nor `tol` each layer keeps capacity-many "
                "singular values (floor(min(n, m) / 2) by default), which changes the weights by "
                f"more than {_WARN_ERROR:g} (relative Frobenius error): {listed}. Pass `tol=` "
                "(the smallest rank within that relative error) or `rank=` to choose; "
                "report=True returns the per-layer summary.",
                UserWarning,
                stacklevel=2,
            )
    return (new_model, summary) if report else new_model


def _wrap_errors(where: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from e


# ---- training glue -------------------------------------------------------------------------------


def make_grad_fn(
    model: nnx.Module, loss_fn: Callable[[Any, Any], jax.Array], batch: Any, *, wrt: Any = nnx.Param
) -> Callable[[Any], Any]:
    """The ``grad_fn(params) -> grads`` that :func:`dlrt_jax.bug` / ``projector_splitting`` need.

    Splits ``model`` once into ``(graphdef, params, rest)`` with the filter ``wrt`` (use the
    ``nnx.Optimizer``'s ``wrt``); ``grad_fn(p)`` merges ``p`` back with ``graphdef`` and ``rest``,
    evaluates ``loss_fn(model, batch)`` and returns ``jax.grad`` of it with respect to ``p``: a tree
    of the same structure as ``p`` (``LowRank`` cotangents at the factors). ``p`` may be the pure
    state that ``nnx.Optimizer.update`` passes to ``tx.update`` (``nnx.as_pure(nnx.state(model,
    wrt))``) or a state with ``Variable`` wrappers.

    The non-trained state ``rest`` (batch statistics, RNG counters) is the one at the time of the
    call and changes made to it inside ``grad_fn`` are discarded: every evaluation of a step sees
    the same dropout masks, which is what the integrators assume (one loss per step). Build the
    ``grad_fn`` before computing the step's first gradient.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear, make_grad_fn
        >>> model = LowRankLinear(6, 4, rank=2, rngs=nnx.Rngs(0))
        >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
        >>> grad_fn = make_grad_fn(model, loss_fn, (jnp.ones((5, 6)), jnp.zeros((5, 4))))
        >>> grads = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
        >>> grads["kernel"].U.shape, grads["bias"].shape  # grads["kernel"].U = G V
        ((4, 2), (4,))
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    def grad_fn(params):
        return jax.grad(loss_of)(params)

    return grad_fn


def _pure_init(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``init`` sees the pure state (no ``Variable`` wrappers)."""
    tx = optax.with_extra_args_support(tx)
    return optax.GradientTransformationExtraArgs(
        lambda params: tx.init(nnx.as_pure(params)), tx.update
    )


class DLRTOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` for the DLRT transforms (and any other optax transform).

    Identical to ``nnx.Optimizer(model, tx, wrt=wrt)`` except that ``tx.init`` is applied to the
    pure state ``nnx.as_pure(nnx.state(model, wrt))``, so every array of the optimiser state gets
    its own ``OptArray`` and the per-factor ``FactorState`` of a DLRT transform keeps its structure
    across updates. (``nnx.Optimizer`` puts each factor's whole ``FactorState`` into one
    ``OptVariable``, and its first ``update`` rewrites that into a nested ``State`` dict, so the
    second step fails inside the inner optimiser.) ``update(model, grads, **kwargs)`` is inherited:
    it passes ``params = nnx.as_pure(nnx.state(model, wrt))`` (``LowRank`` leaves at the factors) to
    ``tx.update(grads, opt_state, params, **kwargs)``, so ``grad_fn=`` reaches the integrator; build
    it with :func:`make_grad_fn` or let :func:`train_step` do it. Ranks change within each factor's
    capacity without changing any shape; :func:`fit_capacity` changes the capacities of the model
    and of this optimiser's state together. ``optimizer.tx`` is ``tx`` with the ``init`` wrapped.

    Args:
        model: the NNX model.
        tx: an optax transform, e.g. ``dlrt_jax.bug(optax.adam(1e-3), tau=0.09)``.
        wrt: the filter of the trained variables (default ``nnx.Param``, which includes
            :class:`LowRankParam`).
        **kwargs: passed to ``nnx.Optimizer`` (e.g. ``graph`` on flax versions that have it).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, make_grad_fn
        >>> model = LowRankLinear(12, 10, rank=3, capacity=5, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1))
        >>> jax.tree.map(jnp.shape, nnx.as_pure(optimizer.opt_state).factors["kernel"].S[0].mu)
        (5, 5)
        >>> batch = jax.random.normal(jax.random.key(1), (32, 12))
        >>> loss_fn = lambda m, x: jnp.mean((m(x) - x[:, :10]) ** 2)
        >>> grads = nnx.grad(loss_fn)(model, batch)
        >>> _ = optimizer.update(model, grads, grad_fn=make_grad_fn(model, loss_fn, batch))
        >>> int(optimizer.step[...])
        1
    """

    def __init__(
        self, model: Any, tx: optax.GradientTransformation, *, wrt: Any = nnx.Param, **kwargs
    ):
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"`tx` must be an optax GradientTransformation, got {type(tx).__name__}."
            )
        super().__init__(model, _pure_init(tx), wrt=wrt, **kwargs)


def _check_optimizer(optimizer: Any, where: str) -> None:
    """Reject an ``nnx.Optimizer`` whose state holds a whole subtree in one ``Variable``."""
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"{where}: `optimizer` must be an nnx.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(optimizer, DLRTOptimizer):
        return
    variables = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for v in variables:
        if isinstance(v, nnx.Variable):
            value = v.get_value()
            if value is not None and not isinstance(value, jax.Array | np.ndarray | numbers.Number):
                raise TypeError(
                    f"{where}: this nnx.Optimizer holds a {type(value).__name__} in one optimiser "
                    "Variable (the state of a LowRank factor), which its update cannot keep "
                    "intact. "
                    "Build it as dlrt_jax.nnx.DLRTOptimizer(model, tx, wrt=...) instead."
                )


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
) -> jax.Array:
    """One training step of ``model`` through ``optimizer``; returns the loss before the step.

    Computes the loss and gradient with ``nnx.value_and_grad`` over ``optimizer.wrt`` and calls
    ``optimizer.update(model, grads, grad_fn=...)`` with :func:`make_grad_fn`'s ``grad_fn`` when
    ``optimizer.tx`` accepts extra arguments (every DLRT transform does; :func:`dlrt_jax.bug` and
    :func:`dlrt_jax.projector_splitting` need it, :func:`dlrt_jax.parallel_bug` ignores it), plain
    ``optimizer.update(model, grads)`` otherwise. Works eagerly and under ``nnx.jit`` (make
    ``loss_fn`` static or bind it with ``functools.partial``). Rank changes within the capacity
    keep all shapes, so the jitted step compiles once per set of capacities.

    Under ``nnx.jit`` the traced computation is the functional step's (``dlrt_jax.train_mnist``
    ``make_step``: the same XLA program, plus the step counter); what ``nnx.jit`` adds per call is
    the host-side walk over the model's and the optimiser's graphs (about 3 ms for the
    784-500x4-10 MLP with ``bug`` and Adam on a busy CPU, most of it the optimiser state).
    ``nnx.jit(..., graph=False)`` (tree mode, no shared ``Variable`` references) or
    ``nnx.cached_partial`` cut it to about 0.6 / 1.4 ms. The step's cost follows the capacities:
    shrink them with :func:`apply_capacity_policy` or :func:`fit_capacity` once the rank has
    dropped.

    Examples:
        >>> import functools, jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, train_step
        >>> model = LowRankLinear(12, 10, rank=4, capacity=5, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1))
        >>> x = jax.random.normal(jax.random.key(1), (32, 12))
        >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
        >>> step = nnx.jit(functools.partial(train_step, loss_fn=loss_fn))
        >>> losses = [float(step(model, optimizer, batch=(x, x[:, :10]))) for _ in range(20)]
        >>> losses[-1] < losses[0], 2 <= int(model.rank) <= 5
        (True, True)
    """
    _check_optimizer(optimizer, "train_step")
    wrt = optimizer.wrt
    grad_fn = make_grad_fn(model, loss_fn, batch, wrt=wrt)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
    if isinstance(optimizer.tx, optax.GradientTransformationExtraArgs):
        optimizer.update(model, grads, grad_fn=grad_fn)
    else:
        optimizer.update(model, grads)
    return loss


def fit_capacity(model: nnx.Module, optimizer: nnx.Optimizer, **kwargs: Any) -> None:
    """:func:`dlrt_jax.fit_capacity` for an NNX model and its ``nnx.Optimizer``, in place.

    Resizes the capacity of every factor in ``nnx.state(model, optimizer.wrt)`` to a bucket above
    its rank (``kwargs``: ``headroom``, ``multiple``, ``max_capacity``) and the ``K``/``L``/``S``
    optimiser moments in ``optimizer.opt_state`` with it, then writes both back; ``W`` is unchanged
    and training continues with the same optimiser. Call it outside ``jit`` (say every epoch); a
    jitted step recompiles once for the new shapes.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, fit_capacity
        >>> model = LowRankLinear(64, 64, rank=3, capacity=32, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.parallel_bug(optax.adam(1e-3), tau=0.1))
        >>> fit_capacity(model, optimizer, headroom=2.0, multiple=4)
        >>> model.capacity, int(model.rank), model.kernel.get_value().U.shape
        (8, 3, (64, 8))
    """
    _check_optimizer(optimizer, "fit_capacity")
    params, opt_state = _pure_states(model, optimizer)
    new_params, new_opt_state = _fit_capacity(params, opt_state, **kwargs)
    _write_back(model, optimizer, new_params, new_opt_state)


def _pure_states(model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[Any, Any]:
    """``(params, opt_state)`` as pure trees: ``LowRank`` / array leaves, no ``Variable``."""
    return nnx.as_pure(nnx.state(model, optimizer.wrt)), nnx.as_pure(optimizer.opt_state)


def _write_back(model: nnx.Module, optimizer: nnx.Optimizer, params: Any, opt_state: Any) -> None:
    """Write pure ``params`` / ``opt_state`` (new shapes allowed) into the model and optimiser."""
    nnx.update(model, params)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))


def apply_capacity_policy(
    policy: Callable[[int, Any, Any], tuple[Any, Any, bool]],
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
) -> bool:
    """Apply a :class:`dlrt_jax.CapacityPolicy` to an NNX model and its optimiser, in place.

    Call it outside ``jit`` after every training step with the number of steps done so far
    (1-based, a Python int). It calls ``policy(step, params, opt_state)`` on the pure states
    ``nnx.as_pure(nnx.state(model, optimizer.wrt))`` and ``nnx.as_pure(optimizer.opt_state)`` and,
    when the policy resized, writes the new factors and optimiser moments back (as
    :func:`fit_capacity` does): ``W`` and the optimiser moments are kept exactly, only the
    capacities change, and a jitted step compiles once per distinct set of capacities (``jit``
    keeps every compiled step, so returning to a bucket visited before does not recompile). For a
    policy with an ``every`` attribute (a ``CapacityPolicy``) the steps that are not multiples of
    ``every`` return ``False`` at once, without reading any state or syncing with the device.

    Args:
        policy: a :class:`dlrt_jax.CapacityPolicy`, or any callable with its signature
            ``(step, params, opt_state) -> (params, opt_state, resized)``.
        step: the number of training steps done (1-based).
        model: the NNX model.
        optimizer: its :class:`DLRTOptimizer`.

    Returns:
        Whether the capacities were changed.

    Examples:
        >>> import optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import DLRTOptimizer, LowRankLinear, apply_capacity_policy
        >>> model = LowRankLinear(64, 64, rank=3, capacity=32, rngs=nnx.Rngs(0))
        >>> optimizer = DLRTOptimizer(model, dlrt_jax.bug(optax.adam(1e-3), tau=0.1))
        >>> policy = dlrt_jax.CapacityPolicy(every=10, headroom=1.25, min_free=4, multiple=8)
        >>> apply_capacity_policy(policy, 5, model, optimizer)  # ranks not read at step 5
        False
        >>> apply_capacity_policy(policy, 10, model, optimizer)  # rank 3: capacity 32 -> 8
        True
        >>> model.capacity, int(model.rank), model.kernel.get_value().U.shape
        (8, 3, (64, 8))
        >>> apply_capacity_policy(policy, 20, model, optimizer)  # in its band: unchanged
        False
    """
    if not callable(policy):
        raise TypeError(
            "`policy` must be a dlrt_jax.CapacityPolicy or a callable (step, params, opt_state) "
            f"-> (params, opt_state, resized), got {type(policy).__name__}."
        )
    if not _is_int(step):
        try:
            step = int(step)  # e.g. a concrete jax scalar such as optimizer.step[...]
        except TypeError as e:
            raise TypeError(f"`step` must be an integer, got {type(step).__name__}.") from e
    every = getattr(policy, "every", None)
    if _is_int(every) and every >= 1 and step % every:
        return False  # nothing to read on this step (CapacityPolicy returns unchanged here)
    _check_optimizer(optimizer, "apply_capacity_policy")
    params, opt_state = _pure_states(model, optimizer)
    new_params, new_opt_state, resized = policy(step, params, opt_state)
    if not resized:
        return False
    _write_back(model, optimizer, new_params, new_opt_state)
    return True
