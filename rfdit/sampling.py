"""Sampling as an ODE from noise (t=0) to data (t=1), solved by Diffrax.

`solve` integrates any field `field(t, x) -> dx/dt` over a pytree state with a fixed
step count or adaptive steps; `sample` builds the (guided) velocity field of a DiT
and solves it for a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

SOLVERS: dict[str, type[dfx.AbstractSolver]] = {
    "euler": dfx.Euler,
    "midpoint": dfx.Midpoint,
    "heun": dfx.Heun,
    "ralston": dfx.Ralston,
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
}


def _solver(name: str) -> dfx.AbstractSolver:
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; valid solvers: {list(SOLVERS)}.")
    return SOLVERS[name]()


def evaluations_per_step(name: str) -> tuple[int, int]:
    """(new field evaluations per attempted step, evaluations once at the start).

    A first-same-as-last (FSAL) tableau reuses its last stage as the next step's
    first, so it pays one evaluation up front and one fewer per step.
    """
    solver = _solver(name)
    if not isinstance(solver, dfx.AbstractRungeKutta):  # Euler: one evaluation per step
        return 1, 0
    stages = len(solver.tableau.c) + 1
    fsal = bool(solver.tableau.fsal)
    return stages - int(fsal), int(fsal)


def time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Times 0 = t_0 < ... < t_N = 1 for fixed-step solvers.

    `shift` applies the resolution shift to the noise level σ = 1 - t:
    σ' = s·σ / (1 + (s-1)·σ), so s > 1 spends more steps near noise. s = 1 is uniform.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps (={num_steps}) must be >= 1.")
    if shift <= 0:
        raise ValueError(f"shift (={shift}) must be positive.")
    sigma = 1.0 - np.linspace(0.0, 1.0, num_steps + 1)
    sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return 1.0 - sigma


def solve(
    field: Callable[[Float[Array, ""], PyTree], PyTree],
    x0: PyTree,
    *,
    solver: str = "euler",
    num_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    ts: Sequence[float] | ArrayLike | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    save_ts: Sequence[float] | ArrayLike | None = None,
    max_steps: int = 4096,
) -> tuple[PyTree, dict[str, Array]]:
    """Integrate dx/dt = field(t, x) from t0 to t1.

    Fixed steps: give `num_steps` (uniform grid) or an explicit time grid `ts` (from t0
    to t1). Adaptive steps: give `rtol` and/or `atol` (a PID controller; the other
    defaults to the same value). Euler has no error estimate, so it is fixed-step only.

    Returns the state at t1 and stats: `nfe` (field evaluations, rejected steps and
    the FSAL start included), `num_accepted_steps`, `num_rejected_steps`, `result`
    (Diffrax's result code; 0 is success) and, with `save_ts`, `ys` (states at those times).
    """
    fixed = num_steps is not None or ts is not None
    adaptive = rtol is not None or atol is not None
    if fixed == adaptive:
        raise ValueError(
            "solve needs exactly one of: num_steps / ts (fixed steps) or rtol / atol (adaptive steps); "
            f"got num_steps={num_steps}, ts={'given' if ts is not None else None}, rtol={rtol}, atol={atol}."
        )
    if adaptive and solver == "euler":
        raise ValueError(
            "euler has no error estimate, so it cannot step adaptively; give num_steps, or pick one of "
            f"{[s for s in SOLVERS if s != 'euler']} for rtol/atol."
        )
    term = dfx.ODETerm(lambda t, x, args: field(t, x))
    if fixed:
        if ts is None:
            ts = t0 + (t1 - t0) * np.linspace(0.0, 1.0, num_steps + 1)
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be a 1-D grid of at least two times; got shape {ts.shape}.")
        t0, t1 = ts[0], ts[-1]
        controller, dt0, steps_budget = dfx.StepTo(ts), None, ts.shape[0] - 1
    else:
        rtol = atol if rtol is None else rtol
        atol = rtol if atol is None else atol
        controller, dt0, steps_budget = dfx.PIDController(rtol=rtol, atol=atol), None, max_steps
    if adaptive:
        # An explicit first step: Diffrax's own selection would add evaluations we'd have to guess.
        dt0 = (t1 - t0) / 64
    saveat = dfx.SaveAt(t1=True) if save_ts is None else dfx.SaveAt(ts=jnp.asarray(save_ts), t1=True)
    per_step, at_start = evaluations_per_step(solver)
    solver_state = None
    if at_start:
        # FSAL: evaluate f(t0, x0) once here. Diffrax would otherwise re-evaluate the first
        # stage on every rejected attempt of the first step, which no step count reveals.
        solver_state = (jnp.asarray(False), field(jnp.asarray(t0), x0))
    sol = dfx.diffeqsolve(
        term, _solver(solver), t0, t1, dt0, x0, solver_state=solver_state,
        stepsize_controller=controller, saveat=saveat, max_steps=steps_budget, throw=False,
    )
    nfe = per_step * sol.stats["num_steps"] + at_start
    stats = {
        "nfe": jnp.asarray(nfe, jnp.int32),
        "num_accepted_steps": sol.stats["num_accepted_steps"],
        "num_rejected_steps": sol.stats["num_rejected_steps"],
        "result": sol.result._value,  # 0: success; see diffrax.RESULTS
    }
    # Diffrax stacks the saved states in time order: save_ts first, then t1.
    x1 = jax.tree_util.tree_map(lambda y: y[-1], sol.ys)
    if save_ts is not None:
        stats["ys"] = jax.tree_util.tree_map(lambda y: y[:-1], sol.ys)
    return x1, stats


def model_velocity(model, x: Float[Array, "H W C"], t: Float[Array, ""], y: Int[Array, ""]) -> Float[Array, "H W C"]:
    """The model's velocity in rfdit's convention, first C channels only.

    A model trained in REPA's convention (time reversed, predicting noise - data) gives
    `v(x, t) = -v_repa(x, 1 - t)`; the config names the convention.
    """
    cfg = model.config
    if cfg.time_convention == "repa":
        v = -model(x, 1 - t, y)
    else:
        v = model(x, t, y)
    return v[..., : cfg.in_channels]


def guided_field(
    model,
    labels: Int[Array, " b"],
    cfg_scale: Float[Array, ""] | None,
    *,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
) -> Callable[[Float[Array, ""], Float[Array, "b H W C"]], Float[Array, "b H W C"]]:
    """The batch's velocity field, with classifier-free guidance as one pass of 2B.

    v = v_uncond + s·(v_cond - v_uncond) on all channels (or only the first
    `cfg_channels`, as DiT/SiT did, for reproducing their numbers), applied only for t
    in `guidance_interval` when given. `cfg_scale=None` means no guidance (B pass).
    """
    batched = jax.vmap(lambda x, t, y: model_velocity(model, x, t, y))

    def field(t, x):
        b = x.shape[0]
        if cfg_scale is None:
            return batched(x, jnp.full((b,), t, x.dtype), labels)
        null = jnp.full_like(labels, model.config.num_classes)
        v = batched(jnp.concatenate([x, x]), jnp.full((2 * b,), t, x.dtype), jnp.concatenate([labels, null]))
        v_cond, v_uncond = v[:b], v[b:]
        scale = jnp.asarray(cfg_scale, x.dtype)
        if guidance_interval is not None:
            lo, hi = guidance_interval
            scale = jnp.where((t >= lo) & (t <= hi), scale, jnp.ones_like(scale))
        guided = v_uncond + scale * (v_cond - v_uncond)
        if cfg_channels is not None:
            guided = jnp.concatenate([guided[..., :cfg_channels], v_cond[..., cfg_channels:]], axis=-1)
        return guided

    return field


@eqx.filter_jit
def _sample(model, noise, labels, cfg_scale, solver_kwargs, guidance_interval, cfg_channels, per_sample):
    if per_sample:
        def one(x, y):
            field = guided_field(model, y[None], cfg_scale, guidance_interval=guidance_interval,
                                 cfg_channels=cfg_channels)
            x1, stats = solve(field, x[None], **solver_kwargs)
            return x1[0], stats

        return jax.vmap(one)(noise, labels)
    field = guided_field(model, labels, cfg_scale, guidance_interval=guidance_interval, cfg_channels=cfg_channels)
    return solve(field, noise, **solver_kwargs)


def sample(
    model,
    noise: Float[Array, "b H W C"],
    labels: Int[Array, " b"],
    *,
    cfg_scale: float | Float[Array, ""] | None = 1.0,
    solver: str = "euler",
    num_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    time_shift: float = 1.0,
    ts: Sequence[float] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    per_sample: bool = False,
    save_ts: Sequence[float] | None = None,
    max_steps: int = 4096,
) -> tuple[Float[Array, "b H W C"], dict[str, Array]]:
    """Generate a batch by integrating the model's (guided) velocity from noise to data.

    `cfg_scale`: 1 (a Python number) is plain conditional sampling with one pass of B;
    any other value, or an array, guides with one pass of 2B (0 is unconditional).
    Fixed-step solvers take `num_steps` (with an optional `time_shift`) or `ts`;
    adaptive ones take `rtol`/`atol`.

    Adaptive steps treat the whole batch as one ODE state with one step size by
    default: a vmapped solve runs until its slowest sample is done anyway, so
    per-sample stepping (`per_sample=True`, each sample its own steps and NFE) costs
    at least as much wall time on batched hardware; it exists for sampling studies.
    """
    if noise.ndim != 4 or labels.shape != noise.shape[:1]:
        raise ValueError(f"sample expects noise (B, H, W, C) and labels (B,); got {noise.shape} and {labels.shape}.")
    guide = not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1) and cfg_scale is not None
    scale = jnp.asarray(cfg_scale, noise.dtype) if guide else None
    if ts is None and num_steps is not None and time_shift != 1.0:
        ts = time_grid(num_steps, time_shift)
        num_steps = None
    solver_kwargs = dict(
        solver=solver, num_steps=num_steps, rtol=rtol, atol=atol, max_steps=max_steps,
        ts=None if ts is None else tuple(float(t) for t in ts),
        save_ts=None if save_ts is None else tuple(float(t) for t in save_ts),
    )
    return _sample(model, noise, labels, scale, solver_kwargs, guidance_interval, cfg_channels, per_sample)
