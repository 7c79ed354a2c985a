"""The run's evaluation: pictures and figures of the EMA model at eval intervals and after the last step.

At an eval interval (the hook `Evaluation.at_interval`): sample grids, one-step reconstructions, the loss
by t, the evaluator's figures on `INTERVAL_SAMPLES` samples (digits) and FID on
`FID_SAMPLES_DURING_TRAINING` (with --fid_stats), as one row of metrics.jsonl. After the last step
(`Evaluation.at_end`): the same pictures and FID, then `EVAL_SETS` sets of num_samples samples into
samples.npz, the loss curve, and eval.json with the evaluator's figures averaged over the sets.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from .. import plots
from ..data import EVAL_SIZE, Dataset
from ..flow import interpolate
from ..generation import fid_during_training, generate, generate_kwargs
from ..metrics.digits import DigitsEvaluator
from ..nn.vae import StableVAE
from ..sampling import model_velocity, sample
from .config import RunConfig
from .hooks import StepInfo

# Fixed noise for the pictures and the loss by t, the same at every step and in every run, so they compare.
GRID_NOISE_SEED = 1234
RECONSTRUCTION_NOISE_SEED = 99
LOSS_BY_T_NOISE_SEED = 42
# Samples for figures come from the run's sample key: fold_in(key, step) at an eval interval (the evaluator's
# figures and FID alike), fold_in(key, FINAL_SAMPLES_STREAM) for the sample sets at the end.
FINAL_SAMPLES_STREAM = 7
INTERVAL_SAMPLES = 500
FID_SAMPLES_DURING_TRAINING = 5000
# the end's figures are means over EVAL_SETS disjoint sets, with their spread: one set's recall and Fréchet
# distance vary by a few hundredths from draw to draw
EVAL_SETS = 3
GRID_COLUMNS = 10
GRID_STEP_COUNTS = (1, 4)  # Euler steps of the grids, besides the run's own
RECONSTRUCTION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
RECONSTRUCTION_EXAMPLES = 10


@eqx.filter_jit
def _noisy_and_velocity(model, x0, x1, y, t):
    """x_t at one time t for a batch, and the model's velocity there."""
    tt = jnp.full((x1.shape[0],), t)
    xt = jax.vmap(interpolate)(x0, x1, tt)
    return xt, jax.vmap(lambda a, b, c: model_velocity(model, a, b, c))(xt, tt, y)


def _class_labels(num: int, num_classes: int) -> np.ndarray:
    return (np.arange(num) % num_classes).astype(np.int32)


class Evaluation:
    """Pictures and figures at eval intervals and at the end of a run.

    Args:
        run, run_dir: the run and its folder (pictures go to grids/, the end's files to the folder).
        data: the run's data set; its held-out examples serve the reconstructions and the loss by t.
        vae: the decoder of a latent run.
        key: the run's sample key (`RunKeys.sample`).
        log: where the figures go (`Logger.log`).
        enabled: whether this process evaluates (process 0); every process must still run the hooks.
    """

    def __init__(self, run: RunConfig, run_dir: pathlib.Path, data: Dataset, vae: StableVAE | None = None, *,
                 key: PRNGKeyArray, log: Callable[[int, dict[str, Any]], None], enabled: bool = True):
        self.run, self.dir, self.data, self.key, self.log, self.enabled = run, run_dir, data, key, log, enabled
        self.grid_dir = run_dir / "grids"
        self.vae = vae
        self.decode = vae.decode if vae is not None else (lambda x: x)
        self.report: dict[str, Any] | None = None
        # held-out examples in the model's space (latents for a latent model), for reconstructions and losses
        count = min(EVAL_SIZE, len(data.eval_images))
        self.eval_x1, self.eval_labels = np.asarray(data.eval_images[:count]), np.asarray(data.eval_labels[:count])
        if vae is not None and self.eval_x1.shape[-1] != run.model.in_channels:
            self.eval_x1 = np.asarray(vae.encode(jnp.asarray(self.eval_x1)))
        self.rows = min(run.model.num_classes, 10)
        self.cols = GRID_COLUMNS
        shape = (self.rows * self.cols, run.model.image_size, run.model.image_size, run.model.in_channels)
        self.noise = jr.normal(jr.key(GRID_NOISE_SEED), shape)
        self.labels = jnp.asarray(np.repeat(np.arange(self.rows), self.cols).astype(np.int32))
        self.evaluator = None
        if run.data.name == "digits" and not run.data.use_stable_vae:
            self.evaluator = DigitsEvaluator()
            if enabled:
                (run_dir / "eval_references.json").write_text(json.dumps(self.evaluator.references, indent=2))

    def at_interval(self, info: StepInfo) -> None:
        """Hook: one row of pictures' losses and figures at an eval interval."""
        ema = info.ema  # every process joins the gather; process 0 evaluates
        if self.enabled:
            self.log(info.step, self.evaluate(ema, info.step, num=INTERVAL_SAMPLES))

    def at_end(self, info: StepInfo) -> None:
        """Hook: the final pictures and figures, samples.npz, the loss curve and eval.json (num_samples > 0)."""
        ema, step, n = info.ema, info.step, self.run.schedule.num_samples
        if not self.enabled or n == 0:
            return
        self.log(step, self.evaluate(ema, step, num=0))
        sets = EVAL_SETS if self.evaluator is not None else 1
        images, labels, sampler_info = self.generate(ema, sets * n, key=jr.fold_in(self.key, FINAL_SAMPLES_STREAM))
        np.savez_compressed(self.dir / "samples.npz", images=images.astype(np.float32), labels=labels)
        plots.loss_curve(self.dir / "metrics.jsonl", self.grid_dir / "loss_curve.png")
        report: dict[str, Any] = {"step": step, "num_samples": len(images), "sampler": sampler_info, "model": "ema"}
        if self.evaluator is not None:
            per_set = [self.evaluator.evaluate(images[i * n:(i + 1) * n], labels[i * n:(i + 1) * n])
                       for i in range(sets)]
            report.update({k: float(np.mean([r[k] for r in per_set])) for k in per_set[0]})
            report["std"] = {k: float(np.std([r[k] for r in per_set])) for k in per_set[0]}
            report["per_set"] = per_set
            report["samples_per_set"] = n
            report["references"] = self.evaluator.references
        (self.dir / "eval.json").write_text(json.dumps(report, indent=2))
        self.report = report
        print(json.dumps({k: v for k, v in report.items() if k not in ("references", "per_set")}, indent=2))
        print(f"run folder: {self.dir}")

    def evaluate(self, model, step: int, *, num: int) -> dict[str, Any]:
        """Grids, reconstructions, loss by t, (with `num` > 0) the evaluator's figures, and FID with --fid_stats."""
        self.grids(model, step)
        self.reconstructions(model, step)
        values: dict[str, Any] = dict(self.loss_by_t(model, step))
        if num:
            values.update(self.figures(model, num, key=jr.fold_in(self.key, step)))
        if self.run.data.fid_stats is not None:
            values.update(self.fid(model, key=jr.fold_in(self.key, step)))
        return values

    def images(self, x) -> np.ndarray:
        return np.asarray(self.decode(x))

    def grids(self, model, step: int) -> None:
        cfg_scales = sorted({0.0, 1.0, self.run.sampler.cfg_scale})
        step_counts = sorted({*GRID_STEP_COUNTS, self.run.sampler.num_steps})
        for scale in cfg_scales:
            for n in step_counts:
                x, _ = sample(model, self.noise, self.labels, cfg_scale=jnp.asarray(scale), solver="euler",
                              num_steps=n)
                images = self.images(x).reshape(self.rows, self.cols, *self.images(x).shape[1:])
                plots.save_grid(images, self.grid_dir / f"step{step:07d}_cfg{scale:g}_steps{n}.png",
                                scale=max(1, 64 // images.shape[2]))

    def reconstructions(self, model, step: int) -> None:
        """One-step denoising: x̂1 = x_t + (1 - t)·v(x_t, t), at several t."""
        count = min(RECONSTRUCTION_EXAMPLES, len(self.eval_x1))
        x1, y = jnp.asarray(self.eval_x1[:count]), jnp.asarray(self.eval_labels[:count])
        x0 = jr.normal(jr.key(RECONSTRUCTION_NOISE_SEED), x1.shape)
        rows = [self.images(x1)]
        for t in RECONSTRUCTION_TIMES:
            xt, v = _noisy_and_velocity(model, x0, x1, y, jnp.asarray(t, jnp.float32))
            rows += [self.images(xt), self.images(xt + (1 - t) * v)]
        plots.save_grid(np.stack(rows), self.grid_dir / f"step{step:07d}_reconstructions.png",
                        scale=max(1, 64 // rows[0].shape[1]))

    def loss_by_t(self, model, step: int) -> dict[str, float]:
        x1, y = jnp.asarray(self.eval_x1), jnp.asarray(self.eval_labels)
        x0 = jr.normal(jr.key(LOSS_BY_T_NOISE_SEED), x1.shape)
        ts = np.round(np.linspace(0.0, 1.0, 11), 2)
        losses = {}
        for t in ts:
            _, v = _noisy_and_velocity(model, x0, x1, y, jnp.asarray(t, jnp.float32))
            losses[f"loss_t/{t:.1f}"] = float(jnp.mean(jnp.square(v - (x1 - x0))))
        plots.bar_plot([f"{t:.1f}" for t in ts], list(losses.values()), self.grid_dir / f"step{step:07d}_loss_by_t.png",
                       xlabel="t (0 = noise, 1 = data)", ylabel="velocity MSE", title=f"EMA model, step {step}")
        return losses

    def generate(self, model, num: int, *, key) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """`num` samples spread evenly over the classes, with the run's default sampler."""
        labels = _class_labels(num, self.run.model.num_classes)
        s = self.run.sampler
        images, stats = generate(model, labels=labels, key=key, **generate_kwargs(s), batch_size=len(self.labels),
                                 vae=self.vae, progress=False)
        return images, labels, {"nfe": stats["nfe_per_batch"][0], "solver": s.solver, "num_steps": s.num_steps,
                                "cfg_scale": s.cfg_scale}

    def figures(self, model, num: int, *, key) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        images, labels, _ = self.generate(model, num, key=key)
        return {f"eval/{k}": v for k, v in self.evaluator.evaluate(images, labels).items()}

    def fid(self, model, *, key) -> dict[str, Any]:
        """FID on fewer samples than a final evaluation, as the original did at eval intervals."""
        values = fid_during_training(
            model, self.run.data.fid_stats, sampler=self.run.sampler, num_samples=FID_SAMPLES_DURING_TRAINING,
            batch_size=min(self.run.data.batch_size, FID_SAMPLES_DURING_TRAINING), key=key, vae=self.vae,
        )
        return {f"eval/{k}": v for k, v in values.items()}
