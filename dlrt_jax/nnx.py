"""Flax NNX adapter: low-rank layers, a model converter and the training glue.

* :class:`LowRankParam`: the ``nnx.Param`` subtype that holds a whole :class:`~dlrt_jax.LowRank`
  factor, so ``nnx.state(model, LowRankParam)`` / ``wrt=LowRankParam`` select the factors and the
  DLRT optax transforms see ``LowRank`` leaves in the state tree.
* :class:`LowRankLinear` and :class:`LowRankConv`: drop-in replacements of ``nnx.Linear`` and
  ``nnx.Conv`` (the maths is in the framework-neutral ``dlrt_jax._layers``; ``W`` is never formed).
* :func:`to_low_rank`: replace chosen layers of an existing model, with a per-layer summary.
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

import dataclasses
import inspect
import logging
import numbers
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._capacity import fit_capacity as _fit_capacity
from dlrt_jax._factors import LowRank, default_capacity
from dlrt_jax._step import make_train_step

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

_ZEROS = nnx.initializers.zeros_init()


class _LowRankLayer(_layers.FactorAccessors, nnx.Module):
    """What :class:`LowRankLinear` and :class:`LowRankConv` share: the parameters and accessors."""

    def _init_params(
        self, kernel_shape, rank, capacity, use_bias, kernel_init, bias_init, param_dtype, rngs
    ) -> None:
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
            nnx.Param(bias_init(rngs.params(), (out,), param_dtype)) if use_bias else nnx.data(None)
        )

    def _bias(self) -> jax.Array | None:
        return None if self.bias is None else self.bias[...]


class LowRankLinear(_LowRankLayer):
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
        bias_init: Callable = _ZEROS,
        rngs: nnx.Rngs,
    ):
        _layers.check_features(in_features=in_features, out_features=out_features)
        kernel_shape = (in_features, out_features)
        self._init_params(
            kernel_shape, rank, capacity, use_bias, kernel_init, bias_init, param_dtype, rngs
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W^T + bias`` over the last axis (any leading batch axes)."""
        return _layers.dense(
            self.factor, self._bias(), inputs, dtype=self.dtype, precision=self.precision
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
        return _from_dense_layer(cls, nnx.Linear, linear, rank, tol, capacity)


class LowRankConv(_LowRankLayer):
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
        bias_init: Callable = _ZEROS,
        rngs: nnx.Rngs,
    ):
        _layers.check_features(in_features=in_features, out_features=out_features)
        _layers.check_groups(feature_group_count, "LowRankConv")
        phi = _layers.ConvPhi.make(
            kernel_size, strides, padding, input_dilation, kernel_dilation, precision
        )
        kernel_shape = (*phi.kernel_size, in_features, out_features)
        self._init_params(
            kernel_shape, rank, capacity, use_bias, kernel_init, bias_init, param_dtype, rngs
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
        return _from_dense_layer(cls, nnx.Conv, conv, rank, tol, capacity)


# ---- from dense layers ---------------------------------------------------------------------------


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
    return _Fit(rank, capacity, float(tails[rank] / tails[0]) if tails[0] > 0 else 0.0)


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


def _low_rank_layer(cls: type, node: Any, W: jax.Array, fit: _Fit, rngs: nnx.Rngs | None):
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


def _from_dense_layer(cls, base, node, rank, tol, capacity):
    where = f"{cls.__name__}.from_{base.__name__.lower()}"
    _check_supported(node, base, where)
    W = _dense_matrix(node)
    return _low_rank_layer(cls, node, W, _fit_rank(W, rank, tol, capacity, where), None)


# ---- model conversion ----------------------------------------------------------------------------

_LOGGER = logging.getLogger(__name__)
_WARN_ERROR = 1e-3  # relative weight error above which the default rank is warned about


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


@dataclasses.dataclass(frozen=True)
class _PathRegex:
    """``(path, x) -> bool``: ``pattern`` fully matches a path element or the ``/``-joined path."""

    pattern: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(
                f"`filter` {self.pattern!r} is not a valid regular expression: {e}."
            ) from None

    def __call__(self, path: tuple, x: Any) -> bool:
        parts = [str(p) for p in path]
        return any(re.fullmatch(self.pattern, p) for p in [*parts, "/".join(parts)])


@dataclasses.dataclass(frozen=True)
class _KernelOfType:
    """``(path, layer) -> bool``: the layer's ``kernel`` is a ``Variable`` of this type."""

    type: type

    def __call__(self, path: tuple, x: Any) -> bool:
        return isinstance(getattr(x, "kernel", None), self.type)


def _for_layers(predicate: Any) -> Any:
    """A flax predicate read on layers: a tag (a string) is a path pattern, a ``Variable`` type
    (``nnx.Param``) asks for the layer's ``kernel``; ``Any`` / ``All`` / ``Not`` recurse."""
    fl = nnx.filterlib
    if isinstance(predicate, fl.WithTag):
        return _PathRegex(predicate.tag)
    if isinstance(predicate, fl.OfType) and issubclass(predicate.type, nnx.Variable):
        return _KernelOfType(predicate.type)
    if isinstance(predicate, fl.Any | fl.All):
        return type(predicate)(*(_for_layers(p) for p in predicate.predicates))
    if isinstance(predicate, fl.Not):
        return fl.Not(_for_layers(predicate.predicate))
    return predicate


def _to_predicate(filter: Any) -> Callable[[tuple, Any], bool]:
    """``filter`` (flax's filter language; see :func:`to_low_rank`) as a predicate."""
    if filter is None:
        warnings.warn(
            "to_low_rank(filter=None) selects every convertible layer here, but None selects "
            "nothing in flax's filter language; pass `filter=...` (the default) instead.",
            DeprecationWarning,
            stacklevel=3,
        )
        filter = ...
    flax_filter = (str, type, bool, list, tuple, type(...), nnx.filterlib.WithTag)
    flax_filter += (nnx.filterlib.Any, nnx.filterlib.All, nnx.filterlib.Not, nnx.filterlib.OfType)
    if isinstance(filter, flax_filter):
        return _for_layers(nnx.filterlib.to_predicate(filter))
    if not callable(filter):
        raise TypeError(
            "`filter` must be a flax filter (a type such as nnx.Linear or nnx.Param, a path "
            "pattern (str), nnx.PathContains(...), nnx.Any(...) / nnx.All(...) / nnx.Not(...), a "
            "list of filters, True, ...) or a predicate (path, module) -> bool, got "
            f"{type(filter).__name__}."
        )
    try:
        params = inspect.signature(filter).parameters.values()
    except (TypeError, ValueError):
        return filter  # a builtin or C callable: take it as flax does, (path, module) -> bool
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return lambda path, module: filter(module)
    return filter


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


def _skip_reason(node: Any) -> str | None:
    """Why ``to_low_rank`` leaves a module with parameters alone (``None``: no parameters)."""
    if isinstance(node, _LowRankLayer):
        return "already a low-rank layer"
    if isinstance(node, _layers.FactorAccessors):
        return (
            f"an adapter ({type(node).__name__} holds a trained low-rank factor on a frozen base); "
            "conversions never touch adapters (merge them first)"
        )
    if not isinstance(node, nnx.Module):
        return None
    names = sorted(k for k, v in vars(node).items() if isinstance(v, nnx.Param))
    if not names:
        return None
    return f"has parameters ({', '.join(names)}); no converter for {type(node).__name__}"


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


def _dense_kernel_converter(cls: type, base: type):
    """The converter of ``base`` (``nnx.Linear`` / ``nnx.Conv``) to ``cls``."""

    def convert(node: Any, request: _Request, where: str) -> _Converted:
        _check_supported(node, base, where)
        W = _dense_matrix(node)
        if request.init == "svd":
            fit = _fit_rank(W, request.rank, request.tol, request.capacity, where)
            return _Converted(_low_rank_layer(cls, node, W, fit, None), W.shape, fit)
        r, c = _layers.rank_capacity(request.rank, request.capacity, W.shape, where)
        fit = _Fit(r, c, None)
        return _Converted(_low_rank_layer(cls, node, W, fit, request.rngs), W.shape, fit)

    return convert


#: The layer types :func:`to_low_rank` converts, each with its converter
#: ``converter(layer, request, where) -> _Converted`` (``where`` starts its error messages). A
#: layer is converted by the first entry it is an instance of; a converter raises ``TypeError`` /
#: ``ValueError`` for a configuration it cannot represent.
_CONVERTERS: dict[type, Callable[[Any, _Request, str], _Converted]] = {
    nnx.Linear: _dense_kernel_converter(LowRankLinear, nnx.Linear),
    nnx.Conv: _dense_kernel_converter(LowRankConv, nnx.Conv),
}


def _kinds() -> str:
    return " / ".join(f"nnx.{t.__name__}" for t in _CONVERTERS)


def _converter_for(node: Any) -> Callable[[Any, _Request, str], _Converted] | None:
    if isinstance(node, _layers.FactorAccessors):  # a low-rank layer or an adapter
        return None
    return next((f for t, f in _CONVERTERS.items() if isinstance(node, t)), None)


def _protected_reason(path: tuple, node: Any, owners: dict[tuple, str]) -> str | None:
    """Why a convertible layer must not be touched: inside an adapter, or frozen weights."""
    inside = [p for p in owners if len(p) < len(path) and path[: len(p)] == p]
    if inside:
        owner = max(inside, key=len)
        return (
            f"inside the adapter at {_path_str(owner)!r} ({owners[owner]}); conversions never "
            "touch adapters or their frozen base layers"
        )
    kernel = getattr(node, "kernel", None)
    if isinstance(kernel, nnx.Variable) and not isinstance(kernel, nnx.Param):
        return (
            f"frozen (its kernel is a {type(kernel).__name__}, not an nnx.Param); conversions "
            "never touch frozen weights"
        )
    return None


def _factor_owners(model: Any) -> dict[tuple, str]:
    """``{path: type name}`` of the modules that hold a low-rank factor (low-rank layers and
    adapters), whose sub-modules a conversion leaves alone."""
    return {
        tuple(path): type(node).__name__
        for path, node in nnx.iter_graph(model)
        if isinstance(node, _layers.FactorAccessors)
    }


def _tails(path: tuple) -> list[str]:
    """The ``/``-joined trailing parts of a path, whole path first: ``a/b/c``, ``b/c``, ``c``."""
    parts = [str(p) for p in path]
    return ["/".join(parts[i:]) for i in range(len(parts))] or [""]


@dataclasses.dataclass
class _PerLayer:
    """A setting given for every layer (an int or ``None``) or per layer by path pattern.

    A pattern is a regular expression that must fully match the ``/``-joined path of the layer
    or a trailing part of it that starts at a path element (``'fc1'`` matches ``'block/fc1'``,
    ``'block/fc.'`` matches ``'net/block/fc1'``, ``'c1'`` does not match ``'fc1'``). The first
    matching pattern in the mapping's order wins, as in PEFT's ``rank_pattern``; a layer no
    pattern matches gets the default (as if the argument were not given).
    """

    name: str
    value: Any
    used: set = dataclasses.field(default_factory=set)

    def __post_init__(self):
        if not isinstance(self.value, Mapping):
            return
        for key in self.value:
            if not isinstance(key, str):
                raise TypeError(
                    f"`{self.name}` as a mapping needs path patterns (str) as keys, got "
                    f"{key!r}; e.g. {{'fc1': 4, 'block/.*': 8}}."
                )
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(
                    f"`{self.name}` key {key!r} is not a valid regular expression: {e}."
                ) from None

    def __call__(self, path: tuple) -> Any:
        if not isinstance(self.value, Mapping):
            return self.value
        tails = _tails(path)
        for key, v in self.value.items():
            if any(re.fullmatch(key, t) for t in tails):
                self.used.add(key)
                return v
        return None

    def check_all_used(self, paths: list[str]) -> None:
        unused = (
            [k for k in self.value if k not in self.used] if isinstance(self.value, Mapping) else []
        )
        if unused:
            raise ValueError(
                f"to_low_rank: `{self.name}` pattern(s) {unused} match no converted layer (a "
                f"pattern fully matches the path or a trailing part of it, e.g. 'fc1' or "
                f"'block/fc1'). Converted layers: {paths}."
            )


def to_low_rank(
    model: Any,
    *,
    filter: Any = ...,
    rank: int | Mapping[str, int] | None = None,
    tol: float | None = None,
    capacity: int | Mapping[str, int] | None = None,
    init: str = "svd",
    rngs: nnx.Rngs | None = None,
    report: bool = False,
) -> Any:
    r"""Replace chosen ``nnx.Linear`` / ``nnx.Conv`` layers of a model by low-rank layers.

    Returns a **new** model (built with ``nnx.recursive_map`` on an ``nnx.clone`` of ``model``);
    ``model`` itself is not modified, and the layers that are not replaced are copies (new
    ``Variable`` objects, shared immutable arrays). Shared layers stay shared.

    **Which layers.** The layer types in the converter table (``nnx.Linear`` and ``nnx.Conv``) are
    converted; ``filter`` chooses among them, in flax's filter language (``nnx.filterlib``)
    applied to ``(path, layer)``:

    * ``...`` / ``True`` (the default: all), a module type (``nnx.Conv``),
      ``nnx.PathContains('block')``, ``nnx.Any(...)``, ``nnx.All(...)``, ``nnx.Not(...)``, a list
      or tuple (any of) and a predicate ``filter(path, layer) -> bool`` mean what they mean in
      flax; a ``Variable`` type (``nnx.Param``, a subtype) selects the layers whose ``kernel`` is
      one;
    * a string is a regular expression that must fully match one element of the path or the
      ``/``-joined path: ``'fc1'`` matches ``('fc1',)`` and ``('block', 'fc1')`` (not ``fc10``),
      ``'fc[12]'`` both ``fc1`` and ``fc2``, ``'layers/[01]'`` the first two entries of
      ``layers``. (In flax a string is a ``Variable`` tag, which layers do not have; strings
      inside ``nnx.Any`` / ``nnx.All`` / ``nnx.Not`` and lists are path patterns too.)
    * ``None`` selected every layer in earlier versions and still does, with a
      ``DeprecationWarning`` (in flax ``None`` selects nothing): pass ``...``. A one-argument
      callable ``filter(layer)`` is also accepted.

    Every other module with parameters (``nnx.Embed``, ``nnx.LayerNorm``, a custom module, ...)
    and every convertible layer the filter leaves out is kept as it is and listed in the summary
    as *skipped*, with the reason. **Frozen weights and adapters are never touched**, whatever
    the filter: a layer whose ``kernel`` is a ``Variable`` that is not an ``nnx.Param`` (the
    :class:`~dlrt_jax.adapters.FrozenParam` of :func:`~dlrt_jax.adapters.to_adapters`), an
    adapter (:class:`~dlrt_jax.adapters.LowRankAdapter`) and the base layer inside it are skipped
    with that reason. (Compress first, then add adapters; or merge the adapters first.)

    **Which rank.** With ``init='svd'`` each selected layer's matrix ``W`` (out x in; a
    convolution kernel matricised as in :class:`LowRankConv`) is replaced by its truncated SVD
    ``W_r``; the relative weight error ``||W - W_r||_F / ||W||_F = sqrt(sum_{j > r}
    sigma_j^2) / ||sigma||_2`` of every layer is in the summary.

    * ``tol``: ``r`` is the smallest rank with relative error ``<= tol``, and the capacity is
      ``max(floor(min(n, m) / 2), r)`` (or ``capacity``, which must then be ``>= r``).
    * a capacity above ``floor(min(n, m) / 2)`` (from ``tol``, ``rank`` or ``capacity``) gets a
      ``UserWarning`` naming the layers, and a note in the summary: only the fixed-rank
      integrators can train such a layer (the rank-adaptive ones augment to ``2c <= min(n, m)``
      columns and raise at their ``init``).
    * ``rank``: that rank in every layer (capacity ``max(floor(min(n, m) / 2), rank)`` or
      ``capacity``).
    * per layer: ``rank`` and ``capacity`` also take a mapping ``{path pattern: int}`` (as PEFT's
      ``rank_pattern``). A pattern is a regular expression that must fully match the layer's
      ``/``-joined path or a trailing part of it starting at a path element: ``'fc1'`` matches
      ``fc1`` and ``block/fc1`` (not ``fc10``), ``'block/fc.'`` matches ``net/block/fc1``. The
      **first** matching pattern in the mapping's order wins; a layer no pattern matches gets the
      default (for ``rank``: ``tol`` if given, else the capacity rule). A pattern that matches no
      converted layer raises ``ValueError`` (a typo is never silently ignored).
    * neither: every layer keeps its capacity's worth, ``floor(min(n, m) / 2)`` (or
      ``capacity``), of singular values, whatever that costs in accuracy: a ``UserWarning`` lists
      the layers whose relative weight error exceeds ``1e-3``. Pass ``tol`` to bound the change.

    The summary (a :class:`ConversionSummary`) is logged at ``INFO`` level on the
    ``'dlrt_jax.nnx'`` logger on every call, and returned with ``report=True``.

    Args:
        model: an NNX module (or graph of modules).
        filter: which convertible layers to replace (see above).
        rank: rank of every new factor (at most one of an int ``rank`` and ``tol``), or a
            mapping ``{path pattern: rank}`` (see above).
        tol: relative weight error bound of the truncated SVD (``init='svd'`` only); with a
            ``rank`` mapping, the rule of the layers no pattern matches.
        capacity: capacity of every new factor, or a mapping ``{path pattern: capacity}``;
            default ``max(floor(min(n, m) / 2), rank)`` per layer, the rank being the one
            ``rank`` or ``tol`` gives.
        init: ``'svd'`` (truncated SVD of the dense kernel; bias, dtypes, precision copied) or
            ``'random'`` (the constructors' paper initialisation and a zero bias: a fresh layer of
            the same configuration; the summary has no relative error then).
        rngs: ``nnx.Rngs`` for ``init='random'``.
        report: also return the :class:`ConversionSummary`.

    Returns:
        The new model; with ``report=True``, ``(model, summary)``.

    Raises:
        ValueError: when the filter matches no layer, for a configuration a converter cannot
            represent (a grouped or masked ``nnx.Conv``, ...), or for ranks ``tol`` / ``rank`` /
            ``capacity`` cannot give (the message names the layer's path).
        TypeError: for a subclass of a convertible type, or a ``filter`` that is not one.

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
        >>> per_layer = to_low_rank(model, rank={"fc1": 4, "out": 1}, capacity={"fc.": 6})
        >>> int(per_layer.fc1.rank), per_layer.fc1.capacity, int(per_layer.out.rank)
        (4, 6, 1)
    """
    if init not in ("svd", "random"):
        raise ValueError(f"`init` must be 'svd' or 'random', got {init!r}.")
    if init == "random":
        if tol is not None:
            raise ValueError("`tol` applies to init='svd' only; give `rank` for init='random'.")
        if not isinstance(rngs, nnx.Rngs):
            raise ValueError("init='random' needs `rngs` (an nnx.Rngs).")
    if rank is not None and tol is not None and not isinstance(rank, Mapping):
        raise ValueError("Give at most one of `rank` and `tol`, got both.")
    if not isinstance(report, bool):
        raise TypeError(f"`report` must be a bool, got {type(report).__name__}.")
    predicate = _to_predicate(filter)
    rank_of, capacity_of = _PerLayer("rank", rank), _PerLayer("capacity", capacity)
    records: list[LayerConversion] = []
    model = nnx.clone(model)
    owners = _factor_owners(model)

    def convert(path, node):
        converter, name = _converter_for(node), (_path_str(path), type(node).__name__)
        protected = None if converter is None else _protected_reason(path, node, owners)
        if converter is None or protected or not predicate(path, node):
            reason = _skip_reason(node) if converter is None else protected
            if reason is not None or converter is not None:
                records.append(LayerConversion(*name, False, note=reason or "excluded by `filter`"))
            return node
        where = f"to_low_rank at {name[0]!r}"
        layer_rank = rank_of(path)
        request = _Request(
            layer_rank, None if layer_rank is not None else tol, capacity_of(path), init, rngs
        )
        new, shape, fit = _wrap_errors(where, converter, node, request, where)
        note = ""
        if fit.capacity > default_capacity(shape):
            note = (
                f"capacity > floor(min(n, m) / 2) = {default_capacity(shape)}: fixed-rank "
                "integrators only (the rank-adaptive ones need 2 * capacity <= min(n, m))"
            )
        records.append(LayerConversion(*name, True, shape, *fit, note))
        return new

    new_model = nnx.recursive_map(convert, model)
    summary = ConversionSummary(tuple(records))
    if not summary.converted:
        candidates = [r.path for r in summary.skipped if r.note == "excluded by `filter`"]
        raise ValueError(
            f"to_low_rank: `filter` matched no convertible layer ({_kinds()}; the filter is "
            f"applied to those only; frozen layers and adapters are never converted). "
            f"Candidate layers: {candidates or 'none'}.\n{summary}"
        )
    for per_layer in (rank_of, capacity_of):
        per_layer.check_all_used([r.path for r in summary.converted])
    _LOGGER.info("%s", summary)
    _warn_untrainable_by_adaptive(summary)
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


def _warn_untrainable_by_adaptive(summary: ConversionSummary) -> None:
    """Warn about the converted layers the rank-adaptive integrators cannot train."""
    over = [r for r in summary.converted if r.capacity > default_capacity(r.shape)]
    if not over:
        return
    listed = ", ".join(
        f"{r.path!r} ({r.shape[0]} x {r.shape[1]}: capacity {r.capacity} > "
        f"{default_capacity(r.shape)})"
        for r in over
    )
    warnings.warn(
        f"to_low_rank: the rank-adaptive integrators (a `tau`, parallel_bug, ...) cannot train "
        f"{listed}: they augment to 2 * capacity columns, which needs 2 * capacity <= min(n, m); "
        "only the fixed-rank ones (bug without `tau`, projector_splitting) can. Pass a smaller "
        "`capacity=` for these layers (a mapping sets it per layer, e.g. {'fc1': 3}) or a larger "
        "`tol=`.",
        UserWarning,
        stacklevel=3,
    )


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

    ``grad_fn(p)`` merges ``p`` (the pure state ``nnx.Optimizer.update`` passes to ``tx.update``,
    or one with ``Variable`` wrappers) into ``model`` split by ``wrt`` (the optimiser's), evaluates
    ``loss_fn(model, batch)`` and returns its gradient, a tree shaped like ``p`` (``LowRank``
    cotangents at the factors). The rest of the state (batch statistics, RNG counters) is the one
    at the time of the call and changes to it inside ``grad_fn`` are discarded, so every
    evaluation of a step sees the same dropout masks: build it before the step's first gradient.

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
    rest = nnx.as_pure(rest)  # new Variables inside each trace: the loss may write to them

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
    """``nnx.Optimizer`` whose ``tx.init`` sees the pure state; kept for compatibility.

    The DLRT transforms (:func:`dlrt_jax.bug`, ...) work in a plain ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``: their state keeps one ``FactorState`` per factor in a flat tuple
    (:class:`dlrt_jax.DLRTState`), of which ``nnx.Optimizer`` wraps every array in its own
    ``OptArray``, so the structure survives its updates (flax 0.12.8, tested). ``DLRTOptimizer``
    is ``nnx.Optimizer(model, tx, wrt=wrt)`` with ``tx.init`` applied to the pure state
    ``nnx.as_pure(nnx.state(model, wrt))``; everything else is inherited (``update(model, grads,
    **kwargs)`` passes ``grad_fn=`` on to the integrator: build it with :func:`make_grad_fn`, or
    let :func:`train_step` do it).

    It is still needed for a *plain* optax transform (``optax.adam``, without a DLRT wrapper) on
    a model with :class:`LowRankParam`: plain ``nnx.Optimizer`` calls ``tx.init`` on the
    ``Variable`` objects and wraps each ``Variable`` of the returned state in one ``OptVariable``,
    so an Adam moment of a ``LowRankParam`` (a whole ``LowRank``) sits in one ``OptVariable``,
    which ``nnx.update`` turns into a nested ``State`` after the first update (the second then
    fails). :func:`train_step`, :func:`fit_capacity` and :func:`apply_capacity_policy` reject such
    an optimiser with a clear error.

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
        >>> batch = jax.random.normal(jax.random.key(1), (32, 12))
        >>> loss_fn = lambda m, x: jnp.mean((m(x) - x[:, :10]) ** 2)
        >>> plain = nnx.Optimizer(model, dlrt_jax.bug(optax.adam(1e-2), tau=0.1), wrt=nnx.Param)
        >>> for _ in range(2):
        ...     for opt in (optimizer, plain):  # the same for both
        ...         grads = nnx.grad(loss_fn)(model, batch)
        ...         _ = opt.update(model, grads, grad_fn=make_grad_fn(model, loss_fn, batch))
        >>> int(optimizer.step[...]), int(plain.step[...])
        (2, 2)
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
                    "Variable (a plain optax state of a LowRank factor), which its update "
                    "cannot keep intact (see DLRTOptimizer). Wrap the optax transform in a DLRT "
                    "transform (e.g. dlrt_jax.bug(tx)), or build the optimiser as "
                    "dlrt_jax.nnx.DLRTOptimizer(model, tx, wrt=...)."
                )


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
) -> jax.Array:
    """One training step of ``model`` through ``optimizer``; returns the loss before the step.

    :func:`dlrt_jax.make_train_step` on the pure state: the loss and gradient are taken with
    respect to ``optimizer.wrt``; ``grad_fn=`` evaluates the loss with the rest of the state as it
    was before the step (the same dropout masks); the new parameters, the rest as the loss left it
    (batch statistics, RNG counters), the optimiser state and ``optimizer.step`` are written back.
    Works eagerly and under ``nnx.jit`` (bind ``loss_fn`` with ``functools.partial``); the jitted
    step compiles once per set of capacities.

    ``nnx.jit`` adds to the functional step a host-side walk over the model's and optimiser's
    graphs per call (milliseconds; ``nnx.jit(..., graph=False)`` or ``nnx.cached_partial`` cut
    it: ``benchmarks/nnx_vs_functional.py``). The step's cost follows the capacities: shrink them
    with :func:`apply_capacity_policy` or :func:`fit_capacity` once the rank has dropped.

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
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

    def pure_loss(p: Any, rest: Any, batch: Any) -> tuple[jax.Array, Any]:
        m = nnx.merge(graphdef, p, rest)
        return loss_fn(m, batch), nnx.as_pure(nnx.state(m, nnx.Not(optimizer.wrt)))

    step = make_train_step(pure_loss, optimizer.tx, jit=False, has_aux=True)
    params, rest, opt_state = nnx.as_pure((params, rest, optimizer.opt_state))
    new_params, new_opt_state, (loss, new_rest) = step(params, opt_state, rest, batch)
    nnx.update(model, new_rest)
    _write_back(model, optimizer, new_params, new_opt_state)
    optimizer.step[...] += 1
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

    Call it outside ``jit`` after every training step with the number of steps done (1-based).
    It calls ``policy(step, params, opt_state)`` on the pure model and optimiser states and, when
    the policy resized, writes them back as :func:`fit_capacity` does (``W`` and the moments kept,
    only the capacities change; a jitted step compiles once per distinct set of capacities). With
    an ``every`` attribute (a ``CapacityPolicy``) the other steps return ``False`` at once, without
    reading any state or syncing with the device.

    Args:
        policy: a :class:`dlrt_jax.CapacityPolicy`, or any callable with its signature
            ``(step, params, opt_state) -> (params, opt_state, resized)``.
        step: the number of training steps done (1-based).
        model: the NNX model.
        optimizer: its ``nnx.Optimizer`` (or :class:`DLRTOptimizer`).

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
    if not _layers.is_int(step):
        try:
            step = int(step)  # e.g. a concrete jax scalar such as optimizer.step[...]
        except TypeError as e:
            raise TypeError(f"`step` must be an integer, got {type(step).__name__}.") from e
    every = getattr(policy, "every", None)
    if _layers.is_int(every) and every >= 1 and step % every:
        return False  # nothing to read on this step (CapacityPolicy returns unchanged here)
    _check_optimizer(optimizer, "apply_capacity_policy")
    params, opt_state = _pure_states(model, optimizer)
    new_params, new_opt_state, resized = policy(step, params, opt_state)
    if not resized:
        return False
    _write_back(model, optimizer, new_params, new_opt_state)
    return True


# nnx.LinearGeneral / nnx.Einsum (attention projections): their converters live in
# dlrt_jax.transformer, which adds them to _CONVERTERS when imported
from dlrt_jax import transformer as _transformer  # noqa: E402, F401
