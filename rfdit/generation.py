"""Generating images from a trained model in batches, and FID on them.

    model, config, vae = load_for_sampling("runs/digits")        # a run folder, its checkpoints/ or an export
    labels = uniform_labels(1000, model.config.num_classes, key=label_key)
    images, stats = generate(model, labels=labels, key=noise_key, solver="euler", num_steps=32,
                             cfg_scale=1.0, batch_size=256, vae=vae)   # images (N, H, W, C) in [-1, 1]

Sample i's noise is `normal(fold_in(key, i))`, so a seed gives the same images whatever the batch size
(fixed-step solvers; adaptive ones share one step size per batch). The last batch is padded to the full
batch size, so nothing recompiles. When the batch size is divisible by the device count, each batch is
sharded over all devices (`_shard_batch`) and the model and VAE are replicated.

FID: `sample_statistics` streams generated batches through the Inception without keeping the images;
`dataset_statistics` does the same for a data set; `fid_during_training` is what a training loop calls.
Statistics files written here (`save_fid_statistics`) are ADM-style npz files (`mu`, `sigma`) that also
name their feature extractor, so random-Inception smoke statistics are never compared with real ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm.auto import tqdm

from .checkpoint import load_model
from .config import SamplerConfig
from .data import load_dataset
from .metrics.fid import (
    compute_statistics,
    fid_inception,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from .nn.dit import DiT
from .nn.inception import InceptionV3, load_inception
from .nn.vae import StableVAE
from .sampling import SOLVERS, sample
from .sde import BROWNIAN_STREAM, SDE_SOLVERS, Diffusion

DEFAULT_NUM_STEPS = 32
INCEPTION_ID = "inception-2015-12-05"
RANDOM_INCEPTION_WARNING = (
    "RANDOM Inception weights (smoke test): this FID is NOT comparable with published numbers or with FIDs "
    "from the real Inception; it only checks that the pipeline runs."
)


def _data_parallel(batch_size: int) -> bool:
    """Whether batches of `batch_size` are sharded over the devices (divisible, and more than one device)."""
    count = jax.device_count()
    return count > 1 and batch_size % count == 0


def _mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def _shard_batch(x: Array) -> Array:
    """Place a batch split along its first axis over all devices (full mesh support replaces this)."""
    return jax.device_put(x, NamedSharding(_mesh(), P("data")))


def _replicate(tree):
    """The arrays of `tree` copied to every device of the mesh, so sharded batches meet them there."""
    if tree is None:
        return None
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, NamedSharding(_mesh(), P())), static)


def vae_source(config: dict[str, Any]) -> tuple[bool, str | None]:
    """(latent, VAE path or Hub id) that a loaded config asks for.

    Read, in this order: top-level `use_stable_vae` / `vae_path` (a checkpoint's run config), the same
    under `run` (a training export), and `vae` (an imported export: a path or Hub id string, or a dict
    with `path` or `hub_id`). A config naming a VAE is latent.
    """
    run = config.get("run") or {}
    vae = config.get("vae")
    if isinstance(vae, dict):
        vae = vae.get("path") or vae.get("hub_id")
    path = config.get("vae_path") or run.get("vae_path") or vae
    latent = bool(config.get("use_stable_vae") or run.get("use_stable_vae") or path)
    return latent, (str(path) if path else None)


def load_for_sampling(
    load_dir: str | os.PathLike, vae: str | os.PathLike | None = None, *, vae_dtype: str = "float32"
) -> tuple[DiT, dict[str, Any], StableVAE | None]:
    """(EMA model, config dict, VAE or None) from a run folder, its checkpoints/ or an export folder.

    Args:
        load_dir: what `rfdit.checkpoint.load_model` reads.
        vae: a diffusers-format VAE folder or Hub id; beats the one the config names.
        vae_dtype: the VAE's compute dtype ("float32" or "bfloat16").

    A latent model (its config says so, see `vae_source`, or it has neither 1 nor 3 channels) gets its VAE
    loaded; one without a VAE path is an error that says to pass `vae`.
    """
    model, config = load_model(load_dir)
    latent, source = vae_source(config)
    latent = latent or model.config.in_channels not in (1, 3)  # e.g. an imported export that names no VAE
    if vae is not None:
        if not latent:
            raise ValueError(
                f"--vae {vae} was given, but the model in {load_dir} works in pixel space "
                f"({model.config.in_channels} channels); leave --vae out."
            )
        source = str(vae)
    if not latent:
        return model, config, None
    if source is None:
        raise ValueError(
            f"the model in {load_dir} works in a VAE's latent space ({model.config.in_channels} channels) but its "
            "config names no VAE; pass --vae with a diffusers-format VAE folder (e.g. weights/sd-vae-ft-ema) or "
            "a Hub id (stabilityai/sd-vae-ft-ema)."
        )
    decoder = StableVAE.from_pretrained(source, dtype=vae_dtype)
    if decoder.config.latent_channels != model.config.in_channels:
        raise ValueError(
            f"the VAE at {source} has {decoder.config.latent_channels} latent channels but the model in {load_dir} "
            f"takes {model.config.in_channels}; pass the VAE the model was trained with (--vae)."
        )
    return model, config, decoder


def run_setting(config: dict[str, Any], name: str) -> Any:
    """A run-level setting (`dataset_name`, `dataset_path`, ...) of a loaded config, or None."""
    if name in config:
        return config[name]
    return (config.get("run") or {}).get(name)


@dataclasses.dataclass(kw_only=True)
class ControllerFlags:
    """The adaptive step-size controller's command-line settings (`sample.py`, `eval_fid.py`); None keeps
    the run's saved value, else SamplerConfig's default (the PI controller of rfdit.sampling)."""

    pcoeff: float | None = None
    """PID controller's proportional coefficient (adaptive steps)"""
    icoeff: float | None = None
    """PID controller's integral coefficient (adaptive steps)"""
    dtmin: float | None = None
    """smallest step an adaptive solve may take"""
    dtmax: float | None = None
    """largest step an adaptive solve may take"""
    max_steps: int | None = None
    """most steps an adaptive solve attempts before it stops with an error (default 4096)"""
    diffusion: str | None = None
    """sample the SDE with the flow's marginals with this diffusion form (sigma: SiT's and REPA's); default the ODE"""
    diffusion_norm: float | None = None
    """the diffusion's scale (default 1)"""
    sample_eps: float | None = None
    """the SDE's start time (SBDM is singular at 0: SiT uses 1e-3); default 0"""
    last_step: str | None = None
    """the SDE's last step to t = 1: mean, tweedie or euler (SiT's default: mean); default none"""
    last_step_size: float | None = None
    """the last step's size (default 0.04)"""

    def controller(self) -> dict[str, Any]:
        """These flags' given values, by their SamplerConfig names (the same)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ControllerFlags)}
        return {name: value for name, value in values.items() if value is not None}


def generate_kwargs(settings: SamplerConfig) -> dict[str, Any]:
    """`generate`'s solve arguments from sampler settings: steps or a controller, max_steps and guidance."""
    kwargs = settings.sample_kwargs()
    kwargs.pop("per_sample")
    return kwargs


SDE_SETTINGS = ("diffusion", "diffusion_norm", "sample_eps", "last_step", "last_step_size")
"""SamplerConfig's SDE settings: `resolve_sampler` takes each from its arguments, else the saved sampler."""


def resolve_sampler(
    config: dict[str, Any] | None = None,
    *,
    solver: str | None = None,
    num_steps: int | None = None,
    rtol: float | int | None = None,
    atol: float | int | None = None,
    cfg_scale: float | int | None = None,
    time_shift: float | int | None = None,
    pcoeff: float | None = None,
    icoeff: float | None = None,
    dtmin: float | None = None,
    dtmax: float | None = None,
    max_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    **sde: Any,
) -> SamplerConfig:
    """Sampler settings from explicit values and the config's saved `sampler` (a training run's defaults).

    `rtol`/`atol` select adaptive steps and `num_steps` fixed ones; giving both is an error. With neither,
    the saved sampler's choice is used, else `DEFAULT_NUM_STEPS` fixed steps. Every other setting left None
    (the controller's, the guidance interval and channels, the SDE's in `sde`) takes the saved value, else
    SamplerConfig's default.
    """
    saved = (config or {}).get("sampler") or {}
    sde = {name: saved[name] for name in SDE_SETTINGS if saved.get(name) is not None} | \
        {name: value for name, value in sde.items() if value is not None}
    solver = solver or saved.get("solver") or "euler"
    names = SOLVERS if sde.get("diffusion") is None else SDE_SOLVERS
    if solver not in names:
        raise ValueError(f"Unknown solver {solver!r}; valid solvers: {list(names)}.")
    adaptive = rtol is not None or atol is not None
    if adaptive and num_steps is not None:
        raise ValueError(
            f"give either num_steps (fixed steps; got {num_steps}) or rtol/atol (adaptive; got {rtol}/{atol}), "
            "not both."
        )
    if not adaptive and num_steps is None:
        if saved.get("num_steps") is None and (saved.get("rtol") is not None or saved.get("atol") is not None) \
                and solver != "euler":
            rtol, atol, adaptive = saved.get("rtol"), saved.get("atol"), True
        else:
            num_steps = saved.get("num_steps") or DEFAULT_NUM_STEPS
    if adaptive:
        if solver == "euler":
            raise ValueError(
                "euler has no error estimate, so rtol/atol cannot apply; give num_steps, or pick one of "
                f"{[s for s in SOLVERS if s != 'euler']} for adaptive steps."
            )
        rtol = atol if rtol is None else rtol
        atol = rtol if atol is None else atol
        if time_shift is not None and time_shift != 1:
            raise ValueError(f"time_shift (={time_shift}) shapes fixed-step grids only; drop it or give num_steps.")
        time_shift = 1.0
    elif num_steps < 1:
        raise ValueError(f"num_steps (={num_steps}) must be >= 1.")
    if time_shift is None:
        time_shift = saved.get("time_shift", 1.0)
    cfg_scale = saved.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale
    controller = {name: saved.get(name, getattr(SamplerConfig, name)) if value is None else value
                  for name, value in dict(pcoeff=pcoeff, icoeff=icoeff, dtmin=dtmin, dtmax=dtmax,
                                          max_steps=max_steps, cfg_channels=cfg_channels).items()}
    if guidance_interval is None and saved.get("guidance_interval") is not None:
        guidance_interval = tuple(saved["guidance_interval"])
    return SamplerConfig(
        solver=solver, num_steps=num_steps, rtol=None if rtol is None else float(rtol),
        atol=None if atol is None else float(atol), cfg_scale=float(cfg_scale), time_shift=float(time_shift),
        guidance_interval=guidance_interval, **controller, **sde,
    )


def uniform_labels(num: int, num_classes: int, *, key: PRNGKeyArray) -> Int[np.ndarray, " n"]:
    """`num` class labels drawn independently and uniformly from [0, num_classes), as ADM/DiT's evaluations do."""
    if num < 1 or num_classes < 1:
        raise ValueError(f"need num (={num}) >= 1 labels over num_classes (={num_classes}) >= 1 classes.")
    return np.asarray(jr.randint(key, (num,), 0, num_classes), dtype=np.int32)


class GeneratedBatch(NamedTuple):
    images: Array  # (b, H, W, C) in [-1, 1], on the device(s)
    labels: np.ndarray  # (b,)
    nfe: int  # model evaluations of this batch's ODE solve (a guided pass of 2B counts once)


@eqx.filter_jit
def _noise(key: PRNGKeyArray, indices: Int[Array, " b"], shape: tuple[int, int, int]) -> Float[Array, "b h w c"]:
    return jax.vmap(lambda i: jr.normal(jr.fold_in(key, i), shape))(indices)


@eqx.filter_jit
def _to_images(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    return jnp.clip(x, -1.0, 1.0)


def _check_generation_args(model, labels: np.ndarray, batch_size: int, guidance_interval, cfg_channels, vae) -> None:
    cfg = model.config
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty vector of class indices; got shape {labels.shape}.")
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise ValueError(
            f"labels must lie in [0, {cfg.num_classes}) for this model; got {labels.min()}..{labels.max()}. "
            "For unconditional samples use cfg_scale=0."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size (={batch_size}) must be >= 1.")
    if guidance_interval is not None:
        lo, hi = guidance_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"guidance_interval (={guidance_interval}) must be (lo, hi) with 0 <= lo < hi <= 1, in rfdit's time "
                "(t=0 noise, t=1 data); REPA's 'guide for t <= 0.7' is (0.3, 1.0) here."
            )
    if cfg_channels is not None and not 1 <= cfg_channels <= cfg.in_channels:
        raise ValueError(f"cfg_channels (={cfg_channels}) must lie in [1, {cfg.in_channels}] for this model.")
    if vae is None and cfg.in_channels not in (1, 3):
        raise ValueError(
            f"the model makes {cfg.in_channels}-channel outputs: a latent model. Pass vae= to decode them "
            "(load_for_sampling loads it)."
        )
    if jax.process_count() > 1:
        raise ValueError(
            f"generation runs in one process; this job has {jax.process_count()} (multi-host sampling is not "
            "supported yet)."
        )


def generate_batches(
    model: DiT,
    *,
    labels: Int[np.ndarray, " n"],
    key: PRNGKeyArray,
    solver: str,
    num_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    cfg_scale: float | int,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    time_shift: float | int = 1.0,
    ts: tuple[float, ...] | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    max_steps: int = 4096,
    diffusion: Diffusion | None = None,
    last_step: str | None = None,
    last_step_size: float = 0.04,
    t0: float = 0.0,
    batch_size: int,
    vae: StableVAE | None = None,
    progress: bool = True,
) -> Iterator[GeneratedBatch]:
    """Generate `len(labels)` images batch by batch; see `generate` for labels, key, batch_size, vae and progress.

    The sampler's arguments:
        solver, num_steps, rtol, atol, time_shift, ts, stepsize_controller, max_steps: as `rfdit.sample`
            (fixed steps or adaptive ones); a solve that does not reach t = 1 raises `SolveFailed`.
        diffusion, last_step, last_step_size, t0: the SDE (`rfdit.sample`); sample i's Brownian path comes
            from `fold_in(fold_in(key, BROWNIAN_STREAM), i)`, so it does not depend on the batch.
        cfg_scale: guidance scale; 1 is plain conditional sampling, 0 unconditional.
        guidance_interval: guide only for t in [lo, hi] (t=0 noise, t=1 data).
        cfg_channels: guide only the first channels (DiT/SiT's 3 of 4; for reproducing their numbers).

    Yields `GeneratedBatch`es in order, with the images still on the device(s); the last one holds only
    the real samples (its padding is dropped). The next batch is dispatched before one is handed out,
    so the devices keep working while the caller consumes it.
    """
    labels = np.asarray(labels)
    _check_generation_args(model, labels, batch_size, guidance_interval, cfg_channels, vae)
    cfg = model.config
    shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    num = labels.shape[0]
    sharded = _data_parallel(batch_size)
    if sharded:
        model, vae = _replicate(model), _replicate(vae)
    # cfg_scale 1 is plain conditional sampling (one pass of B); any other value guides (one pass of 2B),
    # as an array so that no value retraces.
    scale = 1.0 if cfg_scale == 1 else jnp.asarray(cfg_scale, jnp.float32)

    def dispatch(start: int):
        indices = np.arange(start, start + batch_size)
        batch_labels = labels[np.minimum(indices, num - 1)]  # pad with the last label
        noise = _noise(key, jnp.asarray(indices, jnp.int32), shape)
        y = jnp.asarray(batch_labels, jnp.int32)
        if sharded:
            noise, y = _shard_batch(noise), _shard_batch(y)
        sde = {}
        if diffusion is not None:  # sample i's Brownian path from its own key, whatever its batch
            paths = jax.vmap(lambda i: jr.fold_in(jr.fold_in(key, BROWNIAN_STREAM), i))(jnp.asarray(indices, jnp.int32))
            sde = dict(diffusion=diffusion, last_step=last_step, last_step_size=last_step_size, t0=t0, key=paths)
        x, stats = sample(model, noise, y, cfg_scale=scale, solver=solver, num_steps=num_steps, rtol=rtol,
                          atol=atol, time_shift=time_shift, ts=ts, stepsize_controller=stepsize_controller,
                          max_steps=max_steps, guidance_interval=guidance_interval, cfg_channels=cfg_channels, **sde)
        if vae is not None:
            x = vae.decode(x)
        return start, _to_images(x), stats["nfe"]

    def finish(pending) -> GeneratedBatch:
        start, images, nfe = pending
        count = min(batch_size, num - start)
        batch = GeneratedBatch(images[:count] if count < batch_size else images, labels[start : start + count],
                               int(nfe))
        bar.update(count)
        bar.set_postfix(nfe=batch.nfe)
        return batch

    with tqdm(total=num, desc="sampling", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        pending = None
        for start in range(0, num, batch_size):
            current = dispatch(start)
            if pending is not None:
                yield finish(pending)
            pending = current
        yield finish(pending)


def generate(
    model: DiT,
    *,
    labels: Int[np.ndarray, " n"],
    key: PRNGKeyArray,
    batch_size: int,
    vae: StableVAE | None = None,
    progress: bool = True,
    **solve_options: Any,
) -> tuple[Float[np.ndarray, "n H W C"], dict[str, Any]]:
    """Images for `labels`, in batches: (N, H, W, C) float32 in [-1, 1] on the host, and stats.

    Args:
        model: a DiT (e.g. from `load_for_sampling`).
        labels: (N,) class indices in [0, num_classes).
        key: sample i starts from `normal(fold_in(key, i))`.
        solve_options: the sampler's arguments, as `generate_batches` takes them (`generate_kwargs` turns a
            `SamplerConfig` into them).
        batch_size: samples per ODE solve; the last batch is padded so nothing recompiles.
        vae: decodes latents to images; needed for latent models.
        progress: show a tqdm bar.

    Returns images clipped to [-1, 1] (decoded when `vae` is given) and stats: `num_images`,
    `batch_size`, `num_batches`, `nfe_per_batch` (model evaluations of each batch's solve, which every
    sample in it sees), `nfe_total` (their sum), `wall_s` (compilation included), `first_batch_s` and
    `images_per_s`.
    """
    start = time.perf_counter()
    images, nfes, first = [], [], None
    for batch in generate_batches(model, labels=labels, key=key, **solve_options, batch_size=batch_size, vae=vae,
                                  progress=progress):
        images.append(np.asarray(batch.images, dtype=np.float32))
        nfes.append(batch.nfe)
        first = time.perf_counter() - start if first is None else first
    wall = time.perf_counter() - start
    out = np.concatenate(images)
    stats = {
        "num_images": len(out), "batch_size": batch_size, "num_batches": len(nfes), "nfe_per_batch": nfes,
        "nfe_total": int(sum(nfes)), "wall_s": wall, "first_batch_s": first, "images_per_s": len(out) / wall,
    }
    return out, stats


def _random_inception(seed: int):
    """The FID Inception with He-normal random weights drawn by numpy (seconds, not a minute of op-by-op compiles)."""
    skeleton = eqx.filter_eval_shape(InceptionV3, key=jr.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True, separator=".")
        if name == "weight":  # (kh, kw, cin, cout)
            fan_in = int(np.prod(leaf.shape[:3]))
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        return jnp.asarray(np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32))

    return jax.tree_util.tree_map_with_path(draw, skeleton)


_FEATURE_FUNCTIONS: dict[tuple[str, str | None], Callable] = {}


def inception_features(
    weights_path: str | os.PathLike | None = None, *, random_seed: int | None = None
) -> tuple[Callable[[Float[Array | np.ndarray, "b h w c"]], Float[Array, "b 2048"]], str]:
    """(feature function, extractor name): images (B, H, W, 1 or 3) in [-1, 1] -> Inception pool3 (B, 2048).

    `random_seed` gives random weights (smoke tests; the name says "random"); otherwise the published
    weights from `weights_path` or the default location (`rfdit.metrics.fid_inception`). Grayscale is
    repeated to 3 channels. Cached per process, so repeated evaluations compile once. Batches divisible by
    the device count are sharded over the devices.
    """
    cache_key = ("random", str(random_seed)) if random_seed is not None else (
        "weights", None if weights_path is None else str(weights_path))
    if cache_key not in _FEATURE_FUNCTIONS:
        model = _random_inception(random_seed) if random_seed is not None else None
        if model is None:
            model = load_inception(weights_path)
        if jax.device_count() > 1:
            model = _replicate(model)
        pool3 = fid_inception(model=model)

        def features(images: Float[Array | np.ndarray, "b h w c"]) -> Float[Array, "b 2048"]:
            images = jnp.asarray(images)
            if images.ndim == 4 and images.shape[-1] == 1:
                images = jnp.repeat(images, 3, axis=-1)
            if images.ndim == 4 and _data_parallel(images.shape[0]):
                images = _shard_batch(images)
            return pool3(images)

        _FEATURE_FUNCTIONS[cache_key] = features
    name = f"random-inception-seed{random_seed}" if random_seed is not None else INCEPTION_ID
    return _FEATURE_FUNCTIONS[cache_key], name


def save_fid_statistics(
    path: str | os.PathLike, mu: Float[np.ndarray, " d"], sigma: Float[np.ndarray, "d d"], *,
    feature_extractor: str, **info: str | int | float,
) -> pathlib.Path:
    """Write an ADM-style npz (`mu`, `sigma`, float64) that also names its feature extractor and `info`."""
    save_statistics(path, mu, sigma, feature_extractor=feature_extractor, **info)
    return pathlib.Path(path).expanduser()


def statistics_extractor(path: str | os.PathLike) -> str | None:
    """The feature extractor an npz of statistics names (files from `save_fid_statistics`); None for others (ADM's)."""
    with np.load(pathlib.Path(path).expanduser(), allow_pickle=False) as data:
        return str(data["feature_extractor"]) if "feature_extractor" in data.files else None


def load_reference(path: str | os.PathLike, feature_extractor: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference npz, refusing statistics made with another feature extractor.

    Files without a `feature_extractor` entry (ADM's reference batches) count as the real Inception.
    """
    mu, sigma = load_statistics(path)
    stored = statistics_extractor(path) or INCEPTION_ID
    if stored != feature_extractor:
        raise ValueError(
            f"the reference statistics in {path} were computed with {stored!r}, but these features come from "
            f"{feature_extractor!r}: a Fréchet distance across feature extractors means nothing. Make the "
            "reference with the same extractor (experiments/fid_stats.py, with or without --random_inception)."
        )
    return mu, sigma


def sample_statistics(
    model: DiT,
    feature_fn: Callable,
    *,
    labels: Int[np.ndarray, " n"],
    key: PRNGKeyArray,
    sampler: SamplerConfig,
    batch_size: int,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    vae: StableVAE | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu, sigma, stats) of the features of generated images, streamed: no image is kept.

    Stats: `num_images`, `nfe_per_batch`, `nfe_total`, `wall_s` (sampling, decoding and features,
    compilation included) and `images_per_s`.
    """
    nfes: list[int] = []

    def images() -> Iterator[Array]:
        solve = generate_kwargs(sampler.replace(guidance_interval=guidance_interval, cfg_channels=cfg_channels))
        for batch in generate_batches(model, labels=labels, key=key, **solve, batch_size=batch_size, vae=vae,
                                      progress=progress):
            nfes.append(batch.nfe)
            yield batch.images

    start = time.perf_counter()
    mu, sigma = compute_statistics(feature_fn, images(), progress=False)
    wall = time.perf_counter() - start
    num = int(np.asarray(labels).shape[0])
    stats = {"num_images": num, "nfe_per_batch": nfes, "nfe_total": int(sum(nfes)), "wall_s": wall,
             "images_per_s": num / wall}
    return mu, sigma, stats


def _dataset_batches(dataset, split: str, batch_size: int) -> Iterable[np.ndarray]:
    if split == "train":
        return (images for images, _ in dataset.batches(0))
    if split == "eval":
        data = dataset.eval_images
        return (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    raise ValueError(f"split (={split!r}) must be 'train' or 'eval'.")


def _as_unit_range(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:  # a source handing out raw pixels
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images


def dataset_statistics(
    dataset_name: str,
    feature_fn: Callable,
    *,
    num_images: int | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    split: str = "train",
    dataset_path: str | None = None,
    image_size: int | None = None,
    tfds_data_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of `feature_fn` features over a data set from `rfdit.data.load_dataset`.

    `split="train"` walks the training batches in their seeded order; `num_images=None` takes one pass
    (when the source reports its epoch length), at most `max_images`. `split="eval"` uses the held-out
    images.
    """
    kwargs = {k: v for k, v in dict(path=dataset_path, image_size=image_size, tfds_data_dir=tfds_data_dir).items()
              if v is not None}
    kwargs.setdefault("flip", False)  # reference statistics of the data as it is, not augmented
    dataset = load_dataset(dataset_name, batch_size=batch_size, seed=seed, **kwargs)
    if dataset.channels not in (1, 3):
        raise ValueError(
            f"data set {dataset_name!r} holds {dataset.channels}-channel arrays; FID needs images with 1 or 3 "
            "channels (pre-extracted latents can't be used: point at the images)."
        )
    if num_images is None:
        if split == "eval":
            num_images = len(dataset.eval_images)
        else:
            steps = getattr(dataset.train, "steps_per_epoch", None)
            if steps is None:
                raise ValueError(
                    f"data set {dataset_name!r} doesn't report its size; give num_images (e.g. 50000)."
                )
            num_images = steps * batch_size
        if max_images is not None:
            num_images = min(num_images, max_images)
    batches = (_as_unit_range(images) for images in _dataset_batches(dataset, split, batch_size))
    mu, sigma = compute_statistics(feature_fn, batches, num_images=num_images, progress=progress,
                                   desc=f"{dataset_name} features")
    return mu, sigma, num_images


def fid_during_training(
    model: DiT,
    fid_stats_path: str | os.PathLike,
    *,
    sampler: SamplerConfig,
    num_samples: int,
    batch_size: int,
    key: PRNGKeyArray,
    vae: StableVAE | None = None,
    inception_weights: str | os.PathLike | None = None,
    feature_fn: Callable | None = None,
) -> dict[str, float | int]:
    """FID of `num_samples` samples from `model` against the statistics at `fid_stats_path`, for eval intervals.

    Args:
        model: the (EMA) model.
        fid_stats_path: an npz with `mu`, `sigma` (fid_stats.py or ADM's reference batches).
        sampler: how to sample (a run's `sampler` section).
        num_samples: samples per evaluation (the original used a few thousand during training).
        batch_size: sampling and Inception batch (a run uses min(its batch size, num_samples)).
        key: labels (uniform over classes) and noise come from it.
        vae: the decoder of a latent model (required there).
        inception_weights: published Inception weights (default location when None).
        feature_fn: a replacement feature function (tests); `inception_weights` is then ignored.

    Returns `{"fid", "fid_num_samples", "fid_nfe", "fid_time_s"}` (prefix them as the logger wants);
    `fid_nfe` is the model evaluations per sample (the largest batch's, for adaptive solvers) and
    `fid_time_s` covers sampling, Inception and the Fréchet distance.
    The Inception is loaded and compiled once per process and reused by later evaluations.
    """
    if feature_fn is None:
        feature_fn, extractor = inception_features(inception_weights)
        ref_mu, ref_sigma = load_reference(fid_stats_path, extractor)
    else:
        ref_mu, ref_sigma = load_statistics(fid_stats_path)
    label_key, noise_key = jr.split(key)
    labels = uniform_labels(num_samples, model.config.num_classes, key=label_key)
    mu, sigma, stats = sample_statistics(
        model, feature_fn, labels=labels, key=noise_key, sampler=sampler, batch_size=batch_size, vae=vae,
        progress=False,
    )
    start = time.perf_counter()
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    return {"fid": fid, "fid_num_samples": num_samples, "fid_nfe": max(stats["nfe_per_batch"]),
            "fid_time_s": stats["wall_s"] + time.perf_counter() - start}


def grid_shape(num: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid holding `num` images."""
    cols = max(1, math.ceil(math.sqrt(num)))
    return math.ceil(num / cols), cols


__all__ = [
    "GeneratedBatch", "dataset_statistics", "fid_during_training", "generate",
    "generate_batches", "grid_shape", "inception_features", "load_for_sampling", "load_reference",
    "resolve_sampler", "run_setting", "sample_statistics", "save_fid_statistics", "statistics_extractor",
    "uniform_labels", "vae_source",
]
