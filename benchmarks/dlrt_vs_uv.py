"""Paper experiment: DLRT against the plain factorisation W = U V^T on LeNet5 (fixed rank 20).

Protocol of the paper (docs/method.md): LeNet5 with conv1 (20 x 25), conv2 (50 x 500) and fc1
(500 x 800) at fixed rank 20, fc2 dense; plain SGD lr 0.01, batch 128, 20 epochs, 10 runs; initial
singular values ``s_k / d^k`` (``s_k`` sorted ``|N(0, 1)|``, ``k = 0..19`` as in the paper's code,
so the largest value is not damped) for d = 1, 2, 10.

DLRT side: ``dlrt_jax.projector_splitting`` (the fixed-rank KSL integrator, 3 gradient
evaluations per step) by default, or ``--integrator bug_fixed`` (fixed-rank BUG, 2 evaluations).
Rank 20 is the full rank of conv1 (20 x 25): the rank-adaptive integrators cap the capacity at
floor(20 / 2) = 10 there, so a fixed-rank integrator runs this protocol.
U V^T side: two dense factors per layer, ``U = U0 sqrt(S0)``, ``V = V0 sqrt(S0)`` from the same
initial factors (same function at step 0), trained by ``optax.sgd(0.01)`` with true gradients.
Writes ``dlrt_vs_uv.{csv,json,png}`` to ``--out``.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/dlrt_vs_uv.py --epochs 2 --seeds 0
    OPENBLAS_NUM_THREADS=1 python benchmarks/dlrt_vs_uv.py --quick
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

from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import build_transform, environment, load_mnist, train, write_csv  # noqa: E402

# d -> (DLRT acc %, U V^T acc %) after 20 epochs (mean of 10 runs); after 1 epoch only for d = 10.
PAPER = {1: (97.81, 93.74), 2: (97.29, 90.91), 10: (97.07, 86.24)}
PAPER_EPOCH1 = {10: (39.1, 16.0)}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ds", type=float, nargs="+", default=[1, 2, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--integrator", choices=["ksl", "bug_fixed"], default="ksl")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="dlrt_vs_uv")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def _run(args, data, method: str, d: float, seed: int) -> dict:
    key = jax.random.key(seed)
    decay = None if d == 1 else d
    if method == "dlrt":
        params = models.init_lenet5(key, rank=args.rank, decay=decay)
        tx, _ = build_transform(args.integrator, optax.sgd(args.lr))
    else:
        params = models.init_lenet5(key, rank=args.rank, decay=decay, uv=True)
        tx = optax.sgd(args.lr)
    t0 = time.perf_counter()
    result = train(
        params,
        tx,
        apply_fn=models.lenet5_apply,
        data=data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        progress=False,
        desc=f"{method} d={d:g} seed {seed}",
        log=print,
    )
    h = result.history
    steps = sum(e.get("steps", 0) for e in h)
    return {
        "method": method,
        "d": d,
        "seed": seed,
        "epochs": args.epochs,
        "acc_epoch1": round(100 * h[1]["test_acc"], 2) if len(h) > 1 else None,
        "test_acc": round(100 * h[-1]["test_acc"], 2),
        "acc_per_epoch": [round(100 * e["test_acc"], 2) for e in h],
        "ranks": h[-1]["ranks"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "ms_per_step": round(1000 * sum(e.get("epoch_time_s", 0) for e in h) / max(steps, 1), 1),
    }


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    for d in dict.fromkeys(r["d"] for r in runs):
        row = {"d": d}
        for method in ("dlrt", "uv"):
            group = [r for r in runs if r["d"] == d and r["method"] == method]
            if not group:
                continue
            accs = np.array([r["test_acc"] for r in group])
            acc1 = np.array([r["acc_epoch1"] for r in group])
            row[f"{method}_runs"] = len(group)
            row[f"{method}_acc"] = round(float(accs.mean()), 2)
            row[f"{method}_std"] = round(float(accs.std(ddof=1)), 2) if len(accs) > 1 else 0.0
            row[f"{method}_acc_epoch1"] = round(float(acc1.mean()), 2)
        row["epochs"] = runs[0]["epochs"]
        paper = PAPER.get(int(d) if float(d).is_integer() else d)
        row["paper_dlrt"], row["paper_uv"] = paper if paper else (None, None)
        p1 = PAPER_EPOCH1.get(int(d) if float(d).is_integer() else d)
        row["paper_dlrt_epoch1"], row["paper_uv_epoch1"] = p1 if p1 else (None, None)
        if "dlrt_acc" in row and "uv_acc" in row:
            row["dlrt_beats_uv"] = row["dlrt_acc"] > row["uv_acc"]
        rows.append(row)
    return rows


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = list(dict.fromkeys(r["d"] for r in runs))
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds, strict=True):
        for method, style in (("dlrt", "o-"), ("uv", "s--")):
            group = [r for r in runs if r["d"] == d and r["method"] == method]
            if not group:
                continue
            acc = np.array([r["acc_per_epoch"] for r in group])
            epochs = np.arange(acc.shape[1])
            label = "DLRT (fixed rank)" if method == "dlrt" else "U V^T (SGD)"
            ax.plot(epochs[1:], acc.mean(0)[1:], style, label=f"{label}, {len(group)} runs")
        ax.set_title(f"initial s_k / d^k, d = {d:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(s: dict, method: str) -> str:
    if f"{method}_acc" not in s:
        return f"{'-':>15}"
    return f"{s[f'{method}_acc']:>7.2f} +- {s[f'{method}_std']:<4.2f}"


def _table(summary: list[dict]) -> str:
    head = (
        f"{'d':>4} {'ep':>3} {'DLRT acc %':>15} {'UV acc %':>15} {'paper DLRT':>10} "
        f"{'paper UV':>9} {'DLRT ep1':>9} {'UV ep1':>7} {'DLRT > UV':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(
            f"{s['d']:>4g} {s['epochs']:>3} {_fmt(s, 'dlrt')} {_fmt(s, 'uv')} "
            f"{s['paper_dlrt'] or '':>10} {s['paper_uv'] or '':>9} "
            f"{s.get('dlrt_acc_epoch1', ''):>9} {s.get('uv_acc_epoch1', ''):>7} "
            f"{str(s.get('dlrt_beats_uv', '')):>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.ds, args.seeds, args.epochs = [1, 10], [0], 1
        args.subset = args.subset or 2048
        args.name = args.name + "_quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_mnist(args.data_dir, flatten=False, subset=args.subset)
    runs: list[dict] = []
    for seed in args.seeds:
        for d in args.ds:
            for method in ("dlrt", "uv"):
                runs.append(_run(args, data, method, d, seed))
                summary = _summary(runs)
                payload = {
                    "experiment": "DLRT vs U V^T, LeNet5 fixed rank (dlrt.md section 4)",
                    "protocol": {
                        "dlrt": f"{args.integrator} (fixed rank) with optax.sgd({args.lr}), rank "
                        f"{args.rank} in conv1, conv2, fc1 (capacity = rank)",
                        "uv": f"W = U V^T, optax.sgd({args.lr}) on U and V (true gradients)",
                        "init": "s_k / d^k, s_k sorted |N(0,1)|, k = 0..rank-1 (the paper's "
                        "code); same factors for both methods",
                        "batch_size": args.batch_size,
                        "epochs": args.epochs,
                        "seeds": args.seeds,
                        "subset": args.subset,
                        "accuracy": "test accuracy after the last epoch",
                    },
                    "summary": summary,
                    "runs": runs,
                    "wall_time_s": time.perf_counter() - t_start,
                    "environment": environment(),
                }
                (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
                write_csv(out / f"{args.name}.csv", summary)
                _plot(runs, out / f"{args.name}.png")
    print(_table(_summary(runs)))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; wrote {out / args.name}.*")


if __name__ == "__main__":
    main()
