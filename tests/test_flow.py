import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import stats

import rfdit
from rfdit.flow import drop_labels, flow_loss, interpolate, sample_time, target_velocity


def test_interpolate_endpoints_and_target(getkey):
    x0, x1 = jr.normal(getkey(), (4, 4, 3)), jr.normal(getkey(), (4, 4, 3))
    assert jnp.array_equal(interpolate(x0, x1, jnp.asarray(0.0)), x0)
    assert jnp.array_equal(interpolate(x0, x1, jnp.asarray(1.0)), x1)
    # the target is the time derivative of the interpolant
    t, h = jnp.asarray(0.3), 1e-3
    numeric = (interpolate(x0, x1, t + h) - interpolate(x0, x1, t - h)) / (2 * h)
    np.testing.assert_allclose(numeric, target_velocity(x0, x1), atol=1e-3)
    assert jnp.array_equal(target_velocity(x0, x1), x1 - x0)


def test_sample_time_distributions(getkey):
    uniform = np.asarray(sample_time(getkey(), (20000,), rfdit.FlowConfig(t_sampler="uniform")))
    assert stats.kstest(uniform, "uniform").pvalue > 1e-3
    cfg = rfdit.FlowConfig(t_sampler="logit-normal", t_mean=0.5, t_std=0.8)
    t = np.asarray(sample_time(getkey(), (20000,), cfg))
    assert stats.kstest(np.log(t / (1 - t)), "norm", args=(0.5, 0.8)).pvalue > 1e-3
    # the Flax original's name for the same sampler
    same = sample_time(jr.key(7), (5,), rfdit.FlowConfig(t_sampler="log-normal"))
    assert jnp.array_equal(same, sample_time(jr.key(7), (5,), rfdit.FlowConfig(t_sampler="logit-normal")))


def test_flow_config_invalid_sampler_lists_choices():
    with pytest.raises(ValueError, match="uniform"):
        rfdit.FlowConfig(t_sampler="beta")


def test_drop_labels_rate(getkey):
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = drop_labels(getkey(), labels, 0.1, 10)
    assert set(np.unique(np.asarray(dropped))) == {0, 10}
    assert float(jnp.mean(dropped == 10)) == pytest.approx(0.1, abs=0.01)


def test_flow_loss_closed_form_for_exact_velocity(getkey):
    # A "model" that knows x0 and x1 along the line predicts the target exactly: loss 0.
    # Use a field that returns a fixed velocity: loss = E||v - (x1 - x0)||² = ||v - x1||² + 1 (per dim).
    x1 = jnp.full((512, 2, 2, 1), 0.5)
    model = lambda x, t, y: jnp.full_like(x, 0.5)
    cfg = rfdit.FlowConfig(class_dropout_prob=0.0)
    loss, aux = flow_loss(model, x1, jnp.zeros((512,), jnp.int32), cfg, 10, key=getkey())
    # E||0.5 - (0.5 - x0)||² = E[x0²] = 1
    assert float(loss) == pytest.approx(1.0, abs=0.08)
    assert aux["per_example_loss"].shape == (512,)


def test_flow_loss_clip_only_affects_interpolant(getkey):
    # The Flax original forms x_t with min(t, 0.99) but feeds the model the raw t.
    x1 = jr.normal(getkey(), (64, 2, 2, 1))
    model = lambda x, t, y: x + t  # sees both the interpolant and the time
    cfg = rfdit.FlowConfig(t_sampler="uniform", t_clip_max=0.5, class_dropout_prob=0.0)
    key = getkey()
    loss, aux = flow_loss(model, x1, jnp.zeros((64,), jnp.int32), cfg, 10, key=key)
    t = aux["t"]
    assert float(jnp.max(t)) > 0.5
    _, noise_key, _ = jr.split(key, 3)
    x0 = jr.normal(noise_key, x1.shape)
    xt = jax.vmap(interpolate)(x0, x1, jnp.minimum(t, 0.5))
    expected = jnp.mean(jnp.square(xt + t[:, None, None, None] - (x1 - x0)))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
