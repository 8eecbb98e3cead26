"""Train the paper's 5-layer MLP on MNIST rank-adaptively with DLRT.

Run it as ``python -m dlrt_jax.train_mnist`` or ``dlrt-mnist``.

The network is ``784 -> w -> w -> w -> w -> 10`` (ReLU), the four hidden weights are
:class:`~dlrt_jax.LowRank` factors starting at rank ``floor(min(n, m) / 2)`` (capped by
``--max-rank``), the classifier layer is dense. Every step is one step of the chosen DLRT integrator
with Adam inside (K-, L- and S-steps each take an Adam step; biases and the classifier layer take an
ordinary Adam step). Every ``--fit-capacity-every`` epochs the static capacity of each factor is
refitted to about twice its rank (:func:`dlrt_jax.fit_capacity`), so the cost of a step follows the
rank; ``jit`` compiles once per set of capacities.

At the end it prints a table (test accuracy, ranks, parameters and compression at evaluation and
in training, wall time, time per step) and writes ``mnist_<integrator>_tau<tau>_w<width>.json`` and
``.png`` (accuracy and ranks per epoch) to ``--out``. ``--integrator dense`` runs the same pipeline
with dense weights and Adam (the baseline; ``mnist_dense_adam_w<width>.*``).

Compiled steps go to JAX's persistent compilation cache (``--compile-cache``, by default
``$DLRT_COMPILE_CACHE`` or ``~/.cache/dlrt_jax/jax``), so that a second run of the same job
compiles nothing; ``--no-compile-cache`` turns it off.

Examples:
    ```bash
    OPENBLAS_NUM_THREADS=1 python -m dlrt_jax.train_mnist --epochs 10 --tau 0.09
    dlrt-mnist --subset 2048 --epochs 1 --width 64 --out /tmp/run   # a quick run
    dlrt-mnist --integrator dense --epochs 10                       # the dense baseline
    ```

The helpers :func:`load_mnist`, :func:`make_step`, :func:`evaluate`, :func:`train` and
:func:`environment` are reused by the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dlrt_jax
from dlrt_jax.mnist import models
from dlrt_jax.mnist.data import (
    DATA_DIR_ENV_VAR,
    DatasetNotFoundError,
    batch_iterator,
    load_dataset,
    num_batches,
    preprocess,
)

__all__ = [
    "INTEGRATORS",
    "TrainResult",
    "build_transform",
    "environment",
    "evaluate",
    "load_mnist",
    "main",
    "make_step",
    "plot_history",
    "run",
    "train",
    "write_csv",
]

#: ``--integrator`` choices: name -> (factory, rank-adaptive, needs ``grad_fn``).
INTEGRATORS = {
    "bug": ("rank-adaptive BUG (2 gradient evaluations per step)", True, True),
    "parallel_bug": ("parallel rank-adaptive BUG (1 gradient evaluation)", True, False),
    "ksl": ("projector-splitting KSL, fixed rank (3 gradient evaluations)", False, True),
    "bug_fixed": ("fixed-rank BUG (2 gradient evaluations)", False, True),
    "dense": ("dense layers trained by Adam at --lr (the baseline, no DLRT)", False, False),
}


#: ``--inner`` choices: the optimiser of the K-, L- and S-steps, built from a learning rate.
INNER = {
    "adam": "optax.adam, moments transported into each new basis (default)",
    "reference": "reference_adam: the paper's TF step (fresh Adam slots every step)",
    "isotropic": "isotropic_adam: one second moment per factor",
    "momentum": "optax.sgd with momentum 0.9, transported",
}

#: Learning rate of K, L, S relative to ``--lr`` (Adam's per-entry steps on the factors move
#: ``W`` by about ``sqrt(r / m)`` of a dense Adam step on ``W``; see ``benchmarks/README.md``).
FACTOR_LR_SCALE = 3.0

#: Scale of the initial singular values (sorted ``|N(0, 1)|`` samples times this). Under the
#: relative truncation rule the rank settles where the smallest kept singular value reaches
#: ``tau * ||sigma||``; with the paper's O(1) random spectrum that point is set by the random
#: initial spectrum, with a small one by what training adds (``benchmarks/README.md``).
INIT_SCALE = 0.1


def inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The inner optimiser named ``name`` (a key of :data:`INNER`) at ``learning_rate``.

    Examples:
        >>> type(inner_optimizer("reference", 1e-3)).__name__
        'GradientTransformation'
    """
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "reference":
        return dlrt_jax.reference_adam(learning_rate)
    if name == "isotropic":
        return dlrt_jax.isotropic_adam(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"`inner` must be one of {sorted(INNER)}, got {name!r}.")


def build_transform(
    integrator: str,
    optimizer: optax.GradientTransformation | float,
    *,
    tau: float | None = None,
    max_rank: int | None = None,
    other_optimizer: optax.GradientTransformation | float | None = None,
    truncate_every: int = 1,
    augment_every: int = 1,
) -> tuple[optax.GradientTransformationExtraArgs, bool]:
    """The DLRT transform named ``integrator`` and whether it evaluates ``grad_fn``.

    The flag is informational (kept for compatibility): :func:`make_step` /
    :func:`dlrt_jax.make_train_step` always pass ``grad_fn``.

    ``optimizer`` trains ``K``, ``L``, ``S``; ``other_optimizer`` (default: ``optimizer``) the
    biases and the dense classifier. ``tau``, ``truncate_every`` and ``augment_every`` (the
    augment-train-truncate cycle) are used by the rank-adaptive integrators (``bug``,
    ``parallel_bug``) only. ``"dense"`` is the baseline without DLRT:
    ``other_optimizer`` (default ``optimizer``; a learning rate means Adam) trains every leaf of
    dense params.

    Examples:
        >>> import optax
        >>> tx, needs_grad_fn = build_transform("bug", optax.adam(1e-3), tau=0.09)
        >>> needs_grad_fn
        True
    """
    if integrator not in INTEGRATORS:
        raise ValueError(f"`integrator` must be one of {sorted(INTEGRATORS)}, got {integrator!r}.")
    if integrator == "dense":  # the baseline: one optimiser for every leaf, no DLRT
        tx = other_optimizer if other_optimizer is not None else optimizer
        if not isinstance(tx, optax.GradientTransformation):
            tx = optax.adam(tx)
        return optax.with_extra_args_support(tx), False
    adaptive = INTEGRATORS[integrator][1]
    if adaptive and tau is None:
        raise ValueError(f"`{integrator}` is rank-adaptive and needs `tau` (> 0).")
    kw = {"other_optimizer": other_optimizer}
    if adaptive:
        kw.update(truncate_every=truncate_every, augment_every=augment_every)
    if integrator == "bug":
        tx = dlrt_jax.bug(optimizer, tau=tau, max_rank=max_rank, **kw)
    elif integrator == "parallel_bug":
        tx = dlrt_jax.parallel_bug(optimizer, tau=tau, max_rank=max_rank, **kw)
    elif integrator == "ksl":
        tx = dlrt_jax.projector_splitting(optimizer, **kw)
    else:
        tx = dlrt_jax.bug(optimizer, tau=None, **kw)
    return tx, INTEGRATORS[integrator][2]


# ---- data ---------------------------------------------------------------------------------------


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    flatten: bool = True,
    subset: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST as ``(x_train, y_train, x_test, y_test)``: float32 pixels in [0, 1], int32 labels.

    ``flatten=True`` gives ``(N, 784)``, else ``(N, 28, 28)``. ``subset`` keeps the first ``subset``
    training examples (the test set is always complete).
    """
    if subset is not None and not (isinstance(subset, int) and 1 <= subset <= 60000):
        raise ValueError(f"`subset` must be None or an integer in [1, 60000], got {subset!r}.")
    ds = load_dataset("mnist", data_dir)
    xtr = preprocess(ds.train_images, flatten=flatten)
    xte = preprocess(ds.test_images, flatten=flatten)
    ytr = ds.train_labels.astype(np.int32)
    yte = ds.test_labels.astype(np.int32)
    if subset is not None:
        xtr, ytr = xtr[:subset], ytr[:subset]
    return xtr, ytr, xte, yte


# ---- steps and evaluation -----------------------------------------------------------------------


def make_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    *,
    needs_grad_fn: bool | None = None,
) -> Callable:
    """A jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

    :func:`dlrt_jax.make_train_step` for ``loss_fn(params, batch)``: the transform always gets
    ``grad_fn = lambda p: grad(loss_fn)(p, batch)`` (the same batch) and uses it only when its
    integrator needs it, so ``needs_grad_fn`` (kept for compatibility) is ignored. ``jit`` traces
    once per set of parameter shapes (i.e. once per set of capacities).

    Examples:
        >>> import optax
        >>> from dlrt_jax.mnist import models
        >>> step = make_step(models.cross_entropy_loss(models.mlp_apply), optax.sgd(0.1))
        >>> callable(step)
        True
    """
    del needs_grad_fn
    return dlrt_jax.make_train_step(loss_fn, tx)


_EVAL_FNS: dict[Callable, Callable] = {}


def _eval_fn(apply_fn: Callable) -> Callable:
    if apply_fn not in _EVAL_FNS:

        @jax.jit
        def sums(params, x, y):
            logits = apply_fn(params, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
            return jnp.sum(jnp.argmax(logits, -1) == y), loss

        _EVAL_FNS[apply_fn] = sums
    return _EVAL_FNS[apply_fn]


def evaluate(
    apply_fn: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 1000
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``apply_fn`` on ``(x, y)``, in batches."""
    sums = _eval_fn(apply_fn)
    correct, total_loss = 0, 0.0
    for lo in range(0, len(x), batch_size):
        c, loss = sums(params, jnp.asarray(x[lo : lo + batch_size]), y[lo : lo + batch_size])
        correct += int(c)
        total_loss += float(loss)
    return correct / len(x), total_loss / len(x)


# ---- the training loop --------------------------------------------------------------------------


class TrainResult(NamedTuple):
    params: Any
    opt_state: Any
    history: list[dict[str, Any]]


def _capacities(params: Any) -> list[int]:
    return [
        leaf.capacity
        for leaf in jax.tree_util.tree_leaves(params, is_leaf=dlrt_jax.is_lowrank)
        if dlrt_jax.is_lowrank(leaf)
    ]


def _record(
    epoch: int, params: Any, apply_fn, data, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    acc, loss = evaluate(apply_fn, params, data[2], data[3])
    counts = models.param_counts(params)
    rec = {
        "epoch": epoch,
        "test_acc": acc,
        "test_loss": loss,
        "ranks": counts["ranks"],
        "capacities": _capacities(params),
        "eval_params": counts["eval_params"],
        "train_params": counts["train_params"],
        "eval_compression": counts["eval_compression"],
        "train_compression": counts["train_compression"],
    }
    rec.update(extra or {})
    return rec


def train(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    apply_fn: Callable,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    needs_grad_fn: bool = False,
    fit_capacity_every: int = 0,
    fit_capacity_after_steps: int = 0,
    max_capacity: int | None = None,
    progress: bool = True,
    desc: str = "train",
    log: Callable[[str], None] | None = None,
    opt_state: Any = None,
    capacity_policy: dlrt_jax.CapacityPolicy | None = None,
) -> TrainResult:
    """Train ``params`` with ``tx`` for ``epochs`` epochs and evaluate on the test set each epoch.

    ``data`` is ``(x_train, y_train, x_test, y_test)``. Batches come from
    :func:`dlrt_jax.mnist.data.batch_iterator` (shuffled by ``(seed, epoch)``, last incomplete batch
    dropped). With ``fit_capacity_every = N > 0`` the capacities are refitted by
    :func:`dlrt_jax.fit_capacity` (``max_capacity`` caps them) after every ``N``-th epoch, and
    once after the first ``fit_capacity_after_steps`` steps when that is > 0 (the rank-adaptive
    integrators drop most of the initial rank within tens of steps, so this one early refit saves
    most of the first epoch's cost; ``W`` is unchanged by a refit).
    ``history[0]`` describes the initial model (epoch 0), ``history[k]`` the model after epoch
    ``k`` with the mean training loss, the epoch's training wall time (compilation included),
    its number of steps and the median step time (compilations excluded in practice).
    ``log`` receives one line per epoch. With a ``capacity_policy``
    (:class:`dlrt_jax.CapacityPolicy`) the capacities follow the ranks during the epoch: the policy
    reads the ranks every ``policy.every`` steps and resizes when a capacity leaves its band
    (``history`` then records the number of resizes and of compiled step variants).
    ``needs_grad_fn`` is ignored (kept for compatibility; the step always passes ``grad_fn``).
    """
    from tqdm.auto import tqdm

    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"`epochs` must be an integer >= 0, got {epochs!r}.")
    if not isinstance(fit_capacity_every, int) or fit_capacity_every < 0:
        raise ValueError(
            f"`fit_capacity_every` must be an integer >= 0, got {fit_capacity_every!r}."
        )
    if not isinstance(fit_capacity_after_steps, int) or fit_capacity_after_steps < 0:
        raise ValueError(
            f"`fit_capacity_after_steps` must be an integer >= 0, got {fit_capacity_after_steps!r}."
        )
    loss_fn = models.cross_entropy_loss(apply_fn)
    step = make_step(loss_fn, tx)
    if opt_state is None:
        opt_state = tx.init(params)
    xtr, ytr = data[0], data[1]
    steps_per_epoch = num_batches(len(xtr), batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(xtr)} training examples: no full batch."
        )
    history = [_record(0, params, apply_fn, data)]
    has_factors = bool(_capacities(params))
    if has_factors and capacity_policy is not None:
        capacity_policy.observe(params)  # so its first check tells a rank falling from the start
    total_steps = num_resizes = 0
    for epoch in range(1, epochs + 1):
        losses, step_times, resizes = [], [], []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{desc} epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        t_epoch = time.perf_counter()
        for i, (xb, yb) in enumerate(batch_iterator(xtr, ytr, batch_size, seed=seed, epoch=epoch)):
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, (jnp.asarray(xb), jnp.asarray(yb)))
            jax.block_until_ready(params)
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
            if has_factors and capacity_policy is not None:
                total_steps += 1
                params, opt_state, resized = capacity_policy(total_steps, params, opt_state)
                num_resizes += int(resized)
                if resized:
                    resizes.append([total_steps, _capacities(params)])
            if has_factors and epoch == 1 and i + 1 == fit_capacity_after_steps:
                params, opt_state = dlrt_jax.fit_capacity(
                    params, opt_state, max_capacity=max_capacity
                )
            if progress and (i % 10 == 0 or i == steps_per_epoch - 1):
                bar.set_postfix(
                    loss=f"{float(loss):.4f}", ranks=models.layer_ranks(params), refresh=False
                )
            bar.update(1)
        bar.close()
        epoch_time = time.perf_counter() - t_epoch
        if has_factors:  # the host syncs here anyway: a fault the steps recorded raises now
            dlrt_jax.check(opt_state, params)
        extra = {
            "train_loss": float(np.mean([float(x) for x in losses])),
            "epoch_time_s": epoch_time,
            "steps": len(step_times),
            "step_time_median_s": statistics.median(step_times),
            "step_time_mean_s": epoch_time / len(step_times),
            "num_skipped": _num_skipped(opt_state),
            "num_resizes": num_resizes,
            "compiled_steps": step._cache_size(),
            "resizes": resizes,  # [step, capacities after] of each resize in this epoch
        }
        history.append(_record(epoch, params, apply_fn, data, extra))
        if (
            has_factors
            and fit_capacity_every
            and epoch % fit_capacity_every == 0
            and epoch < epochs
        ):
            params, opt_state = dlrt_jax.fit_capacity(params, opt_state, max_capacity=max_capacity)
        if log is not None:
            h = history[-1]
            log(
                f"{desc} epoch {epoch}/{epochs}: loss {h['train_loss']:.4f}, test acc "
                f"{100 * h['test_acc']:.2f} %, ranks {h['ranks']}, eval c.r. "
                f"{100 * h['eval_compression']:.2f} %, {epoch_time:.1f} s "
                f"({1000 * h['step_time_median_s']:.1f} ms/step median)"
            )
    return TrainResult(params, opt_state, history)


def _num_skipped(opt_state: Any) -> int | None:
    states = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda s: isinstance(s, dlrt_jax.DLRTState)
        )
        if isinstance(s, dlrt_jax.DLRTState)
    ]
    return int(sum(int(s.num_skipped) for s in states)) if states else None


# ---- the persistent compilation cache ---------------------------------------------------------


def default_compile_cache_dir() -> Path:
    """``$DLRT_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/dlrt_jax/jax`` (``~/.cache/dlrt_jax/jax``).

    A directory of this user's: JAX trusts its cache (whoever can write to it can run code in
    the process that reads it), so do not point it at a directory others can write to.
    """
    env = os.environ.get(COMPILE_CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dlrt_jax" / "jax"


@contextlib.contextmanager
def compile_cache(path: str | os.PathLike[str] | None):
    """Use JAX's persistent compilation cache in ``path`` inside the block (``None``: leave JAX's
    settings alone). Every compiled program is cached (no minimum compile time), so that a
    second run of the same job compiles nothing; the previous settings come back afterwards.

    Examples:
        >>> import tempfile
        >>> with compile_cache(tempfile.mkdtemp()) as d:
        ...     d is not None
        True
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    if path is None:
        yield None
        return
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_enable_compilation_cache",
    )
    before = {n: getattr(jax.config, n) for n in names}
    values = dict(zip(names, (str(path), 0.0, 0, True)))
    for n, v in values.items():
        jax.config.update(n, v)
    cc.reset_cache()  # JAX decides once per process whether to use the cache: decide again
    try:
        yield path
    finally:
        for n, v in before.items():
            jax.config.update(n, v)
        cc.reset_cache()


# ---- reporting ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import jaxlib

    try:
        cpu_count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpu_count = os.cpu_count()
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "dlrt_jax": dlrt_jax.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": cpu_count,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }


def write_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts; lists become ``a;b;c``) as CSV with the union of their keys."""
    import csv

    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ";".join(str(x) for x in v) if isinstance(v, list | tuple) else v
                    for k, v in row.items()
                }
            )


def plot_history(
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    layer_names: Sequence[str] | None = None,
) -> None:
    """Save a two-panel PNG: test accuracy and the rank of each factored layer per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs[1:], [100 * h["test_acc"] for h in history[1:]], "o-")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy (%)")
    ax1.grid(alpha=0.3)
    ranks = np.array([h["ranks"] for h in history])
    for j in range(ranks.shape[1] if ranks.ndim == 2 else 0):
        name = layer_names[j] if layer_names else f"layer {j + 1}"
        ax2.plot(epochs, ranks[:, j], "o-", label=name)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("rank")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if ranks.ndim == 2 and ranks.shape[1]:
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _final_table(history: Sequence[dict[str, Any]], dense_params: int, wall: float) -> str:
    h = history[-1]
    steps = sum(e.get("steps", 0) for e in history)
    train_time = sum(e.get("epoch_time_s", 0.0) for e in history)
    medians = [e["step_time_median_s"] for e in history if "step_time_median_s" in e]
    rows = [
        ("test accuracy", f"{100 * h['test_acc']:.2f} %"),
        ("ranks", str(h["ranks"])),
        ("capacities", str(h["capacities"])),
        ("dense params (weights)", f"{dense_params:,}"),
        ("eval params r(n+m)", f"{h['eval_params']:,}"),
        ("eval compression", f"{100 * h['eval_compression']:.2f} %"),
        ("train params 2nr+4r^2+2rm", f"{h['train_params']:,}"),
        ("train compression", f"{100 * h['train_compression']:.2f} %"),
        ("wall time (total)", f"{wall:.1f} s"),
        ("training time", f"{train_time:.1f} s over {steps} steps"),
        ("time per step (mean, incl. compiles)", f"{1000 * train_time / max(steps, 1):.1f} ms"),
        (
            "time per step (median of epoch medians)",
            f"{1000 * np.median(medians):.1f} ms" if medians else "n/a",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


COMPILE_CACHE_ENV_VAR = "DLRT_COMPILE_CACHE"  # default directory of the compilation cache
DEFAULT_TAU = 0.09  # --tau of the rank-adaptive integrators when not given
DEFAULT_FIXED_RANK = 32  # --rank of the fixed-rank integrators: min(32, width // 4, --max-rank)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where the help text states it itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlrt-mnist",
        description="Rank-adaptive DLRT training of the 5-layer MLP 784-w-w-w-w-10 on MNIST.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help=f"relative truncation tolerance in (0, 1) of the rank-adaptive integrators (default "
        f"{DEFAULT_TAU:g}); an error with the fixed-rank ksl / bug_fixed",
    )
    p.add_argument(
        "--integrator",
        choices=sorted(INTEGRATORS),
        default="parallel_bug",
        help="DLRT integrator, or dense: the same MLP with dense weights (Glorot-uniform) trained "
        "by Adam at --lr, through the same pipeline, to compare wall time, accuracy and parameters",
    )
    p.add_argument(
        "--inner", choices=sorted(INNER), default="adam", help="optimiser of the K, L, S steps"
    )
    p.add_argument(
        "--factor-lr",
        type=float,
        default=None,
        help=f"learning rate of K, L, S (default {FACTOR_LR_SCALE:g} x --lr; --lr with --preset "
        "paper)",
    )
    p.add_argument(
        "--init-scale",
        type=float,
        default=INIT_SCALE,
        help="scale of the initial singular values (the paper: sorted |N(0, 1)| samples, 1.0)",
    )
    p.add_argument(
        "--preset",
        choices=["paper"],
        default=None,
        help="paper: the reference TF dynamics (rank-adaptive bug, reference_adam at --lr, "
        "init scale 1); overrides --integrator, --inner, --factor-lr, --init-scale",
    )
    p.add_argument(
        "--truncate-every",
        type=int,
        default=1,
        help="truncate with tau every N steps (ranks stay at the capacity in between)",
    )
    p.add_argument(
        "--augment-every",
        type=int,
        default=1,
        help="the augment-train-truncate cycle: augment every N steps, train S alone in between, "
        "truncate at the cycle's end (1: the paper's step; use --headroom 2 and a --check-every "
        "that is a multiple of N)",
    )
    p.add_argument(
        "--check-every",
        type=int,
        default=10,
        help="read the ranks and resize the capacities every N steps (CapacityPolicy; 0: never)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=1.0,
        help="capacity target: max(headroom x rank, rank + 8) rounded up to a multiple of 8",
    )
    p.add_argument("--width", type=int, default=500, help="hidden width w")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=256, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--data-dir", default=None, help="default: $DLRT_DATA_DIR or the user cache")
    p.add_argument("--out", default="./results", help="results directory")
    p.add_argument(
        "--max-rank",
        type=int,
        default=None,
        help="cap on the starting rank/capacity (default floor(min(n, m)/2))",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"fixed rank for ksl/bug_fixed (default: min({DEFAULT_FIXED_RANK}, width // 4, "
        "--max-rank), which trains fewer parameters than the dense layers)",
    )
    p.add_argument(
        "--fit-capacity-every",
        type=int,
        default=0,
        help="also refit capacities (fit_capacity, headroom 2) every N epochs (0: never)",
    )
    p.add_argument(
        "--fit-capacity-after-steps",
        type=int,
        default=0,
        help="one extra capacity refit after this many steps of epoch 1 (0: none)",
    )
    p.add_argument("--subset", type=int, default=None, help="use the first N training examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="JAX's persistent compilation cache, so that a second run compiles nothing (default: "
        f"${COMPILE_CACHE_ENV_VAR} or ~/.cache/dlrt_jax/jax)",
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use the persistent compilation cache (every run compiles its steps)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``dlrt-mnist``); see :func:`run`."""
    run(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train, print the table, write JSON and PNG; return the results dictionary.

    The dictionary has ``config``, ``history`` (per epoch), ``final`` (the table's numbers),
    ``environment`` and ``paths`` (``json``, ``png``).

    ``--tau`` (default ``DEFAULT_TAU`` = 0.09) belongs to the rank-adaptive integrators: given
    with ``ksl`` / ``bug_fixed`` it is an error. Those keep ``--rank``, by default
    ``min(DEFAULT_FIXED_RANK, width // 4, --max-rank)`` (32 for the paper's width 500), which
    trains fewer parameters than the dense layers (positive train compression; the adaptive
    starting rank ``floor(min(n, m) / 2)`` would train more). Missing MNIST files exit with a
    message (no traceback) naming ``--data-dir`` and ``$DLRT_DATA_DIR``.
    """
    args = _parser().parse_args(argv)
    dense = args.integrator == "dense" and args.preset is None
    if dense:
        for flag, value in (
            ("--tau", args.tau),
            ("--rank", args.rank),
            ("--max-rank", args.max_rank),
        ):
            if value is not None:
                raise SystemExit(
                    f"{flag} applies to the low-rank integrators; --integrator dense trains the "
                    f"dense layers with Adam at --lr: drop {flag}"
                )
    elif args.tau is not None and not INTEGRATORS[args.integrator][1] and args.preset is None:
        raise SystemExit(
            f"--tau applies to the rank-adaptive integrators (bug, parallel_bug); "
            f"--integrator {args.integrator} keeps a fixed rank (--rank): drop --tau or choose a "
            "rank-adaptive integrator"
        )
    if args.tau is None:
        args.tau = DEFAULT_TAU
    for name in ("epochs", "width", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.fit_capacity_every < 0:
        raise SystemExit("--fit-capacity-every must be >= 0")
    if not args.lr > 0:
        raise SystemExit("--lr must be > 0")
    adaptive = INTEGRATORS[args.integrator][1]
    if adaptive and not 0 < args.tau < 1:
        raise SystemExit("--tau must be in (0, 1) for the rank-adaptive integrators")
    if args.preset == "paper":
        args.integrator, args.inner, args.factor_lr, args.init_scale = "bug", "reference", None, 1
        adaptive = True
    if args.factor_lr is None:
        args.factor_lr = args.lr * (1.0 if args.preset == "paper" else FACTOR_LR_SCALE)
    if not args.factor_lr > 0 or not args.init_scale > 0:
        raise SystemExit("--factor-lr and --init-scale must be > 0")
    if args.truncate_every < 1 or args.augment_every < 1 or args.check_every < 0:
        raise SystemExit("--truncate-every and --augment-every must be >= 1 and --check-every >= 0")
    if args.truncate_every > 1 and args.augment_every > 1:
        raise SystemExit("--truncate-every and --augment-every: pass one of them")
    if args.augment_every > 1 and args.check_every and args.check_every % args.augment_every:
        raise SystemExit(
            "--check-every must be a multiple of --augment-every (the ranks are augmented "
            "within a cycle, so the capacity policy must read them right after a truncation)"
        )
    if args.truncate_every > 1 and args.check_every and args.check_every % args.truncate_every:
        raise SystemExit(
            "--check-every must be a multiple of --truncate-every (between truncations the "
            "ranks sit at the capacity, so the capacity policy must read them after one)"
        )
    if not adaptive and not dense and args.rank is None:
        cap = args.max_rank or DEFAULT_FIXED_RANK
        args.rank = max(1, min(DEFAULT_FIXED_RANK, args.width // 4, cap))
    if args.no_compile_cache:
        args.compile_cache = None
    elif args.compile_cache is None:
        args.compile_cache = str(default_compile_cache_dir())
    with compile_cache(args.compile_cache):
        return _train_and_report(args, adaptive, dense)


def _init_params(args: argparse.Namespace, adaptive: bool, dense: bool) -> Any:
    key = jax.random.key(args.seed)
    if not dense:
        return models.init_mlp(
            key,
            args.width,
            rank=None if adaptive else args.rank,
            max_rank=args.max_rank,
            scale=args.init_scale,
        )
    # the dense baseline: Glorot-uniform hidden weights (the usual dense initialisation)
    params = models.init_mlp(key, args.width, dense=True)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(params) - 1)
    for k, layer in zip(keys, params[:-1]):
        layer["w"] = jax.nn.initializers.glorot_uniform()(k, layer["w"].shape, jnp.float32)
    return params


def _train_and_report(args: argparse.Namespace, adaptive: bool, dense: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    try:
        data = load_mnist(args.data_dir, subset=args.subset)
    except DatasetNotFoundError as e:
        message = str(e).replace("pass data_dir=.", "pass --data-dir DIR.")
        raise SystemExit(
            f"{message}\n\nOn the command line: pass --data-dir DIR (the directory holding "
            f"mnist/) or set the {DATA_DIR_ENV_VAR} environment variable."
        ) from None
    params = _init_params(args, adaptive, dense)
    tx, _ = build_transform(
        args.integrator,
        inner_optimizer(args.inner, args.factor_lr),
        tau=args.tau if adaptive else None,
        max_rank=args.max_rank,
        other_optimizer=optax.adam(args.lr),
        truncate_every=args.truncate_every,
        augment_every=args.augment_every,
    )
    policy = None
    if adaptive and args.check_every:
        policy = dlrt_jax.CapacityPolicy(
            every=args.check_every, headroom=args.headroom, max_capacity=args.max_rank
        )
    result = train(
        params,
        tx,
        apply_fn=models.mlp_apply,
        data=data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        fit_capacity_every=args.fit_capacity_every if adaptive else 0,
        fit_capacity_after_steps=args.fit_capacity_after_steps if adaptive else 0,
        max_capacity=args.max_rank,
        progress=not args.no_progress,
        desc=args.integrator,
        log=print,
        capacity_policy=policy,
    )
    wall = time.perf_counter() - t_start
    history = result.history
    dense_params = models.dense_param_count(result.params)
    table = _final_table(history, dense_params, wall)
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tau_tag = f"tau{args.tau:g}" if adaptive else f"rank{args.rank or 'cap'}"
    if dense:
        tau_tag = "adam"
    stem = f"mnist_{args.integrator}_{tau_tag}_w{args.width}"
    final = dict(history[-1])
    final["dense_params"] = dense_params
    final["wall_time_s"] = wall
    final["train_time_s"] = sum(e.get("epoch_time_s", 0.0) for e in history)
    final["steps"] = sum(e.get("steps", 0) for e in history)
    final["compiled_steps"] = max((e.get("compiled_steps", 0) for e in history), default=0)
    results = {
        "config": vars(args),
        "integrator": INTEGRATORS[args.integrator][0],
        "history": history,
        "final": final,
        "environment": environment(),
    }
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1))
    png_path = out / f"{stem}.png"
    plot_history(
        history,
        png_path,
        title=f"MLP 784-{args.width}x4-10, {args.integrator}"
        + (f", tau={args.tau:g}" if adaptive else ""),
    )
    print(f"wrote {json_path} and {png_path}")
    results["paths"] = {"json": str(json_path), "png": str(png_path)}
    return results


if __name__ == "__main__":
    main()
