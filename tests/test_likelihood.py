import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import linalg, stats

import rfdit
from rfdit.likelihood import bits_per_dim, dequantize, log_likelihood, quantisation_step


def gaussian_field(mean, sigma):
    """The rectified flow's marginal velocity from N(0, I) to data N(m, Σ).

    With x0 ~ N(0, I), x1 ~ N(m, Σ) independent and x_t = (1-t)x0 + t·x1, the pair
    (x1 - x0, x_t) is jointly Gaussian, so v(t, x) = E[x1 - x0 | x_t = x]
    = m + (tΣ - (1-t)I) Σ_t⁻¹ (x - t·m), Σ_t = (1-t)²I + t²Σ: affine in x, and its flow
    carries N(0, I) exactly onto N(m, Σ).
    """
    dim = len(mean)

    def field(t, x):
        s, m, eye = jnp.asarray(sigma, x.dtype), jnp.asarray(mean, x.dtype), jnp.eye(dim, dtype=x.dtype)
        t = t.astype(x.dtype)
        sigma_t = (1 - t) ** 2 * eye + t**2 * s
        return m + (t * s - (1 - t) * eye) @ jnp.linalg.solve(sigma_t, x - t * m)

    return field


def gaussian_problem(dim=3, seed=0, scale=1.0):
    """A mean, a full covariance (times `scale`) and the flow's velocity field."""
    rng = np.random.default_rng(seed)
    root = rng.normal(size=(dim, dim)) * 0.6 + np.eye(dim)
    sigma = scale * (root @ root.T + 0.1 * np.eye(dim))
    mean = rng.normal(size=dim)
    return mean, sigma, gaussian_field(mean, sigma)


# One field object for the tests below: log_likelihood's compiled solve is cached per field.
MEAN, SIGMA, FIELD = gaussian_problem()
HUTCHINSON = dict(divergence="hutchinson", solver="dopri5", num_steps=16)
NUM_DRAWS = 512


def integrated_jacobian(sigma, num=4001):
    """A = ∫_0^1 ∂v/∂x dt, which here does not depend on the path (trapezoid rule)."""
    dim = len(sigma)
    ts = np.linspace(0.0, 1.0, num)
    jac = np.stack([(t * sigma - (1 - t) * np.eye(dim)) @ np.linalg.inv((1 - t) ** 2 * np.eye(dim) + t**2 * sigma)
                    for t in ts])
    return np.trapezoid(jac, ts, axis=0)


def test_log_likelihood_exact_divergence_matches_gaussian_closed_form():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.multivariate_normal(MEAN, SIGMA, size=6))
        logp, info = log_likelihood(FIELD, x, rtol=1e-9)
        assert np.all(np.asarray(info["result"]) == 0)
        np.testing.assert_allclose(logp, stats.multivariate_normal(MEAN, SIGMA).logpdf(np.asarray(x)), atol=1e-6)
        # The backward solve ends at the flow's preimage, Σ^(-1/2)(x - m) (Σ_t commutes with Σ).
        np.testing.assert_allclose(info["noise"], (np.asarray(x) - MEAN) @ linalg.inv(linalg.sqrtm(SIGMA)).T,
                                   atol=1e-6)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_log_likelihood_hutchinson_is_unbiased_within_its_statistical_error(probe):
    x = np.tile(np.random.default_rng(2).multivariate_normal(MEAN, SIGMA, size=1), (NUM_DRAWS, 1))
    with jax.enable_x64(True):
        logp, _ = log_likelihood(FIELD, jnp.asarray(x), probe=probe, key=jr.key(0), **HUTCHINSON)
    logp, exact = np.asarray(logp), stats.multivariate_normal(MEAN, SIGMA).logpdf(x[0])
    # The probe is fixed along the path and the Jacobian does not depend on x, so the estimate is
    # exact - (εᵀAε - tr A): its variance is 2‖S‖²_F (Gaussian) or 2(‖S‖²_F - Σ S_ii²) (Rademacher).
    integrated = integrated_jacobian(SIGMA)
    sym = (integrated + integrated.T) / 2
    variance = 2 * (np.sum(sym**2) - (np.sum(np.diag(sym) ** 2) if probe == "rademacher" else 0.0))
    assert abs(logp.mean() - exact) < 4 * math.sqrt(variance / NUM_DRAWS)
    assert 0.75 < logp.std() / math.sqrt(variance) < 1.25


def test_bits_per_dim_dequantisation_matches_the_closed_form_bound():
    # 17 levels over [-1, 1] (sklearn's digits): one step Δ = 2/16. Under a Gaussian model,
    # E_u[log p(x + Δu)] has a closed form (u uniform on [-½, ½)^D has covariance I/12), so the
    # dequantised bits/dim, -E_u[log p] / (D ln 2) - log2 Δ, is known exactly; Hutchinson's
    # estimate keeps it unbiased.
    levels, step, dim = 17, 2 / 16, len(MEAN)
    point = np.clip(np.round((MEAN + 0.1) * 8) / 8, -1, 1)  # a grid point near the mode
    with jax.enable_x64(True):
        bpd, info = bits_per_dim(FIELD, jnp.asarray(np.tile(point, (NUM_DRAWS, 1))), levels=levels, key=jr.key(1),
                                 **HUTCHINSON)
    precision, d = np.linalg.inv(SIGMA), point - MEAN
    expected_logp = (-0.5 * (d @ precision @ d + np.trace(precision) * step**2 / 12)
                     - 0.5 * np.log(np.linalg.det(2 * np.pi * SIGMA)))
    expected = -expected_logp / (dim * math.log(2)) - math.log2(step)
    bpd = np.asarray(bpd)
    assert info["offset_bits"] == pytest.approx(3.0)
    assert abs(bpd.mean() - expected) < 4 * bpd.std() / math.sqrt(NUM_DRAWS)
    # Jensen: the dequantised figure bounds the exact bits/dim of the cell's probability from above.
    # The cell's probability by Gauss-Legendre quadrature (scipy's Gaussian CDF is Monte Carlo).
    nodes, weights = np.polynomial.legendre.leggauss(6)
    grid = np.stack(np.meshgrid(*[nodes] * dim, indexing="ij"), -1).reshape(-1, dim)
    weight = np.prod(np.stack(np.meshgrid(*[weights] * dim, indexing="ij"), -1).reshape(-1, dim), axis=1)
    prob = np.sum(weight * stats.multivariate_normal(MEAN, SIGMA).pdf(point + grid * step / 2)) * (step / 2) ** dim
    assert expected > -math.log2(prob) / dim


def test_quantisation_step_and_dequantize_stay_in_the_cell(getkey):
    assert quantisation_step(256) == pytest.approx(2 / 255)
    assert quantisation_step(17) == pytest.approx(1 / 8)
    x = np.tile(np.linspace(-1, 1, 17, dtype=np.float32), (100, 1))
    noise = np.asarray(dequantize(jnp.asarray(x), levels=17, key=getkey())) - x
    assert np.max(np.abs(noise)) <= 1 / 16 + 1e-7
    assert np.std(noise) == pytest.approx((1 / 8) / math.sqrt(12), rel=0.1)
    with pytest.raises(ValueError, match="levels"):
        quantisation_step(1)


def test_log_likelihood_of_a_dit_matches_a_hand_written_euler_solve(getkey):
    cfg = rfdit.DiTConfig(image_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                          mlp_ratio=1.0, num_classes=3)
    model = rfdit.DiT(cfg, key=getkey())
    leaves, treedef = jax.tree_util.tree_flatten(model)
    rng = np.random.default_rng(0)
    # perturb every weight: the zero-initialised output layer would make the velocity vanish
    model = jax.tree_util.tree_unflatten(treedef, [
        x + jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype) if isinstance(x, jax.Array) else x for x in leaves
    ])
    x = jr.normal(getkey(), (2, 4, 4, 1))
    labels = jnp.asarray([0, 2])
    logp, info = log_likelihood(model, x, labels, solver="euler", num_steps=2)

    @jax.jit
    def euler_backwards(y, label):
        # two Euler steps from t = 1 to 0: y <- y - ½·v(t, y), the divergence integral alike
        delta = jnp.zeros(())
        for t in (1.0, 0.5):
            velocity = lambda z, t=t: model(z, jnp.asarray(t, jnp.float32), label)
            trace = jnp.trace(jax.jacfwd(velocity)(y).reshape(16, 16))
            y, delta = y - 0.5 * velocity(y), delta - 0.5 * trace
        return y, delta

    for i in range(2):
        y, delta = euler_backwards(x[i], labels[i])
        expected = float(stats.norm.logpdf(np.asarray(y)).sum()) + float(delta)
        assert float(logp[i]) == pytest.approx(expected, rel=1e-5, abs=1e-4)
        np.testing.assert_allclose(info["noise"][i], y, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(info["nfe"]) == 2)
    bpd, _ = bits_per_dim(model, x, labels, levels=256, solver="euler", num_steps=2, key=getkey())
    assert bpd.shape == (2,) and np.all(np.isfinite(np.asarray(bpd)))


def test_log_likelihood_refuses_missing_key_and_bad_options():
    field, x = FIELD, jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="key"):
        log_likelihood(field, x, divergence="hutchinson")
    with pytest.raises((ValueError, TypeError), match="divergence"):
        log_likelihood(field, x, divergence="trace")
    with pytest.raises(ValueError, match="key"):
        bits_per_dim(field, x, levels=256)


def test_log_likelihood_that_runs_out_of_steps_raises_on_the_host():
    from rfdit.sampling import SolveFailed

    x = jnp.ones((2, 3))
    field = lambda t, y: -30.0 * y * jnp.cos(20 * t)
    with pytest.raises(SolveFailed, match=r"dopri5 solve \(rtol=1e-09.*max_steps=2\) stopped before t=0"):
        log_likelihood(field, x, rtol=1e-9, atol=1e-9, max_steps=2)
    logp, stats = log_likelihood(field, x, rtol=1e-9, atol=1e-9, max_steps=2, on_failure="return")
    assert np.all(np.asarray(stats["result"]) != 0) and logp.shape == (2,)
