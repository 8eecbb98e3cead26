"""End to end: the main job's training run, DLRT variants and dense side by side, step by step.

Every variant trains the paper's MLP 784-500x4-10 on MNIST (batch 256, the same batches in the
same order); the variants' steps are interleaved in one process (step k of every variant, then
step k + 1, ...), so their step times are measured side by side under the same machine load.
Capacities follow the ranks through :class:`dlrt_jax.CapacityPolicy` (the main job's default).
Per epoch and variant: test accuracy, ranks, capacities, eval compression, median and mean step
time (the mean includes compilations and resizes), and the number of compiled step variants.

A variant is ``INTEGRATOR:INNER[@OPTION...]``:

* ``INTEGRATOR``: ``par`` (``parallel_bug``), ``bug`` (rank-adaptive BUG), or ``dense``;
* ``INNER``: the optimiser of K, L, S (``adam``: optax.adam with transported moments; ``reset``:
  optax.adam restarted at every basis change, i.e. every step; ``ref``: ``reference_adam``, the
  paper's TF step; ``iso``: ``isotropic_adam``; ``mom``: SGD with momentum 0.9, lr 0.05);
* options: ``lrX`` (factor learning rate X, default the ``--lr``), ``sX`` (initial ``S`` times X),
  ``rX`` (start rank X instead of floor(min(n, m)/2)), ``tX`` (tau X), ``seedX``, ``glorot``
  (dense only: Glorot-uniform hidden weights instead of the factors' product).

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/end_to_end.py --epochs 3 \
        --variants dense:adam@glorot par:adam bug:adam par:ref --tag inner
    OPENBLAS_NUM_THREADS=1 python benchmarks/end_to_end.py --epochs 1 --quick   # smoke run
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
    environment,
    evaluate,
    inner_optimizer,
    load_mnist,
    make_step,
    write_csv,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _reset_each_step(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` restarted from its initial state at every update (moments reset at basis changes:
    the bases of a rank-adaptive integrator change every step)."""

    def update(g, state, params=None):
        return tx.update(g, tx.init(g), params)[0], state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


#: short variant names -> ``train_mnist.INNER`` names ("reset" is this script's own)
_INNER_NAMES = {"adam": "adam", "ref": "reference", "iso": "isotropic", "mom": "momentum"}


def _inner(name: str, lr: float) -> optax.GradientTransformation:
    if name == "reset":
        return _reset_each_step(optax.adam(lr))
    if name not in _INNER_NAMES:
        raise ValueError(f"unknown inner optimiser {name!r}")
    return inner_optimizer(_INNER_NAMES[name], lr)


def parse_variant(spec: str, args) -> dict:
    head, *opts = spec.split("@")
    integ, inner = head.split(":")
    v = {"spec": spec, "integrator": integ, "inner": inner, "lr": None, "scale": 1.0}
    v.update(start_rank=None, tau=args.tau, seed=args.seed, glorot=False, every=1)
    for o in opts:
        if o == "glorot":
            v["glorot"] = True
        elif o.startswith("lr"):
            v["lr"] = float(o[2:])
        elif o.startswith("seed"):
            v["seed"] = int(o[4:])
        elif o.startswith("s"):
            v["scale"] = float(o[1:])
        elif o.startswith("r"):
            v["start_rank"] = int(o[1:])
        elif o.startswith("t"):
            v["tau"] = float(o[1:])
        elif o.startswith("k"):
            v["every"] = int(o[1:])
        else:
            raise ValueError(f"unknown option {o!r} in {spec!r}")
    if v["lr"] is None:
        v["lr"] = 0.05 if inner == "mom" else args.lr
    return v


def build(v: dict, args):
    """``(params, tx, evaluates_grad_fn)`` of one variant."""
    key = jax.random.key(v["seed"])
    if v["integrator"] == "dense":
        params = models.init_mlp(key, args.width, dense=True)
        if v["glorot"]:
            keys = jax.random.split(jax.random.fold_in(key, 1), len(params) - 1)
            init = jax.nn.initializers.glorot_uniform()
            for k, layer in zip(keys, params[:-1]):
                layer["w"] = init(k, layer["w"].shape, jnp.float32)
        return params, optax.adam(args.lr), False
    params = models.init_mlp(key, args.width, max_rank=v["start_rank"])
    for layer in params[:-1]:
        layer["w"] = layer["w"].replace(S=layer["w"].S * v["scale"])
    inner = _inner(v["inner"], v["lr"])
    factory = {"par": dlrt_jax.parallel_bug, "bug": dlrt_jax.bug}[v["integrator"]]
    tx = factory(
        inner, tau=v["tau"], other_optimizer=optax.adam(args.lr), truncate_every=v["every"]
    )
    return params, tx, v["integrator"] == "bug"


def teacher_data(k: int, seed: int = 0, n_train: int = 60000, n_test: int = 10000):
    """Synthetic MNIST-shaped data whose labels depend on the input through rank-``k`` layers.

    Inputs are uniform pixels in [0, 1] (784); the labels are the argmax of a teacher MLP
    784-500x4-10 whose four hidden weights have rank ``k`` (orthonormal factors, singular values
    sorted |N(0, 1)| times sqrt(500 / k) so that activations keep their scale). A student that
    recovers the teacher needs rank ``k`` in every hidden layer.
    """
    key = jax.random.key(1000 + seed)
    kx, kt = jax.random.split(key)
    teacher = models.init_mlp(kt, 500, rank=k, dense=True, scale=float(np.sqrt(500 / k)))
    x = jax.random.uniform(kx, (n_train + n_test, 784), jnp.float32)
    x = x - 0.5  # centred, so the labels do not hinge on the biases
    logits = jnp.concatenate(
        [models.mlp_apply(teacher, x[i : i + 5000]) for i in range(0, len(x), 5000)]
    )
    # standardise each class's logit over the data, so that the classes are about balanced
    logits = (logits - logits.mean(0)) / (logits.std(0) + 1e-12)
    y = np.asarray(jnp.argmax(logits, -1), np.int32)
    x = np.asarray(x + 0.5)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def run(args) -> list[dict]:
    if args.teacher:
        data = teacher_data(args.teacher, args.seed)
        if args.subset:
            data = (data[0][: args.subset], data[1][: args.subset], data[2], data[3])
    else:
        data = load_mnist(args.data_dir, subset=args.subset)
    xtr, ytr = data[0], data[1]
    variants = [parse_variant(s, args) for s in args.variants]
    loss_fn = models.cross_entropy_loss(models.mlp_apply)
    runs = []
    for v in variants:
        params, tx, _ = build(v, args)
        step = make_step(loss_fn, tx)
        # with truncate_every = k the ranks sit at the capacity between truncations: the policy
        # must read them right after a truncation step
        every = v["every"] if v["every"] > 1 else args.check_every
        policy = dlrt_jax.CapacityPolicy(every=every, headroom=args.headroom)
        run_ = {"v": v, "params": params, "state": tx.init(params), "step": step, "n": 0}
        runs.append(dict(run_, policy=policy))
    rows = []
    for epoch in range(1, args.epochs + 1):
        # step-level interleaving: every variant takes its step on the same batch, in turn, so
        # that the step times of all variants are measured under the same machine load
        for run_ in runs:
            run_.update(times=[], losses=[], resizes=0, wall=0.0)
        for xb, yb in batch_iterator(xtr, ytr, args.batch_size, seed=0, epoch=epoch):
            batch = (jnp.asarray(xb), jnp.asarray(yb))
            for run_ in runs:
                t0 = time.perf_counter()
                p, s, loss = run_["step"](run_["params"], run_["state"], batch)
                jax.block_until_ready(p)
                run_["times"].append(time.perf_counter() - t0)
                run_["losses"].append(loss)
                run_["n"] += 1
                if run_["v"]["integrator"] != "dense":
                    p, s, resized = run_["policy"](run_["n"], p, s)
                    run_["resizes"] += int(resized)
                run_["params"], run_["state"] = p, s
                run_["wall"] += time.perf_counter() - t0
        for run_ in runs:
            v, step = run_["v"], run_["step"]
            times, losses, resizes, wall = (
                run_["times"],
                run_["losses"],
                run_["resizes"],
                run_["wall"],
            )
            final = run_["params"]
            if v["every"] > 1:  # evaluate the truncated model (ranks sit at the capacity between)
                final = jax.tree_util.tree_map(
                    lambda x, tau=v["tau"]: x.truncate(tau) if dlrt_jax.is_lowrank(x) else x,
                    final,
                    is_leaf=dlrt_jax.is_lowrank,
                )
            acc, test_loss = evaluate(models.mlp_apply, final, data[2], data[3])
            counts = models.param_counts(final)
            caps = [
                x.capacity
                for x in jax.tree_util.tree_leaves(run_["params"], is_leaf=dlrt_jax.is_lowrank)
                if dlrt_jax.is_lowrank(x)
            ]
            row = {
                "variant": v["spec"],
                "epoch": epoch,
                "test_acc": round(100 * acc, 2),
                "test_loss": round(test_loss, 4),
                "train_loss": round(float(np.mean([float(x) for x in losses])), 4),
                "ranks": counts["ranks"],
                "capacities": caps,
                "eval_compression": round(100 * counts["eval_compression"], 2),
                "step_ms_median": round(1000 * statistics.median(times), 2),
                "step_ms_mean": round(1000 * wall / len(times), 2),
                "epoch_s": round(wall, 2),
                "resizes": resizes,
                "compiled_steps": step._cache_size(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def speed_at_ranks(args) -> list[dict]:
    """Median step time of each variant with its factors set to ``--speed-ranks`` (capacities
    from the default ``CapacityPolicy``), against dense Adam, steps interleaved in random order."""
    import random

    x = jax.random.uniform(jax.random.key(1), (args.batch_size, 784))
    batch = (x, jnp.arange(args.batch_size) % 10)
    loss_fn = models.cross_entropy_loss(models.mlp_apply)
    policy = dlrt_jax.CapacityPolicy()
    runs = {}
    for spec in args.variants:
        v = parse_variant(spec, args)
        params, tx, _ = build(v, args)
        if v["integrator"] != "dense":
            for layer, r in zip(params[:-1], args.speed_ranks, strict=True):
                layer["w"] = layer["w"].replace(rank=r)
            params, _ = dlrt_jax.resize_capacity(params, None, policy.target)
        step = make_step(loss_fn, tx)
        state = tx.init(params)
        jax.block_until_ready(step(params, state, batch))
        runs[spec] = (step, params, state, [])
    for _ in range(args.rounds):
        order = list(runs)
        random.shuffle(order)
        for spec in order:
            step, params, state, times = runs[spec]
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, state, batch))
            times.append(time.perf_counter() - t0)
    rows = []
    for spec, (_, params, _, times) in runs.items():
        caps = [
            x.capacity
            for x in jax.tree_util.tree_leaves(params, is_leaf=dlrt_jax.is_lowrank)
            if dlrt_jax.is_lowrank(x)
        ]
        rows.append(
            {
                "variant": spec,
                "ranks": list(args.speed_ranks) if caps else [],
                "capacities": caps,
                "step_ms_median": round(1000 * statistics.median(times), 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    dense = {r["epoch"]: r["step_ms_median"] for r in rows if r["variant"].startswith("dense:adam")}
    head = "| variant | epoch | test acc % | ranks | eval c.r. % | median ms | vs dense | mean ms |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ratio = r["step_ms_median"] / dense[r["epoch"]] if r["epoch"] in dense else float("nan")
        lines.append(
            f"| {r['variant']} | {r['epoch']} | {r['test_acc']:.2f} | {r['ranks']} | "
            f"{r['eval_compression']:.1f} | {r['step_ms_median']:.1f} | {ratio:.2f}x | "
            f"{r['step_ms_mean']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["dense:adam@glorot", "par:adam", "bug:adam"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of dense and non-factor leaves")
    p.add_argument("--tau", type=float, default=0.09)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-every", type=int, default=10, help="CapacityPolicy.every")
    p.add_argument("--headroom", type=float, default=1.0, help="CapacityPolicy.headroom")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument(
        "--teacher", type=int, default=0, help="K > 0: synthetic data of a rank-K teacher MLP"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 4096 examples, width 64")
    p.add_argument(
        "--speed-ranks",
        type=int,
        nargs=4,
        default=None,
        help="only time one step of each variant at these ranks (no training), interleaved",
    )
    p.add_argument("--rounds", type=int, default=30, help="rounds of --speed-ranks timing")
    p.add_argument("--tag", default="end_to_end")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.width = 4096, 64
    rows = speed_at_ranks(args) if args.speed_ranks else run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{args.tag}.csv", rows)
    (out / f"{args.tag}.json").write_text(
        json.dumps({"config": vars(args), "rows": rows, "environment": environment()}, indent=1)
    )
    if not args.speed_ranks:
        print(table(rows))


if __name__ == "__main__":
    main()
