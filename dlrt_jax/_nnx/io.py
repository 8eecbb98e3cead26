"""Saving NNX models: checkpoints across capacity changes, and the ``U``/``S``/``V`` export.

Implementation module of :mod:`dlrt_jax.nnx` (import the names from there).

* :func:`save_checkpoint` / :func:`restore_checkpoint`: the whole training state of a model and
  its ``nnx.Optimizer`` through :mod:`dlrt_jax.checkpoint` (orbax). The restore first resizes a
  freshly built model and optimiser to the capacities stored in the checkpoint, so a run whose
  capacities :func:`~dlrt_jax.nnx.apply_capacity_policy` / :func:`~dlrt_jax.nnx.fit_capacity`
  changed resumes from the model's constructor, without reading metadata by hand.
* :func:`export_low_rank` / :func:`load_low_rank`: the trained weights for inference or sharing:
  per low-rank layer ``U`` (``n x r``), ``S`` (``r x r``), ``V`` (``m x r``) at the active rank
  ``r`` only, and every other array variable (biases, dense layers, norms), in one safetensors
  file, with a JSON file of the ranks and shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrt_jax import checkpoint as _checkpoint
from dlrt_jax._capacity import resize_capacity
from dlrt_jax._factors import LowRank, is_lowrank
from dlrt_jax._layers import cast, path_str
from dlrt_jax._nnx.layers import LowRankParam
from dlrt_jax._nnx.train import check_optimizer, pure_states, write_back

__all__ = [
    "EXPORT_JSON",
    "EXPORT_WEIGHTS",
    "export_low_rank",
    "load_low_rank",
    "restore_checkpoint",
    "save_checkpoint",
]

#: The file names :func:`export_low_rank` writes in its directory.
EXPORT_WEIGHTS = "low_rank.safetensors"
EXPORT_JSON = "low_rank.json"
_FORMAT = "dlrt_jax.nnx.export_low_rank"


# ---- checkpoints ---------------------------------------------------------------------------------


def _training_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
    """What a checkpoint holds: trained parameters, the rest of the model's state (batch
    statistics, RNG counters), the optimiser state and its step count, as pure trees."""
    params, opt_state = pure_states(model, optimizer)
    rest = nnx.as_pure(nnx.state(model, nnx.Not(optimizer.wrt)))
    return {"params": params, "rest": rest, "opt_state": opt_state, "step": optimizer.step[...]}


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_to_keep: int | None = None,
) -> None:
    """Save ``model`` and ``optimizer`` as checkpoint ``step`` of ``directory``.

    :func:`dlrt_jax.checkpoint.save_checkpoint` of the parameters (every ``LowRank`` with its
    capacity and rank), the rest of the model's state, the optimiser state and
    ``optimizer.step``; ``metadata`` (JSON-serialisable: integrator, ``tau``, ...) is stored and
    checked again by :func:`restore_checkpoint`. Atomic and synchronous; needs
    ``orbax-checkpoint``.

    Examples:
        See :func:`restore_checkpoint`.
    """
    check_optimizer(optimizer, "save_checkpoint")
    state = _training_state(model, optimizer)
    _checkpoint.save_checkpoint(directory, step, state, metadata=metadata, max_to_keep=max_to_keep)


def _stored_capacities(params: Any, factors: Mapping[str, Any]) -> dict[int, int]:
    """``{id(factor): capacity}`` of the factors of ``params`` whose stored capacity differs."""
    flat = jax.tree_util.tree_flatten_with_path({"params": params}, is_leaf=is_lowrank)[0]
    out = {}
    for path, x in flat:
        stored = factors.get(jax.tree_util.keystr(path))
        if is_lowrank(x) and stored is not None and stored["capacity"] != x.capacity:
            out[id(x)] = int(stored["capacity"])
    return out


def restore_checkpoint(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Restore checkpoint ``step`` (default: the latest) into ``model`` and ``optimizer``, in place.

    ``model`` and ``optimizer`` are built as for training (fresh, at the constructors'
    capacities). Every factor whose capacity in the checkpoint differs (a
    :class:`dlrt_jax.CapacityPolicy` or :func:`~dlrt_jax.nnx.fit_capacity` resized it during the
    run) is first resized, with its optimiser moments, to the stored capacity; then the
    parameters, the rest of the model's state, the optimiser state and ``optimizer.step`` are
    read. Any other difference (a layer more or less, a different shape or dtype, differing
    ``metadata``) raises :class:`dlrt_jax.checkpoint.CheckpointMismatchError` naming it.

    Returns:
        The checkpoint's step number (to continue the loop from).

    Examples:
        >>> import tempfile, optax
        >>> from flax import nnx
        >>> import dlrt_jax
        >>> from dlrt_jax.nnx import (LowRankLinear, apply_capacity_policy, restore_checkpoint,
        ...                           save_checkpoint)
        >>> def build():
        ...     model = LowRankLinear(64, 64, rank=3, capacity=32, rngs=nnx.Rngs(0))
        ...     tx = dlrt_jax.bug(optax.adam(1e-3), tau=0.1)
        ...     return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> model, optimizer = build()
        >>> policy = dlrt_jax.CapacityPolicy(every=1, headroom=1.25, min_free=4, multiple=8)
        >>> apply_capacity_policy(policy, 1, model, optimizer)  # capacity 32 -> 8
        True
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint(d, 1, model, optimizer, metadata={"tau": 0.1})
        >>> fresh, fresh_optimizer = build()  # capacity 32 again
        >>> restore_checkpoint(d, fresh, fresh_optimizer, metadata={"tau": 0.1})
        1
        >>> fresh.capacity, int(fresh.rank)
        (8, 3)
    """
    check_optimizer(optimizer, "restore_checkpoint")
    stored = _checkpoint.checkpoint_metadata(directory, step)
    params, opt_state = pure_states(model, optimizer)
    capacities = _stored_capacities(params, stored.get("factors", {}))
    if capacities:
        params, opt_state = resize_capacity(
            params, opt_state, lambda x: capacities.get(id(x), x.capacity)
        )
        write_back(model, optimizer, params, opt_state)
    restored = _checkpoint.restore_checkpoint(
        directory, _training_state(model, optimizer), step=step, metadata=metadata
    )
    nnx.update(model, restored["rest"])
    write_back(model, optimizer, restored["params"], restored["opt_state"])
    optimizer.step[...] = restored["step"]
    return _checkpoint.latest_step(directory) if step is None else int(step)


# ---- export --------------------------------------------------------------------------------------


def _safetensors_numpy():
    try:
        import safetensors.numpy as st
    except ImportError as e:
        raise ImportError(
            "export_low_rank / load_low_rank need the safetensors package: "
            'pip install "dlrt-jax[peft]" (or pip install safetensors).'
        ) from e
    return st


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{path: Variable}`` of the model's arrays worth exporting (not its RNG state)."""
    return {
        path_str(path): v
        for path, v in nnx.to_flat_state(nnx.state(model))
        if isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)
    }


def export_low_rank(model: nnx.Module, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the weights of a trained low-rank model: ``U``, ``S``, ``V`` at the active rank.

    For every :class:`~dlrt_jax.nnx.LowRankParam` at path ``p`` (``'block/fc1/kernel'``) the
    tensors ``p.U`` (``n x r``), ``p.S`` (``r x r``) and ``p.V`` (``m x r``) of the active rank
    ``r`` (``W = U S V^T``; the inactive columns of the capacity are left out), and every other
    array variable (biases, dense layers, norms, batch statistics) under its path, go into
    ``directory/low_rank.safetensors``; ``directory/low_rank.json`` lists each factor's shape
    ``(n, m)``, rank and capacity and each array's shape and dtype. :func:`load_low_rank` reads
    them back into a model built as this one. Needs ``safetensors`` (``pip install
    "dlrt-jax[peft]"``).

    Returns:
        The JSON description that was written.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from flax import nnx
        >>> from dlrt_jax.nnx import LowRankLinear, export_low_rank, load_low_rank
        >>> model = LowRankLinear(16, 8, rank=2, capacity=4, rngs=nnx.Rngs(0))
        >>> d = tempfile.mkdtemp()
        >>> export_low_rank(model, d)["factors"]
        {'kernel': {'shape': [8, 16], 'rank': 2, 'capacity': 4, 'dtype': 'float32'}}
        >>> other = load_low_rank(LowRankLinear(16, 8, rank=4, capacity=4, rngs=nnx.Rngs(1)), d)
        >>> int(other.rank), bool(jnp.allclose(other(jnp.ones((1, 16))), model(jnp.ones((1, 16)))))
        (2, True)
    """
    st = _safetensors_numpy()
    tensors: dict[str, np.ndarray] = {}
    factors: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for name, v in _variables(model).items():
        value = v.get_value()
        if isinstance(value, LowRank):
            r = int(value.active_rank)
            tensors[f"{name}.U"] = np.asarray(value.U[:, :r])
            tensors[f"{name}.S"] = np.asarray(value.S[:r, :r])
            tensors[f"{name}.V"] = np.asarray(value.V[:, :r])
            n, m = value.shape
            factors[name] = {
                "shape": [int(n), int(m)],
                "rank": r,
                "capacity": value.capacity,
                "dtype": str(value.dtype),
            }
        elif isinstance(value, jax.Array | np.ndarray):
            tensors[name] = np.asarray(value)
            arrays[name] = {"shape": list(np.shape(value)), "dtype": str(value.dtype)}
    description = {"format": _FORMAT, "version": 1, "factors": factors, "arrays": arrays}
    os.makedirs(directory, exist_ok=True)
    st.save_file(tensors, os.path.join(directory, EXPORT_WEIGHTS), metadata={"format": _FORMAT})
    with open(os.path.join(directory, EXPORT_JSON), "w") as f:
        json.dump(description, f, indent=1)
    return description


def load_low_rank(model: nnx.Module, directory: str | os.PathLike[str]) -> nnx.Module:
    """Read what :func:`export_low_rank` wrote into ``model`` (built as the exported one), in place.

    Each factor is set to the exported ``U S V^T`` at its rank, at the model's capacity (or at
    the rank, when that is larger: the capacity then grows), so ``model`` computes the exported
    function; every other exported array is set as it was. Raises ``ValueError`` naming every
    path that the model and the files do not share, or whose shape differs. Returns ``model``.
    Examples: see :func:`export_low_rank`.
    """
    st = _safetensors_numpy()
    with open(os.path.join(directory, EXPORT_JSON)) as f:
        description = json.load(f)
    if description.get("format") != _FORMAT:
        raise ValueError(f"{directory}/{EXPORT_JSON} was not written by export_low_rank.")
    tensors = st.load_file(os.path.join(directory, EXPORT_WEIGHTS))
    variables = _variables(model)
    factors, arrays = description["factors"], description["arrays"]
    exported = factors.keys() | arrays.keys()
    problems = [
        f"{p}: in the export, not in the model" for p in sorted(exported - variables.keys())
    ]
    problems += [
        f"{p}: in the model, not in the export" for p in sorted(variables.keys() - exported)
    ]
    for name, info in factors.items():
        v = variables.get(name)
        if v is not None and not isinstance(v, LowRankParam):
            problems.append(f"{name}: a low-rank factor in the export, a {type(v).__name__} here")
        elif v is not None and list(v.get_value().shape) != info["shape"]:
            problems.append(f"{name}: W is {info['shape']} in the export, {list(v.shape)} here")
    for name, info in arrays.items():
        v = variables.get(name)
        if v is not None and list(np.shape(v.get_value())) != info["shape"]:
            problems.append(f"{name}: shape {info['shape']} in the export, {v.shape} here")
    if problems:
        raise ValueError(
            "load_low_rank: the model does not match the export; build it as the exported "
            "model was built:\n  " + "\n  ".join(problems)
        )
    for name in factors:
        old = variables[name].get_value()
        lr = LowRank(*(jnp.asarray(tensors[f"{name}.{k}"]) for k in "USV"))
        capacity = max(old.capacity, lr.capacity)
        if capacity != lr.capacity:
            lr = resize_capacity({"w": lr}, None, capacity)[0]["w"]
        variables[name].set_value(cast(lr, old.dtype))
    for name in arrays:
        variables[name].set_value(jnp.asarray(tensors[name], variables[name].get_value().dtype))
    return model
