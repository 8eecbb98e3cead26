"""Framework-neutral low-rank layers: the dense and convolution maps, factor init, rank rule.

The Flax adapters (:mod:`dlrt_jax.nnx`, :mod:`dlrt_jax.linen`) and the MNIST models hold only
parameters and configuration; what a layer computes is here, on a :class:`~dlrt_jax.LowRank`
factor ``W = U S V^T`` (``out x in``; a convolution kernel ``(*kernel_size, in, out)`` is
matricised as ``W = kernel.reshape(-1, out).T``), through :func:`~dlrt_jax.lowrank_map` so that
``W`` is never formed and the gradients are the DLRT ones.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlrt_jax._factors import (
    LowRank,
    _check_int,
    _check_rank_value,
    _resolve_capacity,
    default_capacity,
    lowrank_map,
)

_STRING_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", "SAME_LOWER")


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _where(where: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ---- the rank rule ------------------------------------------------------------------------------


def rank_capacity(
    rank: int | None, capacity: int | None, shape: tuple[int, int], where: str
) -> tuple[int, int]:
    """``(rank, capacity)`` of a new ``n x m`` factor: the one rule of every layer.

    ``capacity`` defaults to ``max(floor(min(n, m) / 2), rank)`` (:func:`dlrt_jax.default_capacity`,
    raised to an explicit larger ``rank``), ``rank`` to the capacity; both must lie in
    ``[1, min(n, m)]`` and ``rank <= capacity``.
    """
    limit = min(shape)
    if rank is not None:
        rank = _where(where, _check_int, rank, "rank", 1, limit, upper=f"min(n, m)={limit}")
    if capacity is None and rank is not None:
        capacity = max(default_capacity(shape), rank)
    capacity = _where(where, _resolve_capacity, capacity, shape)
    rank = capacity if rank is None else rank
    _where(where, _check_rank_value, rank, capacity)
    return int(rank), capacity


# ---- initialisation -----------------------------------------------------------------------------


def check_kernel_init(kernel_init: Any) -> None:
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


def init_factor(
    kernel_init: Any,
    key: jax.Array,
    kernel_shape: tuple[int, ...],
    rank: int,
    capacity: int,
    param_dtype: Any,
) -> LowRank:
    """The initial factor of a layer whose dense kernel has shape ``kernel_shape`` (``..., out``).

    ``kernel_init``: ``None`` (the paper's: orthonormal ``U``, ``V``, sorted ``|N(0, 1)|``
    singular values), a positive float scaling those, or ``init(key, kernel_shape, dtype)``
    returning the dense kernel (truncated by SVD to ``rank``) or a ``LowRank``.
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
        return cast(out, param_dtype)
    out = jnp.asarray(out)
    if out.shape != tuple(kernel_shape):
        raise ValueError(
            f"`kernel_init` returned an array of shape {out.shape}; expected the dense kernel "
            f"shape {tuple(kernel_shape)} (or a LowRank)."
        )
    W = out.reshape(m, n).T
    return cast(LowRank.from_dense(W, rank=rank, capacity=capacity), param_dtype)


def cast(lr: LowRank, dtype: Any) -> LowRank:
    """``lr`` with ``U``, ``S``, ``V`` in ``dtype`` (the rank stays float32); differentiable."""
    if lr.dtype == jnp.dtype(dtype):
        return lr
    U, S, V, rank = jax.tree.leaves(lr)
    return jax.tree.unflatten(jax.tree.structure(lr), [*(a.astype(dtype) for a in (U, S, V)), rank])


# ---- configuration ------------------------------------------------------------------------------


def check_features(**features: Any) -> None:
    for name, v in features.items():
        if not (is_int(v) and v >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")


def check_groups(feature_group_count: Any, where: str) -> None:
    if feature_group_count != 1:
        raise ValueError(
            f"{where} supports only `feature_group_count=1` (a grouped convolution has no single "
            f"kernel matrix to factorise), got {feature_group_count!r}."
        )


def _as_tuple(x: Any, k: int, name: str) -> tuple[int, ...]:
    x = 1 if x is None else x  # nnx.Conv accepts None as "1"
    out = (x,) * k if is_int(x) else tuple(x)
    if len(out) != k or not all(is_int(a) and a >= 1 for a in out):
        raise ValueError(
            f"`{name}` must be a positive integer or a sequence of {k} positive integers, "
            f"got {x!r}."
        )
    return tuple(int(a) for a in out)


def _padding(padding: Any, k: int) -> str | tuple[tuple[int, int], ...]:
    """A padding string, or ``k`` ``(low, high)`` pairs (hashable)."""
    if isinstance(padding, str):
        if padding not in _STRING_PADDINGS:
            raise ValueError(
                f"`padding` must be one of {_STRING_PADDINGS} or explicit, got {padding!r}."
            )
        if padding == "CAUSAL" and k != 1:
            raise ValueError("`padding='CAUSAL'` is only implemented for 1-D convolutions.")
        return padding
    pairs = [padding] * k if is_int(padding) else list(padding) if _is_seq(padding) else []
    pairs = [(p, p) if is_int(p) else tuple(p) if _is_seq(p) else () for p in pairs]
    if len(pairs) != k or not all(len(p) == 2 and all(map(is_int, p)) for p in pairs):
        raise ValueError(
            f"`padding` must be a string, an int, or a sequence of {k} ints or (low, high) "
            f"pairs, got {padding!r}."
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _is_seq(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str)


def hashable(x: Any) -> Any:
    """``x`` with lists turned into tuples, recursively (a precision setting as a static value)."""
    return tuple(hashable(a) for a in x) if isinstance(x, list | tuple) else x


def path_str(path: tuple) -> str:
    """A module path as the summaries and error messages print it: ``'block/fc1'``, ``'<root>'``."""
    return "/".join(str(p) for p in path) or "<root>"


#: The default bias initialiser of every layer (what ``flax``'s ``zeros_init()`` returns).
zeros_init = jax.nn.initializers.zeros


class FactorAccessors:
    """``factor``, ``rank``, ``capacity`` of a layer whose variable ``_factor_name`` (default
    ``'kernel'``) holds a :class:`~dlrt_jax.LowRank` factor."""

    _factor_name = "kernel"

    @property
    def factor(self) -> LowRank:
        """The :class:`~dlrt_jax.LowRank` ``W = U S V^T`` of the kernel (out x in)."""
        return getattr(self, self._factor_name).get_value()

    @property
    def rank(self) -> jax.Array:
        """The active rank (an int32 scalar array; ``int(layer.rank)`` outside ``jit``)."""
        return self.factor.active_rank

    @property
    def capacity(self) -> int:
        """The static capacity ``c`` (changes only through ``fit_capacity``)."""
        return self.factor.capacity


# ---- the maps -----------------------------------------------------------------------------------


def promote(x: jax.Array, lr: LowRank, bias: jax.Array | None, dtype: Any):
    """Cast inputs, factor and bias to ``dtype`` (default: their common result type)."""
    x = jnp.asarray(x)
    if dtype is None:
        dtype = jnp.result_type(x.dtype, lr.dtype, *(() if bias is None else (bias.dtype,)))
    return x.astype(dtype), cast(lr, dtype), None if bias is None else bias.astype(dtype)


@dataclasses.dataclass(frozen=True)
class DensePhi:
    """``phi(x, V) = x @ V`` at a matmul precision (hashable, equal by value)."""

    precision: Any = None

    def __call__(self, x: jax.Array, V: jax.Array) -> jax.Array:
        return jnp.matmul(x, V, precision=self.precision)


def dense(lr: LowRank, bias, x, *, dtype: Any = None, precision: Any = None) -> jax.Array:
    """``x W^T + b`` over the last axis: ``((x V) S^T) U^T + b``."""
    x, lr, bias = promote(x, lr, bias, dtype)
    if x.ndim < 1 or x.shape[-1] != lr.shape[1]:
        raise ValueError(
            f"Input's last axis must have size in_features={lr.shape[1]}, got input shape "
            f"{x.shape}."
        )
    y = lowrank_map(lr, x, DensePhi(hashable(precision)))
    return y if bias is None else y + bias


@dataclasses.dataclass(frozen=True)
class ConvPhi:
    """``phi(x, V)``: the channels-last convolution of ``x`` with the columns of ``V`` as filters.

    ``x`` is ``(N, *spatial, in)``; ``V`` (``prod(kernel_size) * in, c``) is reshaped to the
    kernel ``(*kernel_size, in, c)``. ``padding`` as ``nnx.Conv`` (``'CIRCULAR'``, ``'REFLECT'``
    and ``'CAUSAL'`` pad ``x`` first). A hashable value: equal configurations give equal ``phi``
    for :func:`~dlrt_jax.lowrank_map` (a static argument). Build it with :meth:`make`.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    precision: Any = None

    @classmethod
    def make(
        cls,
        kernel_size: int | Sequence[int],
        strides: Any = 1,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        precision: Any = None,
    ) -> ConvPhi:
        """Validate and normalise ``nnx.Conv``-style arguments (ints become tuples)."""
        ks = (kernel_size,) if is_int(kernel_size) else tuple(kernel_size)
        if not ks or not all(is_int(a) and a >= 1 for a in ks):
            raise ValueError(f"`kernel_size` must be positive integers, got {kernel_size!r}.")
        k = len(ks)
        return cls(
            tuple(int(a) for a in ks),
            _as_tuple(strides, k, "strides"),
            _padding(padding, k),
            _as_tuple(input_dilation, k, "input_dilation"),
            _as_tuple(kernel_dilation, k, "kernel_dilation"),
            hashable(precision),
        )

    @classmethod
    def of(cls, layer: Any) -> ConvPhi:
        """:meth:`make` from a layer's attributes of the same names (an ``nnx``/``linen`` conv)."""
        return cls.make(*(getattr(layer, f.name) for f in dataclasses.fields(cls)))

    def __call__(self, x: jax.Array, V: jax.Array) -> jax.Array:
        pad = self.padding
        if pad in ("CIRCULAR", "REFLECT"):
            sizes = [(kk - 1) * d + 1 for kk, d in zip(self.kernel_size, self.kernel_dilation)]
            pads = [(0, 0), *(((s - 1) // 2, s // 2) for s in sizes), (0, 0)]
            x, pad = jnp.pad(x, pads, mode="wrap" if pad == "CIRCULAR" else "reflect"), "VALID"
        elif pad == "CAUSAL":
            left = self.kernel_dilation[0] * (self.kernel_size[0] - 1)
            x, pad = jnp.pad(x, [(0, 0), (left, 0), (0, 0)]), "VALID"
        kernel = V.reshape(*self.kernel_size, x.shape[-1], V.shape[-1])
        nd = x.ndim
        lhs = (0, nd - 1, *range(1, nd - 1))  # N, C, spatial
        rhs = (nd - 1, nd - 2, *range(nd - 2))  # O, I, spatial
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            self.strides,
            pad,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=jax.lax.ConvDimensionNumbers(lhs, rhs, lhs),
            precision=self.precision,
        )


def conv(lr: LowRank, bias, x, phi: ConvPhi, *, dtype: Any = None) -> jax.Array:
    """The low-rank convolution ``phi(x, V) S^T U^T + b`` (any number of batch axes)."""
    x, lr, bias = promote(x, lr, bias, dtype)
    k = len(phi.kernel_size)
    in_features = lr.shape[1] // int(np.prod(phi.kernel_size))
    if x.ndim < k + 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"Input must have shape (*batch, {k} spatial axes, in_features={in_features}), got "
            f"{x.shape}."
        )
    batch_shape = x.shape[: x.ndim - k - 1]
    y = lowrank_map(lr, x.reshape(-1, *x.shape[len(batch_shape) :]), phi)
    y = y if bias is None else y + bias
    return y.reshape(*batch_shape, *y.shape[1:])
