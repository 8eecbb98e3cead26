"""Paper experiment: LeNet5 on MNIST, rank-adaptive DLRT tau sweep against the dense network.

Protocol of the paper (dlrt.md section 4): conv1 (20 x 25), conv2 (50 x 500) and fc1 (500 x 800)
factored, fc2 dense; rank-adaptive BUG with plain SGD lr 0.05 (no momentum) inside the
integrator, batch 128, 20 epochs, 5 runs, tau in 0.09, 0.11, 0.15, 0.2, 0.3, 0.45; dense LeNet5 by
SGD lr 0.05. Eval compression in the r(n + m) convention (the paper's LeNet result files count
r(n + 1); dlrt.md section 3). Writes ``lenet_sweep.{csv,json,png}`` to ``--out``.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/lenet_sweep.py --taus 0.2 --epochs 5 --seeds 0 1
    OPENBLAS_NUM_THREADS=1 python benchmarks/lenet_sweep.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dlrt_jax import models  # noqa: E402
from dlrt_jax.train_mnist import (  # noqa: E402
    build_transform,
    environment,
    load_mnist,
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
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="lenet_sweep")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def _run(args, data, tau: float | None, seed: int) -> dict:
    key = jax.random.key(seed)
    if tau is None:
        params = models.init_lenet5(key, dense=True)
        tx, needs_grad_fn = optax.sgd(args.lr), False
    else:
        params = models.init_lenet5(key)
        tx, needs_grad_fn = build_transform("bug", optax.sgd(args.lr), tau=tau)
    label = ("dense" if tau is None else f"tau={tau:g}") + f" seed {seed}"
    t0 = time.perf_counter()
    result = train(
        params,
        tx,
        apply_fn=models.lenet5_apply,
        data=data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        needs_grad_fn=needs_grad_fn,
        fit_capacity_every=1 if tau is not None else 0,
        fit_capacity_after_steps=25 if tau is not None else 0,
        progress=False,
        desc=label,
        log=print,
    )
    h = result.history
    steps = sum(e.get("steps", 0) for e in h)
    return {
        "tau": "dense" if tau is None else tau,
        "seed": seed,
        "epochs": args.epochs,
        "test_acc": round(100 * h[-1]["test_acc"], 2),
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
        paper = PAPER[None if tau == "dense" else round(tau, 2)]
        ranks = np.array([r["ranks"] for r in group]) if group[0]["ranks"] else None
        rows.append(
            {
                "tau": tau,
                "runs": len(group),
                "epochs": group[0]["epochs"],
                "acc_mean": round(float(accs.mean()), 2),
                "acc_std": round(float(accs.std(ddof=1)), 2) if len(accs) > 1 else 0.0,
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
        f"{'tau':>6} {'runs':>4} {'ep':>3} {'acc % (ours)':>14} {'acc % (paper)':>14} "
        f"{'ranks (ours)':<20} {'ranks (paper)':<14} {'eval cr':>7} {'paper':>6}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        tau = s["tau"] if s["tau"] == "dense" else f"{s['tau']:g}"
        lines.append(
            f"{tau:>6} {s['runs']:>4} {s['epochs']:>3} "
            f"{s['acc_mean']:>7.2f} +- {s['acc_std']:<4.2f} "
            f"{s['paper_acc']:>7.2f} +- {s['paper_std']:<4.2f} {str(s['ranks_mean']):<20} "
            f"{str(s['paper_ranks']):<14} {s['eval_cr_mean']:>7.2f} {s['paper_eval_cr']:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.taus, args.seeds, args.epochs = [0.2], [0], 1
        args.dense_seeds = [0]
        args.subset = args.subset or 2048
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
                "integrator": "rank-adaptive BUG (dlrt_jax.bug)",
                "optimizer": f"sgd({args.lr}) inside the integrator; dense: sgd({args.lr})",
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "seeds": args.seeds,
                "dense_seeds": dense_seeds,
                "subset": args.subset,
                "capacity_refit": "after 25 steps, then after every epoch (fit_capacity)",
                "compression_convention": "eval params r(n+m) per factored layer",
                "accuracy": "test accuracy after the last epoch (no model selection)",
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
