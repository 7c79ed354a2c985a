"""Benchmark the compiled training step: steady-state throughput and fraction of peak.

    python experiments/bench_train.py --preset debug --patch_size 2 --image_size 8 --channels 1 \\
        --num_classes 10 --batch_size 128
    python experiments/bench_train.py --hidden_size 256 --depth 4 --num_heads 4 --patch_size 2 \\
        --mlp_ratio 4 --image_size 16 --channels 3 --num_classes 10 --batch_size 64

Each takes well under a minute on a 2-core CPU. The last line printed is one JSON object.
`--steps_per_call K` scans K steps inside one compiled call (worth it for tiny models).
`--baseline` also times the plain step the Flax original used (a jit of grad, Adam and
the EMA update, one step per call, no buffer donation) on the same model, side by side.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

import rfdit
from rfdit.benchmarking import matmul_peak_tflops, plain_train_step


@dataclasses.dataclass
class Args:
    preset: str | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    image_size: int = 32
    channels: int = 4
    num_classes: int = 1000
    batch_size: int = 64
    steps: int = 20
    """timed steps (after warm-up); the median of `repeats` timings is reported"""
    repeats: int = 5
    steps_per_call: int = 1
    precision: str = "float32"
    baseline: bool = False
    seed: int = 0


def model_config(args: Args) -> rfdit.DiTConfig:
    overrides = {k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio")
                 if getattr(args, k) is not None}
    overrides.update(image_size=args.image_size, in_channels=args.channels, num_classes=args.num_classes)
    if args.preset is not None:
        return rfdit.DiTConfig.preset(args.preset, **overrides)
    return rfdit.DiTConfig(**overrides)


def time_calls(call, num_calls: int, repeats: int) -> list[float]:
    """Seconds per call for each of `repeats` timings of `num_calls` calls."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(num_calls):
            out = call()
        jax.block_until_ready(out)
        timings.append((time.perf_counter() - start) / num_calls)
    return timings


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv)
    cfg = model_config(args)
    jax.config.update("jax_default_matmul_precision", "highest" if args.precision == "float32" else "default")
    print(f"device: {jax.devices()[0].device_kind}, matmul precision: {jax.config.jax_default_matmul_precision}")
    key = jr.key(args.seed)
    model_key, state_key, data_key = jr.split(key, 3)
    model = rfdit.DiT(cfg, key=model_key, dtype=args.precision)
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    state = rfdit.TrainState.create(model, optimizer, key=state_key)
    k = args.steps_per_call
    step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=cfg.num_classes, steps_per_call=k)
    shape = (args.batch_size, cfg.image_size, cfg.image_size, cfg.in_channels)
    images = jr.normal(data_key, shape if k == 1 else (k, *shape))
    labels = jnp.zeros(images.shape[:-3], jnp.int32)

    start = time.perf_counter()
    state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    holder = [state]

    def call():
        holder[0], m = step(holder[0], images, labels)
        return m

    num_calls = max(1, args.steps // k)
    call()  # warm-up
    per_call = time_calls(call, num_calls, args.repeats)
    s_per_step = statistics.median(per_call) / k

    flops_per_img = 3 * cfg.forward_flops()
    peak = matmul_peak_tflops(args.precision)
    achieved = flops_per_img * args.batch_size / s_per_step
    result = {
        "config": {**cfg.to_dict(), "batch_size": args.batch_size, "steps_per_call": k, "precision": args.precision},
        "params": cfg.num_params(),
        "gflops_per_img": flops_per_img / 1e9,
        "compile_s": round(compile_s, 3),
        "ms_per_step": round(1e3 * s_per_step, 3),
        "img_per_s": round(args.batch_size / s_per_step, 1),
        "achieved_gflops": round(achieved / 1e9, 2),
        "peak_tflops_measured": round(peak, 4),
        "fraction_of_peak": round(achieved / (peak * 1e12), 4),
    }
    if args.baseline:
        plain = plain_train_step(model, optimizer, rfdit.FlowConfig(), optim, cfg.num_classes)
        base_images = images if k == 1 else images[0]
        base_labels = labels if k == 1 else labels[0]
        plain_state = plain.init(jr.key(args.seed))
        plain_holder = [plain_state]

        def plain_call():
            plain_holder[0], m = plain.step(plain_holder[0], base_images, base_labels)
            return m

        plain_call()
        plain_s = statistics.median(time_calls(plain_call, args.steps, args.repeats))
        result["baseline_ms_per_step"] = round(1e3 * plain_s, 3)
        result["speedup_vs_baseline"] = round(plain_s / s_per_step, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
