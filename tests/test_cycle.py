"""The augment-train-truncate cycle (``augment_every``) against the float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import LowRank

try:
    import reference as ref
except ImportError:  # pragma: no cover - depends on pytest's import mode
    from tests import reference as ref

N, M, R, CAP = 20, 16, 2, 8
TAU = 0.05


def _regression(rng):
    """Y = X W*^T + noise, W* of rank 4 with singular values 4, 3, 2, 1."""
    Uw, _, Vw = ref.random_lowrank(rng, N, M, 4)
    W_true = Uw @ np.diag([4.0, 3.0, 2.0, 1.0]) @ Vw.T
    X = rng.standard_normal((40, M))
    Y = X @ W_true.T + 0.01 * rng.standard_normal((40, N))
    loss_np, grad_np = ref.regression_loss(X, Y)

    def loss_j(p):
        W = p["w"].to_dense()
        return 0.5 * jnp.sum((jnp.asarray(X, W.dtype) @ W.T - jnp.asarray(Y, W.dtype)) ** 2)

    return grad_np, loss_j, 0.5 / np.linalg.norm(X, 2) ** 2


def _factor(U, S, V, dtype):
    x = LowRank(jnp.asarray(U, dtype), jnp.asarray(S, dtype), jnp.asarray(V, dtype), U.shape[1])
    return dlrt_jax.resize_capacity({"w": x}, None, CAP)[0]


REFERENCE_STEPS = {"bug": ref.adaptive_bug_step, "parallel_bug": ref.parallel_bug_step}


def _run(tx, params, loss_j, steps, use_jit):
    grad_fn = jax.grad(loss_j)
    state = tx.init(params)

    def step(p, s):
        updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if use_jit else step
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params["w"])
    return out, state


@pytest.mark.parametrize("name", sorted(REFERENCE_STEPS))
@pytest.mark.parametrize("k", [1, 3])
def test_cycle_matches_the_float64_reference(name, k):
    """Ranks and W = U S V^T after every step of two cycles and a bit, float64 on both sides."""
    steps = 2 * k + 1
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        grad_np, loss_j, h = _regression(rng)
        U, S, V = ref.random_lowrank(rng, N, M, R)
        augment = REFERENCE_STEPS[name]
        tx = getattr(dlrt_jax, name)(h, tau=TAU, min_rank=1, augment_every=k)
        xs, state = _run(tx, _factor(U, S, V, jnp.float64), loss_j, steps, use_jit=True)
        *_, history = ref.cycle(
            U, S, V, grad_np, h, TAU, k, steps, augment_step=augment, min_rank=1, max_rank=CAP
        )
        for t, (rank, W_ref) in enumerate(history):
            assert int(xs[t].rank) == rank, (t, int(xs[t].rank), [r for r, _ in history])
            W = np.asarray(xs[t].to_dense())
            assert np.linalg.norm(W - W_ref) / np.linalg.norm(W_ref) < 1e-9, t
        assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name", sorted(REFERENCE_STEPS))
def test_kls_coefficient_steps_match_the_float64_reference(name):
    """``coefficient_steps="KLS"``: the integrator's step at a fixed rank between augmentations,
    the paper's step (cut by tau) at each cycle's end; ranks and W after every step."""
    k, steps = 3, 7
    with jax.enable_x64(True):
        rng = np.random.default_rng(9)
        grad_np, loss_j, h = _regression(rng)
        U, S, V = ref.random_lowrank(rng, N, M, R)
        # tau 0.2 keeps 4r below m = 16: a fixed-rank step at rank 8 would augment to the whole
        # space, where the two sides' rank tolerances for [L1 | V] may differ (to 2e-5 here)
        tau = 0.2
        tx = getattr(dlrt_jax, name)(
            h, tau=tau, min_rank=1, augment_every=k, coefficient_steps="KLS"
        )
        xs, state = _run(tx, _factor(U, S, V, jnp.float64), loss_j, steps, use_jit=True)
        *_, history = ref.cycle(
            U, S, V, grad_np, h, tau, k, steps, augment_step=REFERENCE_STEPS[name], min_rank=1,
            max_rank=CAP, hold=True,
        )  # fmt: skip
        ranks = [r for r, _ in history]
        assert ranks[1] == ranks[0], ranks  # the step after an augmentation holds the rank
        for t, (rank, W_ref) in enumerate(history):
            assert int(xs[t].rank) == rank, (t, int(xs[t].rank), ranks)
            W = np.asarray(xs[t].to_dense())
            assert np.linalg.norm(W - W_ref) / np.linalg.norm(W_ref) < 1e-9, t
        assert int(state.num_skipped) == 0


def test_the_reference_cycle_of_one_step_is_the_integrator_step():
    rng = np.random.default_rng(4)
    grad_np, _, h = _regression(rng)
    U, S, V = ref.random_lowrank(rng, N, M, R)
    for name, step in REFERENCE_STEPS.items():
        Uc, Sc, Vc, _ = ref.cycle(U, S, V, grad_np, h, TAU, 1, 1, augment_step=step, min_rank=1)
        Ui, Si, Vi = step(U, S, V, grad_np, h, TAU, min_rank=1)
        np.testing.assert_allclose(Uc @ Sc @ Vc.T, Ui @ Si @ Vi.T, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", sorted(REFERENCE_STEPS))
def test_coefficient_steps_keep_the_bases_and_the_rank_and_one_trace(name):
    rng = np.random.default_rng(5)
    _, loss_j, h = _regression(rng)
    params = _factor(*ref.random_lowrank(rng, N, M, R), jnp.float32)
    k = 4
    tx = getattr(dlrt_jax, name)(optax.adam(1e-2), tau=TAU, min_rank=1, augment_every=k)
    grad_fn = jax.grad(loss_j)

    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)  # runs once per trace
        updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    xs = []
    for _ in range(2 * k):
        params, state = step(params, state)
        xs.append(params["w"])
    assert len(traces) == 1
    assert int(xs[0].rank) == 2 * R  # augmented, nothing cut
    for t in (1, 2):  # coefficient steps: bases and rank fixed, S moves
        np.testing.assert_array_equal(np.asarray(xs[t].U), np.asarray(xs[0].U))
        np.testing.assert_array_equal(np.asarray(xs[t].V), np.asarray(xs[0].V))
        assert int(xs[t].rank) == 2 * R
        assert not np.array_equal(np.asarray(xs[t].S), np.asarray(xs[t - 1].S))
    assert int(xs[3].rank) <= 2 * R  # the last step of the cycle truncates
    assert int(xs[4].rank) == min(2 * int(xs[3].rank), CAP)
    for x in xs:  # every step leaves orthonormal bases
        np.testing.assert_allclose(np.asarray(x.U.T @ x.U), np.eye(CAP), atol=1e-5)
        np.testing.assert_allclose(np.asarray(x.V.T @ x.V), np.eye(CAP), atol=1e-5)


def test_an_injected_cycle_length_matches_the_static_one():
    """``inject_hyperparams`` makes ``augment_every`` an array: the same steps, k = 1 included."""
    rng = np.random.default_rng(6)
    _, loss_j, h = _regression(rng)
    params = _factor(*ref.random_lowrank(rng, N, M, R), jnp.float32)
    for k in (1, 3):
        static, _ = _run(
            dlrt_jax.parallel_bug(h, tau=TAU, augment_every=k), params, loss_j, 5, True
        )
        inj = optax.inject_hyperparams(dlrt_jax.parallel_bug)(optimizer=h, tau=TAU, augment_every=k)
        injected, _ = _run(inj, params, loss_j, 5, True)
        for a, b in zip(static, injected):
            assert int(a.rank) == int(b.rank)
            np.testing.assert_allclose(
                np.asarray(a.to_dense()), np.asarray(b.to_dense()), atol=1e-5
            )


def _nu(state):
    """Adam's second moments of the S-step, per factor."""
    return np.asarray(state.factors[0].S[0].nu)


@pytest.mark.parametrize("k", [1, 3])
def test_new_moments_default_is_mean_in_a_cycle_and_zero_otherwise(k):
    """``new_moments``: the default is 'zero' for the paper's step and 'mean' in a cycle, static
    or injected; the two priors give different second moments once a basis has grown."""
    rng = np.random.default_rng(8)
    _, loss_j, _ = _regression(rng)
    params = _factor(*ref.random_lowrank(rng, N, M, R), jnp.float32)
    runs = {}
    for nm in (None, "zero", "mean"):
        tx = dlrt_jax.parallel_bug(optax.adam(0.05), tau=TAU, augment_every=k, new_moments=nm)
        runs[nm] = _run(tx, params, loss_j, 2 * k + 1, True)[1]
    default = "zero" if k == 1 else "mean"
    np.testing.assert_array_equal(_nu(runs[None]), _nu(runs[default]))
    assert np.max(np.abs(_nu(runs["zero"]) - _nu(runs["mean"]))) > 1e-6
    if k > 1:  # an injected cycle length makes the prior a traced bool
        inj = optax.inject_hyperparams(dlrt_jax.parallel_bug)(
            optimizer=optax.adam(0.05), tau=TAU, augment_every=k
        )
        injected = _run(inj, params, loss_j, 2 * k + 1, True)[1]
        np.testing.assert_allclose(
            _nu(injected.inner_state), _nu(runs["mean"]), rtol=1e-4, atol=1e-9
        )


def test_mean_second_moments_keep_bug_with_adam_from_diverging():
    """Rank-adaptive ``bug`` with Adam 0.1 on the README regression: zero second moments for the
    augmented directions make every new coordinate move by the learning rate at once, and the
    run diverges; the mean prior converges."""
    key = jax.random.key(0)
    X = jax.random.normal(key, (256, 40))
    A = jax.random.normal(jax.random.key(1), (30, 3)) @ jax.random.normal(
        jax.random.key(2), (3, 40)
    )
    Y = X @ (A / 10).T

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((p["w"](X) - Y) ** 2, axis=-1))

    final = {}
    for nm in ("zero", "mean"):
        tx = dlrt_jax.bug(optax.adam(0.1), tau=0.05, new_moments=nm)
        params = {"w": LowRank.random(key, (30, 40), rank=6, capacity=10)}
        step = dlrt_jax.make_train_step(loss, tx)
        state = tx.init(params)
        for _ in range(150):
            params, state, _ = step(params, state)
        final[nm] = float(loss(params))
    assert final["mean"] < 0.1 < 1.0 < final["zero"], final


def test_new_moments_and_coefficient_steps_are_validated():
    with pytest.raises(ValueError, match="new_moments"):
        dlrt_jax.parallel_bug(0.1, tau=0.1, new_moments="ones")
    with pytest.raises(ValueError, match="coefficient_steps"):
        dlrt_jax.bug(0.1, tau=0.1, augment_every=5, coefficient_steps="K")


def test_the_cycle_finds_the_rank_of_a_teacher_from_below_and_above():
    """A rank-4 regression teacher: starts at ranks 1 and 8 both end at rank 4 (SGD inside)."""
    rng = np.random.default_rng(7)
    _, loss_j, h = _regression(rng)
    for r0 in (1, 2 * CAP // 2):
        U, S, V = ref.random_lowrank(rng, N, M, r0)
        params = _factor(U, 0.1 * S, V, jnp.float32)
        tx = dlrt_jax.parallel_bug(h, tau=0.02, min_rank=1, augment_every=5)
        xs, _ = _run(tx, params, loss_j, 100, True)
        assert int(xs[-1].rank) == 4, (r0, [int(x.rank) for x in xs[4::5]])


def test_cycle_arguments_are_validated():
    with pytest.raises(ValueError, match="augment_every"):
        dlrt_jax.parallel_bug(0.1, tau=0.1, augment_every=0)
    with pytest.raises(ValueError, match="needs a rank-adaptive"):
        dlrt_jax.bug(0.1, augment_every=5)
    with pytest.raises(ValueError, match="two truncation schedules"):
        dlrt_jax.parallel_bug(0.1, tau=0.1, augment_every=5, truncate_every=5)


def test_geolora_runs_the_cycle_and_refuses_it_with_a_budget():
    from flax import nnx

    from dlrt_jax.adapters import geolora, to_adapters
    from dlrt_jax.nnx import train_step

    pretrained = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
    ka, kb, kx = jax.random.split(jax.random.key(1), 3)
    delta = jax.random.normal(ka, (10, 2)) @ jax.random.normal(kb, (2, 12)) / 3
    x = jax.random.normal(kx, (32, 12))
    y = pretrained(x) + x @ delta.T
    model = to_adapters(pretrained, rank=1, capacity=4)
    optimizer = nnx.Optimizer(model, geolora(0.1, tau=0.05, augment_every=5), wrt=nnx.Param)
    loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)  # noqa: E731
    step = nnx.jit(lambda m, o, b: train_step(m, o, loss_fn, b))
    losses, ranks = [], []
    for _ in range(40):
        losses.append(float(step(model, optimizer, (x, y))))
        ranks.append(int(model.rank))
    assert ranks[0] == 2 and ranks[1] == 2  # augmented from 1, kept through the coefficient step
    assert losses[-1] < 0.2 * losses[0], losses
    with pytest.raises(ValueError, match="budget"):
        geolora(0.1, budget=1000, augment_every=5)
