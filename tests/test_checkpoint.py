"""Checkpoint / resume of the whole training state (dlrt_jax.checkpoint, orbax-checkpoint)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    TrainState,
    all_steps,
    checkpoint_metadata,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from dlrt_jax.mnist.data import batch_iterator

pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint is not installed")

N_OUT, N_IN, BATCH, N_DATA = 12, 10, 8, 48  # 6 batches per epoch
META = {"integrator": "bug", "tau": 0.2, "optimizer": "adam", "lr": 0.02}


def _data():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N_OUT, 3)) @ rng.standard_normal((3, N_IN))
    X = rng.standard_normal((N_DATA, N_IN)).astype(np.float32)
    Y = (X @ A.T + 0.05 * rng.standard_normal((N_DATA, N_OUT))).astype(np.float32)
    return X, Y


def _loss(params, x, y, key):
    x = x + 0.01 * jax.random.normal(key, x.shape)  # uses the RNG, so the key must be restored
    pred = dlrt_jax.lowrank_apply(params["w"], x) + params["b"]
    return jnp.mean((pred - y) ** 2)


TX = dlrt_jax.bug(optax.adam(0.02), tau=0.2)
TRACES = []


@jax.jit
def _train_step(state, x, y):
    TRACES.append(1)  # runs once per trace
    rng, sub = jax.random.split(state.rng)
    grad_fn = lambda p: jax.grad(_loss)(p, x, y, sub)
    grads = grad_fn(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    return state._replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        rng=rng,
        batch=state.batch + 1,
    )


def _run(state, num_steps, X, Y):
    """Train ``num_steps`` steps from the data position stored in ``state``."""
    done = 0
    while done < num_steps:
        batches = batch_iterator(
            X, Y, BATCH, seed=0, epoch=int(state.epoch), start_batch=int(state.batch)
        )
        for x, y in batches:
            state = _train_step(state, x, y)
            done += 1
            if done == num_steps:
                return state
        state = state._replace(epoch=state.epoch + 1, batch=jnp.zeros((), jnp.int32))
    return state


def _fresh_state(seed):
    params = {
        "w": dlrt_jax.LowRank.random(jax.random.key(seed), (N_OUT, N_IN), rank=5, capacity=5),
        "b": jnp.zeros((N_OUT,), jnp.float32),
    }
    return TrainState.create(params, TX, rng=jax.random.key(100 + seed))


def _leaves(tree):
    def raw(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return [raw(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_bit_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_resume_is_bit_identical(tmp_path):
    X, Y = _data()
    k = 8  # crosses an epoch boundary (6 batches per epoch) before and after the checkpoint
    straight = _run(_fresh_state(0), 2 * k, X, Y)

    first = _run(_fresh_state(0), k, X, Y)
    save_checkpoint(tmp_path, k, first, metadata=META)
    del first
    target = _fresh_state(7)  # different values everywhere: restore must overwrite all of them
    resumed = restore_checkpoint(tmp_path, target, metadata=META)
    assert isinstance(resumed, TrainState)
    assert isinstance(resumed.params["w"], dlrt_jax.LowRank)
    assert isinstance(resumed.opt_state, dlrt_jax.DLRTState)
    assert (int(resumed.step), int(resumed.epoch), int(resumed.batch)) == (k, 1, 2)
    n_traces = len(TRACES)
    resumed = _run(resumed, k, X, Y)
    assert len(TRACES) == n_traces, "the restored state made the jitted step compile again"

    _assert_bit_identical(straight, resumed)
    # the run really exercised the adaptive rank and the data position
    assert int(straight.params["w"].rank) < 5
    assert (int(straight.step), int(straight.epoch), int(straight.batch)) == (2 * k, 2, 4)


def test_state_types_roundtrip(tmp_path):
    w = dlrt_jax.LowRank.random(jax.random.key(0), (6, 4), rank=1, capacity=2)
    state = {
        "lr": w,
        "bf16": jnp.arange(4.0, dtype=jnp.bfloat16),
        "raw_key": jax.random.PRNGKey(3),
        "typed_key": jax.random.key(4),
        "count": jnp.asarray(7, jnp.int32),
        "none": None,
    }
    save_checkpoint(tmp_path, 0, state)
    target = jax.tree_util.tree_map(jnp.zeros_like, state)
    target["typed_key"] = jax.random.key(0)
    out = restore_checkpoint(tmp_path, target)
    assert out["bf16"].dtype == jnp.bfloat16
    assert jnp.issubdtype(out["typed_key"].dtype, jax.dtypes.prng_key)
    assert out["none"] is None
    assert float(out["lr"].rank) == 1.0 and out["lr"].rank.dtype == jnp.float32
    _assert_bit_identical(state, out)
    meta = checkpoint_metadata(tmp_path)
    assert meta["factors"]["['lr']"] == {"shape": [6, 4], "capacity": 2, "rank": 1}
    assert meta["leaves"]["['lr'].U"] == {"shape": [6, 2], "dtype": "float32"}


def test_restore_mismatch_messages(tmp_path):
    state = _fresh_state(0)
    save_checkpoint(tmp_path, 3, state, metadata=META)

    # another capacity
    params = dict(state.params)
    params["w"] = dlrt_jax.LowRank.random(jax.random.key(0), (N_OUT, N_IN), rank=3, capacity=4)
    other = TrainState.create(params, TX, rng=jax.random.key(0))
    with pytest.raises(CheckpointMismatchError) as e:
        restore_checkpoint(tmp_path, other)
    msg = str(e.value)
    assert "['w']: capacity 5 in the checkpoint, 4 in the target" in msg
    assert "params['w'].U: shape [12, 5] in the checkpoint, [12, 4] in the target" in msg

    # another integrator (same state structure): caught by the run metadata
    with pytest.raises(
        ValueError,
        match=r"metadata\['integrator'\]: 'bug' in the checkpoint, "
        r"'parallel_bug' expected",
    ):
        restore_checkpoint(tmp_path, state, metadata={**META, "integrator": "parallel_bug"})

    # another inner optimiser (sgd has no moments): missing leaves named
    sgd_state = TrainState.create(state.params, dlrt_jax.bug(0.1, tau=0.2), rng=state.rng)
    with pytest.raises(CheckpointMismatchError) as e:
        restore_checkpoint(tmp_path, sgd_state)
    missing = [
        d for d in e.value.differences if d.endswith("in the checkpoint but not in the target")
    ]
    assert any(d.startswith(".opt_state") and ".mu:" in d for d in missing), e.value.differences
    assert not any("in the target but not in the checkpoint" in d for d in e.value.differences)

    # another dtype
    bf = state._replace(params={**state.params, "b": state.params["b"].astype(jnp.bfloat16)})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"params\['b'\]: dtype float32 in the "
        r"checkpoint, bfloat16 in the target",
    ):
        restore_checkpoint(tmp_path, bf)

    # a dense matrix where the checkpoint has a LowRank
    dense = state._replace(params={**state.params, "w": jnp.zeros((N_OUT, N_IN))})
    with pytest.raises(CheckpointMismatchError, match=r"\['w'\]: a LowRank in the checkpoint"):
        restore_checkpoint(tmp_path, dense)

    # nothing was changed by the failed attempts
    _assert_bit_identical(restore_checkpoint(tmp_path, state, metadata=META), state)


def test_steps_and_argument_errors(tmp_path):
    assert latest_step(tmp_path / "missing") is None and all_steps(tmp_path / "missing") == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_checkpoint(tmp_path / "missing", {"x": jnp.zeros(2)})
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        with pytest.raises(FileNotFoundError, match="No committed checkpoint"):
            mgr.restore({"x": jnp.zeros(2)})
        for s in (1, 4, 9):
            mgr.save(s, {"x": jnp.full(2, float(s))})
        assert mgr.all_steps() == [4, 9] and mgr.latest_step() == 9
        with pytest.raises(ValueError, match="must be greater than the latest checkpoint step 9"):
            mgr.save(9, {"x": jnp.zeros(2)})
        with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
            mgr.save(-1, {"x": jnp.zeros(2)})
        with pytest.raises(FileNotFoundError, match=r"available steps: \[4, 9\]"):
            mgr.restore({"x": jnp.zeros(2)}, step=1)
        assert float(mgr.restore({"x": jnp.zeros(2)}, step=4)["x"][0]) == 4.0
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 10, {"x": jnp.zeros(2)}, metadata={"f": object()})
    with pytest.raises(ValueError, match="`max_to_keep`"):
        CheckpointManager(tmp_path, max_to_keep=0)
    with CheckpointManager(tmp_path, read_only=True) as ro, pytest.raises(ValueError, match="read"):
        ro.save(20, {"x": jnp.zeros(2)})


def _hook_final_rename(step, action):
    """Patch orbax's commit (the rename of the step's temporary directory) for one step."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize
    calls = []

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            calls.append(self)
            action()
        return await original(self, *args, **kwargs)

    return atomicity.AtomicRenameTemporaryPath, finalize, calls


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = _fresh_state(0)
    save_checkpoint(tmp_path, 1, good, metadata=META)

    def fail():
        raise OSError("injected: disk full before commit")

    cls, finalize, calls = _hook_final_rename(2, fail)
    monkeypatch.setattr(cls, "finalize", finalize)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, 2, _fresh_state(5), metadata=META)
    assert len(calls) == 1, "the failure was not injected where intended"
    leftovers = [p for p in os.listdir(tmp_path) if "tmp" in p]
    assert leftovers, "the unfinished save should have left a temporary directory"
    monkeypatch.undo()

    assert latest_step(tmp_path) == 1 and all_steps(tmp_path) == [1]
    _assert_bit_identical(restore_checkpoint(tmp_path, _fresh_state(3), metadata=META), good)
    # the next save cleans the leftovers up and succeeds
    save_checkpoint(tmp_path, 2, _fresh_state(5), metadata=META)
    assert all_steps(tmp_path) == [1, 2]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


_CRASH_CHILD = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from dlrt_jax.checkpoint import save_checkpoint
    directory, mode = sys.argv[1], sys.argv[2]
    small = {"x": jnp.arange(5.0), "k": jax.random.key(1)}
    save_checkpoint(directory, 1, small, metadata={"run": "crash"})
    rng = np.random.default_rng(0)
    big = {"x": jnp.arange(5.0) + 1, "k": jax.random.key(2),
           "big": [jnp.asarray(rng.standard_normal((1024, 1024), dtype=np.float32))
                   for _ in range(16)]}
    if mode == "before_commit":
        from orbax.checkpoint._src.path import atomicity
        original = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if self.get_final().name == "2":
                print("BEFORE_COMMIT", flush=True)
                time.sleep(600)
            return await original(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    print("SAVING", flush=True)
    save_checkpoint(directory, 2, big, metadata={"run": "crash"})
    print("SAVED", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["during_write", "before_commit"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(tmp_path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        wanted = "BEFORE_COMMIT" if mode == "before_commit" else "SAVING"
        for line in proc.stdout:
            if line.strip() == wanted:
                break
        else:
            pytest.fail(f"child exited (rc={proc.wait()}) before printing {wanted}")
        if mode == "during_write":  # kill as soon as the temporary step directory has data
            deadline = time.monotonic() + 60
            while not any(p.startswith("2.") and "tmp" in p for p in os.listdir(tmp_path)):
                assert time.monotonic() < deadline, "the save never started"
                time.sleep(0.002)
            time.sleep(0.05)
        assert "2" not in os.listdir(tmp_path), "the save finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any("tmp" in p for p in os.listdir(tmp_path)), "no unfinished save was left behind"

    assert latest_step(tmp_path) == 1
    target = {"x": jnp.zeros(5), "k": jax.random.key(0)}
    out = restore_checkpoint(tmp_path, target, metadata={"run": "crash"})
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(5.0))
    np.testing.assert_array_equal(
        jax.random.key_data(out["k"]), jax.random.key_data(jax.random.key(1))
    )


def test_missing_orbax_names_the_install_line(monkeypatch):
    """issue 17, problem 4: an optional dependency fails with the pip line that installs it."""
    from dlrt_jax import checkpoint

    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # `import` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dlrt-jax\[checkpoint\]'"):
        checkpoint.CheckpointManager("unused", read_only=True)


def test_restore_prints_no_read_only_warning(tmp_path, caplog, capfd):
    """issue 17, problem 7: a restore printed orbax's `WARNING:absl:Given directory is read
    only`; it is dropped in our read-only open only, not globally."""
    import logging

    save_checkpoint(tmp_path, 0, {"x": jnp.arange(3.0)})
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        restored = restore_checkpoint(tmp_path, {"x": jnp.zeros(3)})
        assert latest_step(tmp_path) == 0
    out, err = capfd.readouterr()
    assert "read only" not in caplog.text + out + err
    assert restored["x"].tolist() == [0.0, 1.0, 2.0]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("Given directory is read only=%s", "elsewhere")
    assert "read only=elsewhere" in caplog.text  # the absl logger itself is untouched
