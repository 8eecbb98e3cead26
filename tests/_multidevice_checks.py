"""Multi-device checks of dlrt_jax.parallel, run by tests/test_sharding.py in a subprocess.

Needs 8 CPU devices, which XLA only creates if ``XLA_FLAGS`` is set before jax is imported, so
this runs as its own process: ``python tests/_multidevice_checks.py OUT.json``. It writes one
record per check (name, ok, numbers) and exits with status 1 if any check failed.
"""

import json
import os
import sys
import traceback

FLAG = "--xla_force_host_platform_device_count=8"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dlrt_jax  # noqa: E402
from dlrt_jax import parallel  # noqa: E402

TOL = 1e-5
STEPS = 4


def make_problem():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "h": dlrt_jax.LowRank.random(k[0], (32, 16), rank=6, capacity=8),
        "hb": jnp.zeros((32,)),
        "o": 0.1 * jax.random.normal(k[1], (4, 32)),
    }
    x = jax.random.normal(k[2], (64, 16))
    y = jax.random.normal(k[3], (64, 4))
    return params, (x, y)


def loss_fn(p, batch):
    x, y = batch
    h = jax.nn.relu(dlrt_jax.lowrank_apply(p["h"], x) + p["hb"])
    return jnp.mean((h @ p["o"].T - y) ** 2)


def single_device_run(tx, params, batch):
    @jax.jit
    def step(params, opt_state):
        grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(STEPS):
        params, opt_state, _ = step(params, opt_state)
    return params, opt_state


def max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def result_diff(a, b):
    """Largest difference of what the parameters compute.

    For a ``LowRank``: ``W = U S V^T`` and the active columns of ``U``, ``V`` and block of ``S``
    (the inactive columns are an arbitrary orthonormal completion whose round-off differs
    between reductions; they are checked for orthonormality instead). Other leaves: as they are.
    """
    worst = 0.0
    la = jax.tree_util.tree_leaves(a, is_leaf=dlrt_jax.is_lowrank)
    lb = jax.tree_util.tree_leaves(b, is_leaf=dlrt_jax.is_lowrank)
    for x, y in zip(la, lb, strict=True):
        if dlrt_jax.is_lowrank(x):
            pairs = [(x.to_dense(), y.to_dense())] + list(zip(x.masked(), y.masked(), strict=True))
        else:
            pairs = [(x, y)]
        for u, v in pairs:
            d = np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))
            worst = max(worst, float(d.max()))
    return worst


def shards_identical(x):
    """All addressable shards of a replicated array hold bit-identical data."""
    shards = [np.asarray(s.data) for s in x.addressable_shards]
    return len(shards), all(np.array_equal(shards[0], s) for s in shards[1:])


def orth_error(lr):
    U, V = np.asarray(lr.U, np.float64), np.asarray(lr.V, np.float64)
    c = U.shape[1]
    return max(np.abs(U.T @ U - np.eye(c)).max(), np.abs(V.T @ V - np.eye(c)).max())


def sharded_run(tx, params, batch, mesh, model_axis=None):
    step = parallel.data_parallel_step(tx, loss_fn, mesh, model_axis=model_axis)
    p, s = parallel.shard_state(params, tx.init(params), mesh, model_axis=model_axis)
    b = parallel.shard_batch(batch, mesh)
    for _ in range(STEPS):
        p, s, _ = step(p, s, b)
    return p, s


def check_data_parallel(name, tx):
    params, batch = make_problem()
    ref_p, ref_s = single_device_run(tx, params, batch)
    mesh = parallel.make_mesh()  # 8 x 1
    p, s = sharded_run(tx, params, batch, mesh)
    lr = p["h"]
    shard_checks = [shards_identical(a) for a in (lr.U, lr.S, lr.V, lr.rank)]
    n_shards, identical = zip(*shard_checks, strict=True)
    return {
        "name": name,
        "devices": int(mesh.size),
        "max_diff_params": result_diff(p, ref_p),
        "max_diff_all_columns": max_diff(p, ref_p),
        "max_diff_state": max_diff(s, ref_s),
        "rank": int(lr.rank),
        "rank_single": int(ref_p["h"].rank),
        "shards_per_array": list(n_shards),
        "bases_bit_identical": bool(all(identical)),
        "replicated": bool(lr.U.sharding.is_fully_replicated),
        "batch_sharded": str(parallel.shard_batch(batch, mesh)[0].sharding.spec),
        "orth_error": float(orth_error(lr)),
        "ok": bool(
            result_diff(p, ref_p) <= TOL
            and max_diff(s, ref_s) <= TOL
            and int(lr.rank) == int(ref_p["h"].rank)
            and all(identical)
            and min(n_shards) == 8
            and orth_error(lr) < 1e-5
        ),
    }


def check_model_parallel():
    tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
    params, batch = make_problem()
    ref_p, ref_s = single_device_run(tx, params, batch)
    mesh = parallel.make_mesh(data=2, model=4)
    p, s = sharded_run(tx, params, batch, mesh, model_axis="model")
    lr = p["h"]
    # a K-step moment: the first opt-state leaf shaped like U (32 x 8), whatever the layout
    k_mu = next(x for x in jax.tree_util.tree_leaves(s) if x.shape == lr.U.shape)
    specs = {
        "U": str(lr.U.sharding.spec),
        "V": str(lr.V.sharding.spec),
        "S": str(lr.S.sharding.spec),
        "K.mu": str(k_mu.sharding.spec),
    }
    u_rows = sorted({s.data.shape[0] for s in lr.U.addressable_shards})
    return {
        "name": "model_parallel_bug_adam",
        "mesh": dict(mesh.shape),
        "specs": specs,
        "U_shard_rows": u_rows,
        "max_diff_params": result_diff(p, ref_p),
        "max_diff_all_columns": max_diff(p, ref_p),
        "max_diff_state": max_diff(s, ref_s),
        "rank": int(lr.rank),
        "rank_single": int(ref_p["h"].rank),
        "orth_error": float(orth_error(lr)),
        "ok": bool(
            result_diff(p, ref_p) <= TOL
            and max_diff(s, ref_s) <= TOL
            and int(lr.rank) == int(ref_p["h"].rank)
            and specs["U"] == str(jax.sharding.PartitionSpec("model", None))
            and specs["V"] == specs["U"] == specs["K.mu"]
            and specs["S"] == str(jax.sharding.PartitionSpec())
            and u_rows == [8]
            and orth_error(lr) < 1e-5
        ),
    }


def check_sharded_checkpoint():
    """Save a row-sharded state and restore it into a sharded target: values and shardings."""
    import tempfile

    from dlrt_jax.checkpoint import restore_checkpoint, save_checkpoint

    tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
    params, batch = make_problem()
    mesh = parallel.make_mesh(data=2, model=4)
    p, s = sharded_run(tx, params, batch, mesh, model_axis="model")
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, 4, {"params": p, "opt_state": s}, metadata={"mesh": "2x4"})
        target = parallel.shard_state(params, tx.init(params), mesh, model_axis="model")
        out = restore_checkpoint(
            d, {"params": target[0], "opt_state": target[1]}, metadata={"mesh": "2x4"}
        )
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding
        for a, b in zip(
            jax.tree_util.tree_leaves((p, s)),
            jax.tree_util.tree_leaves((out["params"], out["opt_state"])),
            strict=True,
        )
    )
    spec = str(out["params"]["h"].U.sharding.spec)
    return {"name": "sharded_checkpoint", "U_spec": spec, "ok": bool(same)}


def check_errors():
    params, batch = make_problem()
    tx = dlrt_jax.bug(0.1, tau=0.1)
    mesh = parallel.make_mesh()
    step = parallel.data_parallel_step(tx, loss_fn, mesh)
    messages = {}
    try:
        step(params, tx.init(params), (batch[0][:60], batch[1][:60]))
    except ValueError as e:
        messages["batch"] = str(e)
    try:
        parallel.shard_state(
            {"w": dlrt_jax.LowRank.random(jax.random.key(0), (30, 16), rank=2)},
            None,
            parallel.make_mesh(data=2, model=4),
            model_axis="model",
        )
    except ValueError as e:
        messages["rows"] = str(e)
    ok = "divisible by the size 8" in messages.get("batch", "") and "30 rows" in messages.get(
        "rows", ""
    )
    return {"name": "errors", "messages": messages, "ok": ok}


def main(out_path):
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 CPU devices, got {jax.device_count()}: XLA_FLAGS not applied")
    checks = [
        lambda: check_data_parallel(
            "data_parallel_bug_adam", dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
        ),
        lambda: check_data_parallel(
            "data_parallel_parallel_bug_sgd", dlrt_jax.parallel_bug(0.05, tau=0.1)
        ),
        check_model_parallel,
        check_sharded_checkpoint,
        check_errors,
    ]
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception:  # record and go on, so every check reports
            results.append(
                {
                    "name": getattr(check, "__name__", "check"),
                    "ok": False,
                    "error": traceback.format_exc(),
                }
            )
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
