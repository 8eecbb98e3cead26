r"""Rank-adaptive low-rank adapters (GeoLoRA-style) for pretrained Flax NNX models.

An adapted layer computes

.. math::

    y = W_0 x + \frac{\alpha}{r} U S V^T x,

with the pretrained ``W0`` (and bias) frozen and the adapter ``U S V^T`` a
:class:`~dlrt_jax.LowRank` trained by the DLRT integrators: the parallel rank-adaptive BUG by
default (one gradient evaluation and one small SVD per step, no ``S^{-1}``), as in GeoLoRA.
``S = 0`` at the start, so the adapted model is the pretrained one at step 0; the first step's
augmentation puts the gradient's directions ``G V0`` and ``G^T U0`` into the bases (a randomised
range finder of the gradient), and the truncation picks each layer's rank.

* :func:`to_adapters`: wrap chosen ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``
  (matrix-product) layers of a model in :class:`LowRankAdapter` and freeze everything else
  (:class:`FrozenParam`, not an ``nnx.Param``: the optimiser's ``wrt=nnx.Param`` sees only the
  adapters).
* :func:`geolora`: the default transform, ``parallel_bug`` with Adam inside, optionally with a
  global parameter budget (:func:`with_rank_budget`).
* :func:`merge_adapters`: fold the adapters into dense weights; :func:`adapter_ranks`: the ranks.
* :func:`export_peft` / :func:`import_peft`: the PEFT LoRA layout (``adapter_config.json`` and
  ``adapter_model.safetensors``), so adapters trained here load in Python's LoRA tooling.

**What ``r`` in ``alpha / r`` is.** The rank is traced and changes every step, so ``r`` is *not*
the current rank: it is the fixed ``rank`` hyperparameter the adapter was built with (PEFT's
``r``). Were it the current rank, every rank change (say 8 -> 9) would rescale all directions
already learnt by 8/9, a jump in the weights that no integrator step accounts for; with a fixed
``r`` the scale ``alpha / r`` is a constant and rank changes only add or drop directions.
Default ``alpha = r``: scale 1. :func:`export_peft` writes for each module its current rank
``k`` as ``rank_pattern`` and ``alpha_k = (alpha / r) k`` as ``alpha_pattern``, so PEFT's
``W0 + (alpha_k / k) B A`` is this layer exactly (``B A = U S V^T``).

Examples:
    >>> import functools, jax.numpy as jnp
    >>> from flax import nnx
    >>> from dlrt_jax import adapters
    >>> from dlrt_jax.nnx import DLRTOptimizer, train_step
    >>> pretrained = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
    ...                             nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    >>> model = adapters.to_adapters(pretrained, rank=2)  # S = 0: same outputs
    >>> x = jnp.ones((3, 8))
    >>> bool(jnp.allclose(model(x), pretrained(x)))
    True
    >>> optimizer = DLRTOptimizer(model, adapters.geolora(1e-2, tau=0.1))
    >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
    >>> step = nnx.jit(functools.partial(train_step, loss_fn=loss_fn))
    >>> loss = step(model, optimizer, batch=(x, jnp.zeros((3, 4))))
    >>> sorted(adapters.adapter_ranks(model))
    ['layers/0', 'layers/2']
    >>> merged = adapters.merge_adapters(model)  # plain nnx.Linear layers again
    >>> bool(jnp.allclose(merged(x), model(x), atol=1e-5))
    True

References:
    Schotthöfer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric integration for
    parameter efficient fine-tuning", ICLR 2025 (arXiv 2410.18720); Hu et al., "LoRA: low-rank
    adaptation of large language models", ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._budget import RankBudgetState, budget_cost, factor_ranks, with_rank_budget
from dlrt_jax._factors import LowRank, _check_int, default_capacity  # the core-to-adapter seam
from dlrt_jax._transforms import parallel_bug
from dlrt_jax.nnx import ConversionSummary, LayerConversion, LowRankParam, layer_predicate
from dlrt_jax.transformer import NotConvertible, matricise, not_a_matrix_reason

__all__ = [
    "AdapterSummary",
    "FrozenParam",
    "LowRankAdapter",
    "RankBudgetState",
    "adapter_parameters",
    "adapter_ranks",
    "budget_cost",
    "export_peft",
    "factor_ranks",
    "geolora",
    "import_peft",
    "merge_adapters",
    "to_adapters",
    "with_rank_budget",
]

_LOGGER = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class FrozenParam(nnx.Variable):
    """A pretrained weight held fixed: an ``nnx.Variable`` that is *not* an ``nnx.Param``.

    ``nnx.state(model, nnx.Param)``, ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``nnx.grad`` over
    ``nnx.Param`` leave it out, so an adapted model trains only its adapters. The layers read it
    as they read a ``Param`` (``kernel[...]``). :func:`merge_adapters` turns it back into an
    ``nnx.Param``.
    """


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _module_name(path: tuple) -> str:
    """The torch-style module name of an NNX path: its parts joined by ``.``."""
    return ".".join(str(p) for p in path)


def _freeze_variable(v: nnx.Variable) -> nnx.Variable:
    return FrozenParam(v.get_value()) if isinstance(v, nnx.Param) else v


def _unfreeze_variable(v: nnx.Variable) -> nnx.Variable:
    if type(v) is FrozenParam:
        value = v.get_value()
        return LowRankParam(value) if isinstance(value, LowRank) else nnx.Param(value)
    return v


def _freeze_module(module: nnx.Module) -> None:
    """Re-type the module's own ``nnx.Param`` attributes as :class:`FrozenParam`, in place."""
    for name, v in list(vars(module).items()):
        if isinstance(v, nnx.Param):
            setattr(module, name, _freeze_variable(v))


def _orthonormal(rng: np.random.Generator, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """A random ``n x c`` matrix with orthonormal columns (NumPy: no compile per shape)."""
    q, _ = np.linalg.qr(rng.standard_normal(shape))
    return jnp.asarray(q, dtype)


def _adapter_capacity(rank: int, capacity: int | None, shape: tuple[int, int], where: str) -> int:
    """The adapter's capacity, by the core's rank rule: ``rank`` in ``[1, min(n, m)]``,
    ``capacity`` in ``[rank, min(n, m)]``, default ``max(rank, min(2 rank, default_capacity))``
    (room to grow while the rank-adaptive integrators' ``2 c <= min(n, m)`` holds)."""
    (n, m), bound = shape, f"min(n, m)={min(shape)}"
    fix = f" ({where}: the {n} x {m} matrix W)"
    rank = _check_int(rank, "rank", 1, min(shape), upper=bound, fix=fix)
    if capacity is None:
        return max(rank, min(2 * rank, default_capacity(shape)))
    return _check_int(capacity, "capacity", rank, min(shape), upper=bound, fix=fix)


class LowRankAdapter(_layers.FactorAccessors, nnx.Module):
    r"""A frozen layer plus a rank-adaptive low-rank adapter: ``y = base(x) + (alpha/r) U S V^T x``.

    ``base`` is an ``nnx.Linear``, ``nnx.LinearGeneral`` (no ``batch_axis``) or an
    ``nnx.Einsum`` that is a matrix product; its parameters are re-typed as :class:`FrozenParam`
    (in place) and its call is unchanged. The adapter ``lora`` is a
    :class:`~dlrt_jax.nnx.LowRankParam` holding a :class:`~dlrt_jax.LowRank` of the shape of the
    base's matricised kernel ``W0`` (``n x m``, out x in; see
    :class:`~dlrt_jax.transformer.Matricisation`), with random orthonormal ``U``, ``V``, ``S = 0``
    and active rank ``rank``: the layer computes what ``base`` computes until it is trained.

    ``alpha / r`` is a constant: ``r`` is the ``rank`` given here (PEFT's ``r``), not the traced
    current rank (see :mod:`dlrt_jax.adapters`).

    Args:
        base: the pretrained layer.
        rank: the initial rank and the ``r`` of ``alpha / r`` (default 8, as PEFT).
        capacity: the static capacity (the largest rank); default ``max(rank, min(2 rank,
            floor(min(n, m) / 2)))``, room to grow while the rank-adaptive integrators'
            ``2 * capacity <= min(n, m)`` holds.
        alpha: the scale numerator; default ``rank`` (scale 1).
        rngs: ``nnx.Rngs`` for ``U`` and ``V`` (default ``nnx.Rngs(0)``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import FrozenParam, LowRankAdapter
        >>> base = nnx.LinearGeneral(16, (2, 8), rngs=nnx.Rngs(0))  # an attention projection
        >>> x = jnp.ones((3, 16))
        >>> y0 = base(x)
        >>> layer = LowRankAdapter(base, rank=2, alpha=4.0)
        >>> layer.lora.get_value(), layer.scale, isinstance(layer.base.kernel, FrozenParam)
        (LowRank(shape=(16, 16), capacity=4, rank=2, dtype=float32), 2.0, True)
        >>> bool(jnp.allclose(layer(x), y0))  # S = 0
        True
        >>> list(nnx.state(layer, nnx.Param).keys())  # what an optimiser trains
        ['lora']
    """

    _factor_name = "lora"  # factor, rank, capacity read the adapter

    def __init__(
        self,
        base: nnx.Module,
        *,
        rank: int = 8,
        capacity: int | None = None,
        alpha: float | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        mat = matricise(base)
        capacity = _adapter_capacity(rank, capacity, mat.shape, "LowRankAdapter")
        if alpha is None:
            alpha = rank
        if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and alpha > 0):
            raise ValueError(f"`alpha` must be a number > 0, got {alpha!r}.")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"`rngs` must be an nnx.Rngs, got {type(rngs).__name__}.")
        kernel = base.kernel[...]
        dtype = jnp.asarray(kernel).dtype
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rngs.params())).ravel())
        n, m = mat.shape
        factor = LowRank(
            _orthonormal(rng, (n, capacity), dtype),
            jnp.zeros((capacity, capacity), dtype),
            _orthonormal(rng, (m, capacity), dtype),
            rank,
        )
        _freeze_module(base)
        self.base = base
        self.lora = LowRankParam(factor)
        self.r = int(rank)
        self.alpha = float(alpha)
        self.matricisation = mat
        # PEFT's ``lora_B.bias`` times its scaling (``n`` entries), folded into ``base``'s bias by
        # :func:`import_peft` and written back by :func:`export_peft`; ``None``: no LoRA bias
        self.lora_bias: FrozenParam | None = nnx.data(None)

    @property
    def scale(self) -> float:
        """``alpha / r`` (a constant; ``r`` is the ``rank`` hyperparameter)."""
        return self.alpha / self.r

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """``base(inputs, ...) + (alpha / r) U S V^T inputs`` (matricised over the base's axes)."""
        y = self.base(inputs, *args, **kwargs)
        lr = self.factor
        if lr.dtype != y.dtype:
            U, S, V, rank = jax.tree.leaves(lr)
            lr = jax.tree.unflatten(
                jax.tree.structure(lr),
                [U.astype(y.dtype), S.astype(y.dtype), V.astype(y.dtype), rank],
            )
        precision = getattr(self.base, "precision", None)
        delta = self.matricisation.apply(lr, jnp.asarray(inputs).astype(y.dtype), precision)
        return y + jnp.asarray(self.scale, y.dtype) * delta

    def merged_matrix(self) -> jax.Array:
        """``W0 + (alpha / r) U S V^T`` (``n x m``), the merged weight matrix."""
        W0 = self.matricisation.to_matrix(self.base.kernel[...])
        return W0 + self.scale * self.factor.to_dense().astype(W0.dtype)


@dataclasses.dataclass(frozen=True)
class AdapterSummary(ConversionSummary):
    """What :func:`to_adapters` did, layer by layer (``rank``/``capacity`` of each adapter)."""

    def __str__(self) -> str:
        text = super().__str__()
        head, _, rest = text.partition("\n")
        return (
            f"to_adapters: {len(self.converted)} adapter(s), {len(self.skipped)} layer(s) "
            f"without\n{rest}"
        )


_CANDIDATES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


class _PerLayer:
    """``rank`` / ``capacity`` of :func:`to_adapters` per module name: an int for every layer,
    or ``{pattern: value}`` read by PEFT's rule (the first key matching the end of the name);
    remembers which keys matched."""

    def __init__(self, **values: Any):
        self.values = values
        self.used: set[tuple[str, str]] = set()

    def get(self, what: str, name: str, default: Any) -> Any:
        value = self.values[what]
        if not isinstance(value, dict):
            return value
        key = next((k for k in value if re.match(rf"(.*\.)?({k})$", name)), None)
        self.used.add((what, key))
        return default if key is None else value[key]

    def unused(self) -> list[str]:
        return [
            f"{what}[{key!r}]"
            for what, value in self.values.items()
            for key in (value if isinstance(value, dict) else ())
            if (what, key) not in self.used
        ]


def to_adapters(
    model: Any,
    *,
    filter: Any = ...,
    rank: int | dict[str, int] = 8,
    alpha: float | None = None,
    capacity: int | dict[str, int] | None = None,
    rngs: nnx.Rngs | None = None,
    freeze: bool = True,
    report: bool = False,
) -> Any:
    r"""Put rank-adaptive adapters on chosen layers of a pretrained model; freeze the rest.

    Returns a **new** model (``model`` is not modified): every selected ``nnx.Linear``,
    ``nnx.LinearGeneral`` and matrix-product ``nnx.Einsum`` is wrapped in a
    :class:`LowRankAdapter` (``S = 0``: the new model computes what ``model`` computes), and, with
    ``freeze=True``, every other ``nnx.Param`` of the model (embeddings, norms, layers left out)
    becomes a :class:`FrozenParam`, so ``nnx.Param`` selects the adapters only. Train with
    ``dlrt_jax.nnx.DLRTOptimizer(model, geolora(...))`` and ``dlrt_jax.nnx.train_step``. (To
    compress a model as well, call :func:`dlrt_jax.nnx.to_low_rank` first: run on an adapted
    model it would convert the frozen base layers too.)

    ``filter`` chooses among the candidate layers in the filter language of
    :func:`dlrt_jax.nnx.to_low_rank` (a type, a path regex such as ``'query|value'``,
    ``nnx.PathContains(...)``, ``nnx.Any``/``All``/``Not``, a predicate ``(path, module)``);
    ``...`` (the default) selects them all. The summary (:class:`AdapterSummary`, logged at
    ``INFO`` on the ``'dlrt_jax.adapters'`` logger and returned with ``report=True``) lists each
    adapter and each
    layer with parameters that got none, with the reason (an embedding, a norm, excluded by the
    filter, not a matrix product).

    **Per-layer rank and capacity.** ``rank`` and ``capacity`` are an int for every layer or a
    dict ``{pattern: value}`` keyed by module name, PEFT's ``rank_pattern`` rule: a layer's module
    name is its path joined by ``.`` (``'attn.query'``, ``'layers.0'``, ``''`` for the model
    itself), and a key, a regular expression, matches the names it ends (at a ``.`` boundary:
    ``re.match(rf"(.*\.)?({key})$", name)``, so ``'query'`` matches ``'attn.query'`` and
    ``'block.attn.query'``, not ``'attn.query_norm'``); the first matching key in the dict's
    order wins, and a layer no key matches takes the default (``rank`` 8; the default capacity).
    A key that matches no adapted layer is an error (a typo would otherwise be ignored).

    A layer whose capacity exceeds ``floor(min(n, m) / 2)`` (for instance a ``rank`` above that)
    cannot be trained by :func:`geolora` or the other rank-adaptive integrators, which augment
    the bases to ``2 * capacity`` columns: ``to_adapters`` warns (``UserWarning``), naming the
    layer and the capacity that fits; such a layer trains only with a fixed-rank integrator
    (:func:`dlrt_jax.projector_splitting`, :func:`dlrt_jax.s_only`).

    Args:
        model: the pretrained NNX model.
        filter: which layers get adapters.
        rank: the initial rank and the ``r`` of ``alpha / r`` (see :class:`LowRankAdapter`): an
            int, or a dict of module-name patterns (above).
        alpha: the scale numerator (default each layer's ``rank``).
        capacity: the capacity of the adapters (default per :class:`LowRankAdapter`): an int,
            ``None`` or a dict of module-name patterns (above).
        rngs: ``nnx.Rngs`` for the adapters' random bases (default ``nnx.Rngs(0)``).
        freeze: freeze every parameter that is not an adapter (default ``True``).
        report: also return the summary.

    Returns:
        The adapted model; with ``report=True``, ``(model, summary)``.

    Raises:
        ValueError: when the filter selects no layer that can take an adapter.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import to_adapters
        >>> class Block(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.attn = nnx.MultiHeadAttention(2, 16, decode=False, rngs=rngs)
        ...         self.norm = nnx.LayerNorm(16, rngs=rngs)
        ...         self.mlp = nnx.Linear(16, 16, rngs=rngs)
        ...     def __call__(self, x):
        ...         return x + self.mlp(self.norm(x + self.attn(x)))
        >>> block = Block(nnx.Rngs(0))
        >>> adapted, summary = to_adapters(block, filter="query|value", rank=2, report=True)
        >>> [r.path for r in summary.converted]
        ['attn/query', 'attn/value']
        >>> [path for path, _ in nnx.to_flat_state(nnx.state(adapted, nnx.Param))]  # trained
        [('attn', 'query', 'lora'), ('attn', 'value', 'lora')]
        >>> x = jnp.ones((1, 5, 16))
        >>> bool(jnp.allclose(adapted(x), block(x)))
        True
        >>> adapted = to_adapters(block, filter="query|value|mlp", rank={"query": 4, "mlp": 6})
        >>> adapted.attn.query.lora.get_value(), int(adapted.attn.value.rank)
        (LowRank(shape=(16, 16), capacity=8, rank=4, dtype=float32), 8)
    """
    if not isinstance(report, bool) or not isinstance(freeze, bool):
        raise TypeError("`report` and `freeze` must be bools.")
    predicate = layer_predicate(filter)  # the filter language of to_low_rank
    rngs = nnx.Rngs(0) if rngs is None else rngs
    records: list[LayerConversion] = []
    per_layer = _PerLayer(rank=rank, capacity=capacity)
    too_large: list[str] = []

    def convert(path, node):
        if not isinstance(node, nnx.Module):
            return node
        where = f"to_adapters at {_path_str(path)!r}"
        own = [k for k, v in vars(node).items() if isinstance(v, nnx.Variable)]
        if isinstance(node, LowRankAdapter):
            records.append(
                LayerConversion(_path_str(path), "LowRankAdapter", False, note="already an adapter")
            )
            return node
        if not isinstance(node, _CANDIDATES):
            if own and any(isinstance(getattr(node, k), nnx.Param | FrozenParam) for k in own):
                reason = not_a_matrix_reason(node) or (
                    f"{type(node).__name__} is not an nnx.Linear / LinearGeneral / Einsum"
                )
                records.append(
                    LayerConversion(
                        _path_str(path),
                        type(node).__name__,
                        False,
                        note=reason + ("; frozen" if freeze else ""),
                    )
                )
            return node
        if not predicate(path, node):
            records.append(
                LayerConversion(
                    _path_str(path),
                    type(node).__name__,
                    False,
                    note="excluded by `filter`" + ("; frozen" if freeze else ""),
                )
            )
            return node
        try:
            mat = matricise(node)
        except NotConvertible as e:
            records.append(
                LayerConversion(
                    _path_str(path), type(node).__name__, False, note=f"not convertible: {e}"
                )
            )
            return node
        name = _module_name(path)
        r = per_layer.get("rank", name, 8)
        c = _adapter_capacity(r, per_layer.get("capacity", name, None), mat.shape, where)
        new = LowRankAdapter(node, rank=r, capacity=c, alpha=alpha, rngs=rngs)
        note = ""
        if 2 * c > min(mat.shape):
            note = "capacity > floor(min(n, m) / 2): fixed-rank integrators only"
            too_large.append(
                f"to_adapters: the adapter on {_path_str(path)!r} ({mat.shape[0]} x "
                f"{mat.shape[1]}) has capacity {c} > floor(min(n, m) / 2) = {min(mat.shape) // 2}"
                ", so geolora and the other rank-adaptive integrators (which augment the bases "
                "to 2 * capacity columns) cannot train it; pass a rank and capacity <= "
                f"{min(mat.shape) // 2} for it (e.g. capacity={{{name!r}: "
                f"{min(mat.shape) // 2}}}), or train with a fixed-rank integrator "
                "(dlrt_jax.projector_splitting, dlrt_jax.s_only)."
            )
        records.append(
            LayerConversion(_path_str(path), type(node).__name__, True, mat.shape, r, c, None, note)
        )
        return new

    new_model = nnx.recursive_map(convert, nnx.clone(model))
    if freeze:
        for _, node in nnx.iter_graph(new_model):
            if isinstance(node, nnx.Module) and not isinstance(node, LowRankAdapter):
                _freeze_module(node)
    summary = AdapterSummary(tuple(records))
    unused = per_layer.unused()
    if not summary.converted or unused:
        raise ValueError(
            "to_adapters: `filter` selected no nnx.Linear / LinearGeneral / Einsum layer that can "
            f"take an adapter.\n{summary}"
            if not summary.converted
            else f"to_adapters: the pattern(s) {unused} match no adapted layer (module names: "
            f"{[r.path.replace('/', '.') for r in summary.converted]}; a key matches the end of "
            "a name, as PEFT's rank_pattern)."
        )
    for message in too_large:
        warnings.warn(message, UserWarning, stacklevel=2)
    _LOGGER.info("%s", summary)
    return (new_model, summary) if report else new_model


def merge_adapters(model: Any, *, unfreeze: bool = True) -> Any:
    """A new model with every :class:`LowRankAdapter` folded into its base layer.

    Each adapter becomes its base layer (``nnx.Linear``, ...) with the kernel of
    ``W0 + (alpha / r) U S V^T``: the merged model computes what the adapted one computes, at the
    dense layer's cost. With ``unfreeze=True`` every :class:`FrozenParam` becomes an
    ``nnx.Param`` again (a plain model to fine-tune or save); ``model`` is not modified.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import merge_adapters, to_adapters
        >>> model = to_adapters(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=2)
        >>> type(merge_adapters(model)).__name__
        'Linear'
    """

    def merge(path, node):
        if not isinstance(node, LowRankAdapter):
            return node
        base = node.base
        kernel = node.matricisation.to_kernel(node.merged_matrix())
        base.kernel = FrozenParam(kernel.astype(jnp.asarray(base.kernel[...]).dtype))
        return base

    new_model = nnx.recursive_map(merge, nnx.clone(model))
    if unfreeze:
        for _, node in nnx.iter_graph(new_model):
            if isinstance(node, nnx.Module):
                for name, v in list(vars(node).items()):
                    if type(v) is FrozenParam:
                        setattr(node, name, _unfreeze_variable(v))
    return new_model


def _adapters(model: Any) -> list[tuple[tuple, LowRankAdapter]]:
    return [
        (tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LowRankAdapter)
    ]


def adapter_ranks(model: Any) -> dict[str, int]:
    """``{path: current rank}`` of every :class:`LowRankAdapter` (reads the ranks: outside jit).

    Examples:
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import adapter_ranks, to_adapters
        >>> adapter_ranks(to_adapters(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=2))
        {'<root>': 2}
    """
    return {_path_str(p): int(a.rank) for p, a in _adapters(model)}


def adapter_parameters(model: Any) -> int:
    """The adapters' trainable parameters in the LoRA layout, ``sum_l r_l (n_l + m_l)``."""
    return budget_cost([a.factor for _, a in _adapters(model)])


def geolora(
    learning_rate: Any = 1e-3,
    *,
    tau: Any = 0.1,
    budget: int | None = None,
    min_rank: int = 1,
    optimizer: optax.GradientTransformation | None = None,
    augment_every: int = 1,
    coefficient_steps: str = "S",
) -> optax.GradientTransformationExtraArgs:
    """The default adapter transform: :func:`dlrt_jax.parallel_bug` (GeoLoRA's integrator).

    ``parallel_bug(optimizer, tau=tau, min_rank=min_rank)`` with ``optimizer`` defaulting to
    ``optax.adam(learning_rate)``: one gradient evaluation and one SVD of a ``2c x 2c`` matrix
    per adapter and step, ranks chosen by the relative tolerance ``tau`` per layer. With
    ``budget`` (parameters, ``sum_l r_l (n_l + m_l)``), wrapped in :func:`with_rank_budget`:
    the ranks are then also allocated globally. Use with
    ``dlrt_jax.nnx.DLRTOptimizer(model, geolora(...))``.

    Args:
        learning_rate: Adam's learning rate (ignored when ``optimizer`` is given). ``S`` starts at
            0 and Adam moves it by about ``learning_rate`` per step, so the singular values of
            the change need about ``sigma / learning_rate`` steps to build up.
        tau: the relative truncation tolerance per layer (``None``: fixed ranks, a LoRA of rank
            ``rank`` trained by the same integrator).
        budget: a total parameter budget for all adapters (see :func:`with_rank_budget`; with a
            budget, ``optimizer=optax.sgd(lr, momentum=0.9)`` keeps the singular values of
            different layers comparable, Adam blurs them).
        min_rank: the least rank of every adapter.
        optimizer: the inner optax transform of the K-, L- and S-steps (default
            ``optax.adam(learning_rate)``).
        augment_every: GeoLoRA's cycle (``parallel_bug``'s ``augment_every``): augment every
            ``k`` steps, train ``S`` only in between, truncate at the cycle's end. Not with a
            ``budget`` (the budget cuts after every step, so it would cut the augmented ranks).
        coefficient_steps: in a cycle, ``"S"`` (GeoLoRA: only ``S`` moves between
            augmentations) or ``"KLS"`` (the integrator's step at a fixed rank; see
            :func:`dlrt_jax.bug`).

    Examples:
        >>> from dlrt_jax.adapters import geolora
        >>> tx = geolora(1e-3, tau=0.05, budget=10_000)
    """
    if budget is not None and augment_every != 1:
        raise ValueError(
            f"geolora: `budget` with `augment_every`={augment_every} is not supported: the budget "
            "cuts the ranks after every step, the augmented ones included. Pass one of them."
        )
    inner = optax.adam(learning_rate) if optimizer is None else optimizer
    tx = parallel_bug(
        inner,
        tau=tau,
        min_rank=min_rank,
        augment_every=augment_every,
        coefficient_steps=coefficient_steps,
    )
    return tx if budget is None else with_rank_budget(tx, budget, min_rank=min_rank)


# ---- PEFT LoRA layout ----------------------------------------------------------------------------


def _safetensors_numpy():
    """``safetensors.numpy``, or an ``ImportError`` that gives the install line."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise ImportError(
            'The PEFT files need the safetensors package: pip install "dlrt-jax[peft]" (or, in a '
            'clone of dlrt_jax, pip install ".[peft]").'
        ) from e
    return safetensors.numpy


def _json_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def export_peft(
    model: Any,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = np.float32,
    root_name: str = "0",
) -> dict[str, Any]:
    r"""Write the adapters in PEFT's LoRA layout: ``adapter_config.json`` + safetensors weights.

    For each :class:`LowRankAdapter` at module path ``p`` (the path's parts joined by ``.``, as
    torch names modules) with current rank ``k`` (the active block only):

    * ``base_model.model.<p>.lora_A.weight`` = ``V[:, :k]^T`` (``k x m``, torch's ``(out, in)``
      layout of a ``Linear(m, k)``) and ``base_model.model.<p>.lora_B.weight`` =
      ``U[:, :k] S[:k, :k]`` (``n x k``), so ``B A = U S V^T``;
    * ``rank_pattern[p] = k`` and ``alpha_pattern[p] = (alpha / r) k``, so that PEFT's
      ``W0 + (alpha_pattern / rank_pattern) B A`` is exactly this layer.

    ``m`` and ``n`` are the matricised sizes: an attention projection ``in -> (heads, head_dim)``
    exports as a ``Linear(in, heads * head_dim)`` with the heads-major flattening of
    ``reshape``. The config has ``peft_type 'LORA'``, ``target_modules`` (the paths),
    ``r``/``lora_alpha`` (the adapters' common ``r`` and ``alpha``, the largest if they differ),
    ``rank_pattern``, ``alpha_pattern``, ``bias 'none'``, ``fan_in_fan_out false``,
    ``use_rslora false``, ``lora_dropout 0``, and ``lora_bias`` (``true`` when an adapter holds a
    bias that :func:`import_peft` folded into its base layer: each module's ``lora_B.bias`` is
    then that bias over the module's scaling, zero for the others). PEFT reads a pattern key as a
    regular expression matched against the end of a module name and takes the first that
    matches, so the patterns are written deepest path first; ``target_modules`` entries are
    suffixes too, so a module elsewhere with the same trailing name also gets a
    (zero-initialised, inactive) LoRA in PEFT. Needs the ``safetensors`` package
    (``pip install "dlrt-jax[peft]"``); reads the ranks, so call it outside ``jit``.

    PEFT never adapts a model's root module (it skips the empty module name), so an adapter on
    the root (the model is one layer) is written as the module ``root_name`` (default ``'0'``):
    in torch, load the file into ``torch.nn.Sequential(layer)``, whose one child is ``'0'``;
    :func:`import_peft` reads ``root_name`` back as the root.

    Args:
        model: the adapted model.
        directory: where to write the two files (created if missing).
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        dtype: the dtype of the stored tensors (default float32).
        root_name: the module name of an adapter on the model's root (see above).

    Returns:
        The config written.

    Examples:
        >>> import tempfile
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import export_peft, to_adapters
        >>> model = to_adapters(nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0))), rank=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     config = export_peft(model, d)
        >>> config["target_modules"], config["rank_pattern"], config["alpha_pattern"]
        (['layers.0'], {'layers.0': 2}, {'layers.0': 2})
    """
    save_file = _safetensors_numpy().save_file
    found = _adapters(model)
    if not found:
        raise ValueError("export_peft: the model has no LowRankAdapter (see to_adapters).")
    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    # PEFT takes the first pattern key that matches the end of a module name: deeper paths first,
    # so that "fc1" cannot take the rank of "block.fc1"
    found = sorted(found, key=lambda pa: (-len(pa[0]), _module_name(pa[0])))
    for path, a in found:
        name = _module_name(path) or root_name
        U, S, V = (np.asarray(t, np.float64) for t in a.factor.masked())
        k = int(a.rank)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            V[:, :k].T.astype(dtype)
        )
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            (U[:, :k] @ S[:k, :k]).astype(dtype)
        )
        rank_pattern[name] = k
        alpha_pattern[name] = _json_number(a.scale * k)
    lora_bias = any(a.lora_bias is not None for _, a in found)
    for path, a in found if lora_bias else ():  # PEFT's forward adds scaling * lora_B.bias
        n = a.matricisation.shape[0]
        b = np.zeros(n) if a.lora_bias is None else np.asarray(a.lora_bias[...], np.float64)
        tensors[f"{PEFT_PREFIX}{_module_name(path) or root_name}.lora_B.bias"] = (
            b / a.scale
        ).astype(dtype)
    r = max(a.r for _, a in found)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _json_number(max(a.scale for _, a in found) * r),
        "target_modules": sorted(rank_pattern),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    return config


def _factor_from_lora(
    B: np.ndarray, A: np.ndarray, mult: float, capacity: int, dtype: Any, seed: int
) -> LowRank:
    """``mult * B A`` as a ``LowRank`` of rank ``k`` (``B`` ``n x k``, ``A`` ``k x m``) in
    ``capacity`` columns, the inactive ones an orthonormal completion."""
    n, k = B.shape
    m = A.shape[1]
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    P, sigma, Qt = np.linalg.svd(mult * Rb @ Ra.T)
    U, V = Qb @ P, Qa @ Qt.T
    rng = np.random.default_rng(seed)

    def complete(Q, rows):
        X = rng.standard_normal((rows, capacity - k))
        X -= Q @ (Q.T @ X)
        X -= Q @ (Q.T @ X)
        return np.concatenate([Q, np.linalg.qr(X)[0]], axis=1)

    S = np.zeros((capacity, capacity))
    S[np.arange(k), np.arange(k)] = sigma
    return LowRank(
        jnp.asarray(complete(U, n), dtype),
        jnp.asarray(S, dtype),
        jnp.asarray(complete(V, m), dtype),
        k,
    )


# What import_peft does with each key of PEFT's LoraConfig (peft 0.22, adapter_config.json).
# Applied: the loaded function is read from these keys.
_PEFT_APPLIED = frozenset(
    ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_bias")
)
# Informational: no value of these changes the loaded function.
_PEFT_INFORMATIONAL = frozenset(
    (
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",  # training only
        # which modules PEFT wraps: here the file's tensors decide (a module PEFT wraps without
        # tensors has B = 0 and computes its base layer)
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "megatron_config",  # Megatron's parallel layers compute the same function
        "megatron_core",
        "runtime_config",  # where PEFT computes (GPU offload)
        "eva_config",  # EVA's initialisation, replaced by the file's tensors
        "qalora_group_size",  # read only with use_qalora (refused)
    )
)
# Options that change the function: accepted only at these values (PEFT's defaults, and the
# initialisations that leave the base weights alone), else refused with the reason given.
_CONVERT_FIRST = (
    "this initialisation changes the base weights; save the adapter as a plain LoRA with peft's "
    "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
)
_PEFT_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "bias": (("none",), "trained biases of the base layers"),
    "fan_in_fan_out": ((False,), "transposed (Conv1D) weights"),
    "use_dora": ((False,), "DoRA's magnitude vectors"),
    "modules_to_save": (
        (None, []),
        "full trained copies of these modules replace the pretrained ones; load their weights "
        "into the model yourself and drop the key",
    ),
    "init_lora_weights": ((True, False, "gaussian", "eva", "orthogonal"), _CONVERT_FIRST),
    "loftq_config": ((None, {}), "LoftQ's quantised base weights"),
    "corda_config": ((None,), _CONVERT_FIRST),
    "astra_config": ((None,), _CONVERT_FIRST),
    "lora_ga_config": ((None,), _CONVERT_FIRST),
    "trainable_token_indices": ((None,), "trained embedding rows"),
    "alora_invocation_tokens": ((None,), "aLoRA: active only after the invocation tokens"),
    "use_qalora": ((False,), "QALoRA's pooled inputs"),
    "layer_replication": ((None,), "replicated layers"),
    "target_parameters": ((None, []), "LoRA on parameters, not modules"),
    "ensure_weight_tying": ((False,), "adapters tied across modules"),
    "velora_config": ((None,), "a LoRA variant"),
    "monteclora_config": ((None,), "a LoRA variant"),
    "kasa_config": ((None,), "a LoRA variant"),
    "arrow_config": ((None,), "a LoRA variant (routing among adapters)"),
    "use_bdlora": ((None, False), "a LoRA variant"),
}


def _peft_config_problems(config: dict) -> list[str]:
    """Every option of ``config`` that :func:`import_peft` would neither apply nor may ignore."""
    problems = [] if config.get("peft_type") == "LORA" else ["`peft_type`: not a LoRA adapter"]
    for key, value in config.items():
        if key in _PEFT_APPLIED or key in _PEFT_INFORMATIONAL:
            continue
        allowed, why = _PEFT_NEUTRAL.get(key, ((None, False, [], {}), "an unknown PEFT option"))
        if not any(value == a and type(value) is type(a) for a in allowed):
            problems.append(f"`{key}: {json.dumps(value)}` ({why})")
    return problems


def _peft_tensors(tensors: dict, lora_bias: bool) -> tuple[dict[str, dict], list[str]]:
    """``{module name: {'lora_A.weight': A, 'lora_B.weight': B[, 'lora_B.bias': b]}}`` (float64)
    and what is wrong with the file's tensors."""
    roles = ("lora_A.weight", "lora_B.weight") + (("lora_B.bias",) if lora_bias else ())
    modules: dict[str, dict] = {}
    unknown = []
    for key, value in tensors.items():
        role = next((r for r in roles if key.startswith(PEFT_PREFIX) and key.endswith(r)), None)
        if role is None:
            unknown.append(key)
            continue
        name = key[len(PEFT_PREFIX) : -len(role) - 1]
        modules.setdefault(name, {})[role] = np.asarray(value, np.float64)
    problems = [f"unknown tensor {key!r}" for key in sorted(unknown)]
    problems += [
        f"module {nm!r} lacks its {' and '.join(r for r in roles if r not in t)}"
        for nm, t in modules.items()
        if len(t) != len(roles)
    ]
    if not modules:
        problems.append(f"no '{PEFT_PREFIX}<module>.lora_A.weight' tensors")
    return modules, problems


def _peft_module_problems(
    nm: str, layer: Any, t: dict, adapted: bool, capacity: int | None
) -> list[str]:
    """What keeps the tensors ``t`` of module ``nm`` (all present) from loading into ``layer``."""
    if layer is None:
        return [f"the model has no module at {nm!r}"]
    if adapted and not isinstance(layer, LowRankAdapter):
        return [f"module {nm!r} has no LowRankAdapter to load into"]
    try:
        mat = layer.matricisation if adapted else matricise(layer)
    except NotConvertible as e:
        return [f"module {nm!r} cannot take an adapter: {e}"]
    (n, m), A, B = mat.shape, t["lora_A.weight"], t["lora_B.weight"]
    k = A.shape[0]
    problems = []
    if A.shape != (k, m) or B.shape != (n, k):
        problems.append(
            f"{nm!r} has lora_A {A.shape}, lora_B {B.shape}; this layer needs ({k}, {m}) and "
            f"({n}, {k}) (torch's (out, in) layout of W: {n} x {m})"
        )
    elif max(k, capacity or 0) > min(n, m):
        problems.append(
            f"{nm!r}: rank {k} and `capacity`={capacity} must be <= min(n, m) = {min(n, m)}"
        )
    base = layer.base if adapted else layer
    bias = getattr(base, "bias", None) if isinstance(base, nnx.Linear | nnx.LinearGeneral) else None
    b = t.get("lora_B.bias")
    if b is not None and (bias is None or b.shape != (n,)):
        problems.append(
            f"`lora_bias: true`: module {nm!r} has no bias of {n} entries to fold its "
            f"lora_B.bias {b.shape} into (an nnx.Linear / LinearGeneral with use_bias=True)"
        )
    return problems


def import_peft(
    model: Any,
    directory: str | os.PathLike,
    *,
    capacity: int | None = None,
    freeze: bool = True,
    root_name: str = "0",
) -> Any:
    r"""Load a PEFT LoRA adapter (:func:`export_peft`'s layout) into a model; returns a new model.

    ``model`` is the pretrained model (its layers at the adapter's module paths are wrapped in
    :class:`LowRankAdapter` with ``r`` the file's rank of the module and ``alpha / r`` PEFT's
    scaling of it, the rest frozen as by :func:`to_adapters`) or an adapted one (its adapters
    keep their ``r`` and ``alpha``). Each
    module's ``scaling * B A`` (PEFT's ``scaling = alpha_pattern / rank_pattern``, or
    ``/ sqrt(rank)`` with ``use_rslora``; the global ``r``/``lora_alpha`` where a pattern has no
    entry) becomes ``(alpha / r) U S V^T`` with ``U``, ``V`` orthonormal and ``S`` diagonal of
    the file's rank ``k`` (QR of ``B`` and ``A^T`` and an SVD of the small core), in a capacity
    ``max(capacity, k)`` (default capacity as :class:`LowRankAdapter`). A module named
    ``root_name`` (or ``''``) that the model lacks is the model itself (see :func:`export_peft`).

    Every option of the config is applied or refused by name, never ignored: ``r``,
    ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` and ``lora_bias`` are
    applied (``lora_bias``: ``scaling * lora_B.bias`` is added to the frozen bias of the base
    ``nnx.Linear`` / ``LinearGeneral``, as PEFT's merge does, and kept on the adapter as
    ``lora_bias`` so that :func:`export_peft` writes it back); the informational keys
    (``task_type``, ``base_model_name_or_path``, ``revision``, ``inference_mode``,
    ``lora_dropout``, ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``megatron_config``, ``megatron_core``, ``runtime_config``,
    ``eva_config``, ``qalora_group_size``, ``auto_mapping``, ``peft_version``) are read for
    nothing (which modules get adapters is decided by the file's tensors); every other option
    (``modules_to_save``, ``use_dora``, ``fan_in_fan_out``, ``bias`` other than ``'none'``,
    initialisations that change the base weights such as ``'pissa'``, ...) is accepted only at
    its neutral value (``None``, ``False``, empty; PEFT's default), and so is a key this importer
    does not know. Tensors other than ``lora_A.weight``, ``lora_B.weight`` (and ``lora_B.bias``
    with ``lora_bias``) are refused by name.

    Raises:
        ValueError: listing every refused option and tensor, module path the model lacks, and
            tensor whose shape does not match its layer.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.adapters import export_peft, import_peft, to_adapters
        >>> pretrained = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
        >>> model = to_adapters(pretrained, rank=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     config = export_peft(model, d)
        ...     loaded = import_peft(pretrained, d)
        >>> config["target_modules"], type(loaded).__name__
        (['0'], 'LowRankAdapter')
    """
    load_file = _safetensors_numpy().load_file
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    lora_bias = config.get("lora_bias") is True
    files, problems = _peft_tensors(load_file(os.path.join(directory, WEIGHTS_NAME)), lora_bias)
    problems = _peft_config_problems(config) + problems
    layers = {
        _module_name(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
    }
    paths = {nm: nm if nm in layers or nm not in (root_name, "") else "" for nm in files}
    adapted = bool(_adapters(model))
    capacity = None if capacity is None else _check_int(capacity, "capacity", 1)
    roles = 3 if lora_bias else 2
    for nm, t in files.items():
        if len(t) == roles:  # (a missing tensor is reported above)
            problems += _peft_module_problems(nm, layers.get(paths[nm]), t, adapted, capacity)
    if problems:
        raise ValueError(
            f"import_peft: cannot load {directory} as it is (nothing was loaded):\n  "
            + "\n  ".join(problems)
        )
    r_global, alpha_global = config.get("r", 8), config.get("lora_alpha", 8)
    scaling = {}
    for nm in files:  # PEFT's scaling of each module
        r_m = _pattern(config.get("rank_pattern") or {}, nm, r_global)
        alpha_m = _pattern(config.get("alpha_pattern") or {}, nm, alpha_global)
        scaling[nm] = alpha_m / (math.sqrt(r_m) if config.get("use_rslora") else r_m)
    if not adapted:  # r = the file's rank of each module (deepest name first: its own pattern)
        deepest = sorted(files, key=lambda nm: -len(paths[nm].split(".")))
        ranks = {re.escape(paths[nm]): len(files[nm]["lora_A.weight"]) for nm in deepest}
        wanted = set(paths.values())
        model = to_adapters(
            model,
            filter=lambda path, _m: _module_name(tuple(path)) in wanted,
            rank=ranks,
            freeze=freeze,
        )
    else:
        model = nnx.clone(model)
    by_name = {_module_name(p): a for p, a in _adapters(model)}
    for i, (nm, t) in enumerate(sorted(files.items())):
        a = by_name[paths[nm]]
        if not adapted:
            a.alpha = scaling[nm] * a.r  # alpha / r is PEFT's scaling
        A, B = t["lora_A.weight"], t["lora_B.weight"]
        c = max(len(A), a.capacity if capacity is None else capacity)
        mult = scaling[nm] / a.scale
        a.lora = LowRankParam(_factor_from_lora(B, A, mult, c, a.factor.dtype, seed=i))
        if lora_bias or a.lora_bias is not None:
            _fold_lora_bias(a, scaling[nm] * t["lora_B.bias"] if lora_bias else None)
    return model


def _fold_lora_bias(a: LowRankAdapter, b: np.ndarray | None) -> None:
    """Put PEFT's ``scaling * lora_B.bias`` (``b``; ``None``: none) into the base layer's frozen
    bias, replacing what an earlier import folded in, and keep it on the adapter for
    :func:`export_peft`."""
    bias = a.base.bias
    old = 0.0 if a.lora_bias is None else np.asarray(a.lora_bias[...], np.float64)
    new = 0.0 if b is None else b
    dtype = jnp.asarray(bias[...]).dtype
    bias[...] = (np.asarray(bias[...], np.float64) + np.reshape(new - old, bias.shape)).astype(
        dtype
    )
    a.lora_bias = None if b is None else FrozenParam(jnp.asarray(b, dtype))


def _pattern(pattern: dict, name: str, default: Any) -> float:
    """PEFT's per-module value: the first key, a regular expression, that matches the end of the
    module name at a ``.`` boundary (``(.*\\.)?(key)$``, as PEFT's ``get_pattern_key``)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return float(default)
