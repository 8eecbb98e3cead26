"""Paper experiment: the 5-layer MLP 784-w-w-w-w-10 on MNIST, rank-adaptive DLRT, tau sweep.

Protocol of the paper (docs/method.md): width 500, rank-adaptive BUG, Adam 1e-3 inside the
integrator, batch 256, 10 epochs, tau in 0.03 .. 0.17, plus the dense baseline (Adam 1e-3). Width
784 at tau 0.09 and 0.17 with ``--wide``.

Two presets (``--preset``):

* ``default`` (the main job's defaults, ``dlrt_jax.train_mnist``): ``parallel_bug`` (one gradient
  evaluation per step), ``optax.adam`` with transported moments on K, L, S at
  ``FACTOR_LR_SCALE`` (3) x ``--lr``, initial singular values times ``INIT_SCALE`` (0.1);
* ``paper``: rank-adaptive ``bug`` with ``dlrt_jax.reference_adam(--lr)`` (the TF code's
  effective step: fresh Adam slots every step) and the paper's init scale 1.

Both train the biases and the dense classifier with ``optax.adam(--lr)`` and, by default
(``--capacity policy``), resize the capacities inside the training loop with
``dlrt_jax.CapacityPolicy()``; ``--capacity refit`` restores the old schedule (``fit_capacity``
after 25 steps and after every epoch). ``--integrator``, ``--inner``, ``--factor-lr`` and
``--init-scale`` override single settings of the preset.

Writes ``mlp_sweep.{csv,json,png}`` to ``--out`` (one row per run, full per-epoch histories in
the JSON, rank trajectories per layer in the PNG) and prints our numbers beside the paper's.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/mlp_sweep.py --taus 0.09 --epochs 10
    OPENBLAS_NUM_THREADS=1 python benchmarks/mlp_sweep.py --preset paper --taus 0.09
    OPENBLAS_NUM_THREADS=1 python benchmarks/mlp_sweep.py --quick      # a smoke run (< 1 min)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import (  # noqa: E402
    FACTOR_LR_SCALE,
    INIT_SCALE,
    INNER,
    build_transform,
    environment,
    inner_optimizer,
    load_mnist,
    train,
    write_csv,
)

# (width, tau) -> (test acc %, ranks, eval c.r. %) from the authors' result files (dlrt.md sec. 4)
PAPER = {
    (500, 0.03): (98.49, [176, 170, 171, 174], 34.96),
    (500, 0.05): (98.56, [81, 104, 111, 117], 61.55),
    (500, 0.07): (98.52, [52, 67, 73, 72], 75.26),
    (500, 0.09): (98.34, [35, 53, 51, 46], 82.57),
    (500, 0.11): (98.11, [27, 40, 37, 38], 86.52),
    (500, 0.13): (97.50, [20, 31, 32, 30], 89.22),
    (500, 0.15): (97.22, [17, 25, 26, 24], 91.12),
    (500, 0.17): (96.90, [13, 21, 24, 20], 92.44),
    (784, 0.09): (98.49, [56, 67, 63, 59], 84.11),
    (784, 0.17): (97.40, [17, 23, 22, 23], 94.28),
    (500, None): (98.54, [], 0.0),
    (784, None): (98.53, [], 0.0),
}
TAUS = [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15, 0.17]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--taus", type=float, nargs="*", default=TAUS)
    p.add_argument("--epochs", type=int, default=10, help="epochs at tau 0.09 and dense")
    p.add_argument(
        "--epochs-other",
        type=int,
        default=None,
        help="epochs for the other taus (reduced protocol; default --epochs)",
    )
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--wide", action="store_true", help="also width 784 at tau 0.09 and 0.17")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument(
        "--dense-init",
        choices=["factors", "glorot"],
        default="factors",
        help="dense baseline's hidden weights: U S V^T of the DLRT start (default) or "
        "Glorot-uniform (the Keras default, as a TensorFlow dense baseline would use)",
    )
    p.add_argument(
        "--preset",
        choices=["default", "paper"],
        default="default",
        help="default: parallel_bug, adam (transported moments) at 3 x --lr, init scale 0.1; "
        "paper: bug, reference_adam at --lr, init scale 1",
    )
    p.add_argument(
        "--integrator", default=None, choices=["bug", "parallel_bug"], help="overrides --preset"
    )
    p.add_argument("--inner", default=None, choices=sorted(INNER), help="overrides --preset")
    p.add_argument(
        "--factor-lr", type=float, default=None, help="lr of K, L, S (overrides --preset)"
    )
    p.add_argument(
        "--init-scale",
        type=float,
        default=None,
        help="scale of the initial singular values (overrides --preset; the dense baseline "
        "with --dense-init factors uses it too)",
    )
    p.add_argument(
        "--capacity",
        choices=["policy", "refit"],
        default="policy",
        help="policy: dlrt_jax.CapacityPolicy() inside the loop; refit: fit_capacity after 25 "
        "steps and after every epoch (the earlier runs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="mlp_sweep", help="stem of the output files")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (width 64, 1 epoch)")
    return p


def _resolve_preset(args) -> None:
    """Fill the settings that ``--preset`` decides and the command line left unset."""
    paper = args.preset == "paper"
    if args.integrator is None:
        args.integrator = "bug" if paper else "parallel_bug"
    if args.inner is None:
        args.inner = "reference" if paper else "adam"
    if args.factor_lr is None:
        args.factor_lr = args.lr * (1.0 if paper else FACTOR_LR_SCALE)
    if args.init_scale is None:
        args.init_scale = 1.0 if paper else INIT_SCALE


def _run(args, data, width: int, tau: float | None, epochs: int) -> dict:
    key = jax.random.key(args.seed)
    if tau is None:
        params = models.init_mlp(key, width, dense=True, scale=args.init_scale)
        if args.dense_init == "glorot":
            glorot = jax.nn.initializers.glorot_uniform()
            for i, k in enumerate(jax.random.split(jax.random.fold_in(key, 1), len(params) - 1)):
                params[i]["w"] = glorot(k, params[i]["w"].shape, jnp.float32)
        tx = optax.adam(args.lr)
    else:
        params = models.init_mlp(key, width, scale=args.init_scale)
        tx, _ = build_transform(
            args.integrator,
            inner_optimizer(args.inner, args.factor_lr),
            tau=tau,
            other_optimizer=optax.adam(args.lr),
        )
    policy = args.capacity == "policy" and tau is not None
    refit = args.capacity == "refit" and tau is not None
    dense_label = "dense" if args.dense_init == "factors" else "dense (glorot)"
    label = f"w{width} " + (dense_label if tau is None else f"tau={tau:g}")
    t0 = time.perf_counter()
    result = train(
        params,
        tx,
        apply_fn=models.mlp_apply,
        data=data,
        epochs=epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        fit_capacity_every=1 if refit else 0,
        fit_capacity_after_steps=25 if refit else 0,
        capacity_policy=dlrt_jax.CapacityPolicy() if policy else None,
        progress=False,
        desc=label,
        log=print,
    )
    wall = time.perf_counter() - t0
    h = result.history
    final = h[-1]
    paper = PAPER.get((width, None if tau is None else round(tau, 2)))
    steps = sum(e.get("steps", 0) for e in h)
    return {
        "width": width,
        "tau": "dense" if tau is None else tau,
        "preset": None if tau is None else args.preset,
        "integrator": None if tau is None else args.integrator,
        "dense_init": args.dense_init if tau is None else None,
        "epochs": epochs,
        "seed": args.seed,
        "test_acc": round(100 * final["test_acc"], 2),
        "best_epoch_acc": round(100 * max(e["test_acc"] for e in h[1:]), 2) if epochs else None,
        "ranks": final["ranks"],
        "eval_params": final["eval_params"],
        "eval_cr": round(100 * final["eval_compression"], 2),
        "train_params": final["train_params"],
        "train_cr": round(100 * final["train_compression"], 2),
        "rank_trajectory": [e["ranks"] for e in h],
        "num_resizes": final.get("num_resizes"),
        "compiled_steps": final.get("compiled_steps"),
        "wall_s": round(wall, 1),
        "ms_per_step": round(1000 * sum(e.get("epoch_time_s", 0) for e in h) / max(steps, 1), 1),
        "paper_acc": paper[0] if paper else None,
        "paper_ranks": paper[1] if paper else None,
        "paper_eval_cr": paper[2] if paper else None,
        "history": h,
    }


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = [r for r in runs if r["tau"] != "dense"]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    cmap = plt.get_cmap("viridis")
    for i, run in enumerate(adaptive):
        color = cmap(i / max(len(adaptive) - 1, 1))
        epochs = [e["epoch"] for e in run["history"]]
        for j in range(4):
            axes[j].plot(
                epochs,
                [e["ranks"][j] for e in run["history"]],
                "o-",
                color=color,
                ms=3,
                label=f"w{run['width']} tau={run['tau']:g}",
            )
    for j in range(4):
        axes[j].set_title(f"layer {j + 1} rank")
        axes[j].set_xlabel("epoch")
        axes[j].set_yscale("log")
        axes[j].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[4]
    ax.plot([r["eval_cr"] for r in adaptive], [r["test_acc"] for r in adaptive], "o", label="ours")
    paper = [r for r in adaptive if r["paper_acc"] is not None]
    ax.plot(
        [r["paper_eval_cr"] for r in paper], [r["paper_acc"] for r in paper], "x", label="paper"
    )
    for r in runs:
        if r["tau"] == "dense":
            ax.axhline(r["test_acc"], ls="--", color="gray", label=f"dense w{r['width']} (ours)")
    ax.set_xlabel("eval compression (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(runs: list[dict]) -> str:
    head = (
        f"{'width':>5} {'tau':>6} {'ep':>3} {'acc %':>6} {'paper':>6} {'ranks':<22} "
        f"{'paper ranks':<22} {'eval cr':>7} {'paper':>6} {'train cr':>8} {'wall s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        tau = r["tau"] if r["tau"] == "dense" else f"{r['tau']:g}"
        lines.append(
            f"{r['width']:>5} {tau:>6} {r['epochs']:>3} {r['test_acc']:>6.2f} "
            f"{r['paper_acc'] if r['paper_acc'] is not None else '':>6} {str(r['ranks']):<22} "
            f"{str(r['paper_ranks'] or ''):<22} {r['eval_cr']:>7.2f} "
            f"{r['paper_eval_cr'] if r['paper_eval_cr'] is not None else '':>6} "
            f"{r['train_cr']:>8.2f} {r['wall_s']:>7.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    _resolve_preset(args)
    if args.quick:
        args.width, args.taus, args.epochs, args.epochs_other = 64, [0.09, 0.17], 1, 1
        args.subset = args.subset or 4096
        args.name = args.name + "_quick"
    epochs_other = args.epochs if args.epochs_other is None else args.epochs_other
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_mnist(args.data_dir, subset=args.subset)
    configs = [(args.width, None, args.epochs)] if not args.no_dense else []
    for tau in args.taus:
        configs.append((args.width, tau, args.epochs if round(tau, 2) == 0.09 else epochs_other))
    if args.wide:
        configs += [(784, 0.09, args.epochs), (784, 0.17, epochs_other)]
    runs: list[dict] = []
    for width, tau, epochs in configs:
        runs.append(_run(args, data, width, tau, epochs))
        # written after every run, so a cut-short sweep keeps what it finished
        payload = {
            "experiment": "5-layer MLP tau sweep (dlrt.md section 4)",
            "protocol": {
                "preset": args.preset,
                "integrator": args.integrator,
                "optimizer": (
                    f"K, L, S: {args.inner} ({INNER[args.inner]}) at lr {args.factor_lr:g}; "
                    f"biases and classifier: adam({args.lr:g}); dense: adam({args.lr:g})"
                ),
                "init_scale": args.init_scale,
                "dense_init": args.dense_init,
                "batch_size": args.batch_size,
                "epochs_tau_0.09_and_dense": args.epochs,
                "epochs_other_taus": epochs_other,
                "seed": args.seed,
                "subset": args.subset,
                "capacity": (
                    "dlrt_jax.CapacityPolicy() inside the loop (every=10, headroom=1, "
                    "min_free=8, multiple=8)"
                    if args.capacity == "policy"
                    else "fit_capacity after 25 steps, then after every epoch"
                ),
                "accuracy": "test accuracy after the last epoch (no model selection)",
            },
            "runs": runs,
            "wall_time_s": time.perf_counter() - t_start,
            "environment": environment(),
        }
        (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
        write_csv(
            out / f"{args.name}.csv", [{k: v for k, v in r.items() if k != "history"} for r in runs]
        )
        _plot(runs, out / f"{args.name}.png")
    print(_table(runs))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; wrote {out / args.name}.*")


if __name__ == "__main__":
    main()
