"""The flow's SDE: the same marginals as the ODE, with noise injected and removed again.

On the linear path x_t = (1-t)·x0 + t·x1 (t = 0 noise, t = 1 data) the velocity gives the score:
E[x0 | x_t] = x_t - t·v, and x_t given x1 is N(t·x1, (1-t)²·I), so

    ∇log p_t(x) = -(x - t·v) / (1 - t).

For any w(t) ≥ 0 the SDE

    dX = (v + w(t)·∇log p_t) dt + √(2·w(t)) dW

has the marginals p_t of the ODE dX = v dt (the added drift and the noise cancel in the Fokker-Planck
equation). This is SiT's SDE sampler (`transport/transport.py`, `transport/path.py`): `Diffusion` names
its w(t), `last_step` its last step. Because w depends on t alone, the noise is additive, which is what
the additive-noise Runge-Kutta solvers of Diffrax (ShARK, SRA1, SEA) are built for.

Time: SiT's linear path runs in rfdit's time (its x_t = t·x1 + (1-t)·ε, sampled from t = 0), so its
w(t) and last steps are copied with t unchanged. REPA runs time backwards (τ = 1 - t, x_τ = (1-τ)·x + τ·ε);
its Euler-Maruyama sampler's diffusion g² = 2τ and drift v_repa - τ·score are, in rfdit's time, the
"sigma" form w = 1 - t.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
"""SiT's `--diffusion-form` choices, by the same names (any case)."""

LAST_STEPS = ("mean", "tweedie", "euler")
BROWNIAN_STREAM = 0xB20
"""fold_in stream of the SDE's Brownian keys (generation, studies), apart from the noise's"""
"""SiT's `--last-step` choices, lower-case; None is no last step."""

SDE_SOLVERS: dict[str, type[dfx.AbstractSolver]] = {
    "euler": dfx.Euler,  # Euler-Maruyama: strong order 1 for additive noise
    "heun": dfx.Heun,  # strong order 1 for additive noise (Itô = Stratonovich there)
    "sea": dfx.SEA,  # shifted Euler: strong order 1, one drift evaluation, needs the space-time Lévy area
    "shark": dfx.ShARK,  # strong order 1.5 for additive noise, two drift evaluations, adaptive
    "sra1": dfx.SRA1,  # strong order 1.5 for additive noise, two drift evaluations, adaptive
}
"""The SDE solvers that have a name: `solve(..., diffusion=..., solver=name)`. Any other Diffrax solver
object can be given too."""


def _leaves(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


class Diffusion(eqx.Module):
    """The diffusion w(t) of the flow's SDE, by SiT's names, in rfdit's time (t = 0 noise, t = 1 data):

    | form | w(t) | |
    | --- | --- | --- |
    | `constant` | norm | the score term is singular at t = 1: needs a last step |
    | `SBDM` | norm·(1-t)/t | score-based diffusion's; singular at t = 0: start at a small t0 (SiT: 1e-3) |
    | `sigma` | norm·(1-t) | SiT's default (the path's noise scale σ_t = 1-t) and REPA's sampler |
    | `linear` | norm·(1-t) | the same as `sigma` on the linear path |
    | `decreasing` | (norm·cos(πt) + 1)²/4 | |
    | `increasing-decreasing` | norm·sin²(πt) | |

    `norm` may be an array (a sweep over it then does not recompile).
    """

    form: str = eqx.field(static=True)
    norm: Float[Array, ""]

    def __init__(self, form: str = "sigma", norm: float | Float[ArrayLike, ""] = 1.0):
        canonical = {f.lower(): f for f in DIFFUSION_FORMS}
        if not isinstance(form, str) or form.lower() not in canonical:
            raise ValueError(f"Unknown diffusion form {form!r}; give one of {list(DIFFUSION_FORMS)}.")
        if isinstance(norm, (int, float)) and not (np.isfinite(norm) and norm >= 0):
            raise ValueError(f"norm (={norm}) must be a finite number >= 0.")
        self.form = canonical[form.lower()]
        self.norm = jnp.asarray(norm, dtype=float)

    def __call__(self, t: Float[ArrayLike, ""]) -> Float[Array, ""]:
        """w(t)."""
        t = jnp.asarray(t)
        norm = self.norm.astype(t.dtype)
        if self.form == "constant":
            return norm * jnp.ones_like(t)
        if self.form == "SBDM":
            # SiT's compute_drift(x, t)[1] = (α'/α)·σ² - σ·σ' with α = t, σ = 1 - t
            return norm * (1 - t) / t
        if self.form in ("sigma", "linear"):
            return norm * (1 - t)
        if self.form == "decreasing":
            return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2
        return norm * jnp.sin(jnp.pi * t) ** 2

    def score_weight(self, t: Float[ArrayLike, ""]) -> Float[Array, ""]:
        """w(t) / (1 - t), the factor of -(x - t·v) in the drift; finite at t = 1 where w vanishes there."""
        t = jnp.asarray(t)
        norm = self.norm.astype(t.dtype)
        s = 1 - t
        if self.form == "constant":
            return norm / s
        if self.form == "SBDM":
            return norm / t
        if self.form in ("sigma", "linear"):
            return norm * jnp.ones_like(t)
        if self.form == "increasing-decreasing":
            return norm * jnp.pi**2 * s * jnp.sinc(s) ** 2  # sin²(πt)/(1-t) without 0/0 at t = 1
        w = self(t)
        return jnp.where(s > 0, w / jnp.where(s > 0, s, 1), jnp.where(w == 0, 0, jnp.inf))

    def singular_at(self, t: float) -> bool:
        """Whether the drift or the noise is infinite at t = 0 or t = 1 (checked before a solve)."""
        if t <= 0:
            return self.form == "SBDM"
        if t >= 1:
            if self.form == "constant":
                return True
            if self.form == "decreasing":  # w(1) = (1 - norm)²/4
                try:
                    return float(self.norm) != 1.0
                except jax.errors.ConcretizationTypeError:
                    return True
        return False


def score_from_velocity(velocity: PyTree, x: PyTree, t: Float[ArrayLike, ""]) -> PyTree:
    """∇log p_t(x) = -(x - t·v) / (1 - t) on the linear path (t = 0 noise); singular at t = 1."""
    return _leaves(lambda v, y: -(y - t * v) / (1 - t), velocity, x)


def drift(field: Callable, diffusion: Diffusion) -> Callable[[Float[Array, ""], PyTree], PyTree]:
    """The SDE's drift v + w(t)·∇log p_t = v - (w(t)/(1-t))·(x - t·v), from the velocity `field(t, x)`."""

    def f(t, x):
        v = field(t, x)
        k = diffusion.score_weight(t)
        return _leaves(lambda vi, xi: vi - k.astype(xi.dtype) * (xi - t.astype(xi.dtype) * vi), v, x)

    return f


def last_step(kind: str, field: Callable, diffusion: Diffusion, t: Float[Array, ""], x: PyTree, size) -> PyTree:
    """SiT's last step from t to t + size, deterministic (one velocity evaluation).

    - "mean": one Euler step of the SDE's drift without its noise.
    - "euler": one Euler step of the ODE (the velocity alone).
    - "tweedie": Tweedie's E[x1 | x_t] = (x + (1-t)²·∇log p_t) / t (SiT's x/α + σ²/α·score with α = t,
      σ = 1-t), which is x + (1-t)·v: on the linear path it equals "euler" with size = 1 - t.
    """
    v = field(t, x)
    if kind == "euler":
        return _leaves(lambda vi, xi: xi + jnp.asarray(size, xi.dtype) * vi, v, x)
    if kind == "tweedie":
        return _leaves(lambda vi, xi: xi + (1 - t).astype(xi.dtype) * vi, v, x)
    k = diffusion.score_weight(t)
    return _leaves(
        lambda vi, xi: xi + jnp.asarray(size, xi.dtype) * (vi - k.astype(xi.dtype) * (xi - t.astype(xi.dtype) * vi)),
        v, x)


def diffusion_term(diffusion: Diffusion, brownian: dfx.AbstractBrownianPath, x0: PyTree) -> dfx.ControlTerm:
    """√(2·w(t))·dW on every element of the state: a scalar times the identity, independent of x."""
    structure = jax.eval_shape(lambda: x0)

    def g(t, x, args):
        return lx.MulLinearOperator(lx.IdentityLinearOperator(structure), jnp.sqrt(2 * diffusion(t)))

    return dfx.ControlTerm(g, brownian)


def levy_area(solver: dfx.AbstractSolver) -> type:
    """The cheapest Brownian increment a solver accepts (ShARK, SRA1 and SEA need the space-time Lévy area)."""
    minimal = getattr(solver, "minimal_levy_area", dfx.BrownianIncrement)
    for kind in (dfx.BrownianIncrement, dfx.SpaceTimeLevyArea, dfx.SpaceTimeTimeLevyArea):
        if issubclass(kind, minimal):
            return kind
    raise ValueError(f"{type(solver).__name__} needs a Lévy area ({minimal.__name__}) that no Brownian path here gives.")


class PerSampleBrownianPath(dfx.AbstractBrownianPath):
    """Brownian motions, one per slice along the leading axis of every leaf of the state, each a
    `VirtualBrownianTree` on its own key: slice i's path depends on `keys[i]` only, not on the batch."""

    t0: Float[Array, ""]
    t1: Float[Array, ""]
    tol: Float[Array, ""]
    shape: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)
    keys: Array

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        def one(key):
            tree = dfx.VirtualBrownianTree(self.t0, self.t1, self.tol, self.shape, key, self.levy_area)
            return tree.evaluate(t0, t1, left, use_levy)

        out = jax.vmap(one)(self.keys)
        if use_levy:  # the step's length is the same for every sample
            out = eqx.tree_at(lambda inc: inc.dt, out, out.dt[0])
        return out


def typed_key(key) -> Array:
    """A new-style key array from a new-style or a raw (uint32, last axis 2) key."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jr.wrap_key_data(key)


def brownian_path(key, x0: PyTree, t0, t1, tol, levy: type) -> dfx.AbstractBrownianPath:
    """A Brownian motion shaped like x0 on [t0, t1]: one tree for a single key, or one per sample for a
    key per slice along x0's leading axis (keys of shape (B,))."""
    key = typed_key(key)
    leaves = jax.tree_util.tree_leaves(x0)
    if key.ndim == 0:
        shape = _leaves(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), x0)
        return dfx.VirtualBrownianTree(t0, t1, tol, shape, key, levy)
    if key.ndim != 1 or any(x.ndim < 1 or x.shape[0] != key.shape[0] for x in leaves):
        raise ValueError(f"key must be one key or one key per sample along the state's leading axis; got keys "
                         f"of shape {key.shape} for a state of shapes {[x.shape for x in leaves]}.")
    shape = _leaves(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), x0)
    as_array = lambda t: jnp.asarray(t, dtype=float)
    return PerSampleBrownianPath(as_array(t0), as_array(t1), as_array(tol), shape, levy, key)


def per_sample_keys(key, batch: int) -> Array:
    """Keys for a batch: `fold_in(key, i)` for sample i of one key, or the given (B,) keys, so that a
    sample's noise depends on its key and its position in the batch only."""
    key = typed_key(key)
    if key.ndim == 0:
        return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(batch))
    if key.shape != (batch,):
        raise ValueError(f"key must be one key or one key per sample ({batch},); got shape {key.shape}.")
    return key
