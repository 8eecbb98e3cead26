"""Training dynamics of the main job's MLP: the augment-train-truncate cycle against today's step.

One configuration per call; appends a JSON line (per-epoch accuracy, ranks, compression, wall time
with compiles) to ``--out``. Run it once per row of the "Training dynamics" tables in
``benchmarks/README.md``:

    OPENBLAS_NUM_THREADS=1 python benchmarks/training_dynamics.py --start-rank 100 --k 10
    OPENBLAS_NUM_THREADS=1 python benchmarks/training_dynamics.py --dense

The data directory is ``$DLRT_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import environment, inner_optimizer, load_mnist, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", action="store_true", help="dense Adam baseline")
    p.add_argument("--integrator", default="parallel_bug", choices=["parallel_bug", "bug"])
    p.add_argument("--start-rank", type=int, default=100)
    p.add_argument("--k", type=int, default=1, help="augment_every (1: the paper's step)")
    p.add_argument("--inner", default="adam", help="adam, isotropic, momentum, reference")
    p.add_argument("--factor-lr", type=float, default=3e-3)
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="adamw inside (with --inner adam)"
    )
    p.add_argument("--eps", type=float, default=1e-8, help="Adam's eps inside (with --inner adam)")
    p.add_argument(
        "--coefficient-steps",
        choices=["S", "KLS"],
        default="S",
        help="what moves between augmentations with --k > 1: S alone, or K, L, S at a fixed rank",
    )
    p.add_argument(
        "--new-moments",
        choices=["zero", "mean"],
        default=None,
        help="second moments of new directions (default: mean with --k > 1, else zero)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the other parameters")
    p.add_argument("--tau", type=float, default=0.09)
    p.add_argument("--headroom", type=float, default=None, help="default: 1 (k=1), 2 (k>1)")
    p.add_argument("--check-every", type=int, default=None, help="default: 10, or k")
    p.add_argument("--init-scale", type=float, default=0.1)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--final-fixed-epochs",
        type=int,
        default=0,
        help="the last N of --epochs at fixed ranks (tau=None, the optimiser state carried on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results/training_dynamics.jsonl")
    args = p.parse_args()

    t0 = time.perf_counter()
    data = load_mnist(None, subset=args.subset)
    key = jax.random.key(args.seed)
    if args.dense:
        params = models.init_mlp(key, args.width, dense=True)
        tx, policy = optax.adam(args.lr), None
    else:
        params = models.init_mlp(key, args.width, max_rank=args.start_rank, scale=args.init_scale)
        make = getattr(dlrt_jax, args.integrator)
        if args.inner == "adam" and args.weight_decay:
            inner = optax.adamw(args.factor_lr, eps=args.eps, weight_decay=args.weight_decay)
        elif args.inner == "adam":
            inner = optax.adam(args.factor_lr, eps=args.eps)
        else:
            inner = inner_optimizer(args.inner, args.factor_lr)
        tx = make(
            inner,
            tau=args.tau,
            other_optimizer=optax.adam(args.lr),
            augment_every=args.k,
            new_moments=args.new_moments,
            coefficient_steps=args.coefficient_steps,
        )
        headroom = args.headroom or (1.0 if args.k == 1 else 2.0)
        every = args.check_every or (10 if args.k == 1 else args.k)
        policy = dlrt_jax.CapacityPolicy(every=every, headroom=headroom)
    fixed = args.final_fixed_epochs if not args.dense else 0
    if not 0 <= fixed <= args.epochs:
        p.error("--final-fixed-epochs must be in [0, --epochs]")
    result = train(
        params,
        tx,
        apply_fn=models.mlp_apply,
        data=data,
        epochs=args.epochs - fixed,
        batch_size=256,
        seed=args.seed,
        progress=False,
        capacity_policy=policy,
    )
    if fixed:
        # the same inner optimisers and state, ranks held: parallel_bug truncates back to them
        tx = make(inner, tau=None, other_optimizer=optax.adam(args.lr))
        more = train(
            result.params,
            tx,
            apply_fn=models.mlp_apply,
            data=data,
            epochs=fixed,
            batch_size=256,
            seed=args.seed + 1,  # other shuffles than the first epochs'
            progress=False,
            opt_state=result.opt_state,
            capacity_policy=policy,
        )
        for h in more.history[1:]:
            h["epoch"] += args.epochs - fixed
        result = result._replace(history=result.history + more.history[1:])
    wall = time.perf_counter() - t0
    row = {
        "config": vars(args),
        "wall_s": wall,
        "history": [
            {
                k: h.get(k)
                for k in (
                    "epoch",
                    "test_acc",
                    "ranks",
                    "capacities",
                    "eval_compression",
                    "epoch_time_s",
                    "step_time_median_s",
                    "compiled_steps",
                )
            }
            for h in result.history
        ],
        "environment": environment(),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    last = result.history[-1]
    accs = " ".join(f"{100 * h['test_acc']:.2f}" for h in result.history[1:])
    print(
        f"{args.tag or ('dense' if args.dense else f'k={args.k} {args.inner}')}: acc {accs} | "
        f"ranks {last['ranks']} | c.r. {100 * last['eval_compression']:.1f} % | wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
