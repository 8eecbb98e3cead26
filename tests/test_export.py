"""Every integrator's jitted train step exports for GPU and TPU from this CPU machine (issue 16).

``jax.export`` lowers a program for platforms other than the one it runs on; a host callback in
the step (a ``jax.debug.callback``) makes that fail ("the platform for the specified backend cpu
is different from the lowering platform cuda") and would cost a device-to-host round-trip per
step on an accelerator. The step must hold none.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import dlrt_jax

N, M, CAP = 8, 6, 3

INTEGRATORS = {
    "bug": lambda: dlrt_jax.bug(optax.adam(1e-2), tau=0.1),
    "bug_fixed": lambda: dlrt_jax.bug(optax.adam(1e-2)),
    "parallel_bug": lambda: dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.1),
    "projector_splitting": lambda: dlrt_jax.projector_splitting(optax.adam(1e-2)),
    "s_only": lambda: dlrt_jax.s_only(optax.adam(1e-2)),
}


def _loss(params, x, y):
    return jnp.mean((dlrt_jax.lowrank_apply(params["w"], x) + params["b"] - y) ** 2)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_the_jitted_step_exports_for_cuda_and_tpu_without_host_callbacks(name):
    tx = INTEGRATORS[name]()
    params = {"w": dlrt_jax.LowRank.random(jax.random.key(0), (N, M), rank=2, capacity=CAP)}
    params["b"] = jnp.zeros((N,))
    step = dlrt_jax.make_train_step(_loss, tx)
    args = (params, tx.init(params), jnp.zeros((4, M)), jnp.zeros((4, N)))
    exported = jax.export.export(step, platforms=["cuda", "tpu"])(*_abstract(args))
    assert exported.platforms == ("cuda", "tpu")
    text = exported.mlir_module()
    targets = re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text)
    targets += re.findall(r'call_target_name = "([^"]+)"', text)
    assert not [t for t in targets if "callback" in t.lower()], targets
    assert not re.search(r"python_(cpu|gpu|tpu)?_?callback", text)  # any Python callback target
    if name != "s_only":  # the integrators that move bases factorise on the device
        assert targets, "expected the solver calls of the QR / SVD in the module"
    # the exported step is the same program: its outputs have the step's shapes
    out_avals = jax.tree.map(lambda a: (a.shape, a.dtype), exported.out_avals)
    expected = jax.eval_shape(step, *args)
    assert out_avals == tuple((a.shape, a.dtype) for a in jax.tree.leaves(expected))
