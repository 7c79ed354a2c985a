"""The parts a training run is built from: its keys, state, data, VAE and compiled step.

`build` makes them from a `RunConfig`, in the order that keeps a failed start cheap and harmless:
the state (restored when resuming, before anything is written), config.json, the mesh, the data, the
VAE, the step, and the FID reference (checked now, not at the first evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ..checkpoint import CheckpointError, checkpoint_dir, restore_run
from ..config import compute_dtype
from ..data import EVAL_SIZE, Dataset, load_dataset
from ..data.digits import LEVELS as DIGITS_LEVELS
from ..data.latents import LatentBatches
from ..distributed import make_mesh, shard_state
from ..generation import inception_features
from ..likelihood import IMAGE_LEVELS, quantisation_step
from ..metrics import load_statistics
from ..nn.dit import DiT
from ..nn.vae import StableVAE
from ..train import TrainState, TrainStep, make_optimizer
from .config import RunConfig, check_resume

# fold_in(key(seed), MODEL_SPACE_STREAM) draws the model-space randomness (latent samples, dequantisation noise)
MODEL_SPACE_STREAM = 0x1A7E


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """Every key of a run, derived from its seed alone: a resumed run derives the same ones."""

    model: PRNGKeyArray
    """the model's initial weights"""
    state: PRNGKeyArray
    """the training state's key (time, noise and label-dropout draws), saved in checkpoints from then on"""
    sample: PRNGKeyArray
    """evaluation samples: fold_in(sample, step) at eval intervals, more streams at the end"""
    model_space: PRNGKeyArray
    """fold_in(model_space, step): VAE latents drawn for step's batch, or its dequantisation noise"""

    @classmethod
    def from_seed(cls, seed: int) -> "RunKeys":
        model, state, sample = jr.split(jr.key(seed), 3)
        return cls(model=model, state=state, sample=sample, model_space=jr.fold_in(jr.key(seed), MODEL_SPACE_STREAM))


@dataclasses.dataclass
class Parts:
    """What the training steps need: the state at `start_step`, sharded over `mesh`, and where batches come from."""

    state: TrainState
    start_step: int
    mesh: jax.sharding.Mesh
    data: Dataset
    vae: StableVAE | None
    to_model_space: Callable
    """(host batch on the devices, step) -> what the flow model trains on"""
    step_fn: TrainStep


def build(run: RunConfig, run_dir: pathlib.Path, keys: RunKeys, *, load_dir: str | None = None,
          is_main: bool = True, allow_change: str | None = None, load_fallback: bool = False) -> Parts:
    """The run's parts; resumes from the run folder `load_dir` when given, and writes config.json.

    A resumed run must keep the checkpoint's result settings except those `allow_change` names (`check_resume`);
    with `load_fallback`, damaged checkpoints are set aside for the newest good one."""
    execution = run.execution
    optimizer = make_optimizer(run.optimizer)
    with jax.numpy_dtype_promotion("standard"):
        model = DiT(run.model, key=keys.model, dtype=compute_dtype(execution.precision), remat=execution.remat,
                    scan_unroll=execution.scan_unroll, attention=execution.attention,
                    residual_dtype=execution.residual_dtype)
        state = TrainState.create(model, optimizer, key=keys.state)
    start_step = 0
    if load_dir is not None:
        state, start_step = restore_run(
            load_dir, state, run.model, fallback=load_fallback,
            check=lambda saved: check_resume(saved, run, allow_change, str(load_dir)))
        if start_step % execution.steps_per_call:
            raise CheckpointError(
                f"the checkpoint is at step {start_step}, not a multiple of --steps_per_call "
                f"{execution.steps_per_call}; resume with a steps_per_call that divides it."
            )
        print(f"resumed from {checkpoint_dir(load_dir)} at step {start_step}")
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2))

    mesh = make_mesh(execution.fsdp)
    state = shard_state(state, mesh)  # replicated, or FSDP-sharded; the batch is sharded over every device
    data = load_data(run)
    vae = load_vae(run)
    if vae is not None:
        vae = shard_state(vae, make_mesh(1))  # replicated next to the batch
    model_shape = (run.model.image_size, run.model.in_channels)
    if (data.image_size, data.channels) != model_shape and not run.data.use_stable_vae:
        raise ValueError(
            f"the data set gives {data.image_size}×{data.image_size}×{data.channels} images but the model expects "
            f"{run.model.image_size}×{run.model.image_size}×{run.model.in_channels}; check --image_size."
        )
    step_fn = TrainStep(optimizer, run.flow, run.optimizer, num_classes=run.model.num_classes,
                        steps_per_call=execution.steps_per_call, grad_accum=execution.grad_accum)
    if run.data.fid_stats is not None:  # fail now, not at the first eval
        load_statistics(run.data.fid_stats)
        inception_features()
    return Parts(state=state, start_step=start_step, mesh=mesh, data=data, vae=vae,
                 to_model_space=model_space(run, vae, keys.model_space), step_fn=step_fn)


def load_data(run: RunConfig) -> Dataset:
    """This process's share of the run's data set, from the batch of global step 0 on."""
    data = run.data
    common = dict(seed=run.seed, process_index=jax.process_index(), process_count=jax.process_count())
    if data.name == "latents":
        batches = LatentBatches(data.path, data.batch_size, **common)
        eval_count = min(EVAL_SIZE, len(batches.labels))
        return Dataset("latents", run.model.image_size, run.model.in_channels, run.model.num_classes, batches,
                       np.asarray(batches.mean[:eval_count], np.float32), np.asarray(batches.labels[:eval_count]))
    # an image folder's classes come from its subfolders; other data sets must fit the model's labels
    num_classes = None if data.name == "imagefolder" and not data.explicit_num_classes else run.model.num_classes
    return load_dataset(data.name, batch_size=data.batch_size, path=data.path, image_size=data.image_size,
                        tfds_data_dir=data.tfds_data_dir, debug_overfit=data.debug_overfit, num_classes=num_classes,
                        **common)


def load_vae(run: RunConfig) -> StableVAE | None:
    return StableVAE.from_pretrained(run.data.vae_path) if run.data.use_stable_vae else None


def model_space(run: RunConfig, vae: StableVAE | None, key: PRNGKeyArray) -> Callable:
    """Host batches -> what the flow model trains on: pixels, fresh VAE latents, or a draw from stored ones.

    The randomness is `fold_in(key, step)`, so a resumed run draws the same latents.
    """
    if run.data.name == "latents":
        @jax.jit
        def draw(stacked, step):
            mean, std = jnp.split(stacked, 2, axis=-1)
            return mean + std * jr.normal(jr.fold_in(key, step), mean.shape)

        return lambda images, step: draw(images, step)
    if vae is None and run.data.dequantize:
        # one level of the data set's own quantisation over [-1, 1]: digits 17 levels, every other 8-bit images
        step_size = quantisation_step(DIGITS_LEVELS if run.data.name == "digits" else IMAGE_LEVELS)

        @jax.jit
        def dequantize(images, step):
            noise = jr.uniform(jr.fold_in(key, step), images.shape, minval=-0.5, maxval=0.5)
            return images + step_size * noise

        return dequantize
    if vae is None:
        return lambda images, step: images

    def encode(images, step):
        flat = images.reshape(-1, *images.shape[-3:])
        latents = vae.encode(flat, key=jr.fold_in(key, step))
        return latents.reshape(*images.shape[:-3], *latents.shape[1:])

    return encode
