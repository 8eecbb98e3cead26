"""Step time of the Flax NNX path against the functional path for the paper MLP, in one process.

The model is the paper's MLP ``784 -> 500 x 4 -> 10`` (ReLU), the four hidden weights low-rank,
trained rank-adaptively by ``dlrt_jax.bug(optax.adam(1e-3), tau=0.09,
other_optimizer=optax.adam(1e-3))`` on batches of 256 (random MNIST-shaped data, or the first
MNIST training batch with ``--data mnist``). For each capacity in ``--capacities`` it builds

* ``nnx``: a dense ``nnx`` MLP converted by ``dlrt_jax.nnx.to_low_rank(..., rank, capacity)``,
  trained by ``nnx.jit(train_step)`` with ``dlrt_jax.nnx.DLRTOptimizer`` (the NNX user's path);
* ``nnx_tree``: the same with ``nnx.jit(..., graph=False)`` (tree mode, less per-call overhead);
* ``functional``: the same factors, biases and classifier as a ``dlrt_jax.models`` pytree (a list of
  ``{"w", "b"}`` dicts) trained by ``dlrt_jax.train_mnist.make_step`` (``jax.jit``);

so both paths start from the same weights, ranks and capacities. The dense baselines are the dense
``nnx`` MLP with ``nnx.Optimizer(optax.adam(1e-3))`` under ``nnx.jit`` and the dense functional MLP
(``models.init_mlp(dense=True)``) with ``optax.adam(1e-3)`` under ``make_step``.

All variants are compiled first (plus two warm-up steps), then timed *interleaved*: ``--rounds``
rounds, each calling every variant once in a fresh random order, every call synchronised
(``block_until_ready`` on the loss), so the drifting load of a shared machine affects all alike.
Reported: the median (and 10/90 % quantiles) per variant, the ratio ``nnx / functional`` at each
capacity, the number of traces per variant (1: nothing retraced), and the per-call host overhead
of ``nnx.jit`` itself (a no-op jitted function over the same model and optimiser against a no-op
``jax.jit`` over the pure trees). The table goes to stdout and everything to ``--out`` (default
``benchmarks/results/nnx_vs_functional.json``).

The ranks move during the timed steps (the integrator is rank-adaptive); the cost of a step follows
the static capacity, which is why ``capacity 250`` (the default of ``to_low_rank`` /
``LowRankLinear`` for 500-wide layers, ``floor(min(n, m) / 2)``) is several times slower than
``capacity 64`` at the same rank: shrink it with ``dlrt_jax.nnx.apply_capacity_policy``.

Example:
    OPENBLAS_NUM_THREADS=1 python benchmarks/nnx_vs_functional.py --rounds 30 --capacities 64 250
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax import nnx as dnnx  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import environment, make_step  # noqa: E402

WIDTH, DEPTH, IN, CLASSES = 500, 4, 784, 10


class MLP(nnx.Module):
    """The paper's MLP as a dense NNX model: ``hidden`` (4 x ``nnx.Linear``) and ``head``."""

    def __init__(self, rngs: nnx.Rngs):
        sizes = [IN] + [WIDTH] * DEPTH
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.head(x)


def nnx_loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


FUNCTIONAL_LOSS = models.cross_entropy_loss(models.mlp_apply)


INTEGRATOR = {"name": "bug"}  # set from --integrator in main()


def dlrt_tx():
    """``bug`` with Adam 1e-3 inside (the issue's setting), or the main job's default
    ``parallel_bug`` with Adam 3e-3 on K, L, S and Adam 1e-3 elsewhere."""
    if INTEGRATOR["name"] == "parallel_bug":
        return dlrt_jax.parallel_bug(optax.adam(3e-3), tau=0.09, other_optimizer=optax.adam(1e-3))
    return dlrt_jax.bug(optax.adam(1e-3), tau=0.09, other_optimizer=optax.adam(1e-3))


def functional_params(model) -> list[dict]:
    """The ``dlrt_jax.models`` pytree with the NNX model's factors, biases and classifier."""
    layers = [{"w": layer.factor, "b": layer.bias[...]} for layer in model.hidden]
    layers.append({"w": model.head.kernel[...].T, "b": model.head.bias[...]})
    return layers


def load_batch(kind: str, batch_size: int, seed: int):
    if kind == "mnist":
        from dlrt_jax.mnist.train import load_mnist

        x, y, _, _ = load_mnist(subset=batch_size)
        return jnp.asarray(x[:batch_size]), jnp.asarray(y[:batch_size])
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (batch_size, IN), jnp.float32)
    return x, jax.random.randint(ky, (batch_size,), 0, CLASSES, jnp.int32)


class Variant:
    """A step closure that keeps its own state, its trace counter and its timings."""

    def __init__(self, name: str, kind: str, capacity: int | None, build: Callable):
        self.name, self.kind = name, kind
        self.times: list[float] = []
        self.run, self.ranks, self.trace_count, self.capacities = build()
        self.capacity = capacity

    def call(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0


def build_nnx(batch, rank, capacity, *, graph: bool, seed: int, policy=None):
    def build():
        model = dnnx.to_low_rank(MLP(nnx.Rngs(seed)), filter="hidden", rank=rank, capacity=capacity)
        optimizer = dnnx.DLRTOptimizer(model, dlrt_tx(), wrt=nnx.Param)
        if policy is not None:
            dnnx.apply_capacity_policy(policy, policy.every, model, optimizer)
        traces = []

        def step(model, optimizer, batch):
            traces.append(1)
            return dnnx.train_step(model, optimizer, nnx_loss, batch)

        jitted = nnx.jit(step, graph=graph)
        return (
            lambda: jitted(model, optimizer, batch).block_until_ready(),
            lambda: [int(layer.rank) for layer in model.hidden],
            lambda: len(traces),
            [layer.capacity for layer in model.hidden],
        )

    return build


def build_functional(batch, rank, capacity, *, seed: int, policy=None):
    def build():
        model = dnnx.to_low_rank(MLP(nnx.Rngs(seed)), filter="hidden", rank=rank, capacity=capacity)
        params = functional_params(model)
        tx = dlrt_tx()
        step = make_step(FUNCTIONAL_LOSS, tx)
        opt_state = tx.init(params)
        if policy is not None:
            params, opt_state, _ = policy(policy.every, params, opt_state)
        state = {"params": params, "opt": opt_state}

        def run():
            state["params"], state["opt"], loss_value = step(state["params"], state["opt"], batch)
            loss_value.block_until_ready()

        def ranks():
            return [int(layer["w"].rank) for layer in state["params"][:DEPTH]]

        caps = [layer["w"].capacity for layer in state["params"][:DEPTH]]
        return run, ranks, step._cache_size, caps  # jit's cache: one entry per trace

    return build


def build_dense_nnx(batch, *, seed: int):
    def build():
        model = MLP(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        traces = []

        @nnx.jit
        def step(model, optimizer, batch):
            traces.append(1)
            loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
            optimizer.update(model, grads)
            return loss

        return (
            lambda: step(model, optimizer, batch).block_until_ready(),
            lambda: None,
            lambda: len(traces),
            None,
        )

    return build


def build_dense_functional(batch, *, seed: int):
    def build():
        model = MLP(nnx.Rngs(seed))  # the same weights as the dense NNX baseline
        params = [{"w": layer.kernel[...].T, "b": layer.bias[...]} for layer in model.hidden]
        params.append({"w": model.head.kernel[...].T, "b": model.head.bias[...]})
        tx = optax.adam(1e-3)
        step = make_step(FUNCTIONAL_LOSS, tx)
        state = {"params": params, "opt": tx.init(params)}

        def run():
            state["params"], state["opt"], loss_value = step(state["params"], state["opt"], batch)
            loss_value.block_until_ready()

        return run, lambda: None, step._cache_size, None

    return build


def dispatch_overhead(batch, rank, capacity, repeats: int, seed: int) -> dict[str, float]:
    """Median ms of a no-op jitted call over (model, optimiser) vs over the pure trees."""
    model = dnnx.to_low_rank(MLP(nnx.Rngs(seed)), filter="hidden", rank=rank, capacity=capacity)
    optimizer = dnnx.DLRTOptimizer(model, dlrt_tx(), wrt=nnx.Param)
    params = functional_params(model)
    opt_state = dlrt_tx().init(params)

    def noop(model, optimizer, batch):
        return batch[0][0, 0]

    graph_fn, tree_fn = nnx.jit(noop), nnx.jit(noop, graph=False)
    pure_fn = jax.jit(noop)
    calls = {
        "nnx.jit(graph)": lambda: graph_fn(model, optimizer, batch).block_until_ready(),
        "nnx.jit(graph=False)": lambda: tree_fn(model, optimizer, batch).block_until_ready(),
        "jax.jit(pure trees)": lambda: pure_fn(params, opt_state, batch).block_until_ready(),
    }
    times = {k: [] for k in calls}
    for fn in calls.values():
        fn()
        fn()
    for _ in range(repeats):
        for k in random.sample(list(calls), len(calls)):
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument(
        "--capacities", type=int, nargs="+", default=[64, 250], help="capacities (default 64 250)"
    )
    parser.add_argument("--rank", type=int, default=56, help="initial rank (default 56)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--data", choices=["random", "mnist"], default="random")
    parser.add_argument("--no-tree", action="store_true", help="skip the graph=False variants")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baselines")
    parser.add_argument(
        "--no-policy", action="store_true", help="skip the capacity-250 + CapacityPolicy variants"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--integrator", choices=["bug", "parallel_bug"], default="bug")
    parser.add_argument("--out", default="benchmarks/results/nnx_vs_functional.json")
    args = parser.parse_args(argv)
    INTEGRATOR["name"] = args.integrator
    if args.rounds < 1 or any(not 1 <= c <= WIDTH // 2 for c in args.capacities):
        parser.error(f"--rounds >= 1 and every capacity in [1, {WIDTH // 2}] (rank-adaptive bug)")
    random.seed(args.seed)
    batch = load_batch(args.data, args.batch, args.seed)

    variants: list[Variant] = []
    for c in args.capacities:
        r = min(args.rank, c)
        variants.append(
            Variant(f"functional c={c}", "functional", c, build_functional(batch, r, c, seed=1))
        )
        variants.append(Variant(f"nnx c={c}", "nnx", c, build_nnx(batch, r, c, graph=True, seed=1)))
        if not args.no_tree:
            variants.append(
                Variant(
                    f"nnx_tree c={c}", "nnx_tree", c, build_nnx(batch, r, c, graph=False, seed=1)
                )
            )
    policy = dlrt_jax.CapacityPolicy(every=1)  # the defaults: headroom 1.25, min_free 8, x16
    if not args.no_policy:
        c, r = WIDTH // 2, min(args.rank, WIDTH // 2)  # what to_low_rank gives, then the policy
        variants.append(
            Variant(
                "functional policy",
                "functional_policy",
                None,
                build_functional(batch, r, c, seed=1, policy=policy),
            )
        )
        variants.append(
            Variant(
                "nnx policy",
                "nnx_policy",
                None,
                build_nnx(batch, r, c, graph=True, seed=1, policy=policy),
            )
        )
    if not args.no_dense:
        variants.append(
            Variant(
                "dense functional", "dense_functional", None, build_dense_functional(batch, seed=1)
            )
        )
        variants.append(Variant("dense nnx", "dense_nnx", None, build_dense_nnx(batch, seed=1)))

    compile_s = {}
    for v in variants:
        t0 = time.perf_counter()
        v.call()  # trace + compile + first step
        compile_s[v.name] = time.perf_counter() - t0
        v.call()
        print(f"compiled {v.name:22s} {compile_s[v.name]:6.1f} s", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for v in random.sample(variants, len(variants)):
            v.times.append(v.call())
    load_after = os.getloadavg()
    overhead = dispatch_overhead(
        batch, min(args.rank, args.capacities[0]), args.capacities[0], 100, 1
    )

    rows = []
    for v in variants:
        ms = sorted(1e3 * t for t in v.times)
        rows.append(
            {
                "variant": v.name,
                "kind": v.kind,
                "capacity": v.capacity,
                "capacities": v.capacities,
                "median_ms": statistics.median(ms),
                "p10_ms": float(np.percentile(ms, 10)),
                "p90_ms": float(np.percentile(ms, 90)),
                "traces": v.trace_count(),
                "compile_plus_first_step_s": compile_s[v.name],
                "final_ranks": v.ranks(),
            }
        )
    by_name = {row["variant"]: row for row in rows}
    ratios = {}
    for c in args.capacities:
        f = by_name[f"functional c={c}"]["median_ms"]
        ratios[f"nnx/functional c={c}"] = by_name[f"nnx c={c}"]["median_ms"] / f
        if not args.no_tree:
            ratios[f"nnx_tree/functional c={c}"] = by_name[f"nnx_tree c={c}"]["median_ms"] / f
    if len(args.capacities) > 1:
        lo, hi = min(args.capacities), max(args.capacities)
        ratios[f"nnx c={hi} / functional c={lo}"] = (
            by_name[f"nnx c={hi}"]["median_ms"] / by_name[f"functional c={lo}"]["median_ms"]
        )
    if not args.no_policy:
        ratios["nnx policy/functional policy"] = (
            by_name["nnx policy"]["median_ms"] / by_name["functional policy"]["median_ms"]
        )
    if not args.no_dense:
        ratios["dense nnx/dense functional"] = (
            by_name["dense nnx"]["median_ms"] / by_name["dense functional"]["median_ms"]
        )

    print(
        f"\nMLP 784-500x4-10, bug tau=0.09 + adam(1e-3), batch {args.batch}, {args.data} data, "
        f"initial rank {args.rank}, {args.rounds} interleaved rounds"
    )
    print(
        f"{'variant':22s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'traces':>6s}  "
        "capacities -> final ranks"
    )
    for row in rows:
        print(
            f"{row['variant']:22s} {row['median_ms']:10.2f} {row['p10_ms']:8.2f} "
            f"{row['p90_ms']:8.2f} {row['traces']:6d}  "
            + (f"{row['capacities']} -> {row['final_ranks']}" if row["capacities"] else "dense")
        )
    print()
    for k, v in ratios.items():
        print(f"{k:34s} {v:6.3f}")
    print("\nper-call host overhead of a no-op jitted call over (model, optimizer), median ms:")
    for k, v in overhead.items():
        print(f"  {k:22s} {v:6.3f}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")

    result = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "config": vars(args),
        "rows": rows,
        "ratios": ratios,
        "dispatch_overhead_ms": overhead,
        "load_average": {"before": load_before, "after": load_after},
        "environment": environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
