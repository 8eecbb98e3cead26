"""Speed and memory of DLRT training against dense and plain factored training, in one process.

For each network (the 5-layer MLP ``784 -> w x4 -> 10`` at ``w = 500`` and ``w = 5120``, and
LeNet5) and each rank, this script times on the same batch of random data with MNIST shapes:

* ``dense_sgd``, ``dense_adam``: the dense network trained with ``optax.sgd`` / ``optax.adam``;
* ``usv_sgd``: the factored network ``W = U S V^T`` with three plain arrays and plain SGD on their
  true gradients (evaluated as ``((x V) S^T) U^T``): the cost floor of a factored forward and
  backward pass, with no basis update at all;
* DLRT with plain SGD inside every integrator: ``bug_fixed`` (``dlrt_jax.bug``, tau None),
  ``bug_adaptive`` (tau given), ``parallel_fixed`` / ``parallel_adaptive``
  (``dlrt_jax.parallel_bug``) and ``ksl`` (``dlrt_jax.projector_splitting``, fixed rank);
* inference (a jitted forward pass) of the dense, the ``U S V^T`` and the ``LowRank`` network.

Fixed-rank runs use capacity = rank; rank-adaptive runs use capacity = a bucket at or just above
the rank (a multiple of 8, of 32 above rank 64), starting at that rank, so that the cost follows the
rank. Capacities are capped per layer at ``min(n, m)`` (``min(n, m) // 2`` for the integrators that
augment the bases to ``2c`` columns).

All configurations of a network are compiled first and then timed *interleaved*: ``--steps``
rounds, each calling every configuration once in a fresh random order, so that the drifting load
of a shared machine affects them alike. For every configuration it records: the median (and
10/90 % quantiles) of the ``--steps`` synchronised step times after compilation and two warm-up
calls; the compile time (trace + lower + compile); the number
of times the step was traced (1 when nothing retraces); XLA's memory analysis of the compiled step
(arguments + outputs + temporaries - donated aliases) and, on GPUs, the device's peak bytes in use;
the FLOPs of one step from XLA's cost analysis (custom calls such as LAPACK's QR and SVD are not
counted there) and the achieved fraction of the machine's matmul rate (measured first, with a large
float32 matmul, best of 10); the load average of the machine before and after.

Outputs in ``--out`` (default ``benchmarks/results``): ``speed_<tag>.csv`` and ``.json`` (every
row, the environment, the matmul rate) and ``speed_<tag>.png`` (step time against rank with the
dense lines, one panel per network, like the paper's timing figure), and a table on stdout.

``--profile`` adds, per DLRT method, the time of the forward+backward pass alone (``jax.grad`` of
the loss) and of the optimiser update alone (``tx.update`` with the gradient given; for the
multi-evaluation integrators it includes their extra gradient evaluations), and per-kernel timings
of the linear algebra of one step (QR, SVD, Gram matrices) at the shapes the integrators use.

Examples:
    OPENBLAS_NUM_THREADS=1 python benchmarks/speed.py --nets mlp5120 --ranks 8 32 128 512
    OPENBLAS_NUM_THREADS=1 python benchmarks/speed.py --nets mlp500 lenet5 --ranks 16 32 64 128
    python benchmarks/speed.py --smoke          # tiny shapes, about 30 s: checks it runs
    python benchmarks/speed.py --gpu ...        # GPU sizes: width 5120 at batch 4096
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax import LowRank  # noqa
from dlrt_jax.mnist import models  # noqa: E402
from dlrt_jax.mnist.train import environment, write_csv  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

#: name -> (kind, width); the batch comes from --batch or the defaults below.
NETS = {
    "mlp500": ("mlp", 500),
    "mlp5120": ("mlp", 5120),
    "lenet5": ("lenet5", None),
}
DEFAULT_BATCH = {"mlp500": 256, "mlp5120": 256, "lenet5": 128}
GPU_BATCH = {"mlp500": 256, "mlp5120": 4096, "lenet5": 128}
DLRT_METHODS = ("bug_fixed", "bug_adaptive", "parallel_fixed", "parallel_adaptive", "ksl")
BASE_METHODS = ("dense_sgd", "dense_adam", "usv_sgd")
ALL_METHODS = BASE_METHODS + DLRT_METHODS
AUGMENTING = ("bug_adaptive", "parallel_fixed", "parallel_adaptive")
ADAPTIVE = ("bug_adaptive", "parallel_adaptive")


# ---- networks -----------------------------------------------------------------------------------


class USV(NamedTuple):
    """``W = U S V^T`` as three plain arrays trained with their true gradients (the cost floor)."""

    U: jax.Array
    S: jax.Array
    V: jax.Array


def _conv5(x: jax.Array, V: jax.Array) -> jax.Array:
    """VALID NHWC convolution with the columns of ``V`` (``25 * in`` x ``c``) as 5x5 filters."""
    kernel = V.reshape(5, 5, x.shape[-1], V.shape[-1])
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _usv_linear(w, x):
    if isinstance(w, USV):
        return ((x @ w.V) @ w.S.T) @ w.U.T
    return x @ w.T


def _usv_mlp_apply(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(_usv_linear(layer["w"], h) + layer["b"])
    return _usv_linear(params[-1]["w"], h) + params[-1]["b"]


def _pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _usv_lenet5_apply(params, x):
    x = x[..., None] if x.ndim == 3 else x
    conv1, conv2, fc1, fc2 = params

    def conv(w, h):
        return (_conv5(h, w.V) @ w.S.T) @ w.U.T

    h = _pool(jax.nn.relu(conv(conv1["w"], x) + conv1["b"]))
    h = _pool(jax.nn.relu(conv(conv2["w"], h) + conv2["b"]))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(_usv_linear(fc1["w"], h) + fc1["b"])
    return _usv_linear(fc2["w"], h) + fc2["b"]


def _bucket(r: int) -> int:
    """Capacity bucket of an adaptive run at rank ``r``: a multiple of 8 (of 32 above 64)."""
    q = 8 if r <= 64 else 32
    return q * math.ceil(r / q)


def _layer_shapes(net: str, width: int | None) -> list[tuple[int, int]]:
    kind, _ = NETS[net]
    if kind == "mlp":
        return [(width, 784)] + [(width, width)] * 3
    return list(models.LENET5_SHAPES[:3])


def layer_ranks(net: str, width: int | None, rank: int, method: str) -> list[tuple[int, int]]:
    """``(rank, capacity)`` of each factored layer for a run of ``method`` at ``rank``."""
    out = []
    for n, m in _layer_shapes(net, width):
        limit = min(n, m) // 2 if method in AUGMENTING else min(n, m)
        cap = min(_bucket(rank) if method in ADAPTIVE else rank, limit)
        out.append((min(rank, cap), cap))
    return out


def init_params(key, net: str, width: int | None, variant: str, ranks=None):
    """Parameters of ``net``: ``variant`` in {"dense", "usv", "lowrank"}.

    ``ranks`` is a list of ``(rank, capacity)`` per factored layer (not needed for "dense").
    All variants come from the same factors (``models.init_*`` does this), so they compute the
    same function at initialisation.
    """
    kind, _ = NETS[net]
    caps = [c for _, c in ranks] if ranks is not None else None
    init = (
        (lambda **kw: models.init_mlp(key, width, **kw))
        if kind == "mlp"
        else (lambda **kw: models.init_lenet5(key, **kw))
    )
    if variant == "dense":
        return init(dense=True, rank=caps)
    params = init(rank=caps)
    for layer, (r, c) in zip(params, ranks):
        w = layer["w"]
        if r < c:  # start the adaptive run at rank r inside capacity c
            mask = jnp.arange(c) < r
            w = LowRank(w.U, jnp.where(mask[:, None] & mask[None, :], w.S, 0.0), w.V, r)
        layer["w"] = USV(*w.masked()) if variant == "usv" else w
    return params


def apply_fn(net: str, variant: str) -> Callable:
    kind, _ = NETS[net]
    if variant == "usv":
        return _usv_mlp_apply if kind == "mlp" else _usv_lenet5_apply
    return models.mlp_apply if kind == "mlp" else models.lenet5_apply


def make_batch(key, net: str, batch: int):
    kx, ky = jax.random.split(key)
    shape = (batch, 784) if NETS[net][0] == "mlp" else (batch, 28, 28)
    x = jax.random.uniform(kx, shape, jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    return x, y


# ---- measurement --------------------------------------------------------------------------------


def matmul_rate(n: int, repeats: int = 10) -> float:
    """Float32 GFLOP/s of an ``n x n`` matmul at default precision (best of ``repeats``: the
    rate the machine reaches when the other load lets it)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.min(ts)) / 1e9


def _analyse(compiled) -> dict[str, Any]:
    out: dict[str, Any] = {"flops": None, "xla_mem_mb": None}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list | tuple) else ca
        out["flops"] = float(ca.get("flops", float("nan")))
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        out["flops_error"] = repr(e)
    try:
        ma = compiled.memory_analysis()
        total = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
        out["xla_mem_mb"] = total / 2**20
        out["xla_temp_mb"] = ma.temp_size_in_bytes / 2**20
    except Exception as e:  # noqa: BLE001
        out["mem_error"] = repr(e)
    return out


def _device_peak_mb() -> float | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


class Runner:
    """One compiled function and its arguments, timed one call at a time.

    The function is traced and compiled ahead of time (``compile_s``; the trace counter then shows
    whether a later call traced again), analysed (FLOPs, memory), and warmed up with two calls.
    With ``carry`` the first two outputs replace the first two arguments after every call (params
    and optimiser state of a training step, donated when ``donate``).
    """

    def __init__(self, fn: Callable, args: tuple, *, carry: bool, donate: bool):
        self.traces = 0

        def counted(*a):
            self.traces += 1
            return fn(*a)

        self.carry = carry
        self.jitted = jax.jit(counted, donate_argnums=(0, 1) if donate else ())
        t = time.perf_counter()
        compiled = self.jitted.lower(*args).compile()
        self.compile_s = time.perf_counter() - t
        self.info = _analyse(compiled)
        del compiled
        self.args = args
        self.times: list[float] = []
        self.load_before = os.getloadavg()[0]
        for _ in range(2):  # the first call after AOT compilation fetches the executable
            self.call()

    def call(self) -> float:
        t = time.perf_counter()
        out = self.jitted(*self.args)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t
        if self.carry:
            self.args = tuple(out[:2]) + tuple(self.args[2:])
        return dt

    def step(self) -> None:
        self.times.append(self.call())

    def result(self) -> dict:
        ts = np.asarray(self.times) * 1e3
        return {
            "ms": float(np.median(ts)),
            "ms_p10": float(np.quantile(ts, 0.1)),
            "ms_p90": float(np.quantile(ts, 0.9)),
            "ms_min": float(ts.min()),
            "compile_s": self.compile_s,
            "traces": self.traces,
            "steps": len(ts),
            "load_before": self.load_before,
            "load_after": os.getloadavg()[0],
            "device_peak_mb": _device_peak_mb(),
            **self.info,
        }


def run_interleaved(runners: list[Runner], steps: int, seed: int = 0) -> None:
    """``steps`` rounds; each round calls every runner once, in a fresh random order.

    The machine is shared and its load drifts over seconds: interleaving makes every
    configuration see the same load, so the ratios between them are fair.
    """
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for i in rng.permutation(len(runners)):
            runners[i].step()


# ---- steps --------------------------------------------------------------------------------------


def dlrt_transform(method: str, lr: float, tau: float):
    if method == "bug_fixed":
        return dlrt_jax.bug(lr)
    if method == "bug_adaptive":
        return dlrt_jax.bug(lr, tau=tau)
    if method == "parallel_fixed":
        return dlrt_jax.parallel_bug(lr)
    if method == "parallel_adaptive":
        return dlrt_jax.parallel_bug(lr, tau=tau)
    if method == "ksl":
        return dlrt_jax.projector_splitting(lr)
    raise ValueError(f"unknown DLRT method {method!r}; choose from {DLRT_METHODS}")


def _loss(apply):
    def loss(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    return loss


def _ranks_of(params) -> list[int] | None:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=dlrt_jax.is_lowrank)
    ranks = [int(w.rank) for w in leaves if dlrt_jax.is_lowrank(w)]
    return ranks or None


def _variant(method: str) -> str:
    if method.startswith("dense"):
        return "dense"
    return "usv" if method == "usv_sgd" else "lowrank"


def _build(net: str, width, method: str, rank: int | None, args):
    """Params, optimiser, loss and step function of one configuration."""
    key = jax.random.key(args.seed)
    variant = _variant(method)
    ranks = None if variant == "dense" else layer_ranks(net, width, rank, method)
    params = init_params(key, net, width, variant, ranks)
    loss = _loss(apply_fn(net, variant))
    if method in BASE_METHODS:
        opt = optax.adam(args.adam_lr) if method == "dense_adam" else optax.sgd(args.lr)
    else:
        opt = dlrt_transform(method, args.lr, args.tau)
    step = dlrt_jax.make_train_step(loss, opt, jit=False)  # jitted by the runner
    return params, opt, loss, step, ranks


class Job(NamedTuple):
    """A row's description and the runner that measures it."""

    meta: dict
    runner: Runner


def _meta(net, width, batch, method, rank, phase, ranks=None) -> dict:
    return {
        "net": net,
        "width": width,
        "batch": batch,
        "method": method,
        "phase": phase,
        "rank": rank,
        "ranks": [r for r, _ in ranks] if ranks else None,
        "capacities": [c for _, c in ranks] if ranks else None,
    }


def train_job(net, width, data, method, rank, args) -> Job:
    """The training step of ``method`` (donated, carried params and state)."""
    params, opt, _, step, ranks = _build(net, width, method, rank, args)
    runner = Runner(step, (params, opt.init(params), data), carry=True, donate=True)
    return Job(_meta(net, width, len(data[1]), method, rank, "train", ranks), runner)


def infer_job(net, width, data, method, rank, args) -> Job:
    """Forward pass of the network ``method`` trains (dense, ``U S V^T`` or ``LowRank``)."""
    params, _, _, _, ranks = _build(net, width, method, rank, args)
    fwd = apply_fn(net, _variant(method))
    runner = Runner(lambda p, _s, x: fwd(p, x), (params, None, data[0]), carry=False, donate=False)
    name = "infer_" + _variant(method)
    return Job(_meta(net, width, len(data[1]), name, rank, "infer", ranks), runner)


def part_jobs(net, width, data, method, rank, args) -> list[Job]:
    """The forward+backward pass alone and the DLRT update alone (gradient given)."""
    params, opt, loss, _, ranks = _build(net, width, method, rank, args)
    state = opt.init(params)
    batch = len(data[1])
    grads = jax.block_until_ready(jax.jit(jax.grad(loss))(params, data))

    def update(p, st, gb):
        g, b = gb
        u, st = opt.update(g, st, p, grad_fn=lambda q: jax.grad(loss)(q, b))
        return optax.apply_updates(p, u), st

    def grad(p, _s, b):
        return jax.grad(loss)(p, b)

    r_grad = Runner(grad, (params, None, data), carry=False, donate=False)
    r_upd = Runner(update, (params, state, (grads, data)), carry=False, donate=False)
    return [
        Job(_meta(net, width, batch, method, rank, "fwd_bwd", ranks), r_grad),
        Job(_meta(net, width, batch, method, rank, "update", ranks), r_upd),
    ]


def kernel_jobs(n: int, c: int) -> list[Job]:
    """The dense linear algebra of one ``n x n`` layer's step at capacity ``c``."""
    hi = jax.lax.Precision.HIGHEST
    key = jax.random.key(0)
    a2 = jax.random.normal(key, (n, 2 * c), jnp.float32)
    a1 = a2[:, :c]
    s2 = jax.random.normal(key, (2 * c, 2 * c), jnp.float32)

    def proj(a):
        return a - jnp.matmul(a, jnp.matmul(a.T, a, precision=hi), precision=hi)

    kernels = {
        f"qr({n},{2 * c})": (lambda a: jnp.linalg.qr(a)[0], a2),
        f"qr({n},{c})": (lambda a: jnp.linalg.qr(a)[0], a1),
        f"svd({2 * c},{2 * c})": (lambda s: jnp.linalg.svd(s), s2),
        f"gram({n},{2 * c})": (lambda a: jnp.matmul(a.T, a, precision=hi), a2),
        f"proj({n},{c})": (proj, a1),
    }
    jobs = []
    for name, (f, x) in kernels.items():
        runner = Runner(lambda x, _s, _b, f=f: f(x), (x, None, None), carry=False, donate=False)
        jobs.append(Job({"net": "kernel", "method": name, "phase": "kernel", "rank": c}, runner))
    return jobs


# ---- output -------------------------------------------------------------------------------------


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def add_ratios(rows: list[dict], rate_gflops: float) -> None:
    """Speed-up against dense SGD, ratio to the U S V^T floor and achieved matmul fraction."""
    dense = {(r["net"], r["batch"]): r["ms"] for r in rows if r["method"] == "dense_sgd"}
    floor = {(r["net"], r["batch"], r["rank"]): r["ms"] for r in rows if r["method"] == "usv_sgd"}
    for r in rows:
        if r["phase"] not in ("train", "infer"):
            continue
        d = dense.get((r["net"], r["batch"]))
        f = floor.get((r["net"], r["batch"], r["rank"]))
        r["speedup_vs_dense_sgd"] = d / r["ms"] if d and r["phase"] == "train" else None
        r["ratio_to_usv_sgd"] = r["ms"] / f if f and r["phase"] == "train" else None
        fl = r.get("flops")
        r["gflops"] = fl / 1e9 if fl else None
        r["matmul_fraction"] = fl / (r["ms"] * 1e-3) / (rate_gflops * 1e9) if fl else None


def print_table(rows: list[dict], file=sys.stdout) -> None:
    head = (
        f"{'net':8} {'batch':>5} {'method':18} {'phase':8} {'rank':>5} {'ms':>9} {'p10-p90':>15} "
        f"{'xDense':>7} {'/USV':>6} {'comp_s':>6} {'tr':>2} {'memMB':>8} {'GFLOP':>7} "
        f"{'%mm':>5} {'load':>4}"
    )
    print(head, file=file)
    for r in rows:
        band = f"{_fmt(r.get('ms_p10'), '.1f')}-{_fmt(r.get('ms_p90'), '.1f')}"
        frac = r.get("matmul_fraction")
        print(
            f"{r['net']:8} {_fmt(r.get('batch'), 'd'):>5} {r['method']:18} {r['phase']:8} "
            f"{_fmt(r.get('rank'), 'd'):>5} {_fmt(r['ms'], '.2f'):>9} {band:>15} "
            f"{_fmt(r.get('speedup_vs_dense_sgd'), '.2f'):>7} "
            f"{_fmt(r.get('ratio_to_usv_sgd'), '.2f'):>6} {_fmt(r['compile_s'], '.1f'):>6} "
            f"{r['traces']:>2} {_fmt(r.get('xla_mem_mb'), '.0f'):>8} "
            f"{_fmt(r.get('gflops'), '.2f'):>7} "
            f"{_fmt(None if frac is None else 100 * frac, '.1f'):>5} "
            f"{_fmt(r.get('load_after'), '.1f'):>4}",
            file=file,
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({(r["net"], r["batch"]) for r in rows if r["phase"] == "train"})
    if not nets:
        return
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.2), squeeze=False)
    for ax, (net, batch) in zip(axes[0], nets):
        sel = [r for r in rows if r["net"] == net and r["batch"] == batch and r["phase"] == "train"]
        for method, style in (("dense_sgd", "k--"), ("dense_adam", "k:")):
            dense = [r["ms"] for r in sel if r["method"] == method]
            if dense:  # several runs merged: their median
                ax.axhline(float(np.median(dense)), color="k", ls=style[1:], label=method)
        for method in ("usv_sgd",) + DLRT_METHODS:
            pts = sorted((r["rank"], r["ms"]) for r in sel if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank (every factored layer)")
        ax.set_ylabel("ms per training step (median)")
        ax.set_title(f"{net}, batch {batch}, {jax.default_backend()}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(paths: list[str], file=sys.stdout) -> None:
    """A short table of the training steps in result JSON files written by this script."""
    print(
        f"{'backend':7} {'net':8} {'batch':>5} {'method':18} {'rank':>5} {'ms':>9} "
        f"{'xDense':>7} {'/USV':>6}",
        file=file,
    )
    for path in paths:
        payload = json.loads(Path(path).read_text())
        backend = payload.get("env", {}).get("backend", "?")
        for r in payload["rows"]:
            if r.get("phase") != "train":
                continue
            print(
                f"{backend:7} {r['net']:8} {_fmt(r.get('batch'), 'd'):>5} {r['method']:18} "
                f"{_fmt(r.get('rank'), 'd'):>5} {_fmt(r['ms'], '.2f'):>9} "
                f"{_fmt(r.get('speedup_vs_dense_sgd'), '.2f'):>7} "
                f"{_fmt(r.get('ratio_to_usv_sgd'), '.2f'):>6}",
                file=file,
            )


# ---- main ---------------------------------------------------------------------------------------


def _write(rows: list[dict], rate: float, args, out: Path, tag: str, *, plot_it: bool) -> None:
    """Ratios, then ``speed_<tag>.json`` / ``.csv`` (and ``.png``) in ``out``."""
    add_ratios(rows, rate)
    payload = {"env": environment(), "matmul_gflops": rate, "args": vars(args), "rows": rows}
    (out / f"speed_{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    write_csv(out / f"speed_{tag}.csv", rows)
    if plot_it:
        plot(rows, out / f"speed_{tag}.png")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--nets", nargs="+", default=["mlp500", "mlp5120", "lenet5"], choices=sorted(NETS)
    )
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=None,
        help="ranks of every factored layer (default: mlp500 16 32 64 128, mlp5120 8 32 128 512, "
        "lenet5 16 64)",
    )
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--batch", type=int, default=None, help="batch size (default per net)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after compilation")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--tau", type=float, default=0.1, help="tau of the adaptive runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-infer", action="store_true", help="skip the inference timings")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time forward+backward and update alone, and the linear algebra",
    )
    p.add_argument("--gpu", action="store_true", help="GPU sizes (width 5120 at batch 4096)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and 3 steps: checks it runs")
    p.add_argument("--tag", default=None, help="output stem suffix: speed_<tag>.{csv,json,png}")
    p.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only plot the rows of these result files together (to speed_<tag>.png in --out)",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only print a short table of the training steps in these result files",
    )
    return p


DEFAULT_RANKS = {"mlp500": [16, 32, 64, 128], "mlp5120": [8, 32, 128, 512], "lenet5": [16, 64]}


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return []
    if args.replot:
        rows = [r for f in args.replot for r in json.loads(Path(f).read_text())["rows"]]
        path = Path(args.out) / f"speed_{args.tag or 'merged'}.png"
        plot(rows, path)
        print(f"wrote {path}")
        return rows
    if args.smoke:
        NETS["mlp64"] = ("mlp", 64)
        args.nets = ["mlp64", "lenet5"]
        args.ranks = args.ranks or [4]
        args.steps = min(args.steps, 3)
        args.batch = args.batch or 8
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    backend = jax.default_backend()
    tag = args.tag or ("smoke" if args.smoke else backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rate = matmul_rate(512 if args.smoke else (8192 if backend == "gpu" else 2048))
    print(
        f"backend {backend}, devices {[d.device_kind for d in jax.devices()]}, "
        f"matmul rate {rate:.1f} GFLOP/s, load {os.getloadavg()}",
        flush=True,
    )
    rows: list[dict] = []
    t_start = time.perf_counter()
    for net in args.nets:
        width = NETS[net][1]
        batch = args.batch or (GPU_BATCH if args.gpu else DEFAULT_BATCH).get(net, 256)
        data = make_batch(jax.random.key(args.seed + 1), net, batch)
        ranks = args.ranks or DEFAULT_RANKS.get(net, [8, 16])
        jobs: list[Job] = []

        def add(new, net=net, jobs=jobs):
            for job in new if isinstance(new, list) else [new]:
                jobs.append(job)
                m = job.meta
                print(
                    f"  compiled {net:8} {m['method']:18} {m['phase']:8} rank {m.get('rank')}:"
                    f" {job.runner.compile_s:.1f} s",
                    flush=True,
                )

        for method in ("dense_sgd", "dense_adam"):
            if method in args.methods:
                add(train_job(net, width, data, method, None, args))
        if not args.no_infer and {"dense_sgd", "dense_adam"} & set(args.methods):
            add(infer_job(net, width, data, "dense_sgd", None, args))
        for rank in ranks:
            if "usv_sgd" in args.methods:
                add(train_job(net, width, data, "usv_sgd", rank, args))
                if not args.no_infer:
                    add(infer_job(net, width, data, "usv_sgd", rank, args))
            dl = [m for m in DLRT_METHODS if m in args.methods]
            if dl and not args.no_infer:
                add(infer_job(net, width, data, "bug_fixed", rank, args))
            for method in dl:
                add(train_job(net, width, data, method, rank, args))
                if args.profile:
                    add(part_jobs(net, width, data, method, rank, args))
            if args.profile and NETS[net][0] == "mlp":
                c = max(c for _, c in layer_ranks(net, width, rank, "parallel_adaptive"))
                add(kernel_jobs(width, c))
        print(
            f"  {net}: timing {len(jobs)} configurations x {args.steps} interleaved rounds",
            flush=True,
        )
        run_interleaved([j.runner for j in jobs], args.steps, args.seed)
        for job in jobs:
            row = dict(job.meta, **job.runner.result())
            if job.meta["phase"] == "train" and job.meta["method"] in DLRT_METHODS:
                row["final_ranks"] = _ranks_of(job.runner.args[0])
            rows.append(row)
        jobs.clear()  # free the compiled steps and their buffers
        _write(rows, rate, args, out, tag, plot_it=False)  # partial results survive a timeout
    print(
        f"\n{backend}: matmul rate {rate:.1f} GFLOP/s; total {time.perf_counter() - t_start:.0f} s;"
        f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB"
    )
    _write(rows, rate, args, out, tag, plot_it=not args.no_plot)
    print_table(rows)
    print(f"wrote {out}/speed_{tag}.{{csv,json{'' if args.no_plot else ',png'}}}")
    return rows


if __name__ == "__main__":
    main()
