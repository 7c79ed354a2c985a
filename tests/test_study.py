import csv
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfdit
from rfdit.checkpoint import Checkpointer
from rfdit.config import OptimConfig
from rfdit.sampling import PCOEFF
from rfdit.studies import StudyConfig
from rfdit.train import TrainState, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Step counts where each error lies far above float64 round-off (> 1e-13) and in the
# asymptotic regime, on the field below.
ORDERS = {
    "euler": (1, (8, 16, 32, 64)),
    "midpoint": (2, (8, 16, 32, 64)),
    "heun": (2, (8, 16, 32, 64)),
    "ralston": (2, (8, 16, 32, 64)),
    "tsit5": (5, (6, 8, 12, 16)),
    "dopri5": (5, (6, 8, 12, 16)),
    "dopri8": (8, (2, 3, 4, 5)),
}


def logistic_field(t, x):
    """dx/dt = cos(t)·x(1-x): nonlinear and time-dependent, x(t) = 1 / (1 + c·exp(-sin t))."""
    return jnp.cos(t) * x * (1 - x)


def logistic_solution(t, c):
    return 1 / (1 + c * np.exp(-np.sin(t)))


@pytest.mark.parametrize("solver", list(ORDERS))
def test_solve_order_of_convergence(solver):
    order, counts = ORDERS[solver]
    c = np.asarray([0.5, 1.0, 2.0, 4.0])
    # One compiled solve for every step count: each grid is padded at its start with steps of
    # 1e-250 just below t = 0, which change x by h·v ~ 1e-250 and so leave it bit for bit as it is.
    longest = max(counts)
    grids = np.stack([np.concatenate([-1e-250 * np.arange(longest - n, 0, -1), np.linspace(0.0, 1.0, n + 1)])
                      for n in counts])
    with jax.enable_x64(True):
        x0 = jnp.asarray(logistic_solution(0.0, c))
        x1 = jax.vmap(lambda ts: rfdit.solve(logistic_field, x0, solver=solver, ts=ts)[0])(jnp.asarray(grids))
    errors = np.sqrt(np.mean((np.asarray(x1) - logistic_solution(1.0, c)) ** 2, axis=1))
    assert np.all(errors > 1e-13), errors
    slope = np.polyfit(np.log(1.0 / np.asarray(counts)), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errors)


def test_solve_padding_steps_leave_the_state_unchanged():
    # the premise of the test above, checked directly
    with jax.enable_x64(True):
        x0 = jnp.asarray(logistic_solution(0.0, np.asarray([2.0])))
        plain, _ = rfdit.solve(logistic_field, x0, solver="heun", num_steps=4)
        padded, _ = rfdit.solve(logistic_field, x0, solver="heun",
                                ts=np.concatenate([-1e-250 * np.arange(3, 0, -1), np.linspace(0.0, 1.0, 5)]))
    assert jnp.array_equal(plain, padded)


def write_tiny_checkpoint(run_dir: pathlib.Path) -> None:
    """A digits-shaped run folder with one checkpoint of a tiny random DiT (no training)."""
    cfg = rfdit.DiTConfig(image_size=8, in_channels=1, patch_size=4, hidden_size=16, depth=1, num_heads=2,
                          mlp_ratio=1.0, num_classes=10)
    skeleton = eqx_eval_shape(cfg)
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    # numpy draws: every weight random (the zero-initialised output layer would make v = 0)
    leaves = [jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
              for x in leaves]
    model = jax.tree_util.tree_unflatten(treedef, leaves)
    optim = OptimConfig()
    with jax.numpy_dtype_promotion("standard"):
        state = TrainState.create(model, make_optimizer(optim), key=jax.random.key(0))
    run = {"model": cfg.to_dict(), "optim": optim.to_dict(), "dataset_name": "digits", "use_stable_vae": False,
           "sampler": {"solver": "euler", "num_steps": 32, "cfg_scale": 1.0}}
    with Checkpointer(run_dir / "checkpoints") as checkpointer:
        checkpointer.save(0, state, {"run": run, "data_step": 0})


def eqx_eval_shape(cfg):
    import equinox as eqx

    return eqx.filter_eval_shape(rfdit.DiT, cfg, key=jax.random.key(0))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_study_smoke_run_writes_table_json_and_plots(tmp_path):
    write_tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "study"
    result = load_script("sampling_study").main([
        "--load_dir", str(tmp_path / "run"), "--out", str(out), "--solvers", "euler", "heun", "--steps", "2",
        "--tolerances", "1e-2", "--num_samples", "12", "--table_steps", "2", "--stepping_solvers", "heun",
        "--reference_solver", "heun", "--reference_tol", "1e-4", "--reference_check_samples", "0",
        "--pcoeff", "0.3", "--icoeff", "0.4", "--dtmax", "0.1",
        "--diffusions", "sigma", "--sde_steps", "2", "8", "64", "--sde_reference_steps", "64", "--batch_size", "8",
        "--spread", "1", "100", "1", "1",
    ])
    with (out / "study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:11] == ["solver", "num_steps", "rtol", "atol", "nfe", "seconds_per_sample", "rms_error",
                                  "class_acc", "fd_feat", "precision", "recall"]
    by = {(r["section"], r["solver"], r["num_steps"], r["rtol"], r["stepping"]): r for r in rows}
    euler = by[("grid", "euler", "2", "", "")]
    heun_fixed = by[("grid", "heun", "2", "", "")]
    heun_adaptive = by[("grid", "heun", "", "0.01", "batch")]
    per_sample = by[("stepping", "heun", "", "0.01", "per_sample")]
    assert ("reference", "heun", "", "0.0001", "per_sample") in by
    assert float(euler["nfe"]) == 2 and float(heun_fixed["nfe"]) == 4
    # dtmax 0.1: at least 10 steps of Heun's 2 evaluations, in the grid and in the stepping rows
    assert float(heun_adaptive["nfe"]) >= 20 and float(per_sample["nfe_max"]) >= float(per_sample["nfe"]) >= 20
    # second order beats first order at the same step count, against the same reference
    assert 0 < float(heun_fixed["rms_error"]) < float(euler["rms_error"])
    for row in (euler, heun_fixed, heun_adaptive, per_sample):
        assert float(row["seconds_per_sample"]) > 0 and 0 <= float(row["class_acc"]) <= 1
        assert float(row["fd_feat"]) > 0
    study = json.loads((out / "study.json").read_text())
    assert study["rows"] == json.loads(json.dumps(result["rows"]))
    assert [t["num_steps"] for t in study["steps_table"]] == [2]
    assert study["stepping"][0]["per_sample"]["nfe_max"] >= 4 and study["stepping_recommendation"]
    assert study["reference"]["state_dtype"] == "float64" and study["machine"]["cpu_count"] >= 1
    assert study["command"].startswith("python experiments/sampling_study.py --load_dir")
    for name in ("error_vs_nfe.png", "quality_vs_nfe.png", "study.md"):
        assert (out / name).stat().st_size > 0
    assert "Quality against Euler steps" in (out / "study.md").read_text()
    # SDE rows: Euler-Maruyama with the mean last step (one more evaluation), errors against a 64-step
    # Euler-Maruyama solve on each sample's own Brownian path (batch_size 8 < 12 samples: keys follow the sample)
    sde = {int(r["num_steps"]): r for r in rows if r["section"] == "sde"}
    assert {n: float(r["nfe"]) for n, r in sde.items()} == {2: 3.0, 8: 9.0, 64: 65.0}
    assert all(r["diffusion"] == "sigma" and r["last_step"] == "mean" for r in sde.values())
    # the row with the reference's steps lands on the reference (float32 against float64): the same Brownian path
    # (an independent path would leave every error at the samples' own spread)
    assert float(sde[64]["rms_error"]) < 1e-4 < float(sde[8]["rms_error"]) < float(sde[2]["rms_error"])
    assert ("reference", "euler", "64", "", "") in by and study["reference"]["sde"]["num_steps"] == 64
    assert "SDE against the ODE" in (out / "study.md").read_text()
    # a spread that every row meets: each solver's cheapest row is its fewest evaluations
    cheapest = {(c["solver"], c["diffusion"]): c["nfe"] for c in study["cheapest"]}
    assert cheapest[("euler", None)] == 2 and cheapest[("heun", None)] == 4 and cheapest[("euler", "sigma")] == 3
    assert "The cheapest setting of each solver" in (out / "study.md").read_text()


def test_cheapest_settings_keep_only_rows_within_the_spread_of_their_reference():
    from rfdit.studies import cheapest_settings

    base = {"cfg_scale": 1.0, "guidance_interval": None, "num_failed": 0, "time_shift": 1.0, "rtol": None,
            "rms_error": 0.0, "class_acc": 0.97, "precision": 0.86, "recall": 0.84}
    rows = [{**base, "section": "reference", "solver": "dopri8", "nfe": 300, "fd_feat": 0.80},
            {**base, "section": "grid", "solver": "heun", "num_steps": 4, "nfe": 8, "fd_feat": 0.95},  # too far
            {**base, "section": "grid", "solver": "heun", "num_steps": 8, "nfe": 16, "fd_feat": 0.83},
            {**base, "section": "grid", "solver": "heun", "num_steps": 16, "nfe": 32, "fd_feat": 0.80},
            {**base, "section": "grid", "solver": "euler", "num_steps": 8, "nfe": 8, "fd_feat": 0.81,
             "num_failed": 1}]  # a failed solve never counts
    cheapest = cheapest_settings(rows, (0.01, 0.05, 0.01, 0.05))
    assert [(c["solver"], c["num_steps"]) for c in cheapest] == [("heun", 8)]


def test_the_reference_keeps_diffrax_i_controller_whatever_the_rows_use():
    cfg = StudyConfig(load_dir="run", out="study", pcoeff=0.2, icoeff=0.5)
    row = cfg.adaptive("dopri5", 1e-3, 1.0)
    reference = cfg.reference(row)
    assert (row.pcoeff, row.icoeff) == (0.2, 0.5)
    assert (reference.solver, reference.rtol, reference.pcoeff, reference.icoeff, reference.per_sample) == \
        ("dopri8", 1e-7, 0.0, 1.0, True)
    assert StudyConfig(load_dir="run", out="study").adaptive("tsit5", 1e-4, 1.0).pcoeff == PCOEFF


def test_study_cli_takes_the_sde_and_controller_flags_of_sample_py():
    import tyro

    cfg = tyro.cli(StudyConfig, use_underscores=True, args=[
        "--load_dir", "run", "--out", "out", "--diffusion", "sigma", "--diffusion_norm", "0.5", "--sample_eps", "0.001",
        "--last_step", "tweedie", "--last_step_size", "0.02", "--pcoeff", "0.2", "--icoeff", "0.5", "--dtmin", "1e-4",
        "--dtmax", "0.25", "--max_steps", "100"])
    assert (cfg.diffusions, cfg.diffusion_norm, cfg.sample_eps, cfg.last_step, cfg.last_step_size) == \
        (("sigma",), 0.5, 0.001, "tweedie", 0.02)
    assert (cfg.pcoeff, cfg.icoeff, cfg.dtmin, cfg.dtmax, cfg.max_steps) == (0.2, 0.5, 1e-4, 0.25, 100)
    sde_row = cfg.sde_setting("euler", 32, 1.0, "sigma")
    assert (sde_row.diffusion, sde_row.diffusion_norm, sde_row.sample_eps, sde_row.last_step) == \
        ("sigma", 0.5, 0.001, "tweedie")
    adaptive = cfg.adaptive("dopri5", 1e-3, 1.0)
    assert (adaptive.pcoeff, adaptive.icoeff, adaptive.dtmin, adaptive.dtmax, adaptive.max_steps) == \
        (0.2, 0.5, 1e-4, 0.25, 100)


def test_study_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="euler has no error estimate"):
        StudyConfig(load_dir="x", out="y", stepping_solvers=("euler",))
    with pytest.raises(ValueError, match="guidance_interval"):
        StudyConfig(load_dir="x", out="y", guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="step counts"):
        StudyConfig(load_dir="x", out="y", steps=(0, 4))
    with pytest.raises(ValueError, match="another path"):  # ShARK's path carries a Lévy area Euler's does not
        StudyConfig(load_dir="x", out="y", diffusions=("sigma",), sde_reference_solver="shark")


def test_study_rows_count_failed_solves_and_leave_them_out_of_the_averages():
    from rfdit.config import SamplerConfig
    from rfdit.studies import _row

    res = {"images": np.array([[0.0], [1.0], [100.0]]), "nfe": np.array([10, 12, 4096]),
           "rejected": np.array([0, 1, 2000]), "failed": np.array([False, False, True]), "seconds": 3.0,
           "compile_seconds": 1.0}
    ref = np.array([[0.0], [1.0], [0.0]])
    row = _row(SamplerConfig(solver="dopri5", num_steps=None, rtol=1e-3, atol=1e-3), res, ref, {}, "grid")
    assert row["num_failed"] == 1 and row["nfe"] == 11.0 and row["rms_error"] == 0.0
