"""The training run behind `experiments/train_flow.py`: flags, their resolution, the loop.

The flags mirror the Flax original's (`--dataset_name`, `--model.preset`,
`--model.<field>`, `--wandb.<field>`, 0/1 integers for its booleans). `resolve` maps
them onto the library's configs in one place: an explicit flag beats the preset,
which beats the data set's default.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import plots
from .cli import run_cli
from .checkpoint import Checkpointer, CheckpointError, checkpoint_dir, export_model, restore_run
from .config import PRESETS, DiTConfig, FlowConfig, OptimConfig, SamplerConfig, compute_dtype
from .data import load_dataset
from .data.digits import LEVELS as DIGITS_LEVELS
from .data.latents import LatentBatches, read_latents_meta
from .distributed import global_batch, initialize, local_copy, make_mesh, shard_state
from .flow import interpolate
from .nn.dit import DiT, resolve_remat, resolve_scan_unroll
from .sampling import model_velocity, sample
from .train import TrainState, TrainStep, make_optimizer, resolve_grad_accum

DatasetName = Literal[
    "digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "imagenet256", "imagenet128", "celebahq256",
    "latents",
]
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


@dataclasses.dataclass(frozen=True)
class DatasetDefaults:
    image_size: int
    channels: int
    num_classes: int
    use_stable_vae: int
    preset: str | None
    batch_size: int
    max_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    cfg_scale: float
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps_per_call: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    t_sampler: str = "log-normal"


# The embedded default: small enough that training, compilation and evaluation take
# under five minutes on a 2-core CPU.
DIGITS_ARCHITECTURE = dict(hidden_size=64, depth=4, num_heads=4, patch_size=2, mlp_ratio=2.0)
_LARGE = dict(max_steps=1_000_000, log_interval=1000, eval_interval=50_000, save_interval=200_000, cfg_scale=4.0)
DATASETS: dict[str, DatasetDefaults] = {
    # lr 1e-3 and uniform t: on digits the original's 1e-4 and logit-normal t are slower to reach the evaluator's
    # targets, and logit-normal t lost recall (BENCHMARKS.md, "Choosing the digits defaults")
    "digits": DatasetDefaults(8, 1, 10, 0, None, 128, 4000, 100, 2000, 2000, 1.0, DIGITS_ARCHITECTURE,
                              steps_per_call=10, lr=1e-3, warmup_steps=200, t_sampler="uniform"),
    "cifar10": DatasetDefaults(32, 3, 10, 0, "big", 128, **_LARGE),
    "cifar100": DatasetDefaults(32, 3, 100, 0, "big", 128, **_LARGE),
    "tiny-imagenet": DatasetDefaults(64, 3, 200, 0, "big", 64, **_LARGE),
    "imagefolder": DatasetDefaults(64, 3, 1000, 0, "big", 64, **_LARGE),
    "imagenet256": DatasetDefaults(256, 3, 1000, 1, "big", 256, **_LARGE),
    "imagenet128": DatasetDefaults(128, 3, 1000, 1, "big", 256, **_LARGE),
    "celebahq256": DatasetDefaults(256, 3, 1, 1, "big", 256, **_LARGE),
    "latents": DatasetDefaults(256, 3, 1000, 1, "big", 256, **_LARGE),
}


@dataclasses.dataclass
class ModelArgs:
    """The original's `--model.*` dictionary, plus rfdit's additions."""

    preset: Preset | None = None
    """architecture preset; each data set has a default (digits: a small patch-2 DiT)"""
    lr: float | None = None
    """the data set's default: 1e-4 (the original's), digits 1e-3"""
    beta1: float = 0.9
    beta2: float = 0.99
    hidden_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    class_dropout_prob: float = 0.1
    num_classes: int | None = None
    """defaults to the data set's"""
    denoise_timesteps: int = 32
    """Euler steps (or steps of the chosen fixed-step solver) for samples"""
    cfg_scale: float | None = None
    """guidance scale for samples; the data set's default when unset (digits: 1.0)"""
    target_update_rate: float = 0.9999
    """EMA decay"""
    ema_warmup: Literal[0, 1] = 1
    """EMA decay min(rate, (1+n)/(10+n)); without it a short run's EMA stays near init"""
    t_sampler: Literal["log-normal", "logit-normal", "uniform"] | None = None
    """the data set's default: log-normal (the original's; it is the logit-normal), digits uniform"""
    t_conditioning: Literal[0, 1] = 1
    t_clip: Literal[0, 1] = 0
    """the original's clip: x_t formed with min(t, 0.99)"""
    use_stable_vae: Literal[0, 1] | None = None
    """latent space through the SD VAE; 1 by default for imagenet*/celebahq256"""
    vae_path: str | None = None
    """a diffusers-format VAE folder or a Hub id; default stabilityai/sd-vae-ft-mse (the original's)"""
    solver: Literal["euler", "midpoint", "heun", "ralston", "tsit5", "dopri5", "dopri8"] = "euler"
    time_scale: float = 1000.0
    warmup_steps: int | None = None
    """linear learning-rate warm-up; the data set's default (digits 200, others 0)"""
    grad_clip: float | None = None
    weight_decay: float = 0.0


@dataclasses.dataclass
class WandbArgs:
    project: str = "flow"
    name: str = "flow_{dataset_name}"
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """wandb needs `pip install wandb`; offline works with no network"""


@dataclasses.dataclass
class TrainArgs:
    """Train a rectified-flow DiT. With no flags: the embedded digits, a few minutes on a CPU."""

    dataset_name: DatasetName = "digits"
    dataset_path: str | None = None
    """a local copy: Hub-layout parquet shards or a saved `datasets` folder, an image folder, or latents"""
    tfds_data_dir: str | None = None
    """TFDS data dir holding prepared imagenet256/celebahq256 builds"""
    image_size: int | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    seed: int = 0
    log_interval: int | None = None
    eval_interval: int | None = None
    save_interval: int | None = None
    save_dir: str | None = None
    """output folder; default runs/<timestamp>"""
    load_dir: str | None = None
    """resume from a run folder (or its checkpoints/)"""
    fid_stats: str | None = None
    debug_overfit: Literal[0, 1] = 0
    dequantize: Literal[0, 1] = 0
    """add uniform noise of one quantisation step to training images (digits have 17 levels)"""
    use_stable_vae: Literal[0, 1] | None = None
    """the original's top-level spelling of --model.use_stable_vae"""
    steps_per_call: int | None = None
    """training steps scanned inside one compiled call (digits: 10; others: 1)"""
    keep_checkpoints: int = 3
    num_samples: int = 1000
    """EMA samples per evaluation set at the end, spread evenly over the classes (digits: three sets, all
    written to samples.npz, figures averaged); 0 skips the final grids, samples and evaluation"""
    precision: Literal["float32", "bf16"] = "float32"
    """bf16: matmuls and attention in bfloat16; parameters, optimizer state and the loss stay float32"""
    fsdp: int = 1
    """shard parameters and optimizer state over this many devices (the rest is data-parallel)"""
    remat: Literal["none", "dots", "full"] | None = None
    """what each block keeps for the backward pass: everything; only its linear layers' outputs (less
    memory, faster for float32 on CPUs); or only its input (least memory, ~1/3 more compute). Default:
    "dots" for float32 on CPUs, "none" otherwise"""
    scan_unroll: int | None = None
    """blocks unrolled per scan iteration. Default: 1 for float32 on CPUs or with --fsdp, the model's depth
    otherwise (faster on GPUs and for bf16 on CPUs, slower to compile)"""
    attention: Literal["einsum", "xla", "cudnn"] | None = None
    """attention implementation. Default: cuDNN's fused kernel for bf16 on GPUs, the einsum on CPUs, XLA's
    otherwise"""
    residual_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the residual stream between the products (as under PyTorch's autocast: float32). With
    --precision bf16, bfloat16 trains DiT-B/2 10% faster on an H100 (BENCHMARKS.md)"""
    grad_accum: int | None = None
    """split each batch into this many micro-batches (the same update as the full batch). Default: 1,
    except on one CPU device, where large activations are split to fit the caches"""
    coordinator_address: str | None = None
    """multi-process: host:port of process 0 (SLURM and TPU pods are detected without it)"""
    num_processes: int | None = None
    process_id: int | None = None
    dry_run: bool = False
    """print the resolved configuration and exit"""
    model: ModelArgs = dataclasses.field(default_factory=ModelArgs)
    wandb: WandbArgs = dataclasses.field(default_factory=WandbArgs)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved from the flags."""

    dataset_name: str
    dataset_path: str | None
    tfds_data_dir: str | None
    data_image_size: int
    data_channels: int
    batch_size: int
    max_steps: int
    seed: int
    log_interval: int
    eval_interval: int
    save_interval: int
    steps_per_call: int
    keep_checkpoints: int
    num_samples: int
    precision: str
    fsdp: int
    remat: str
    scan_unroll: int
    attention: str | None
    residual_dtype: str
    grad_accum: int
    debug_overfit: bool
    dequantize: bool
    use_stable_vae: bool
    vae_path: str | None
    fid_stats: str | None
    model: DiTConfig
    flow: FlowConfig
    optim: OptimConfig
    sampler: SamplerConfig
    wandb: dict[str, str]
    explicit_num_classes: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("model", "flow", "optim", "sampler"):
            out[name] = out[name].to_dict()
        return out


def resolve(args: TrainArgs) -> RunConfig:
    """Map the flags onto the library's configs: flag > preset > data set default."""
    defaults = DATASETS[args.dataset_name]
    m = args.model
    if args.use_stable_vae is not None and m.use_stable_vae is not None and args.use_stable_vae != m.use_stable_vae:
        raise ValueError(
            f"--use_stable_vae {args.use_stable_vae} contradicts --model.use_stable_vae {m.use_stable_vae}; give one."
        )
    vae_flag = m.use_stable_vae if m.use_stable_vae is not None else args.use_stable_vae
    use_vae = bool(defaults.use_stable_vae if vae_flag is None else vae_flag)
    data_size = args.image_size or defaults.image_size
    image_size, channels = (data_size // 8, 4) if use_vae else (data_size, defaults.channels)
    num_classes, vae_path = defaults.num_classes, m.vae_path
    if args.dataset_name == "latents":
        if args.dataset_path is None:
            raise ValueError("--dataset_name latents needs --dataset_path: a folder written by extract_latents.py.")
        meta = read_latents_meta(args.dataset_path)
        use_vae, data_size, num_classes = True, meta["image_size"], meta["num_classes"]
        image_size, _, channels = meta["latent_shape"]
        vae_path = vae_path or meta.get("vae_path")
    if args.dataset_name == "imagefolder" and args.dataset_path is not None and m.num_classes is None:
        from .data.images import list_image_folder

        num_classes = max(1, len(list_image_folder(args.dataset_path)[2]))  # class subfolders, or 1 if flat
    if args.dataset_name != "latents" and use_vae:
        vae_path = vae_path or DEFAULT_VAE
        factor, channels = _vae_geometry(vae_path)
        if data_size % factor:
            raise ValueError(f"the image size (={data_size}) must be divisible by the VAE's downsampling factor "
                             f"(={factor}); pass --image_size.")
        image_size = data_size // factor

    architecture = dict(defaults.architecture)
    if m.preset is not None or not architecture:
        architecture = dict(PRESETS[m.preset or defaults.preset])
    explicit = {k: getattr(m, k) for k in ("hidden_size", "patch_size", "depth", "num_heads", "mlp_ratio")
                if getattr(m, k) is not None}
    model = DiTConfig(
        **{**architecture, **explicit},
        image_size=image_size,
        in_channels=channels,
        num_classes=m.num_classes or num_classes,
        time_scale=m.time_scale,
        t_conditioning=bool(m.t_conditioning),
    )
    flow = FlowConfig(t_sampler=m.t_sampler or defaults.t_sampler, class_dropout_prob=m.class_dropout_prob,
                      t_clip_max=0.99 if m.t_clip else None)
    optim = OptimConfig(lr=m.lr if m.lr is not None else defaults.lr, beta1=m.beta1, beta2=m.beta2,
                        ema_decay=m.target_update_rate, ema_warmup=bool(m.ema_warmup),
                        warmup_steps=m.warmup_steps if m.warmup_steps is not None else defaults.warmup_steps,
                        grad_clip=m.grad_clip, weight_decay=m.weight_decay)
    sampler = SamplerConfig(solver=m.solver, num_steps=m.denoise_timesteps,
                            cfg_scale=defaults.cfg_scale if m.cfg_scale is None else m.cfg_scale)
    k = args.steps_per_call or defaults.steps_per_call
    intervals = {}
    for name in ("log_interval", "eval_interval", "save_interval"):
        value = getattr(args, name) or getattr(defaults, name)
        intervals[name] = max(k, int(math.ceil(value / k)) * k)  # checkpoints fall on chunk boundaries
    max_steps = args.max_steps if args.max_steps is not None else defaults.max_steps
    if max_steps % k:
        raise ValueError(f"max_steps (={max_steps}) must be a multiple of steps_per_call (={k}).")
    return RunConfig(
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, tfds_data_dir=args.tfds_data_dir,
        data_image_size=data_size,
        data_channels=defaults.channels, batch_size=args.batch_size or defaults.batch_size, max_steps=max_steps,
        seed=args.seed, steps_per_call=k, keep_checkpoints=args.keep_checkpoints, num_samples=args.num_samples,
        precision=args.precision, fsdp=args.fsdp, remat=resolve_remat(args.remat, compute_dtype(args.precision)),
        scan_unroll=resolve_scan_unroll(args.scan_unroll, model.depth, sharded_params=args.fsdp > 1,
                                        dtype=compute_dtype(args.precision)),
        attention=args.attention, residual_dtype=args.residual_dtype,
        grad_accum=resolve_grad_accum(args.grad_accum, model, args.batch_size or defaults.batch_size),
        debug_overfit=bool(args.debug_overfit), use_stable_vae=use_vae,
        dequantize=bool(args.dequantize), vae_path=vae_path,
        fid_stats=args.fid_stats, model=model, flow=flow, optim=optim, sampler=sampler,
        explicit_num_classes=m.num_classes is not None,
        wandb={"project": args.wandb.project, "name": args.wandb.name.format(dataset_name=args.dataset_name),
               "mode": args.wandb.mode},
        **intervals,
    )


def _vae_geometry(vae_path: str) -> tuple[int, int]:
    """(downsampling factor, latent channels) of a VAE folder's config; the SD VAE's (8, 4) for Hub ids."""
    config_path = pathlib.Path(vae_path) / "config.json"
    if not config_path.is_file():
        return 8, 4
    from .nn.vae import VAEConfig

    config = VAEConfig.from_diffusers_config(json.loads(config_path.read_text()))
    return config.downsample_factor, config.latent_channels


def parse_args(argv: list[str] | None) -> TrainArgs:
    import tyro

    return tyro.cli(TrainArgs, args=argv, use_underscores=True,
                    description="Train a rectified-flow DiT (rfdit). The flags mirror the Flax original's.")


class _StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves at the next chunk boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Logger:
    """metrics.jsonl always; wandb when asked for. Process 0 only."""

    def __init__(self, run_dir: pathlib.Path, wandb_cfg: dict[str, str], config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if enabled and wandb_cfg["mode"] != "disabled":
            try:
                import wandb
            except ImportError as error:
                raise ValueError(
                    f"--wandb.mode {wandb_cfg['mode']} needs wandb: `pip install wandb`, or use --wandb.mode disabled."
                ) from error
            self.wandb = wandb.init(project=wandb_cfg["project"], name=wandb_cfg["name"], mode=wandb_cfg["mode"],
                                    config=config, dir=str(run_dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _class_labels(num: int, num_classes: int) -> np.ndarray:
    return (np.arange(num) % num_classes).astype(np.int32)


class Evaluation:
    """Pictures and figures at eval intervals and at the end of a run."""

    def __init__(self, run: RunConfig, run_dir: pathlib.Path, data, vae=None):
        self.run, self.dir, self.data = run, run_dir, data
        self.grid_dir = run_dir / "grids"
        self.vae = vae
        self.decode = vae.decode if vae is not None else (lambda x: x)
        # held-out examples in the model's space (latents for a latent model), for reconstructions and losses
        count = min(256, len(data.eval_images))
        self.eval_x1, self.eval_labels = np.asarray(data.eval_images[:count]), np.asarray(data.eval_labels[:count])
        if vae is not None and self.eval_x1.shape[-1] != run.model.in_channels:
            self.eval_x1 = np.asarray(vae.encode(jnp.asarray(self.eval_x1)))
        self.rows = min(run.model.num_classes, 10)
        self.cols = 10
        shape = (self.rows * self.cols, run.model.image_size, run.model.image_size, run.model.in_channels)
        self.noise = jr.normal(jr.key(1234), shape)
        self.labels = jnp.asarray(np.repeat(np.arange(self.rows), self.cols).astype(np.int32))
        self.evaluator = None
        if run.dataset_name == "digits" and not run.use_stable_vae:
            from .metrics.digits import DigitsEvaluator

            self.evaluator = DigitsEvaluator()

    def images(self, x) -> np.ndarray:
        return np.asarray(self.decode(x))

    def grids(self, model, step: int) -> None:
        cfg_scales = sorted({0.0, 1.0, self.run.sampler.cfg_scale})
        step_counts = sorted({1, 4, self.run.sampler.num_steps})
        for scale in cfg_scales:
            for n in step_counts:
                x, _ = sample(model, self.noise, self.labels, cfg_scale=jnp.asarray(scale), solver="euler",
                              num_steps=n)
                images = self.images(x).reshape(self.rows, self.cols, *self.images(x).shape[1:])
                plots.save_grid(images, self.grid_dir / f"step{step:07d}_cfg{scale:g}_steps{n}.png",
                                scale=max(1, 64 // images.shape[2]))

    def reconstructions(self, model, step: int) -> None:
        """One-step denoising: x̂1 = x_t + (1 - t)·v(x_t, t), at several t."""
        count = min(10, len(self.eval_x1))
        x1, y = jnp.asarray(self.eval_x1[:count]), jnp.asarray(self.eval_labels[:count])
        x0 = jr.normal(jr.key(99), x1.shape)
        rows = [self.images(x1)]
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            xt, v = _noisy_and_velocity(model, x0, x1, y, jnp.asarray(t, jnp.float32))
            rows += [self.images(xt), self.images(xt + (1 - t) * v)]
        plots.save_grid(np.stack(rows), self.grid_dir / f"step{step:07d}_reconstructions.png",
                        scale=max(1, 64 // rows[0].shape[1]))

    def loss_by_t(self, model, step: int) -> dict[str, float]:
        x1, y = jnp.asarray(self.eval_x1), jnp.asarray(self.eval_labels)
        x0 = jr.normal(jr.key(42), x1.shape)
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
        from .generation import generate

        labels = _class_labels(num, self.run.model.num_classes)
        s = self.run.sampler
        images, stats = generate(model, labels=labels, key=key, solver=s.solver, num_steps=s.num_steps,
                                 cfg_scale=s.cfg_scale, batch_size=len(self.labels), vae=self.vae, progress=False)
        return images, labels, {"nfe": stats["nfe_per_batch"][0], "solver": s.solver, "num_steps": s.num_steps,
                                "cfg_scale": s.cfg_scale}

    def figures(self, model, num: int, *, key) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        images, labels, _ = self.generate(model, num, key=key)
        return {f"eval/{k}": v for k, v in self.evaluator.evaluate(images, labels).items()}


@eqx.filter_jit
def _noisy_and_velocity(model, x0, x1, y, t):
    """x_t at one time t for a batch, and the model's velocity there."""
    tt = jnp.full((x1.shape[0],), t)
    xt = jax.vmap(interpolate)(x0, x1, tt)
    return xt, jax.vmap(lambda a, b, c: model_velocity(model, a, b, c))(xt, tt, y)


def _run_dir(save_dir: str | None) -> pathlib.Path:
    if save_dir is None:
        save_dir = pathlib.Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = pathlib.Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def train(args: TrainArgs) -> dict[str, Any]:
    """Run training as configured; returns a summary (and writes the run folder)."""
    run = resolve(args)
    if args.dry_run:
        print(json.dumps(run.to_dict(), indent=2))
        return {"config": run.to_dict()}
    is_main = jax.process_index() == 0
    run_dir = _run_dir(args.save_dir)
    key = jr.key(run.seed)
    model_key, state_key, sample_key = jr.split(key, 3)
    optimizer = make_optimizer(run.optim)
    with jax.numpy_dtype_promotion("standard"):
        model = DiT(run.model, key=model_key, dtype=compute_dtype(run.precision),
                    remat=run.remat, scan_unroll=run.scan_unroll, attention=run.attention,
                    residual_dtype=run.residual_dtype)
        state = TrainState.create(model, optimizer, key=state_key)

    with Checkpointer(run_dir / "checkpoints", max_to_keep=run.keep_checkpoints) as checkpointer:
        return _train(args, run, run_dir, state, optimizer, checkpointer, sample_key, is_main)


def _load_data(run: RunConfig):
    common = dict(seed=run.seed, process_index=jax.process_index(), process_count=jax.process_count())
    if run.dataset_name == "latents":
        from .data import Dataset

        batches = LatentBatches(run.dataset_path, run.batch_size, **common)
        eval_count = min(256, len(batches.labels))
        return Dataset("latents", run.model.image_size, run.model.in_channels, run.model.num_classes, batches,
                       np.asarray(batches.mean[:eval_count], np.float32), np.asarray(batches.labels[:eval_count]))
    # an image folder's classes come from its subfolders; other data sets must fit the model's labels
    num_classes = None if run.dataset_name == "imagefolder" and not run.explicit_num_classes else run.model.num_classes
    return load_dataset(run.dataset_name, batch_size=run.batch_size, path=run.dataset_path,
                        image_size=run.data_image_size, tfds_data_dir=run.tfds_data_dir,
                        debug_overfit=run.debug_overfit, num_classes=num_classes, **common)


def _load_vae(run: RunConfig):
    if not run.use_stable_vae:
        return None
    from .nn.vae import StableVAE

    return StableVAE.from_pretrained(run.vae_path)


def _model_space(run: RunConfig, vae):
    """Host batches -> what the flow model trains on: pixels, fresh VAE latents, or a draw from stored ones.

    The randomness is a function of (seed, step), so a resumed run draws the same latents.
    """
    latent_key = jr.fold_in(jr.key(run.seed), 0x1A7E)
    if run.dataset_name == "latents":
        @jax.jit
        def draw(stacked, step):
            mean, std = jnp.split(stacked, 2, axis=-1)
            return mean + std * jr.normal(jr.fold_in(latent_key, step), mean.shape)

        return lambda images, step: draw(images, step)
    if vae is None and run.dequantize:
        step_size = 2.0 / (DIGITS_LEVELS - 1)  # one quantisation step of the [-1, 1] range

        @jax.jit
        def dequantize(images, step):
            noise = jr.uniform(jr.fold_in(latent_key, step), images.shape, minval=-0.5, maxval=0.5)
            return images + step_size * noise

        return dequantize
    if vae is None:
        return lambda images, step: images

    def encode(images, step):
        flat = images.reshape(-1, *images.shape[-3:])
        latents = vae.encode(flat, key=jr.fold_in(latent_key, step))
        return latents.reshape(*images.shape[:-3], *latents.shape[1:])

    return encode


def _train(args, run, run_dir, state, optimizer, checkpointer, sample_key, is_main) -> dict[str, Any]:
    start_step = 0
    if args.load_dir is not None:
        state, start_step = restore_run(args.load_dir, state, run.model)
        if start_step % run.steps_per_call:
            raise CheckpointError(
                f"the checkpoint is at step {start_step}, not a multiple of --steps_per_call {run.steps_per_call}; "
                "resume with a steps_per_call that divides it."
            )
        print(f"resumed from {checkpoint_dir(args.load_dir)} at step {start_step}")
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2))

    mesh = make_mesh(run.fsdp)
    state = shard_state(state, mesh)  # replicated, or FSDP-sharded; the batch is sharded over every device
    data = _load_data(run)
    vae = _load_vae(run)
    if vae is not None:
        vae = shard_state(vae, make_mesh(1))  # replicated next to the batch
    to_model_space = _model_space(run, vae)
    if (data.image_size, data.channels) != (run.model.image_size, run.model.in_channels) and not run.use_stable_vae:
        raise ValueError(
            f"the data set gives {data.image_size}×{data.image_size}×{data.channels} images but the model expects "
            f"{run.model.image_size}×{run.model.image_size}×{run.model.in_channels}; check --image_size."
        )
    step_fn = TrainStep(optimizer, run.flow, run.optim, num_classes=run.model.num_classes,
                        steps_per_call=run.steps_per_call, grad_accum=run.grad_accum)
    fid_stats = None
    if run.fid_stats is not None:  # fail now, not at the first eval
        from .generation import inception_features
        from .metrics import load_statistics

        fid_stats = load_statistics(run.fid_stats)
        inception_features()
    logger = _Logger(run_dir, run.wandb, run.to_dict(), is_main)
    evaluation = Evaluation(run, run_dir, data, vae)
    if evaluation.evaluator is not None and is_main:
        (run_dir / "eval_references.json").write_text(json.dumps(evaluation.evaluator.references, indent=2))

    def save(step: int) -> None:
        checkpointer.save(step, state, {"run": run.to_dict(), "data_step": step})

    from tqdm.auto import tqdm

    from .data import Prefetcher

    k = run.steps_per_call
    batches = Prefetcher(data.batches(start_step), depth=2 * k)
    step = start_step
    pending: list[dict[str, jax.Array]] = []
    interval_start, interval_steps = time.perf_counter(), 0
    progress = tqdm(total=run.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                    disable=not is_main, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    stopped = None
    try:
        with _StopRequested() as stop:
            while step < run.max_steps:
                chunk = [next(batches) for _ in range(k)]
                images = np.stack([c[0] for c in chunk]) if k > 1 else chunk[0][0]
                labels = np.stack([c[1] for c in chunk]) if k > 1 else chunk[0][1]
                images = to_model_space(global_batch(images, mesh, steps_axis=k > 1), step)
                state, metrics = step_fn(state, images, global_batch(labels, mesh, steps_axis=k > 1))
                pending.append(metrics)
                step += k
                interval_steps += k
                progress.update(k)
                if step % run.log_interval == 0 or step == run.max_steps:
                    values = {name: float(np.mean([np.mean(np.asarray(m[name])) for m in pending]))
                              for name in pending[0]}
                    elapsed = time.perf_counter() - interval_start
                    values["img_per_s"] = interval_steps * run.batch_size / elapsed
                    values.update({f"data/{name}": count for name, count in data.stats().items()})
                    pending, interval_start, interval_steps = [], time.perf_counter(), 0
                    logger.log(step, values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
                if step % run.eval_interval == 0 and step < run.max_steps:
                    ema = local_copy(state.ema)  # every process joins the gather; process 0 evaluates
                    if is_main:
                        values = evaluate(evaluation, ema, step, sample_key, num=500)
                        if fid_stats is not None:
                            values.update(_fid(ema, run, vae, jr.fold_in(sample_key, step)))
                        logger.log(step, values)
                if step % run.save_interval == 0 and step < run.max_steps:
                    save(step)
                if stop.signal is not None:
                    stopped = stop.signal
                    break
        save(step)
    finally:
        progress.close()
        batches.close()
    if stopped is not None:
        print(f"stopped by signal {stopped} at step {step}; saved a checkpoint in {checkpointer.directory}")
        logger.close()
        return {"step": step, "run_dir": str(run_dir), "stopped": True}

    summary: dict[str, Any] = {"step": step, "run_dir": str(run_dir)}
    ema = local_copy(state.ema)
    if is_main:
        export_model(ema, run_dir / "export", {"run": run.to_dict(), "sampler": run.sampler.to_dict()})
    if is_main and run.num_samples > 0:
        final = evaluate(evaluation, ema, step, sample_key, num=0)
        if fid_stats is not None:
            final.update(_fid(ema, run, vae, jr.fold_in(sample_key, step)))
        logger.log(step, final)
        # EVAL_SETS disjoint sets of num_samples each: the figures are means, with their spread, since one set's
        # recall and Fréchet distance vary by a few hundredths from draw to draw
        sets = EVAL_SETS if evaluation.evaluator is not None else 1
        images, labels, info = evaluation.generate(ema, sets * run.num_samples, key=jr.fold_in(sample_key, 7))
        np.savez_compressed(run_dir / "samples.npz", images=images.astype(np.float32), labels=labels)
        plots.loss_curve(run_dir / "metrics.jsonl", run_dir / "grids" / "loss_curve.png")
        report: dict[str, Any] = {"step": step, "num_samples": len(images), "sampler": info, "model": "ema"}
        if evaluation.evaluator is not None:
            n = run.num_samples
            per_set = [evaluation.evaluator.evaluate(images[i * n:(i + 1) * n], labels[i * n:(i + 1) * n])
                       for i in range(sets)]
            report.update({k: float(np.mean([r[k] for r in per_set])) for k in per_set[0]})
            report["std"] = {k: float(np.std([r[k] for r in per_set])) for k in per_set[0]}
            report["per_set"] = per_set
            report["samples_per_set"] = n
            report["references"] = evaluation.evaluator.references
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        summary["eval"] = report
        print(json.dumps({k: v for k, v in report.items() if k not in ("references", "per_set")}, indent=2))
        print(f"run folder: {run_dir}")
    logger.close()
    return summary


FID_SAMPLES_DURING_TRAINING = 5000
EVAL_SETS = 3


def _fid(model, run: RunConfig, vae, key) -> dict[str, Any]:
    """FID on fewer samples than a final evaluation, as the original did at eval intervals."""
    from .generation import fid_during_training

    values = fid_during_training(model, run.fid_stats, sampler=run.sampler, num_samples=FID_SAMPLES_DURING_TRAINING,
                                 batch_size=min(run.batch_size, FID_SAMPLES_DURING_TRAINING), key=key, vae=vae)
    return {f"eval/{k}": v for k, v in values.items()}


def evaluate(evaluation: Evaluation, model, step: int, key, *, num: int) -> dict[str, Any]:
    """Grids, reconstructions, loss by t, and (with `num` > 0) the evaluator's figures."""
    evaluation.grids(model, step)
    evaluation.reconstructions(model, step)
    values: dict[str, Any] = dict(evaluation.loss_by_t(model, step))
    if num:
        values.update(evaluation.figures(model, num, key=jr.fold_in(key, step)))
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def run(args: TrainArgs) -> dict[str, Any]:
        if not args.dry_run:
            initialize(args.coordinator_address, args.num_processes, args.process_id)
        return train(args)

    return run_cli(parse_args, run, argv)
