"""The flow's SDE against closed forms: Gaussian data, whose velocity, score and Tweedie mean are known exactly."""

import itertools

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from test_sampling import tiny_model

import rfdit
from rfdit.sde import DIFFUSION_FORMS, Diffusion, last_step, score_from_velocity

# Data N(M, S) in two dimensions, correlated, with eigenvalues 1.51 and 0.29.
M = np.array([0.5, -1.0])
S = np.array([[1.0, 0.6], [0.6, 0.8]])
I2 = np.eye(2)


def cov_t(t):
    """Cov(x_t) for x_t = (1-t)·x0 + t·x1, x0 ~ N(0, I), x1 ~ N(M, S)."""
    return (1 - t) ** 2 * I2 + t**2 * S


def gain(t):
    """E[x1 - x0 | x_t] = M + gain(t)·(x_t - t·M): Cov(v, x_t)·Cov(x_t)⁻¹ with Cov(v, x_t) = t·S - (1-t)·I
    (symmetric, since S and I commute)."""
    return (t * S - (1 - t) * I2) @ np.linalg.inv(cov_t(t))


def gaussian_velocity(t, x):
    """The exact velocity of the linear path for N(M, S) data, for states (..., 2)."""
    m, s, eye = jnp.broadcast_to(jnp.asarray(M, x.dtype), x.shape), jnp.asarray(S, x.dtype), jnp.eye(2, dtype=x.dtype)
    t = jnp.asarray(t, x.dtype)
    cov = (1 - t) ** 2 * eye + t**2 * s
    b = jnp.linalg.solve(cov, t * s - (1 - t) * eye)  # = gain(t), symmetric
    return m + (x - t * m) @ b


def test_gaussian_velocity_is_the_conditional_mean():
    # A regression of v = x1 - x0 on x_t over 400,000 draws recovers the closed form's slope and intercept.
    rng = np.random.default_rng(0)
    n = 400_000
    x0 = rng.standard_normal((n, 2))
    x1 = M + rng.standard_normal((n, 2)) @ np.linalg.cholesky(S).T
    for t in (0.1, 0.5, 0.9):
        xt = (1 - t) * x0 + t * x1
        design = np.concatenate([xt, np.ones((n, 1))], axis=1)
        coef = np.linalg.lstsq(design, x1 - x0, rcond=None)[0]
        slope, intercept = coef[:2].T, coef[2]
        np.testing.assert_allclose(slope, gain(t), atol=0.01)
        np.testing.assert_allclose(intercept, M - t * gain(t) @ M, atol=0.01)
        x = jnp.asarray(xt[:5], jnp.float32)
        np.testing.assert_allclose(gaussian_velocity(jnp.float32(t), x), M + (xt[:5] - t * M) @ gain(t),
                                   rtol=1e-5, atol=1e-5)


def test_score_and_tweedie_from_the_velocity():
    x = jr.normal(jr.key(0), (6, 2)) * 2
    for t in (0.2, 0.6, 0.95):
        tt = jnp.float32(t)
        v = gaussian_velocity(tt, x)
        score = -(np.asarray(x) - t * M) @ np.linalg.inv(cov_t(t))  # the Gaussian N(tM, Σ_t)'s own score
        np.testing.assert_allclose(score_from_velocity(v, x, tt), score, rtol=1e-4, atol=1e-4)
        tweedie = M + (np.asarray(x) - t * M) @ (t * S @ np.linalg.inv(cov_t(t)))  # E[x1 | x_t]
        step = last_step("tweedie", gaussian_velocity, Diffusion("sigma"), tt, x, 1 - t)
        np.testing.assert_allclose(step, tweedie, rtol=1e-4, atol=1e-4)
        euler = last_step("euler", gaussian_velocity, Diffusion("sigma"), tt, x, 1 - t)
        np.testing.assert_allclose(euler, step, rtol=1e-6, atol=1e-6)


def sit_diffusion(form, norm, t):
    """SiT's compute_diffusion for its linear path, α_t = t (data), σ_t = 1 - t (noise), in its own terms."""
    alpha, d_alpha, sigma, d_sigma = t, 1.0, 1 - t, -1.0
    if form == "constant":
        return norm
    if form == "SBDM":
        return norm * (d_alpha / alpha * sigma**2 - sigma * d_sigma)
    if form == "sigma":
        return norm * sigma
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * np.cos(np.pi * t) + 1) ** 2
    return norm * np.sin(np.pi * t) ** 2


@pytest.mark.parametrize("form", DIFFUSION_FORMS)
def test_diffusion_forms_are_sits(form):
    for norm in (1.0, 0.7):
        w = Diffusion(form.lower(), norm=norm)
        assert w.form == form
        for t in (0.05, 0.3, 0.5, 0.8, 0.99):
            assert float(w(jnp.float32(t))) == pytest.approx(sit_diffusion(form, norm, t), rel=1e-5, abs=1e-6)
            assert float(w.score_weight(jnp.float32(t))) == pytest.approx(sit_diffusion(form, norm, t) / (1 - t),
                                                                           rel=1e-4, abs=1e-6)
    if form in ("sigma", "linear", "SBDM", "increasing-decreasing"):
        assert float(Diffusion(form).score_weight(jnp.float32(1.0))) == pytest.approx(
            {"increasing-decreasing": 0.0}.get(form, 1.0), abs=1e-6)


def moments_of_the_scheme(form, norm, grid, last, size):
    """Exact mean and covariance of what Euler-Maruyama (or Euler, form None) and the last step give for the
    Gaussian data: the drift is affine, so the scheme maps Gaussians to Gaussians (float64 recursion)."""
    w = None if form is None else (lambda t: sit_diffusion(form, norm, t))
    mean, cov = np.zeros(2), I2.copy()

    def affine(t, with_score):
        b = gain(t)
        c_v = M - t * b @ M
        if not with_score:
            return b, c_v
        k = w(t) / (1 - t)  # drift v - k·(x - t·v)
        return (1 + k * t) * b - k * I2, (1 + k * t) * c_v

    for t, t_next in itertools.pairwise(grid):
        h = t_next - t
        a, c = affine(t, w is not None)
        step = I2 + h * a
        mean = step @ mean + h * c
        cov = step @ cov @ step.T + (0 if w is None else 2 * w(t) * h) * I2
    if last is not None:
        a, c = affine(grid[-1], last == "mean")
        step = I2 + size * a
        mean, cov = step @ mean + size * c, step @ cov @ step.T
    return mean, cov


CASES = [(None, "euler", None)] + [(form, "euler", "tweedie" if form == "linear" else "mean") for form in DIFFUSION_FORMS]


@pytest.mark.parametrize("form, solver, last", CASES)
def test_ode_and_sde_carry_noise_to_the_data_distribution(form, solver, last):
    # 8,000 samples, 60 steps on [t0, 0.96] and a last step of 0.04 (the ODE: 64 Euler steps to 1).
    n, steps, size = 8000, 60, 0.04
    t0 = 1e-3 if form == "SBDM" else 0.0
    x0 = jr.normal(jr.key(0), (n, 2))
    if form is None:
        x1, stats = rfdit.solve(gaussian_velocity, x0, solver=solver, num_steps=64)
        grid, size = np.linspace(0, 1, 65), None
    else:
        x1, stats = rfdit.solve(gaussian_velocity, x0, solver=solver, num_steps=steps, t0=t0,
                                diffusion=Diffusion(form), last_step=last, last_step_size=size, key=jr.key(1))
        grid = np.linspace(t0, 1 - size, steps + 1)
    assert int(stats["result"]) == 0 and float(stats["t_reached"]) == pytest.approx(1.0)
    mean, cov = moments_of_the_scheme(form, 1.0, grid, last, size)
    x = np.asarray(x1, np.float64)
    # sampling error: the sample mean's and covariance's standard errors under the scheme's own Gaussian
    se_mean = np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4.5 * se_mean)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4.5 * se_cov)
    # The discretisation and last-step bias against the data, as the recursion gives it. The mean has none
    # (E[x_t] = t·M is linear in t, which Euler steps exactly) but for SBDM's start at t0 = 1e-3 from N(0, I)
    # rather than N(t0·M, Σ_t0), which leaves 3e-6; the covariance's is at most 0.041 for the
    # ODE's 64 Euler steps, 0.025 for the SDE's 60 steps and last step, and 0.091 for the constant form, whose
    # noise stays √2 up to t = 0.96 and whose last step does not remove it (0.084 with 249 steps).
    bound = 0.045 if form is None else 0.095 if form == "constant" else 0.03
    bias_mean, bias_cov = np.abs(mean - M).max(), np.abs(cov - S).max()
    assert bias_mean < 1e-5 and bias_cov < bound, (bias_mean, bias_cov)
    assert np.abs(x.mean(0) - M).max() < bias_mean + 4.5 * se_mean.max()
    assert np.abs(np.cov(x.T) - S).max() < bias_cov + 4.5 * se_cov.max()


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def observed_order(steps, errors):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("solver, order", [("euler", 0.9), ("shark", 1.4), ("sra1", 1.4)])
def test_sde_strong_order_on_one_brownian_path(solver, order):
    # The error at t = 0.96 against the same solver with 128 steps, on the same Brownian path: one key, and
    # a Brownian tree at the same depth for every step count, whose dyadic grid points all these grids hit.
    # Additive noise: Euler-Maruyama has strong order 1 (seen: 1.0), ShARK 1.5 (seen: 2.0 on this linear
    # drift; SRA1, the same kind of method, gives 2.0 too).
    x0 = jr.normal(jr.key(0), (100, 2))
    kwargs = dict(solver=solver, t1=0.96, diffusion=Diffusion("sigma"), key=jr.key(1))
    reference = rfdit.solve(gaussian_velocity, x0, num_steps=128, **kwargs)[0]
    steps = [8, 16]
    errors = [rms(rfdit.solve(gaussian_velocity, x0, num_steps=n, **kwargs)[0], reference) for n in steps]
    assert observed_order(steps, errors) >= order, errors


@pytest.mark.parametrize("solver, order, steps", [
    ("euler", 0.95, (16, 32)), ("midpoint", 1.9, (8, 16)), ("heun", 1.9, (8, 16)), ("dopri5", 4.5, (2, 4)),
])
def test_ode_solvers_keep_their_order_on_gaussian_data(solver, order, steps):
    # The ODE carries x0 to M + S^½·x0 exactly (S and Σ_t commute, so x_t - t·M = Σ_t^½·x0).
    x0 = jr.normal(jr.key(0), (400, 2))
    vals, vecs = np.linalg.eigh(S)
    exact = M + np.asarray(x0, np.float64) @ (vecs * np.sqrt(vals)) @ vecs.T
    errors = [rms(rfdit.solve(gaussian_velocity, x0, solver=solver, num_steps=n)[0], exact) for n in steps]
    assert observed_order(steps, errors) >= order, errors


def counting_field():
    calls = []

    def field(t, x):
        jax.debug.callback(lambda: calls.append(1), ordered=False)
        return jnp.cos(3 * t) * x - x**3 / 4

    return field, calls


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("heun", 2), ("shark", 2),
                                              (dfx.GeneralShARK(), 2)])  # GeneralShARK skips its first drift stage
def test_sde_nfe_counts_every_evaluation(solver, per_step):
    field, calls = counting_field()
    common = dict(solver=solver, diffusion=Diffusion("sigma", norm=0.5), key=jr.key(0))
    _, stats = rfdit.solve(field, jnp.ones(3), num_steps=7, last_step="mean", **common)
    jax.effects_barrier()
    assert int(stats["nfe"]) == len(calls) == per_step * 7 + 1  # the last step's evaluation included
    if solver == "shark":
        calls.clear()
        _, stats = rfdit.solve(field, jnp.ones(3), rtol=1e-3, atol=1e-3, **common)
        jax.effects_barrier()
        assert int(stats["nfe"]) == len(calls) == per_step * int(stats["num_steps"])


def test_sample_depends_only_on_its_noise_and_key(getkey):
    model = tiny_model(getkey())
    noise, labels = jr.normal(getkey(), (4, 4, 4, 2)), jnp.arange(4) % 3
    kwargs = dict(cfg_scale=2.0, solver="euler", num_steps=6, diffusion=Diffusion("sigma"), last_step="mean")
    key = getkey()
    batch, stats = rfdit.sample(model, noise, labels, key=key, **kwargs)
    assert int(stats["nfe"]) == 7
    # the first two samples again, in a batch of two, each solved on its own
    first, _ = rfdit.sample(model, noise[:2], labels[:2], key=key, per_sample=True, **kwargs)
    np.testing.assert_allclose(first, batch[:2], rtol=1e-5, atol=1e-6)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(4))
    own, _ = rfdit.sample(model, noise[::-1], labels[::-1], key=keys[::-1], **kwargs)
    np.testing.assert_array_equal(own[::-1], batch)  # a key per sample: their order does not matter
    other, _ = rfdit.sample(model, noise, labels, key=getkey(), **kwargs)
    assert float(jnp.abs(other - batch).max()) > 1e-2  # another key, other noise


def test_sde_arguments_are_checked():
    field, x = (lambda t, x: -x), jnp.ones(2)
    with pytest.raises(ValueError, match="Unknown diffusion form"):
        Diffusion("cosine")
    with pytest.raises(ValueError, match="norm"):
        Diffusion("sigma", norm=-1.0)
    with pytest.raises(ValueError, match="needs a key"):
        rfdit.solve(field, x, num_steps=4, diffusion=Diffusion())
    with pytest.raises(ValueError, match="belong to the SDE"):
        rfdit.solve(field, x, num_steps=4, key=jr.key(0))
    with pytest.raises(ValueError, match="belong to the SDE"):
        rfdit.solve(field, x, num_steps=4, last_step="mean")
    with pytest.raises(ValueError, match="singular at t = 0.*1e-3"):
        rfdit.solve(field, x, num_steps=4, diffusion=Diffusion("SBDM"), key=jr.key(0))
    with pytest.raises(ValueError, match="singular at t = 1.*last step"):
        rfdit.solve(field, x, num_steps=4, diffusion=Diffusion("constant"), key=jr.key(0))
    with pytest.raises(ValueError, match="last_step .* must be one of"):
        rfdit.solve(field, x, num_steps=4, diffusion=Diffusion(), key=jr.key(0), last_step="Heun")
    with pytest.raises(ValueError, match="must end at t1 - last_step_size = 0.96"):
        rfdit.solve(field, x, ts=[0.0, 0.5, 1.0], diffusion=Diffusion(), key=jr.key(0), last_step="mean")
    with pytest.raises(ValueError, match="Unknown SDE solver 'dopri5'"):
        rfdit.solve(field, x, num_steps=4, solver="dopri5", diffusion=Diffusion(), key=jr.key(0))
    with pytest.raises(ValueError, match="one key per sample"):
        rfdit.solve(field, jnp.ones((3, 2)), num_steps=4, diffusion=Diffusion(), key=jr.split(jr.key(0), 2))
    # SiT's grid: 249 steps to 0.96 and the last step, 250 evaluations; the same grid given as ts
    ts = np.linspace(0.0, 0.96, 250)
    a, stats = rfdit.solve(field, x, ts=ts, diffusion=Diffusion(), key=jr.key(0), last_step="mean")
    b, _ = rfdit.solve(field, x, num_steps=249, diffusion=Diffusion(), key=jr.key(0), last_step="mean")
    assert int(stats["nfe"]) == 250
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
