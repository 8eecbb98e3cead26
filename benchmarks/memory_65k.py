"""Training never forms ``W`` or its gradient: a 65,536 x 65,536 low-rank layer in < 2 GiB.

A dense float32 65,536 x 65,536 weight takes 16 GiB, 32 GiB with its gradient; this machine has
24 GiB. Here a :class:`~dlrt_jax.LowRank` layer of that shape at rank 32 (``U``, ``V``: 8 MiB each)
is trained for a few steps of a regression ``y = x W*^T`` (a random rank-8 teacher ``W*``, random
inputs, one fixed batch of 64) with each integrator, and the peak resident memory of the process
(``VmHWM`` of ``/proc/self/status``) is measured and checked against ``--limit-gib``.
The loss must go down, so the steps are real training steps.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/memory_65k.py              # n = 65536, records JSON
    python benchmarks/memory_65k.py --n 32768 --steps 2 --no-save --limit-gib 1.5
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dlrt_jax  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
INTEGRATORS = {
    "bug": lambda lr: dlrt_jax.bug(lr),  # fixed rank, 2 gradient evaluations
    "bug_adaptive": lambda lr: dlrt_jax.bug(lr, tau=0.05),
    "parallel_bug": lambda lr: dlrt_jax.parallel_bug(lr, tau=0.05),
    "ksl": lambda lr: dlrt_jax.projector_splitting(lr),
}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status`` where it exists: ``ru_maxrss`` survives ``exec``, so
    a process started by a large parent (e.g. from pytest) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(n: int, rank: int, batch: int, steps: int, integrator: str, lr: float, seed: int):
    """Train one ``n x n`` LowRank layer; returns a result dict (losses, times, peak RSS)."""
    kw, kt, kx = jax.random.split(jax.random.key(seed), 3)
    teacher = dlrt_jax.LowRank.random(kt, (n, n), rank=8, capacity=8)
    params = {"w": dlrt_jax.LowRank.random(kw, (n, n), rank=rank, capacity=rank, scale=0.1)}

    def loss_fn(p, x):
        y = dlrt_jax.lowrank_apply(teacher, x)  # never forms the n x n teacher either
        err = dlrt_jax.lowrank_apply(p["w"], x) - y
        return 0.5 * jnp.mean(jnp.sum(err**2, axis=-1)) / n

    tx = INTEGRATORS[integrator](lr)
    state = tx.init(params)

    step = dlrt_jax.make_train_step(loss_fn, tx)

    x = jax.random.normal(kx, (batch, n), jnp.float32)  # one fixed batch: the loss must drop
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        params, state, value = step(params, state, x)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
        losses.append(float(value))
    return {
        "integrator": integrator,
        "n": n,
        "rank": rank,
        "batch": batch,
        "steps": steps,
        "losses": losses,
        "step_s": times,
        "final_rank": int(params["w"].rank),
        "num_skipped": int(state.num_skipped),
        "peak_rss_mib_after": peak_rss_mib(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536, help="W is n x n")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=20.0)  # curvature ~ 1/batch (loss / n)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--integrators", nargs="+", default=["bug", "parallel_bug"], choices=sorted(INTEGRATORS)
    )
    p.add_argument("--limit-gib", type=float, default=2.0, help="fail above this peak RSS")
    p.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT))
    p.add_argument("--no-save", action="store_true", help="do not write the JSON record")
    args = p.parse_args(argv)
    if args.n < 2 * args.rank or args.rank < 1 or args.steps < 2:
        raise ValueError("need n >= 2 * rank, rank >= 1 and steps >= 2")

    rss0 = peak_rss_mib()
    dense_gib = args.n * args.n * 4 / 2**30
    print(
        f"W: {args.n} x {args.n} float32 = {dense_gib:.1f} GiB dense ({2 * dense_gib:.1f} GiB "
        f"with its gradient); factors at rank {args.rank}: "
        f"{2 * args.n * args.rank * 4 / 2**20:.0f} MiB. Peak RSS after imports: {rss0:.0f} MiB",
        flush=True,
    )
    results = []
    for name in args.integrators:
        r = run(args.n, args.rank, args.batch, args.steps, name, args.lr, args.seed)
        results.append(r)
        print(
            f"  {name:13} losses {r['losses'][0]:.4g} -> {r['losses'][-1]:.4g}, "
            f"step {1e3 * min(r['step_s'][1:]):.0f} ms (first {r['step_s'][0]:.1f} s incl. "
            f"compile), rank {r['final_rank']}, peak RSS {r['peak_rss_mib_after']:.0f} MiB",
            flush=True,
        )
    peak = peak_rss_mib()
    record = {
        "n": args.n,
        "dense_weight_gib": dense_gib,
        "dense_weight_and_grad_gib": 2 * dense_gib,
        "peak_rss_mib": peak,
        "peak_rss_after_imports_mib": rss0,
        "limit_gib": args.limit_gib,
        "machine_memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "runs": results,
    }
    ok = peak < args.limit_gib * 1024 and all(
        r["losses"][-1] < r["losses"][0] and r["num_skipped"] == 0 for r in results
    )
    record["passed"] = ok
    print(
        f"peak RSS {peak:.0f} MiB ({peak / 1024:.2f} GiB), limit {args.limit_gib} GiB: "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "speed_memory_65k.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    if not ok:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()
