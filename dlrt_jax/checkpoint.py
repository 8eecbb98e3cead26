"""Checkpoint and resume of a whole DLRT training state with orbax-checkpoint.

A training state is any pytree: typically a :class:`TrainState` holding the parameters (with their
``LowRank`` factors: capacity, rank and all ``c`` columns), the optimiser state (the inner
optimiser's ``K``/``L``/``S`` moments inside :class:`dlrt_jax.DLRTState`, the step count and the
skipped-step count), a PRNG key and the data position (epoch, batch index). A run interrupted at
step ``k`` and resumed from its checkpoint computes bit-identical parameters on the CPU, provided
the step function and the batch order are the same (see ``docs/reliability.md``; plain orbax
without the checks below: ``docs/recipes.md``).

Each checkpoint stores, next to the arrays, a JSON description of the state: every leaf's path,
shape and dtype, each ``LowRank``'s shape, capacity and rank, and the caller's ``metadata`` (say
the integrator's name and ``tau``). :func:`restore_checkpoint` compares that description with the
restore target (and with the expected ``metadata``) *before* reading any array and raises
:class:`CheckpointMismatchError` listing every difference.

Writes are atomic: orbax writes a step into a temporary directory and renames it into place when
everything is on disk, so a crash in the middle of a save leaves the previous checkpoints usable
and the unfinished one invisible (:func:`latest_step` ignores it; the next
:class:`CheckpointManager` removes it). Saves are synchronous: when :func:`save_checkpoint`
returns, the checkpoint is committed.

Examples:
    >>> import tempfile, jax, jax.numpy as jnp, optax, dlrt_jax
    >>> from dlrt_jax.checkpoint import TrainState, save_checkpoint, restore_checkpoint
    >>> params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
    >>> tx = dlrt_jax.bug(optax.adam(1e-3), tau=0.1)
    >>> state = TrainState.create(params, tx, rng=jax.random.key(1))
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(d, 0, state, metadata={"integrator": "bug", "tau": 0.1})
    >>> restored = restore_checkpoint(d, state, metadata={"integrator": "bug", "tau": 0.1})
    >>> bool(jnp.array_equal(restored.params["w"].U, params["w"].U)), int(restored.epoch)
    (True, 0)
    >>> try:
    ...     restore_checkpoint(d, state, metadata={"integrator": "parallel_bug", "tau": 0.1})
    ... except ValueError as e:
    ...     print(str(e).splitlines()[1])
      metadata['integrator']: 'bug' in the checkpoint, 'parallel_bug' expected
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dlrt_jax._factors import _check_int, is_lowrank

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "TrainState",
    "all_steps",
    "checkpoint_metadata",
    "latest_step",
    "restore_checkpoint",
    "save_checkpoint",
]

_FORMAT = 1
_MISSING = object()
_STATE_ITEM = "state"
_META_ITEM = "dlrt_metadata"


def _ocp():
    """Import orbax-checkpoint on first use, with an actionable message if it is missing."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dlrt_jax.checkpoint needs orbax-checkpoint: `pip install 'dlrt-jax[checkpoint]'` "
            "(or `pip install orbax-checkpoint`)."
        ) from e
    return ocp


class CheckpointMismatchError(ValueError):
    """The restore target (or the expected metadata) differs from what the checkpoint holds.

    ``differences`` lists one line per difference (a path and both values).
    """

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


class TrainState(NamedTuple):
    """The whole state of a training run, as one pytree.

    Attributes:
        params: the model parameters (``LowRank`` factors and ordinary arrays).
        opt_state: the optimiser state (e.g. a :class:`dlrt_jax.DLRTState`).
        step: number of optimiser steps taken (int32 scalar).
        rng: a JAX PRNG key (typed ``jax.random.key`` or raw ``uint32[2]``).
        epoch: the epoch the next batch belongs to (int32 scalar).
        batch: index of the next batch within ``epoch`` (int32 scalar), the ``start_batch`` of
            :func:`dlrt_jax.data.batch_iterator` on resume.

    Examples:
        >>> import jax, optax, dlrt_jax
        >>> from dlrt_jax.checkpoint import TrainState
        >>> p = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
        >>> s = TrainState.create(p, dlrt_jax.bug(0.1, tau=0.1), rng=jax.random.key(1))
        >>> int(s.step), int(s.epoch), int(s.batch)
        (0, 0, 0)
    """

    params: Any
    opt_state: Any
    step: Any
    rng: Any
    epoch: Any
    batch: Any

    @classmethod
    def create(
        cls, params: Any, tx: Any, *, rng: Any, step: int = 0, epoch: int = 0, batch: int = 0
    ) -> TrainState:
        """A fresh state: ``opt_state = tx.init(params)`` and int32 counters."""
        return cls(
            params=params,
            opt_state=tx.init(params),
            step=jnp.asarray(step, jnp.int32),
            rng=rng,
            epoch=jnp.asarray(epoch, jnp.int32),
            batch=jnp.asarray(batch, jnp.int32),
        )


# ---- the JSON description of a state -------------------------------------------------------------


def _leaf_info(x: Any) -> dict[str, Any]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return {"shape": [int(d) for d in x.shape], "dtype": str(x.dtype)}
    if isinstance(x, bool | int | float | complex):
        return {"shape": [], "dtype": f"python {type(x).__name__}"}
    raise TypeError(
        f"checkpoint: cannot store a leaf of type {type(x).__name__}; leaves must be arrays, "
        "PRNG keys or Python scalars."
    )


def _describe(state: Any) -> dict[str, Any]:
    """Leaf paths, shapes, dtypes, and each ``LowRank``'s shape, capacity and rank."""
    leaves: dict[str, Any] = {}
    factors: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_lowrank)[0]:
        name = jax.tree_util.keystr(path)
        if not is_lowrank(leaf):
            leaves[name] = _leaf_info(leaf)
            continue
        for field in ("U", "S", "V", "rank"):
            leaves[f"{name}.{field}"] = _leaf_info(getattr(leaf, field))
        try:
            rank = int(np.asarray(leaf.rank))
        except TypeError:  # a tracer or a ShapeDtypeStruct: no value
            rank = None
        (n, c), m = leaf.U.shape[-2:], leaf.V.shape[-2]  # [-2:]: stacked ensembles too
        factors[name] = {"shape": [int(n), int(m)], "capacity": int(c), "rank": rank}
    return {"leaves": leaves, "factors": factors}


def _normalise_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as e:
        raise TypeError(
            "`metadata` must be a JSON-serialisable dict (str keys; str, number, bool, None, "
            f"list, dict values), got {metadata!r}: {e}"
        ) from e


def _compare(stored: dict, target: dict, expected: dict | None) -> list[str]:
    """Every difference between a stored description and the target's, one line each."""
    diffs = []
    sf, tf = stored["factors"], target["factors"]
    for name in sorted(sf.keys() ^ tf.keys()):
        where, other = ("checkpoint", "target") if name in sf else ("target", "checkpoint")
        diffs.append(f"{name}: a LowRank in the {where}, not a LowRank in the {other}")
    sl, tl = stored["leaves"], target["leaves"]
    diffs += [
        f"{n}: in the checkpoint but not in the target" for n in sorted(sl.keys() - tl.keys())
    ]
    diffs += [
        f"{n}: in the target but not in the checkpoint" for n in sorted(tl.keys() - sl.keys())
    ]
    for a, b, keys in ((sf, tf, ("shape", "capacity")), (sl, tl, ("shape", "dtype"))):
        for n in sorted(a.keys() & b.keys()):
            diffs += [
                f"{n}: {k} {a[n][k]} in the checkpoint, {b[n][k]} in the target"
                for k in keys
                if a[n][k] != b[n][k]
            ]
    if expected is not None:
        sm = stored.get("user", {})
        for k in sorted(sm.keys() | expected.keys()):
            if sm.get(k, _MISSING) != expected.get(k, _MISSING):
                was = f"{sm[k]!r} in the checkpoint" if k in sm else "missing in the checkpoint"
                want = f"{expected[k]!r} expected" if k in expected else "not expected"
                diffs.append(f"metadata[{k!r}]: {was}, {want}")
    return diffs


def _abstract(target: Any) -> Any:
    """ShapeDtypeStructs (with the target's shardings) for arrays; Python scalars unchanged."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree_util.tree_map(one, target)


def _match_commitment(restored: Any, target: Any) -> Any:
    """Make restored arrays uncommitted where the target's are (orbax commits every array).

    ``jit`` caches on whether its arguments are committed to a device, so restoring committed
    arrays into a loop that started from uncommitted ones would compile the step again.
    """

    def one(y, x):
        if not isinstance(x, jax.Array) or x.committed or not isinstance(y, jax.Array):
            return y
        if jnp.issubdtype(y.dtype, jax.dtypes.prng_key):
            data = jnp.asarray(np.asarray(jax.random.key_data(y)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(y))
        return jnp.asarray(np.asarray(y))

    return jax.tree_util.tree_map(one, restored, target)


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
    """A logging filter: ``False`` for orbax's ``Given directory is read only`` warning only."""
    return not record.getMessage().startswith("Given directory is read only")


def _check_step(step: Any) -> int:
    return _check_int(step, "step", 0)  # the core's one integer check


# ---- manager -------------------------------------------------------------------------------------


class CheckpointManager:
    """A directory of numbered checkpoints of one run (a thin wrapper of orbax's manager).

    The ``metadata`` given here (JSON-serialisable: integrator name, ``tau``, learning rate, ...)
    is stored with every checkpoint and checked on every restore, together with the structure,
    shapes, dtypes and capacities of the state.

    Args:
        directory: where the checkpoints live (created if missing); one sub-directory per step.
        metadata: run description stored with each checkpoint and required to match on restore.
        max_to_keep: keep only the newest ``max_to_keep`` checkpoints (``None``: keep all).
        read_only: open an existing directory for restoring only. A writable manager deletes
            the leftovers of unfinished saves when it opens the directory, so open a directory
            that another process is writing to with ``read_only=True``.

    Examples:
        >>> import tempfile, jax, optax, dlrt_jax
        >>> from dlrt_jax.checkpoint import CheckpointManager, TrainState
        >>> p = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)}
        >>> state = TrainState.create(p, dlrt_jax.bug(0.1, tau=0.1), rng=jax.random.key(1))
        >>> with CheckpointManager(tempfile.mkdtemp(), metadata={"tau": 0.1}) as mgr:
        ...     mgr.save(0, state)
        ...     mgr.save(5, state._replace(step=state.step + 5))
        ...     int(mgr.restore(state).step), mgr.all_steps()
        (5, [0, 5])
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        max_to_keep: int | None = None,
        read_only: bool = False,
    ):
        if max_to_keep is not None and (type(max_to_keep) is not int or max_to_keep < 1):
            raise ValueError(f"`max_to_keep` must be None or an integer >= 1, got {max_to_keep!r}.")
        ocp = _ocp()
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.metadata = _normalise_metadata(metadata)
        self.read_only = bool(read_only)
        if self.read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not self.read_only,
            cleanup_tmp_directories=not self.read_only,
            read_only=self.read_only,
            enable_async_checkpointing=False,
        )
        absl = logging.getLogger("absl")
        absl.addFilter(_drop_read_only_notice)  # orbax logs it at every read-only open
        try:
            self._mgr = ocp.CheckpointManager(
                self.directory, options=options, item_names=(_STATE_ITEM, _META_ITEM)
            )
        finally:
            absl.removeFilter(_drop_read_only_notice)

    # -- context manager --------------------------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending work and release orbax's resources."""
        self._mgr.close()

    # -- queries ----------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The committed steps, ascending (unfinished saves are not listed)."""
        self._mgr.reload()
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metadata_at(self, step: int | None = None) -> dict[str, Any]:
        """The stored description of a checkpoint (default: the latest).

        A dict with ``"step"``, ``"user"`` (the run's metadata), ``"leaves"`` (path ->
        ``{"shape", "dtype"}``) and ``"factors"`` (path -> ``{"shape", "capacity", "rank"}``).
        Use the capacities to build a matching restore target after
        :func:`dlrt_jax.fit_capacity` changed them (:func:`dlrt_jax.resize_capacity`).
        """
        step = self._resolve_step(step)
        ocp = self._ocp
        out = self._mgr.restore(
            step, args=ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
        )
        meta = out[_META_ITEM]
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(
                f"{self.directory}/{step}: not a dlrt_jax checkpoint (missing or unknown "
                f"'{_META_ITEM}' item)."
            )
        return meta

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No committed checkpoint in {self.directory}.")
            return steps[-1]
        step = _check_step(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No committed checkpoint for step {step} in {self.directory}; available steps: "
                f"{steps}."
            )
        return step

    # -- save / restore ---------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Save ``state`` as checkpoint ``step`` (atomically, synchronously).

        ``step`` must be newer than every committed checkpoint of the directory. ``metadata``
        (if given) is stored instead of the manager's.
        """
        if self.read_only:
            raise ValueError(f"{self.directory} was opened with read_only=True; cannot save.")
        step = _check_step(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"`step`={step} must be greater than the latest checkpoint step {latest} in "
                f"{self.directory}; delete the newer checkpoints or use another directory."
            )
        user = self.metadata if metadata is None else _normalise_metadata(metadata)
        description = {"format": _FORMAT, "step": step, "user": user, **_describe(state)}
        ocp = self._ocp
        args = ocp.args.Composite(
            **{
                _STATE_ITEM: ocp.args.StandardSave(state),
                _META_ITEM: ocp.args.JsonSave(description),
            }
        )
        saved = self._mgr.save(step, args=args, force=True)
        self._mgr.wait_until_finished()
        if not saved:  # pragma: no cover - orbax declined; should not happen with force=True
            raise RuntimeError(f"orbax did not save step {step} in {self.directory}.")

    def restore(
        self,
        target: Any,
        *,
        step: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Any:
        """Restore checkpoint ``step`` (default: the latest) into the structure of ``target``.

        ``target`` is a state of the same structure (e.g. a freshly initialised one, or a tree of
        ``jax.ShapeDtypeStruct`` with shardings); the result has its structure, shardings and
        types. Before any array is read, the stored paths, shapes, dtypes, capacities and run
        metadata are compared with ``target`` and ``metadata`` (default: the manager's; pass
        ``{}`` to accept any) and a :class:`CheckpointMismatchError` lists all differences.
        """
        step = self._resolve_step(step)
        stored = self.metadata_at(step)
        expected = self.metadata if metadata is None else _normalise_metadata(metadata)
        diffs = _compare(stored, _describe(target), expected)
        if diffs:
            raise CheckpointMismatchError(
                f"Checkpoint {self.directory} step {step} does not match the restore target:\n  "
                + "\n  ".join(diffs),
                diffs,
            )
        ocp = self._ocp
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(_abstract(target))}),
        )
        return _match_commitment(out[_STATE_ITEM], target)


# ---- functional API ------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_to_keep: int | None = None,
) -> None:
    """Save ``state`` (any pytree; see :class:`TrainState`) as checkpoint ``step`` of ``directory``.

    Atomic (a crash mid-save leaves the earlier checkpoints intact and this one invisible) and
    synchronous. ``metadata`` is a JSON-serialisable description of the run (integrator name,
    ``tau``, ...) checked again by :func:`restore_checkpoint`. With ``max_to_keep`` older
    checkpoints beyond that number are deleted after the save.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from dlrt_jax.checkpoint import save_checkpoint, latest_step
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint(d, 3, {"x": jnp.ones(2)})
        >>> latest_step(d)
        3
    """
    with CheckpointManager(directory, metadata=metadata, max_to_keep=max_to_keep) as mgr:
        mgr.save(step, state)


def restore_checkpoint(
    directory: str | os.PathLike[str],
    target: Any,
    *,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Restore checkpoint ``step`` (default: the latest) of ``directory`` into ``target``.

    Raises :class:`CheckpointMismatchError` (a ``ValueError``) naming every path whose shape,
    dtype or capacity differs, every missing or extra leaf, and, when ``metadata`` is given,
    every differing metadata entry; ``FileNotFoundError`` if there is no such checkpoint.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from dlrt_jax.checkpoint import save_checkpoint, restore_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint(d, 0, {"x": jnp.arange(3.0)})
        >>> restore_checkpoint(d, {"x": jnp.zeros(3)})["x"].tolist()
        [0.0, 1.0, 2.0]
        >>> try:
        ...     restore_checkpoint(d, {"x": jnp.zeros(4)})
        ... except ValueError as e:
        ...     print(str(e).splitlines()[1].strip())
        ['x']: shape [3] in the checkpoint, [4] in the target
    """
    with CheckpointManager(directory, metadata=metadata, read_only=True) as mgr:
        return mgr.restore(target, step=step, metadata={} if metadata is None else metadata)


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest committed checkpoint step in ``directory`` (``None`` if none or no directory)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def all_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The committed checkpoint steps in ``directory``, ascending (``[]`` if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    with CheckpointManager(directory, read_only=True) as mgr:
        return mgr.all_steps()


def checkpoint_metadata(directory: str | os.PathLike[str], step: int | None = None) -> dict:
    """The stored description of checkpoint ``step`` (default: the latest); see
    :meth:`CheckpointManager.metadata_at`.

    Examples:
        >>> import tempfile, jax
        >>> import dlrt_jax
        >>> from dlrt_jax.checkpoint import save_checkpoint, checkpoint_metadata
        >>> d = tempfile.mkdtemp()
        >>> w = dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2)
        >>> save_checkpoint(d, 1, {"w": w}, metadata={"tau": 0.1})
        >>> m = checkpoint_metadata(d)
        >>> m["user"], m["factors"]["['w']"]
        ({'tau': 0.1}, {'shape': [8, 6], 'capacity': 3, 'rank': 2})
    """
    with CheckpointManager(directory, read_only=True) as mgr:
        return mgr.metadata_at(step)
