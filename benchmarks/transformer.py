"""A small GPT on Python's own text: dense vs DLRT from scratch, and fine-tuning with adapters.

Issue 11's experiment. A decoder-only byte-level transformer (``benchmarks/_gpt.py``: token and
position embeddings, pre-norm blocks of causal ``nnx.MultiHeadAttention`` and a GELU MLP, untied
head) is trained on corpora that ship with Python (``benchmarks/_corpus.py``: 58 standard-library
modules' source for pretraining, the English text of ``pydoc_data.topics`` for fine-tuning; file
sizes and SHA-256 checked against pinned values and written to the JSON).

Part A, from scratch on the code corpus (same batches, same steps, one process):

* ``dense``: Adam, warmup + cosine schedule;
* ``dlrt``: the same model converted by ``dlrt_jax.nnx.to_low_rank`` (every ``Linear`` and
  ``LinearGeneral``: the rank-``c`` truncated SVD of the same random initialisation, rank =
  capacity = ``c`` = ``--scratch-capacity``, so ranks can only fall) and trained by the
  rank-adaptive ``parallel_bug`` (Adam on K, L, S at 3x the learning rate, relative tau); the
  layers it cannot convert (embeddings, norms) stay dense and are listed;
* ``dense_matched``: a narrower dense model with at most the parameters DLRT ended with.

Part B, fine-tuning the pretrained ``dense`` model on the docs corpus:

* ``full``: every parameter, Adam; ``full_linear``: only the adapted layers' kernels and biases
  (embeddings and norms frozen, as in the adapter runs);
* ``lora_rR``: ``nnx.LoRA`` factors (``B = 0`` at start) on every linear layer (attention
  q/k/v/out and MLP of every block, output head; embeddings and norms frozen), base weights
  frozen, rank R for each size's list;
* ``adapter_tau``, ``adapter_budget``: rank-adaptive DLRT adapters on the same layers (frozen
  ``W0``, ``S = 0`` at start, ``parallel_bug``), rank chosen by a per-layer tau or by a global
  parameter budget, one run per seed; ``adapter_fixed_rR``: the same adapters at a fixed rank R
  (``tau=None``: DLRT's fixed-rank mode), to tell rank adaptation from parametrisation.

Reported: trainable and total parameters (a ``LowRank`` factor counts ``r (n + m) + r^2`` at its
rank; adapters are reported in the LoRA layout ``r (n + m)`` that ``export_peft`` writes),
validation loss (nats/byte) and bits per byte, median step time after compilation, XLA's memory
estimate of the compiled step (arguments + outputs + temporaries - aliased; comparable across
variants on every backend), the device's peak bytes in use where the backend reports it (GPU;
cumulative over the process), ranks per layer. Part C times the adapter and LoRA steps at
the same rank interleaved (round-robin, same batch) for the step-time target.

Examples:
    python benchmarks/transformer.py --size smoke   # checks that it runs: ~1-2 min, 2 cores
    python benchmarks/transformer.py --size small   # 10 minutes on a shared 2-core CPU
    python benchmarks/transformer.py --size gpu            # larger model, on a GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax: QR/SVD stall otherwise

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import _corpus  # noqa: E402
import _gpt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import dlrt_jax  # noqa: E402
import dlrt_jax.nnx as dnnx  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LN2 = math.log(2.0)

SIZES = {
    "smoke": dict(
        cfg=_gpt.GPTConfig(d_model=32, n_heads=2, n_layers=1, context=32),
        batch=16, pre_steps=40, ft_steps=20, eval_windows=32, lora_ranks=(4,),
        seeds=(0,), speed_ranks=(4,), speed_rounds=3, matched=False, parts="b",
        capacity=8, scratch_capacity=8,
    ),
    "small": dict(
        cfg=_gpt.GPTConfig(d_model=64, n_heads=4, n_layers=2, context=64),
        batch=32, pre_steps=600, ft_steps=300, eval_windows=512, lora_ranks=(1, 2, 4, 8, 16),
        seeds=(0, 1), speed_ranks=(4, 8), speed_rounds=30, capacity=16, scratch_capacity=14,
    ),
    "gpu": dict(
        cfg=_gpt.GPTConfig(d_model=256, n_heads=8, n_layers=4, context=128),
        batch=64, pre_steps=1500, ft_steps=500, eval_windows=1024, lora_ranks=(4, 8, 16, 32),
        seeds=(0, 1), speed_ranks=(8, 32), speed_rounds=30, capacity=64, scratch_capacity=56,
    ),  # not yet run on a GPU: sized for ~4 minutes on one H100/H200 (a guess)
}  # fmt: skip


# ---- data ---------------------------------------------------------------------------------------


class Batches:
    """Random ``(x, y)`` windows of ``context + 1`` bytes from a training stream, fixed by seed."""

    def __init__(self, stream: np.ndarray, context: int, batch: int, steps: int, seed: int):
        rng = np.random.default_rng(seed)
        self.stream, self.context = stream, context
        self.starts = rng.integers(0, stream.size - context - 1, size=(steps, batch))

    def __call__(self, k: int) -> tuple[jax.Array, jax.Array]:
        idx = self.starts[k][:, None] + np.arange(self.context + 1)
        w = self.stream[idx].astype(np.int32)
        return jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:])


def val_windows(stream: np.ndarray, context: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` non-overlapping windows of the validation stream (all if fewer)."""
    k = min(n, (stream.size - 1) // context)
    idx = np.arange(k)[:, None] * context + np.arange(context + 1)
    w = stream[idx].astype(np.int32)
    return w[:, :-1], w[:, 1:]


# ---- one training run ---------------------------------------------------------------------------


def schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = max(1, min(100, steps // 10))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)


def memory_estimate(compiled) -> int | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )


def device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


class Run:
    """A model split into trained ``params`` (``wrt``) and the rest, with its functional step."""

    def __init__(self, model: nnx.Module, wrt, tx: optax.GradientTransformation):
        self.model, self.wrt, self.tx = model, wrt, tx
        self.graphdef, params, rest = nnx.split(model, wrt, ...)
        self.params, self.rest = nnx.as_pure(params), nnx.as_pure(rest)
        graphdef = self.graphdef

        def loss_fn(p, rest, x, y):
            return _gpt.cross_entropy(nnx.merge(graphdef, p, rest), x, y)

        self.loss_fn = loss_fn
        self.step = dlrt_jax.make_train_step(loss_fn, tx)
        self.opt_state = tx.init(self.params)
        self.eval = jax.jit(loss_fn)

    def compile(self, x, y) -> int | None:
        """Compile the step for the current shapes; XLA's memory estimate of it, in bytes."""
        args = (self.params, self.opt_state, self.rest, x, y)
        return memory_estimate(self.step.lower(*args).compile())

    def one(self, x, y) -> float:
        t0 = time.perf_counter()
        self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.rest, x, y)
        loss.block_until_ready()
        return time.perf_counter() - t0

    def evaluate(self, xv: np.ndarray, yv: np.ndarray, chunk: int = 64) -> float:
        total = 0.0
        for i in range(0, len(xv), chunk):
            xs, ys = jnp.asarray(xv[i : i + chunk]), jnp.asarray(yv[i : i + chunk])
            total += float(self.eval(self.params, self.rest, xs, ys)) * len(xs)
        return total / len(xv)

    def write_back(self) -> nnx.Module:
        nnx.update(self.model, self.params)
        return self.model


def train(
    name: str,
    run: Run,
    batches: Batches,
    steps: int,
    val: tuple[np.ndarray, np.ndarray],
    *,
    extra: dict | None = None,
) -> dict:
    t_start = time.perf_counter()
    x0, y0 = batches(0)
    step_bytes = run.compile(x0, y0)
    times, losses = [], []
    for k in range(steps):
        x, y = batches(k)
        times.append(run.one(x, y))
        if k % max(1, steps // 10) == 0 or k == steps - 1:
            losses.append((k, float(run.eval(run.params, run.rest, x, y))))
    val_loss = run.evaluate(*val)
    everything = nnx.as_pure(nnx.state(run.write_back()))  # frozen and trained (no RNG state)
    row = {
        "variant": name,
        "trainable_params": _gpt.count_params(run.params),
        "total_params": _gpt.count_params(everything),
        "val_loss": val_loss,
        "val_bpb": val_loss / LN2,
        "median_step_ms": 1e3 * statistics.median(times[min(3, steps - 1) :]),
        "step_memory_bytes": step_bytes,
        "state_bytes": _gpt.tree_bytes((run.params, run.opt_state)),
        "device_peak_bytes": device_peak(),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ranks": _gpt.lowrank_ranks(run.params),
        "train_curve": losses,
        "wall_s": time.perf_counter() - t_start,
        **(extra or {}),
    }
    print(
        f"  {name:<22} trainable {row['trainable_params']:>8}  total {row['total_params']:>8}  "
        f"val {val_loss:.4f} ({row['val_bpb']:.3f} bpb)  step {row['median_step_ms']:.1f} ms  "
        f"({row['wall_s']:.0f} s)",
        flush=True,
    )
    return row


# ---- part A: from scratch -----------------------------------------------------------------------


def lowrank_from_scratch(model: nnx.Module, capacity: int) -> tuple[nnx.Module, str]:
    """Every layer ``to_low_rank`` can convert, as the rank-``capacity`` truncated SVD of its
    random initialisation (rank = capacity: the rank-adaptive integrator can only lower it)."""
    with warnings.catch_warnings():  # "changes the weights": intended, a random init truncated
        warnings.simplefilter("ignore", UserWarning)
        low, summary = dnnx.to_low_rank(model, rank=capacity, capacity=capacity, report=True)
    return low, str(summary)


def matched_width(cfg: _gpt.GPTConfig, budget: int) -> _gpt.GPTConfig:
    """The widest config (multiple of ``n_heads``) whose dense model has <= ``budget`` params."""
    best = None
    for d in range(cfg.n_heads, cfg.d_model + 1, cfg.n_heads):
        c = dataclasses.replace(cfg, d_model=d)
        n = _gpt.count_params(nnx.as_pure(nnx.state(_abstract(c), nnx.Param)))
        if n <= budget:
            best = c
    return best or dataclasses.replace(cfg, d_model=cfg.n_heads)


def _abstract(cfg: _gpt.GPTConfig) -> nnx.Module:
    return nnx.eval_shape(lambda: _gpt.GPT(cfg, rngs=nnx.Rngs(0)))


def part_a(args, size, code) -> tuple[list[dict], nnx.Module, str]:
    cfg, steps = size["cfg"], size["pre_steps"]
    batches = Batches(code.train, cfg.context, size["batch"], steps, seed=1234)
    val = val_windows(code.val, cfg.context, size["eval_windows"])
    rows = []
    print(f"A. from scratch on the code corpus: {steps} steps, batch {size['batch']}", flush=True)

    dense = _gpt.GPT(cfg, rngs=nnx.Rngs(args.seed))
    low, summary = lowrank_from_scratch(
        dense, args.scratch_capacity
    )  # from the same random init (before training)
    tx = optax.adam(schedule(args.lr, steps))
    rows.append(train("dense", Run(dense, nnx.Param, tx), batches, steps, val))

    tx = dlrt_jax.parallel_bug(
        optax.adam(schedule(3 * args.lr, steps)),
        tau=args.tau_scratch,
        other_optimizer=optax.adam(schedule(args.lr, steps)),
    )
    rows.append(
        train("dlrt", Run(low, nnx.Param, tx), batches, steps, val,
              extra={"tau": args.tau_scratch, "capacity": args.scratch_capacity,
               "conversion": summary})
    )  # fmt: skip

    if not size.get("matched", True):
        return rows, dense, summary
    mcfg = matched_width(cfg, rows[-1]["total_params"])
    small = _gpt.GPT(mcfg, rngs=nnx.Rngs(args.seed))
    tx = optax.adam(schedule(args.lr, steps))
    rows.append(
        train("dense_matched", Run(small, nnx.Param, tx), batches, steps, val,
              extra={"d_model": mcfg.d_model})
    )  # fmt: skip
    return rows, dense, summary


# ---- part B: fine-tuning ------------------------------------------------------------------------


def adapter_variants(args, size, budget: int) -> list[tuple[str, dict]]:
    """``(name, options)`` of the DLRT adapter runs (one per seed and rank rule)."""
    out = []
    for seed in size["seeds"]:
        out.append((f"adapter_tau_s{seed}", {"rule": "tau", "seed": seed}))
        out.append((f"adapter_budget_s{seed}", {"rule": "budget", "seed": seed, "budget": budget}))
    return out


ADAPTER_FILTER = "|".join(_gpt.ADAPTED)  # path regex: the same layers as the LoRA baseline


def make_adapter(pretrained: nnx.Module, args, opts: dict, steps: int):
    """``(model, wrt, tx, extra)`` of a DLRT adapter run (``dlrt_jax.adapters``).

    ``opts``: ``rule`` (``'tau'``: per-layer relative tau; ``'budget'``: global parameter budget
    with tau 0), ``seed`` (the adapters' random bases), ``capacity`` (default ``args.capacity``).
    """
    from dlrt_jax import adapters

    capacity = opts.get("capacity", args.capacity)
    rank = min(args.adapter_rank, capacity)
    model = adapters.to_adapters(
        pretrained, filter=ADAPTER_FILTER, rank=rank, capacity=capacity,
        rngs=nnx.Rngs(opts["seed"]),
    )  # fmt: skip
    lr = schedule(args.lr_adapter, steps)
    if opts["rule"] == "tau":
        tx = adapters.geolora(
            lr,
            tau=args.tau_adapter,
            augment_every=args.adapter_cycle,
            coefficient_steps=args.adapter_coefficient_steps,
        )
        extra = {
            "tau": args.tau_adapter,
            "augment_every": args.adapter_cycle,
            "coefficient_steps": args.adapter_coefficient_steps,
        }
    elif opts["rule"] == "fixed":
        tx = adapters.geolora(lr, tau=None)  # parallel_bug truncating back to the rank
        extra = {"tau": None}
    else:
        tx = adapters.geolora(lr, tau=0.0, budget=opts["budget"])
        extra = {"budget": opts["budget"]}
    return model, nnx.Param, tx, {**extra, "capacity": capacity, "seed": opts["seed"]}


def adapter_params(model: nnx.Module) -> int:
    """Trainable parameters of the adapters in the LoRA layout, ``sum_l r_l (n_l + m_l)``."""
    from dlrt_jax import adapters

    return adapters.adapter_parameters(model)


def part_b(args, size, docs, pretrained: nnx.Module) -> list[dict]:
    cfg, steps = size["cfg"], size["ft_steps"]
    batches = Batches(docs.train, cfg.context, size["batch"], steps, seed=4321)
    val = val_windows(docs.val, cfg.context, size["eval_windows"])
    rows = []
    print(f"B. fine-tuning on the docs corpus: {steps} steps", flush=True)

    zero = Run(nnx.clone(pretrained), nnx.Param, optax.adam(0.0))
    zero_loss = zero.evaluate(*val)
    print(f"  pretrained, no fine-tuning: val {zero_loss:.4f} ({zero_loss / LN2:.3f} bpb)")
    rows.append({"variant": "pretrained", "trainable_params": 0, "val_loss": zero_loss,
                 "val_bpb": zero_loss / LN2})  # fmt: skip

    tx = optax.adam(schedule(args.lr_full, steps))
    rows.append(train("full", Run(nnx.clone(pretrained), nnx.Param, tx), batches, steps, val))
    linear = nnx.Any(*(nnx.All(nnx.Param, nnx.PathContains(n)) for n in _gpt.ADAPTED))
    rows.append(train("full_linear", Run(nnx.clone(pretrained), linear, tx), batches, steps, val))
    for r in size["lora_ranks"]:
        model = _gpt.add_lora(pretrained, r, seed=args.seed)
        tx = optax.adam(schedule(args.lr_adapter, steps))
        rows.append(train(f"lora_r{r}", Run(model, nnx.LoRAParam, tx), batches, steps, val,
                          extra={"rank": r}))  # fmt: skip
    budget = args.budget or _gpt.count_params(
        nnx.as_pure(nnx.state(_gpt.add_lora(pretrained, 4), nnx.LoRAParam))
    )  # default: what LoRA at rank 4 trains
    r = args.adapter_rank  # DLRT's fixed-rank mode: the same adapters, tau=None
    model, wrt, tx, extra = make_adapter(
        pretrained, args, {"rule": "fixed", "seed": 0, "capacity": r}, steps
    )
    rows.append(train(f"adapter_fixed_r{r}", Run(model, wrt, tx), batches, steps, val, extra=extra))
    rows[-1]["trainable_params"] = adapter_params(model)
    for name, opts in adapter_variants(args, size, budget):
        model, wrt, tx, extra = make_adapter(pretrained, args, opts, steps)
        row = train(name, Run(model, wrt, tx), batches, steps, val, extra=extra)
        row["stored_trainable_params"] = row["trainable_params"]  # U, S, V at their capacity
        row["trainable_params"] = adapter_params(model)  # LoRA layout at the final ranks
        print(f"    ranks {row['ranks']}  ({row['trainable_params']} params as LoRA)")
        rows.append(row)
    for r in rows:
        r["phase"] = "finetune"
    return rows


# ---- part C: interleaved step timing ------------------------------------------------------------


def part_c(args, size, docs, pretrained: nnx.Module) -> list[dict]:
    cfg, rounds = size["cfg"], size["speed_rounds"]
    batches = Batches(docs.train, cfg.context, size["batch"], rounds + 3, seed=99)
    rows = []
    print(f"C. step time, adapters vs LoRA at the same rank, {rounds} interleaved rounds")
    for r in size["speed_ranks"]:
        runs = {f"lora_r{r}": Run(_gpt.add_lora(pretrained, r), nnx.LoRAParam, optax.adam(1e-3))}
        model, wrt, tx, _ = make_adapter(
            pretrained, args, {"rule": "tau", "seed": 0, "capacity": r}, rounds
        )
        runs[f"adapter_c{r}"] = Run(model, wrt, tx)
        times = {k: [] for k in runs}
        for k in range(rounds + 3):
            x, y = batches(k)
            for name, run in runs.items():
                times[name].append(run.one(x, y))
        med = {k: 1e3 * statistics.median(v[3:]) for k, v in times.items()}
        row = {"phase": "speed", "rank": r, **{f"{k}_ms": v for k, v in med.items()}}
        if len(med) == 2:
            row["adapter_over_lora"] = med[f"adapter_c{r}"] / med[f"lora_r{r}"]
        print("  " + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
        rows.append(row)
    return rows


# ---- report -------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> dict:
    """The issue's four targets, evaluated on ``rows``."""
    by = {r["variant"]: r for r in rows if "val_loss" in r}
    out = {}
    if {"dense", "dlrt"} <= by.keys():
        d, low = by["dense"], by["dlrt"]
        gap = low["val_loss"] / d["val_loss"] - 1
        saved = 1 - low["total_params"] / d["total_params"]
        out["scratch"] = {
            "val_gap": gap,
            "params_saved": saved,
            "met": gap <= 0.03 and saved >= 0.5,
        }
    if "full" in by:
        ref = by["full"]["val_loss"]
        within = lambda r: r["val_loss"] <= 1.02 * ref  # noqa: E731
        loras = [r for v, r in by.items() if v.startswith("lora_r") and within(r)]
        best = min(loras, key=lambda r: r["trainable_params"]) if loras else None
        adapters = [r for v, r in by.items() if v.startswith("adapter_")]
        ok = [
            r["variant"] for r in adapters
            if within(r) and (best is None or r["trainable_params"] <= best["trainable_params"])
        ]  # fmt: skip
        out["adapters"] = {
            "full_val_loss": ref,
            "best_lora_within_2pct": best and best["variant"],
            "best_lora_params": best and best["trainable_params"],
            "adapters_meeting": ok,
            "met": bool(ok),
        }
        ranks = {r["variant"]: r["ranks"] for r in adapters}
        out["ranks"] = rank_stability(ranks)
    speed = [r for r in rows if r.get("phase") == "speed" and "adapter_over_lora" in r]
    if speed:
        worst = max(r["adapter_over_lora"] for r in speed)
        out["speed"] = {"worst_ratio": worst, "met": worst <= 1.3}
    return out


def rank_stability(ranks: dict[str, dict[str, int]]) -> dict:
    """Per rule: are the ranks not all equal, and within 20 % across seeds (per layer)?"""
    out = {}
    for rule in ("tau", "budget"):
        runs = [v for k, v in sorted(ranks.items()) if k.startswith(f"adapter_{rule}_s") and v]
        if not runs:
            continue
        unequal = all(len(set(v.values())) > 1 for v in runs)
        spread = 0.0
        for layer in runs[0]:
            vals = [v[layer] for v in runs]
            spread = max(spread, (max(vals) - min(vals)) / max(1, max(vals)))
        totals = [sum(v.values()) for v in runs]
        total_spread = (max(totals) - min(totals)) / max(1, max(totals))
        out[rule] = {
            "not_all_equal": unequal,
            "max_layer_spread": spread,
            "total_rank_spread": total_spread,
            "seeds": len(runs),
            "met": unequal and len(runs) > 1 and spread <= 0.2,
        }
    return out


def print_table(rows: list[dict]) -> None:
    print("\n| phase | variant | trainable | total | val loss | bpb | step ms | step MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "val_loss" not in r:
            continue
        mem = r.get("step_memory_bytes")
        print(
            f"| {r['phase']} | {r['variant']} | {r['trainable_params']} | "
            f"{r.get('total_params', '-')} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} | "
            f"{r.get('median_step_ms', float('nan')):.1f} | "
            f"{'-' if mem is None else f'{mem / 2**20:.1f}'} |"
        )


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = ["phase", "variant", "trainable_params", "total_params", "val_loss", "val_bpb",
            "median_step_ms", "step_memory_bytes", "state_bytes", "device_peak_bytes",
            "ranks"]  # fmt: skip
    with path.open("w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            if "val_loss" not in r:
                continue
            vals = [r.get(k, "") for k in keys]
            vals[-1] = " ".join(f"{k}={v}" for k, v in (r.get("ranks") or {}).items())
            f.write(",".join("" if v is None else str(v) for v in vals) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ft = [r for r in rows if r.get("phase") == "finetune" and r.get("trainable_params")]
    for prefix, marker in (
        ("full", "s"),
        ("lora", "o"),
        ("adapter_tau", "^"),
        ("adapter_budget", "v"),
    ):
        pts = [r for r in ft if r["variant"].startswith(prefix)]
        if pts:
            ax1.scatter([r["trainable_params"] for r in pts], [r["val_bpb"] for r in pts],
                        marker=marker, label=prefix)  # fmt: skip
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters")
    ax1.set_ylabel("validation bits per byte (docs)")
    ax1.set_title("fine-tuning")
    ax1.legend()
    for r in rows:
        if r.get("phase") == "scratch" and r.get("train_curve"):
            k, v = zip(*r["train_curve"], strict=True)
            ax2.plot(k, np.array(v) / LN2, label=f"{r['variant']} ({r['total_params']} params)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training bits per byte (code)")
    ax2.set_title("from scratch")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "argv": sys.argv,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--smoke", action="store_true", help="same as --size smoke")
    p.add_argument(
        "--parts",
        help="parts besides A (which pretrains for B and C): b, c or bc (default bc; smoke: b)",
    )
    p.add_argument("--pre-steps", type=int, help="override the size's pretraining steps")
    p.add_argument("--ft-steps", type=int, help="override the size's fine-tuning steps")
    p.add_argument("--seeds", type=int, nargs="+", help="override the adapter seeds")
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--lr", type=float, default=3e-3, help="dense pretraining Adam lr")
    p.add_argument("--lr-full", type=float, default=3e-3, help="full fine-tuning Adam lr")
    p.add_argument("--lr-adapter", type=float, default=1e-2, help="LoRA / adapter Adam lr")
    p.add_argument("--tau-scratch", type=float, default=0.1, help="relative tau, from scratch")
    p.add_argument("--tau-adapter", type=float, default=0.1, help="relative tau, adapters")
    p.add_argument(
        "--adapter-cycle", type=int, default=1, help="augment_every of the adapter_tau rows"
    )
    p.add_argument(
        "--adapter-coefficient-steps",
        choices=["S", "KLS"],
        default="S",
        help="coefficient_steps of the adapter_tau rows' cycle",
    )
    p.add_argument("--budget", type=int, help="adapter parameter budget (default: LoRA r=4's)")
    p.add_argument("--adapter-rank", type=int, default=8, help="adapters' initial rank and r")
    p.add_argument("--capacity", type=int, help="adapters' capacity, their largest rank")
    p.add_argument(
        "--scratch-capacity", type=int, help="from scratch: start rank = capacity = largest rank"
    )
    p.add_argument("--corpus-check", choices=("verify", "record"), default="verify")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tag", default=None, help="file name tag (default transformer_<size>)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    size = dict(SIZES[args.size])
    args.capacity = args.capacity or size["capacity"]
    args.scratch_capacity = args.scratch_capacity or size["scratch_capacity"]
    for key in ("pre_steps", "ft_steps", "seeds"):
        if getattr(args, key) is not None:
            size[key] = tuple(args.seeds) if key == "seeds" else getattr(args, key)
    args.parts = args.parts or size.get("parts", "bc")
    tag = args.tag or f"transformer_{args.size}"
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        code, docs, status = _corpus.load(verify=args.corpus_check == "verify")
    except _corpus.CorpusMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(status)
    for c in (code, docs):
        print(f"  {c.name}: {len(c.files)} file(s), train {c.train.size} B, val {c.val.size} B, "
              f"sha256 {c.digest[:16]}..")  # fmt: skip
    print(f"model {size['cfg']}, backend {jax.default_backend()}", flush=True)

    t0 = time.time()
    rows, pretrained, summary = part_a(args, size, code)
    for r in rows:
        r["phase"] = "scratch"
    print(summary)
    if "b" in args.parts:
        rows += part_b(args, size, docs, pretrained)
    if "c" in args.parts:
        rows += part_c(args, size, docs, pretrained)
    result = {
        "size": args.size,
        "config": {k: (v.as_dict() if k == "cfg" else v) for k, v in size.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {"status": status, "code": code.summary(), "docs": docs.summary()},
        "environment": environment(),
        "wall_s": time.time() - t0,
        "rows": rows,
        "targets": targets(rows),
    }
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    write_csv(args.out / f"{tag}.csv", rows)
    if not args.no_plot:
        plot(args.out / f"{tag}.png", rows)
    print_table(rows)
    print("\ntargets:", json.dumps(result["targets"], indent=1, default=str))
    print(f"wrote {args.out / tag}.{{json,csv{'' if args.no_plot else ',png'}}} "
          f"in {result['wall_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
