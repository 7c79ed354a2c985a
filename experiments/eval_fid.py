"""FID of a trained (or imported) model. The flags mirror the Flax original's eval_fid.py, plus solver options.

    python experiments/eval_fid.py --load_dir runs/digits --fid_stats stats/digits_train.npz --num_samples 1000
    python experiments/eval_fid.py --load_dir imported/sit-xl-2 --vae weights/sd-vae-ft-ema \\
        --fid_stats VIRTUAL_imagenet256_labeled.npz --solver dopri5 --rtol 1e-3 --atol 1e-6 --cfg_scale 1.5 \\
        --cfg_channels 3 --num_samples 50000 --batch_size 256                # SiT-XL/2's ODE setting (FID 2.15)
    python experiments/eval_fid.py --load_dir runs/digits --random_inception --num_samples 64   # smoke test

Labels are drawn uniformly over the model's classes (the original took them from the data set). Samples go
to the Inception in [-1, 1] as generated; the original's `2x - 1` is not applied. Without `--fid_stats`,
reference statistics are computed from `--dataset_name` (default: the run's data set), min(num_samples,
one pass) training images, and saved for reuse. Output goes to `--out`, by default
`<load_dir>/fid/<timestamp>/`: fid.json (FID, NFE, wall time, throughput, settings) and sample_stats.npz
(the samples' mu and sigma, to compare against another reference later at no cost).

On a 2-core CPU the Inception takes about 0.45 s per image, and the Fréchet distance (a 2048² matrix square
root) about 70 s.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import time
from typing import Any, Literal

import jax.random as jr

from rfdit.cli import run_cli
from rfdit.generation import (
    RANDOM_INCEPTION_WARNING,
    ControllerFlags,
    dataset_statistics,
    inception_features,
    load_for_sampling,
    load_reference,
    resolve_sampler,
    run_setting,
    sample_statistics,
    save_fid_statistics,
    uniform_labels,
)
from rfdit.metrics import frechet_distance
from rfdit.sampling import SOLVERS
from rfdit.sde import SDE_SOLVERS

Solver = Literal[tuple(dict.fromkeys([*SOLVERS, *SDE_SOLVERS]))]  # type: ignore[valid-type]  # ODE and SDE names


@dataclasses.dataclass
class EvalFidArgs(ControllerFlags):
    """Compute the FID of a trained rfdit model."""

    load_dir: str
    """a run folder, its checkpoints/ folder, or an export folder"""
    dataset_name: str | None = None
    """data set for reference statistics when --fid_stats is not given; default: the run's"""
    dataset_path: str | None = None
    """its local copy, if it needs one; default: the run's"""
    fid_stats: str | None = None
    """reference statistics: an npz with mu and sigma (fid_stats.py, or ADM's reference batches)"""
    cfg_scale: float | None = None
    """guidance scale when --use_cfg 1; default: the run's (else 1)"""
    use_cfg: Literal[0, 1] = 1
    """0: plain conditional sampling (cfg_scale 1)"""
    batch_size: int = 128
    denoise_timesteps: int | None = None
    """fixed steps; default: the run's (else 32)"""
    num_steps: int | None = None
    """the same as --denoise_timesteps (sample.py's name)"""
    num_samples: int = 50000
    solver: Solver | None = None
    """ODE solver (with --diffusion, the SDE solver: euler is Euler-Maruyama); default: the run's (else euler)"""
    rtol: float | None = None
    """adaptive steps with this relative tolerance (not euler)"""
    atol: float | None = None
    """adaptive steps with this absolute tolerance (not euler)"""
    guidance_interval: tuple[float, float] | None = None
    """guide only for t in [LO, HI] (t=0 noise, t=1 data); REPA's t <= 0.7 is 0.3 1.0"""
    cfg_channels: int | None = None
    """guide only the first N channels (3: DiT/SiT's published latent setting); default all"""
    time_shift: float | None = None
    vae: str | None = None
    """VAE folder or Hub id for latent models; beats the one the config names"""
    inception_weights: str | None = None
    """FID Inception weights (.pth or .safetensors); default: the documented location (docs/fid.md)"""
    random_inception: bool = False
    """random Inception weights (seed 0): a smoke test; the FID is labelled as not comparable"""
    seed: int = 0
    out: str | None = None
    """output folder; default <load_dir>/fid/<timestamp>"""


def parse_args(argv: list[str] | None) -> EvalFidArgs:
    import tyro

    return tyro.cli(EvalFidArgs, args=argv, use_underscores=True, description=__doc__.split("\n")[0])


def _default_out(load_dir: str, random_inception: bool) -> pathlib.Path:
    base = pathlib.Path(load_dir)
    if base.name == "checkpoints":  # keep Orbax's folder free of anything else
        base = base.parent
    name = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-random-inception" if random_inception else "")
    return base / "fid" / name


def run(args: EvalFidArgs) -> dict[str, Any]:
    if args.num_samples < 2:
        raise ValueError(f"num_samples (={args.num_samples}) must be >= 2 to estimate a covariance.")
    label_key, noise_key = jr.split(jr.key(args.seed))
    start = time.perf_counter()
    model, config, vae = load_for_sampling(args.load_dir, args.vae)
    if args.num_steps is not None and args.denoise_timesteps is not None and args.num_steps != args.denoise_timesteps:
        raise ValueError(
            f"--num_steps {args.num_steps} contradicts --denoise_timesteps {args.denoise_timesteps}; give one."
        )
    num_steps = args.denoise_timesteps if args.denoise_timesteps is not None else args.num_steps
    cfg_scale = args.cfg_scale if args.use_cfg else 1.0
    settings = resolve_sampler(config, solver=args.solver, num_steps=num_steps, rtol=args.rtol,
                               atol=args.atol, cfg_scale=cfg_scale, time_shift=args.time_shift,
                               **args.controller())
    feature_fn, extractor = inception_features(args.inception_weights,
                                               random_seed=0 if args.random_inception else None)
    if args.random_inception:
        print(f"WARNING: {RANDOM_INCEPTION_WARNING}")
    out = pathlib.Path(args.out) if args.out else _default_out(args.load_dir, args.random_inception)
    out.mkdir(parents=True, exist_ok=True)

    batch_size = min(args.batch_size, args.num_samples)
    if args.fid_stats is not None:
        ref_mu, ref_sigma = load_reference(args.fid_stats, extractor)
        reference = str(args.fid_stats)
    else:
        dataset_name = args.dataset_name or run_setting(config, "dataset_name")
        if dataset_name is None:
            raise ValueError(
                f"{args.load_dir} names no data set; give --fid_stats (an npz with mu and sigma) or --dataset_name."
            )
        print(f"no --fid_stats: computing reference statistics from {dataset_name}")
        ref_mu, ref_sigma, count = dataset_statistics(
            dataset_name, feature_fn, batch_size=batch_size, max_images=args.num_samples,
            dataset_path=args.dataset_path or run_setting(config, "dataset_path"),
            image_size=run_setting(config, "data_image_size"), tfds_data_dir=run_setting(config, "tfds_data_dir"),
        )
        reference_path = save_fid_statistics(out / "reference_stats.npz", ref_mu, ref_sigma,
                                             feature_extractor=extractor, dataset_name=dataset_name, split="train",
                                             num_images=count)
        reference = f"{dataset_name} training images ({count}), saved to {reference_path}"
    load_s = time.perf_counter() - start

    labels = uniform_labels(args.num_samples, model.config.num_classes, key=label_key)
    mu, sigma, stats = sample_statistics(
        model, feature_fn, labels=labels, key=noise_key, sampler=settings, batch_size=batch_size,
        guidance_interval=args.guidance_interval, cfg_channels=args.cfg_channels, vae=vae,
    )
    stats_path = save_fid_statistics(out / "sample_stats.npz", mu, sigma, feature_extractor=extractor,
                                     load_dir=str(args.load_dir), num_images=args.num_samples)
    fid_start = time.perf_counter()
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    fid_s = time.perf_counter() - fid_start

    comparable = not args.random_inception
    nfe = stats["nfe_per_batch"]
    report = {
        "fid": fid,
        "comparable_with_published": comparable,
        "feature_extractor": extractor,
        **({"warning": RANDOM_INCEPTION_WARNING} if not comparable else {}),
        "load_dir": str(args.load_dir),
        "reference": reference,
        "num_samples": args.num_samples,
        "labels": f"uniform over {model.config.num_classes} classes (seed {args.seed})",
        "sampler": settings.to_dict(),
        "guidance_interval": args.guidance_interval,
        "cfg_channels": args.cfg_channels,
        "batch_size": batch_size,
        "nfe_per_batch": nfe,
        "nfe_total": stats["nfe_total"],
        "sampling_and_features_s": stats["wall_s"],
        "images_per_s": stats["images_per_s"],
        "frechet_distance_s": fid_s,
        "setup_s": load_s,
        "wall_s": time.perf_counter() - start,
        "sample_stats": str(stats_path),
    }
    (out / "fid.json").write_text(json.dumps(report, indent=2))
    label = "FID" if comparable else "FID (RANDOM Inception weights, NOT comparable)"
    print(f"{label}: {fid:.4f}  ({args.num_samples} samples, {settings.solver}, cfg {settings.cfg_scale:g})")
    print(f"NFE per batch: {nfe[0] if len(set(nfe)) == 1 else nfe}; total NFE {stats['nfe_total']}")
    print(f"wall time {report['wall_s']:.1f} s; sampling + Inception {stats['wall_s']:.1f} s "
          f"({stats['images_per_s']:.1f} img/s, compilation included)")
    print(f"wrote {out / 'fid.json'} and {stats_path}")
    return {**report, "out": str(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
