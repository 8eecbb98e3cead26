"""Functional models of the DLRT paper: the 5-layer MLP and LeNet5, with parameter counting.

Parameters are plain pytrees: a list of layers, each a dict ``{"w": weight, "b": bias}``. A weight
is one of

* a :class:`~dlrt_jax.LowRank` factor ``W = U S V^T`` (``n x m``, out x in), trained by a DLRT
  integrator (``dlrt_jax.bug``, ``parallel_bug``, ``projector_splitting``, ``s_only``);
* a dense ``(n, m)`` array (the dense baselines and the classifier layer);
* a :class:`Factorized` pair ``W = U V^T`` of two dense factors, trained by an ordinary optax
  optimiser with true gradients (the "plain factorisation" baseline of the paper).

Convolution weights are stored matricised as ``(out, kh * kw * in)``, the rows of the second axis
ordered ``(kh, kw, in)``, so that every weight is an ``n x m`` matrix and counts alike. Inputs of
LeNet5 are NHWC; convolutions use padding ``VALID``.

Initialisation follows the paper's code: each factored layer gets orthonormal ``U``, ``V`` and
``S = diag`` of sorted ``|N(0, 1)|`` samples. The dense and ``U V^T`` variants are built from the
*same* factors (``W = U S V^T``; ``U_f = U sqrt(S)``, ``V_f = V sqrt(S)``), so all three variants
compute the same function at initialisation for the same key. Biases start at zero; the dense
classifier layer is Glorot-uniform.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dlrt_jax.mnist.models import init_mlp, mlp_apply, param_counts
    >>> params = init_mlp(jax.random.key(0), width=32)
    >>> mlp_apply(params, jnp.zeros((2, 784))).shape
    (2, 10)
    >>> param_counts(params)["ranks"]
    [16, 16, 16, 16]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlrt_jax import LowRank, default_capacity, is_lowrank, lowrank_apply, lowrank_map
from dlrt_jax._factors import _check_int  # the core's one integer check
from dlrt_jax._layers import ConvPhi

__all__ = [
    "Factorized",
    "accuracy",
    "compression",
    "cross_entropy_loss",
    "dense_param_count",
    "eval_param_count",
    "init_lenet5",
    "init_mlp",
    "layer_ranks",
    "lenet5_apply",
    "mlp_apply",
    "param_counts",
    "train_param_count",
]

Params = list[dict[str, Any]]

#: The shapes ``(n, m)`` (out x in) of the weights of LeNet5, conv kernels matricised.
LENET5_SHAPES = ((20, 25), (50, 500), (500, 800), (10, 500))


class Factorized(NamedTuple):
    """A plain factorisation ``W = U V^T`` with ``U`` ``(n, r)`` and ``V`` ``(m, r)``.

    Both factors are ordinary parameters: ``jax.grad`` gives the true partial derivatives
    ``dL/dU = G V`` and ``dL/dV = G^T U``, so any optax optimiser trains them directly. This is the
    baseline the paper compares DLRT with; it is *not* a :class:`~dlrt_jax.LowRank`.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = Factorized(jnp.ones((3, 1)), jnp.ones((2, 1)))
        >>> f.shape, f.rank
        ((3, 2), 1)
    """

    U: jax.Array
    V: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def rank(self) -> int:
        return self.U.shape[1]


# ---- layers -------------------------------------------------------------------------------------


#: ``phi(x, V)`` of the paper's 5x5 convolutions: VALID, stride 1, NHWC, the columns of ``V``
#: (``(5 * 5 * in, c)``) reshaped to HWIO filters; the same map as ``dlrt_jax.nnx.LowRankConv``.
_CONV5 = ConvPhi.make((5, 5), padding="VALID")


def _weight_shape(w: Any) -> tuple[int, int]:
    if isinstance(w, LowRank | Factorized):
        return w.shape
    return tuple(np.shape(w))


def _linear(w: Any, x: jax.Array) -> jax.Array:
    """``x W^T`` over the last axis for any of the three weight kinds."""
    if isinstance(w, LowRank):
        return lowrank_apply(w, x)
    if isinstance(w, Factorized):
        return (x @ w.V) @ w.U.T
    return x @ w.T


def _conv(w: Any, x: jax.Array, phi: ConvPhi) -> jax.Array:
    """Convolution with the matricised kernel ``W`` (``out x kh kw in``) for any weight kind."""
    if isinstance(w, LowRank):
        return lowrank_map(w, x, phi)
    if isinstance(w, Factorized):
        return phi(x, w.V) @ w.U.T  # r filters, then the 1x1 convolution with U
    return phi(x, w.T)


def _maxpool2(x: jax.Array) -> jax.Array:
    """2 x 2 max pooling, stride 2, NHWC (even H and W).

    Written as a reshape and a max: on CPU its gradient is about 6x faster than that of
    ``lax.reduce_window`` (whose transpose is a slow ``select_and_scatter``).
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# ---- initialisation -----------------------------------------------------------------------------


def _check_choice(dense: bool, uv: bool) -> None:
    if not isinstance(dense, bool) or not isinstance(uv, bool):
        raise TypeError("`dense` and `uv` must be bools.")
    if dense and uv:
        raise ValueError("Choose at most one of `dense=True` and `uv=True`.")


def _factor_rank(shape: tuple[int, int], rank: int | None, max_rank: int | None, where: str):
    """``(rank, capacity)`` of one factored layer: a given ``rank`` is both (an integer in
    ``[1, min(n, m)]``, the core's rule); else both are the default capacity, at most
    ``max_rank``."""
    n, m = shape
    if rank is None:
        rank = (
            default_capacity(shape) if max_rank is None else min(default_capacity(shape), max_rank)
        )
    bound = f"min(n, m)={min(n, m)}"
    rank = _check_int(rank, "rank", 1, min(n, m), upper=bound, fix=f" ({where}: {n} x {m} weight)")
    return rank, rank


def _per_layer_ranks(rank: Any, count: int) -> list[int | None]:
    """``rank`` (``None``, an int, or ``count`` ints) as one entry per layer, each checked."""
    ranks = [rank] * count if rank is None or np.ndim(rank) == 0 else list(rank)
    if len(ranks) != count or (rank is not None and None in ranks):
        raise ValueError(f"`rank` must be None, an int or {count} ints, got {rank!r}.")
    return [None if r is None else _check_int(r, "rank", 1) for r in ranks]


def _singular_values(key: jax.Array, r: int, decay: float | None) -> jax.Array:
    """Sorted ``|N(0, 1)|`` samples ``s_0 >= ... >= s_{r-1}``, ``s_k`` divided by ``decay**k``.

    The exponent starts at 0 (the largest value is not damped), as in the paper's code for the
    DLRT vs U V^T experiment (``1 / decay**k for k in range(r)``).
    """
    s = jnp.sort(jnp.abs(jax.random.normal(key, (r,), jnp.float32)))[::-1]
    if decay is not None:
        s = s / jnp.asarray(decay, jnp.float32) ** jnp.arange(r, dtype=jnp.float32)
    return s


def _init_weight(
    key: jax.Array,
    shape: tuple[int, int],
    *,
    rank: int | None,
    max_rank: int | None,
    dense: bool,
    uv: bool,
    decay: float | None,
    where: str,
    scale: float = 1.0,
):
    r, cap = _factor_rank(shape, rank, max_rank, where)
    kf, ks = jax.random.split(key)
    s = scale * _singular_values(ks, r, decay)
    lr = LowRank.random(kf, shape, rank=r, capacity=cap, singular_values=s)
    if dense:
        return lr.to_dense()
    if uv:
        root = jnp.sqrt(jnp.diagonal(lr.S))
        return Factorized(lr.U * root[None, :], lr.V * root[None, :])
    return lr


def _init_dense_layer(key: jax.Array, shape: tuple[int, int]) -> dict[str, jax.Array]:
    w = jax.nn.initializers.glorot_uniform()(key, shape, jnp.float32)
    return {"w": w, "b": jnp.zeros((shape[0],), jnp.float32)}


def init_mlp(
    key: jax.Array,
    width: int = 500,
    *,
    rank: int | Sequence[int] | None = None,
    max_rank: int | None = None,
    dense: bool = False,
    uv: bool = False,
    decay: float | None = None,
    depth: int = 4,
    in_features: int = 784,
    num_classes: int = 10,
    scale: float = 1.0,
) -> Params:
    """The paper's MLP ``784 -> width x depth -> 10`` (ReLU), hidden weights factored.

    The ``depth`` hidden weights (the first ``width x 784``, then ``width x width``) are
    :class:`~dlrt_jax.LowRank`; the classifier ``num_classes x width`` is dense.

    Args:
        key: PRNG key.
        width: hidden width ``w``.
        rank: ``None`` for the rank-adaptive start (rank = capacity = ``floor(min(n, m) / 2)``
            capped by ``max_rank``, as the paper), or a fixed rank ``r`` (rank = capacity = ``r``,
            for the fixed-rank integrators and timing runs), or one rank per hidden layer.
        max_rank: optional cap on the adaptive starting rank/capacity.
        dense: dense ``(n, m)`` hidden weights, initialised as ``U S V^T`` of the same factors.
        uv: plain :class:`Factorized` hidden weights ``U V^T`` of the same factors.
        decay: divide the ``k``-th initial singular value by ``decay**k`` (``k = 0..r-1``, the
            largest undamped, as the paper's code).
        depth: number of hidden layers (default: the paper's).
        in_features: input size (default: the paper's).
        num_classes: output size (default: the paper's).
        scale: multiplies the initial singular values (all three weight kinds alike).

    Returns:
        A list of ``depth + 1`` layers ``{"w": weight, "b": bias}``.

    Examples:
        >>> import jax
        >>> p = init_mlp(jax.random.key(0), width=500)
        >>> [int(l["w"].rank) for l in p[:4]], p[0]["w"].shape, p[4]["w"].shape
        ([250, 250, 250, 250], (500, 784), (10, 500))
    """
    for name, v in (("width", width), ("depth", depth), ("in_features", in_features)):
        _check_int(v, name, 1)
    _check_int(num_classes, "num_classes", 1)
    ranks = _per_layer_ranks(rank, depth)
    max_rank = None if max_rank is None else _check_int(max_rank, "max_rank", 1)
    _check_choice(dense, uv)
    if decay is not None and not decay > 0:
        raise ValueError(f"`decay` must be None or > 0, got {decay!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0, got {scale!r}.")
    keys = jax.random.split(key, depth + 1)
    layers = []
    fan_in = in_features
    for i in range(depth):
        shape = (width, fan_in)
        w = _init_weight(
            keys[i],
            shape,
            rank=ranks[i],
            max_rank=max_rank,
            dense=dense,
            uv=uv,
            decay=decay,
            where=f"hidden layer {i}",
            scale=scale,
        )
        layers.append({"w": w, "b": jnp.zeros((width,), jnp.float32)})
        fan_in = width
    layers.append(_init_dense_layer(keys[depth], (num_classes, width)))
    return layers


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits of the MLP for flattened inputs ``x`` ``(batch, 784)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> p = init_mlp(jax.random.key(0), width=16, dense=True)
        >>> mlp_apply(p, jnp.ones((3, 784))).shape
        (3, 10)
    """
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(_linear(layer["w"], h) + layer["b"])
    return _linear(params[-1]["w"], h) + params[-1]["b"]


def init_lenet5(
    key: jax.Array,
    *,
    rank: int | Sequence[int] | None = None,
    max_rank: int | None = None,
    dense: bool = False,
    uv: bool = False,
    decay: float | None = None,
    scale: float = 1.0,
) -> Params:
    """LeNet5 of the paper: conv1, conv2 and fc1 factored, fc2 dense.

    conv 1->20 5x5, ReLU, maxpool 2, conv 20->50 5x5, ReLU, maxpool 2, fc 800->500, ReLU,
    fc 500->10. Matricised weight shapes (out x in): conv1 20 x 25, conv2 50 x 500, fc1 500 x 800
    (adaptive capacities 10, 25, 250), fc2 10 x 500 dense.

    Args:
        key: PRNG key.
        rank: ``None`` (adaptive start at ``floor(min(n, m) / 2)``, capped by ``max_rank``), a
            fixed rank for all three factored layers, or three fixed ranks. A fixed rank above
            ``floor(min(n, m) / 2)`` (e.g. 20 in conv1) works with the fixed-rank integrators
            only (``projector_splitting``).
        max_rank: as in :func:`init_mlp`.
        dense: as in :func:`init_mlp`.
        uv: as in :func:`init_mlp`.
        decay: as in :func:`init_mlp`.
        scale: as in :func:`init_mlp`.

    Examples:
        >>> import jax
        >>> p = init_lenet5(jax.random.key(0))
        >>> [int(l["w"].rank) for l in p[:3]]
        [10, 25, 250]
    """
    _check_choice(dense, uv)
    max_rank = None if max_rank is None else _check_int(max_rank, "max_rank", 1)
    ranks = _per_layer_ranks(rank, 3)
    if decay is not None and not decay > 0:
        raise ValueError(f"`decay` must be None or > 0, got {decay!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0, got {scale!r}.")
    keys = jax.random.split(key, 4)
    layers = []
    for i, name in enumerate(("conv1", "conv2", "fc1")):
        w = _init_weight(
            keys[i],
            LENET5_SHAPES[i],
            rank=ranks[i],
            max_rank=max_rank,
            dense=dense,
            uv=uv,
            decay=decay,
            where=name,
            scale=scale,
        )
        layers.append({"w": w, "b": jnp.zeros((LENET5_SHAPES[i][0],), jnp.float32)})
    layers.append(_init_dense_layer(keys[3], LENET5_SHAPES[3]))
    return layers


def lenet5_apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits of LeNet5 for images ``x`` of shape ``(batch, 28, 28)`` or ``(batch, 28, 28, 1)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> p = init_lenet5(jax.random.key(0), dense=True)
        >>> lenet5_apply(p, jnp.zeros((2, 28, 28))).shape
        (2, 10)
    """
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != (28, 28, 1):
        raise ValueError(f"LeNet5 expects (batch, 28, 28[, 1]) images, got {x.shape}.")
    conv1, conv2, fc1, fc2 = params
    h = _maxpool2(jax.nn.relu(_conv(conv1["w"], x, _CONV5) + conv1["b"]))  # (B, 12, 12, 20)
    h = _maxpool2(jax.nn.relu(_conv(conv2["w"], h, _CONV5) + conv2["b"]))  # (B, 4, 4, 50)
    h = h.reshape(h.shape[0], -1)  # 800, ordered (h, w, c)
    h = jax.nn.relu(_linear(fc1["w"], h) + fc1["b"])
    return _linear(fc2["w"], h) + fc2["b"]


# ---- losses and metrics -------------------------------------------------------------------------


def cross_entropy_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]):
    """``loss(params, (x, y))``: mean softmax cross-entropy of ``apply_fn`` on integer labels.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> loss = cross_entropy_loss(mlp_apply)
        >>> p = init_mlp(jax.random.key(0), width=8)
        >>> float(loss(p, (jnp.zeros((4, 784)), jnp.zeros((4,), jnp.int32)))) > 0
        True
    """

    def loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = apply_fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def accuracy(apply_fn: Callable[[Params, jax.Array], jax.Array]):
    """``acc(params, (x, y))``: fraction of correct argmax predictions (a float32 scalar).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> acc = accuracy(mlp_apply)
        >>> p = init_mlp(jax.random.key(0), width=8)
        >>> 0.0 <= float(acc(p, (jnp.zeros((4, 784)), jnp.zeros((4,), jnp.int32)))) <= 1.0
        True
    """

    def acc(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return jnp.mean(jnp.argmax(apply_fn(params, x), axis=-1) == y)

    return acc


# ---- parameter counting (docs/method.md; weights only, no biases) ----------------------------


def _weights(params: Params) -> list[Any]:
    if not isinstance(params, list | tuple) or not all(
        isinstance(layer, dict) and "w" in layer for layer in params
    ):
        raise TypeError("`params` must be a list of layers {'w': ..., 'b': ...} (see init_mlp).")
    return [layer["w"] for layer in params]


def layer_ranks(params: Params) -> list[int]:
    """Current ranks of the factored weights (``LowRank`` and ``Factorized``), in order.

    Examples:
        >>> import jax
        >>> layer_ranks(init_lenet5(jax.random.key(0), rank=[5, 6, 7]))
        [5, 6, 7]
    """
    out = []
    for w in _weights(params):
        if is_lowrank(w):
            out.append(int(w.rank))
        elif isinstance(w, Factorized):
            out.append(w.rank)
    return out


def eval_param_count(n: int, m: int, r: int | None) -> int:
    """Parameters of an ``n x m`` weight at evaluation: ``r (n + m)`` if factored (``S`` folded
    into ``U`` or ``V``), ``n m`` if dense (``r=None``).

    Examples:
        >>> eval_param_count(500, 784, 52), eval_param_count(10, 500, None)
        (66768, 5000)
    """
    return n * m if r is None else r * (n + m)


def train_param_count(n: int, m: int, r: int | None) -> int:
    """Parameters held during DLRT training: ``2 n r + 4 r^2 + 2 r m`` per factored layer (the
    paper's 5-layer script: ``K``/``U`` and ``L``/``V`` of width ``r`` and the augmented ``2r x 2r``
    ``S``); ``n m`` if dense.

    Examples:
        >>> train_param_count(500, 500, 10)
        20400
    """
    return n * m if r is None else 2 * n * r + 4 * r * r + 2 * r * m


def dense_param_count(params: Params) -> int:
    """Weights of the dense network of the same architecture: ``sum n m``.

    Examples:
        >>> import jax
        >>> dense_param_count(init_mlp(jax.random.key(0), width=500))
        1147000
    """
    return sum(math.prod(_weight_shape(w)) for w in _weights(params))


def compression(params_count: int, dense_count: int) -> float:
    """Compression rate ``1 - params / dense`` (a fraction; multiply by 100 for %)."""
    if dense_count <= 0:
        raise ValueError(f"`dense_count` must be > 0, got {dense_count}.")
    return 1.0 - params_count / dense_count


def param_counts(params: Params) -> dict[str, Any]:
    """Parameter counts and compression rates of a model, weights only (docs/method.md).

    ``LowRank`` weights count with their current rank; :class:`Factorized` ones with their
    ``r (n + m)`` entries in both columns (plain factorisations train exactly those); dense ones
    with ``n m``.

    Returns:
        ``{"ranks", "eval_params", "train_params", "dense_params", "eval_compression",
        "train_compression"}`` (compressions as fractions).

    Examples:
        >>> import jax
        >>> c = param_counts(init_mlp(jax.random.key(0), width=500, rank=10))
        >>> c["eval_params"], c["dense_params"], round(100 * c["eval_compression"], 2)
        (47840, 1147000, 95.83)
    """
    eval_total = train_total = 0
    for w in _weights(params):
        n, m = _weight_shape(w)
        if is_lowrank(w):
            r = int(w.rank)
            eval_total += eval_param_count(n, m, r)
            train_total += train_param_count(n, m, r)
        elif isinstance(w, Factorized):
            eval_total += eval_param_count(n, m, w.rank)
            train_total += eval_param_count(n, m, w.rank)
        else:
            eval_total += n * m
            train_total += n * m
    dense = dense_param_count(params)
    return {
        "ranks": layer_ranks(params),
        "eval_params": eval_total,
        "train_params": train_total,
        "dense_params": dense,
        "eval_compression": compression(eval_total, dense),
        "train_compression": compression(train_total, dense),
    }
