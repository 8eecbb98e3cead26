"""CapacityPolicy: the band rule, and a run whose ranks move compiles once per bucket it visits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dlrt_jax
from dlrt_jax import CapacityPolicy, LowRank


def _factor(rank, capacity, shape=(64, 48)):
    return LowRank.random(
        jax.random.key(rank * 100 + capacity), shape, rank=rank, capacity=capacity
    )


def test_target_is_the_bucket_above_headroom_and_free_columns():
    p = CapacityPolicy(headroom=1.25, min_free=8, multiple=16)
    assert p.target(_factor(5, 24)) == 16  # max(ceil(6.25), 13) = 13 -> 16
    assert p.target(_factor(20, 24)) == 24  # max(25, 28) = 28 -> 32, clipped to min(64, 48) // 2
    assert p.target(_factor(20, 24), rank=2) == 16
    big = CapacityPolicy(headroom=2.0, min_free=0, multiple=8, max_capacity=12)
    assert big.target(_factor(5, 24)) == 12  # 10 -> 16, clipped to max_capacity


def test_band_grows_at_once_and_shrinks_only_two_buckets_over():
    p = CapacityPolicy(headroom=1.0, min_free=4, multiple=8)
    x = _factor(3, 16)
    # target(r) = bucket(r + 4): r = 4 -> 8, r = 5 -> 16, r = 12 -> 16, r = 13 -> 24
    assert p.needs_resize(x, rank=13)  # 16 < 24: grow
    assert not p.needs_resize(x, rank=12)
    assert not p.needs_resize(x, rank=5)
    assert not p.needs_resize(x, rank=4)  # 16 == 8 + 8: one bucket over is tolerated
    assert p.needs_resize(_factor(3, 20), rank=4)  # 20 > 8 + 8: two buckets over, shrink
    with pytest.raises(ValueError, match="headroom"):
        CapacityPolicy(headroom=0.5)
    with pytest.raises(ValueError, match="every"):
        CapacityPolicy(every=0)
    with pytest.raises(ValueError, match="multiple"):
        CapacityPolicy(multiple=0)


def test_call_checks_only_every_k_steps_and_keeps_w_and_state():
    params = {"w": _factor(3, 24), "b": jnp.zeros(64)}
    tx = dlrt_jax.parallel_bug(optax.adam(1e-2), tau=0.1)
    state = tx.init(params)
    policy = CapacityPolicy(every=5, headroom=1.0, min_free=2, multiple=4)
    same = policy(4, params, state)
    assert same[0] is params and same[1] is state and not same[2]
    new, new_state, resized = policy(5, params, state)
    assert resized and new["w"].capacity == 8  # bucket(3 + 2) = 8
    np.testing.assert_allclose(new["w"].to_dense(), params["w"].to_dense(), atol=1e-6)
    assert new_state.factors[0].S[0].mu.shape == (8, 8)
    assert policy(10, new, new_state)[2] is False  # in band now


def test_a_run_whose_ranks_move_compiles_once_per_bucket():
    """Regression onto a rank-2 target from rank 24: the rank falls, the capacity follows it in
    a few buckets, and the jitted step compiles exactly once per distinct capacity."""
    n, m = 64, 48
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    A = (jax.random.normal(k1, (n, 2)) @ jax.random.normal(k2, (2, m))) / 4
    X = jax.random.normal(k3, (128, m))
    Y = X @ A.T

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((p["w"](X) - Y) ** 2, axis=-1))

    params = {"w": LowRank.random(jax.random.key(0), (n, m), rank=24, capacity=24)}
    tx = dlrt_jax.parallel_bug(optax.sgd(0.3), tau=0.05)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(p["w"].capacity)
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    policy = CapacityPolicy(every=5, headroom=1.25, min_free=2, multiple=4)
    caps, ranks = [], []
    for i in range(1, 121):
        params, state = step(params, state)
        params, state, _ = policy(i, params, state)
        caps.append(params["w"].capacity)
        ranks.append(int(params["w"].rank))
    assert ranks[0] > 2 and ranks[-1] == 2, ranks[::10]
    assert caps[-1] == 4  # bucket(max(ceil(2.5), 4)) = 4
    assert len(traces) == len(set(caps)) + (24 not in caps)  # one compile per capacity visited
    assert len(traces) <= 5
    assert float(loss(params)) < 1e-3


def test_truncate_every_k_steps_lets_the_rank_grow_between_truncations():
    n, m = 24, 20
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    A = jax.random.normal(k1, (n, 2)) @ jax.random.normal(k2, (2, m))
    X = jax.random.normal(k3, (64, m))

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((p["w"](X) - X @ A.T) ** 2, axis=-1))

    def make_step(tx):
        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        return step

    params = {"w": LowRank.random(jax.random.key(0), (n, m), rank=2, capacity=8)}
    tx = dlrt_jax.parallel_bug(optax.adam(0.01), tau=0.2, truncate_every=4)
    state, step = tx.init(params), make_step(tx)
    ranks = []
    for _ in range(12):
        params, state = step(params, state)
        ranks.append(int(params["w"].rank))
    # steps 1-3, 5-7, 9-11 keep everything up to the capacity; steps 4, 8, 12 truncate
    assert ranks[2] == ranks[6] == ranks[10] == 8, ranks
    assert all(ranks[i] < 8 for i in (3, 7, 11)), ranks
    # the same through optax.inject_hyperparams (truncate_every becomes an array)
    inj = optax.inject_hyperparams(dlrt_jax.parallel_bug)(
        optimizer=optax.adam(0.01), tau=0.2, truncate_every=4
    )
    p = {"w": LowRank.random(jax.random.key(0), (n, m), rank=2, capacity=8)}
    s, inj_step = inj.init(p), make_step(inj)
    inj_ranks = []
    for _ in range(4):
        p, s = inj_step(p, s)
        inj_ranks.append(int(p["w"].rank))
    assert inj_ranks == ranks[:4]
    with pytest.raises(ValueError, match="truncate_every"):
        dlrt_jax.parallel_bug(0.1, tau=0.1, truncate_every=0)


def test_lowrank_truncate_applies_the_rule_and_keeps_w_to_the_tail():
    s = jnp.array([3.0, 1.0, 0.2, 0.01])
    w = LowRank.random(jax.random.key(1), (10, 9), rank=4, capacity=6, singular_values=s)
    # rotate S so that the truncation needs the SVD (a non-diagonal core)
    Q = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (6, 6)))[0]
    mask = (jnp.arange(6) < 4)[:, None] & (jnp.arange(6) < 4)[None, :]
    Qa = jnp.where(mask, Q, jnp.eye(6))  # keep the active block separate from the inactive one
    Qa = jnp.linalg.qr(Qa)[0]
    w2 = LowRank(w.U @ Qa, Qa.T @ w.S @ Qa, w.V @ Qa, 4)
    np.testing.assert_allclose(w2.to_dense(), w.to_dense(), atol=1e-5)
    t = w2.truncate(0.05)  # tail [0.2, 0.01] has norm 0.2 > 0.05 * ||s||: keeps 3
    assert int(t.rank) == 3 and t.capacity == 6
    err = float(jnp.linalg.norm(t.to_dense() - w.to_dense()))
    np.testing.assert_allclose(err, 0.01, rtol=1e-3)
    assert int(w2.truncate(0.2, min_rank=1).rank) == 2  # tail 0.2002 <= 0.2 * 3.17
    assert int(jax.jit(lambda x: x.truncate(0.05))(w2).rank) == 3


def test_a_falling_rank_waits_to_settle_unless_the_capacity_is_twice_the_target():
    p = CapacityPolicy(headroom=1.0, min_free=4, multiple=8)  # shrink_at = 1.5
    x = _factor(3, 32, shape=(128, 96))  # target(r) = bucket(r + 4)
    assert p.needs_resize(x, rank=4) and p.needs_resize(x, rank=4, falling=True)  # 32 > 2 * 8
    assert p.needs_resize(x, rank=9) and not p.needs_resize(x, rank=9, falling=True)  # t = 16
    assert not p.needs_resize(x, rank=13)  # t = 24: one bucket over
    assert p.needs_resize(x, rank=30, falling=True)  # growing is never deferred
    fine = CapacityPolicy(headroom=1.0, min_free=4, multiple=4)
    assert not fine.needs_resize(x, rank=13, falling=True)  # t = 20: 32 <= 2 * 20, wait
    assert fine.needs_resize(x, rank=13)  # settled: 32 >= 1.5 * 20, shrink


def test_observe_lets_the_first_check_see_a_rank_falling_from_the_start():
    """A run that starts at rank = capacity: with the start observed, a rank already far below it
    at the first check is falling, so the policy waits instead of compiling an intermediate
    capacity; without, the first check takes the rank as settled and resizes."""
    start = {"w": _factor(32, 32, shape=(128, 96))}
    params = {"w": _factor(9, 32, shape=(128, 96))}  # target bucket(13) = 16, 32 <= 2 * 16
    policy = CapacityPolicy(every=1, headroom=1.0, min_free=4, multiple=8)
    policy.observe(start)
    params, _, resized = policy(1, params)
    assert not resized and params["w"].capacity == 32
    params, _, resized = policy(2, params)  # the same rank: settled, 32 >= 1.5 * 16
    assert resized and params["w"].capacity == 16
    unprimed = CapacityPolicy(every=1, headroom=1.0, min_free=4, multiple=8)
    assert unprimed(1, {"w": _factor(9, 32, shape=(128, 96))})[2]


def test_a_small_saving_does_not_buy_a_compile():
    """Two buckets over, but less than shrink_at times the target: the capacity stays (a resize
    costs a compile, the smaller step saves little); a larger shrink_at keeps more."""
    x = _factor(30, 56, shape=(128, 128))
    p = CapacityPolicy(headroom=1.0, min_free=8, multiple=8)
    assert p.target(x, rank=34) == 48 and not p.needs_resize(x, rank=34)  # 56 < 1.5 * 48
    assert p.target(x, rank=30) == 40 and not p.needs_resize(x, rank=30)  # 56 < 1.5 * 40
    assert p.target(x, rank=28) == 40 and not p.needs_resize(x, rank=28)
    assert p.target(x, rank=24) == 32 and p.needs_resize(x, rank=24)  # 56 >= 1.5 * 32
    assert not CapacityPolicy(min_free=8, shrink_at=2.0).needs_resize(x, rank=24)
    with pytest.raises(ValueError, match="shrink_at"):
        CapacityPolicy(shrink_at=1.0)
