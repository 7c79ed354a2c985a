"""The training run's flags and their resolution into a `RunConfig` of sections.

The flags mirror the Flax original's (`--dataset_name`, `--model.preset`, `--model.<field>`,
`--wandb.<field>`, 0/1 integers for its booleans). `resolve` maps them onto the sections in one place:
an explicit flag beats the preset, which beats the data set's default (`DATASETS`).

A `RunConfig` has one section per concern: `data`, `model` (`rfdit.DiTConfig`), `flow`
(`rfdit.FlowConfig`), `optimizer` (`rfdit.OptimConfig`), `sampler` (`rfdit.SamplerConfig`), `execution`
and `schedule`, plus the seed and the wandb settings. On disk (config.json, checkpoints, exports) it keeps
the flat layout of rfdit 0.1.0 (`FLAT_LAYOUT`), so run folders of every version read alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Literal

import tyro

from ..checkpoint import CheckpointError, checkpoint_dir
from ..config import (
    PRESETS,
    DiTConfig,
    FlowConfig,
    OptimConfig,
    SamplerConfig,
    compute_dtype,
)
from ..data.images import list_image_folder
from ..data.latents import read_latents_meta
from ..nn.policy import resolve_remat, resolve_scan_unroll
from ..nn.vae import VAEConfig
from ..sampling import SolverName
from ..train import resolve_grad_accum

DatasetName = Literal[
    "digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "imagenet256", "imagenet128", "celebahq256",
    "latents",
]
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetDefaults:
    """What a data set's run uses where no flag says otherwise; the defaults are the large data sets'."""

    image_size: int
    channels: int
    num_classes: int
    batch_size: int
    use_stable_vae: bool = False
    preset: str | None = "big"
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    """beats `preset` when given (and no --model.preset is)"""
    max_steps: int = 1_000_000
    log_interval: int = 1000
    eval_interval: int = 50_000
    save_interval: int = 200_000
    cfg_scale: float = 4.0
    steps_per_call: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    t_sampler: str = "log-normal"
    dequantize: bool = False


# The embedded default: small enough that training, compilation and evaluation take
# under five minutes on a 2-core CPU.
DIGITS_ARCHITECTURE = dict(hidden_size=64, depth=4, num_heads=4, patch_size=2, mlp_ratio=2.0)
DATASETS: dict[str, DatasetDefaults] = {
    # lr 1e-3 and uniform t: on digits the original's 1e-4 and logit-normal t are slower to reach the evaluator's
    # targets, and logit-normal t lost recall (BENCHMARKS.md, "Choosing the digits defaults")
    "digits": DatasetDefaults(image_size=8, channels=1, num_classes=10, batch_size=128, preset=None,
                              architecture=DIGITS_ARCHITECTURE, max_steps=4000, log_interval=100, eval_interval=2000,
                              save_interval=2000, cfg_scale=1.0, steps_per_call=10, lr=1e-3, warmup_steps=200,
                              t_sampler="uniform", dequantize=True),
    "cifar10": DatasetDefaults(image_size=32, channels=3, num_classes=10, batch_size=128),
    "cifar100": DatasetDefaults(image_size=32, channels=3, num_classes=100, batch_size=128),
    "tiny-imagenet": DatasetDefaults(image_size=64, channels=3, num_classes=200, batch_size=64),
    "imagefolder": DatasetDefaults(image_size=64, channels=3, num_classes=1000, batch_size=64),
    "imagenet256": DatasetDefaults(image_size=256, channels=3, num_classes=1000, batch_size=256, use_stable_vae=True),
    "imagenet128": DatasetDefaults(image_size=128, channels=3, num_classes=1000, batch_size=256, use_stable_vae=True),
    "celebahq256": DatasetDefaults(image_size=256, channels=3, num_classes=1, batch_size=256, use_stable_vae=True),
    "latents": DatasetDefaults(image_size=256, channels=3, num_classes=1000, batch_size=256, use_stable_vae=True),
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
    solver: SolverName = "euler"
    time_scale: float | None = None
    """t's factor before the sinusoidal time embedding: rfdit.DiTConfig's default (the original: 10000), or
    with --load_dir the resumed run's"""
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
    """output folder; default runs/<timestamp> (a new one). A folder that holds a run is refused, unless it is
    the run being continued or --overwrite 1 is given"""
    load_dir: str | None = None
    """continue the run in this run folder (or its checkpoints/), in that folder unless --save_dir names another"""
    overwrite: Literal[0, 1] = 0
    """1: delete the run in --save_dir and start over there"""
    allow_change: str | None = None
    """settings a resumed run may change from its checkpoint's, comma-separated (e.g. model.lr,batch_size);
    any other difference in a setting that changes the result is refused"""
    load_fallback: Literal[0, 1] = 0
    """1: with --load_dir, rename damaged checkpoints unreadable-<step> and resume from the newest good one"""
    fid_stats: str | None = None
    debug_overfit: Literal[0, 1] = 0
    dequantize: Literal[0, 1] | None = None
    """add uniform noise of one pixel level to training images: 2/16 for digits (17 levels), 2/255 for 8-bit
    images; pixel-space runs only. The data set's default (digits 1, others 0), or with --load_dir the
    resumed run's"""
    use_stable_vae: Literal[0, 1] | None = None
    """the original's top-level spelling of --model.use_stable_vae"""
    steps_per_call: int | None = None
    """training steps scanned inside one compiled call (digits: 10; others: 1)"""
    keep_checkpoints: int = 3
    """the newest checkpoints kept (at least 1)"""
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


def parse_args(argv: list[str] | None) -> TrainArgs:
    return tyro.cli(TrainArgs, args=argv, use_underscores=True,
                    description="Train a rectified-flow DiT (rfdit). The flags mirror the Flax original's.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the run trains on, and in which space (pixels, or a VAE's latents)."""

    name: str
    path: str | None
    tfds_data_dir: str | None
    image_size: int
    """of the data set's images; the model's are smaller in latent space"""
    channels: int
    batch_size: int
    debug_overfit: bool
    dequantize: bool
    use_stable_vae: bool
    vae_path: str | None
    fid_stats: str | None
    """reference statistics for FID at eval intervals"""
    explicit_num_classes: bool = False
    """--model.num_classes was given (an image folder's classes then need not match its subfolders)"""


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the steps are computed: precision, sharding and memory trade-offs, steps per compiled call."""

    precision: str
    fsdp: int
    remat: str
    scan_unroll: int
    attention: str | None
    residual_dtype: str
    grad_accum: int
    steps_per_call: int


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How long the run lasts and when it logs, evaluates and saves (multiples of steps_per_call)."""

    max_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    keep_checkpoints: int
    num_samples: int
    """EMA samples per evaluation set at the end; 0 skips the final evaluation"""


# config.json's flat layout (rfdit 0.1.0's, kept): its key, the section (None: the run itself), the field.
FLAT_LAYOUT: tuple[tuple[str, str | None, str], ...] = (
    ("dataset_name", "data", "name"), ("dataset_path", "data", "path"), ("tfds_data_dir", "data", "tfds_data_dir"),
    ("data_image_size", "data", "image_size"), ("data_channels", "data", "channels"),
    ("batch_size", "data", "batch_size"), ("max_steps", "schedule", "max_steps"), ("seed", None, "seed"),
    ("log_interval", "schedule", "log_interval"), ("eval_interval", "schedule", "eval_interval"),
    ("save_interval", "schedule", "save_interval"), ("steps_per_call", "execution", "steps_per_call"),
    ("keep_checkpoints", "schedule", "keep_checkpoints"), ("num_samples", "schedule", "num_samples"),
    ("precision", "execution", "precision"), ("fsdp", "execution", "fsdp"), ("remat", "execution", "remat"),
    ("scan_unroll", "execution", "scan_unroll"), ("attention", "execution", "attention"),
    ("residual_dtype", "execution", "residual_dtype"), ("grad_accum", "execution", "grad_accum"),
    ("debug_overfit", "data", "debug_overfit"), ("dequantize", "data", "dequantize"),
    ("use_stable_vae", "data", "use_stable_vae"), ("vae_path", "data", "vae_path"),
    ("fid_stats", "data", "fid_stats"), ("model", None, "model"), ("flow", None, "flow"),
    ("optim", None, "optimizer"), ("sampler", None, "sampler"), ("wandb", None, "wandb"),
    ("explicit_num_classes", "data", "explicit_num_classes"),
)
_SECTIONS = {"data": DataConfig, "execution": ExecutionConfig, "schedule": ScheduleConfig}
_CONFIGS = {"model": DiTConfig, "flow": FlowConfig, "optimizer": OptimConfig, "sampler": SamplerConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved from the flags, one section per concern."""

    data: DataConfig
    model: DiTConfig
    flow: FlowConfig
    optimizer: OptimConfig
    sampler: SamplerConfig
    execution: ExecutionConfig
    schedule: ScheduleConfig
    seed: int
    wandb: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON layout of config.json (`FLAT_LAYOUT`)."""
        out = {}
        for key, section, name in FLAT_LAYOUT:
            value = getattr(self if section is None else getattr(self, section), name)
            out[key] = value.to_dict() if name in _CONFIGS else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Read config.json's flat layout back (every rfdit version's)."""
        missing = sorted({key for key, _, _ in FLAT_LAYOUT} - set(data) - {"explicit_num_classes"})
        if missing:
            raise ValueError(f"a run config needs {missing}; got keys {sorted(data)}.")
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, section, name in FLAT_LAYOUT:
            if key in data:
                value = _CONFIGS[name].from_dict(data[key]) if name in _CONFIGS else data[key]
                (top if section is None else sections[section])[name] = value
        return cls(**top, **{name: _SECTIONS[name](**fields) for name, fields in sections.items()})


def resolve(args: TrainArgs) -> RunConfig:
    """Map the flags onto the run's sections: flag > preset > data set default."""
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
    time_scale = m.time_scale
    if time_scale is None:
        time_scale = _resumed(args.load_dir, ("model", "time_scale"), DiTConfig.time_scale)
    model = DiTConfig(
        **{**architecture, **explicit},
        image_size=image_size,
        in_channels=channels,
        num_classes=m.num_classes or num_classes,
        time_scale=time_scale,
        t_conditioning=bool(m.t_conditioning),
    )
    flow = FlowConfig(t_sampler=m.t_sampler or defaults.t_sampler, class_dropout_prob=m.class_dropout_prob,
                      t_clip_max=0.99 if m.t_clip else None)
    optimizer = OptimConfig(lr=m.lr if m.lr is not None else defaults.lr, beta1=m.beta1, beta2=m.beta2,
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
    if args.keep_checkpoints < 1:
        raise ValueError(f"--keep_checkpoints (={args.keep_checkpoints}) must be at least 1: a run keeps its newest "
                         "checkpoints to resume from.")
    dequantize = args.dequantize
    if dequantize is None:
        dequantize = _resumed(args.load_dir, ("dequantize",), defaults.dequantize and not use_vae, absent=False)
    if args.dequantize and (use_vae or args.dataset_name == "latents"):
        raise ValueError("--dequantize 1 adds noise of one pixel level to training images; this run trains on VAE "
                         "latents, which have no pixel levels. Drop --dequantize (or train in pixel space with "
                         "--model.use_stable_vae 0).")
    batch_size = args.batch_size or defaults.batch_size
    dtype = compute_dtype(args.precision)
    data = DataConfig(
        name=args.dataset_name, path=args.dataset_path, tfds_data_dir=args.tfds_data_dir, image_size=data_size,
        channels=defaults.channels, batch_size=batch_size, debug_overfit=bool(args.debug_overfit),
        dequantize=bool(dequantize), use_stable_vae=use_vae, vae_path=vae_path, fid_stats=args.fid_stats,
        explicit_num_classes=m.num_classes is not None,
    )
    execution = ExecutionConfig(
        precision=args.precision, fsdp=args.fsdp, remat=resolve_remat(args.remat, dtype),
        scan_unroll=resolve_scan_unroll(args.scan_unroll, model.depth, sharded_params=args.fsdp > 1, dtype=dtype),
        attention=args.attention, residual_dtype=args.residual_dtype,
        grad_accum=resolve_grad_accum(args.grad_accum, model, batch_size), steps_per_call=k,
    )
    schedule = ScheduleConfig(max_steps=max_steps, keep_checkpoints=args.keep_checkpoints,
                              num_samples=args.num_samples, **intervals)
    wandb = {"project": args.wandb.project, "name": args.wandb.name.format(dataset_name=args.dataset_name),
             "mode": args.wandb.mode}
    return RunConfig(data=data, model=model, flow=flow, optimizer=optimizer, sampler=sampler, execution=execution,
                     schedule=schedule, seed=args.seed, wandb=wandb)


def _vae_geometry(vae_path: str) -> tuple[int, int]:
    """(downsampling factor, latent channels) of a VAE folder's config; the SD VAE's (8, 4) for Hub ids."""
    config_path = pathlib.Path(vae_path) / "config.json"
    if not config_path.is_file():
        return 8, 4
    config = VAEConfig.from_diffusers_config(json.loads(config_path.read_text()))
    return config.downsample_factor, config.latent_channels


# config.json's settings that change what a run computes; a resumed run must keep its checkpoint's (or name the
# change in --allow_change). Not among them: max_steps, intervals, data paths, sampler, sharding and memory options.
RESULT_SETTINGS = ("dataset_name", "data_image_size", "data_channels", "batch_size", "seed", "debug_overfit",
                   "dequantize", "use_stable_vae", "precision", "residual_dtype", "flow", "optim")
# config.json's names of settings whose flag is spelled otherwise
FLAG_NAMES = {
    "data_image_size": "image_size", "optim.ema_decay": "model.target_update_rate", "flow.t_clip_max": "model.t_clip",
    **{f"optim.{name}": f"model.{name}" for name in ("lr", "beta1", "beta2", "warmup_steps", "grad_clip",
                                                       "weight_decay", "ema_warmup")},
    **{f"flow.{name}": f"model.{name}" for name in ("t_sampler", "class_dropout_prob")},
}


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(flag name, saved value, new value) of each result setting that differs between two config.json dicts.

    The saved one is read as `RunConfig.from_dict` reads it, so settings that its version did not have count
    with their defaults."""
    try:
        saved = RunConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):
        pass
    changes = []
    for key in RESULT_SETTINGS:
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) or isinstance(new, dict):
            old, new = old or {}, new or {}
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    changes.append((FLAG_NAMES.get(f"{key}.{name}", f"{key}.{name}"), old.get(name), new.get(name)))
        elif old != new:
            changes.append((FLAG_NAMES.get(key, key), old, new))
    return changes


def _resumed(load_dir: str | None, path: tuple[str, ...], default: Any, absent: Any = None) -> Any:
    """A setting a resumed run was trained with (its config.json, at `path`), so that a run started before a
    change of the default resumes without the flag; `default` for a new run, `absent` (default: `default`)
    for a config.json written before the setting existed."""
    if load_dir is None:
        return default
    saved = checkpoint_dir(load_dir).parent / "config.json"
    try:
        value = json.loads(saved.read_text())
    except (OSError, ValueError):
        return default  # no readable config.json: the checkpoint's own check says what differs
    try:
        for key in path:
            value = value[key]
    except (KeyError, TypeError):
        return default if absent is None else absent
    return type(default)(value)


def check_resume(saved: dict[str, Any], run: RunConfig, allow_change: str | None, source: str) -> None:
    """Refuse to resume the run config `saved` as `run` if a result setting differs that `allow_change` does
    not name (flag names, comma-separated)."""
    now = run.to_dict()
    known = {FLAG_NAMES.get(key, key) for key in RESULT_SETTINGS if not isinstance(now.get(key), dict)}
    known |= {FLAG_NAMES.get(f"{key}.{name}", f"{key}.{name}") for key in RESULT_SETTINGS
              if isinstance(now.get(key), dict) for name in now[key]}
    allowed = {name.strip().removeprefix("--") for name in (allow_change or "").split(",") if name.strip()}
    unknown = sorted(allowed - known)
    if unknown:
        raise ValueError(f"--allow_change names {unknown}, which are not settings a resumed run compares; "
                         f"those are {sorted(known)}.")
    refused = [(name, old, new) for name, old, new in changed_settings(saved, now) if name not in allowed]
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in refused)
        raise CheckpointError(
            f"the checkpoint in {source} was made with other settings ({listed}). Resume with its settings (see "
            f"its config.json), or name the changes you intend: --allow_change {','.join(n for n, _, _ in refused)}."
        )
