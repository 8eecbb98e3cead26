"""dlrt_jax.parallel: data-parallel and row-sharded (model-parallel) DLRT steps.

The multi-device checks need 8 CPU devices, which XLA creates only when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax is imported; pytest has
imported jax already, so they run in a subprocess (tests/_multidevice_checks.py) whose results
are asserted here. Tolerance: 1e-5 absolute on ``W = U S V^T``, on the active columns of ``U``,
``V`` and block of ``S``, on dense parameters and on the optimiser state, after 4 steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import dlrt_jax
from dlrt_jax import parallel

HELPER = Path(__file__).with_name("_multidevice_checks.py")


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "results.json"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        OPENBLAS_NUM_THREADS="1",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not out.exists():
        pytest.fail(
            f"multi-device helper crashed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    results = {r["name"]: r for r in json.loads(out.read_text())}
    return results, proc


def _check(multidevice, name):
    results, proc = multidevice
    assert name in results, f"check {name} missing; helper output:\n{proc.stderr[-3000:]}"
    r = results[name]
    assert r["ok"], json.dumps(r, indent=1)
    return r


@pytest.mark.parametrize("name", ["data_parallel_bug_adam", "data_parallel_parallel_bug_sgd"])
def test_data_parallel_matches_one_device(multidevice, name):
    r = _check(multidevice, name)
    assert r["devices"] == 8 and r["batch_sharded"] == "P('data',)"
    assert r["max_diff_params"] <= 1e-5 and r["max_diff_state"] <= 1e-5
    assert r["rank"] == r["rank_single"]
    # every one of the 8 devices holds bit-identical, orthonormal bases
    assert r["bases_bit_identical"] and r["shards_per_array"] == [8, 8, 8, 8]
    assert r["replicated"] and r["orth_error"] < 1e-5


def test_model_parallel_rows_sharded(multidevice):
    r = _check(multidevice, "model_parallel_bug_adam")
    assert r["mesh"] == {"data": 2, "model": 4}
    assert r["specs"] == {
        "U": "P('model', None)",
        "V": "P('model', None)",
        "S": "P()",
        "K.mu": "P('model', None)",
    }
    assert r["U_shard_rows"] == [8]  # 32 rows over 4 devices
    assert r["max_diff_params"] <= 1e-5 and r["max_diff_state"] <= 1e-5


def test_sharded_checkpoint_roundtrip(multidevice):
    r = _check(multidevice, "sharded_checkpoint")  # values bit-identical, shardings kept
    assert r["U_spec"] == "P('model', None)"


def test_multidevice_errors(multidevice):
    r = _check(multidevice, "errors")
    assert "divisible by the size 8" in r["messages"]["batch"]
    assert "params['w'].U: 30 rows" in r["messages"]["rows"]


def test_multidevice_helper_exit_status(multidevice):
    results, proc = multidevice
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(results) == 5


# ---- single-device checks (in process) -----------------------------------------------------------


def _loss(p, batch):
    x, y = batch
    return jnp.mean((dlrt_jax.lowrank_apply(p["w"], x) + p["b"] - y) ** 2)


def test_one_device_mesh_equals_plain_jit():
    params = {
        "w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2),
        "b": jnp.zeros(8),
    }
    batch = (jax.random.normal(jax.random.key(1), (4, 6)), jnp.ones((4, 8)))
    tx = dlrt_jax.bug(optax.adam(1e-2), tau=0.1)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    traces = []

    def counting_loss(p, batch):
        traces.append(1)  # runs at trace time only
        return _loss(p, batch)

    step = parallel.data_parallel_step(tx, counting_loss, mesh)

    @jax.jit
    def plain(p, s):
        grad_fn = lambda q: jax.grad(_loss)(q, batch)
        loss, g = jax.value_and_grad(_loss)(p, batch)
        u, s = tx.update(g, s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, u), s, loss

    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for _ in range(3):
        p1, s1, l1 = step(p1, s1, batch)
        p2, s2, l2 = plain(p2, s2)
    assert len(traces) == 2, "the step was traced again"  # 2 loss evaluations per trace
    for a, b in zip(
        jax.tree_util.tree_leaves((p1, s1, l1)),
        jax.tree_util.tree_leaves((p2, s2, l2)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(l1) < float(_loss(params, batch))


def test_plain_optax_transform_works():
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(8)}
    loss = lambda p, batch: jnp.mean((batch[0] @ p["w"].T + p["b"] - batch[1]) ** 2)
    tx = optax.sgd(0.1)
    step = parallel.data_parallel_step(tx, loss, parallel.make_mesh())
    batch = (jnp.ones((4, 6)), jnp.ones((4, 8)))
    p, s, l0 = step(params, tx.init(params), batch)
    _, _, l1 = step(p, s, batch)
    assert float(l1) < float(l0)


def test_shardings_trees():
    mesh = parallel.make_mesh()
    params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (8, 6), rank=2), "b": jnp.zeros(8)}
    ps = parallel.param_shardings(params, mesh, model_axis="model")
    assert isinstance(ps["w"], dlrt_jax.LowRank)
    assert ps["w"].U.spec == P("model", None) and ps["w"].S.spec == P() and ps["b"].spec == P()
    assert parallel.param_shardings(params, mesh)["w"].U.spec == P()
    state = dlrt_jax.bug(optax.adam(0.1)).init(params)
    ss = parallel.state_shardings(state, params, mesh, model_axis="model")
    # Whatever the state layout: leaves shaped like U (8, c) or V (6, c), the K- and L-step
    # moments, are split by rows; everything else (S-step moments, counts, "b") is replicated.
    c = params["w"].capacity
    specs = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree_util.tree_leaves(ss), strict=True
    ):
        row = jnp.shape(leaf) in ((8, c), (6, c))
        assert sharding.spec == (P("model", None) if row else P()), jax.tree_util.keystr(path)
        specs[row] = specs.get(row, 0) + 1
    assert specs[True] == 4 and specs[False] >= 4  # K and L: mu and nu each
    assert parallel.state_shardings(state, params, mesh) == jax.tree_util.tree_map(
        lambda _: jax.sharding.NamedSharding(mesh, P()), state
    )


def test_argument_errors():
    with pytest.raises(ValueError, match="needs 64 devices"):
        parallel.make_mesh(data=64)
    with pytest.raises(ValueError, match="`model` must be an integer >= 1"):
        parallel.make_mesh(model=0)
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.data_parallel_step(optax.sgd(0.1), _loss, mesh, batch_axis="batch")
    with pytest.raises(ValueError, match="must be different"):
        parallel.data_parallel_step(optax.sgd(0.1), _loss, mesh, model_axis="data")
    with pytest.raises(TypeError, match="`tx` must be an optax"):
        parallel.data_parallel_step(0.1, _loss, mesh)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        parallel.data_parallel_step(optax.sgd(0.1), _loss, "mesh")
