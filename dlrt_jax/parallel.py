"""Data- and model-parallel DLRT training steps on JAX's own sharding (``jax.jit`` + meshes).

**Data parallelism.** The batch is split over the ``"data"`` axis of a device mesh and the
factors are replicated. Inside the jitted step the gradient of the mean loss is reduced across
devices by XLA (an all-reduce), *before* any basis arithmetic; every device then runs the same
QR and SVD on the same, already reduced, data, so the bases stay bit-identical and orthonormal
on all devices. Bases are never averaged (an average of orthonormal bases is not orthonormal).

**Model parallelism for large factors.** With a ``"model"`` axis, ``U`` (``n x c``) and ``V``
(``m x c``) are split by rows over that axis, as are the ``K``/``L`` moments of the inner
optimiser; ``S``, the ranks and everything else are replicated. XLA gathers what the QR/SVD need;
the result matches the unsharded step to float32 round-off (the tests use ``1e-5``).

Multi-host use: call ``jax.distributed.initialize()`` in every process first, build the mesh over
``jax.devices()`` (all hosts' devices), give every process its own slice of the batch through
:func:`shard_batch` (it assembles the global batch with
``jax.make_array_from_process_local_data``), and run the same step in every process; see
``docs/reliability.md``. The one-host data-parallel step in plain JAX, and what this module adds
to it, are in ``docs/recipes.md``.

Examples:
    >>> import jax, jax.numpy as jnp, optax, dlrt_jax
    >>> from dlrt_jax import parallel
    >>> mesh = parallel.make_mesh()  # all devices on the "data" axis
    >>> params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
    >>> def loss_fn(p, batch):
    ...     x, y = batch
    ...     return jnp.mean((dlrt_jax.lowrank_apply(p["w"], x) - y) ** 2)
    >>> tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
    >>> step = parallel.data_parallel_step(tx, loss_fn, mesh)
    >>> params, opt_state = parallel.replicate((params, tx.init(params)), mesh)
    >>> batch = (jnp.ones((16, 6)), jnp.zeros((16, 8)))
    >>> params, opt_state, loss = step(params, opt_state, batch)
    >>> params["w"].U.sharding.is_fully_replicated
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlrt_jax._factors import LowRank, is_lowrank
from dlrt_jax._step import make_train_step

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "batch_sharding",
    "data_parallel_step",
    "make_mesh",
    "param_shardings",
    "replicate",
    "shard_batch",
    "shard_state",
    "state_shardings",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(
    data: int | None = None, model: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``(data, model)`` device mesh with axis names ``"data"`` and ``"model"``.

    Args:
        data: size of the data axis; default ``len(devices) // model``.
        model: size of the model axis (1: pure data parallelism).
        devices: the devices to use (default ``jax.devices()``, all hosts' devices).

    Examples:
        >>> from dlrt_jax.parallel import make_mesh
        >>> mesh = make_mesh()
        >>> mesh.axis_names, mesh.shape["model"]
        (('data', 'model'), 1)
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ValueError(f"`model` must be an integer >= 1, got {model!r}.")
    if data is None:
        data = len(devices) // model
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(
            f"`data` must be an integer >= 1 (with model={model} and {len(devices)} devices), "
            f"got {data!r}."
        )
    if data * model > len(devices):
        raise ValueError(
            f"a {data} x {model} mesh needs {data * model} devices, only {len(devices)} available."
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _check_axis(mesh: Mesh, axis: str | None, name: str) -> None:
    if axis is not None and axis not in mesh.axis_names:
        raise ValueError(f"`{name}`={axis!r} is not an axis of the mesh {mesh.axis_names}.")


def batch_sharding(mesh: Mesh, *, batch_axis: str = DATA_AXIS) -> NamedSharding:
    """The sharding of a batch: leading axis split over ``batch_axis``, the rest replicated."""
    _check_axis(mesh, batch_axis, "batch_axis")
    return NamedSharding(mesh, P(batch_axis))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array replicated on all devices of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh, *, batch_axis: str = DATA_AXIS) -> Any:
    """Split every leaf of ``batch`` along its leading axis over ``batch_axis``.

    In a single process, ``batch`` is the global batch. With several processes
    (``jax.distributed``), each passes its own slice and the global batch is assembled with
    ``jax.make_array_from_process_local_data``. The global batch size must be divisible by the
    size of ``batch_axis``.
    """
    sharding = batch_sharding(mesh, batch_axis=batch_axis)
    size = mesh.shape[batch_axis]
    multi = jax.process_count() > 1

    def put(path, x):
        shape = np.shape(x)
        if len(shape) < 1:
            raise ValueError(f"batch{jax.tree_util.keystr(path)} has no leading (batch) axis.")
        global_n = shape[0] * (jax.process_count() if multi else 1)
        if global_n % size:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: the global batch size {global_n} must be "
                f"divisible by the size {size} of the mesh axis {batch_axis!r}."
            )
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


def _rows(mesh: Mesh, model_axis: str, shape: tuple[int, ...], where: str) -> NamedSharding:
    size = mesh.shape[model_axis]
    if shape[0] % size:
        raise ValueError(
            f"{where}: {shape[0]} rows cannot be split evenly over the {size} devices of the "
            f"mesh axis {model_axis!r}; choose a model axis size that divides it, or leave this "
            "model replicated (model_axis=None)."
        )
    return NamedSharding(mesh, P(model_axis, None))


def param_shardings(params: Any, mesh: Mesh, *, model_axis: str | None = None) -> Any:
    """Shardings for ``params``: replicated, or with ``U``/``V`` split by rows over ``model_axis``.

    Returns a tree of ``NamedSharding`` shaped like ``params`` (a ``LowRank`` of shardings at
    each factor). ``S`` and ``rank`` are always replicated, as is every leaf that is not a
    ``LowRank``. Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct``.
    """
    _check_axis(mesh, model_axis, "model_axis")
    rep = NamedSharding(mesh, P())

    def one(path, x):
        if not is_lowrank(x) or model_axis is None:
            return jax.tree_util.tree_map(lambda _: rep, x)
        where = "params" + jax.tree_util.keystr(path)
        u = _rows(mesh, model_axis, x.U.shape, where + ".U")
        v = _rows(mesh, model_axis, x.V.shape, where + ".V")
        return LowRank.tree_unflatten(None, (u, rep, v, rep))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_lowrank)


def state_shardings(
    opt_state: Any, params: Any, mesh: Mesh, *, model_axis: str | None = None
) -> Any:
    """Shardings for an optimiser state built for ``params``.

    Replicated, except (with ``model_axis``) the leaves shaped like a factor's ``U`` (``n x c``)
    or ``V`` (``m x c``): the inner optimiser's moments of the K- and L-steps, split by rows like
    ``U`` and ``V``. The rule reads shapes only, so it holds for any state layout (``optax.chain``,
    ``inject_hyperparams``, ...).
    """
    _check_axis(mesh, model_axis, "model_axis")
    rep = NamedSharding(mesh, P())
    row_shapes = set()
    if model_axis is not None:
        for x in jax.tree_util.tree_leaves(params, is_leaf=is_lowrank):
            if is_lowrank(x):
                row_shapes |= {tuple(x.U.shape), tuple(x.V.shape)}

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if shape not in row_shapes:
            return rep
        return _rows(mesh, model_axis, shape, "opt_state" + jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(one, opt_state)


def shard_state(
    params: Any, opt_state: Any, mesh: Mesh, *, model_axis: str | None = None
) -> tuple[Any, Any]:
    """Place ``params`` and ``opt_state`` with :func:`param_shardings` / :func:`state_shardings`.

    Examples:
        >>> import jax, dlrt_jax
        >>> from dlrt_jax import parallel
        >>> mesh = parallel.make_mesh()
        >>> p = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
        >>> tx = dlrt_jax.bug(0.1, tau=0.1)
        >>> p, s = parallel.shard_state(p, tx.init(p), mesh, model_axis="model")
        >>> p["w"].U.sharding.spec == jax.sharding.PartitionSpec("model", None)
        True
    """
    ps = param_shardings(params, mesh, model_axis=model_axis)
    ss = state_shardings(opt_state, params, mesh, model_axis=model_axis)
    return jax.device_put(params, ps), jax.device_put(opt_state, ss)


def data_parallel_step(
    tx: optax.GradientTransformation,
    loss_fn: Callable[[Any, Any], jax.Array],
    mesh: Mesh,
    *,
    batch_axis: str = DATA_AXIS,
    model_axis: str | None = None,
    donate: bool = False,
) -> Callable[[Any, Any, Any], tuple[Any, Any, jax.Array]]:
    """A jitted training step with the batch sharded over ``batch_axis`` of ``mesh``.

    ``step(params, opt_state, batch) -> (params, opt_state, loss)``: the step of
    :func:`dlrt_jax.make_train_step` compiled with ``in_shardings``/``out_shardings`` (factors
    replicated, or ``U``/``V`` split by rows over ``model_axis``; built once per tree structure
    and shapes). ``loss_fn(params, batch)`` must return the *mean* loss over the batch, so that
    XLA reduces the gradients across the batch shards before the K-, L- and S-steps, and every
    device then performs identical QR/SVD.

    Args:
        tx: the optimiser, e.g. ``dlrt_jax.bug(optax.adam(1e-3), tau=0.1)``, or any optax
            transform.
        loss_fn: ``(params, batch) -> scalar`` mean loss.
        mesh: the device mesh (see :func:`make_mesh`).
        batch_axis: mesh axis the batch's leading axis is split over.
        model_axis: mesh axis to split ``U``/``V`` rows over, or ``None`` to replicate.
        donate: donate the ``params`` and ``opt_state`` buffers to the step (saves memory on
            accelerators; the inputs are then invalid after the call).

    Returns:
        The step function.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    _check_axis(mesh, batch_axis, "batch_axis")
    _check_axis(mesh, model_axis, "model_axis")
    if model_axis is not None and model_axis == batch_axis:
        raise ValueError("`model_axis` and `batch_axis` must be different mesh axes.")
    train_step = make_train_step(loss_fn, tx, jit=False)  # validates tx and loss_fn
    size = mesh.shape[batch_axis]
    compiled: dict[Any, tuple[Callable, Any]] = {}

    def run(params, opt_state, batch):
        for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
            if np.ndim(x) < 1 or np.shape(x)[0] % size:
                raise ValueError(
                    f"batch{jax.tree_util.keystr(path)} with shape {np.shape(x)}: the batch size "
                    f"must be divisible by the size {size} of the mesh axis {batch_axis!r}."
                )
        leaves, treedef = jax.tree_util.tree_flatten((params, opt_state, batch))
        key = (treedef, tuple(getattr(x, "shape", None) for x in leaves))
        if key not in compiled:
            ps = param_shardings(params, mesh, model_axis=model_axis)
            ss = state_shardings(opt_state, params, mesh, model_axis=model_axis)
            bs = jax.tree_util.tree_map(
                lambda _: batch_sharding(mesh, batch_axis=batch_axis), batch
            )
            fn = jax.jit(
                train_step,
                in_shardings=(ps, ss, bs),
                out_shardings=(ps, ss, NamedSharding(mesh, P())),
                donate_argnums=(0, 1) if donate else (),
            )
            compiled[key] = fn, (ps, ss, bs)
        fn, shardings = compiled[key]
        # Place the inputs first (a no-op for arrays already there): jit's cache tells arrays on
        # a mesh from uncommitted ones, so the outputs of one step must look like its inputs.
        return fn(*jax.device_put((params, opt_state, batch), shardings))

    return run
