"""Sampling as an ODE (or the SDE with the same marginals) from noise (t=0) to data (t=1), solved by Diffrax.

`solve` integrates any field `field(t, x) -> dx/dt` over a pytree state with a fixed
step count or adaptive steps, or, given a `Diffusion` and a key, the flow's SDE (see `rfdit.sde`);
`sample` builds the (guided) velocity field of a DiT and solves it for a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from . import sde
from .sde import SDE_SOLVERS, Diffusion

SOLVERS: dict[str, type[dfx.AbstractSolver]] = {
    "euler": dfx.Euler,
    "midpoint": dfx.Midpoint,
    "heun": dfx.Heun,
    "ralston": dfx.Ralston,
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
}
"""The solvers that have a name: `solve(..., solver=name)`, `SamplerConfig.solver` and the CLIs' `--solver`."""

SolverName = Literal[tuple(SOLVERS)]  # type: ignore[valid-type]  # the names, for CLI choices

ON_FAILURE = ("raise", "return")

NONFINITE = int(dfx.RESULTS.nonfinite._value)
"""`stats["result"]` of a solve whose final state holds NaN or inf (Diffrax's own code for it). Diffrax
flags a non-finite state only in adaptive solves, where it rejects the step; a fixed-step solve runs
on to t1 and reports success, so `solve` checks the final state itself."""
NONFINITE_MESSAGE = ("The solve's final state holds NaN or inf (the field diverged, or the model's parameters are "
                     "non-finite); rfdit.solve(..., on_failure='return') gives the partial result.")

# The adaptive solve's step-size controller by default: a PI controller, inside the range Diffrax suggests for
# moderately difficult ODEs (pcoeff >= 0.2, icoeff >= 0.3, their sum <= 0.7), rather than Diffrax's own default
# I controller (pcoeff 0, icoeff 1). On the digits default, the I controller let dopri5's and tsit5's global
# errors reach 9-10x their tolerance at 1e-4; this one kept them within 1.4x from 1e-3 to 1e-5 for no more
# evaluations (docs/sampling_study.md, "Step-size control").
PCOEFF, ICOEFF = 0.3, 0.4
DIFFRAX_PCOEFF, DIFFRAX_ICOEFF = 0.0, 1.0  # Diffrax's own default, the I controller


class SolveFailed(RuntimeError):
    """A solve that did not reach its end time: max_steps exhausted, the step size collapsed, or the
    state turned non-finite. `stats` holds the partial solve's statistics."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


def _solver(solver: str | dfx.AbstractSolver, *, stochastic: bool = False) -> dfx.AbstractSolver:
    if isinstance(solver, dfx.AbstractSolver):
        return solver
    names = SDE_SOLVERS if stochastic else SOLVERS
    if solver not in names:
        what = "SDE solver" if stochastic else "solver"
        raise ValueError(f"Unknown {what} {solver!r}; give one of {list(names)} or a diffrax.AbstractSolver.")
    return names[solver]()


def solver_name(solver: str | dfx.AbstractSolver) -> str:
    """A solver's name for messages and tables: its name, or its class's."""
    return solver if isinstance(solver, str) else type(solver).__name__


def _erk_counts(solver: dfx.AbstractSolver) -> tuple[int, int] | None:
    """(evaluations per attempted step, evaluations before the first step) of an explicit Runge-Kutta
    solver from its tableau, or None for a solver whose count its type does not tell."""
    if isinstance(solver, dfx.Euler):
        return 1, 0
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, dfx.AbstractERK) or not isinstance(tableau, dfx.ButcherTableau):
        return None
    stages = len(tableau.c) + 1
    fsal = bool(tableau.fsal)
    return stages - int(fsal), int(fsal)


def _sde_counts(solver: dfx.AbstractSolver) -> tuple[int, int] | None:
    """(drift evaluations per attempted step, 0) of an SDE solver: Euler-Maruyama, a stochastic
    Runge-Kutta solver from its tableau, or an explicit Runge-Kutta one without first-same-as-last;
    None otherwise."""
    if isinstance(solver, dfx.AbstractSRK):
        tableau = solver.tableau
        ignored = 0 if tableau.ignore_stage_f is None else int(np.sum(tableau.ignore_stage_f))
        return len(tableau.b_sol) - ignored, 0
    counts = _erk_counts(solver)
    return counts if counts is not None and counts[1] == 0 else None


def evaluations_per_step(solver: str | dfx.AbstractSolver) -> tuple[int, int]:
    """(new field evaluations per attempted step, evaluations once at the start) of a named solver or
    an explicit Runge-Kutta one.

    A first-same-as-last (FSAL) tableau reuses its last stage as the next step's first, so it pays one
    evaluation up front and one fewer per step (and one more after each jump time it steps over).
    """
    counts = _erk_counts(_solver(solver))
    if counts is None:
        raise ValueError(f"{solver_name(solver)} is not an explicit Runge-Kutta solver: its evaluations per step "
                         "are not known from its type.")
    return counts


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


class _CountJumps(dfx.AbstractAdaptiveStepSizeController):
    """Another adaptive controller, which also counts the attempted steps that start just after a jump
    time: an FSAL solver evaluates its first stage again on each (Diffrax's `made_jump`), which no step
    count shows. The count is the state's last entry (`SaveAt(controller_state=True)`)."""

    controller: dfx.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return _CountJumps(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return t1, (inner, jnp.asarray(False), jnp.asarray(0, jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner, after_jump, count = controller_state
        keep, next_t0, next_t1, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner)
        count = count + after_jump.astype(jnp.int32)  # this attempt started after a jump
        after_jump = jnp.where(keep, made_jump, after_jump)  # as diffeqsolve keeps made_jump
        return keep, next_t0, next_t1, made_jump, (inner, after_jump, count), result


def _controller(
    stepsize_controller, rtol, atol, num_steps, ts, t0, t1, jump_ts
) -> tuple[dfx.AbstractStepSizeController, float | None, jnp.ndarray, jnp.ndarray]:
    """(controller, dt0, t0, t1) from `solve`'s arguments."""
    fixed = num_steps is not None or ts is not None
    tolerances = rtol is not None or atol is not None
    if stepsize_controller is not None:
        if tolerances:
            raise ValueError("Give either stepsize_controller or rtol/atol (a PIDController's short form), not both.")
        if isinstance(stepsize_controller, dfx.AbstractAdaptiveStepSizeController):
            if fixed:
                raise ValueError("An adaptive stepsize_controller chooses its own steps; drop num_steps and ts.")
            controller = stepsize_controller
        elif isinstance(stepsize_controller, dfx.StepTo):
            return stepsize_controller, None, jnp.asarray(stepsize_controller.ts[0]), jnp.asarray(stepsize_controller.ts[-1])
        else:  # ConstantStepSize and other fixed controllers: num_steps gives dt0
            if num_steps is None:
                raise ValueError(f"{type(stepsize_controller).__name__} takes its step size from num_steps; give it.")
            return stepsize_controller, (t1 - t0) / num_steps, jnp.asarray(t0), jnp.asarray(t1)
    elif fixed == tolerances:
        raise ValueError(
            "solve needs exactly one of: num_steps / ts (fixed steps), rtol / atol (adaptive steps) or an adaptive "
            f"stepsize_controller; got num_steps={num_steps}, ts={'given' if ts is not None else None}, "
            f"rtol={rtol}, atol={atol}."
        )
    elif fixed:
        if ts is None:
            ts = t0 + (t1 - t0) * np.linspace(0.0, 1.0, num_steps + 1)
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be a 1-D grid of at least two times; got shape {ts.shape}.")
        return dfx.StepTo(ts), None, ts[0], ts[-1]
    else:
        rtol = atol if rtol is None else rtol
        atol = rtol if atol is None else atol
        controller = dfx.PIDController(rtol=rtol, atol=atol, pcoeff=PCOEFF, icoeff=ICOEFF)
    inside = [float(t) for t in (jump_ts or ()) if t0 < t < t1]
    if inside:  # stepped to exactly, with no rejected steps to locate them
        controller = dfx.ClipStepSizeController(controller, jump_ts=inside)
    # An explicit first step: Diffrax's own selection would add evaluations we'd have to guess.
    return _CountJumps(controller), (t1 - t0) / 64, jnp.asarray(t0), jnp.asarray(t1)


def solve(
    field: Callable[[Float[Array, ""], PyTree], PyTree],
    x0: PyTree,
    *,
    solver: str | dfx.AbstractSolver = "euler",
    num_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    ts: Sequence[float] | ArrayLike | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    save_ts: Sequence[float] | ArrayLike | None = None,
    jump_ts: Sequence[float] | None = None,
    max_steps: int = 4096,
    on_failure: str = "raise",
    diffusion: Diffusion | None = None,
    last_step: str | None = None,
    last_step_size: float = 0.04,
    key: Array | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """Integrate dx/dt = field(t, x) from t0 to t1 with a Diffrax solver, or the flow's SDE.

    Arguments:
        field: the velocity `field(t, x)`, x any pytree.
        x0: the state at t0.
        solver: a name from SOLVERS or any `diffrax.AbstractSolver`, a user's own `AbstractERK`
            tableau included.
        num_steps, ts: fixed steps, a uniform grid of `num_steps` or the grid `ts` (t0 to t1).
        rtol, atol: adaptive steps by a `diffrax.PIDController` (one defaults to the other).
        stepsize_controller: any `diffrax.AbstractStepSizeController` instead of the short forms
            (e.g. a PIDController with its own coefficients, dtmin and dtmax).
        save_ts: times at which to also return the state.
        jump_ts: times where the field jumps (the guidance interval's ends): an adaptive solve steps
            to them exactly instead of rejecting steps to find them.
        max_steps: the most steps an adaptive solve attempts.
        on_failure: "raise" (the default) stops a solve that does not reach t1, or whose final state is
            not finite, with Diffrax's error or `NONFINITE_MESSAGE`, inside a jit too; "return" gives the
            partial state, with `stats["result"]` nonzero (`NONFINITE` for a non-finite state).
        diffusion: None solves the ODE. A `Diffusion` w(t) solves the SDE with the same marginals,
            dX = (v + w·∇log p_t) dt + √(2w) dW with ∇log p_t = -(x - t·v)/(1 - t) (see `rfdit.sde`),
            as `MultiTerm(ODETerm, ControlTerm)` over a `VirtualBrownianTree`. `solver` is then a name
            from `rfdit.sde.SDE_SOLVERS` ("euler" is Euler-Maruyama; "shark", "sra1" and "sea" are
            Diffrax's additive-noise solvers) or a solver object.
        last_step: for the SDE, the solve stops at t1 - last_step_size and takes SiT's last step to t1:
            "mean" (the drift without noise), "euler" (the velocity alone) or "tweedie" (E[x1 | x_t],
            equal to "euler" on this path); None runs the SDE to t1. `num_steps` and `ts` then cover
            [t0, t1 - last_step_size] (SiT's and REPA's "250 steps" are 249 steps and a last step
            of 0.04: 250 evaluations).
        key: the SDE's Brownian motion, one key for the whole state or one key per sample along the
            leading axis of every leaf (shape (B,)): sample i then depends on its own state and key[i]
            only. The path is a `VirtualBrownianTree` resolved to 2^-14 of the interval (2^-16 for
            adaptive steps; finer if the steps are), so fixed-step solves of up to 4,096 steps with one
            key share one path, and their errors are strong errors.

    Returns:
        The state at t1 and stats: `nfe` (field evaluations: rejected steps, the FSAL start, the
        first-stage re-evaluations after jump times and the SDE's last step included; None for a
        solver whose count its type does not tell), `num_steps` (without the last step),
        `num_accepted_steps`, `num_rejected_steps`, `result` (Diffrax's result code; 0 is success),
        `t_reached` and, with `save_ts`, `ys`.
    """
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure (={on_failure!r}) must be one of {ON_FAILURE}.")
    stochastic = diffusion is not None
    if not stochastic and (key is not None or last_step is not None):
        raise ValueError("key and last_step belong to the SDE; give diffusion=rfdit.Diffusion(...) too, or drop them.")
    if stochastic:
        if key is None:
            raise ValueError("The SDE needs a key for its Brownian motion: solve(..., diffusion=..., key=key).")
        if last_step is not None and last_step not in sde.LAST_STEPS:
            raise ValueError(f"last_step (={last_step!r}) must be one of {list(sde.LAST_STEPS)} or None.")
        if last_step is not None and not 0 < last_step_size < t1 - t0:
            raise ValueError(f"last_step_size (={last_step_size}) must lie in (0, t1 - t0 = {t1 - t0}).")
    solver_obj = _solver(solver, stochastic=stochastic)
    if isinstance(solver_obj, dfx.Euler) and (rtol is not None or atol is not None or isinstance(
            stepsize_controller, dfx.AbstractAdaptiveStepSizeController)):
        raise ValueError(
            "euler has no error estimate, so it cannot step adaptively; give num_steps, or pick one of "
            f"{['heun', 'shark', 'sra1'] if stochastic else [s for s in SOLVERS if s != 'euler']} for rtol/atol."
        )
    t_end = t1 - last_step_size if stochastic and last_step is not None else t1
    controller, dt0, t0, t_end = _controller(stepsize_controller, rtol, atol, num_steps, ts, t0, t_end, jump_ts)
    if stochastic:
        _check_sde_interval(diffusion, t0, t_end, t1, last_step, last_step_size)
    counting = isinstance(controller, _CountJumps)
    steps_budget = max_steps if isinstance(controller, dfx.AbstractAdaptiveStepSizeController) else None
    if isinstance(controller, dfx.StepTo):
        steps_budget = controller.ts.shape[0] - 1
    elif steps_budget is None:
        steps_budget = max(max_steps, num_steps or 0)
    saveat = dfx.SaveAt(t1=True, controller_state=counting) if save_ts is None else \
        dfx.SaveAt(ts=jnp.asarray(save_ts), t1=True, controller_state=counting)
    solver_state = None
    if stochastic:
        adaptive = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
        levels = 16 if adaptive else 14
        smallest, span = (None if adaptive else _smallest_step(controller, dt0)), _concrete(t_end - t0)
        if smallest is not None and span is not None:  # leaves at most a quarter of the smallest step
            levels = max(levels, int(np.ceil(np.log2(span / smallest))) + 2)
        brownian = sde.brownian_path(key, x0, t0, t_end, (t_end - t0) * 2.0**-levels, sde.levy_area(solver_obj))
        sde_drift = sde.drift(field, diffusion)
        term = dfx.MultiTerm(dfx.ODETerm(lambda t, x, args: sde_drift(t, x)),
                             sde.diffusion_term(diffusion, brownian, x0))
        counts = _sde_counts(solver_obj)
    else:
        term = dfx.ODETerm(lambda t, x, args: field(t, x))
        counts = _erk_counts(solver_obj)
        if counts is not None and counts[1]:
            # FSAL: evaluate f(t0, x0) once here. Diffrax would otherwise re-evaluate the first
            # stage on every rejected attempt of the first step, which no step count reveals.
            solver_state = (jnp.asarray(False), field(jnp.asarray(t0), x0))
    sol = dfx.diffeqsolve(
        term, solver_obj, t0, t_end, dt0, x0, solver_state=solver_state, stepsize_controller=controller,
        saveat=saveat, max_steps=steps_budget, throw=on_failure == "raise",
    )
    nfe = None
    if counts is not None:
        per_step, at_start = counts
        nfe = per_step * sol.stats["num_steps"] + at_start
        if counting and at_start:
            nfe = nfe + sol.controller_state[-1]
        if stochastic and last_step is not None:
            nfe = nfe + 1
        nfe = jnp.asarray(nfe, jnp.int32)
    stats = {
        "nfe": nfe,
        "num_steps": sol.stats["num_steps"],
        "num_accepted_steps": sol.stats["num_accepted_steps"],
        "num_rejected_steps": sol.stats["num_rejected_steps"],
        "result": sol.result._value,  # 0: success; see diffrax.RESULTS
        "t_reached": sol.ts[-1],
    }
    # Diffrax stacks the saved states in time order: save_ts first, then t1.
    x1 = jax.tree_util.tree_map(lambda y: y[-1], sol.ys)
    if save_ts is not None:
        stats["ys"] = jax.tree_util.tree_map(lambda y: y[:-1], sol.ys)
    if stochastic and last_step is not None:
        reached = stats["result"] == 0
        stepped = sde.last_step(last_step, field, diffusion, sol.ts[-1], x1, last_step_size)
        x1 = jax.tree_util.tree_map(lambda a, b: jnp.where(reached, a, b), stepped, x1)
        stats["t_reached"] = jnp.where(reached, sol.ts[-1] + last_step_size, sol.ts[-1])
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(y)) for y in jax.tree_util.tree_leaves(x1)]))
    stats["result"] = jnp.where((stats["result"] == 0) & ~finite, NONFINITE, stats["result"])
    if on_failure == "raise":
        x1 = eqx.error_if(x1, ~finite, NONFINITE_MESSAGE)
    return x1, stats


def _concrete(x) -> float | None:
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _smallest_step(controller, dt0) -> float | None:
    if isinstance(controller, dfx.StepTo):
        try:
            return float(np.min(np.diff(np.asarray(controller.ts))))
        except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None
    return None if dt0 is None else _concrete(dt0)


def _check_sde_interval(diffusion, t0, t_end, t1, last_step, last_step_size):
    start, end = _concrete(t0), _concrete(t_end)
    if start is not None and diffusion.singular_at(start):
        raise ValueError(f"The {diffusion.form} diffusion is singular at t = 0; start the SDE at a small t0 > 0 "
                         "(SiT's --sample-eps is 1e-3).")
    if end is None:
        return
    if last_step is None:
        if diffusion.singular_at(end):
            raise ValueError(f"The {diffusion.form} diffusion makes the score term singular at t = 1; take a "
                             "last step (last_step='mean', SiT's default) or stop before t = 1.")
    elif abs(end + last_step_size - t1) > 1e-6:
        raise ValueError(f"The SDE's grid ends at t = {end:.6g}, but with last_step_size={last_step_size} it must "
                         f"end at t1 - last_step_size = {t1 - last_step_size:.6g}.")


def failure_message(
    stats: dict, *, solver, rtol=None, atol=None, max_steps=None, stepsize_controller=None, t1: float = 1.0
) -> str | None:
    """None if every solve in `stats` reached its end with a finite state, else one line that names the
    solver, its tolerances and max_steps, how many solves failed, the earliest time reached and Diffrax's
    reason. A per-sample `stats["failed"]` (from `sample`) counts the samples; else `stats["result"]`."""
    result = np.asarray(stats["result"])
    failed = np.asarray(stats["failed"]) if "failed" in stats else result != 0
    if not failed.any():
        return None
    result = np.broadcast_to(result, failed.shape)
    reached = np.asarray(stats["t_reached"])
    reached = reached[failed] if reached.shape == failed.shape else reached
    code = int(result[failed].reshape(-1)[0])
    reason = dfx.RESULTS._index_to_message[code] if 0 <= code < len(dfx.RESULTS._index_to_message) else f"code {code}"
    how = f"rtol={rtol}, atol={atol}" if stepsize_controller is None else f"stepsize_controller={stepsize_controller}"
    count = f"{int(failed.sum())} of {failed.size} solves" if failed.size > 1 else "the solve"
    if code == NONFINITE:
        return (f"The {solver_name(solver)} solve ({how}, max_steps={max_steps}) ended with NaN or inf in {count}: "
                "the field diverged (a cfg_scale too large, too few steps for the solver) or the model's parameters "
                "are non-finite. Check the checkpoint, lower cfg_scale or take more steps; on_failure='return' "
                "gives the partial result.")
    furthest_behind = np.min(reached) if t1 >= 0.5 else np.max(reached)  # forwards to 1 or backwards to 0
    return (f"The {solver_name(solver)} solve ({how}, max_steps={max_steps}) stopped before t={t1:g}: {count} reached "
            f"only t={float(furthest_behind):.4g}. Diffrax: {reason} Raise max_steps, loosen the tolerances or use "
            "fixed steps (num_steps); on_failure='return' gives the partial result.")


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
def _sample(model, noise, labels, cfg_scale, keys, solver_kwargs, guidance_interval, cfg_channels, per_sample):
    if per_sample:
        def one(x, y, k):
            field = guided_field(model, y[None], cfg_scale, guidance_interval=guidance_interval,
                                 cfg_channels=cfg_channels)
            # a batch of one with its own key: the same Brownian path as in a batch
            x1, stats = solve(field, x[None], key=None if k is None else k[None], **solver_kwargs)
            return x1[0], stats

        return jax.vmap(one)(noise, labels, keys)
    field = guided_field(model, labels, cfg_scale, guidance_interval=guidance_interval, cfg_channels=cfg_channels)
    return solve(field, noise, key=keys, **solver_kwargs)


def sample(
    model,
    noise: Float[Array, "b H W C"],
    labels: Int[Array, " b"],
    *,
    cfg_scale: float | Float[Array, ""] | None = 1.0,
    solver: str | dfx.AbstractSolver = "euler",
    num_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    time_shift: float = 1.0,
    ts: Sequence[float] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    per_sample: bool = False,
    save_ts: Sequence[float] | None = None,
    max_steps: int = 4096,
    on_failure: str = "raise",
    diffusion: Diffusion | None = None,
    last_step: str | None = None,
    last_step_size: float = 0.04,
    t0: float = 0.0,
    key: Array | None = None,
) -> tuple[Float[Array, "b H W C"], dict[str, Any]]:
    """Generate a batch by integrating the model's (guided) velocity from noise to data.

    `cfg_scale`: 1 (a Python number) is plain conditional sampling with one pass of B;
    any other value, or an array, guides with one pass of 2B (0 is unconditional).
    Fixed-step solvers take `num_steps` (with an optional `time_shift`) or `ts`;
    adaptive ones take `rtol`/`atol` or a `stepsize_controller`; `solver` is a name or any
    Diffrax solver (see `solve`). The guidance interval's ends are jump times of an adaptive solve.

    Adaptive steps treat the whole batch as one ODE state with one step size by
    default: a vmapped solve runs until its slowest sample is done anyway, so
    per-sample stepping (`per_sample=True`, each sample its own steps and NFE) costs
    at least as much wall time on batched hardware; it exists for sampling studies.

    A solve that does not reach t = 1, or ends with NaN or inf, raises `SolveFailed` (checked on the
    host, naming the solver, its tolerances, max_steps and the time reached); `on_failure="return"`
    gives the partial images, with `stats["result"]` and a per-sample `stats["failed"]`.

    `diffusion` (a `Diffusion`), `last_step`, `last_step_size` and `key` sample the SDE with the
    flow's marginals instead (see `solve`); `t0` is where the noise starts (SBDM needs t0 > 0, SiT's
    1e-3). `key` is one key, split per sample as `fold_in(key, i)`, or one key per sample (B,): with
    fixed steps or `per_sample=True` a sample depends only on its noise and its key, not on the rest
    of the batch. A time shift applies to the SDE's grid on [t0, 1 - last_step_size].

    SiT's SDE recipe (FID 2.06 on ImageNet-256 with SiT-XL/2): `diffusion=Diffusion("sigma"),
    last_step="mean", last_step_size=0.04, solver="euler", num_steps=249` (250 evaluations),
    `cfg_scale=1.5, cfg_channels=3`.
    """
    if noise.ndim != 4 or labels.shape != noise.shape[:1]:
        raise ValueError(f"sample expects noise (B, H, W, C) and labels (B,); got {noise.shape} and {labels.shape}.")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure (={on_failure!r}) must be one of {ON_FAILURE}.")
    guide = not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1) and cfg_scale is not None
    scale = jnp.asarray(cfg_scale, noise.dtype) if guide else None
    if diffusion is None and (key is not None or last_step is not None):
        raise ValueError("key and last_step belong to the SDE; give diffusion=rfdit.Diffusion(...) too, or drop them.")
    if diffusion is not None and key is None:
        raise ValueError("The SDE needs a key: sample(..., diffusion=..., key=key).")
    keys = None if key is None else sde.per_sample_keys(key, noise.shape[0])
    t_end = 1.0 - last_step_size if diffusion is not None and last_step is not None else 1.0
    if ts is None and num_steps is not None and time_shift != 1.0:
        ts = t0 + (t_end - t0) * time_grid(num_steps, time_shift)
        num_steps = None
    solver_kwargs = dict(
        solver=solver, num_steps=num_steps, rtol=rtol, atol=atol, stepsize_controller=stepsize_controller,
        max_steps=max_steps, ts=None if ts is None else tuple(float(t) for t in ts),
        save_ts=None if save_ts is None else tuple(float(t) for t in save_ts),
        jump_ts=tuple(float(t) for t in guidance_interval) if guide and guidance_interval is not None else None,
        on_failure="return",  # checked below, on the host, with the settings named
        diffusion=diffusion, last_step=last_step, last_step_size=last_step_size, t0=t0,
    )
    images, stats = _sample(model, noise, labels, scale, keys, solver_kwargs, guidance_interval, cfg_channels,
                            per_sample)
    result = jnp.broadcast_to(stats["result"], labels.shape)
    # one non-finite sample makes a batch's solve NONFINITE; flag the samples that are
    finite = jnp.all(jnp.isfinite(images), axis=tuple(range(1, images.ndim)))
    stats = dict(stats, failed=jnp.where(result == NONFINITE, ~finite, result != 0))
    if on_failure == "raise":
        message = failure_message(stats, solver=solver, rtol=rtol, atol=atol, max_steps=max_steps,
                                  stepsize_controller=stepsize_controller)
        if message is not None:
            raise SolveFailed(message, stats)
    return images, stats
