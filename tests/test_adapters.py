"""Rank-adaptive adapters: step-0 identity, learning from S = 0, merge, PEFT files, rank budget."""

import json
import pathlib
import re
import sys
import tomllib
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dlrt_jax
from dlrt_jax import LowRank
from dlrt_jax.adapters import (
    FrozenParam,
    LowRankAdapter,
    adapter_parameters,
    adapter_ranks,
    budget_cost,
    export_peft,
    geolora,
    import_peft,
    merge_adapters,
    to_adapters,
    with_rank_budget,
)
from dlrt_jax.nnx import DLRTOptimizer, train_step

safetensors_numpy = pytest.importorskip("safetensors.numpy")

D = 16


class Block(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(7, D, rngs=rngs)
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, D, decode=False, rngs=rngs)
        self.fc1 = nnx.Linear(D, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, D, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.ln(x))
        return x + self.fc2(nnx.relu(self.fc1(x)))


TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])


def _randomise(model, seed=0, ranks=(3, 1, 2, 4, 2, 1)):
    """Give every adapter a random non-zero factor (distinct ranks), as after training."""
    for i, (_, a) in enumerate(
        (p, n) for p, n in nnx.iter_graph(model) if isinstance(n, LowRankAdapter)
    ):
        k = min(ranks[i % len(ranks)], a.capacity)
        key = jax.random.key(seed + i)
        a.lora[...] = LowRank.random(key, a.factor.shape, rank=k, capacity=a.capacity, scale=0.3)


# ---- adapter mode --------------------------------------------------------------------------------


def test_adapted_model_equals_pretrained_at_step_zero_and_trains_only_adapters():
    pretrained = Block(nnx.Rngs(0))
    model, summary = to_adapters(pretrained, rank=2, alpha=4.0, report=True)
    chex.assert_trees_all_close(model(TOKENS), pretrained(TOKENS), atol=0, rtol=0)
    adapted = {r.path for r in summary.converted}
    assert adapted == {"attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"}
    notes = {r.path: r.note for r in summary.skipped}
    assert "embedding" in notes["embed"] and "normalisation" in notes["ln"]
    trained = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert trained and all(path[-1] == "lora" for path in trained)
    assert len(trained) == 6
    frozen = nnx.state(model, FrozenParam)
    assert {path[0] for path, _ in nnx.to_flat_state(frozen)} >= {"embed", "ln", "attn", "fc1"}
    a = model.attn.query
    assert a.scale == 2.0 and a.r == 2 and int(a.rank) == 2
    assert float(jnp.abs(a.factor.S).max()) == 0.0
    # the pretrained model is untouched
    assert isinstance(pretrained.fc1.kernel, nnx.Param) and isinstance(pretrained.fc1, nnx.Linear)


def test_filter_and_what_cannot_take_an_adapter():
    model, summary = to_adapters(Block(nnx.Rngs(0)), filter="query|value", rank=2, report=True)
    assert [r.path for r in summary.converted] == ["attn/query", "attn/value"]
    assert "excluded by `filter`" in {r.path: r.note for r in summary.skipped}["fc1"]
    assert isinstance(model.fc1.kernel, FrozenParam)  # frozen, not trained
    with pytest.raises(ValueError, match="selected no"):
        to_adapters(Block(nnx.Rngs(0)), filter="nothing_here")
    with pytest.raises(ValueError, match="rank"):
        to_adapters(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=5)


def test_merge_equals_forward():
    model = to_adapters(Block(nnx.Rngs(0)), rank=2)
    _randomise(model)
    merged = merge_adapters(model)
    chex.assert_trees_all_close(merged(TOKENS), model(TOKENS), atol=1e-5)
    assert type(merged.attn.out) is nnx.LinearGeneral and type(merged.fc1) is nnx.Linear
    assert isinstance(merged.attn.out.kernel, nnx.Param)
    assert isinstance(merged.embed.embedding, nnx.Param)  # unfrozen again
    delta = merged.fc1.kernel[...] - model.fc1.base.kernel[...]
    assert float(jnp.abs(delta).max()) > 1e-3  # the adapter was folded in


def test_einsum_and_general_axes_adapters_merge():
    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Einsum("btd,ndh->btnh", (2, D, 4), (2, 4), rngs=rngs)
            self.mix = nnx.LinearGeneral(5, 3, axis=1, rngs=rngs)  # contracts the time axis

        def __call__(self, x):
            return self.mix(self.proj(x))

    pretrained = Heads(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    with pytest.warns(UserWarning, match=r"'mix' \(3 x 5\) has capacity 2"):  # 2 c > 5
        model = to_adapters(pretrained, rank=2)
    assert isinstance(model.proj, LowRankAdapter) and model.proj.factor.shape == (8, D)
    chex.assert_trees_all_close(model(x), pretrained(x), atol=0, rtol=0)
    _randomise(model)
    assert float(jnp.abs(model(x) - pretrained(x)).max()) > 1e-3
    merged = merge_adapters(model)
    assert type(merged.proj) is nnx.Einsum and type(merged.mix) is nnx.LinearGeneral
    chex.assert_trees_all_close(merged(x), model(x), atol=1e-5)


def test_adapter_learns_from_zero_core_with_parallel_bug():
    """S = 0 at the start does not stall the integrator: the gradient directions enter at once."""
    pretrained = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
    key_x, key_a, key_b = jax.random.split(jax.random.key(1), 3)
    delta = jax.random.normal(key_a, (10, 2)) @ jax.random.normal(key_b, (2, 12)) / 3
    x = jax.random.normal(key_x, (64, 12))
    y = pretrained(x) + x @ delta.T
    model = to_adapters(pretrained, rank=2)
    optimizer = DLRTOptimizer(model, geolora(1e-1, tau=0.05))
    loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)  # noqa: E731
    step = nnx.jit(chex.assert_max_traces(n=1)(lambda m, o, b: train_step(m, o, loss_fn, b)))
    first = float(step(model, optimizer, (x, y)))
    for _ in range(60):
        loss = float(step(model, optimizer, (x, y)))
    assert loss < 1e-2 * first, (first, loss)
    assert int(model.rank) == 2  # the rank of the change, found from S = 0 at rank 2
    chex.assert_trees_all_close(model.base.kernel[...], pretrained.kernel[...])  # W0 frozen


@pytest.mark.parametrize(
    "make_tx, factor",
    [
        pytest.param(lambda: dlrt_jax.bug(optax.adam(1e-1), tau=0.05), 0.1, id="bug"),
        pytest.param(lambda: dlrt_jax.projector_splitting(optax.adam(1e-1)), 0.1, id="ksl"),
        # s_only keeps the random bases of S = 0: it fits what the change has in their span
        pytest.param(lambda: dlrt_jax.s_only(optax.adam(1e-1)), 0.999, id="s_only"),
    ],
)
def test_every_integrator_trains_an_adapter_from_zero_core(make_tx, factor):
    pretrained = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
    ka, kb, kx = jax.random.split(jax.random.key(1), 3)
    delta = jax.random.normal(ka, (10, 2)) @ jax.random.normal(kb, (2, 12)) / 3
    x = jax.random.normal(kx, (32, 12))
    y = pretrained(x) + x @ delta.T
    model = to_adapters(pretrained, rank=2)
    optimizer = DLRTOptimizer(model, make_tx())
    loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)  # noqa: E731
    step = nnx.jit(lambda m, o, b: train_step(m, o, loss_fn, b))
    losses = [float(step(model, optimizer, (x, y))) for _ in range(40)]
    assert np.all(np.isfinite(losses)) and losses[-1] < factor * losses[0], losses
    U = model.factor.U
    chex.assert_trees_all_close(U.T @ U, jnp.eye(model.capacity), atol=1e-5)


# ---- PEFT layout ---------------------------------------------------------------------------------


def test_peft_round_trip(tmp_path):
    pretrained = Block(nnx.Rngs(0))
    model = to_adapters(pretrained, rank=4, alpha=8.0)
    _randomise(model)
    config = export_peft(model, tmp_path, base_model_name_or_path="tiny-block")
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config
    names = ["attn.key", "attn.out", "attn.query", "attn.value", "fc1", "fc2"]
    assert on_disk["peft_type"] == "LORA" and on_disk["target_modules"] == names
    assert on_disk["r"] == 4 and on_disk["lora_alpha"] == 8
    assert on_disk["base_model_name_or_path"] == "tiny-block"
    assert on_disk["bias"] == "none" and on_disk["use_rslora"] is False
    ranks = {k.replace("/", "."): v for k, v in adapter_ranks(model).items()}
    assert on_disk["rank_pattern"] == ranks and len(set(ranks.values())) > 1
    assert on_disk["alpha_pattern"] == {k: 2 * v for k, v in ranks.items()}  # (alpha / r) k

    tensors = safetensors_numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    for name, (n, m) in [
        ("attn.query", (D, D)),
        ("attn.out", (D, D)),
        ("fc1", (24, D)),
        ("fc2", (D, 24)),
    ]:
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        k = ranks[name]
        assert A.shape == (k, m) and B.shape == (n, k)  # torch Linear weights: (out, in)
        # PEFT's forward: W0 + (alpha_pattern / rank_pattern) B A
        layer = model
        for part in name.split("."):
            layer = getattr(layer, part)
        scaling = on_disk["alpha_pattern"][name] / on_disk["rank_pattern"][name]
        W0 = layer.matricisation.to_matrix(layer.base.kernel[...])
        np.testing.assert_allclose(W0 + scaling * B @ A, layer.merged_matrix(), atol=1e-5)

    loaded = import_peft(Block(nnx.Rngs(0)), tmp_path)
    chex.assert_trees_all_close(loaded(TOKENS), model(TOKENS), atol=1e-5)
    assert adapter_ranks(loaded) == adapter_ranks(model)
    assert all(path[-1] == "lora" for path, _ in nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    again = import_peft(to_adapters(pretrained, rank=2, alpha=1.0), tmp_path)  # other scale
    chex.assert_trees_all_close(again(TOKENS), model(TOKENS), atol=1e-5)


def test_peft_patterns_resolve_to_their_own_module(tmp_path):
    """PEFT takes the first rank_pattern key matching the end of a name: 'fc1' must not shadow
    'inner.fc1' (another rank)."""

    class Inner(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 8, rngs=rngs)

    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 8, rngs=rngs)
            self.inner = Inner(rngs)

        def __call__(self, x):
            return self.inner.fc1(self.fc1(x))

    model = to_adapters(Outer(nnx.Rngs(0)), rank=1)
    model.fc1.lora[...] = LowRank.random(jax.random.key(0), (8, 8), rank=1, capacity=2)
    model.inner.fc1.lora[...] = LowRank.random(jax.random.key(1), (8, 8), rank=2, capacity=2)
    config = export_peft(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    for name, rank in [("fc1", 1), ("inner.fc1", 2)]:
        first = next(key for key in pattern if re.match(rf"(.*\.)?({key})$", name))
        assert first == name and pattern[first] == rank == config["rank_pattern"][name]


def test_peft_import_rejects_what_it_cannot_represent(tmp_path):
    model = to_adapters(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=2)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lora_A"):
        import_peft(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), tmp_path)


# ---- global rank budget --------------------------------------------------------------------------


def _two_layer_problem():
    """Two 20 x 20 factors whose targets have very different spectra (rank 6 vs rank 1)."""
    ka, kb, k1, k2 = jax.random.split(jax.random.key(3), 4)
    Ta = LowRank.random(
        ka, (20, 20), rank=6, capacity=6, singular_values=jnp.array([5.0, 4.0, 3.5, 3.0, 2.5, 2.0])
    ).to_dense()
    Tb = LowRank.random(
        kb, (20, 20), rank=1, capacity=1, singular_values=jnp.array([4.5])
    ).to_dense()
    params = {
        "a": LowRank.random(k1, (20, 20), rank=2, capacity=8, scale=0.01),
        "b": LowRank.random(k2, (20, 20), rank=2, capacity=8, scale=0.01),
    }

    def loss(p):
        return 0.5 * jnp.sum((p["a"].to_dense() - Ta) ** 2) + 0.5 * jnp.sum(
            (p["b"].to_dense() - Tb) ** 2
        )

    return params, loss


def _is_sorted_diagonal(S):
    S = np.asarray(S)
    d = np.diag(S)
    return np.allclose(S, np.diag(d), atol=1e-6) and np.all(np.diff(d) <= 1e-6) and np.all(d >= 0)


def test_budget_is_respected_and_allocates_by_spectrum():
    params, loss = _two_layer_problem()
    budget = 6 * 40  # six rank units of n + m = 40 parameters
    tx = with_rank_budget(dlrt_jax.parallel_bug(0.5, tau=0.0, min_rank=1), budget)
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    costs = []
    for _ in range(12):
        params, state = step(params, state)
        costs.append(budget_cost(params))
        for f in params.values():
            assert _is_sorted_diagonal(f.S)
    ranks = {k: int(f.active_rank) for k, f in params.items()}
    assert max(costs) <= budget
    assert ranks["a"] > ranks["b"] >= 1 and ranks["a"] + ranks["b"] == 6, ranks
    assert float(loss(params)) < 0.2 * float(loss(_two_layer_problem()[0]))


def test_budget_rediagonalises_a_fixed_rank_core_without_changing_w():
    params, loss = _two_layer_problem()
    inner = dlrt_jax.projector_splitting(0.1)
    grad_fn = jax.grad(loss)
    ref, _ = inner.update(grad_fn(params), inner.init(params), params, grad_fn=grad_fn)
    ref = optax.apply_updates(params, ref)
    tx = with_rank_budget(dlrt_jax.projector_splitting(0.1), budget=10_000)
    updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    new = optax.apply_updates(params, updates)
    for k in params:
        assert not _is_sorted_diagonal(ref[k].S)  # the KSL core is triangular, not diagonal
        assert _is_sorted_diagonal(new[k].S)
        chex.assert_trees_all_close(new[k].to_dense(), ref[k].to_dense(), atol=1e-5)
        chex.assert_trees_all_close(new[k].U.T @ new[k].U, jnp.eye(8), atol=1e-5)


def test_budget_validation():
    params, _ = _two_layer_problem()
    with pytest.raises(ValueError, match="cannot pay"):
        with_rank_budget(dlrt_jax.parallel_bug(0.1, tau=0.1), budget=50).init(params)
    with pytest.raises(ValueError, match="positive integer"):
        with_rank_budget(dlrt_jax.parallel_bug(0.1, tau=0.1), budget=0)
    with pytest.raises(TypeError, match="DLRT optax transform"):
        with_rank_budget("parallel_bug", budget=100)


class TwoBranches(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 16, rngs=rngs)
        self.b = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.a(x), self.b(x)], axis=-1)


def test_adapters_under_a_budget_get_different_ranks():
    """The change of branch a has rank 5, of branch b rank 1: the budget goes to a."""
    pretrained = TwoBranches(nnx.Rngs(0))
    ka, kb, kx = jax.random.split(jax.random.key(0), 3)
    sv_a = jnp.array([3.0, 2.8, 2.6, 2.4, 2.2])
    Da = LowRank.random(ka, (16, 16), rank=5, capacity=5, singular_values=sv_a).to_dense()
    Db = LowRank.random(kb, (16, 16), rank=1, capacity=1, singular_values=jnp.array([3.0]))
    x = jax.random.normal(kx, (64, 16))
    y = jnp.concatenate([pretrained.a(x) + x @ Da.T, pretrained.b(x) + x @ Db.to_dense().T], -1)
    model = to_adapters(pretrained, rank=4)
    budget = 5 * 32  # five rank units of n + m = 32
    # SGD keeps the singular values of different layers comparable (Adam moves every direction
    # by about the learning rate, whatever its gradient)
    tx = geolora(tau=0.0, budget=budget, optimizer=optax.sgd(0.5))
    optimizer = DLRTOptimizer(model, tx)
    loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)  # noqa: E731
    step = nnx.jit(lambda m, o, b: train_step(m, o, loss_fn, b))
    first = float(step(model, optimizer, (x, y)))
    for _ in range(10):
        loss = float(step(model, optimizer, (x, y)))
    assert adapter_ranks(model) == {"a": 4, "b": 1}
    assert adapter_parameters(model) <= budget and loss < first


# ---- README --------------------------------------------------------------------------------------


def test_without_safetensors_the_error_names_the_readmes_install_line(monkeypatch, tmp_path):
    """issue 17, problem 4: the Adapters section gives its install line before its block, that
    extra holds safetensors, and without safetensors the error names the same extra."""
    root = pathlib.Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Adapters (GeoLoRA-style)", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert section.index("```bash") < section.index("```python")
    install = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    extra = re.fullmatch(r'pip install "\.\[(\w+)\]".*', install.strip()).group(1)
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "safetensors" in extras["optional-dependencies"][extra]
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    model = to_adapters(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=2)
    line = rf'pip install "dlrt-jax\[{extra}\]".*pip install "\.\[{extra}\]"'
    with pytest.raises(ImportError, match=line):
        export_peft(model, tmp_path)
    with pytest.raises(ImportError, match=line):
        import_peft(model, tmp_path)


def test_readme_adapter_workflow_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Adapters (GeoLoRA-style)", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert len(block.strip().splitlines()) < 15
    exec(compile(block, "README.md", "exec"), {})


# ---- issue 17, problem 6: per-layer rank / capacity, a warning for what geolora cannot train -----


def test_per_layer_rank_and_capacity_by_path_pattern():
    """PEFT's rank_pattern rule: a key matches the end of the dotted module name at a '.'; the
    first matching key wins; unmatched layers take the default."""
    model, summary = to_adapters(
        Block(nnx.Rngs(0)),
        rank={"attn.query": 3, "query|key": 2, "fc1": 5, "out": 4},
        capacity={"fc1": 7, "out": 4},
        report=True,
    )
    got = {r.path: (r.rank, r.capacity) for r in summary.converted}
    assert got == {
        "attn/query": (3, 6),  # the first matching key, not 'query|key'
        "attn/key": (2, 4),  # default capacity max(r, min(2 r, floor(min(n, m) / 2)))
        "attn/value": (8, 8),  # no key: rank 8
        "attn/out": (4, 4),
        "fc1": (5, 7),
        "fc2": (8, 8),
    }
    assert model.fc1.r == 5 and model.fc1.scale == 1.0  # alpha defaults to each layer's rank


def test_per_layer_pattern_errors():
    with pytest.raises(ValueError, match=r"rank\['fc3'\].*match no adapted layer"):
        to_adapters(Block(nnx.Rngs(0)), rank={"fc3": 2})
    with pytest.raises(ValueError, match="`capacity` must be an integer in"):
        to_adapters(Block(nnx.Rngs(0)), rank={"fc1": 4}, capacity={"fc1": 2})


def test_capacity_geolora_cannot_train_warns_at_conversion():
    pretrained = nnx.Sequential(
        nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1))
    )
    with pytest.warns(UserWarning, match=r"'layers/0' \(4 x 6\) has capacity 3 > .* = 2.*geolora"):
        model = to_adapters(pretrained, rank={"0": 3, "1": 2})
    with pytest.raises(ValueError, match="augments the bases"):  # what the warning foretells
        DLRTOptimizer(model, geolora(1e-2, tau=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fix the warning names converts without one
        to_adapters(pretrained, rank={"0": 2, "1": 2})


# ---- issue 17, code review: one validation layer (the core's integer check, rank rule) ----


def test_adapters_and_application_use_the_cores_integer_check(tmp_path):
    import dlrt_jax._factors as core
    from dlrt_jax import adapters, checkpoint
    from dlrt_jax.mnist import data, models

    for module in (adapters, data, models, checkpoint):
        assert module._check_int is core._check_int, module.__name__
    assert not hasattr(adapters, "_is_int") and not hasattr(models, "_check_positive_int")
    # the same message everywhere: the argument, its bounds, the value
    cases = [
        (lambda: data.num_batches(10, 2.5), "`batch_size` must be an integer >= 1, got 2.5."),
        (lambda: models.init_mlp(jax.random.key(0), 0), "`width` must be an integer >= 1, got 0."),
        (lambda: checkpoint._check_step(-1), "`step` must be an integer >= 0, got -1."),
        (
            lambda: to_adapters(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=5),
            "`rank` must be an integer in [1, min(n, m)=3], got 5.",
        ),
        (
            lambda: LowRankAdapter(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), rank=3, capacity=2),
            "`capacity` must be an integer in [3, min(n, m)=8], got 2.",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    with pytest.raises(
        ValueError, match=re.escape("`rank` must be an integer in [1, min(n, m)=20]")
    ):
        models.init_lenet5(jax.random.key(0), rank=21)  # conv1 is 20 x 25
