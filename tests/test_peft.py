"""The PEFT LoRA files: every option applied or refused by name, a root adapter peft can load."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from dlrt_jax import LowRank
from dlrt_jax.adapters import (
    LowRankAdapter,
    adapter_ranks,
    export_peft,
    import_peft,
    merge_adapters,
    to_adapters,
)

safetensors_numpy = pytest.importorskip("safetensors.numpy")

X = jax.random.normal(jax.random.key(5), (3, 6))


def _pretrained(use_bias=True):
    return nnx.Sequential(nnx.Linear(6, 4, use_bias=use_bias, rngs=nnx.Rngs(0)))


def _lora(seed=0, k=2, n=4, m=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, m)).astype(np.float32), rng.standard_normal((n, k)).astype(
        np.float32
    )


def _write(directory, config, tensors):
    """A PEFT adapter directory as peft's save_pretrained writes it (peft 0.22's keys)."""
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"]}
    (directory / "adapter_config.json").write_text(json.dumps({**base, **config}))
    safetensors_numpy.save_file(tensors, directory / "adapter_model.safetensors")


def _tensors(name="layers.0", seed=0, bias=False):
    A, B = _lora(seed)
    out = {f"base_model.model.{name}.lora_A.weight": A, f"base_model.model.{name}.lora_B.weight": B}
    if bias:
        b = np.random.default_rng(seed + 1).standard_normal(4).astype(np.float32)
        out[f"base_model.model.{name}.lora_B.bias"] = b
    return out


# ---- issue 17, problem 6: import_peft applies or refuses every option (was: silently ignored) ---


def test_lora_bias_is_applied_and_exported_back(tmp_path):
    """PEFT's forward with lora_bias: W0 x + b0 + scaling (B A x + b_B), scaling = alpha / r."""
    pretrained = _pretrained()
    tensors = _tensors(bias=True)
    _write(tmp_path, {"lora_bias": True}, tensors)
    loaded = import_peft(pretrained, tmp_path)
    A, B = (tensors[f"base_model.model.layers.0.lora_{ab}.weight"] for ab in "AB")
    b = tensors["base_model.model.layers.0.lora_B.bias"]
    expected = pretrained(X) + 2.0 * (X @ A.T @ B.T + b)
    chex.assert_trees_all_close(loaded(X), expected, atol=1e-5)
    chex.assert_trees_all_close(merge_adapters(loaded)(X), expected, atol=1e-5)
    fresh = _pretrained().layers[0].bias[...]
    chex.assert_trees_all_close(pretrained.layers[0].bias[...], fresh)  # the input is untouched

    out = tmp_path / "again"
    config = export_peft(loaded, out)  # written back as lora_B.bias, for the original base model
    written = safetensors_numpy.load_file(out / "adapter_model.safetensors")
    assert config["lora_bias"] is True
    np.testing.assert_allclose(written["base_model.model.layers.0.lora_B.bias"], b, rtol=1e-5)
    again = import_peft(_pretrained(), out)
    chex.assert_trees_all_close(again(X), expected, atol=1e-5)
    reloaded = import_peft(loaded, tmp_path)  # into the adapted model: folded once, not twice
    chex.assert_trees_all_close(reloaded(X), expected, atol=1e-5)
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain, {}, _tensors())  # the same A, B without a bias: the folded bias goes again
    chex.assert_trees_all_close(
        import_peft(loaded, plain)(X), pretrained(X) + 2.0 * X @ A.T @ B.T, atol=1e-5
    )


def test_lora_bias_without_a_base_bias_is_refused(tmp_path):
    _write(tmp_path, {"lora_bias": True}, _tensors(bias=True))
    with pytest.raises(ValueError, match=r"lora_bias.*'layers\.0' has no bias"):
        import_peft(_pretrained(use_bias=False), tmp_path)


@pytest.mark.parametrize(
    "option, words",
    [
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"use_dora": True}, "use_dora"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "lora_only"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights.*base weights"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"some_future_option": 3}, "some_future_option.*unknown PEFT option"),
        ({"lora_bias": False, "peft_type": "IA3"}, "peft_type"),
    ],
)
def test_options_that_change_the_function_are_refused_by_name(tmp_path, option, words):
    _write(tmp_path, option, _tensors())
    with pytest.raises(ValueError, match=words):
        import_peft(_pretrained(), tmp_path)


def test_informational_options_are_accepted(tmp_path):
    info = {
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.1,
        "inference_mode": False,
        "target_modules": "layers\\.0",  # PEFT's regex form: the tensors decide here
        "layers_to_transform": None,
        "init_lora_weights": "gaussian",
        "modules_to_save": None,
        "revision": "main",
        "peft_version": "0.22.0",
        "some_future_option": None,  # unknown but unset
    }
    _write(tmp_path, info, _tensors())
    A, B = _lora(0)
    chex.assert_trees_all_close(
        import_peft(_pretrained(), tmp_path)(X), _pretrained()(X) + 2.0 * X @ A.T @ B.T, atol=1e-5
    )


def test_unknown_tensors_are_refused_by_name(tmp_path):
    tensors = _tensors()
    tensors["base_model.model.layers.0.lora_magnitude_vector"] = np.ones(4, np.float32)
    tensors["base_model.model.layers.0.lora_B.bias"] = np.ones(4, np.float32)  # no lora_bias
    del tensors["base_model.model.layers.0.lora_B.weight"]
    _write(tmp_path, {}, tensors)
    with pytest.raises(ValueError) as err:
        import_peft(_pretrained(), tmp_path)
    msg = str(err.value)
    assert "'base_model.model.layers.0.lora_magnitude_vector'" in msg
    assert "'base_model.model.layers.0.lora_B.bias'" in msg
    assert "'layers.0' lacks its lora_B.weight" in msg


# ---- issue 17, problem 6: a root-module adapter exports in a form peft loads ---------------


def _peft_targets(config, module_names):
    """peft 0.22's matching (tuners_utils.inject_adapter / check_target_module_exists): the root
    module ('') is never a target; a list entry matches a name equal to it or ending in '.entry'."""
    targets = config["target_modules"]
    return [
        key
        for key in module_names
        if key and (key in targets or any(key.endswith(f".{t}") for t in targets))
    ]


def test_root_adapter_file_format(tmp_path):
    """An adapter on the model's root is written as module '0' (torch.nn.Sequential(layer)'s one
    child), not as '' (which peft skips): keys, config and matching as peft reads them."""
    pretrained = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    model = to_adapters(pretrained, rank=2, alpha=4.0)
    model.lora[...] = LowRank.random(jax.random.key(1), (4, 6), rank=2, capacity=2, scale=0.5)
    config = export_peft(model, tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config
    assert on_disk["target_modules"] == ["0"]
    assert on_disk["rank_pattern"] == {"0": 2} and on_disk["alpha_pattern"] == {"0": 4}
    assert on_disk["peft_type"] == "LORA" and on_disk["lora_bias"] is False
    tensors = safetensors_numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
    # torch.nn.Sequential(nn.Linear(6, 4)).named_modules() names '' and '0'
    assert _peft_targets(on_disk, ["", "0"]) == ["0"]
    A, B = tensors["base_model.model.0.lora_A.weight"], tensors["base_model.model.0.lora_B.weight"]
    scaling = on_disk["alpha_pattern"]["0"] / on_disk["rank_pattern"]["0"]
    np.testing.assert_allclose(
        pretrained(X) + scaling * X @ A.T @ B.T, model(X), atol=1e-5
    )  # PEFT's forward
    loaded = import_peft(pretrained, tmp_path)  # '0' is the root again
    assert isinstance(loaded, LowRankAdapter) and adapter_ranks(loaded) == {"<root>": 2}
    chex.assert_trees_all_close(loaded(X), model(X), atol=1e-5)


def test_round_trip_through_peft_itself(tmp_path):
    """Where torch and peft are installed: peft loads our export (root and nested adapters) and
    computes the same function; peft's save loads back here."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    def torch_linear(layer):
        t = torch.nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            t.weight.copy_(torch.tensor(np.asarray(layer.kernel[...]).T))
            t.bias.copy_(torch.tensor(np.asarray(layer.bias[...])))
        return t

    pretrained = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    model = to_adapters(pretrained, rank=2, alpha=4.0)
    model.lora[...] = LowRank.random(jax.random.key(1), (4, 6), rank=2, capacity=2, scale=0.5)
    export_peft(model, tmp_path / "ours")
    base = torch.nn.Sequential(torch_linear(pretrained))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    with torch.no_grad():
        y = peft_model(torch.tensor(np.asarray(X))).numpy()
    np.testing.assert_allclose(y, np.asarray(model(X)), atol=1e-5)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    back = import_peft(pretrained, tmp_path / "theirs")
    chex.assert_trees_all_close(back(X), model(X), atol=1e-5)


def test_patterned_rank_below_the_global_r_loads_into_a_small_layer(tmp_path):
    """r = 8 globally, rank_pattern 2 for a 4 x 6 layer: each adapter takes its module's rank (was:
    to_adapters(rank=8) refused the layer), and alpha / r is PEFT's scaling."""
    _write(
        tmp_path,
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"0": 2}, "alpha_pattern": {"0": 3}},
        _tensors(),
    )
    loaded = import_peft(_pretrained(), tmp_path)
    A, B = _lora(0)
    chex.assert_trees_all_close(loaded(X), _pretrained()(X) + 1.5 * X @ A.T @ B.T, atol=1e-5)
    adapter = loaded.layers[0]
    assert adapter.r == 2 and adapter.scale == 1.5


def test_modules_the_model_lacks_or_cannot_adapt_are_named(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(6, rngs=rngs)
            self.fc = nnx.Linear(6, 4, rngs=rngs)

    tensors = {**_tensors("norm"), **_tensors("head", seed=1), **_tensors("fc", seed=2)}
    _write(tmp_path, {}, tensors)
    with pytest.raises(ValueError) as err:
        import_peft(Net(nnx.Rngs(0)), tmp_path)
    msg = str(err.value)
    assert "nothing was loaded" in msg and "the model has no module at 'head'" in msg
    assert "module 'norm' cannot take an adapter: a normalisation layer" in msg
    assert "'fc'" not in msg  # the loadable module is not reported
