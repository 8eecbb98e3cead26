"""Low-rank ``nnx.LinearGeneral`` and ``nnx.Einsum``: the projections of a Flax transformer.

A general linear layer contracts a group of input axes with a kernel and produces a group of
output axes. Read as a matrix it is ``W`` (``n x m``, out x in) with ``m`` the product of the
contracted sizes and ``n`` the product of the output sizes (the *matricisation*); the kernel is
``W^T`` reshaped (for ``nnx.Einsum`` after moving the contracted kernel axes first). The layers
here store ``W`` as one :class:`~dlrt_jax.LowRank` in a :class:`~dlrt_jax.nnx.LowRankParam` and
apply it through :func:`~dlrt_jax.lowrank_map`: the input's contracted axes are flattened to one
axis of size ``m``, the factor is applied (``W`` never formed) and the result is reshaped to the
output axes. The custom VJP of the factor is kept, so ``jax.grad`` gives the integrators the
projected gradients ``G V``, ``U^T G V``, ``G^T U`` of the matricised ``G = dL/dW``.

* :class:`LowRankLinearGeneral`: drop-in for ``nnx.LinearGeneral`` (no ``batch_axis``); the
  ``query`` / ``key`` / ``value`` (``in -> (heads, head_dim)``) and ``out``
  (``(heads, head_dim) -> out``, ``axis=(-2, -1)``) projections of ``nnx.MultiHeadAttention``.
* :class:`LowRankEinsum`: drop-in for an ``nnx.Einsum`` whose equation is a matrix product (every
  kernel axis is either contracted with the input or kept in the output).
* :func:`matricise` says whether and how a layer is a matrix (or why not):
  :func:`dlrt_jax.nnx.to_low_rank` uses it to convert these layers and to name the layers it
  leaves alone, and :mod:`dlrt_jax.adapters` to put adapters on them. This module registers its
  converter with :func:`dlrt_jax.nnx.register_converter` when imported (``dlrt_jax.nnx``
  imports it); it imports the NNX implementation modules, never :mod:`dlrt_jax.nnx` itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._factors import LowRank, lowrank_map
from dlrt_jax._nnx.conversion import ConversionRequest, register_converter
from dlrt_jax._nnx.layers import ConvertedLayer, Fit, LowRankLayer, fit_rank

__all__ = [
    "LowRankEinsum",
    "LowRankLinearGeneral",
    "Matricisation",
    "NotConvertible",
    "matricise",
]


# ---- matricisations ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EinsumPhi:
    """``phi(x, V) = einsum(lhs, x, V reshaped to (*contracted dims, c))`` (hashable)."""

    equation: str
    contracted_dims: tuple[int, ...]
    precision: Any = None

    def __call__(self, x: jax.Array, V: jax.Array) -> jax.Array:
        kernel = V.reshape(*self.contracted_dims, V.shape[-1])
        return jnp.einsum(self.equation, x, kernel, precision=self.precision)


@dataclasses.dataclass(frozen=True)
class Matricisation:
    """How a general linear layer's kernel is a matrix ``W`` (``n x m``, out x in).

    Built by :func:`matricise`. ``to_matrix(kernel)`` gives ``W``, ``to_kernel(W)`` the kernel
    back, ``apply(factor, x)`` the layer's output without bias for ``W`` given as a
    :class:`~dlrt_jax.LowRank` (through :func:`~dlrt_jax.lowrank_map`, ``W`` never formed) and
    ``apply_dense(W, x)`` the same for a dense ``W``.

    Attributes:
        kind: ``'axes'`` (``nnx.Linear`` / ``nnx.LinearGeneral``: contracted axes ``axis`` of the
            input, kernel ``(*in_features, *out_features)``) or ``'einsum'``.
        kernel_shape: the dense kernel's shape.
        n: rows of ``W`` (product of the output feature sizes).
        m: columns of ``W`` (product of the contracted sizes).
    """

    kind: str
    kernel_shape: tuple[int, ...]
    n: int
    m: int
    axis: tuple[int, ...] = ()  # 'axes': the contracted input axes, in kernel order
    in_features: tuple[int, ...] = ()
    out_features: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()  # 'einsum': kernel axes, contracted first, then kept
    phi_equation: str = ""  # 'einsum': input x kernel(contracted, Z) -> free + Z
    out_equation: str = ""  # 'einsum': free + kept -> output order
    kept_dims: tuple[int, ...] = ()
    contracted_dims: tuple[int, ...] = ()
    bias_dims: tuple[Any, ...] = ()  # 'einsum': output tokens ('...' or the kernel dim or 1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``."""
        return (self.n, self.m)

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """``W`` (``n x m``) of a dense kernel."""
        kernel = jnp.asarray(kernel)
        if self.kind == "einsum":
            kernel = jnp.transpose(kernel, self.perm)
        return kernel.reshape(self.m, self.n).T

    def to_kernel(self, W: jax.Array) -> jax.Array:
        """The dense kernel of ``W`` (inverse of :meth:`to_matrix`)."""
        W = jnp.asarray(W)
        if self.kind == "einsum":
            k = W.T.reshape(*self.contracted_dims, *self.kept_dims)
            return jnp.transpose(k, np.argsort(self.perm))
        return W.T.reshape(self.kernel_shape)

    def _flatten(self, x: jax.Array) -> jax.Array:
        """``x`` with the contracted axes moved last and flattened (``'axes'`` only)."""
        nd = x.ndim
        axis = tuple(a % nd for a in self.axis)
        sizes = tuple(x.shape[a] for a in axis)
        if nd < len(axis) or sizes != self.in_features:
            raise ValueError(
                f"Input axes {self.axis} must have sizes in_features={self.in_features}, got input "
                f"shape {x.shape}."
            )
        k = len(axis)
        x = jnp.moveaxis(x, axis, tuple(range(nd - k, nd)))
        return x.reshape(*x.shape[: nd - k], self.m)

    def apply(self, factor: LowRank, x: jax.Array, precision: Any = None) -> jax.Array:
        """``x`` times ``W^T`` in the layer's layout, ``W = U S V^T`` (no bias)."""
        if self.kind == "einsum":
            phi = _EinsumPhi(self.phi_equation, self.contracted_dims, _layers.hashable(precision))
            y = lowrank_map(factor, x, phi)
            return self._unflatten_einsum(y)
        y = lowrank_map(factor, self._flatten(x), _layers.DensePhi(_layers.hashable(precision)))
        return y.reshape(*y.shape[:-1], *self.out_features)

    def apply_dense(self, W: jax.Array, x: jax.Array, precision: Any = None) -> jax.Array:
        """``x`` times a dense ``W^T`` in the layer's layout (no bias)."""
        if self.kind == "einsum":
            kernel = W.T.reshape(*self.contracted_dims, W.shape[0])
            z = jnp.einsum(self.phi_equation, x, kernel, precision=precision)
            return self._unflatten_einsum(z)
        y = jnp.matmul(self._flatten(x), W.T, precision=precision)
        return y.reshape(*y.shape[:-1], *self.out_features)

    def _unflatten_einsum(self, y: jax.Array) -> jax.Array:
        y = y.reshape(*y.shape[:-1], *self.kept_dims)
        return jnp.einsum(self.out_equation, y)

    def bias_shape(self, out_ndim: int) -> tuple[int, ...]:
        """The shape that broadcasts an ``nnx.Einsum`` bias over an output of ``out_ndim`` axes."""
        shape: list[int] = []
        for d in self.bias_dims:
            if d == "...":
                shape.extend([1] * (out_ndim - (len(self.bias_dims) - 1)))
            else:
                shape.append(d)
        return tuple(shape)


class NotConvertible(ValueError):
    """Raised by :func:`matricise` for a layer that is not one matrix product; says why."""


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Sequence) and not isinstance(x, str) else (x,)


def _axes_matricisation(in_features, out_features, axis) -> Matricisation:
    in_features = tuple(int(a) for a in _tuple(in_features))
    out_features = tuple(int(a) for a in _tuple(out_features))
    axis = tuple(int(a) for a in _tuple(axis))
    if len(axis) != len(in_features):
        raise ValueError(f"`axis` {axis} must have one entry per input feature axis {in_features}.")
    if not all(a >= 1 for a in (*in_features, *out_features)):
        raise ValueError(
            f"Feature sizes must be positive, got in {in_features} and out {out_features}."
        )
    return Matricisation(
        "axes",
        (*in_features, *out_features),
        math.prod(out_features),
        math.prod(in_features),
        axis=axis,
        in_features=in_features,
        out_features=out_features,
    )


def _tokens(spec: str) -> list[str]:
    out, i = [], 0
    while i < len(spec):
        if spec.startswith("...", i):
            out.append("...")
            i += 3
        else:
            out.append(spec[i])
            i += 1
    return out


def _einsum_matricisation(equation: str, kernel_shape: tuple[int, ...]) -> Matricisation:
    """The matricisation of ``einsum(equation, x, kernel)``, or :class:`NotConvertible`."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise NotConvertible(f"einsum {equation!r} is not an explicit two-operand equation")
    operands, out = eq.split("->")
    lhs, rhs = (_tokens(s) for s in operands.split(","))
    out_t = _tokens(out)
    if "..." in rhs:
        raise NotConvertible(f"einsum {equation!r}: the kernel has an ellipsis")
    for name, toks in (("input", lhs), ("kernel", rhs), ("output", out_t)):
        letters = [t for t in toks if t != "..."]
        if len(set(letters)) != len(letters):
            raise NotConvertible(f"einsum {equation!r}: repeated index in the {name} (a trace)")
    if len(rhs) != len(kernel_shape):
        raise NotConvertible(
            f"einsum {equation!r}: the kernel has {len(kernel_shape)} axes, the equation {len(rhs)}"
        )
    batched = [t for t in rhs if t in lhs and t in out_t]
    if batched:
        raise NotConvertible(
            f"einsum {equation!r}: kernel index {''.join(batched)!r} is in the input and the "
            "output (a batch of matrices, one per index, not one matrix)"
        )
    summed = [t for t in rhs if t not in lhs and t not in out_t]
    if summed:
        raise NotConvertible(f"einsum {equation!r}: kernel index {''.join(summed)!r} is summed")
    dropped = [t for t in lhs if t != "..." and t not in rhs and t not in out_t]
    if dropped:
        raise NotConvertible(f"einsum {equation!r}: input index {''.join(dropped)!r} is summed")
    contracted = [t for t in rhs if t in lhs]
    kept = [t for t in rhs if t not in lhs]
    if not contracted or not kept:
        raise NotConvertible(
            f"einsum {equation!r}: needs both contracted and output kernel axes to be a matrix"
        )
    dims = dict(zip(rhs, kernel_shape, strict=True))
    free = [t for t in lhs if t not in contracted]
    used = set("".join(t for t in (*lhs, *rhs, *out_t) if t != "..."))
    z = next(ch for ch in "ZYXWVzyxwvQRSTqrst" if ch not in used)
    free_s = "".join(free)
    bias_dims = tuple("..." if t == "..." else dims.get(t, 1) for t in out_t)
    return Matricisation(
        "einsum",
        tuple(int(d) for d in kernel_shape),
        math.prod(dims[t] for t in kept),
        math.prod(dims[t] for t in contracted),
        perm=tuple(rhs.index(t) for t in (*contracted, *kept)),
        phi_equation=f"{''.join(lhs)},{''.join(contracted)}{z}->{free_s}{z}",
        out_equation=f"{free_s}{''.join(kept)}->{''.join(out_t)}",
        kept_dims=tuple(int(dims[t]) for t in kept),
        contracted_dims=tuple(int(dims[t]) for t in contracted),
        bias_dims=bias_dims,
    )


def _check_plain(layer: Any, cls: type, name: str) -> None:
    if type(layer) is not cls:
        raise NotConvertible(
            f"a subclass of nnx.{name} ({type(layer).__name__}); its call may differ from the "
            "plain layer's"
        )
    if getattr(layer, "dot_general", None) not in (None, jax.lax.dot_general):
        raise NotConvertible(f"nnx.{name} with a custom `dot_general`")
    for attr in ("dot_general_cls", "preferred_element_type"):
        if getattr(layer, attr, None) is not None:
            raise NotConvertible(f"nnx.{name} with a custom `{attr}`")
    if getattr(layer, "einsum_op", jnp.einsum) is not jnp.einsum:
        raise NotConvertible(f"nnx.{name} with a custom `einsum_op`")
    promote = getattr(layer, "promote_dtype", None)
    if promote is not None and promote is not nnx.nn.dtypes.promote_dtype:
        raise NotConvertible(f"nnx.{name} with a custom `promote_dtype`")


_NOT_MATRICES = {
    "Embed": "an embedding (a table lookup, not a matrix product)",
    "LayerNorm": "a normalisation layer (elementwise scale and bias)",
    "RMSNorm": "a normalisation layer (elementwise scale)",
    "BatchNorm": "a normalisation layer (elementwise scale and bias)",
    "GroupNorm": "a normalisation layer (elementwise scale and bias)",
    "InstanceNorm": "a normalisation layer (elementwise scale and bias)",
}


def not_a_matrix_reason(layer: Any) -> str | None:
    """Why a common Flax layer with parameters is not a matrix product, or ``None``."""
    return (
        _NOT_MATRICES.get(type(layer).__name__)
        if type(layer).__module__.startswith("flax.")
        else None
    )


def matricise(layer: Any) -> Matricisation:
    """The :class:`Matricisation` of an ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum``.

    Raises :class:`NotConvertible` (a ``ValueError``) with the reason for a layer that is not one
    matrix product: an ``nnx.LinearGeneral`` with ``batch_axis`` (one matrix per batch index), an
    ``nnx.Einsum`` whose equation keeps a kernel index in the output *and* the input (per-head
    matrices), sums a kernel index, or comes only at call time; custom ``dot_general`` /
    ``einsum_op`` / ``promote_dtype`` / ``preferred_element_type``; subclasses; and every other
    layer type (``nnx.Embed``, norms, ...).

    Examples:
        >>> from flax import nnx
        >>> from dlrt_jax.transformer import matricise
        >>> q = nnx.LinearGeneral(16, (2, 8), rngs=nnx.Rngs(0))  # a query projection
        >>> matricise(q).shape  # W is (2 * 8) x 16
        (16, 16)
        >>> o = nnx.LinearGeneral((2, 8), 12, axis=(-2, -1), rngs=nnx.Rngs(0))
        >>> matricise(o).shape
        (12, 16)
        >>> e = nnx.Einsum("btd,ndh->btnh", (2, 16, 8), rngs=nnx.Rngs(0))
        >>> matricise(e).shape
        (16, 16)
    """
    if isinstance(layer, nnx.Linear):
        _check_plain(layer, nnx.Linear, "Linear")
        return _axes_matricisation(layer.in_features, layer.out_features, -1)
    if isinstance(layer, nnx.LinearGeneral):
        _check_plain(layer, nnx.LinearGeneral, "LinearGeneral")
        if layer.batch_axis:
            raise NotConvertible(
                "nnx.LinearGeneral with `batch_axis` (one kernel matrix per batch index, not one "
                "matrix)"
            )
        return _axes_matricisation(layer.in_features, layer.out_features, layer.axis)
    if isinstance(layer, nnx.Einsum):
        _check_plain(layer, nnx.Einsum, "Einsum")
        if layer.einsum_str is None:
            raise NotConvertible("nnx.Einsum whose equation is given only at call time")
        return _einsum_matricisation(layer.einsum_str, tuple(layer.kernel_shape))
    reason = not_a_matrix_reason(layer)
    raise NotConvertible(reason or f"{type(layer).__name__} is not a (general) linear layer")


# ---- layers --------------------------------------------------------------------------------------


def _matricised_init(kernel_init: Any, mat: Matricisation) -> Any:
    """``kernel_init`` for :meth:`~dlrt_jax.nnx.LowRankLayer._init_params` on the matrix ``W^T``
    (``m x n``): a callable is called with the general kernel shape and its result matricised;
    ``None``, a scale or an invalid value pass through (the shared init checks them)."""
    if not callable(kernel_init):
        return kernel_init

    def init(key, _shape, dtype):
        out = kernel_init(key, mat.kernel_shape, dtype)
        if isinstance(out, LowRank):
            return out
        out = jnp.asarray(out)
        if out.shape != mat.kernel_shape:
            raise ValueError(
                f"`kernel_init` returned an array of shape {out.shape}; expected the dense "
                f"kernel shape {mat.kernel_shape} (or a LowRank)."
            )
        return mat.to_matrix(out).T

    return init


def _constrain(y: jax.Array, out_sharding: Any) -> jax.Array:
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class LowRankLinearGeneral(LowRankLayer):
    r"""A low-rank drop-in for ``nnx.LinearGeneral`` (without ``batch_axis``).

    The kernel ``(*in_features, *out_features)`` is the matrix ``W^T`` reshaped, ``W`` being
    ``prod(out_features) x prod(in_features)``, stored as a :class:`~dlrt_jax.LowRank` in the
    :class:`~dlrt_jax.nnx.LowRankParam` ``kernel``. The call moves the input's ``axis`` to the end,
    flattens them, applies ``U (S (V^T x))`` and reshapes to ``out_features``: the output layout of
    ``nnx.LinearGeneral`` (the input's other axes in order, then ``out_features``). Train it with
    the DLRT transforms as :class:`dlrt_jax.nnx.LowRankLinear`.

    Args:
        in_features: an int or a tuple, the sizes of the contracted input axes.
        out_features: an int or a tuple.
        axis: the contracted input axes (as ``nnx.LinearGeneral``; default ``-1``).
        rank: as :class:`dlrt_jax.nnx.LowRankLinear`, with ``n = prod(out_features)`` and
            ``m = prod(in_features)``.
        capacity: as :class:`dlrt_jax.nnx.LowRankLinear`.
        use_bias: as :class:`dlrt_jax.nnx.LowRankLinear`.
        dtype: as :class:`dlrt_jax.nnx.LowRankLinear`.
        param_dtype: as :class:`dlrt_jax.nnx.LowRankLinear`.
        precision: as :class:`dlrt_jax.nnx.LowRankLinear`.
        bias_init: as :class:`dlrt_jax.nnx.LowRankLinear`.
        rngs: as :class:`dlrt_jax.nnx.LowRankLinear`.
        kernel_init: ``None`` (paper initialisation), a positive float (scale of the singular
            values), or a callable ``init(key, shape, dtype)`` returning the dense kernel of
            shape ``(*in_features, *out_features)`` (truncated by SVD to ``rank``) or a
            ``LowRank`` of shape ``(n, m)`` and the layer's capacity.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.transformer import LowRankLinearGeneral
        >>> q = LowRankLinearGeneral(16, (2, 8), rank=4, rngs=nnx.Rngs(0))  # in -> (heads, dim)
        >>> w = q.kernel.get_value()  # W is 16 x 16
        >>> w.U.shape, w.V.shape, q.bias.shape, q.capacity
        ((16, 8), (16, 8), (2, 8), 8)
        >>> q(jnp.ones((3, 5, 16))).shape
        (3, 5, 2, 8)
        >>> out = LowRankLinearGeneral((2, 8), 12, axis=(-2, -1), rank=4, rngs=nnx.Rngs(0))
        >>> out(jnp.ones((3, 5, 2, 8))).shape
        (3, 5, 12)
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        rank: int | None = None,
        capacity: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = None,
        bias_init: Callable = _layers.zeros_init,
        rngs: nnx.Rngs,
    ):
        mat = _axes_matricisation(in_features, out_features, axis)
        self._init_params(
            (mat.m, mat.n),
            rank,
            capacity,
            _matricised_init(kernel_init, mat),
            mat.out_features if use_bias else None,
            bias_init,
            param_dtype,
            rngs,
        )
        self.in_features = mat.in_features
        self.out_features = mat.out_features
        self.axis = mat.axis
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.matricisation = mat

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """The layer applied to ``inputs`` (contracted axes ``self.axis``).

        ``out_sharding`` (as ``nnx.LinearGeneral``; ``nnx.MultiHeadAttention`` passes it) is
        applied to the output as a sharding constraint.
        """
        bias = self.bias[...] if self.bias is not None else None
        x, lr, bias = _layers.promote(inputs, self.factor, bias, self.dtype)
        y = self.matricisation.apply(lr, x, self.precision)
        return _constrain(y if bias is None else y + bias, out_sharding)

    def as_dense_layer(self) -> nnx.LinearGeneral:
        """The ``nnx.LinearGeneral`` with the kernel of ``W = U S V^T`` (formed) and this layer's
        bias and configuration: it computes what this layer computes."""
        return nnx.LinearGeneral(
            self.in_features,
            self.out_features,
            axis=self.axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            **self._dense_init(self.matricisation.to_kernel),
        )

    @classmethod
    def from_linear_general(
        cls,
        layer: nnx.LinearGeneral,
        *,
        rank: int | None = None,
        tol: float | None = None,
        capacity: int | None = None,
    ) -> LowRankLinearGeneral:
        """A :class:`LowRankLinearGeneral` from the truncated SVD of ``layer``'s matricised kernel.

        Rank rules as :meth:`dlrt_jax.nnx.LowRankLinear.from_linear` (``rank``, or the smallest
        rank within the relative weight error ``tol``, or the capacity). Bias, dtypes and precision
        are copied. Raises :class:`NotConvertible` for a layer :func:`matricise` rejects.

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from dlrt_jax.transformer import LowRankLinearGeneral
            >>> dense = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
            >>> low = LowRankLinearGeneral.from_linear_general(dense, rank=4, capacity=4)
            >>> x = jnp.ones((5, 2, 3))
            >>> bool(jnp.allclose(low(x), dense(x), atol=1e-5))
            True
        """
        if not isinstance(layer, nnx.LinearGeneral):
            raise TypeError(f"`layer` must be an nnx.LinearGeneral, got {type(layer).__name__}.")
        return _from_layer(layer, rank, tol, capacity, "from_linear_general", cls=cls)[0]


class LowRankEinsum(LowRankLayer):
    r"""A low-rank drop-in for an ``nnx.Einsum`` whose equation is a matrix product.

    The kernel's axes split into *contracted* ones (also in the input) and *kept* ones (in the
    output); ``W`` is ``prod(kept) x prod(contracted)`` and is stored as a
    :class:`~dlrt_jax.LowRank`. The call contracts the input with the ``c`` columns of ``V``
    reshaped to ``(*contracted dims, c)``, applies ``S^T U^T`` and reshapes the ``n`` outputs to
    the kept axes, in the equation's output order. Equations with a kernel index in both the
    input and the output (a batch of matrices) or a summed kernel index are refused (see
    :func:`matricise`). The equation is fixed at construction.

    Args:
        einsum_str: the equation ``'<input>,<kernel>-><output>'`` (ellipsis allowed in the input
            and output).
        kernel_shape: the dense kernel's shape.
        bias_shape: the bias's shape, or ``None`` for no bias (as ``nnx.Einsum``).
        rank: as :class:`LowRankLinearGeneral`.
        capacity: as :class:`LowRankLinearGeneral`.
        dtype: as :class:`LowRankLinearGeneral`.
        param_dtype: as :class:`LowRankLinearGeneral`.
        precision: as :class:`LowRankLinearGeneral`.
        kernel_init: as :class:`LowRankLinearGeneral`.
        bias_init: as :class:`LowRankLinearGeneral`.
        rngs: as :class:`LowRankLinearGeneral`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.transformer import LowRankEinsum
        >>> layer = LowRankEinsum("btd,ndh->btnh", (2, 16, 8), rank=4, rngs=nnx.Rngs(0))
        >>> layer.kernel.get_value().shape  # (2 * 8) x 16
        (16, 16)
        >>> layer(jnp.ones((3, 5, 16))).shape
        (3, 5, 2, 8)
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        rank: int | None = None,
        capacity: int | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = None,
        bias_init: Callable = _layers.zeros_init,
        rngs: nnx.Rngs,
    ):
        if not isinstance(einsum_str, str):
            raise TypeError(f"`einsum_str` must be a string, got {type(einsum_str).__name__}.")
        einsum_str = einsum_str.replace(" ", "")
        kernel_shape = tuple(int(d) for d in kernel_shape)
        mat = _einsum_matricisation(einsum_str, kernel_shape)
        self._init_params(
            (mat.m, mat.n),
            rank,
            capacity,
            _matricised_init(kernel_init, mat),
            None if bias_shape is None else tuple(bias_shape),
            bias_init,
            param_dtype,
            rngs,
        )
        self.einsum_str = einsum_str
        self.kernel_shape = kernel_shape
        self.bias_shape = None if bias_shape is None else tuple(bias_shape)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.matricisation = mat

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        """The layer applied to ``inputs``; ``einsum_str``, if given, must be the layer's own;
        ``out_sharding`` is applied to the output as a sharding constraint."""
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            raise ValueError(
                f"LowRankEinsum's equation is fixed at construction ({self.einsum_str!r}); got "
                f"{einsum_str!r} at call time."
            )
        bias = self.bias[...] if self.bias is not None else None
        x, lr, bias = _layers.promote(inputs, self.factor, bias, self.dtype)
        y = self.matricisation.apply(lr, x, self.precision)
        if bias is not None:
            y = y + bias.reshape(self.matricisation.bias_shape(y.ndim))
        return _constrain(y, out_sharding)

    def as_dense_layer(self) -> nnx.Einsum:
        """The ``nnx.Einsum`` with the kernel of ``W = U S V^T`` (formed) and this layer's bias
        and equation: it computes what this layer computes."""
        return nnx.Einsum(
            self.einsum_str,
            self.kernel_shape,
            self.bias_shape,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            **self._dense_init(self.matricisation.to_kernel),
        )

    @classmethod
    def from_einsum(
        cls,
        layer: nnx.Einsum,
        *,
        rank: int | None = None,
        tol: float | None = None,
        capacity: int | None = None,
    ) -> LowRankEinsum:
        """A :class:`LowRankEinsum` from the truncated SVD of ``layer``'s matricised kernel.

        Rank rules as :meth:`LowRankLinearGeneral.from_linear_general`; raises
        :class:`NotConvertible` when the equation is not a matrix product.

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from dlrt_jax.transformer import LowRankEinsum
            >>> dense = nnx.Einsum("bd,ndh->bnh", (2, 6, 3), (2, 3), rngs=nnx.Rngs(0))
            >>> low = LowRankEinsum.from_einsum(dense, rank=6, capacity=6)  # W is 6 x 6: exact
            >>> x = jnp.ones((4, 6))
            >>> bool(jnp.allclose(low(x), dense(x), atol=1e-5))
            True
        """
        if not isinstance(layer, nnx.Einsum):
            raise TypeError(f"`layer` must be an nnx.Einsum, got {type(layer).__name__}.")
        return _from_layer(layer, rank, tol, capacity, "from_einsum", cls=cls)[0]


# ---- conversion ----------------------------------------------------------------------------------


def _low_rank_layer(
    layer: Any, fit: Any, W: jax.Array | None = None, rngs: Any = None, cls: type | None = None
) -> Any:
    """The low-rank layer configured as ``layer``: the truncated SVD of ``W`` or, without ``W``,
    random factors from ``rngs``, at ``fit``'s rank and capacity."""
    if isinstance(layer, nnx.LinearGeneral):
        cls = cls or LowRankLinearGeneral
        args = (layer.in_features, layer.out_features)
        kw = dict(axis=layer.axis, use_bias=layer.bias is not None)
    else:
        cls = cls or LowRankEinsum
        args = (layer.einsum_str, layer.kernel_shape)
        kw = dict(bias_shape=None if layer.bias is None else layer.bias[...].shape)
    kw.update(dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision)
    if W is not None:
        lr = LowRank.from_dense(W, rank=fit.rank, capacity=fit.capacity)
        bias = None if layer.bias is None else layer.bias[...]
        kw["kernel_init"] = lambda _k, _s, _d: lr
        kw["bias_init"] = lambda _k, _s, dtype: jnp.asarray(bias, dtype)
        rngs = nnx.Rngs(0)  # not used: both initialisers return given values
    return cls(*args, rank=fit.rank, capacity=fit.capacity, rngs=rngs, **kw)


def _from_layer(layer: Any, rank, tol, capacity, where: str, cls: type | None = None):
    """``(low-rank layer, fit, (n, m))`` from the truncated SVD of ``layer``'s matricised kernel
    (one SVD picks the rank, one builds the factor)."""
    mat = matricise(layer)
    W = mat.to_matrix(layer.kernel[...])
    fit = fit_rank(W, rank, tol, capacity, where)
    return _low_rank_layer(layer, fit, W, cls=cls), fit, mat.shape


def _convert(layer: Any, request: ConversionRequest) -> ConvertedLayer:
    """The converter of ``nnx.LinearGeneral`` / ``nnx.Einsum`` for ``dlrt_jax.nnx.to_low_rank``.

    Raises :class:`NotConvertible` with the reason for a layer that is not one matrix product.
    """
    if request.init == "svd":
        new, fit, shape = _from_layer(
            layer, request.rank, request.tol, request.capacity, request.where
        )
        return ConvertedLayer(new, shape, *fit)
    shape = matricise(layer).shape
    fit = Fit(*_layers.rank_capacity(request.rank, request.capacity, shape, request.where), None)
    return ConvertedLayer(_low_rank_layer(layer, fit, rngs=request.rngs), shape, *fit)


for _type in (nnx.LinearGeneral, nnx.Einsum):
    register_converter(_type, _convert)
