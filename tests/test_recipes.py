"""docs/recipes.md: every ``python`` block of the page runs, in order, in one namespace.

Blocks fenced as ``py`` (those that need the network) are shown but not run. The recipes carry
their own assertions; this test also checks that they agree with the library calls they stand
for (``member``/``stack_members``, ``mixed_apply``, the replicated data-parallel step).
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from dlrt_jax import ensemble, parallel

PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _blocks():
    return re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def namespace():
    pytest.importorskip("orbax.checkpoint", reason="the checkpoint recipe needs orbax")
    ns: dict = {}
    for i, code in enumerate(_blocks()):
        exec(compile(code, f"{PAGE}:block{i}", "exec"), ns)
    return ns


def test_page_has_runnable_blocks():
    assert len(_blocks()) >= 6
    assert "```py\n" in PAGE.read_text()  # the network block is shown, not run


def test_recipes_match_the_library(namespace):
    ns = namespace
    # ensembles: the recipe's stack_members / member are the library's
    for got, want in (
        (ns["stack_members"](ns["members"]), ensemble.stack_members(ns["members"])),
        (ns["member"](ns["stacked"], 1), ensemble.member(ns["stacked"], 1)),
    ):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the members really are different models: their ranks follow their own tau
    ranks = [int(r) for r in ns["stacked"]["w"].rank]
    assert ranks[0] >= ranks[1] >= ranks[2] and ranks[0] > ranks[2], ranks
    # data parallelism: the recipe's step equals dlrt_jax.parallel.data_parallel_step
    step = parallel.data_parallel_step(ns["tx"], ns["loss_fn"], parallel.make_mesh())
    params = ns["params"]
    p, s, loss = step(params, ns["tx"].init(params), ns["batch"])
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ns["loss"]), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(p["w"].to_dense()), np.asarray(ns["p"]["w"].to_dense()), rtol=1e-5, atol=1e-6
    )
