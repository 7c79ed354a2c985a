"""Log-likelihood and bits per dimension of data under a flow (instantaneous change of variables).

The flow carries noise x(0) ~ N(0, I) to data x(1) along dx/dt = v(t, x). Along any path
d/dt log p_t(x(t)) = -div v(t, x(t)) (Chen et al. 2018, FFJORD), so

    log p_1(x) = log N(x(0); 0, I) - ∫_0^1 div v(t, x(t)) dt,

where x(0) comes from solving the ODE backwards from the data point x(1) = x. The state is
augmented with the running divergence integral and both are solved together, from t = 1
to t = 0, with `rfdit.solve` (every solver it offers, fixed or adaptive steps).

The divergence is exact (the trace of the full Jacobian: D forward-mode products per
evaluation, affordable for digits' D = 64) or Hutchinson's estimate εᵀ(∂v/∂x)ε with
Rademacher or Gaussian probes, drawn once per example and held fixed along the path, so
the estimate of log p is unbiased and the ODE the adaptive solver sees stays smooth.

Bits per dimension of quantised data (`bits_per_dim`): the data take `levels` evenly
spaced values over `data_range` (8-bit images: 256 levels over [-1, 1], one step 2/255;
scikit-learn's digits: 17 levels over [-1, 1], one step 2/16). Uniform dequantisation
(Uria et al. 2013; Theis et al. 2016; as in FFJORD, Flow++, score-SDE and Flow Matching)
adds u·Δ with u ~ U[-½, ½)^D and Δ one step, a cell centred on each level. By Jensen,

    log P(k) >= E_u[log p(x_k + Δu)] + D·log Δ,

so the reported bits/dim, -E_u[log p(x̃)] / (D ln 2) - log2 Δ, is an upper bound on the
discrete model's bits/dim measured in units of one level (which is what papers report;
the `- log2 Δ` term undoes the data scaling: +3 bits for digits, +6.99 for 8-bit images
in [-1, 1]). One dequantisation draw per example; average over examples (or repeat them)
to estimate the expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .nn.dit import DiT
from .sampling import ON_FAILURE, SolveFailed, failure_message, model_velocity, solve

Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]
ExampleField = Callable[[Float[Array, ""], Float[Array, "*dims"]], Float[Array, "*dims"]]


def _example_field(field_or_model, label, cfg_scale) -> ExampleField:
    """One example's velocity field(t, x): a user field as is, or a DiT's (guided) velocity."""
    if not isinstance(field_or_model, DiT):
        return field_or_model
    model = field_or_model

    def field(t, x):
        t = t.astype(x.dtype)
        v_cond = model_velocity(model, x, t, label)
        if cfg_scale is None:
            return v_cond
        v_uncond = model_velocity(model, x, t, jnp.full_like(label, model.config.num_classes))
        return v_uncond + jnp.asarray(cfg_scale, x.dtype) * (v_cond - v_uncond)

    return field


def _velocity_and_divergence(field: ExampleField, t, x, probes):
    """v(t, x) and div v: exact (probes None) or Hutchinson's εᵀJε averaged over the probes."""
    velocity, jvp = jax.linearize(lambda y: field(t, y), x)
    if probes is None:
        dim = x.size
        basis = jnp.eye(dim, dtype=x.dtype).reshape(dim, *x.shape)
        columns = jax.vmap(jvp)(basis).reshape(dim, dim)  # row i: J e_i
        return velocity, jnp.trace(columns)
    products = jax.vmap(jvp)(probes)  # (num_probes, *x.shape): J ε
    return velocity, jnp.mean(jnp.sum((probes * products).reshape(len(probes), -1), axis=1))


def _draw_probes(key, shape, dtype, num_probes: int, probe: str):
    if probe == "rademacher":
        return jr.rademacher(key, (num_probes, *shape), dtype=dtype)
    return jr.normal(key, (num_probes, *shape), dtype=dtype)


def _standard_normal_logpdf(x):
    return -0.5 * jnp.sum(jnp.square(x)) - 0.5 * x.size * math.log(2 * math.pi)


@eqx.filter_jit
def _log_likelihood(field_or_model, x, labels, cfg_scale, keys, options, solver_kwargs):
    divergence, probe, num_probes = options

    def one(x, label, key):
        field = _example_field(field_or_model, label, cfg_scale)
        probes = None
        if divergence == "hutchinson":
            probes = _draw_probes(key, x.shape, x.dtype, num_probes, probe)

        def augmented(t, state):
            y, _ = state
            velocity, div = _velocity_and_divergence(field, t, y, probes)
            return velocity, div.astype(y.dtype)

        # Backwards from data (t = 1) to noise (t = 0); the second component accumulates
        # ∫_1^0 div v dt = -∫_0^1 div v dt.
        state0 = (x, jnp.zeros((), x.dtype))
        (noise, delta), stats = solve(augmented, state0, t0=1.0, t1=0.0, **solver_kwargs)
        return _standard_normal_logpdf(noise) + delta, noise, stats

    return jax.vmap(one)(x, labels, keys)


def log_likelihood(
    field_or_model: DiT | ExampleField,
    x: Float[Array, " b *dims"],
    labels: Int[Array, " b"] | None = None,
    *,
    cfg_scale: float | None = None,
    divergence: Divergence = "exact",
    probe: Probe = "rademacher",
    num_probes: int = 1,
    solver: str = "dopri5",
    num_steps: int | None = None,
    rtol: float | None = 1e-5,
    atol: float | None = None,
    max_steps: int = 4096,
    on_failure: str = "raise",
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, " b"], dict[str, PyTree]]:
    """log p_1(x) in nats for each example of a batch, by the instantaneous change of variables.

    Args:
        field_or_model: a DiT (its velocity in rfdit's time convention, first `in_channels`
            channels) or any one-example field `field(t, x) -> dx/dt` with x of shape `dims`.
        x: the data points, (B, *dims), in the model's data space (e.g. [-1, 1] pixels).
        labels: class labels (B,) for a DiT; None is the null label (the unconditional
            likelihood). Ignored for a plain field.
        cfg_scale: None for the plain (conditional or unconditional) velocity; a number for
            the guided field v_u + s·(v_c - v_u), which is a flow but not the trained one.
        divergence: "exact" (trace of the D×D Jacobian, D forward-mode products per
            evaluation) or "hutchinson" (`num_probes` products; unbiased, needs `key`).
        probe: Hutchinson's probe distribution, "rademacher" (lower variance) or "gaussian".
        solver, num_steps, rtol, atol, max_steps: as in `rfdit.solve`; `num_steps` selects
            fixed steps (and overrides the default tolerance).
        on_failure: "raise" (`SolveFailed`, checked on the host, naming the solver, its tolerances,
            max_steps and the time reached) or "return" (the partial solves, `stats["result"]` nonzero).
        key: for Hutchinson's probes (one set per example); keyword-only, last.

    Returns:
        log p (B,) and stats: `noise` (B, *dims), the ODE's end point at t = 0, and
        `rfdit.solve`'s stats per example (`nfe` counts evaluations of the augmented field,
        each one velocity plus D (exact) or `num_probes` (Hutchinson) Jacobian products).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence (={divergence!r}) must be 'exact' or 'hutchinson'.")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe (={probe!r}) must be 'rademacher' or 'gaussian'.")
    if num_probes < 1:
        raise ValueError(f"num_probes (={num_probes}) must be >= 1.")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure (={on_failure!r}) must be one of {ON_FAILURE}.")
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' draws random probes: pass key=jax.random.key(...).")
    if x.ndim < 2:
        raise ValueError(f"log_likelihood expects a batch x of shape (B, *dims); got shape {x.shape}.")
    batch = x.shape[0]
    if isinstance(field_or_model, DiT):
        null = field_or_model.config.num_classes
        labels = jnp.full((batch,), null, jnp.int32) if labels is None else jnp.asarray(labels)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) to match x; got {labels.shape}.")
    else:
        labels = jnp.zeros((batch,), jnp.int32)
    if num_steps is not None:
        rtol = atol = None
    keys = jr.split(jr.key(0) if key is None else key, batch)
    solver_kwargs = dict(solver=solver, num_steps=num_steps, rtol=rtol, atol=atol, max_steps=max_steps,
                         on_failure="return")  # checked below, on the host
    logp, noise, stats = _log_likelihood(
        field_or_model, x, labels, cfg_scale, keys, (divergence, probe, num_probes), solver_kwargs
    )
    stats = {"noise": noise, **stats}
    if on_failure == "raise":
        message = failure_message(stats, solver=solver, rtol=rtol, atol=atol, max_steps=max_steps, t1=0.0)
        if message is not None:
            raise SolveFailed(message, stats)
    return logp, stats


IMAGE_LEVELS = 256
"""levels of an 8-bit image channel"""


def quantisation_step(levels: int, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """One level's width in data units: (hi - lo) / (levels - 1); 2/255 for 8-bit images in [-1, 1]."""
    if levels < 2:
        raise ValueError(f"levels (={levels}) must be >= 2 (256 for 8-bit images, 17 for sklearn's digits).")
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range (={data_range}) must be (low, high) with low < high.")
    return (hi - lo) / (levels - 1)


def dequantize(
    x: Float[Array, "*shape"],
    *,
    levels: int,
    data_range: tuple[float, float] = (-1.0, 1.0),
    key: PRNGKeyArray,
) -> Float[Array, "*shape"]:
    """x + Δ·u with u ~ U[-½, ½): uniform noise over the cell of one quantisation step Δ."""
    step = quantisation_step(levels, data_range)
    u = jr.uniform(key, x.shape, x.dtype, minval=-0.5, maxval=0.5)
    return x + jnp.asarray(step, x.dtype) * u


def bits_per_dim(
    field_or_model: DiT | ExampleField,
    x: Float[Array, " b *dims"],
    labels: Int[Array, " b"] | None = None,
    *,
    levels: int | None = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    dequantise: bool = True,
    key: PRNGKeyArray | None = None,
    **likelihood_kwargs,
) -> tuple[Float[Array, " b"], dict[str, PyTree]]:
    """Bits per dimension of each example: -log2 p / D, in units of one quantisation level.

    Args:
        field_or_model, x, labels: as in `log_likelihood`; x holds the quantised data
            (exact levels) in `data_range`.
        levels: how many values each dimension takes (256 for 8-bit images, 17 for
            sklearn's digits); None for continuous data: bits/dim of the density in data
            units, with neither dequantisation nor the -log2 Δ scaling term.
        data_range: the interval the levels span in data units.
        dequantise: add uniform noise of one step Δ before evaluating the density (one draw
            per example). Without it the number is the density at the grid points, which
            is not a bound on anything.
        key: for dequantisation and Hutchinson's probes; keyword-only.
        likelihood_kwargs: passed to `log_likelihood` (divergence, solver, rtol, ...).

    Returns:
        bits/dim (B,) and stats: `log_likelihood`'s, plus `log_likelihood` (nats, of the
        dequantised points in data units) and `offset_bits` (the -log2 Δ term added).
    """
    if key is None and (dequantise and levels is not None or likelihood_kwargs.get("divergence") == "hutchinson"):
        raise ValueError("bits_per_dim needs key=jax.random.key(...) for dequantisation or Hutchinson's probes.")
    dequant_key, probe_key = jr.split(jr.key(0) if key is None else key)
    offset = 0.0
    if levels is not None:
        offset = -math.log2(quantisation_step(levels, data_range))
        if dequantise:
            x = dequantize(x, levels=levels, data_range=data_range, key=dequant_key)
    logp, stats = log_likelihood(field_or_model, x, labels, key=probe_key, **likelihood_kwargs)
    dims = math.prod(x.shape[1:])
    bpd = -logp / (dims * math.log(2)) + offset
    return bpd, {**stats, "log_likelihood": logp, "offset_bits": offset}
