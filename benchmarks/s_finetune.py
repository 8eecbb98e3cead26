"""Paper experiment: S fine-tuning after the rank search (docs/method.md, "S fine-tuning").

Phase 1 trains rank-adaptively (``dlrt_jax.bug``) to find the ranks; phase 2 freezes the bases
``U``, ``V`` (and the ranks) and trains only ``S`` (``dlrt_jax.s_only``; biases and the dense
classifier layer keep training with the same inner optimiser). Reports the test accuracy before
and after the fine-tuning, with the ranks and compression (unchanged by phase 2).

Models: the 5-layer MLP (width 500, Adam 1e-3, batch 256; default) or LeNet5 (SGD 0.05,
batch 128). Writes ``s_finetune_<model>.{csv,json,png}`` to ``--out``.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/s_finetune.py --search-epochs 5 --finetune-epochs 3
    OPENBLAS_NUM_THREADS=1 python benchmarks/s_finetune.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import environment, load_mnist, train, write_csv  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlp", "lenet5"], default="mlp")
    p.add_argument("--tau", type=float, default=0.09)
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=500, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="default s_finetune_<model>")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def _plot(search: list[dict], finetune: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = search[-1]["epoch"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [e["epoch"] for e in search[1:]],
        [100 * e["test_acc"] for e in search[1:]],
        "o-",
        label="rank search (bug)",
    )
    ax.plot(
        [n + e["epoch"] for e in finetune],
        [100 * e["test_acc"] for e in finetune],
        "s-",
        label="S only (bases frozen)",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.width, args.search_epochs, args.finetune_epochs = 64, 1, 1
        args.subset = args.subset or 4096
    name = args.name or f"s_finetune_{args.model}" + ("_quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    key = jax.random.key(args.seed)
    if args.model == "mlp":
        data = load_mnist(args.data_dir, subset=args.subset)
        params = models.init_mlp(key, args.width)
        apply_fn, inner, batch_size = models.mlp_apply, optax.adam(1e-3), 256
        inner_name = "adam(1e-3)"
    else:
        data = load_mnist(args.data_dir, flatten=False, subset=args.subset)
        params = models.init_lenet5(key)
        apply_fn, inner, batch_size = models.lenet5_apply, optax.sgd(0.05), 128
        inner_name = "sgd(0.05)"
    common = dict(apply_fn=apply_fn, data=data, batch_size=batch_size, progress=False, log=print)

    t0 = time.perf_counter()
    search = train(
        params,
        dlrt_jax.bug(inner, tau=args.tau),
        epochs=args.search_epochs,
        seed=args.seed,
        fit_capacity_every=1,
        fit_capacity_after_steps=25,
        desc=f"search tau={args.tau:g}",
        **common,
    )
    search_time = time.perf_counter() - t0
    # Drop the inactive columns: S-only training never changes the rank.
    params, _ = dlrt_jax.resize_capacity(search.params, None, lambda x: int(x.rank))
    t0 = time.perf_counter()
    tune = train(
        params,
        dlrt_jax.s_only(inner),
        epochs=args.finetune_epochs,
        seed=args.seed + 1000,  # a different batch order from the search epochs
        desc="S only",
        **common,
    )
    tune_time = time.perf_counter() - t0
    before, after = search.history[-1], tune.history[-1]
    row = {
        "model": args.model,
        "tau": args.tau,
        "search_epochs": args.search_epochs,
        "finetune_epochs": args.finetune_epochs,
        "acc_before": round(100 * before["test_acc"], 2),
        "acc_after": round(100 * after["test_acc"], 2),
        "ranks": after["ranks"],
        "ranks_before": before["ranks"],
        "eval_cr": round(100 * after["eval_compression"], 2),
        "search_s": round(search_time, 1),
        "finetune_s": round(tune_time, 1),
        "finetune_ms_per_step": round(
            1000
            * sum(e.get("epoch_time_s", 0) for e in tune.history)
            / max(sum(e.get("steps", 0) for e in tune.history), 1),
            1,
        ),
    }
    payload = {
        "experiment": "S fine-tuning after the rank search",
        "protocol": {
            "model": args.model if args.model == "lenet5" else f"mlp width {args.width}",
            "search": f"dlrt_jax.bug({inner_name}, tau={args.tau}), {args.search_epochs} epochs",
            "finetune": f"dlrt_jax.s_only({inner_name}), {args.finetune_epochs} epochs (biases "
            "and the dense classifier also trained)",
            "batch_size": batch_size,
            "seed": args.seed,
            "subset": args.subset,
        },
        "result": row,
        "search_history": search.history,
        "finetune_history": tune.history,
        "wall_time_s": time.perf_counter() - t_start,
        "environment": environment(),
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    write_csv(out / f"{name}.csv", [row])
    _plot(search.history, tune.history, out / f"{name}.png", f"{args.model}, tau={args.tau:g}")
    width = max(len(k) for k in row)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s; wrote {out / name}.*")


if __name__ == "__main__":
    main()
