"""Frozen, validated configuration dataclasses.

Every config round-trips through JSON (`to_dict` / `from_dict`) and raises a
`ValueError` naming the offending value when it is invalid. An explicit value
always beats a preset's value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import diffrax as dfx

from .sampling import ICOEFF, PCOEFF, SOLVERS  # the one list of solver names; the default PI controller
from .sde import DIFFUSION_FORMS, SDE_SOLVERS, Diffusion

# name -> (hidden_size, depth, num_heads, patch_size or None, mlp_ratio or None)
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PRESETS: dict[str, dict[str, Any]] = {
    # The Flax original's names.
    "debug": dict(hidden_size=64, depth=2, num_heads=2, patch_size=8, mlp_ratio=1.0),
    "big": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2, mlp_ratio=4.0),
    "semilarge": dict(hidden_size=1024, depth=22, num_heads=16, patch_size=2, mlp_ratio=4.0),
    "large": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2, mlp_ratio=4.0),
    "xlarge": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, mlp_ratio=4.0),
}
for _name, (_h, _d, _n) in _SIZES.items():
    for _p in (2, 4, 8):
        PRESETS[f"{_name}/{_p}"] = dict(hidden_size=_h, depth=_d, num_heads=_n, patch_size=_p, mlp_ratio=4.0)

TIME_CONVENTIONS = ("rfdit", "repa")


def compute_dtype(precision: str) -> str:
    """The matmul compute dtype that a `--precision` setting ("float32" or "bf16") names."""
    if precision not in ("float32", "bf16"):
        raise ValueError(f"precision (={precision!r}) must be 'float32' or 'bf16'.")
    return "bfloat16" if precision == "bf16" else "float32"


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} (={value}) must be positive.")


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; valid fields: {sorted(names)}.")
        return cls(**data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class DiTConfig(_JsonMixin):
    """Architecture of a DiT (Peebles & Xie, 2023).

    `time_scale` multiplies t in [0, 1] before the sinusoidal features. rfdit's default is 10: at DiT's
    1000 (or the Flax original's 10000) the trained velocity ripples in t and second-order solvers
    converge at first order, while 10 is as smooth as SiT's 1 and kept the digits run's class accuracy
    (docs/sampling_study.md, "The time embedding's scale"). Saved models keep the value they were
    trained with. `time_convention` says in which direction the
    network was trained: "rfdit" (t=0 noise, t=1 data, v = x1 - x0) or "repa"
    (t=0 data, predicting noise - data); samplers turn the latter into ours.
    """

    image_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = False
    time_scale: float = 10.0
    time_convention: str = "rfdit"
    t_conditioning: bool = True
    qk_norm: bool = False

    def __post_init__(self):
        _check_positive(self, "image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                        "mlp_ratio", "num_classes")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size (={self.patch_size}) must divide image_size (={self.image_size}); "
                f"choose a patch size among {[p for p in (1, 2, 4, 8, 16) if self.image_size % p == 0]}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads (={self.num_heads}) must divide hidden_size (={self.hidden_size})."
            )
        if not float(self.mlp_ratio * self.hidden_size).is_integer():
            raise ValueError(
                f"mlp_ratio * hidden_size (={self.mlp_ratio} * {self.hidden_size}) must be an integer width."
            )
        if self.time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention (={self.time_convention!r}) must be one of {TIME_CONVENTIONS}.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DiTConfig":
        """A preset's architecture; every keyword given here beats the preset's value."""
        if name not in PRESETS:
            raise ValueError(f"Unknown DiT preset {name!r}; valid presets: {list(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def mlp_width(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def num_params(self) -> int:
        """DiT's trainable parameter count in closed form (the fixed position table excluded)."""
        h, d, p, c, k = self.hidden_size, self.depth, self.patch_size, self.in_channels, self.num_classes
        o, w = self.out_channels, self.mlp_width
        head_dim = h // self.num_heads
        block = (3 * h * h + 3 * h) + (h * h + h) + (2 * h * w + w + h) + (6 * h * h + 6 * h)
        if self.qk_norm:
            block += 4 * head_dim
        return ((c * p * p * h + h) + (256 * h + h + h * h + h) + (k + 1) * h + d * block
                + (2 * h * h + 2 * h + h * p * p * o + p * p * o))

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (2 per multiply-add, attention included)."""
        h, n, p, c, o = self.hidden_size, self.num_tokens, self.patch_size, self.in_channels, self.out_channels
        w = self.mlp_width
        per_block = n * (3 * h * h + h * h + 2 * h * w) + 2 * n * n * h  # linears + (QK^T and AV)
        embed = n * c * p * p * h + 256 * h + h * h
        modulation = self.depth * 6 * h * h + 2 * h * h
        final = n * h * p * p * o
        return 2 * (self.depth * per_block + embed + modulation + final)


@dataclass(frozen=True)
class FlowConfig(_JsonMixin):
    """The rectified-flow objective.

    `t_clip_max`: the Flax original forms x_t with min(t, 0.99) while the model and
    the target see the unclipped t; None turns it off.
    """

    t_sampler: str = "logit-normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    class_dropout_prob: float = 0.1
    t_clip_max: float | None = None

    def __post_init__(self):
        valid = ("uniform", "logit-normal", "log-normal")
        if self.t_sampler not in valid:
            raise ValueError(f"t_sampler (={self.t_sampler!r}) must be one of {list(valid)}.")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob (={self.class_dropout_prob}) must lie in [0, 1].")
        if self.t_std <= 0:
            raise ValueError(f"t_std (={self.t_std}) must be positive.")
        if self.t_clip_max is not None and not 0.0 < self.t_clip_max <= 1.0:
            raise ValueError(f"t_clip_max (={self.t_clip_max}) must lie in (0, 1] or be None.")


@dataclass(frozen=True)
class OptimConfig(_JsonMixin):
    """Adam with optional warm-up, clipping and decoupled weight decay, plus the EMA."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    def __post_init__(self):
        _check_positive(self, "lr", "eps")
        for name in ("beta1", "beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"OptimConfig.{name} (={value}) must lie in [0, 1).")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps (={self.warmup_steps}) must be >= 0.")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip (={self.grad_clip}) must be positive or None.")


@dataclass(frozen=True)
class SamplerConfig(_JsonMixin):
    """Every sampling setting that has a name or a number: what the run config, the sampling study,
    `sample.py` and `eval_fid.py` use. Solver and controller objects are arguments of `rfdit.solve`
    and `rfdit.sample`, not settings; `sample_kwargs` turns these settings into those arguments.

    Steps: fixed (`num_steps`, with `time_shift`, or an explicit grid `ts` from 0 to 1) or adaptive
    (`rtol`/`atol`, with the PID controller's `pcoeff`, `icoeff`, `dtmin`, `dtmax`, and `max_steps`; the
    coefficients default to `rfdit.sampling`'s PI controller, PCOEFF and ICOEFF).
    Guidance: `cfg_scale` on all channels or the first `cfg_channels`, only inside
    `guidance_interval` when given. `per_sample`: each sample its own adaptive steps.
    The SDE (`diffusion` not None): its form and `diffusion_norm`, the start time `sample_eps` and the
    last step (`last_step`, `last_step_size`).
    """

    solver: str = "euler"
    num_steps: int | None = 32
    rtol: float | None = None
    atol: float | None = None
    cfg_scale: float = 1.0
    time_shift: float = 1.0
    ts: tuple[float, ...] | None = None
    pcoeff: float = PCOEFF
    icoeff: float = ICOEFF
    dtmin: float | None = None
    dtmax: float | None = None
    max_steps: int = 4096
    cfg_channels: int | None = None
    guidance_interval: tuple[float, float] | None = None
    per_sample: bool = False
    diffusion: str | None = None
    diffusion_norm: float = 1.0
    sample_eps: float = 0.0
    last_step: str | None = None
    last_step_size: float = 0.04

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        for name in ("ts", "guidance_interval"):  # JSON lists back to tuples
            if data.get(name) is not None:
                data[name] = tuple(float(t) for t in data[name])
        return super().from_dict(data)

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `rfdit.sample` that these settings give (the SDE's need a `key` too)."""
        kwargs: dict[str, Any] = dict(solver=self.solver, cfg_scale=self.cfg_scale, max_steps=self.max_steps,
                                      guidance_interval=self.guidance_interval, cfg_channels=self.cfg_channels,
                                      per_sample=self.per_sample)
        if self.ts is not None:
            kwargs["ts"] = self.ts
        elif self.num_steps is not None:
            kwargs.update(num_steps=self.num_steps, time_shift=self.time_shift)
        elif (self.pcoeff, self.icoeff, self.dtmin, self.dtmax) == (PCOEFF, ICOEFF, None, None):
            kwargs.update(rtol=self.rtol, atol=self.atol)
        else:
            rtol = self.atol if self.rtol is None else self.rtol
            atol = self.rtol if self.atol is None else self.atol
            kwargs["stepsize_controller"] = dfx.PIDController(
                rtol=rtol, atol=atol, pcoeff=self.pcoeff, icoeff=self.icoeff, dtmin=self.dtmin, dtmax=self.dtmax)
        if self.diffusion is not None:
            kwargs.update(diffusion=Diffusion(self.diffusion, norm=self.diffusion_norm), last_step=self.last_step,
                          last_step_size=self.last_step_size, t0=self.sample_eps)
            if "ts" in kwargs or kwargs.get("time_shift", 1.0) != 1.0:
                raise ValueError("the SDE's fixed steps are a uniform grid of num_steps; drop ts and time_shift.")
            kwargs.pop("time_shift", None)
        return kwargs

    def __post_init__(self):
        if self.num_steps is None and self.rtol is None and self.atol is None:
            raise ValueError("SamplerConfig needs num_steps (fixed steps) or rtol/atol (adaptive steps).")
        if self.num_steps is not None and self.num_steps <= 0:
            raise ValueError(f"num_steps (={self.num_steps}) must be positive.")
        if self.time_shift <= 0 or not math.isfinite(self.time_shift):
            raise ValueError(f"time_shift (={self.time_shift}) must be a positive number.")
        names = SOLVERS if self.diffusion is None else SDE_SOLVERS
        if self.solver not in names:
            raise ValueError(f"solver (={self.solver!r}) must be one of {list(names)}"
                             f"{' (the SDE solvers)' if self.diffusion is not None else ''}.")
        if self.diffusion is not None and self.diffusion.lower() not in [f.lower() for f in DIFFUSION_FORMS]:
            raise ValueError(f"diffusion (={self.diffusion!r}) must be one of {list(DIFFUSION_FORMS)} or None (the ODE).")
        if self.ts is not None and (len(self.ts) < 2 or self.ts[0] != 0.0 or self.ts[-1] != 1.0
                                    or any(b <= a for a, b in zip(self.ts, self.ts[1:]))):
            raise ValueError(f"ts (={self.ts}) must rise from 0 to 1.")
        if self.max_steps < 1:
            raise ValueError(f"max_steps (={self.max_steps}) must be >= 1.")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"guidance_interval (={self.guidance_interval}) must be (lo, hi), 0 <= lo < hi <= 1.")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels (={self.cfg_channels}) must be positive or None.")
        if self.last_step not in (None, "mean", "tweedie", "euler"):
            raise ValueError(f"last_step (={self.last_step!r}) must be one of None, 'mean', 'tweedie', 'euler'.")
        _check_positive(self, "diffusion_norm", "last_step_size")
        if not 0.0 <= self.sample_eps < 1.0:
            raise ValueError(f"sample_eps (={self.sample_eps}) must lie in [0, 1).")
