import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.sampling import SOLVERS, guided_field, model_velocity, time_grid

ADAPTIVE = [s for s in SOLVERS if s != "euler"]


def test_euler_closed_form_linear_field():
    a, x0, n = -1.3, jnp.asarray([1.0, 2.0]), 16
    x1, stats = rfdit.solve(lambda t, x: a * x, x0, solver="euler", num_steps=n)
    np.testing.assert_allclose(x1, x0 * (1 + a / n) ** n, rtol=1e-6)
    assert int(stats["nfe"]) == n


def test_euler_matches_hand_written_loop_bit_for_bit(getkey):
    w = jr.normal(getkey(), (6, 6)) * 0.5
    field = lambda t, x: jnp.tanh(x @ w) * (1 + t)
    x0 = jr.normal(getkey(), (3, 6))
    n = 10
    out, _ = rfdit.solve(field, x0, solver="euler", num_steps=n)

    @jax.jit
    def hand(x):
        ts = jnp.asarray(np.linspace(0.0, 1.0, n + 1))
        step = lambda i, x: x + field(ts[i], x) * (ts[i + 1] - ts[i])
        return jax.lax.fori_loop(0, n, step, x)

    assert jnp.array_equal(out, hand(x0))


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_reach_exponential(solver):
    a, x0 = 1.7, jnp.asarray([0.5, -1.0, 2.0])
    x1, stats = rfdit.solve(lambda t, x: a * x, x0, solver=solver, rtol=1e-6, atol=1e-6)
    assert int(stats["result"]) == 0
    rel = float(jnp.linalg.norm(x1 - x0 * np.exp(a)) / jnp.linalg.norm(x0 * np.exp(a)))
    assert rel < 1e-4  # local tolerance 1e-6 over a few dozen steps
    assert int(stats["num_accepted_steps"]) > 0


def test_adaptive_euler_is_refused():
    with pytest.raises(ValueError, match="euler has no error estimate"):
        rfdit.solve(lambda t, x: x, jnp.ones(2), solver="euler", rtol=1e-3)
    with pytest.raises(ValueError, match="exactly one of"):
        rfdit.solve(lambda t, x: x, jnp.ones(2), solver="heun")
    with pytest.raises(ValueError, match="valid solvers"):
        rfdit.solve(lambda t, x: x, jnp.ones(2), solver="rk4", num_steps=3)


def counting_field(a):
    # Counts real evaluations on the host, independently of the solver's bookkeeping.
    calls = []

    def field(t, x):
        jax.debug.callback(lambda: calls.append(1), ordered=False)
        return a * x * jnp.cos(3 * t)

    return field, calls


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_nfe_counts_every_evaluation_fixed(solver):
    field, calls = counting_field(1.0)
    _, stats = rfdit.solve(field, jnp.ones(3), solver=solver, num_steps=7)
    jax.effects_barrier()
    assert int(stats["nfe"]) == len(calls)


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_nfe_counts_every_evaluation_adaptive(solver):
    field, calls = counting_field(4.0)
    _, stats = rfdit.solve(field, jnp.ones(3), solver=solver, rtol=1e-5, atol=1e-5)
    jax.effects_barrier()
    assert int(stats["num_rejected_steps"]) >= 0
    assert int(stats["nfe"]) == len(calls)


def test_nfe_includes_rejected_steps():
    # a stiff-ish start forces rejections
    field, calls = counting_field(30.0)
    _, stats = rfdit.solve(field, jnp.ones(2), solver="dopri5", rtol=1e-8, atol=1e-8)
    jax.effects_barrier()
    assert int(stats["num_rejected_steps"]) > 0
    assert int(stats["nfe"]) == len(calls)


def test_time_grid_shift():
    np.testing.assert_allclose(time_grid(4), [0, 0.25, 0.5, 0.75, 1.0])
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and np.all(np.diff(shifted) > 0)
    sigma = 0.75
    assert shifted[1] == pytest.approx(1 - 3 * sigma / (1 + 2 * sigma))
    assert np.all(shifted[1:-1] < time_grid(4)[1:-1])  # more steps near noise (t = 0)


def test_solve_on_user_grid_and_trajectory():
    ts = [0.0, 0.1, 0.5, 1.0]
    x1, stats = rfdit.solve(lambda t, x: jnp.ones_like(x), jnp.zeros(2), solver="heun", ts=ts, save_ts=[0.25, 0.5])
    np.testing.assert_allclose(x1, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats["ys"][:, 0], [0.25, 0.5], rtol=1e-6)


def tiny_model(key):
    cfg = rfdit.DiTConfig(image_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                          mlp_ratio=1.0, num_classes=3)
    model = rfdit.DiT(cfg, key=key)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jr.split(key, len(leaves))
    leaves = [x + 0.02 * jr.normal(k, x.shape) if isinstance(x, jax.Array) else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_guidance_algebra(getkey):
    model = tiny_model(getkey())
    x = jr.normal(getkey(), (5, 4, 4, 2))
    labels = jnp.asarray([0, 1, 2, 0, 1])
    t = jnp.asarray(0.3)
    cond = jax.jit(jax.vmap(lambda x, y: model_velocity(model, x, t, y)))(x, labels)
    uncond = jax.jit(jax.vmap(lambda x: model_velocity(model, x, t, jnp.asarray(3))))(x)
    guided = eqx.filter_jit(lambda s, **kw: guided_field(model, labels, s, **kw)(t, x))
    s1, s0, s4 = guided(jnp.asarray(1.0)), guided(jnp.asarray(0.0)), guided(jnp.asarray(4.0))
    np.testing.assert_allclose(s1, cond, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s0, uncond, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s4, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    outside = guided(jnp.asarray(4.0), guidance_interval=(0.5, 1.0))
    np.testing.assert_allclose(outside, cond, rtol=1e-5, atol=1e-6)
    three = guided(jnp.asarray(4.0), cfg_channels=1)
    np.testing.assert_allclose(three[..., 1:], cond[..., 1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(three[..., :1], s4[..., :1], rtol=1e-5, atol=1e-6)


def test_sample_euler_and_dopri5(getkey):
    model = tiny_model(getkey())
    noise, labels = jr.normal(getkey(), (4, 4, 4, 2)), jnp.arange(4) % 3
    images, stats = rfdit.sample(model, noise, labels, cfg_scale=2.0, solver="euler", num_steps=8)
    assert images.shape == noise.shape and int(stats["nfe"]) == 8
    ref, _ = rfdit.sample(model, noise, labels, cfg_scale=2.0, solver="dopri8", rtol=1e-7, atol=1e-7)
    adaptive, stats = rfdit.sample(model, noise, labels, cfg_scale=2.0, solver="dopri5", rtol=1e-4, atol=1e-4)
    assert int(stats["result"]) == 0
    assert float(jnp.sqrt(jnp.mean((adaptive - ref) ** 2))) < 1e-2
    assert float(jnp.sqrt(jnp.mean((images - ref) ** 2))) > float(jnp.sqrt(jnp.mean((adaptive - ref) ** 2)))


def test_sample_per_sample_adaptive(getkey):
    model = tiny_model(getkey())
    noise, labels = jr.normal(getkey(), (3, 4, 4, 2)), jnp.arange(3)
    batch, batch_stats = rfdit.sample(model, noise, labels, solver="tsit5", rtol=1e-5, atol=1e-5)
    each, each_stats = rfdit.sample(model, noise, labels, solver="tsit5", rtol=1e-5, atol=1e-5, per_sample=True)
    assert each_stats["nfe"].shape == (3,)
    ref, _ = rfdit.sample(model, noise, labels, solver="dopri8", rtol=1e-9, atol=1e-9)
    for out in (batch, each):
        assert float(jnp.max(jnp.abs(out - ref))) < 1e-3


def test_sample_repa_convention_flips_time_and_sign(getkey):
    model = tiny_model(getkey())
    flipped = rfdit.DiT(model.config.replace(time_convention="repa"), key=getkey())
    flipped = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(flipped), jax.tree_util.tree_leaves(model))
    x, y = jr.normal(getkey(), (4, 4, 2)), jnp.asarray(1)
    np.testing.assert_allclose(
        model_velocity(flipped, x, jnp.asarray(0.2), y), -model(x, jnp.asarray(0.8), y), rtol=1e-6
    )
