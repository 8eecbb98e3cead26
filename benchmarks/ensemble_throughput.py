"""Throughput of an ensemble of E small DLRT MLPs: one vmapped step against E sequential steps.

Each member is a 784 -> w -> w -> 10 MLP with both hidden matrices factored (capacity ``c``),
trained by the rank-adaptive BUG integrator with Adam inside; members differ in seed and in
``tau`` (traced, per member). Strategies: "vmap" runs all members in one jitted ``jax.vmap``
step and "map" in one jitted ``jax.lax.map`` step (:func:`dlrt_jax.ensemble.make_ensemble_step`);
"sequential" calls one jitted single-member step (compiled once, ``tau`` as an argument) E times.
Synthetic inputs (throughput does not depend on the data). Reports the median wall time of one
ensemble step over ``--repeats`` timed steps after warm-up, prints a table and writes
``<--name>.json`` (default ``ensemble_throughput.json``) to ``--out``.

On the CPU with jaxlib 0.10.x, "vmap" is skipped unless ``--force-vmap`` is given: the batched
LAPACK kernels of that jaxlib can deadlock XLA's CPU thread pool (observed with these shapes on 2
cores; see :func:`dlrt_jax.ensemble.make_ensemble_step`).

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/ensemble_throughput.py
    OPENBLAS_NUM_THREADS=1 python benchmarks/ensemble_throughput.py --members 1 2 4 8 --repeats 30
    OPENBLAS_NUM_THREADS=1 python benchmarks/ensemble_throughput.py --width 32 --capacity 8 \
        --force-vmap --members 1 2 4 8 --name ensemble_throughput_w32
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax import ensemble  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, nargs="+", default=[8], help="ensemble sizes E")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--capacity", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tau-min", type=float, default=0.05)
    p.add_argument("--tau-max", type=float, default=0.2)
    p.add_argument("--integrator", choices=["bug", "parallel_bug"], default="bug")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--strategies",
        nargs="+",
        choices=["vmap", "map", "sequential"],
        default=["vmap", "map", "sequential"],
    )
    p.add_argument("--force-vmap", action="store_true", help="run vmap even where it may hang")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="ensemble_throughput", help="output file stem")
    return p


def _init_fn(width: int, capacity: int):
    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "l1": dlrt_jax.LowRank.random(k1, (width, 784), capacity=capacity),
            "b1": jnp.zeros(width),
            "l2": dlrt_jax.LowRank.random(k2, (width, width), capacity=capacity),
            "b2": jnp.zeros(width),
            "out": jax.random.normal(k3, (10, width)) / jnp.sqrt(width),
            "bo": jnp.zeros(10),
        }

    return init


def _loss(p, batch):
    x, y = batch
    h = jax.nn.relu(dlrt_jax.lowrank_apply(p["l1"], x) + p["b1"])
    h = jax.nn.relu(dlrt_jax.lowrank_apply(p["l2"], h) + p["b2"])
    logits = h @ p["out"].T + p["bo"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _median_ms(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), times


def _environment() -> dict:
    import jaxlib

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "dlrt_jax": dlrt_jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "command": " ".join(sys.argv),
    }


def run(args) -> dict:
    integrator = {"bug": dlrt_jax.bug, "parallel_bug": dlrt_jax.parallel_bug}[args.integrator]
    make_tx = lambda h: integrator(optax.adam(args.lr), tau=h["tau"])
    init = _init_fn(args.width, args.capacity)
    rng = np.random.default_rng(0)
    batch = (
        jnp.asarray(rng.random((args.batch_size, 784), dtype=np.float32)),
        jnp.asarray(rng.integers(0, 10, args.batch_size)),
    )

    @jax.jit
    def single_step(p, s, tau):
        return dlrt_jax.make_train_step(_loss, make_tx({"tau": tau}), jit=False)(p, s, batch)

    strategies = list(args.strategies)
    skipped = {}
    if "vmap" in strategies and ensemble.resolve_strategy("auto") != "vmap" and not args.force_vmap:
        strategies.remove("vmap")
        skipped["vmap"] = "jaxlib 0.10.x on CPU: batched LAPACK may deadlock (use --force-vmap)"
    steps = {
        k: ensemble.make_ensemble_step(make_tx, _loss, strategy=k)
        for k in strategies
        if k != "sequential"
    }
    rows = []
    for e in args.members:
        keys = jax.random.split(jax.random.key(0), e)
        hp = {"tau": jnp.linspace(args.tau_min, args.tau_max, e)}
        params, opt_state = ensemble.init_ensemble(init, make_tx, keys, hp)
        row = {"members": e, "ms": {}, "first_call_s": {}, "times_ms": {}, "ranks_l1": {}}
        for k in strategies:
            if k == "sequential":
                members = [
                    [ensemble.member(params, i), ensemble.member(opt_state, i), hp["tau"][i]]
                    for i in range(e)
                ]

                def fn(members=members):
                    out = []
                    for m in members:
                        m[0], m[1], loss = single_step(*m)
                        out.append(loss)
                    return out

                def ranks(members=members):
                    return [int(m[0]["l1"].rank) for m in members]
            else:
                state = {"p": params, "s": opt_state}

                def fn(state=state, hp=hp, step=steps[k]):
                    state["p"], state["s"], loss = step(state["p"], state["s"], batch, hp)
                    return loss

                def ranks(state=state):
                    return np.asarray(state["p"]["l1"].rank).astype(int).tolist()

            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            row["first_call_s"][k] = time.perf_counter() - t0
            row["ms"][k], row["times_ms"][k] = _median_ms(fn, args.warmup, args.repeats)
            row["ranks_l1"][k] = ranks()
        if "sequential" in row["ms"]:
            row["speedup_vs_sequential"] = {
                k: row["ms"]["sequential"] / v for k, v in row["ms"].items() if k != "sequential"
            }
        rows.append(row)
    return {
        "benchmark": "ensemble_throughput",
        "config": {
            "model": f"784-{args.width}-{args.width}-10, both hidden layers LowRank",
            "capacity": args.capacity,
            "batch_size": args.batch_size,
            "integrator": f"{args.integrator}(adam({args.lr}), tau per member)",
            "tau_range": [args.tau_min, args.tau_max],
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median wall time of one step of the whole ensemble",
        },
        "environment": _environment(),
        "skipped": skipped,
        "rows": rows,
    }


def _table(result: dict) -> str:
    strategies = list(result["rows"][0]["ms"]) if result["rows"] else []
    head = "| E | " + " | ".join(f"{k} (ms/step)" for k in strategies)
    head += " | " + " | ".join(f"{k} speedup" for k in strategies if k != "sequential") + " |"
    lines = [head, "|" + "---|" * (1 + len(strategies) + len(strategies) - 1)]
    for r in result["rows"]:
        cells = [f"{r['ms'][k]:.2f}" for k in strategies]
        cells += [f"{v:.2f}x" for v in r.get("speedup_vs_sequential", {}).values()]
        lines.append(f"| {r['members']} | " + " | ".join(cells) + " |")
    for k, why in result["skipped"].items():
        lines.append(f"({k} skipped: {why})")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    result = run(args)
    print(
        f"{result['config']['model']}, capacity {args.capacity}, batch {args.batch_size}, "
        f"{result['config']['integrator']}, {result['environment']['device']}"
    )
    print(_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
