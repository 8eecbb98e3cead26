"""Program size and compile cost of the main job's train step, against the dense Adam step.

For the 784-500x4-10 MLP of ``dlrt_jax.mnist.models`` (batch 256) and each step below, it reports:

* the optimised HLO of ``jit(step).lower(...).compile().as_text()`` on this machine's backend:
  lines, characters, conditionals, custom calls, host callbacks;
* lower + compile time (median of ``--repeats``, each after ``jax.clear_caches()``; the
  persistent cache off);
* the StableHLO that ``jax.export.export(jit(step), platforms=[p])`` lowers for each ``--platforms``
  (default ``cuda``; possible from a CPU machine): characters, ``stablehlo.case``/``if``
  conditionals, custom calls by target, solver call sites (cuSOLVER / LAPACK / TPU linalg
  targets), host callbacks; or the error when the export fails.

Steps: ``main`` (the main job: ``parallel_bug`` with Adam inside, capacities ``[48, 40, 48, 40]``,
as ``python -m dlrt_jax.train_mnist`` builds it), ``dense`` (dense Adam on the same MLP), and with
``--integrators`` every integrator at the same capacities: ``bug`` (rank-adaptive), ``bug_fixed``,
``parallel_bug``, ``projector_splitting``, ``s_only``.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/program_size.py              # main and dense
    OPENBLAS_NUM_THREADS=1 python benchmarks/program_size.py --integrators --json out.json
    python benchmarks/program_size.py --smoke                              # tiny, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import DEFAULT_TAU, FACTOR_LR_SCALE, make_step  # noqa: E402

CAPACITIES = (48, 40, 48, 40)  # the main job's capacities at its final ranks (issue 16)
LR = 1e-3

# custom-call targets of dense linear algebra (cuSOLVER / cuBLAS / LAPACK / TPU linalg)
SOLVER = re.compile(
    r"solver|potrf|geqrf|orgqr|gesvd|syevd|getrf|lapack|cublas|Qr|Householder|Eigh|Svd", re.I
)
CALLBACK = re.compile(r"callback", re.I)


def _transform(name: str):
    adam = optax.adam(FACTOR_LR_SCALE * LR)
    other = optax.adam(LR)
    if name == "dense":
        return optax.adam(LR)
    if name in ("main", "parallel_bug"):
        return dlrt_jax.parallel_bug(adam, tau=DEFAULT_TAU, other_optimizer=other)
    if name == "bug":
        return dlrt_jax.bug(adam, tau=DEFAULT_TAU, other_optimizer=other)
    if name == "bug_fixed":
        return dlrt_jax.bug(adam, tau=None, other_optimizer=other)
    if name == "projector_splitting":
        return dlrt_jax.projector_splitting(adam, other_optimizer=other)
    if name == "s_only":
        return dlrt_jax.s_only(adam, other_optimizer=other)
    raise ValueError(f"unknown step {name!r}")


def build(name: str, width: int, capacities, batch: int):
    """``(step, args)``: the unjitted step function and concrete example arguments."""
    key = jax.random.key(0)
    if name == "dense":
        params = models.init_mlp(key, width, dense=True)
    else:
        params = models.init_mlp(key, width, rank=list(capacities), scale=0.1)
    tx = _transform(name)
    step = make_step(models.cross_entropy_loss(models.mlp_apply), tx)
    x = jnp.zeros((batch, 784), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    return step, (params, tx.init(params), (x, y))


def hlo_counts(text: str) -> dict:
    """Counts in optimised HLO text."""
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    return {
        "hlo_lines": text.count("\n"),
        "hlo_chars": len(text),
        "conditionals": len(re.findall(r"\bconditional\(", text)),
        "custom_calls": len(targets),
        "host_callbacks": sum(bool(CALLBACK.search(t)) for t in targets),
        "custom_call_targets": dict(Counter(targets)),
    }


def stablehlo_counts(text: str) -> dict:
    """Counts in exported StableHLO (MLIR) text."""
    targets = re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text)
    targets += re.findall(r'call_target_name = "([^"]+)"', text)
    return {
        "chars": len(text),
        "lines": text.count("\n"),
        "conditionals": len(re.findall(r"\bstablehlo\.(?:case|if)\b", text)),
        "custom_calls": len(targets),
        "solver_calls": sum(bool(SOLVER.search(t)) for t in targets),
        "host_callbacks": sum(bool(CALLBACK.search(t)) for t in targets),
        "custom_call_targets": dict(Counter(targets)),
    }


def measure(name: str, *, width: int, capacities, batch: int, repeats: int, platforms) -> dict:
    step, args = build(name, width, capacities, batch)
    fn = getattr(step, "__wrapped__", step)
    times, text = [], ""
    for _ in range(repeats):
        jax.clear_caches()  # JAX caches lowering and compilation per traced function
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        times.append(time.perf_counter() - t0)
        text = compiled.as_text()
    row = {"step": name, "compile_s": statistics.median(times), **hlo_counts(text)}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    for p in platforms:
        try:
            exp = jax.export.export(jax.jit(fn), platforms=[p])(*shapes)
            row[p] = stablehlo_counts(exp.mlir_module())
        except Exception as e:  # report, do not fail: the error is the measurement
            row[p] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--integrators", action="store_true", help="also every integrator")
    p.add_argument("--repeats", type=int, default=3, help="compiles per step (median)")
    p.add_argument("--platforms", nargs="*", default=["cuda"], help="jax.export platforms")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="width 32, capacities 8, one repeat")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument(
        "--no-manifold-check",
        action="store_true",
        help="measure with the after-DLRT manifold check stubbed out (its host callback blocks "
        "jax.export on code that still has it; an estimate, not the shipped step)",
    )
    args = p.parse_args(argv)
    if args.no_manifold_check:
        import dlrt_jax._transforms as transforms

        if hasattr(transforms, "_check_on_manifold"):
            transforms._check_on_manifold = lambda *a, **k: None
    jax.config.update("jax_enable_compilation_cache", False)
    caps = CAPACITIES
    if args.smoke:
        args.width, args.batch, args.repeats, caps = 32, 8, 1, (8, 8, 8, 8)
    names = ["main", "dense"]
    if args.integrators:
        names += ["bug", "bug_fixed", "parallel_bug", "projector_splitting", "s_only"]
    rows = []
    for name in names:
        row = measure(
            name,
            width=args.width,
            capacities=caps,
            batch=args.batch,
            repeats=args.repeats,
            platforms=args.platforms,
        )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "custom_call_targets"}), flush=True)
    dense = next(r for r in rows if r["step"] == "dense")
    print(f"\nbackend {jax.default_backend()}, jax {jax.__version__}, width {args.width}")
    head = f"{'step':<20} {'HLO lines':>9} {'cond':>5} {'ccall':>5} {'cb':>3} {'compile s':>9}"
    head += f" {'x dense':>7}"
    for plat in args.platforms:
        head += f" | {plat}: {'chars':>8} {'x dense':>7} {'cond':>4} {'solver':>6} {'cb':>3}"
    print(head)
    for r in rows:
        line = (
            f"{r['step']:<20} {r['hlo_lines']:>9} {r['conditionals']:>5} {r['custom_calls']:>5} "
            f"{r['host_callbacks']:>3} {r['compile_s']:>9.2f} "
            f"{r['compile_s'] / dense['compile_s']:>7.1f}"
        )
        for plat in args.platforms:
            e, d = r[plat], dense[plat]
            if "error" in e:
                line += f" | {plat}: {e['error'][:70]}"
            else:
                ratio = e["chars"] / d["chars"] if "chars" in d else float("nan")
                line += (
                    f" | {plat}: {e['chars']:>8} {ratio:>7.1f} {e['conditionals']:>4} "
                    f"{e['solver_calls']:>6} {e['host_callbacks']:>3}"
                )
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "jax": jax.__version__, "backend": jax.default_backend()}, f)
    return rows


if __name__ == "__main__":
    main()
