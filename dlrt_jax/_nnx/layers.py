"""Flax NNX low-rank layers: the ``LowRankParam`` variable, ``LowRankLinear``, ``LowRankConv``.

Implementation module of :mod:`dlrt_jax.nnx` (import the names from there). What a layer computes
is in the framework-neutral :mod:`dlrt_jax._layers`; here are the parameters, the configuration,
the conversions from and to the dense ``nnx.Linear`` / ``nnx.Conv`` and the shared base
:class:`LowRankLayer` that :mod:`dlrt_jax.transformer` builds its layers on.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._factors import LowRank

__all__ = [
    "ConvertedLayer",
    "Fit",
    "LowRankConv",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankParam",
    "convert_dense",
    "fit_rank",
]


# ---- the Variable type ---------------------------------------------------------------------------


class LowRankParam(nnx.Param):
    """An ``nnx.Param`` whose value is a whole :class:`~dlrt_jax.LowRank` factor.

    The factor stays one value: ``nnx.state`` gives ``LowRank`` leaves, ``jax.grad`` over such a
    state gives ``LowRank`` cotangents in the DLRT slots (``grad.U = G V``, ``grad.S = U^T G V``,
    ``grad.V = G^T U``), and the integrators get the factors whole. ``wrt=nnx.Param`` trains the
    factors with everything else, ``wrt=LowRankParam`` selects them only (as ``nnx.LoRAParam``).
    Attribute access is forwarded to the factor (``param.U``, ``param.capacity``); ``param[...]``
    is the factor and ``param[...] = factor`` replaces it (other indices are refused: index the
    factor's arrays, ``param[...].U[:, :2]``). Only the default variable mode is supported (no
    ``ref=True`` / ``hijax=True`` ``nnx.var_defaults``).

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


# ---- layers --------------------------------------------------------------------------------------


class LowRankLayer(_layers.FactorAccessors, nnx.Module):
    """The base of the NNX low-rank layers: a :class:`LowRankParam` ``kernel`` and a bias.

    :class:`LowRankLinear`, :class:`LowRankConv` and :mod:`dlrt_jax.transformer`'s
    ``LowRankLinearGeneral`` / ``LowRankEinsum`` are built on it: each calls :meth:`_init_params`
    with the shape ``(m, n)`` of its kernel read as a matrix ``W^T`` (or its dense kernel shape
    ``(..., n)``), and implements ``__call__`` and :meth:`as_dense_layer`. ``factor``, ``rank``
    and ``capacity`` read the kernel's :class:`~dlrt_jax.LowRank`.
    """

    def _init_params(
        self,
        kernel_shape: tuple[int, ...],
        rank: int | None,
        capacity: int | None,
        kernel_init: Any,
        bias_shape: tuple[int, ...] | None,
        bias_init: Callable,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ) -> None:
        """Create ``kernel`` (the factor of ``W``, ``n x m`` with ``n = kernel_shape[-1]``) and
        ``bias`` (``None`` when ``bias_shape`` is ``None``) by the one rule of every layer."""
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"`rngs` must be an nnx.Rngs, got {type(rngs).__name__}.")
        _layers.check_kernel_init(kernel_init)
        out, m = kernel_shape[-1], int(np.prod(kernel_shape[:-1]))
        rank, capacity = _layers.rank_capacity(rank, capacity, (out, m), type(self).__name__)
        factor = _layers.init_factor(
            kernel_init, rngs.params(), kernel_shape, rank, capacity, param_dtype
        )
        self.kernel = LowRankParam(factor)
        self.bias: nnx.Param | None = (
            nnx.data(None)
            if bias_shape is None
            else nnx.Param(bias_init(rngs.params(), tuple(bias_shape), param_dtype))
        )

    def _bias(self) -> jax.Array | None:
        return None if self.bias is None else self.bias[...]

    def _dense_init(self, to_kernel: Callable | None = None) -> dict[str, Any]:
        """``kernel_init`` / ``bias_init`` of the dense layer that computes what this one does:
        the kernel ``to_kernel(W)`` (default ``W^T`` reshaped to the dense kernel shape) of
        ``W = U S V^T``, and this layer's bias; ``rngs`` that neither of them uses."""
        W = self.factor.to_dense()
        kernel = W.T if to_kernel is None else to_kernel(W)
        bias = self._bias()
        return dict(
            kernel_init=lambda _key, shape, dtype: jnp.asarray(kernel, dtype).reshape(shape),
            bias_init=lambda _key, shape, dtype: jnp.asarray(bias, dtype).reshape(shape),
            rngs=nnx.Rngs(0),  # not used: both initialisers return given values
        )

    def as_dense_layer(self) -> nnx.Module:
        """The dense Flax layer that computes what this layer computes, ``W = U S V^T`` formed."""
        raise NotImplementedError


class LowRankLinear(LowRankLayer):
    r"""A low-rank drop-in for ``nnx.Linear``: ``y = x W^T + b`` with ``W = U S V^T`` never formed.

    ``W`` is ``out_features x in_features`` (``nnx.Linear``'s ``kernel`` is ``W^T``), stored as a
    :class:`~dlrt_jax.LowRank` with a static capacity ``c`` and a traced rank ``r <= c`` in the
    :class:`LowRankParam` ``kernel``; the bias is an ``nnx.Param`` as in ``nnx.Linear``. The call
    computes ``((x V) S^T) U^T + b`` over the last axis at cost ``O(c (n + m))`` per row; its custom
    VJP gives the DLRT gradients (see :class:`~dlrt_jax.LowRank`). Train it with the DLRT optax
    transforms (:func:`dlrt_jax.bug`, ...) through ``nnx.Optimizer``; see :func:`train_step`.

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
        bias_init: Callable = _layers.zeros_init,
        rngs: nnx.Rngs,
    ):
        _layers.check_features(in_features=in_features, out_features=out_features)
        kernel_shape = (in_features, out_features)
        bias_shape = (out_features,) if use_bias else None
        self._init_params(
            kernel_shape, rank, capacity, kernel_init, bias_shape, bias_init, param_dtype, rngs
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W^T + bias`` over the last axis (any leading batch axes)."""
        return _layers.dense(
            self.factor, self._bias(), inputs, dtype=self.dtype, precision=self.precision
        )

    def as_dense_layer(self) -> nnx.Linear:
        """The ``nnx.Linear`` with kernel ``W^T = V S^T U^T`` (formed) and this layer's bias,
        dtypes and precision: it computes what this layer computes.

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from dlrt_jax.nnx import LowRankLinear
            >>> low = LowRankLinear(6, 4, rank=2, rngs=nnx.Rngs(0))
            >>> dense = low.as_dense_layer()
            >>> type(dense).__name__, dense.kernel.shape
            ('Linear', (6, 4))
            >>> bool(jnp.allclose(dense(jnp.ones((2, 6))), low(jnp.ones((2, 6))), atol=1e-5))
            True
        """
        return nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            **self._dense_init(),
        )

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
        weight error ``||W - W_r||_F / ||W||_F`` is ``<= tol``, or else at the capacity, which
        defaults as in the constructor and grows to the rank ``tol`` needs (an explicit smaller
        ``capacity`` raises ``ValueError``: the tolerance is never silently missed). The bias,
        dtypes and precision are copied; at ``rank = min(n, m)`` the layer computes what
        ``linear`` computes.

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
        return convert_dense(cls, nnx.Linear, linear, rank=rank, tol=tol, capacity=capacity).layer


class LowRankConv(LowRankLayer):
    r"""A low-rank drop-in for ``nnx.Conv``: a convolution with ``c`` filters, then a 1x1 mix.

    The kernel ``(*kernel_size, in, out)`` is matricised as ``W`` (``out x prod(kernel_size) *
    in``, the dense kernel is ``W^T`` reshaped) and stored as a :class:`~dlrt_jax.LowRank`. The
    input is convolved with the ``c`` columns of ``V`` as filters, then ``S^T U^T`` mixes the ``c``
    channels: cost ``O(c (prod(kernel_size) in + out))`` per output pixel, no kernel formed; the
    result equals ``nnx.Conv`` with the kernel ``W^T.reshape(*kernel_size, in, out)``.

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
        bias_init: Callable = _layers.zeros_init,
        rngs: nnx.Rngs,
    ):
        _layers.check_features(in_features=in_features, out_features=out_features)
        _layers.check_groups(feature_group_count, "LowRankConv")
        phi = _layers.ConvPhi.make(
            kernel_size, strides, padding, input_dilation, kernel_dilation, precision
        )
        kernel_shape = (*phi.kernel_size, in_features, out_features)
        bias_shape = (out_features,) if use_bias else None
        self._init_params(
            kernel_shape, rank, capacity, kernel_init, bias_shape, bias_init, param_dtype, rngs
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.kernel_size, self.strides, self.padding = phi.kernel_size, phi.strides, phi.padding
        self.input_dilation, self.kernel_dilation = phi.input_dilation, phi.kernel_dilation
        self.feature_group_count = 1
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The convolution of ``inputs`` (``*batch, *spatial, in_features``), channels last."""
        phi = _layers.ConvPhi.of(self)
        return _layers.conv(self.factor, self._bias(), inputs, phi, dtype=self.dtype)

    def as_dense_layer(self) -> nnx.Conv:
        """The ``nnx.Conv`` with the kernel ``W^T`` (formed) reshaped to ``(*kernel_size, in,
        out)`` and this layer's bias and configuration: it computes what this layer computes."""
        return nnx.Conv(
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            **self._dense_init(),
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
        return convert_dense(cls, nnx.Conv, conv, rank=rank, tol=tol, capacity=capacity).layer


# ---- from dense layers ---------------------------------------------------------------------------


class Fit(NamedTuple):
    """Rank, capacity and relative weight error ``||W - W_r||_F / ||W||_F`` of a truncation."""

    rank: int
    capacity: int
    rel_error: float | None


def fit_rank(W: jax.Array, rank: Any, tol: Any, capacity: Any, where: str) -> Fit:
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
    if tol is not None:
        ok = np.nonzero(tails[1:] <= float(tol) * tails[0])[0]
        rank = int(ok[0]) + 1 if ok.size else min(n, m)
        if capacity is not None and _layers.is_int(capacity) and rank > capacity:
            raise ValueError(
                f"{where}: `tol`={tol:g} needs rank {rank} for this {n} x {m} matrix W (relative "
                f"error {tails[rank] / tails[0]:.3g}), above `capacity`={capacity}; pass "
                f"`capacity=` >= {rank} (or leave it out), or a larger `tol=`."
            )
    rank, capacity = _layers.rank_capacity(rank, capacity, (n, m), where)
    return Fit(rank, capacity, float(tails[rank] / tails[0]) if tails[0] > 0 else 0.0)


def _dense_matrix(node: nnx.Linear | nnx.Conv) -> jax.Array:
    """``W`` (out x in) of an ``nnx.Linear`` or ``nnx.Conv``: the kernel reshaped, transposed."""
    kernel = jnp.asarray(node.kernel[...])
    return kernel.reshape(-1, kernel.shape[-1]).T


def _check_supported(node: Any, base: type, where: str) -> None:
    """Refuse a ``base`` (``nnx.Linear`` / ``nnx.Conv``) whose map is not ``x @ kernel + b``."""
    if not isinstance(node, base):
        name = base.__name__
        raise TypeError(f"`{name.lower()}` must be an nnx.{name}, got {type(node).__name__}.")
    if type(node) is not base:
        raise TypeError(
            f"{where}: only plain nnx.{base.__name__} layers can be converted, got the subclass "
            f"{type(node).__name__} (its behaviour may differ from x @ kernel + bias)."
        )
    if getattr(node, "feature_group_count", 1) != 1:
        raise ValueError(
            f"{where}: nnx.Conv with feature_group_count={node.feature_group_count} is not "
            "supported (a grouped convolution has no single kernel matrix to factorise)."
        )
    custom = [
        f"`{a}`"
        for a, default in (
            ("dot_general", jax.lax.dot_general),
            ("conv_general_dilated", jax.lax.conv_general_dilated),
            ("preferred_element_type", None),
            ("mask", None),
        )
        if getattr(node, a, default) is not default
    ]
    if custom:
        raise ValueError(f"{where}: nnx.{base.__name__} with {custom[0]} is not supported.")


def _dense_layer_kwargs(node: nnx.Linear | nnx.Conv) -> dict[str, Any]:
    """The constructor arguments of the low-rank layer that replaces ``node`` (rank aside)."""
    kw = dict(use_bias=node.bias is not None, dtype=node.dtype, param_dtype=node.param_dtype)
    kw["precision"] = node.precision
    if isinstance(node, nnx.Conv):
        for name in ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation"):
            kw[name] = getattr(node, name)
    return kw


def _low_rank_layer(cls: type, node: Any, W: jax.Array, fit: Fit, rngs: nnx.Rngs | None):
    """``cls`` configured as ``node``: the truncated SVD of ``W`` (``rngs=None``) or random."""
    kw = _dense_layer_kwargs(node)
    if rngs is None:
        lr = LowRank.from_dense(W, rank=fit.rank, capacity=fit.capacity)
        bias = None if node.bias is None else node.bias[...]
        kw["kernel_init"] = lambda _key, _shape, _dtype: lr
        kw["bias_init"] = lambda _key, _shape, dtype: jnp.asarray(bias, dtype)
        rngs = nnx.Rngs(0)  # not used: both initialisers return given values
    return cls(
        node.in_features, node.out_features, rank=fit.rank, capacity=fit.capacity, rngs=rngs, **kw
    )


class ConvertedLayer(NamedTuple):
    """What a converter of :func:`dlrt_jax.nnx.to_low_rank` returns for one layer.

    Attributes:
        layer: the new low-rank layer.
        shape: ``(n, m)`` of the matrix ``W`` (out x in).
        rank: the new factor's rank.
        capacity: the new factor's capacity.
        rel_error: ``||W - W_r||_F / ||W||_F`` of the truncation (``None`` for ``init='random'``).
    """

    layer: Any
    shape: tuple[int, int]
    rank: int
    capacity: int
    rel_error: float | None


def convert_dense(
    cls: type,
    base: type,
    node: Any,
    *,
    rank: Any = None,
    tol: Any = None,
    capacity: Any = None,
    init: str = "svd",
    rngs: nnx.Rngs | None = None,
    where: str = "",
) -> ConvertedLayer:
    """``node`` (a plain ``base``: ``nnx.Linear`` / ``nnx.Conv``) as the low-rank ``cls``.

    ``init='svd'``: the truncated SVD of its matrix ``W`` at the rank :func:`fit_rank` picks;
    ``init='random'``: a fresh layer of the same configuration from ``rngs``.
    """
    where = where or f"{cls.__name__}.from_{base.__name__.lower()}"
    _check_supported(node, base, where)
    W = _dense_matrix(node)
    if init == "svd":
        fit = fit_rank(W, rank, tol, capacity, where)
        layer = _low_rank_layer(cls, node, W, fit, None)
    else:
        fit = Fit(*_layers.rank_capacity(rank, capacity, W.shape, where), None)
        layer = _low_rank_layer(cls, node, W, fit, rngs)
    return ConvertedLayer(layer, W.shape, *fit)
