"""Benchmark the input pipeline inside training: the fraction of step time blocked in `next()`.

    python experiments/benchmarks/bench_data.py --dataset_name digits
    python experiments/benchmarks/bench_data.py --dataset_name imagefolder --image_size 32

The first trains the digits default model (batch 128, 10 steps per call) on the embedded
digits; the second writes a synthetic 32×32 JPEG folder (4,096 images, 10 classes) to a
temporary directory, unless `--dataset_path` names one, and trains a small DiT on it.
On a 2-core CPU the first takes under a minute, the second about two (the training step
dominates; its time varies with the machine's load). The loop copies the training loop's: a
`Prefetcher` over `Dataset.batches`, one compiled call per `steps_per_call` batches, no
host sync except at the end. The last line printed is one JSON object: `blocked_fraction`
(time in `next()` over wall time, after warm-up), step time, and the pipeline's throughput
on its own (no training) for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

import rfdit
from rfdit.data import Prefetcher, load_dataset


@dataclasses.dataclass
class Args:
    dataset_name: str = "digits"
    dataset_path: str | None = None
    """an image folder; by default a synthetic 32×32 JPEG folder is written to a temporary directory"""
    image_size: int | None = None
    batch_size: int = 128
    steps: int = 60
    """timed steps, after `warmup` steps"""
    warmup: int = 20
    steps_per_call: int | None = None
    """steps per compiled call; default 10 for digits (as the CLI), 1 otherwise"""
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    patch_size: int | None = None
    """default: 2 for digits, 4 otherwise"""
    num_workers: int | None = None
    """decoding threads (default: the CPU count, at most 16)"""
    folder_images: int = 4096
    seed: int = 0


def write_synthetic_folder(root: pathlib.Path, count: int, size: int, seed: int) -> None:
    """`count` smooth random JPEGs of `size`×`size` in 10 class folders (natural-ish, unlike noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        coarse.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def pipeline_throughput(data, steps: int) -> float:
    """Images per second from the iterator alone."""
    iterator = Prefetcher(data.batches(0), depth=4)
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return steps * data.train.batch_size / elapsed


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv)
    digits = args.dataset_name == "digits"
    k = args.steps_per_call or (10 if digits else 1)
    path = args.dataset_path
    tmp = None
    if not digits and path is None:
        tmp = tempfile.TemporaryDirectory(prefix="rfdit-bench-")
        path = tmp.name
        write_synthetic_folder(pathlib.Path(path), args.folder_images, args.image_size or 32, args.seed)
    data = load_dataset(args.dataset_name, batch_size=args.batch_size, seed=args.seed, path=path,
                        image_size=args.image_size or (None if digits else 32), num_workers=args.num_workers)
    cfg = rfdit.DiTConfig(hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                          patch_size=args.patch_size or (2 if digits else 4), mlp_ratio=2.0,
                          image_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes)
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    model_key, state_key = jr.split(jr.key(args.seed))
    with jax.numpy_dtype_promotion("standard"):
        state = rfdit.TrainState.create(rfdit.DiT(cfg, key=model_key), optimizer, key=state_key)
    step_fn = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=cfg.num_classes, steps_per_call=k)

    batches = Prefetcher(data.batches(0), depth=2 * k)
    calls = (args.warmup + args.steps) // k
    warm_calls = max(1, args.warmup // k)
    blocked, metrics, start = 0.0, None, None
    for call in range(calls):
        if call == warm_calls:
            jax.block_until_ready(metrics)
            blocked, start = 0.0, time.perf_counter()
        t0 = time.perf_counter()
        chunk = [next(batches) for _ in range(k)]
        blocked += time.perf_counter() - t0
        images = np.stack([c[0] for c in chunk]) if k > 1 else chunk[0][0]
        labels = np.stack([c[1] for c in chunk]) if k > 1 else chunk[0][1]
        state, metrics = step_fn(state, jnp.asarray(images), jnp.asarray(labels))
    jax.block_until_ready(metrics)
    timed_steps = (calls - warm_calls) * k
    wall = time.perf_counter() - start
    batches.close()

    result = {
        "dataset": args.dataset_name,
        "image_size": data.image_size,
        "batch_size": args.batch_size,
        "steps_per_call": k,
        "model": {"hidden_size": cfg.hidden_size, "depth": cfg.depth, "patch_size": cfg.patch_size,
                  "params": cfg.num_params()},
        "timed_steps": timed_steps,
        "ms_per_step": round(1e3 * wall / timed_steps, 2),
        "blocked_ms_per_step": round(1e3 * blocked / timed_steps, 3),
        "blocked_fraction": round(blocked / wall, 4),
        "pipeline_only_img_per_s": round(pipeline_throughput(data, max(10, args.steps // 2)), 0),
        "num_workers": getattr(data.train, "num_workers", 0),
        "cpu_count": os.cpu_count(),
        "device": jax.devices()[0].device_kind,
        "data_stats": data.stats(),
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
