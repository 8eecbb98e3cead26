"""Model conversion for Flax NNX: ``to_low_rank``, ``to_dense`` and the converter registry.

Implementation module of :mod:`dlrt_jax.nnx` (import the names from there). The converter table
maps a layer type to ``converter(layer, request) -> ConvertedLayer``; ``nnx.Linear`` and
``nnx.Conv`` are registered here, :mod:`dlrt_jax.transformer` registers ``nnx.LinearGeneral`` and
``nnx.Einsum`` through the public :func:`register_converter` when it is imported (and
:mod:`dlrt_jax.nnx` imports it).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flax import nnx

from dlrt_jax import _layers
from dlrt_jax._factors import default_capacity
from dlrt_jax._nnx.layers import (
    ConvertedLayer,
    LowRankConv,
    LowRankLayer,
    LowRankLinear,
    convert_dense,
)

__all__ = [
    "ConversionRequest",
    "ConversionSummary",
    "LayerConversion",
    "layer_predicate",
    "register_converter",
    "to_dense",
    "to_low_rank",
]

# ---- model conversion ----------------------------------------------------------------------------

_LOGGER = logging.getLogger("dlrt_jax.nnx")  # the public module's name
_WARN_ERROR = 1e-3  # relative weight error above which the default rank is warned about


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


def layer_predicate(filter: Any) -> Callable[[tuple, Any], bool]:
    """``filter`` in the layer filter language of :func:`to_low_rank` as ``(path, layer) -> bool``.

    Flax's filters (``nnx.filterlib``) read on layers: a string is a regular expression that must
    fully match one element of the path or the ``/``-joined path, a ``Variable`` type selects the
    layers whose ``kernel`` is one, a one-argument callable is called with the layer; the rest
    mean what they mean in flax. :func:`dlrt_jax.adapters.to_adapters` takes the same filters.

    Examples:
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import layer_predicate
        >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        >>> pred = layer_predicate("fc[12]")
        >>> pred(("block", "fc1"), layer), pred(("fc10",), layer)
        (True, False)
        >>> layer_predicate(nnx.Param)((), layer)  # its kernel is an nnx.Param
        True
    """
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
    if isinstance(node, LowRankLayer):
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


class ConversionRequest(NamedTuple):
    """What :func:`to_low_rank` asks a converter for, for one layer.

    Attributes:
        rank: the rank asked for (``None``: ``tol``, or the capacity rule).
        tol: the relative weight error bound of the truncation (``init='svd'``), or ``None``.
        capacity: the capacity asked for (``None``: ``max(floor(min(n, m) / 2), rank)``).
        init: ``'svd'`` (truncate the dense weight) or ``'random'`` (a fresh layer).
        rngs: the ``nnx.Rngs`` of ``init='random'``.
        where: the layer's place (``"to_low_rank at 'fc1'"``), to start error messages with.
    """

    rank: int | None
    tol: float | None
    capacity: int | None
    init: str
    rngs: nnx.Rngs | None
    where: str


#: ``{layer type: converter(layer, request) -> ConvertedLayer}``; see :func:`register_converter`.
_CONVERTERS: dict[type, Callable[[Any, ConversionRequest], ConvertedLayer]] = {}


def register_converter(
    layer_type: type, converter: Callable[[Any, ConversionRequest], ConvertedLayer]
) -> Callable[[Any, ConversionRequest], ConvertedLayer]:
    """Teach :func:`to_low_rank` to convert the layers of type ``layer_type``.

    ``converter(layer, request)`` gets the layer and a :class:`ConversionRequest` (the rank,
    ``tol``, capacity, ``init`` and ``rngs`` asked for this layer, and ``where``, the prefix of
    its error messages) and returns a :class:`ConvertedLayer` ``(layer, (n, m), rank, capacity,
    rel_error)``; it raises ``TypeError`` / ``ValueError`` for a layer it cannot represent. A
    layer is converted by the converter of the first type of its MRO that has one (so a subclass
    may have its own); registering a type again replaces its converter. Returns ``converter``.
    ``nnx.Linear``, ``nnx.Conv`` (here) and ``nnx.LinearGeneral``, ``nnx.Einsum``
    (:mod:`dlrt_jax.transformer`) are registered when :mod:`dlrt_jax.nnx` is imported.

    Examples:
        A layer computing ``x @ kernel`` without bias, converted through ``nnx.Linear``'s rules:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import (ConvertedLayer, LowRankLinear, register_converter,
        ...                           to_low_rank)
        >>> class Proj(nnx.Module):
        ...     def __init__(self, n_in, n_out, rngs):
        ...         self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out)))
        ...     def __call__(self, x):
        ...         return x @ self.kernel[...]
        >>> def convert_proj(layer, request):
        ...     n_in, n_out = layer.kernel.shape
        ...     dense = nnx.Linear(n_in, n_out, use_bias=False, rngs=nnx.Rngs(0))
        ...     dense.kernel[...] = layer.kernel[...]
        ...     new = LowRankLinear.from_linear(dense, rank=request.rank, tol=request.tol,
        ...                                     capacity=request.capacity)
        ...     return ConvertedLayer(new, (n_out, n_in), int(new.rank), new.capacity, None)
        >>> _ = register_converter(Proj, convert_proj)
        >>> low = to_low_rank(Proj(8, 6, nnx.Rngs(0)), rank=2)
        >>> type(low).__name__, int(low.rank), low.capacity
        ('LowRankLinear', 2, 3)
    """
    if not isinstance(layer_type, type):
        raise TypeError(f"`layer_type` must be a class, got {type(layer_type).__name__}.")
    if not callable(converter):
        raise TypeError(f"`converter` must be callable, got {type(converter).__name__}.")
    _CONVERTERS[layer_type] = converter
    return converter


def _dense_kernel_converter(cls: type, base: type):
    """The converter of ``base`` (``nnx.Linear`` / ``nnx.Conv``) to ``cls``."""

    def convert(node: Any, request: ConversionRequest) -> ConvertedLayer:
        return convert_dense(
            cls,
            base,
            node,
            rank=request.rank,
            tol=request.tol,
            capacity=request.capacity,
            init=request.init,
            rngs=request.rngs,
            where=request.where,
        )

    return convert


register_converter(nnx.Linear, _dense_kernel_converter(LowRankLinear, nnx.Linear))
register_converter(nnx.Conv, _dense_kernel_converter(LowRankConv, nnx.Conv))


def _kinds() -> str:
    return " / ".join(
        f"nnx.{t.__name__}" if t.__module__.startswith("flax.") else t.__qualname__
        for t in _CONVERTERS
    )


def _converter_for(node: Any) -> Callable[[Any, ConversionRequest], ConvertedLayer] | None:
    if isinstance(node, _layers.FactorAccessors):  # a low-rank layer or an adapter
        return None
    return next((_CONVERTERS[t] for t in type(node).__mro__ if t in _CONVERTERS), None)


def _protected_reason(path: tuple, node: Any, owners: dict[tuple, str]) -> str | None:
    """Why a convertible layer must not be touched: inside an adapter, or frozen weights."""
    inside = [p for p in owners if len(p) < len(path) and path[: len(p)] == p]
    if inside:
        owner = max(inside, key=len)
        return (
            f"inside the adapter at {_layers.path_str(owner)!r} ({owners[owner]}); conversions "
            "never touch adapters or their frozen base layers"
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

    **Which layers.** The layer types with a converter (``nnx.Linear``, ``nnx.Conv``,
    ``nnx.LinearGeneral``, ``nnx.Einsum``, and those added with :func:`register_converter`) are
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
    predicate = layer_predicate(filter)
    rank_of, capacity_of = _PerLayer("rank", rank), _PerLayer("capacity", capacity)
    records: list[LayerConversion] = []
    model = nnx.clone(model)
    owners = _factor_owners(model)

    def convert(path, node):
        converter, name = _converter_for(node), (_layers.path_str(path), type(node).__name__)
        protected = None if converter is None else _protected_reason(path, node, owners)
        if converter is None or protected or not predicate(path, node):
            reason = _skip_reason(node) if converter is None else protected
            if reason is not None or converter is not None:
                records.append(LayerConversion(*name, False, note=reason or "excluded by `filter`"))
            return node
        where = f"to_low_rank at {name[0]!r}"
        layer_rank = rank_of(path)
        layer_tol = None if layer_rank is not None else tol
        request = ConversionRequest(layer_rank, layer_tol, capacity_of(path), init, rngs, where)
        new, shape, *fit = _wrap_errors(where, converter, node, request)
        note = ""
        if fit[1] > default_capacity(shape):
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


def to_dense(model: Any) -> Any:
    r"""Replace every NNX low-rank layer of a model by the dense Flax layer it computes.

    The inverse of :func:`to_low_rank`: a new model (``model`` is not modified) in which each
    :class:`~dlrt_jax.nnx.LowRankLinear` / :class:`~dlrt_jax.nnx.LowRankConv` (and
    :mod:`dlrt_jax.transformer`'s ``LowRankLinearGeneral`` / ``LowRankEinsum``) becomes the
    ``nnx.Linear`` / ``nnx.Conv`` (``nnx.LinearGeneral`` / ``nnx.Einsum``) with the kernel of
    ``W = U S V^T`` over the active rank (formed once here), the same bias, dtypes and
    configuration: the model computes the same function (to rounding). Adapters are left as they
    are (:func:`dlrt_jax.adapters.merge_adapters` folds them). Use it to hand a trained model to
    code that expects plain Flax layers; a low-rank layer is cheaper to run while
    ``r (n + m) < n m``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear, to_dense
        >>> model = nnx.Sequential(LowRankLinear(8, 6, rank=2, rngs=nnx.Rngs(0)), nnx.relu)
        >>> dense = to_dense(model)
        >>> type(dense.layers[0]).__name__, dense.layers[0].kernel.shape
        ('Linear', (8, 6))
        >>> x = jnp.ones((3, 8))
        >>> bool(jnp.allclose(dense(x), model(x), atol=1e-5))
        True
    """

    def densify(_path, node):
        return node.as_dense_layer() if isinstance(node, LowRankLayer) else node

    return nnx.recursive_map(densify, nnx.clone(model))
