"""Benchmark the compiled training step: steady-state throughput, fraction of peak, memory.

    python experiments/benchmarks/bench_train.py --preset debug --patch_size 2 --image_size 8 --channels 1 \\
        --num_classes 10 --batch_size 128 --steps_per_call 10 --baseline
    python experiments/benchmarks/bench_train.py --hidden_size 256 --depth 4 --num_heads 4 --patch_size 2 \\
        --mlp_ratio 4 --image_size 16 --channels 3 --num_classes 10 --batch_size 64 --baseline
    python experiments/benchmarks/bench_train.py --preset B/2 --batch_size 256 --precision bf16      # a GPU

Each CPU run takes under a minute on 2 cores. The last line printed is one JSON object.

- `--steps_per_call K` scans K steps inside one compiled call (worth it for tiny models).
- `--baseline` also times the plain step the Flax original used (a jit of grad, Adam and
  the EMA update, one step per call, no donation) on the same model, side by side.
- `--max_batch_from 64 128 256` picks the largest batch whose compiled step fits in device
  memory, from XLA's memory analysis (no trial runs), and benchmarks it.
- `--sample_batch N` also times sampling: N images, 32 Euler steps (`--sample_steps 32 250`: each),
  with guidance (2N pass).
- `--profile N` profiles N more calls with `jax.profiler` and prints where the time goes, by kind
  of op (matmul, attention, elementwise, transpose/copy, reduce, ...) and the most expensive ops.
- FLOPs: 2 per multiply-add, training = 3 × forward, attention included.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from typing import Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import tyro

import rfdit
from rfdit.benchmarking import (
    benchmark_matmul_precision,
    compiled_footprint,
    machine_info,
    machine_line,
    matmul_peak_tflops,
    nominal_peak_tflops,
    peak_memory_bytes,
    ops_by_kind,
    plain_train_step,
    profile_ops,
    summarise_ops,
    time_calls,
)
from rfdit.config import compute_dtype
from rfdit.distributed import global_batch, make_mesh, shard_state
from rfdit.nn.policy import resolve_scan_unroll


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
    grad_accum: int | None = None
    """split each batch into this many micro-batches inside the step (default: see rfdit.TrainStep)"""
    precision: Literal["float32", "bf16"] = "float32"
    matmul_precision: Literal["default", "high", "highest"] | None = None
    """jax_default_matmul_precision; default: "highest" for float32 (true f32, not TF32), "default" for bf16"""
    fsdp: int = 1
    remat: Literal["none", "dots", "full"] | None = None
    """what each block keeps for the backward pass (see rfdit.DiT; default "dots" for float32 on CPUs, else "none")"""
    scan_unroll: int | None = None
    """blocks unrolled per scan iteration (default: 1 for float32 on CPUs or with --fsdp, the full depth otherwise)"""
    attention: Literal["einsum", "xla", "cudnn"] | None = None
    """attention implementation (see rfdit.nn.policy.resolve_attention; default: cuDNN's for bf16 on GPUs,
    the einsum on CPUs, else XLA's)"""
    residual_dtype: Literal["float32", "bfloat16"] = "float32"
    """the residual stream's dtype (see rfdit.DiT)"""
    baseline: bool = False
    max_batch_from: tuple[int, ...] = ()
    sample_batch: int = 0
    sample_steps: tuple[int, ...] = (32,)
    """Euler step counts timed with --sample_batch (e.g. 32 250)"""
    profile: int = 0
    """profile this many calls op by op after the timing (the trace goes to --profile_dir)"""
    profile_dir: str | None = None
    peak_size: int | None = None
    """matmul size for the measured peak (default 2048 on CPU, 8192 on accelerators)"""
    seed: int = 0


def model_config(args: Args) -> rfdit.DiTConfig:
    overrides = {k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio")
                 if getattr(args, k) is not None}
    overrides.update(image_size=args.image_size, in_channels=args.channels, num_classes=args.num_classes)
    if args.preset is not None:
        return rfdit.DiTConfig.preset(args.preset, **overrides)
    return rfdit.DiTConfig(**overrides)


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    cfg = model_config(args)
    dtype = compute_dtype(args.precision)
    matmul_precision = args.matmul_precision or benchmark_matmul_precision(dtype)
    jax.config.update("jax_default_matmul_precision", matmul_precision)
    device = jax.devices()[0]
    info = machine_info()
    print(machine_line(info))
    print(f"device: {device.device_kind} x{jax.device_count()}, compute dtype: {dtype}, "
          f"jax_default_matmul_precision: {jax.config.jax_default_matmul_precision}")

    key = jr.key(args.seed)
    model_key, state_key, data_key = jr.split(key, 3)
    unroll = resolve_scan_unroll(args.scan_unroll, cfg.depth, sharded_params=args.fsdp > 1, dtype=dtype)
    model = rfdit.DiT(cfg, key=model_key, dtype=dtype, remat=args.remat, scan_unroll=unroll,
                      attention=args.attention, residual_dtype=args.residual_dtype)
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    mesh = make_mesh(args.fsdp)
    with jax.numpy_dtype_promotion("standard"):
        state = shard_state(rfdit.TrainState.create(model, optimizer, key=state_key), mesh)
    k = args.steps_per_call
    step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=cfg.num_classes, steps_per_call=k,
                           grad_accum=args.grad_accum)

    def inputs(batch_size: int):
        shape = (batch_size, cfg.image_size, cfg.image_size, cfg.in_channels)
        images = jr.normal(data_key, shape if k == 1 else (k, *shape))
        labels = jnp.zeros(images.shape[:-3], jnp.int32)
        return global_batch(images, mesh, steps_axis=k > 1), global_batch(labels, mesh, steps_axis=k > 1)

    # the baseline copies the weights now: the step below donates the state's buffers
    plain = plain_train_step(model, optimizer, rfdit.FlowConfig(), optim, cfg.num_classes) if args.baseline else None
    result: dict = {}
    batch_size = args.batch_size
    if args.max_batch_from:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        footprints = {}
        for candidate in sorted(args.max_batch_from, reverse=True):
            footprints[candidate] = compiled_footprint(step.lower(state, *inputs(candidate)).compile())
            print(f"batch {candidate}: compiled footprint {footprints[candidate] / 2**30:.1f} GiB"
                  + (f" of {limit / 2**30:.1f} GiB" if limit else ""))
            if limit is None or footprints[candidate] <= 0.95 * limit:
                batch_size = candidate
                break
        result["max_batch_search"] = {"candidates": sorted(args.max_batch_from), "bytes_limit": limit,
                                      "footprints": footprints, "chosen": batch_size}
    images, labels = inputs(batch_size)

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
    s_per_step = statistics.median(time_calls(call, num_calls, args.repeats)) / k

    flops_per_img = 3 * cfg.forward_flops()
    achieved = flops_per_img * batch_size / s_per_step
    peak = matmul_peak_tflops(dtype, size=args.peak_size or (2048 if device.platform == "cpu" else 8192))
    nominal = nominal_peak_tflops(device.device_kind, dtype, matmul_precision)
    result.update({
        "device": f"{device.device_kind} x{jax.device_count()}", "machine": info,
        "config": {**cfg.to_dict(), "batch_size": batch_size, "steps_per_call": k, "precision": args.precision,
                   "fsdp": args.fsdp, "grad_accum": step.micro_batches(model, batch_size), "remat": model.policy.remat,
                   "scan_unroll": model.policy.scan_unroll, "attention": model.policy.attention or "default",
                   "residual_dtype": model.policy.residual_dtype},
        "matmul_precision": matmul_precision,
        "params": cfg.num_params(),
        "gflops_per_img": flops_per_img / 1e9,
        "compile_s": round(compile_s, 3),
        "ms_per_step": round(1e3 * s_per_step, 3),
        "img_per_s": round(batch_size / s_per_step, 1),
        "achieved_gflops": round(achieved / 1e9, 2),
        "peak_tflops_measured": round(peak, 4),
        "peak_tflops_nominal": nominal,
        "mfu_measured": round(achieved / (peak * 1e12), 4),
        "mfu_nominal": None if nominal is None else round(achieved / (nominal * 1e12), 4),
        "fraction_of_peak": round(achieved / (peak * 1e12), 4),
        "peak_memory_bytes": peak_memory_bytes(step.lower(holder[0], images, labels).compile()),
    })
    if plain is not None:
        base_images, base_labels = (images, labels) if k == 1 else (images[0], labels[0])
        plain_holder = [plain.init(jr.key(args.seed))]

        def plain_call():
            plain_holder[0], m = plain.step(plain_holder[0], base_images, base_labels)
            return m

        plain_call()
        plain_s = statistics.median(time_calls(plain_call, args.steps, args.repeats))
        result["baseline_ms_per_step"] = round(1e3 * plain_s, 3)
        result["speedup_vs_baseline"] = round(plain_s / s_per_step, 3)
    if args.sample_batch:
        ema = holder[0].ema
        noise = global_batch(jr.normal(jr.key(1), (args.sample_batch, cfg.image_size, cfg.image_size,
                                                   cfg.in_channels)), mesh)
        sample_labels = global_batch(jnp.arange(args.sample_batch, dtype=jnp.int32) % cfg.num_classes, mesh)

        def sample_call(num_steps):
            return rfdit.sample(ema, noise, sample_labels, cfg_scale=jnp.asarray(1.5), solver="euler",
                                num_steps=num_steps)[0]

        rates = {}
        for num_steps in args.sample_steps:
            sample_call(num_steps)  # compiles
            sample_s = statistics.median(time_calls(lambda: sample_call(num_steps), 1, max(2, args.repeats // 2)))
            rates[num_steps] = round(args.sample_batch / sample_s, 1)
            print(f"sampling: {rates[num_steps]} img/s with {num_steps} Euler steps, cfg 1.5 (2B pass)")
        result["sample_img_per_s"] = rates[args.sample_steps[0]]
        result["sample_img_per_s_by_steps"] = rates
        result["sample_settings"] = {"batch": args.sample_batch, "solver": "euler", "num_steps": list(args.sample_steps),
                                     "cfg_scale": 1.5, "pass": "2B"}
    if args.profile:
        # last: the profiled calls donate the state's buffers
        options = {"xla_cpu_enable_xprof_traceme": True} if device.platform == "cpu" else {}
        compiled = step.lower(holder[0], images, labels).compile(compiler_options=options)
        arrays = [step.arrays(holder[0])]

        def profiled_call():
            arrays[0], m = compiled(arrays[0], images, labels)
            return m

        trace_dir = args.profile_dir or tempfile.mkdtemp(prefix="rfdit_profile_")
        rows = profile_ops(profiled_call, compiled.as_text(), args.profile, trace_dir)
        print(summarise_ops(rows, wall_ms=1e3 * s_per_step * k))
        result["op_profile_ms_per_call"] = {kind: round(ms, 3) for kind, ms in ops_by_kind(rows).items()}
        result["profile_dir"] = trace_dir
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
