"""Flax Linen low-rank layers: ``LowRankDense`` and ``LowRankConv``.

Each layer's ``params`` hold the kernel as one :class:`~dlrt_jax.LowRank` leaf (``'kernel'``) and an
ordinary ``'bias'`` array, so ``jax.grad`` of a loss of ``model.apply(variables, ...)`` returns
``LowRank`` cotangents in the DLRT slots (``grad.U = G V``, ``grad.S = U^T G V``,
``grad.V = G^T U``) and the DLRT optax transforms (:func:`dlrt_jax.bug`, ...) train
``variables['params']`` directly. The layers evaluate through :func:`~dlrt_jax.lowrank_apply` /
:func:`~dlrt_jax.lowrank_map`; ``W`` is never formed. Their conventions (shapes, padding,
dtypes, initialisation) are those of :class:`dlrt_jax.nnx.LowRankLinear` /
:class:`dlrt_jax.nnx.LowRankConv`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlrt_jax import _layers
from dlrt_jax._factors import LowRank

__all__ = ["LowRankConv", "LowRankDense"]


def _params(module: nn.Module, kernel_shape: tuple[int, ...]) -> tuple[LowRank, jax.Array | None]:
    """The ``kernel`` factor and the ``bias`` of a layer whose dense kernel is ``kernel_shape``."""
    _layers.check_features(features=module.features)
    _layers.check_kernel_init(module.kernel_init)
    where = type(module).__name__
    shape = (module.features, int(np.prod(kernel_shape[:-1])))
    rank, capacity = _layers.rank_capacity(module.rank, module.capacity, shape, where)

    def init(key):
        return _layers.init_factor(
            module.kernel_init, key, kernel_shape, rank, capacity, module.param_dtype
        )

    kernel = module.param("kernel", init)
    if not isinstance(kernel, LowRank):
        raise TypeError(
            f"{where}: params['kernel'] must be a dlrt_jax.LowRank, got {type(kernel).__name__}."
        )
    if kernel.shape != shape:
        raise ValueError(
            f"{where}: params['kernel'] has shape {kernel.shape}, the input needs W of shape "
            f"{shape} (out x in)."
        )
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    return kernel, bias


class LowRankDense(nn.Module):
    r"""A low-rank ``nn.Dense``: ``y = x W^T + b`` with ``W = U S V^T`` (``features x in``).

    Attributes:
        features: output size ``n``.
        rank: initial active rank; default the capacity.
        capacity: static capacity; default ``max(floor(min(n, m) / 2), rank)``.
        use_bias: add a bias.
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: storage dtype of the factors and the bias.
        precision: matmul precision of the input contraction ``x V``.
        kernel_init: ``None`` (the paper's initialisation), a positive float (scale of the singular
            values), or a callable ``init(key, shape, dtype)`` returning the dense kernel
            ``(in, features)`` (truncated by SVD) or a ``LowRank``; see
            :class:`dlrt_jax.nnx.LowRankLinear`.
        bias_init: initialiser of the bias.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from dlrt_jax.linen import LowRankDense
        >>> layer = LowRankDense(8, rank=2, capacity=4)
        >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 16)))
        >>> w = variables["params"]["kernel"]
        >>> w.U.shape, w.S.shape, w.V.shape, variables["params"]["bias"].shape, int(w.active_rank)
        ((8, 4), (4, 4), (16, 4), (8,), 2)
        >>> layer.apply(variables, jnp.ones((3, 16))).shape
        (3, 8)
    """

    features: int
    rank: int | None = None
    capacity: int | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = None
    bias_init: Callable = _layers.zeros_init

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W^T + bias`` over the last axis."""
        inputs = jnp.asarray(inputs)
        kernel, bias = _params(self, (inputs.shape[-1], self.features))
        return _layers.dense(kernel, bias, inputs, dtype=self.dtype, precision=self.precision)


class LowRankConv(nn.Module):
    r"""A low-rank ``nn.Conv``: convolution with the ``c`` filters of ``V``, then ``S^T U^T``.

    The kernel ``(*kernel_size, in, features)`` is matricised as ``W`` (``features x
    prod(kernel_size) * in``) and stored as a :class:`~dlrt_jax.LowRank`; see
    :class:`dlrt_jax.nnx.LowRankConv` for the maths and the conventions. ``feature_group_count``
    must be 1.

    Attributes:
        features: output channels.
        kernel_size: an int (1-D) or a sequence of ints.
        strides, padding, input_dilation, kernel_dilation: as ``nn.Conv``.
        feature_group_count: must be 1.
        rank, capacity, use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as
            :class:`LowRankDense` (a ``kernel_init`` callable gets the dense kernel shape).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from dlrt_jax.linen import LowRankConv
        >>> conv = LowRankConv(16, (3, 3), rank=4, capacity=8)
        >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 10, 10, 3)))
        >>> variables["params"]["kernel"].V.shape  # W is 16 x (3 * 3 * 3)
        (27, 8)
        >>> conv.apply(variables, jnp.ones((2, 10, 10, 3))).shape
        (2, 10, 10, 16)
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    rank: int | None = None
    capacity: int | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = None
    bias_init: Callable = _layers.zeros_init

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The convolution of ``inputs`` (``*batch, *spatial, in``), channels last."""
        _layers.check_groups(self.feature_group_count, "LowRankConv")
        phi = _layers.ConvPhi.of(self)
        inputs = jnp.asarray(inputs)
        kernel, bias = _params(self, (*phi.kernel_size, inputs.shape[-1], self.features))
        return _layers.conv(kernel, bias, inputs, phi, dtype=self.dtype)
