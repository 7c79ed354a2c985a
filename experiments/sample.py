"""Sample a trained (or imported) model: a PNG grid, an npz of the images, the NFE and the time taken.

    python experiments/sample.py --load_dir runs/digits --labels 0 1 2 3 4 5 6 7 8 9      # seconds on a CPU
    python experiments/sample.py --load_dir runs/digits/export --num_samples 64 --solver dopri5 --rtol 1e-3
    python experiments/sample.py --load_dir imported/sit-xl-2 --vae weights/sd-vae-ft-ema --num_samples 16 \\
        --solver dopri5 --rtol 1e-3 --atol 1e-6 --cfg_scale 1.5 --cfg_channels 3           # SiT's ODE setting
    python experiments/sample.py --load_dir runs/digits --num_samples 64 --num_steps 249 \\
        --diffusion sigma --last_step mean --last_step_size 0.04     # SiT's SDE: 250 Euler-Maruyama evaluations

`--load_dir` is a run folder, its checkpoints/ or an export folder. Without `--labels`, `--num_samples`
labels (default 16) are drawn uniformly over the classes. Unset sampler flags take the run's saved sampler
(solver, steps, cfg_scale), then euler with 32 steps at cfg 1. Output goes to `--out`, by default
`<load_dir>/samples/<timestamp>/`: grid.png, samples.npz (images (N, H, W, C) in [-1, 1], labels (N,)),
sample.json (settings and stats).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any, Literal

import jax.random as jr
import numpy as np

from rfdit import plots
from rfdit.cli import run_cli
from rfdit.generation import (
    ControllerFlags,
    generate,
    generate_kwargs,
    grid_shape,
    load_for_sampling,
    resolve_sampler,
    uniform_labels,
)
from rfdit.sampling import SOLVERS
from rfdit.sde import SDE_SOLVERS

Solver = Literal[tuple(dict.fromkeys([*SOLVERS, *SDE_SOLVERS]))]  # type: ignore[valid-type]  # ODE and SDE names


@dataclasses.dataclass
class SampleArgs(ControllerFlags):
    """Sample a trained rfdit model into a PNG grid and an npz."""

    load_dir: str
    """a run folder, its checkpoints/ folder, or an export folder"""
    labels: tuple[int, ...] | None = None
    """class labels, one sample each (e.g. --labels 0 1 2)"""
    num_samples: int | None = None
    """samples with labels drawn uniformly over the classes (default 16 when --labels is not given)"""
    solver: Solver | None = None
    """ODE solver (with --diffusion, the SDE solver: euler is Euler-Maruyama); default: the run's (else euler)"""
    num_steps: int | None = None
    """fixed steps; default: the run's (else 32)"""
    rtol: float | None = None
    """adaptive steps with this relative tolerance (not euler)"""
    atol: float | None = None
    """adaptive steps with this absolute tolerance (not euler)"""
    cfg_scale: float | None = None
    """guidance scale (1: conditional, 0: unconditional); default: the run's (else 1)"""
    guidance_interval: tuple[float, float] | None = None
    """guide only for t in [LO, HI] (t=0 noise, t=1 data); REPA's t <= 0.7 is 0.3 1.0"""
    cfg_channels: int | None = None
    """guide only the first N channels (3: DiT/SiT's published latent setting); default all"""
    time_shift: float | None = None
    """resolution shift of fixed-step grids (>1: more steps near noise); default: the run's (else 1)"""
    vae: str | None = None
    """VAE folder or Hub id for latent models; beats the one the config names"""
    seed: int = 0
    batch_size: int = 64
    out: str | None = None
    """output folder; default <load_dir>/samples/<timestamp>"""


def parse_args(argv: list[str] | None) -> SampleArgs:
    import tyro

    return tyro.cli(SampleArgs, args=argv, use_underscores=True, description=__doc__.split("\n")[0])


def _default_out(load_dir: str) -> pathlib.Path:
    base = pathlib.Path(load_dir)
    if base.name == "checkpoints":  # keep Orbax's folder free of anything else
        base = base.parent
    return base / "samples" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def run(args: SampleArgs) -> dict[str, Any]:
    if args.labels is not None and args.num_samples is not None:
        raise ValueError("give --labels or --num_samples, not both.")
    label_key, noise_key = jr.split(jr.key(args.seed))
    model, config, vae = load_for_sampling(args.load_dir, args.vae)
    settings = resolve_sampler(config, solver=args.solver, num_steps=args.num_steps, rtol=args.rtol,
                               atol=args.atol, cfg_scale=args.cfg_scale, time_shift=args.time_shift,
                               guidance_interval=args.guidance_interval, cfg_channels=args.cfg_channels,
                               **args.controller())
    num_classes = model.config.num_classes
    if args.labels is not None:
        labels = np.asarray(args.labels, np.int32)
    else:
        labels = uniform_labels(args.num_samples or 16, num_classes, key=label_key)
    images, stats = generate(
        model, labels=labels, key=noise_key, **generate_kwargs(settings), batch_size=min(args.batch_size, len(labels)),
        vae=vae,
    )

    out = pathlib.Path(args.out) if args.out else _default_out(args.load_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, cols = grid_shape(len(images))
    blank = np.ones((rows * cols - len(images), *images.shape[1:]), np.float32)  # white cells after the last
    grid = np.concatenate([images, blank]).reshape(rows, cols, *images.shape[1:])
    plots.save_grid(grid, out / "grid.png", scale=max(1, 64 // images.shape[1]))
    np.savez_compressed(out / "samples.npz", images=images, labels=labels)
    report = {
        "load_dir": str(args.load_dir), "seed": args.seed, "num_samples": len(images),
        "labels": "given" if args.labels is not None else f"uniform over {num_classes} classes",
        "sampler": settings.to_dict(), "guidance_interval": settings.guidance_interval,
        "cfg_channels": settings.cfg_channels, "vae": None if vae is None else (args.vae or "from the config"),
        **stats,
    }
    (out / "sample.json").write_text(json.dumps(report, indent=2))
    steps = f"{settings.num_steps} steps" if settings.num_steps else f"rtol {settings.rtol}, atol {settings.atol}"
    nfe = stats["nfe_per_batch"]
    print(f"{len(images)} samples with {settings.solver} ({steps}), cfg {settings.cfg_scale:g}")
    print(f"NFE per batch: {nfe[0] if len(set(nfe)) == 1 else nfe}; total NFE {stats['nfe_total']} "
          f"over {stats['num_batches']} batch(es) of {stats['batch_size']}")
    print(f"time taken: {stats['wall_s']:.2f} s ({stats['images_per_s']:.1f} img/s, compilation included)")
    print(f"wrote {out / 'grid.png'}, {out / 'samples.npz'}, {out / 'sample.json'}")
    return {**report, "out": str(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
