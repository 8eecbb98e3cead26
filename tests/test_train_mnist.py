"""Tests of dlrt_jax.models (parameter counts, the three weight kinds) and dlrt_jax.train_mnist."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank
from dlrt_jax.mnist import models
from dlrt_jax.mnist import train as train_mnist

# ---- parameter counting against the paper's tables (dlrt.md section 4) --------------------------

# (width, ranks, eval compression % from the paper's result files)
MLP_ROWS = [
    (500, [176, 170, 171, 174], 34.96),
    (500, [52, 67, 73, 72], 75.26),
    (500, [35, 53, 51, 46], 82.57),
    (500, [13, 21, 24, 20], 92.44),
    (784, [56, 67, 63, 59], 84.11),
    (784, [17, 23, 22, 23], 94.28),
]
# LeNet5 ranks (conv1, conv2, fc1) -> eval compression % with r(n + m)
LENET_ROWS = [([10, 23, 62], 77.1), ([8, 8, 15], 93.2), ([2, 2, 3], 97.7)]


def _factor(n, m, r):
    """A LowRank of shape (n, m) and rank r with zero entries (counting needs only the shapes)."""
    return LowRank(jnp.zeros((n, r)), jnp.zeros((r, r)), jnp.zeros((m, r)), r)


def _mlp(width, ranks):
    shapes = [(width, 784)] + [(width, width)] * 3
    layers = [
        {"w": _factor(n, m, r), "b": jnp.zeros(n)} for (n, m), r in zip(shapes, ranks, strict=False)
    ]
    return layers + [{"w": jnp.zeros((10, width)), "b": jnp.zeros(10)}]


def _lenet(ranks):
    shapes = models.LENET5_SHAPES
    layers = [
        {"w": _factor(n, m, r), "b": jnp.zeros(n)} for (n, m), r in zip(shapes, ranks, strict=False)
    ]
    return layers + [{"w": jnp.zeros(shapes[3]), "b": jnp.zeros(10)}]


def test_dense_weight_count_of_the_paper_models():
    assert models.dense_param_count(_mlp(500, [4] * 4)) == 1_147_000  # 784*500 + 3*500^2 + 5000
    assert models.dense_param_count(_lenet([2, 2, 2])) == 430_500  # 500 + 25000 + 400000 + 5000
    # the real initialisers build the same shapes (traced abstractly: nothing is computed)
    mlp = jax.eval_shape(lambda k: models.init_mlp(k, 500), jax.random.key(0))
    assert models.dense_param_count(mlp) == 1_147_000
    lenet = jax.eval_shape(lambda k: models.init_lenet5(k, dense=True), jax.random.key(0))
    assert [layer["w"].shape for layer in lenet] == list(models.LENET5_SHAPES)
    assert models.dense_param_count(lenet) == 430_500


@pytest.mark.parametrize("width,ranks,paper", MLP_ROWS)
def test_mlp_eval_compression_matches_paper(width, ranks, paper):
    counts = models.param_counts(_mlp(width, ranks))
    assert counts["ranks"] == ranks
    assert round(100 * counts["eval_compression"], 2) == paper


def test_mlp_counts_by_hand():
    ranks = [52, 67, 73, 72]
    counts = models.param_counts(_mlp(500, ranks))
    # r(n + m): 52 * (500 + 784) + (67 + 73 + 72) * 1000, plus the dense 10 x 500 classifier
    assert counts["eval_params"] == 66_768 + 212_000 + 5_000
    # 2nr + 4r^2 + 2rm per factored layer
    train = 2 * 500 * 52 + 4 * 52**2 + 2 * 52 * 784
    train += sum(2 * 500 * r + 4 * r**2 + 2 * r * 500 for r in ranks[1:])
    assert counts["train_params"] == train + 5_000
    assert counts["train_compression"] == pytest.approx(1 - (train + 5_000) / 1_147_000)


@pytest.mark.parametrize("ranks,paper", LENET_ROWS)
def test_lenet_eval_compression_matches_paper(ranks, paper):
    counts = models.param_counts(_lenet(ranks))
    assert round(100 * counts["eval_compression"], 1) == paper


def test_counts_of_dense_and_uv_models():
    key = jax.random.key(0)  # shapes are all the counts need: trace abstractly
    dense = models.param_counts(jax.eval_shape(lambda k: models.init_mlp(k, 40, dense=True), key))
    assert dense["eval_params"] == dense["dense_params"] == 784 * 40 + 3 * 1600 + 400
    assert dense["eval_compression"] == 0.0 and dense["ranks"] == []
    uv_params = jax.eval_shape(lambda k: models.init_lenet5(k, rank=[3, 4, 5], uv=True), key)
    assert isinstance(uv_params[0]["w"], models.Factorized)
    uv = models.param_counts(uv_params)
    expected = 3 * 45 + 4 * 550 + 5 * 1300 + 5000
    assert uv["ranks"] == [3, 4, 5]
    assert uv["eval_params"] == uv["train_params"] == expected


# ---- models -------------------------------------------------------------------------------------


def test_adaptive_init_starts_at_half_capacity_with_cap():
    key = jax.random.key(0)
    p = jax.eval_shape(lambda k: models.init_mlp(k, 500), key)
    assert [layer["w"].capacity for layer in p[:4]] == [250] * 4
    p = jax.eval_shape(lambda k: models.init_mlp(k, 500, max_rank=100), key)
    assert [layer["w"].capacity for layer in p[:4]] == [100] * 4
    lenet = jax.eval_shape(lambda k: models.init_lenet5(k, max_rank=20), key)
    assert [layer["w"].capacity for layer in lenet[:3]] == [10, 20, 20]
    small = models.init_mlp(key, 40)  # rank = capacity = 20 at the start
    assert models.layer_ranks(small) == [20] * 4
    assert [layer["w"].capacity for layer in small[:4]] == [20] * 4
    with pytest.raises(ValueError, match="rank"):
        models.init_lenet5(jax.random.key(0), rank=21)  # conv1 is 20 x 25


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_three_weight_kinds_agree_at_init(model):
    """Dense, U V^T and LowRank variants are built from the same factors: same function at init."""
    key = jax.random.key(3)
    x = jax.random.uniform(jax.random.key(4), (3, 28, 28))
    if model == "mlp":
        init, apply, x = models.init_mlp, models.mlp_apply, x.reshape(3, -1)
        kw = {"width": 24}
    else:
        init, apply, kw = models.init_lenet5, models.lenet5_apply, {}
    ref = apply(init(key, **kw), x)
    assert (
        float(jnp.max(jnp.abs(ref))) > 1e-3
    )  # a nonzero output, so the comparison means something
    for variant in ({"dense": True}, {"uv": True}):
        np.testing.assert_allclose(apply(init(key, **kw, **variant), x), ref, atol=1e-5, rtol=1e-4)


def test_lowrank_conv_gradients_are_the_dlrt_projections():
    """grad.U = G V, grad.V = G^T U for conv2 (G from the dense model): checks the conv phi."""
    params = models.init_lenet5(jax.random.key(0), rank=[4, 6, 8])
    dense = [dict(layer) for layer in params]
    dense[1]["w"] = params[1]["w"].to_dense()
    batch = (jax.random.uniform(jax.random.key(1), (5, 28, 28)), jnp.arange(5))
    loss = models.cross_entropy_loss(models.lenet5_apply)
    grad = jax.jit(jax.grad(loss))
    g = grad(params, batch)[1]["w"]
    G = grad(dense, batch)[1]["w"]
    w = params[1]["w"]
    scale = float(jnp.max(jnp.abs(G @ w.V)))
    assert scale > 1e-6
    np.testing.assert_allclose(g.U, G @ w.V, atol=1e-4 * scale)
    np.testing.assert_allclose(g.V, G.T @ w.U, atol=1e-4 * scale)


def test_uv_gets_true_gradients():
    params = models.init_mlp(jax.random.key(0), 16, rank=3, uv=True)
    assert isinstance(params[1]["w"], models.Factorized)
    batch = (jax.random.uniform(jax.random.key(1), (4, 784)), jnp.arange(4))
    loss = models.cross_entropy_loss(models.mlp_apply)
    g = jax.grad(loss)(params, batch)[1]["w"]
    dense = [dict(layer) for layer in params]
    dense[1]["w"] = params[1]["w"].U @ params[1]["w"].V.T
    G = jax.grad(loss)(dense, batch)[1]["w"]
    np.testing.assert_allclose(g.U, G @ params[1]["w"].V, atol=1e-6)
    np.testing.assert_allclose(g.V, G.T @ params[1]["w"].U, atol=1e-6)


def test_decayed_singular_values():
    """s_k / d^k with k = 0..r-1 (the paper's code): the largest value is not damped."""
    key = jax.random.key(0)
    plain = models.init_lenet5(key, rank=20, uv=True)[2]["w"]
    decayed = models.init_lenet5(key, rank=20, uv=True, decay=2.0)[2]["w"]
    s_plain = np.asarray(jnp.sum(plain.U**2, axis=0))  # = s_k, as U_f = U sqrt(S)
    s_decayed = np.asarray(jnp.sum(decayed.U**2, axis=0))
    np.testing.assert_allclose(s_decayed, s_plain / 2.0 ** np.arange(20), rtol=1e-4)
    assert np.all(np.diff(s_plain) <= 1e-6)  # sorted, descending
    lowrank = models.init_lenet5(key, rank=20, decay=2.0)[2]["w"]
    np.testing.assert_allclose(np.diagonal(lowrank.S), s_decayed, rtol=1e-4)


# ---- the training entry point -------------------------------------------------------------------


def test_build_transform_rejects_unknown_and_missing_tau():
    with pytest.raises(ValueError, match="integrator"):
        train_mnist.build_transform("nope", 0.1)
    with pytest.raises(ValueError, match="tau"):
        train_mnist.build_transform("bug", 0.1, tau=None)
    tx, needs = train_mnist.build_transform("parallel_bug", 0.1, tau=0.1)
    assert not needs


def test_jitted_step_traces_once_per_capacity_set():
    params = models.init_mlp(jax.random.key(0), 16)
    tx, _ = train_mnist.build_transform("parallel_bug", optax.adam(1e-3), tau=0.1)
    step = train_mnist.make_step(models.cross_entropy_loss(models.mlp_apply), tx)
    state = tx.init(params)
    batch = (jax.random.uniform(jax.random.key(1), (8, 784)), jnp.arange(8) % 10)
    for _ in range(3):
        params, state, _ = step(params, state, batch)
    assert step._cache_size() == 1
    params, state = dlrt_jax.resize_capacity(params, state, lambda x: int(x.rank))
    for _ in range(2):
        params, state, _ = step(params, state, batch)
    assert step._cache_size() == 2


def _data_dir():
    d = os.environ.get("DLRT_DATA_DIR")
    if not d or not (Path(d) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real MNIST not available: set DLRT_DATA_DIR to the directory holding mnist/")
    return d


def test_main_quick_run_on_real_mnist(tmp_path):
    data_dir = _data_dir()
    argv = ["--subset", "2048", "--epochs", "1", "--width", "64", "--batch-size", "16"]
    argv += ["--lr", "3e-3"]  # 128 steps; the paper's 1e-3 needs more for this tiny network
    argv += ["--data-dir", data_dir, "--out", str(tmp_path), "--no-progress"]
    results = train_mnist.run(argv)
    json_path, png_path = Path(results["paths"]["json"]), Path(results["paths"]["png"])
    assert json_path.parent == tmp_path and png_path.is_file() and png_path.stat().st_size > 1000
    saved = json.loads(json_path.read_text())
    final = saved["final"]
    assert final["test_acc"] > 0.4, final  # chance is 0.1; this run reaches about 0.6
    assert len(saved["history"]) == 2 and saved["history"][1]["steps"] == 2048 // 16
    caps = final["capacities"]
    assert len(final["ranks"]) == 4
    for r, c in zip(final["ranks"], caps, strict=True):
        assert 2 <= r <= c <= 32  # min_rank <= rank <= capacity <= floor(64 / 2)
    assert final["ranks"] != [32, 32, 32, 32]  # tau = 0.09 truncates the random start
    assert 0.0 < final["eval_compression"] < 1.0
    assert saved["environment"]["jax"] == jax.__version__
    assert saved["config"]["integrator"] == "parallel_bug"  # the default
    assert saved["config"]["factor_lr"] == pytest.approx(3 * 3e-3)  # FACTOR_LR_SCALE x --lr
    h = saved["history"][1]
    assert h["compiled_steps"] == h["num_resizes"] + 1  # one compile per capacity set


def test_main_returns_none_for_the_console_script(tmp_path):
    data_dir = _data_dir()
    argv = ["--subset", "256", "--epochs", "1", "--width", "16", "--integrator", "ksl"]
    argv += ["--rank", "4", "--data-dir", data_dir, "--out", str(tmp_path), "--no-progress"]
    assert train_mnist.main(argv) is None  # console scripts call sys.exit(main())
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["final"]["ranks"] == [4, 4, 4, 4]  # fixed rank


def test_train_with_a_capacity_policy_follows_the_rank_with_bounded_compiles():
    """A run whose ranks fall: the policy shrinks the capacities in a few buckets and the step
    compiles once per set of capacities it visits."""
    key = jax.random.key(0)
    x = jax.random.uniform(key, (512, 784))
    y = (jnp.arange(512) % 10).astype(jnp.int32)
    data = (np.asarray(x), np.asarray(y), np.asarray(x[:64]), np.asarray(y[:64]))
    params = models.init_mlp(jax.random.key(1), 64, scale=0.1)  # rank = capacity = 32
    tx, needs = train_mnist.build_transform(
        "parallel_bug", optax.adam(1e-2), tau=0.2, other_optimizer=optax.adam(1e-3)
    )
    policy = dlrt_jax.CapacityPolicy(every=4, headroom=1.25, min_free=2, multiple=8)
    result = train_mnist.train(
        params,
        tx,
        apply_fn=models.mlp_apply,
        data=data,
        epochs=2,
        batch_size=32,
        needs_grad_fn=needs,
        progress=False,
        capacity_policy=policy,
    )
    last = result.history[-1]
    assert max(last["capacities"]) < 32, last  # shrunk
    assert last["num_resizes"] >= 1  # cumulative over the run
    assert 2 <= last["compiled_steps"] <= 1 + last["num_resizes"]  # once per capacity set
    for r, c in zip(last["ranks"], last["capacities"], strict=True):
        assert r <= c <= policy.target(_factor(64, 64, c), rank=r) + policy.multiple


# ---- command line: messages, defaults ----------------------------------------------------------


def _fake_mnist(data_dir=None, *, subset=None):
    """A tiny random stand-in for load_mnist (no files needed)."""
    rng = np.random.default_rng(0)
    x = rng.random((96, 784), dtype=np.float32)
    y = rng.integers(0, 10, 96).astype(np.int32)
    return x[:64], y[:64], x[64:], y[64:]


def test_cli_missing_data_exits_with_a_message_naming_the_option(monkeypatch, tmp_path):
    def no_download(data_dir=None, *, subset=None):
        return dlrt_jax.data.load_dataset("mnist", data_dir, download=False)

    monkeypatch.setattr(train_mnist, "load_mnist", no_download)
    argv = ["--data-dir", str(tmp_path), "--epochs", "1", "--width", "16", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        train_mnist.run([*argv, "--out", str(tmp_path)])
    message = exc.value.code
    assert isinstance(message, str)  # printed by the interpreter, exit status 1
    assert "train-images-idx3-ubyte.gz" in message  # the data module's message is kept
    assert "--data-dir" in message and "DLRT_DATA_DIR" in message
    assert "data_dir=" not in message  # the Python argument name means nothing on the CLI
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no traceback chain


def test_cli_help_shows_the_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        train_mnist.run(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 10)", "(default: 256)", "(default: 500)", "(default 0.09)"):
        assert text in out, text
    tau_help = "--tau TAU relative truncation tolerance in (0, 1) of the rank-adaptive"
    assert f"{tau_help} integrators (default 0.09); an error with the fixed-rank" in out
    assert "(default: None)" not in out.split("--tau")[2].split("--integrator")[0]
    assert "dense: the same MLP with dense weights (Glorot-uniform) trained by Adam at --lr" in out
    assert "--no-compile-cache" in out and "~/.cache/dlrt_jax/jax" in out


def test_cli_tau_with_a_fixed_rank_integrator_is_an_error(monkeypatch):
    monkeypatch.setattr(train_mnist, "load_mnist", _fake_mnist)
    with pytest.raises(SystemExit, match="--tau applies to the rank-adaptive integrators"):
        train_mnist.run(["--integrator", "ksl", "--tau", "0.1"])
    with pytest.raises(SystemExit, match=r"--tau must be in \(0, 1\)"):
        train_mnist.run(["--integrator", "bug", "--tau", "1.5"])


def test_cli_fixed_rank_default_gives_positive_train_compression(monkeypatch, tmp_path):
    # width 200: the adaptive start floor(200 / 2) = 100 would train 100 * 400 + 100^2 = 50,000
    # parameters per 200 x 200 layer (more than its 40,000); the fixed-rank default is 32
    monkeypatch.setattr(train_mnist, "load_mnist", _fake_mnist)
    argv = ["--integrator", "bug_fixed", "--epochs", "1", "--width", "200", "--batch-size", "32"]
    results = train_mnist.run([*argv, "--no-progress", "--out", str(tmp_path)])
    final = results["final"]
    assert final["ranks"] == [32, 32, 32, 32] and results["config"]["rank"] == 32
    assert final["train_compression"] > 0 and final["eval_compression"] > 0
    assert results["config"]["tau"] == 0.09  # resolved, though a fixed-rank run does not use it
    assert train_mnist._parser().parse_args(["--width", "64"]).rank is None


def test_cli_preset_paper_selects_the_reference_dynamics(tmp_path):
    data_dir = _data_dir()
    argv = ["--subset", "256", "--epochs", "1", "--width", "16", "--preset", "paper"]
    argv += ["--data-dir", data_dir, "--out", str(tmp_path), "--no-progress"]
    saved = train_mnist.run(argv)
    config = saved["config"]
    assert config["integrator"] == "bug" and config["inner"] == "reference"
    assert config["factor_lr"] == config["lr"] and config["init_scale"] == 1
    assert 2 <= min(saved["final"]["ranks"]) <= max(saved["final"]["ranks"]) <= 8


# ---- the dense baseline and the compilation cache (issue 16) ------------------------------------


@pytest.fixture(autouse=True)
def _private_compile_cache(monkeypatch, tmp_path):
    """Runs of the CLI cache their compiles in the test's own directory, not the user's."""
    monkeypatch.setenv(train_mnist.COMPILE_CACHE_ENV_VAR, str(tmp_path / "jax-cache"))


def _dense_argv(out, *extra):
    argv = ["--integrator", "dense", "--epochs", "1", "--width", "16", "--batch-size", "32"]
    return argv + ["--out", str(out), "--no-progress", *extra]


def test_cli_dense_baseline_runs_the_same_pipeline(monkeypatch, tmp_path):
    monkeypatch.setattr(train_mnist, "load_mnist", _fake_mnist)
    results = train_mnist.run(_dense_argv(tmp_path / "out"))
    final, history = results["final"], results["history"]
    assert final["ranks"] == [] and final["capacities"] == []
    dense = 784 * 16 + 3 * 16 * 16 + 16 * 10
    assert final["eval_params"] == final["train_params"] == final["dense_params"] == dense
    assert history[1]["steps"] == 2 and history[1]["test_loss"] != history[0]["test_loss"]
    assert Path(results["paths"]["json"]).name == "mnist_dense_adam_w16.json"
    assert Path(results["paths"]["png"]).is_file()
    assert results["config"]["integrator"] == "dense" and final["wall_time_s"] > 0
    # the transform is Adam at --lr on every leaf
    tx, _ = train_mnist.build_transform("dense", 0.1, other_optimizer=optax.adam(1e-3))
    p, g = {"w": jnp.ones((2, 2))}, {"w": jnp.full((2, 2), 5.0)}
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u["w"], -1e-3 * np.ones((2, 2)), rtol=1e-4)  # Adam's first step
    for flag in ("--tau", "--rank", "--max-rank"):
        with pytest.raises(SystemExit, match=f"{flag} applies to the low-rank integrators"):
            train_mnist.run(_dense_argv(tmp_path, flag, "4"))


def test_compile_cache_makes_a_second_run_compile_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(train_mnist, "load_mnist", _fake_mnist)
    cache = tmp_path / "cache"
    before = jax.config.jax_compilation_cache_dir
    jax.clear_caches()  # each run as in a new process: nothing compiled in memory
    train_mnist.run(_dense_argv(tmp_path / "a", "--compile-cache", str(cache)))
    files = set(cache.iterdir())
    assert any(f.name.startswith("jit_step") for f in files), sorted(f.name for f in files)
    assert jax.config.jax_compilation_cache_dir == before  # the settings come back
    jax.clear_caches()
    events = []

    def listen(name, **kwargs):
        events.append(name)

    jax.monitoring.register_event_listener(listen)
    try:
        train_mnist.run(_dense_argv(tmp_path / "b", "--compile-cache", str(cache)))
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert "/jax/compilation_cache/cache_hits" in events
    assert "/jax/compilation_cache/cache_misses" not in events
    assert set(cache.iterdir()) == files
    # --no-compile-cache: the default directory ($DLRT_COMPILE_CACHE here) is not touched
    default = Path(os.environ[train_mnist.COMPILE_CACHE_ENV_VAR])
    train_mnist.run(_dense_argv(tmp_path / "c", "--no-compile-cache"))
    assert not default.exists()
    train_mnist.run(_dense_argv(tmp_path / "d"))
    assert any(default.iterdir())  # on by default


def test_cli_augment_every_runs_the_cycle_and_checks_its_arguments(tmp_path):
    base = ["--subset", "512", "--epochs", "1", "--width", "32", "--batch-size", "32"]
    base += ["--data-dir", _data_dir(), "--out", str(tmp_path), "--no-progress"]
    results = train_mnist.run(base + ["--augment-every", "4", "--check-every", "8"])
    saved = json.loads(Path(results["paths"]["json"]).read_text())
    assert saved["config"]["augment_every"] == 4
    assert saved["history"][1]["steps"] == 16 and saved["history"][1]["num_skipped"] == 0
    with pytest.raises(SystemExit, match="multiple of --augment-every"):
        train_mnist.run(base + ["--augment-every", "4", "--check-every", "6"])
    with pytest.raises(SystemExit, match="pass one of them"):
        train_mnist.run(base + ["--augment-every", "4", "--truncate-every", "4"])


def test_train_reports_a_fault_the_steps_recorded_at_the_end_of_the_epoch():
    """A transform after DLRT corrupts the factors; the jitted steps only record it, and the
    training loop raises at the epoch's end, naming the cause."""
    rng = np.random.default_rng(0)
    data = (
        rng.random((64, 784), dtype=np.float32),
        rng.integers(0, 10, 64).astype(np.int32),
        rng.random((16, 784), dtype=np.float32),
        rng.integers(0, 10, 16).astype(np.int32),
    )
    params = models.init_mlp(jax.random.key(0), 16, max_rank=4)
    tx = optax.chain(dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.1), optax.scale(0.5))
    with pytest.raises(ValueError, match="must be the last member"):
        train_mnist.train(
            params, tx, apply_fn=models.mlp_apply, data=data, epochs=1, batch_size=16,
            progress=False,
        )  # fmt: skip
