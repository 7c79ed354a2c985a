"""How smooth a trained velocity field is in t, and the time-scale sweep that chose the default.

A solver of order p assumes that the field's p-th time derivative along the solution stays moderate
over a step. `roughness` measures the first and second derivatives of the model's velocity in t along
straight noise-to-data paths x_t = (1-t)·x0 + t·x1 (the training paths, so on the data's support) by
finite differences. A ripple of amplitude a and angular frequency ω adds a·ω² to |∂²v/∂t²| and only
a·ω to |∂v/∂t|, so the second derivative against |v| is what shows a high-frequency ripple.

`time_scale_sweep` trains (or reuses) one digits run per `time_scale` and seed, and puts side by side
what choosing the default needed: the digits evaluator's figures, each solver's observed order
between 16, 32 and 64 steps against a float64 dopri8 reference, dopri5's global error against its
tolerance (under Diffrax's I controller, as the sweep was first measured, so that its rows compare
fields, not controllers), the reference's NFE, the loss by t and the roughness, over the middle of
[0, 1] and near the data. `experiments/time_scale_sweep.py` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm.auto import tqdm

from .checkpoint import load_model
from .data.digits import load_digits_split
from .metrics.digits import FIGURES
from .flow import interpolate
from .sampling import DIFFRAX_ICOEFF, DIFFRAX_PCOEFF, model_velocity
from .studies import StudyConfig, run_study

ORDER_SOLVERS = ("euler", "midpoint", "heun", "ralston", "dopri5")
ORDER_STEPS = (16, 32, 64)
DOPRI5_TOLERANCES = (1e-3, 1e-4)


@eqx.filter_jit
def _velocity_along(model, x0, x1, y, ts):
    """v(x_t, t) at every t of `ts` along the straight path of each pair (x0, x1): (T, B, H, W, C)."""

    def at(t):
        tt = jnp.full((x0.shape[0],), t)
        xt = jax.vmap(interpolate)(x0, x1, tt)
        return jax.vmap(lambda a, b, c: model_velocity(model, a, b, c))(xt, tt, y)

    return jax.lax.map(at, ts)


def _path_velocities(model, x1, labels, t_range, num_points, key):
    """(ts, h, v): the velocity on a uniform grid of `num_points` in `t_range` along straight paths from
    noise drawn with `key` (default key 0) to `x1`, in float64 for the differences."""
    key = jr.key(0) if key is None else key
    x0 = jr.normal(key, x1.shape)
    ts = jnp.linspace(*t_range, num_points)
    v = np.asarray(_velocity_along(model, x0, jnp.asarray(x1), jnp.asarray(labels), ts), np.float64)
    return np.asarray(ts), float(ts[1] - ts[0]), v


def _rms(a: np.ndarray) -> np.ndarray:
    """RMS over the pixels of each (t, path)."""
    return np.sqrt(np.mean(np.square(a), axis=tuple(range(2, a.ndim))))


def roughness(model, x1: np.ndarray, labels: np.ndarray, *, num_points: int = 401, t_range=(0.05, 0.95),
              key=None) -> dict[str, float]:
    """|v|, |∂v/∂t| and |∂²v/∂t²| (RMS over pixels, median over paths and times) along straight paths.

    Central differences on a uniform grid of `num_points` in `t_range` (spacing h ≈ 2e-3 by default;
    float32 round-off in v then contributes about 4·1e-7·|v|/h² ≈ 0.1 to the second difference, far below
    what a ripple gives). Also the ratio |∂²v/∂t²| / |v|, the scale-free figure to compare models by.
    """
    _, h, v = _path_velocities(model, x1, labels, t_range, num_points, key)
    first = (v[2:] - v[:-2]) / (2 * h)
    second = (v[2:] - 2 * v[1:-1] + v[:-2]) / h**2
    size, d1, d2 = (float(np.median(_rms(a))) for a in (v, first, second))
    return {"v_rms": size, "dv_dt_rms": d1, "d2v_dt2_rms": d2, "d2v_over_v": d2 / size, "h": h,
            "num_paths": int(x1.shape[0]), "num_points": num_points}


def roughness_by_t(model, x1: np.ndarray, labels: np.ndarray, *, bins: int = 10, num_points: int = 801,
                   key=None) -> dict[str, float]:
    """|∂²v/∂t²| / |v| along the same straight paths over all of [0, 1], median per bin of t ("0.9-1": ...).

    `roughness` reports one median over the middle of [0, 1]; this shows where along the path the
    curvature sits (on the digits models, in the last tenth, near the data)."""
    ts, h, v = _path_velocities(model, x1, labels, (0.0, 1.0), num_points, key)
    ratio = _rms((v[2:] - 2 * v[1:-1] + v[:-2]) / h**2) / _rms(v[1:-1])  # (num_points - 2, paths)
    inner = ts[1:-1]
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        inside = (inner >= lo) & ((inner < hi) if hi < 1 else (inner <= hi))
        out[f"{lo:g}-{hi:g}"] = float(np.median(ratio[inside]))
    return out


def observed_orders(rows: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per solver, log2 of the ratio of RMS errors between ORDER_STEPS' neighbours (16→32, 32→64)."""
    orders = {}
    for solver in ORDER_SOLVERS:
        errors = {r["num_steps"]: r["rms_error"] for r in rows
                  if r["section"] == "grid" and r["solver"] == solver and r["num_steps"] is not None}
        orders[solver] = [float(np.log2(errors[a] / errors[b])) if errors.get(a) and errors.get(b) else None
                          for a, b in zip(ORDER_STEPS, ORDER_STEPS[1:])]
    return orders


def last_loss_by_t(run_dir: pathlib.Path) -> dict[str, float]:
    """The last evaluation's velocity MSE at t = 0, 0.1, ..., 1 from a run's metrics.jsonl."""
    last: dict[str, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if any(k.startswith("loss_t/") for k in row):
            last = {k.removeprefix("loss_t/"): v for k, v in row.items() if k.startswith("loss_t/")}
    return last


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A time_scale sweep on the digits default."""

    root: str = "runs/time-scale-sweep"
    """folder of the runs (ts<scale>-s<seed>) and of sweep.json / sweep.md"""
    time_scales: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    seeds: tuple[int, ...] = (0, 1)
    train_args: str = ""
    """extra train_flow.py flags for every run, as one string (e.g. --train_args="--max_steps 16000")"""
    num_samples: int = 200
    """samples of each run's sampling study (orders, dopri5's error, the reference's NFE)"""
    roughness_paths: int = 100
    """held-out digits whose straight paths the roughness is measured along"""


def run_name(scale: float, seed: int) -> str:
    return f"ts{scale:g}-s{seed}"


def measure_run(run_dir: pathlib.Path, cfg: SweepConfig) -> dict[str, Any]:
    """One trained run's figures: evaluator, orders, dopri5's error/tolerance, reference NFE, loss by t, roughness.

    Kept in the run's smoothness.json (with the settings they were measured with) and reused from there."""
    saved = run_dir / "smoothness.json"
    settings = {"num_samples": cfg.num_samples, "roughness_paths": cfg.roughness_paths}

    def paths():  # the held-out digits the roughness is measured towards
        data = load_digits_split()
        return data["test_images"][:cfg.roughness_paths], data["test_labels"][:cfg.roughness_paths]

    if saved.exists():
        measured = json.loads(saved.read_text())
        if measured.get("settings") == settings:
            if "roughness_by_t" not in measured:  # measured before the profile existed: add it
                measured["roughness_by_t"] = roughness_by_t(load_model(str(run_dir))[0], *paths())
                saved.write_text(json.dumps(measured, indent=2))
            measured["dopri5_error_over_tol"] = {float(k): v for k, v in measured["dopri5_error_over_tol"].items()}
            return measured
    study_dir = run_dir / "smoothness-study"
    study = run_study(StudyConfig(
        load_dir=str(run_dir), out=str(study_dir), solvers=ORDER_SOLVERS, steps=ORDER_STEPS,
        tolerances=DOPRI5_TOLERANCES, num_samples=cfg.num_samples, batch_size=cfg.num_samples, table_steps=(),
        stepping_solvers=(), reference_check_samples=0, plots=False, max_nfe=None,
        pcoeff=DIFFRAX_PCOEFF, icoeff=DIFFRAX_ICOEFF,  # as the sweep was measured: rows compare fields, not controllers
    ), progress=False)
    rows = study["rows"]
    # the study's grid has every non-Euler solver adaptive too: dopri5's rows at the two tolerances are the ones kept
    dopri5 = {r["rtol"]: r["rms_error"] / r["rtol"] for r in rows
              if r["section"] == "grid" and r["solver"] == "dopri5" and r["rtol"] is not None and r["rms_error"]}
    reference = next(r for r in rows if r["section"] == "reference")
    model, _ = load_model(str(run_dir))
    held_out = paths()
    rough = roughness(model, *held_out)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    measured = {
        "settings": settings,
        "run": str(run_dir),
        "time_scale": float(model.config.time_scale),
        "evaluator": {k: evaluation[k] for k in FIGURES},
        "orders": observed_orders(rows),
        "dopri5_error_over_tol": dopri5,
        "dopri5_nfe": {r["rtol"]: r["nfe"] for r in rows
                       if r["section"] == "grid" and r["solver"] == "dopri5" and r["rtol"] is not None},
        "reference_nfe": reference["nfe"],
        "reference_quality": {k: reference.get(k) for k in FIGURES},
        "loss_by_t": last_loss_by_t(run_dir),
        "roughness": rough,
        "roughness_by_t": roughness_by_t(model, *held_out),
    }
    saved.write_text(json.dumps(measured, indent=2))
    return measured


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per time_scale, medians over seeds of every figure (the evaluator's as mean ± half the seed range)."""
    out = []
    for scale in sorted({r["time_scale"] for r in results}):
        runs = [r for r in results if r["time_scale"] == scale]
        row: dict[str, Any] = {"time_scale": scale, "seeds": len(runs)}
        for k in FIGURES:
            values = [r["evaluator"][k] for r in runs]
            row[k] = float(np.mean(values))
            row[f"{k}_range"] = float(np.max(values) - np.min(values))
        for solver in ORDER_SOLVERS:
            for i, (a, b) in enumerate(zip(ORDER_STEPS, ORDER_STEPS[1:])):
                row[f"order_{solver}_{a}_{b}"] = _median([r["orders"][solver][i] for r in runs])
        for tol in DOPRI5_TOLERANCES:
            row[f"dopri5_error_over_tol_{tol:g}"] = _median([r["dopri5_error_over_tol"].get(tol) for r in runs])
        row["reference_nfe"] = _median([r["reference_nfe"] for r in runs])
        for k in ("v_rms", "dv_dt_rms", "d2v_dt2_rms", "d2v_over_v"):
            row[k] = _median([r["roughness"][k] for r in runs])
        row["d2v_over_v_near_data"] = _median([r.get("roughness_by_t", {}).get("0.9-1") for r in runs])
        for t in ("0.0", "0.5", "0.9", "1.0"):
            row[f"loss_t_{t}"] = _median([r["loss_by_t"].get(t) for r in runs])
        out.append(row)
    return out


def _cell(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(summary: list[dict[str, Any]]) -> str:
    """The sweep's table: one row per time_scale."""
    head = ["time_scale", *FIGURES, "Heun order 16→32, 32→64",
            "midpoint order", "Ralston order", "Euler order", "dopri5 error / tol at 1e-3, 1e-4 (I controller)", "reference NFE",
            "|∂²v/∂t²| / |v|", "same, t in [0.9, 1]", "loss at t = 0, 0.5, 0.9, 1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in summary:
        def pair(name):
            return ", ".join(_cell(r[f"order_{name}_{a}_{b}"], 3) for a, b in zip(ORDER_STEPS, ORDER_STEPS[1:]))

        lines.append("| " + " | ".join([
            _cell(r["time_scale"]),
            *[f"{r[k]:.3f} ± {r[f'{k}_range'] / 2:.3f}" for k in FIGURES],
            pair("heun"), pair("midpoint"), pair("ralston"), pair("euler"),
            ", ".join(_cell(r[f"dopri5_error_over_tol_{tol:g}"], 2) for tol in DOPRI5_TOLERANCES),
            _cell(r["reference_nfe"], 4), _cell(r["d2v_over_v"], 3), _cell(r["d2v_over_v_near_data"], 3),
            ", ".join(_cell(r[f"loss_t_{t}"], 3) for t in ("0.0", "0.5", "0.9", "1.0")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def time_scale_sweep(cfg: SweepConfig, train: Callable[[list[str]], Any] | None = None) -> dict[str, Any]:
    """Train the runs that `cfg.root` lacks (with `train`, train_flow.py's main), measure every run, and
    write sweep.json and sweep.md into `cfg.root`."""
    root = pathlib.Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    todo = [(scale, seed) for scale in cfg.time_scales for seed in cfg.seeds]
    for scale, seed in tqdm(todo, desc="time_scale sweep"):
        run_dir = root / run_name(scale, seed)
        if not (run_dir / "eval.json").exists():
            if train is None:
                raise FileNotFoundError(f"{run_dir} has no finished run (eval.json); train it or pass train=.")
            train(["--save_dir", str(run_dir), "--seed", str(seed), "--model.time_scale", f"{scale:g}",
                   "--overwrite", "1", *shlex.split(cfg.train_args)])
        results.append(measure_run(run_dir, cfg))
        (root / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "runs": results}, indent=2))
    summary = summarise(results)
    (root / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "runs": results,
                                                 "summary": summary}, indent=2))
    (root / "sweep.md").write_text(markdown(summary))
    return {"runs": results, "summary": summary}
