"""Paper experiment: LeNet5 on MNIST, rank-adaptive DLRT tau sweep against the dense network.

Protocol of the paper (docs/method.md): conv1 (20 x 25), conv2 (50 x 500) and fc1 (500 x 800)
factored, fc2 dense; rank-adaptive BUG with plain SGD lr 0.05 (no momentum) inside the
integrator, batch 128, 20 epochs, 5 runs, tau in 0.09, 0.11, 0.15, 0.2, 0.3, 0.45; dense LeNet5 by
SGD lr 0.05. Eval compression in the r(n + m) convention (the paper's LeNet result files count
r(n + 1); docs/method.md, "Parameter counts"). Writes ``lenet_sweep.{csv,json,png}`` to ``--out``.

``--protocol`` (default ``paper``):

* ``paper``: the 60,000 training images are split 50,000 / 10,000 into train / validation by a
  stratified random split seeded by the run's seed (a random permutation, sorted stably by label,
  every 6th image to validation: 1,000 +- 1 per class in proportion). Validation and test loss and
  accuracy are recorded every epoch; reported are the epoch with the lowest validation loss (the
  paper's model selection) and the last epoch, test accuracy at both. The test set is MNIST's
  10,000 test images (the paper re-splits the 70,000 images 60k / 10k per run).
* ``full``: the earlier protocol: train on all 60,000 images, test accuracy after the last epoch.

``--preset`` (default ``paper``):

* ``paper``: rank-adaptive ``bug`` with ``optax.sgd(lr)`` (lr 0.05) inside, initial singular
  values at scale 1; dense baseline ``optax.sgd(lr)``.
* ``default``: the main job's defaults adapted to LeNet5: ``parallel_bug`` with ``optax.adam``
  (moments transported) on K, L, S at ``FACTOR_LR_SCALE`` (3) x lr, ``optax.adam(lr)`` on the
  biases and fc2 (lr 1e-3), initial singular values at ``INIT_SCALE`` (0.1); dense baseline
  ``optax.adam(lr)``.

The dense baselines always start from ``U S V^T`` of the scale-1 factors (fc2 Glorot). Capacities
follow the ranks inside the loop (``dlrt_jax.CapacityPolicy()``; ``--capacity refit``: the earlier
``fit_capacity`` after 25 steps and after every epoch).

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/lenet_sweep.py --taus 0.2 --epochs 5 --seeds 0 1
    OPENBLAS_NUM_THREADS=1 python benchmarks/lenet_sweep.py --preset default --taus 0.2 --seeds 0
    OPENBLAS_NUM_THREADS=1 python benchmarks/lenet_sweep.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.data import batch_iterator  # noqa: E402
from dlrt_jax.mnist.train import (  # noqa: E402
    FACTOR_LR_SCALE,
    INIT_SCALE,
    build_transform,
    environment,
    evaluate,
    load_mnist,
    make_step,
    train,
    write_csv,
)

# tau -> (test acc % mean, std over 5 runs, ranks (conv1, conv2, fc1), eval c.r. % r(n+m))
PAPER = {
    0.09: (98.16, 0.26, [10, 23, 62], 77.1),
    0.11: (98.21, 0.44, [10, 20, 48], 81.7),
    0.15: (98.14, 0.33, [9, 16, 28], 88.2),
    0.2: (98.12, 0.34, [8, 8, 15], 93.2),
    0.3: (97.45, 0.48, [4, 6, 8], 95.6),
    0.45: (94.07, 0.49, [2, 2, 3], 97.7),
    None: (98.82, 0.06, [], 0.0),
}
TAUS = [0.09, 0.11, 0.15, 0.2, 0.3, 0.45]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--taus", type=float, nargs="+", default=TAUS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--dense-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    p.add_argument(
        "--protocol",
        choices=["paper", "full"],
        default="paper",
        help="paper: 50k/10k train/validation split, lowest-validation-loss epoch and last "
        "epoch; full: all 60k images, last epoch",
    )
    p.add_argument(
        "--preset",
        choices=["paper", "default"],
        default="paper",
        help="paper: bug + sgd(0.05), init scale 1; default: parallel_bug + adam (factor lr "
        "3 x lr, lr 1e-3), init scale 0.1",
    )
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 (paper), 1e-3 (default)")
    p.add_argument(
        "--capacity",
        choices=["policy", "refit"],
        default="policy",
        help="policy: dlrt_jax.CapacityPolicy() in the loop; refit: fit_capacity after 25 "
        "steps and after every epoch",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="lenet_sweep")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def _setting(args) -> dict:
    """Integrator, optimisers and init scale of ``--preset``."""
    if args.preset == "paper":
        return {
            "integrator": "bug",
            "factor_opt": f"sgd({args.lr:g})",
            "other_opt": f"sgd({args.lr:g})",
            "dense_opt": f"sgd({args.lr:g})",
            "init_scale": 1.0,
        }
    return {
        "integrator": "parallel_bug",
        "factor_opt": f"adam({FACTOR_LR_SCALE * args.lr:g}), moments transported",
        "other_opt": f"adam({args.lr:g})",
        "dense_opt": f"adam({args.lr:g})",
        "init_scale": INIT_SCALE,
    }


def _split(data, seed: int):
    """Stratified seeded 50k / 10k train / validation split of the 60k training images."""
    xtr, ytr, xte, yte = data
    perm = np.random.default_rng(seed).permutation(len(ytr))
    perm = perm[np.argsort(ytr[perm], kind="stable")]  # class-sorted, random within a class
    is_val = np.zeros(len(ytr), bool)
    is_val[perm[::6]] = True
    return (xtr[~is_val], ytr[~is_val], xte, yte), (xtr[is_val], ytr[is_val])


def _train_with_validation(args, params, tx, data, val, seed, factored, label):
    """As ``train`` (same batches, same capacity handling) plus validation loss/acc per epoch."""
    apply_fn = models.lenet5_apply
    step = make_step(models.cross_entropy_loss(apply_fn), tx)
    opt_state = tx.init(params)
    policy = dlrt_jax.CapacityPolicy() if factored and args.capacity == "policy" else None
    refit = factored and args.capacity == "refit"
    xtr, ytr, xte, yte = data

    def record(epoch, extra=None):
        test_acc, test_loss = evaluate(apply_fn, params, xte, yte)
        val_acc, val_loss = evaluate(apply_fn, params, *val)
        counts = models.param_counts(params)
        caps = [
            x.capacity
            for x in jax.tree_util.tree_leaves(params, is_leaf=dlrt_jax.is_lowrank)
            if dlrt_jax.is_lowrank(x)
        ]
        rec = {
            "epoch": epoch,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "ranks": counts["ranks"],
            "capacities": caps,
            "eval_params": counts["eval_params"],
            "train_params": counts["train_params"],
            "eval_compression": counts["eval_compression"],
            "train_compression": counts["train_compression"],
        }
        rec.update(extra or {})
        return rec

    history = [record(0)]
    total_steps = num_resizes = 0
    for epoch in range(1, args.epochs + 1):
        losses, times = [], []
        t_epoch = time.perf_counter()
        for xb, yb in batch_iterator(xtr, ytr, args.batch_size, seed=seed, epoch=epoch):
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, (jnp.asarray(xb), jnp.asarray(yb)))
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            total_steps += 1
            if policy is not None:
                params, opt_state, resized = policy(total_steps, params, opt_state)
                num_resizes += int(resized)
            if refit and total_steps == 25:
                params, opt_state = dlrt_jax.fit_capacity(params, opt_state)
        epoch_time = time.perf_counter() - t_epoch
        h = record(
            epoch,
            {
                "train_loss": float(np.mean([float(x) for x in losses])),
                "epoch_time_s": epoch_time,
                "steps": len(times),
                "step_time_median_s": statistics.median(times),
                "num_resizes": num_resizes,
                "compiled_steps": step._cache_size(),
            },
        )
        history.append(h)
        if refit and epoch < args.epochs:
            params, opt_state = dlrt_jax.fit_capacity(params, opt_state)
        print(
            f"{label} epoch {epoch}/{args.epochs}: loss {h['train_loss']:.4f}, val loss "
            f"{h['val_loss']:.4f}, val acc {100 * h['val_acc']:.2f} %, test acc "
            f"{100 * h['test_acc']:.2f} %, ranks {h['ranks']}, eval c.r. "
            f"{100 * h['eval_compression']:.2f} %, {epoch_time:.1f} s "
            f"({1000 * h['step_time_median_s']:.1f} ms/step median)",
            flush=True,
        )
    return history


def _run(args, data, tau: float | None, seed: int) -> dict:
    key = jax.random.key(seed)
    setting = _setting(args)
    paper = args.preset == "paper"
    if tau is None:
        params = models.init_lenet5(key, dense=True)
        tx = optax.sgd(args.lr) if paper else optax.adam(args.lr)
    else:
        params = models.init_lenet5(key, scale=setting["init_scale"])
        if paper:
            inner, other = optax.sgd(args.lr), None
        else:
            inner, other = optax.adam(FACTOR_LR_SCALE * args.lr), optax.adam(args.lr)
        tx, _ = build_transform(setting["integrator"], inner, tau=tau, other_optimizer=other)
    label = ("dense" if tau is None else f"tau={tau:g}") + f" seed {seed}"
    t0 = time.perf_counter()
    if args.protocol == "paper":
        run_data, val = _split(data, seed)
        h = _train_with_validation(args, params, tx, run_data, val, seed, tau is not None, label)
    else:
        factored = tau is not None
        h = train(
            params,
            tx,
            apply_fn=models.lenet5_apply,
            data=data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
            fit_capacity_every=1 if factored and args.capacity == "refit" else 0,
            fit_capacity_after_steps=25 if factored and args.capacity == "refit" else 0,
            capacity_policy=(
                dlrt_jax.CapacityPolicy() if factored and args.capacity == "policy" else None
            ),
            progress=False,
            desc=label,
            log=print,
        ).history
    steps = sum(e.get("steps", 0) for e in h)
    best = None
    if args.protocol == "paper" and len(h) > 1:
        best = min(h[1:], key=lambda e: e["val_loss"])
    return {
        "tau": "dense" if tau is None else tau,
        "preset": args.preset,
        "protocol": args.protocol,
        "seed": seed,
        "epochs": args.epochs,
        "test_acc": round(100 * h[-1]["test_acc"], 2),
        "val_acc": round(100 * h[-1]["val_acc"], 2) if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "test_acc_at_best_val": round(100 * best["test_acc"], 2) if best else None,
        "val_acc_at_best_val": round(100 * best["val_acc"], 2) if best else None,
        "val_loss_best": round(best["val_loss"], 4) if best else None,
        "ranks_at_best_val": best["ranks"] if best else None,
        "rank_trajectory": [e["ranks"] for e in h],
        "ranks": h[-1]["ranks"],
        "eval_params": h[-1]["eval_params"],
        "eval_cr": round(100 * h[-1]["eval_compression"], 2),
        "train_cr": round(100 * h[-1]["train_compression"], 2),
        "wall_s": round(time.perf_counter() - t0, 1),
        "ms_per_step": round(1000 * sum(e.get("epoch_time_s", 0) for e in h) / max(steps, 1), 1),
        "history": h,
    }


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    for tau in dict.fromkeys(r["tau"] for r in runs):
        group = [r for r in runs if r["tau"] == tau]
        accs = np.array([r["test_acc"] for r in group])
        best = [r["test_acc_at_best_val"] for r in group if r["test_acc_at_best_val"] is not None]
        paper = PAPER[None if tau == "dense" else round(tau, 2)]
        ranks = np.array([r["ranks"] for r in group]) if group[0]["ranks"] else None
        rows.append(
            {
                "tau": tau,
                "runs": len(group),
                "epochs": group[0]["epochs"],
                "acc_mean": round(float(accs.mean()), 2),
                "acc_std": round(float(accs.std(ddof=1)), 2) if len(accs) > 1 else 0.0,
                "acc_best_val_mean": round(float(np.mean(best)), 2) if best else None,
                "acc_best_val_std": round(float(np.std(best, ddof=1)), 2)
                if len(best) > 1
                else (0.0 if best else None),
                "best_val_epochs": [r["best_val_epoch"] for r in group],
                "ranks_mean": [] if ranks is None else np.round(ranks.mean(0), 1).tolist(),
                "eval_cr_mean": round(float(np.mean([r["eval_cr"] for r in group])), 2),
                "paper_acc": paper[0],
                "paper_std": paper[1],
                "paper_ranks": paper[2],
                "paper_eval_cr": paper[3],
                "wall_s_per_run": round(float(np.mean([r["wall_s"] for r in group])), 1),
            }
        )
    return rows


def _plot(runs: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    adaptive = [r for r in runs if r["tau"] != "dense"]
    taus = sorted({r["tau"] for r in adaptive})
    cmap = plt.get_cmap("viridis")
    for r in adaptive:
        color = cmap(taus.index(r["tau"]) / max(len(taus) - 1, 1))
        epochs = [e["epoch"] for e in r["history"]]
        for j in range(3):
            axes[j].plot(
                epochs,
                [e["ranks"][j] for e in r["history"]],
                "o-",
                ms=3,
                color=color,
                label=f"tau={r['tau']:g}" if r["seed"] == adaptive[0]["seed"] else None,
            )
    for j, name in enumerate(["conv1", "conv2", "fc1"]):
        axes[j].set_title(f"{name} rank")
        axes[j].set_xlabel("epoch")
        axes[j].set_yscale("log")
        axes[j].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[3]
    ad = [s for s in summary if s["tau"] != "dense"]
    ax.errorbar(
        [s["eval_cr_mean"] for s in ad],
        [s["acc_mean"] for s in ad],
        yerr=[s["acc_std"] for s in ad],
        fmt="o",
        label="ours",
    )
    ax.errorbar(
        [s["paper_eval_cr"] for s in ad],
        [s["paper_acc"] for s in ad],
        yerr=[s["paper_std"] for s in ad],
        fmt="x",
        label="paper",
    )
    for s in summary:
        if s["tau"] == "dense":
            ax.axhline(s["acc_mean"], ls="--", color="gray", label="dense (ours)")
    ax.set_xlabel("eval compression r(n+m) (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(summary: list[dict]) -> str:
    head = (
        f"{'tau':>6} {'runs':>4} {'ep':>3} {'acc % last ep.':>14} {'at best val':>14} "
        f"{'acc % (paper)':>14} "
        f"{'ranks (ours)':<20} {'ranks (paper)':<14} {'eval cr':>7} {'paper':>6}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        tau = s["tau"] if s["tau"] == "dense" else f"{s['tau']:g}"
        best = (
            f"{s['acc_best_val_mean']:>7.2f} +- {s['acc_best_val_std']:<4.2f}"
            if s["acc_best_val_mean"] is not None
            else f"{'-':>14}"
        )
        lines.append(
            f"{tau:>6} {s['runs']:>4} {s['epochs']:>3} "
            f"{s['acc_mean']:>7.2f} +- {s['acc_std']:<4.2f} {best} "
            f"{s['paper_acc']:>7.2f} +- {s['paper_std']:<4.2f} {str(s['ranks_mean']):<20} "
            f"{str(s['paper_ranks']):<14} {s['eval_cr_mean']:>7.2f} {s['paper_eval_cr']:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.preset == "paper" else 1e-3
    if args.quick:
        args.taus, args.seeds, args.epochs = [0.2], [0], 1
        args.dense_seeds = [0]
        args.subset = args.subset or 3072
        args.name = args.name + "_quick"
    dense_seeds = args.seeds if args.dense_seeds is None else args.dense_seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_mnist(args.data_dir, flatten=False, subset=args.subset)
    configs = [(tau, seed) for tau in args.taus for seed in args.seeds]
    configs += [(None, seed) for seed in dense_seeds]
    runs: list[dict] = []
    for tau, seed in configs:
        runs.append(_run(args, data, tau, seed))
        summary = _summary(runs)
        payload = {
            "experiment": "LeNet5 tau sweep (dlrt.md section 4)",
            "protocol": {
                "protocol": args.protocol,
                "split": (
                    "stratified seeded random 50k/10k train/validation split of the 60k training "
                    "images (per run seed); test: the 10k MNIST test images"
                    if args.protocol == "paper"
                    else "all 60k training images; test: the 10k MNIST test images"
                ),
                "preset": args.preset,
                **_setting(args),
                "dense_init": "U S V^T of the scale-1 factors, fc2 Glorot-uniform",
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "seeds": args.seeds,
                "dense_seeds": dense_seeds,
                "subset": args.subset,
                "capacity": (
                    "dlrt_jax.CapacityPolicy() inside the loop (every=10, headroom=1, "
                    "min_free=8, multiple=8)"
                    if args.capacity == "policy"
                    else "fit_capacity after 25 steps, then after every epoch"
                ),
                "compression_convention": "eval params r(n+m) per factored layer",
                "accuracy": (
                    "test accuracy at the epoch of lowest validation loss and after the last epoch"
                    if args.protocol == "paper"
                    else "test accuracy after the last epoch (no model selection)"
                ),
            },
            "summary": summary,
            "runs": runs,
            "wall_time_s": time.perf_counter() - t_start,
            "environment": environment(),
        }
        (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
        write_csv(out / f"{args.name}.csv", summary)
        write_csv(
            out / f"{args.name}_runs.csv",
            [{k: v for k, v in r.items() if k != "history"} for r in runs],
        )
        _plot(runs, summary, out / f"{args.name}.png")
    print(_table(_summary(runs)))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; wrote {out / args.name}.*")


if __name__ == "__main__":
    main()
