"""Sampling studies: what each ODE and SDE solver's accuracy and sample quality cost, on a trained model.

`run_study(StudyConfig(load_dir=..., out=...))` (behind `experiments/sampling_study.py`)
samples the same noise and labels with every setting of a grid: fixed-step solvers at
several step counts (uniform or shifted time grids), adaptive solvers at several
tolerances, optionally several cfg scales and a guidance interval. For each it records

- `nfe`: velocity-field evaluations per sample (a guided evaluation is one pass of 2B);
- `seconds_per_sample`: wall time of the compiled solve (compilation excluded) / samples;
- `rms_error`: RMS over all pixels of the difference to a reference solution from the same
  noise (dopri8 at rtol = atol = 1e-7, every sample stepping on its own, the ODE state and
  the solver's arithmetic in float64; the DiT itself computes in float32, which sets the
  reference's floor, measured against a 10× tighter solve on a subset);
- quality: the digits evaluator's `class_acc`, `fd_feat`, `precision`, `recall` for digits
  models, and `fid` when reference statistics are given (`fid_stats`).

SDE rows (`diffusions`: SiT's diffusion forms, `rfdit.sde`) sample the flow's SDE with fixed
steps; their `rms_error` is against a fine solve (`sde_reference_steps` of the row's own solver, or of
`sde_reference_solver` if it needs the same Lévy area) of the same SDE on the same Brownian path from the
same noise, in the rows' float32, so it measures the solver's strong error; their quality columns sit
beside the ODE's.

Every row is one `rfdit.SamplerConfig`, so whatever a row shows can be sampled with its settings.

It also reproduces the Flax original's table shape (quality against 500/100/20/5/1 Euler
steps) and compares batch adaptive stepping (the batch is one ODE state with one step
size) with per-sample stepping (each sample its own steps, vmapped).

Outputs in `out`: study.csv, study.json, study.md (the tables), error_vs_nfe.png and
quality_vs_nfe.png (log-log, one line per solver).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import time
from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from . import sde
from .benchmarking import machine_info
from .checkpoint import load_model
from .config import SamplerConfig
from .metrics.digits import FIGURES, DigitsEvaluator
from .metrics.fid import compute_statistics, fid_inception, frechet_distance, load_statistics
from .plots import _pyplot
from .sampling import DIFFRAX_ICOEFF, DIFFRAX_PCOEFF, ICOEFF, PCOEFF, SOLVERS, SolverName, evaluations_per_step, sample


COLUMNS = (
    "solver", "num_steps", "rtol", "atol", "nfe", "seconds_per_sample", "rms_error",
    "class_acc", "fd_feat", "precision", "recall", "fid",
    "section", "cfg_scale", "time_shift", "guidance_interval", "stepping", "nfe_max", "rejected_steps",
    "compile_seconds",
    "num_failed", "diffusion", "diffusion_norm", "last_step",
)
QUALITY = (*FIGURES, "fid")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A sampling study of one checkpoint.

    The grid is cfg_scales × time_shifts × {full guidance, guidance interval} × (fixed-step
    solvers × steps ∪ adaptive solvers × tolerances). Time shifts apply to fixed steps only.
    """

    load_dir: str
    """a run folder, its checkpoints/ folder, or an export folder"""
    out: str
    """output folder (study.csv, study.json, study.md, plots)"""
    solvers: tuple[SolverName, ...] = tuple(SOLVERS)
    """solvers of the grid"""
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 500)
    """step counts for every solver (fixed steps; Euler only steps this way)"""
    tolerances: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
    """adaptive tolerances for every solver but Euler: rtol = atol = tolerance unless --atol is given"""
    atol: float | None = None
    """one absolute tolerance for all adaptive rows; the tolerances then set rtol only"""
    num_samples: int = 500
    """samples per setting, labels spread evenly over the classes; the same noise for every setting"""
    batch_size: int = 500
    """samples per compiled solve (the last batch is padded)"""
    cfg_scales: tuple[float, ...] | None = None
    """guidance scales (1: plain conditional); default the run's sampler cfg_scale"""
    time_shifts: tuple[float, ...] = (1.0,)
    """resolution shifts of the fixed-step time grid (1: uniform; s > 1: more steps near noise)"""
    guidance_interval: tuple[float, float] | None = None
    """also run every cfg_scale != 1 with guidance applied only for t in [lo, hi]"""
    max_nfe: int | None = 2000
    """skip fixed-step settings that would cost more evaluations per sample than this"""
    max_steps: int = 4096
    """adaptive step budget per solve"""
    pcoeff: float = PCOEFF
    """the adaptive rows' PID controller: proportional coefficient (0 with icoeff 1: Diffrax's I controller)"""
    icoeff: float = ICOEFF
    """the adaptive rows' PID controller: integral coefficient"""
    dtmin: float | None = None
    """the adaptive rows' smallest step (a solve that needs less fails)"""
    dtmax: float | None = None
    """the adaptive rows' largest step"""
    diffusions: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--diffusion",))] = ()
    """SDE rows: diffusion forms of rfdit.Diffusion (e.g. sigma increasing-decreasing); none: the ODE only.
    --diffusion is the same flag, as sample.py and eval_fid.py spell it"""
    sde_solvers: tuple[str, ...] = ("euler",)
    """the SDE rows' solvers (euler: Euler-Maruyama; heun, sea, shark, sra1)"""
    sde_steps: tuple[int, ...] = (32, 64, 128, 250)
    """the SDE rows' step counts (fixed steps)"""
    diffusion_norm: float = 1.0
    """the SDE's diffusion norm"""
    sample_eps: float = 0.0
    """the SDE's start time (SBDM needs > 0; SiT: 1e-3)"""
    last_step: str | None = "mean"
    """the SDE's last step (mean, tweedie, euler, or None)"""
    last_step_size: float = 0.04
    """the SDE's last step size"""
    sde_reference_solver: str | None = None
    """the SDE rows' reference solver (default: each row's own) with sde_reference_steps on the same Brownian
    path; it must need the rows' Lévy area (shark, sra1 and sea draw another path than euler and heun)"""
    sde_reference_steps: int = 4000
    """the SDE reference's fixed steps (Euler-Maruyama's strong error at 4000 steps is 1/16 of its error at 250)"""
    table_steps: tuple[int, ...] = (500, 100, 20, 5, 1)
    """Euler step counts of the original's table (quality against denoising steps)"""
    stepping_solvers: tuple[SolverName, ...] = ("dopri5",)
    """adaptive solvers compared with batch and per-sample stepping, at every tolerance"""
    reference_solver: SolverName = "dopri8"
    """the reference solution's solver (float64 state, per-sample steps, Diffrax's I controller)"""
    reference_tol: float = 1e-7
    """the reference's rtol = atol"""
    reference_check_samples: int = 50
    """samples re-solved at reference_tol / 10 to measure the reference's own error (0: skip)"""
    fid_stats: str | None = None
    """reference statistics (.npz with mu, sigma) for FID; needs the Inception weights"""
    inception_weights: str | None = None
    """the FID Inception's weights (default: rfdit.nn.inception's search)"""
    seed: int = 0
    """the noise's seed"""
    plots: bool = True
    spread: tuple[float, float, float, float] | None = None
    """the evaluator's spread between sample sets of num_samples (class_acc, fd_feat, precision, recall): a
    setting whose figures all lie within it of the reference solution's "reaches the reference"; default the
    run's eval.json spread (per-set standard deviations) scaled to num_samples"""

    def fixed(self, solver: str, num_steps: int, cfg_scale: float, *, time_shift: float = 1.0,
              guidance_interval: tuple[float, float] | None = None) -> SamplerConfig:
        """A fixed-step ODE row's settings."""
        return SamplerConfig(solver=solver, num_steps=num_steps, time_shift=time_shift, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval if cfg_scale != 1.0 else None)

    def adaptive(self, solver: str, tol: float, cfg_scale: float, *, per_sample: bool = False,
                 guidance_interval: tuple[float, float] | None = None) -> SamplerConfig:
        """An adaptive ODE row's settings: rtol = tol, atol = tol or --atol, the study's controller."""
        return SamplerConfig(solver=solver, num_steps=None, rtol=tol, atol=tol if self.atol is None else self.atol,
                             pcoeff=self.pcoeff, icoeff=self.icoeff, dtmin=self.dtmin, dtmax=self.dtmax,
                             max_steps=self.max_steps, cfg_scale=cfg_scale, per_sample=per_sample,
                             guidance_interval=guidance_interval if cfg_scale != 1.0 else None)

    def sde_setting(self, solver: str, num_steps: int, cfg_scale: float, diffusion: str) -> SamplerConfig:
        """An SDE row's settings (fixed steps)."""
        return SamplerConfig(solver=solver, num_steps=num_steps, cfg_scale=cfg_scale, diffusion=diffusion,
                             diffusion_norm=self.diffusion_norm, sample_eps=self.sample_eps, last_step=self.last_step,
                             last_step_size=self.last_step_size)

    def reference(self, setting: SamplerConfig) -> SamplerConfig:
        """The solve a row's error is measured against: for the ODE the reference solver at reference_tol,
        every sample stepping on its own; for the SDE the same SDE with sde_reference_solver's fixed steps."""
        if setting.diffusion is not None:
            return dataclasses.replace(setting, solver=self.sde_reference_solver or setting.solver,
                                       num_steps=self.sde_reference_steps)
        # Diffrax's I controller, whatever the rows use: dopri8's error stays within its tolerance under it
        # (the floor check below measures the reference itself), the PI controller costs it 15-80% more
        # evaluations, and the reference's NFE is the sweep's smoothness figure, measured so.
        return SamplerConfig(solver=self.reference_solver, num_steps=None, rtol=self.reference_tol,
                             atol=self.reference_tol, pcoeff=DIFFRAX_PCOEFF, icoeff=DIFFRAX_ICOEFF,
                             cfg_scale=setting.cfg_scale,
                             guidance_interval=setting.guidance_interval, per_sample=True,
                             max_steps=16 * self.max_steps)

    def __post_init__(self):
        unknown = [s for s in (*self.solvers, *self.stepping_solvers, self.reference_solver) if s not in SOLVERS]
        if unknown:
            raise ValueError(f"unknown solvers {unknown}; valid solvers: {list(SOLVERS)}.")
        if "euler" in self.stepping_solvers or self.reference_solver == "euler":
            raise ValueError("euler has no error estimate: it can be neither a stepping solver nor the reference.")
        if any(n < 1 for n in (*self.steps, *self.table_steps, *self.sde_steps, self.sde_reference_steps)):
            raise ValueError(f"step counts must be >= 1; got steps={self.steps}, table_steps={self.table_steps}, "
                             f"sde_steps={self.sde_steps}, sde_reference_steps={self.sde_reference_steps}.")
        for solver in (*self.sde_solvers, *([self.sde_reference_solver] if self.sde_reference_solver else [])):
            # SamplerConfig checks the names and forms
            for form in self.diffusions:
                self.sde_setting(solver, 1, 1.0, form)
        if self.diffusions and self.sde_reference_solver is not None:
            # a path is drawn per Lévy area: a reference that needs another one would stand on an independent path
            areas = {solver: sde.levy_area(sde.SDE_SOLVERS[solver]()) for solver in (*self.sde_solvers,
                                                                                   self.sde_reference_solver)}
            other = [s for s in self.sde_solvers if areas[s] is not areas[self.sde_reference_solver]]
            if other:
                raise ValueError(f"sde_reference_solver {self.sde_reference_solver!r} draws its Brownian path with "
                                 f"{areas[self.sde_reference_solver].__name__}, the rows {other} with "
                                 f"{areas[other[0]].__name__}: another path. Leave it unset (each row's own solver).")
        if self.diffusions and self.sde_reference_steps < max(self.sde_steps):
            raise ValueError(f"sde_reference_steps (={self.sde_reference_steps}) must be at least the finest SDE "
                             f"row's steps ({max(self.sde_steps)}).")
        if any(not tol > 0 for tol in (*self.tolerances, self.reference_tol)) or (self.atol is not None
                                                                                and not self.atol > 0):
            raise ValueError(f"tolerances must be positive; got {self.tolerances}, atol={self.atol}.")
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(f"num_samples (={self.num_samples}) must be >= 2 and batch_size (={self.batch_size}) >= 1.")
        if any(not s > 0 for s in self.time_shifts):
            raise ValueError(f"time_shifts (={self.time_shifts}) must be positive.")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval (={self.guidance_interval}) must be (lo, hi) with 0 <= lo <= hi <= 1.")


def _solve_batch(params, noise, labels, scale, keys, *, static, setting: SamplerConfig):
    kwargs = setting.sample_kwargs()
    kwargs["cfg_scale"] = scale if setting.cfg_scale != 1.0 else 1.0  # an array: one compile for any scale
    if setting.diffusion is not None:
        kwargs["key"] = keys  # one key per sample: its Brownian path whatever batch it is drawn in
    # a failed solve is recorded in the table (num_failed) and left out of its averages, not raised
    images, stats = sample(eqx.combine(params, static), noise, labels, on_failure="return", **kwargs)
    return images, *[jnp.broadcast_to(stats[k], labels.shape) for k in ("nfe", "num_rejected_steps", "failed")]


class _Sampler:
    """Compiled solves of one model over fixed noise and labels; timings exclude compilation."""

    def __init__(self, model, noise: np.ndarray, labels: np.ndarray, keys, batch_size: int):
        self.params, self.static = eqx.partition(model, eqx.is_array)
        self.noise, self.labels, self.keys = noise, labels, keys
        self.batch_size = batch_size
        self._compiled: dict[tuple, Any] = {}

    def run(self, setting: SamplerConfig, *, count: int | None = None, x64: bool = False) -> dict[str, Any]:
        """Images (count, H, W, C), per-sample NFE and failed flags (`sample`'s), wall and compile seconds."""
        count = len(self.labels) if count is None else count
        batch = min(self.batch_size, count)
        dtype = jnp.float64 if x64 else jnp.float32
        # "standard" promotion: the reference's float64 state meets the DiT's float32 parameters.
        with jax.enable_x64(x64), jax.numpy_dtype_promotion("standard"):
            scale = jnp.asarray(setting.cfg_scale, dtype)
            key = (setting, x64, batch)
            compile_seconds = 0.0
            if key not in self._compiled:
                fn = jax.jit(lambda p, x, y, s, k: _solve_batch(p, x, y, s, k, static=self.static, setting=setting))
                start = time.perf_counter()
                example = (self.params, jnp.zeros((batch, *self.noise.shape[1:]), dtype),
                           jnp.zeros((batch,), jnp.int32), scale, self.keys[:batch])
                self._compiled[key] = fn.lower(*example).compile()
                compile_seconds = time.perf_counter() - start
            compiled = self._compiled[key]
            images, nfe, rejected, failed, seconds = [], [], [], [], 0.0
            for start_index in range(0, count, batch):
                size = min(batch, count - start_index)
                take = np.resize(np.arange(start_index, start_index + size), batch)  # pad the last batch
                noise, labels = jnp.asarray(self.noise[take], dtype), jnp.asarray(self.labels[take])
                start = time.perf_counter()
                x, n, rej, f = jax.block_until_ready(compiled(self.params, noise, labels, scale, self.keys[take]))
                seconds += time.perf_counter() - start
                images.append(np.asarray(x)[:size])
                nfe.append(np.asarray(n)[:size])
                rejected.append(np.asarray(rej)[:size])
                failed.append(np.asarray(f)[:size])
        return {"images": np.concatenate(images), "nfe": np.concatenate(nfe), "rejected": np.concatenate(rejected),
                "failed": np.concatenate(failed), "seconds": seconds, "compile_seconds": compile_seconds}


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


class _Quality:
    """The digits evaluator (digits models) and FID (with reference statistics)."""

    def __init__(self, digits: bool, fid_stats: str | None, inception_weights: str | None):
        self.evaluator = None
        if digits:
            self.evaluator = DigitsEvaluator()
        self.fid = None
        if fid_stats is not None:
            self.fid = (fid_inception(inception_weights), *load_statistics(fid_stats))

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        if not np.isfinite(images).all():
            return out
        if self.evaluator is not None:
            out.update(self.evaluator.evaluate(images, labels))
        if self.fid is not None:
            feature_fn, ref_mu, ref_sigma = self.fid
            rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
            if rgb.shape[-1] != 3:
                raise ValueError(f"FID needs 1- or 3-channel images; got {rgb.shape[-1]} channels (decode latents).")
            batches = (rgb[i : i + 100] for i in range(0, len(rgb), 100))
            mu, sigma = compute_statistics(feature_fn, batches, progress=False)
            out["fid"] = float(frechet_distance(mu, sigma, ref_mu, ref_sigma))
        return out


def _is_digits(config: dict[str, Any]) -> bool:
    run = config.get("run", config)
    model = config["model"]
    if run.get("dataset_name") is not None:
        return run["dataset_name"] == "digits" and not run.get("use_stable_vae", False)
    return (model["image_size"], model["in_channels"], model["num_classes"]) == (8, 1, 10)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" for v in value)
    return str(value)


def run_study(cfg: StudyConfig, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the study configured by `cfg`; writes its files into `cfg.out` and returns study.json's content."""
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, config = load_model(cfg.load_dir)
    mcfg = model.config
    cfg_scales = cfg.cfg_scales
    if cfg_scales is None:
        cfg_scales = (float(config.get("sampler", {}).get("cfg_scale", 1.0)),)
    labels = (np.arange(cfg.num_samples) % mcfg.num_classes).astype(np.int32)
    shape = (mcfg.image_size, mcfg.image_size, mcfg.in_channels)
    noise = np.asarray(jr.normal(jr.key(cfg.seed), (cfg.num_samples, *shape), jnp.float32))
    # the SDE's Brownian keys: sample i's own, from a stream apart from the noise's
    keys = sde.per_sample_keys(jr.fold_in(jr.key(cfg.seed), sde.BROWNIAN_STREAM), cfg.num_samples)
    sampler = _Sampler(model, noise, labels, keys, cfg.batch_size)
    quality = _Quality(_is_digits(config), cfg.fid_stats, cfg.inception_weights)
    log = print if progress else (lambda *a, **k: None)

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    done: dict[SamplerConfig, dict[str, Any]] = {}
    references: dict[SamplerConfig, dict[str, Any]] = {}

    def reference(setting: SamplerConfig) -> dict[str, Any]:
        ref_setting = cfg.reference(setting)
        if ref_setting in references:
            return references[ref_setting]
        # the ODE's reference in float64; the SDE's in float32, as its rows: the Brownian tree draws its normals
        # in the state's dtype, so a float64 path would be another path
        x64 = ref_setting.diffusion is None
        res = sampler.run(ref_setting, x64=x64)
        check = None
        if cfg.reference_check_samples:
            count = min(cfg.reference_check_samples, cfg.num_samples)
            if ref_setting.diffusion is None:
                tight = dataclasses.replace(ref_setting, rtol=cfg.reference_tol / 10, atol=cfg.reference_tol / 10)
            else:
                tight = dataclasses.replace(ref_setting, num_steps=2 * ref_setting.num_steps)
            check = _rms(sampler.run(tight, count=count, x64=x64)["images"], res["images"][:count])
        row = _row(ref_setting, res, None, quality(res["images"], labels), "reference")
        row["rms_error_vs_tighter"] = check
        row["float64_state"] = x64
        rows.append(row)
        references[ref_setting] = {"images": res["images"], "row": row}
        log(f"reference {ref_setting.solver} cfg={ref_setting.cfg_scale:g} interval={ref_setting.guidance_interval} "
            f"diffusion={ref_setting.diffusion}: nfe {row['nfe']:.0f}, check rms {check}")
        return references[ref_setting]

    def measure(setting: SamplerConfig, section: str) -> dict[str, Any] | None:
        if setting in done:
            return done[setting]
        nfe = _expected_nfe(setting)
        if cfg.max_nfe is not None and nfe is not None and nfe > cfg.max_nfe:
            skipped.append({"solver": setting.solver, "num_steps": setting.num_steps, "nfe": nfe,
                            "section": section, "why": f"nfe {nfe} > max_nfe {cfg.max_nfe}"})
            return None
        ref = reference(setting)
        res = sampler.run(setting)
        ok = ~res["failed"]  # failed solves are counted in the row, not averaged into it
        figures = quality(res["images"][ok], labels[ok]) if ok.any() else {}
        row = _row(setting, res, ref["images"], figures, section)
        rows.append(row)
        done[setting] = row
        write_csv(rows, out / "study.csv")  # as it goes: a long study stopped midway keeps its rows
        log(" ".join(f"{k}={_fmt(row[k])}" for k in ("section", "solver", "num_steps", "rtol", "time_shift",
                                                       "cfg_scale", "guidance_interval", "diffusion", "stepping",
                                                       "nfe",
                                                       "rms_error", "fd_feat", "class_acc") if row.get(k) is not None))
        return row

    base_cfg = cfg_scales[0]
    for scale in cfg_scales:
        intervals = [None] + ([cfg.guidance_interval] if cfg.guidance_interval is not None and scale != 1.0 else [])
        for interval in intervals:
            for solver in cfg.solvers:
                for shift in cfg.time_shifts:
                    for n in cfg.steps:
                        measure(cfg.fixed(solver, n, scale, time_shift=shift, guidance_interval=interval), "grid")
                if solver == "euler":
                    continue
                for tol in cfg.tolerances:
                    measure(cfg.adaptive(solver, tol, scale, guidance_interval=interval), "grid")
        for form in cfg.diffusions:
            for solver in cfg.sde_solvers:
                for n in cfg.sde_steps:
                    measure(cfg.sde_setting(solver, n, scale, form), "sde")

    table = []
    for n in cfg.table_steps:
        row = measure(cfg.fixed("euler", n, base_cfg), "steps_table")
        if row is not None:
            table.append({k: row[k] for k in ("num_steps", "nfe", "rms_error", *QUALITY) if k in row})

    stepping = []
    for solver in cfg.stepping_solvers:
        for tol in cfg.tolerances:
            atol = tol if cfg.atol is None else cfg.atol
            batch = measure(cfg.adaptive(solver, tol, base_cfg), "stepping")
            each = measure(cfg.adaptive(solver, tol, base_cfg, per_sample=True), "stepping")
            stepping.append({"solver": solver, "rtol": tol, "atol": atol, "batch": _brief(batch),
                             "per_sample": _brief(each)})

    guidance = []
    if cfg.guidance_interval is not None:
        for row in rows:
            if row["section"] == "grid" and row["guidance_interval"] is not None:
                twin = [r for r in rows if r["section"] == "grid" and r["guidance_interval"] is None
                        and all(r[k] == row[k] for k in ("solver", "num_steps", "rtol", "time_shift", "cfg_scale"))]
                if twin:
                    guidance.append({"solver": row["solver"], "num_steps": row["num_steps"], "rtol": row["rtol"],
                                     "time_shift": row["time_shift"], "cfg_scale": row["cfg_scale"],
                                     "full": _brief(twin[0]),
                                     "interval": _brief(row), "guidance_interval": row["guidance_interval"]})

    spread = cfg.spread
    if spread is None:
        spread = _run_spread(pathlib.Path(cfg.load_dir), cfg.num_samples)
    result_cheapest = cheapest_settings(rows, spread) if spread is not None else []

    result = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "model": mcfg.to_dict(),
        "machine": machine_info(),
        "reference": {
            "solver": cfg.reference_solver, "rtol": cfg.reference_tol, "atol": cfg.reference_tol,
            "stepping": "per_sample", "state_dtype": "float64", "network_dtype": "float32",
            "rows": [r for r in rows if r["section"] == "reference"],
            "sde": {"solver": cfg.sde_reference_solver or "each row's own", "num_steps": cfg.sde_reference_steps,
                    "brownian_path": "the row's own (same keys, same tree)"} if cfg.diffusions else None,
        },
        "evaluator_references": quality.evaluator.references if quality.evaluator is not None else None,
        "rows": rows,
        "skipped": skipped,
        "steps_table": table,
        "stepping": stepping,
        "stepping_recommendation": _stepping_recommendation(stepping),
        "guidance": guidance,
        "spread": dict(zip(FIGURES, spread)) if spread is not None else None,
        "cheapest": result_cheapest,
        "plots": [],
    }
    write_outputs(result, out, plots=cfg.plots)
    return result


def _run_spread(load_dir: pathlib.Path, num_samples: int) -> tuple[float, ...] | None:
    """The run's eval.json spread between its sample sets, scaled from its set size to `num_samples`."""
    for folder in (load_dir, load_dir.parent):
        path = folder / "eval.json"
        if path.exists():
            report = json.loads(path.read_text())
            if "std" in report and report.get("samples_per_set"):
                factor = float(np.sqrt(report["samples_per_set"] / num_samples))
                return tuple(factor * report["std"][k] for k in FIGURES)
    return None


def cheapest_settings(rows: list[dict[str, Any]], spread) -> list[dict[str, Any]]:
    """Per solver (and per SDE form), the grid's or SDE rows' cheapest setting by NFE whose evaluator figures all
    lie within `spread` of its reference solution's, with no failed solves."""
    references = [r for r in rows if r["section"] == "reference" and r.get("fd_feat") is not None]
    if not references:
        return []
    best: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row["section"] not in ("grid", "sde") or row.get("fd_feat") is None or row["num_failed"]:
            continue
        ref = next((r for r in references if r["cfg_scale"] == row["cfg_scale"]
                    and r["guidance_interval"] == row["guidance_interval"]
                    and r.get("diffusion") == row.get("diffusion")), None)
        if ref is None or any(abs(row[k] - ref[k]) > width for k, width in zip(FIGURES, spread)):
            continue
        key = (row["solver"], row.get("diffusion"), row["cfg_scale"], row["guidance_interval"])
        if key not in best or row["nfe"] < best[key]["nfe"]:
            best[key] = row
    out = [{k: row.get(k) for k in ("solver", "diffusion", "num_steps", "time_shift", "rtol", "cfg_scale",
                                    "guidance_interval", "nfe", "rms_error", *FIGURES)} for row in best.values()]
    return sorted(out, key=lambda r: r["nfe"])


def _expected_nfe(setting: SamplerConfig) -> int | None:
    """Evaluations per sample of a fixed-step ODE row, known before it runs; None otherwise."""
    if setting.num_steps is None or setting.diffusion is not None:
        return None
    per_step, at_start = evaluations_per_step(setting.solver)
    return per_step * setting.num_steps + at_start


def _row(setting: SamplerConfig, res: dict[str, Any], ref_images, figures: dict[str, float], section: str) -> dict[str, Any]:
    num = len(res["nfe"])
    ok = ~res["failed"]
    failed = int(np.sum(~ok))
    averaged = ok if ok.any() else np.ones_like(ok)  # all failed: the averages say what the partial solves cost
    adaptive = setting.num_steps is None
    row = {
        "solver": setting.solver,
        "num_steps": setting.num_steps,
        "rtol": setting.rtol,
        "atol": setting.atol,
        "nfe": float(np.mean(res["nfe"][averaged])),
        "seconds_per_sample": res["seconds"] / num,
        "rms_error": None if ref_images is None or not ok.any() else _rms(res["images"][ok], ref_images[ok]),
        **{k: figures.get(k) for k in QUALITY},
        "section": section,
        "cfg_scale": setting.cfg_scale,
        "time_shift": setting.time_shift if adaptive is False else None,
        "guidance_interval": setting.guidance_interval,
        "stepping": ("per_sample" if setting.per_sample else "batch") if adaptive else None,
        "nfe_max": int(np.max(res["nfe"])),
        "rejected_steps": float(np.mean(res["rejected"])),
        "compile_seconds": res["compile_seconds"],
        "num_failed": failed,
        "diffusion": setting.diffusion,
        "diffusion_norm": setting.diffusion_norm if setting.diffusion is not None else None,
        "last_step": setting.last_step if setting.diffusion is not None else None,
    }
    if setting.diffusion is not None:
        row["last_step_size"] = setting.last_step_size if setting.last_step is not None else None
        row["sample_eps"] = setting.sample_eps
    return row


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row[k] for k in ("nfe", "nfe_max", "rejected_steps", "seconds_per_sample", "rms_error", *QUALITY,
                                "num_failed")}


def _stepping_recommendation(stepping: list[dict[str, Any]]) -> str | None:
    pairs = [(s["batch"], s["per_sample"]) for s in stepping if s["batch"] and s["per_sample"]]
    if not pairs:
        return None
    time_ratio = float(np.exp(np.mean([np.log(e["seconds_per_sample"] / b["seconds_per_sample"]) for b, e in pairs])))
    nfe_ratio = float(np.exp(np.mean([np.log(e["nfe"] / b["nfe"]) for b, e in pairs])))
    max_ratio = float(np.exp(np.mean([np.log(e["nfe_max"] / b["nfe"]) for b, e in pairs])))
    default = "batch" if time_ratio >= 1.0 else "per_sample"
    return (
        f"per-sample stepping spends {nfe_ratio:.2f}x the batch's mean NFE per sample, its slowest sample "
        f"{max_ratio:.2f}x, and takes {time_ratio:.2f}x the wall time (geometric means over tolerances); "
        f"faster here: {default}."
    )


def write_outputs(result: dict[str, Any], out: pathlib.Path, *, plots: bool = True) -> None:
    """study.csv, study.json, study.md and (with `plots`) the two log-log PNGs."""
    rows = result["rows"]
    write_csv(rows, out / "study.csv")
    if plots:
        result["plots"] = [str(p) for p in plot_study(rows, out, result.get("evaluator_references"))]
    (out / "study.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "study.md").write_text(markdown_tables(result))


def write_csv(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """The rows as CSV, COLUMNS in order (`fid` only when computed); empty cells for None."""
    columns = [c for c in COLUMNS if c != "fid" or any(r.get("fid") is not None for r in rows)]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) for c in columns])


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _grid_rows(rows, cfg_scale=None):
    grid = [r for r in rows if r["section"] == "grid" and r["guidance_interval"] is None]
    if cfg_scale is None and grid:
        cfg_scale = grid[0]["cfg_scale"]
    return [r for r in grid if r["cfg_scale"] == cfg_scale]


def _lines(rows):
    """(label, style, rows sorted by NFE) per solver: fixed steps per time shift, then adaptive."""
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    shifts = sorted({r["time_shift"] for r in rows if r["time_shift"] is not None})
    lines = []
    for i, solver in enumerate(solvers):
        colour = f"C{i}"
        for shift in shifts:
            sel = [r for r in rows if r["solver"] == solver and r["time_shift"] == shift]
            label = solver if shift == 1.0 else f"{solver}, shift {shift:g}"
            style = dict(color=colour, marker="o", ls="-" if shift == 1.0 else ":", ms=4)
            lines.append((label, style, sorted(sel, key=lambda r: r["nfe"])))
        sel = [r for r in rows if r["solver"] == solver and r["time_shift"] is None]
        style = dict(color=colour, marker="s", ls="--", ms=5, mfc="none")
        lines.append((f"{solver} (adaptive)", style, sorted(sel, key=lambda r: r["nfe"])))
    return [line for line in lines if line[2]]


def plot_study(rows, out: pathlib.Path, evaluator_references=None) -> list[pathlib.Path]:
    """error_vs_nfe.png and (with quality figures) quality_vs_nfe.png, log-log, one line per solver."""
    plt = _pyplot()
    grid = _grid_rows(rows)
    if not grid:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, style, sel in _lines(grid):
        pts = [(r["nfe"], r["rms_error"]) for r in sel if r["rms_error"] is not None and r["rms_error"] > 0]
        if pts:
            ax.plot(*zip(*pts), label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel("RMS error vs dopri8 at 1e-7")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "error_vs_nfe.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

    if any(r.get("fd_feat") is not None for r in grid) or any(r.get("fid") is not None for r in grid):
        metric = "fid" if any(r.get("fid") is not None for r in grid) else "fd_feat"
        panels = [metric] + (["class_acc"] if any(r.get("class_acc") is not None for r in grid) else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
        for ax, name in zip(axes[0], panels):
            for label, style, sel in _lines(grid):
                pts = [(r["nfe"], r[name]) for r in sel if r.get(name) is not None and r[name] > 0]
                if pts:
                    ax.plot(*zip(*pts), label=label, **style)
            ref = [r for r in rows if r["section"] == "reference" and r["guidance_interval"] is None
                   and r["cfg_scale"] == grid[0]["cfg_scale"] and r.get(name) is not None]
            if ref:
                ax.axhline(ref[0][name], color="k", lw=1, label="reference solution")
            if evaluator_references and name in ("fd_feat", "class_acc"):
                ax.axhline(evaluator_references["real_train"][name], color="grey", ls="-.", lw=1,
                           label="real training digits")
                ax.axhline(evaluator_references["gaussian_per_class"][name], color="grey", ls=":", lw=1,
                           label="per-class Gaussian")
            ax.set_xscale("log")
            if name != "class_acc":
                ax.set_yscale("log")
            ax.set_xlabel("NFE per sample")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        path = out / "quality_vs_nfe.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _md_table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.2e}"
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return str(value)


def markdown_tables(result: dict[str, Any]) -> str:
    """The study's tables in Markdown: the grid, the original's table, stepping, guidance."""
    rows = result["rows"]
    has_fid = any(r.get("fid") is not None for r in rows)
    q = [*FIGURES] + (["fid"] if has_fid else [])
    head = ["section", "solver", "steps", "shift", "rtol", "cfg", "interval", "stepping", "SDE", "NFE", "max NFE",
            "ms/sample", "RMS error", "failed", *q]
    body = [[r["section"], r["solver"], r["num_steps"], r["time_shift"], r["rtol"], r["cfg_scale"],
             r["guidance_interval"], r["stepping"], r.get("diffusion"), r["nfe"], r["nfe_max"],
             1e3 * r["seconds_per_sample"], r["rms_error"], r["num_failed"], *[r.get(k) for k in q]] for r in rows]
    parts = ["## All settings\n", _md_table(head, body)]
    sde_rows = [r for r in rows if r["section"] == "sde"]
    if sde_rows:
        pairs = {(r["solver"], r["num_steps"], r["cfg_scale"]) for r in sde_rows}
        ode_rows = [r for r in rows if r["section"] == "grid" and r["guidance_interval"] is None
                    and (r["solver"], r["num_steps"], r["cfg_scale"]) in pairs]
        body = [[r.get("diffusion") or "ODE", r["solver"], r["num_steps"], r["cfg_scale"], r["nfe"],
                 1e3 * r["seconds_per_sample"], r["rms_error"], r["num_failed"], *[r.get(k) for k in q]]
                for r in sorted(ode_rows + sde_rows, key=lambda r: (r["num_steps"], r.get("diffusion") or ""))]
        reference = result["reference"].get("sde") or {}
        parts += ["\n\n## SDE against the ODE\n\n"
                  f"An SDE row's RMS error is against {reference.get('solver')} with {reference.get('num_steps')} "
                  "steps on the same Brownian path (its strong error); an ODE row's against the ODE reference.\n\n",
                  _md_table(["SDE", "solver", "steps", "cfg", "NFE", "ms/sample", "RMS error", "failed", *q], body)]
    if result.get("cheapest"):
        spread = result["spread"]
        parts += ["\n\n## The cheapest setting of each solver that reaches the reference\n\n"
                  "Its evaluator figures all within the spread between sample sets of this size of the reference "
                  "solution's (" + ", ".join(f"{k} ± {v:.3g}" for k, v in spread.items()) + ").\n\n",
                  _md_table(["solver", "SDE", "steps", "shift", "rtol", "cfg", "NFE", "RMS error", *q],
                            [[c["solver"], c["diffusion"], c["num_steps"], c["time_shift"], c["rtol"], c["cfg_scale"],
                              c["nfe"], c["rms_error"], *[c.get(k) for k in q]] for c in result["cheapest"]])]
    if result["steps_table"]:
        parts += ["\n\n## Quality against Euler steps (the original's table shape)\n",
                  _md_table(["Euler steps", "RMS error", *q],
                            [[t["num_steps"], t["rms_error"], *[t.get(k) for k in q]] for t in result["steps_table"]])]
    if result["stepping"]:
        body = []
        for s in result["stepping"]:
            for mode in ("batch", "per_sample"):
                r = s[mode]
                if r is not None:
                    body.append([s["solver"], s["rtol"], mode, r["nfe"], r["nfe_max"], r["rejected_steps"],
                                 1e3 * r["seconds_per_sample"], r["rms_error"], r["num_failed"]])
        parts += ["\n\n## Batch against per-sample adaptive stepping\n",
                  _md_table(["solver", "rtol", "stepping", "mean NFE", "max NFE", "rejected steps", "ms/sample",
                             "RMS error", "failed"], body)]
        if result.get("stepping_recommendation"):
            parts.append("\n\n" + result["stepping_recommendation"])
    if result["guidance"]:
        body = [[g["solver"], g["num_steps"], g["time_shift"], g["rtol"], g["cfg_scale"], mode,
                 g["guidance_interval"] if mode == "interval" else None, g[mode]["rms_error"],
                 *[g[mode].get(k) for k in q]]
                for g in result["guidance"] for mode in ("full", "interval")]
        parts += ["\n\n## Guidance interval\n",
                  _md_table(["solver", "steps", "shift", "rtol", "cfg", "guidance", "interval", "RMS error", *q],
                            body)]
    return "".join(parts) + "\n"
