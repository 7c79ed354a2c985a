"""rfdit's training step under several settings, compiled in one process and timed in interleaved
rounds, so that a noisy machine slows every variant alike.

    python experiments/benchmarks/bench_variants.py --config hidden256 --variants attention=xla grad_accum=1
    python experiments/benchmarks/bench_variants.py --config debug --variants scan_unroll=2 \\
        xla:xla_cpu_enable_fast_math=true "attention=xla,remat=none"
    python experiments/benchmarks/bench_variants.py --preset B/2 --batch_size 256 --precision bf16 \\
        --variants residual_dtype=bfloat16 remat=dots                             # a GPU

The first row is always rfdit's defaults. Each variant is a comma-separated list of settings:

- `attention=einsum|xla|cudnn`, `scan_unroll=N`, `remat=none|dots|full`,
  `residual_dtype=float32|bfloat16` (rfdit.DiT),
- `grad_accum=N` (rfdit.TrainStep),
- `precision=float32|bf16`: the products' compute dtype for this variant (`--precision` sets the
  defaults' and the jax_default_matmul_precision of the whole comparison; on CPUs that setting
  changes nothing, so `--variants precision=bf16` compares bf16 with float32 side by side),
- `xla:<option>=<value>`: an XLA compile option for this variant's executable alone
  (`jax.stages.Lowered.compile(compiler_options=...)`), e.g. `xla:xla_cpu_enable_fast_math=true`.

Every round times `--steps` calls of each variant, in a shuffled order. The ms figures are
medians over rounds; the speedup is the median of the per-round ratios (defaults ms / variant ms:
above 1 means the variant is faster), with their range, and the minor page faults per step (the
temporaries the runtime maps afresh); where the card's nominal peak is known (rfdit.benchmarking),
also the model FLOPs utilisation against it. The last line is one JSON object.

A variant that does not compile is reported (under "failed" in the JSON) and left out.
Each variant compiles in 3-9 s on a 2-core CPU (DiT-B/2 in 18-50 s on an H100); with the
default 9 rounds, three variants of hidden256 take about 2 minutes, of debug under a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import resource
import statistics
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import tyro

import rfdit
from rfdit.benchmarking import (
    CORE_CONFIGS,
    benchmark_matmul_precision,
    machine_info,
    machine_line,
    nominal_peak_tflops,
    time_calls,
)
from rfdit.config import compute_dtype
from rfdit.nn.policy import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

MODEL_SETTINGS = ("scan_unroll", "remat", "attention", "residual_dtype")  # rfdit.DiT's
STEP_SETTINGS = ("grad_accum",)  # rfdit.TrainStep's
CHOICES = {"remat": tuple(REMAT_POLICIES), "attention": ATTENTION_IMPLEMENTATIONS,
           "residual_dtype": ("float32", "bfloat16"), "precision": ("float32", "bf16")}  # the rest: integers >= 1


@dataclasses.dataclass
class Args:
    config: Literal["debug", "hidden256"] = "debug"
    """the core configs (see experiments/benchmarks/bench_vs_original.py); --preset replaces it"""
    preset: str | None = None
    """a DiTConfig preset (e.g. B/2) on --image_size x --image_size x --channels with --num_classes"""
    image_size: int = 32
    """with --preset (the core configs fix their own sizes)"""
    channels: int = 4
    """with --preset"""
    num_classes: int = 1000
    """with --preset"""
    batch_size: int | None = None
    """default: the core config's, 256 for a preset"""
    precision: Literal["float32", "bf16"] = "float32"
    """the matmul compute dtype; float32 runs with jax_default_matmul_precision "highest" (not TF32)"""
    variants: tuple[str, ...] = ()
    """settings to compare with the defaults, one comma-separated list per variant"""
    rounds: int = 9
    steps: int | None = None
    """calls timed per variant per round (default: 20 for debug, 2 for hidden256, 10 for a preset)"""
    seed: int = 0


def parse_variant(text: str) -> dict[str, Any]:
    """`"attention=xla,grad_accum=2,xla:xla_cpu_enable_fast_math=true"` as
    {"attention": "xla", "grad_accum": 2, "xla": {"xla_cpu_enable_fast_math": True}}."""
    variant: dict[str, Any] = {"xla": {}}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise SystemExit(f"variant {text!r}: {item!r} is not name=value.")
        if name.startswith("xla:"):
            parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
            with contextlib.suppress(ValueError):
                parsed = int(value)
            variant["xla"][name.removeprefix("xla:")] = parsed
        elif name in CHOICES:
            if value not in CHOICES[name]:
                raise SystemExit(f"variant {text!r}: {name} must be one of {CHOICES[name]}, got {value!r}.")
            variant[name] = value
        elif name in MODEL_SETTINGS + STEP_SETTINGS:
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"variant {text!r}: {name} must be a positive integer, got {value!r}.")
            variant[name] = int(value)
        else:
            raise SystemExit(f"variant {text!r}: unknown setting {name!r}; use one of "
                             f"{MODEL_SETTINGS + STEP_SETTINGS + ('precision',)} or xla:<option>.")
    return variant


class VariantFailed(Exception):
    """A variant that did not compile: reported, and left out of the timing."""


def compiled_variant(variant: dict[str, Any], cfg: rfdit.DiTConfig, dtype: str, images, labels, seed: int):
    """(a no-argument call that runs one step of this variant's own executable, its resolved
    settings, its compile time in seconds)."""
    if "precision" in variant:
        dtype = compute_dtype(variant["precision"])
    model = rfdit.DiT(cfg, key=jr.key(seed), dtype=dtype, **{k: variant[k] for k in MODEL_SETTINGS if k in variant})
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam state under bf16 models
        holder = [rfdit.TrainState.create(model, optimizer, key=jr.key(seed + 1))]
    step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=cfg.num_classes,
                           **{k: variant[k] for k in STEP_SETTINGS if k in variant})
    start = time.perf_counter()
    try:
        compiled = step.compile(holder[0], images, labels, compiler_options=variant["xla"])
    except Exception as err:  # e.g. an unknown XLA option or value: the caller says which variant
        raise VariantFailed(f"compiling failed: {str(err).splitlines()[0]}") from None
    compile_s = time.perf_counter() - start

    def call():
        holder[0], metrics = compiled(holder[0], images, labels)
        return metrics

    policy = model.policy
    settings = {"dtype": dtype, "attention": policy.attention or "default", "scan_unroll": policy.scan_unroll,
                "remat": policy.remat, "residual_dtype": policy.residual_dtype, "grad_accum": step.micro_batches(model, images.shape[0]),
                "xla": variant["xla"]}
    return call, settings, compile_s


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    dtype = compute_dtype(args.precision)
    matmul_precision = benchmark_matmul_precision(dtype)
    with jax.default_matmul_precision(matmul_precision):  # for this comparison only, not the process
        return compare(args, dtype, matmul_precision)


def compare(args: Args, dtype: str, matmul_precision: str) -> dict:
    names = ["defaults", *args.variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variants must differ from each other and from 'defaults'; got {list(args.variants)}.")
    variants = [parse_variant(""), *(parse_variant(v) for v in args.variants)]
    if args.preset is not None:
        config_name = args.preset
        cfg = rfdit.DiTConfig.preset(args.preset, image_size=args.image_size, in_channels=args.channels,
                                     num_classes=args.num_classes)
        batch_size, steps = args.batch_size or 256, args.steps or 10
    else:
        config_name = args.config
        spec = dict(CORE_CONFIGS[args.config])
        default_batch = spec.pop("batch_size")
        batch_size = args.batch_size or default_batch
        cfg = rfdit.DiTConfig(**spec)
        steps = args.steps or (20 if args.config == "debug" else 2)
    device = jax.devices()[0]
    peak = nominal_peak_tflops(device.device_kind, dtype, matmul_precision)
    gflop_per_step = 3 * cfg.forward_flops() * batch_size / 1e9
    info = machine_info()
    print(machine_line(info))
    print(f"device: {device.device_kind} x{jax.device_count()}, config {config_name}, batch {batch_size}, "
          f"compute dtype {dtype}, jax_default_matmul_precision {matmul_precision}")
    images = jr.normal(jr.key(args.seed), (batch_size, cfg.image_size, cfg.image_size, cfg.in_channels))
    labels = jnp.arange(batch_size, dtype=jnp.int32) % cfg.num_classes

    calls, settings, compile_s, failed = {}, {}, {}, {}
    for name, variant in zip(names, variants):
        try:
            calls[name], settings[name], compile_s[name] = compiled_variant(variant, cfg, dtype, images, labels,
                                                                            args.seed)
        except VariantFailed as err:
            if name == "defaults":
                raise SystemExit(f"the defaults: {err}") from None
            failed[name] = str(err)
            print(f"{name}: {err}; left out")
            continue
        for _ in range(2):  # warm-up calls
            jax.block_until_ready(calls[name]())
        print(f"{name}: compiled in {compile_s[name]:.1f} s, {settings[name]}")
    names = list(calls)

    ms: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}  # minor page faults: fresh temporaries
    order = list(names)
    shuffle = random.Random(args.seed)
    for r in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ms[name].append(1e3 * time_calls(calls[name], steps, 1)[0])
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)
        print(f"round {r + 1}: " + ", ".join(f"{n} {ms[n][-1]:.2f}" for n in names) + " ms/step")

    rows = []
    for name in names:
        ratios = [d / v for d, v in zip(ms["defaults"], ms[name])]
        rows.append({"variant": name, "settings": settings[name], "compile_s": round(compile_s[name], 2),
                     "ms_per_step": round(statistics.median(ms[name]), 3), "min_ms": round(min(ms[name]), 3),
                     "speedup": round(statistics.median(ratios), 3),
                     "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                     "page_faults_per_step": round(statistics.median(faults[name]))})
        if peak:
            rows[-1]["mfu_nominal"] = round(gflop_per_step / rows[-1]["ms_per_step"] / peak, 4)
        print(f"{name:50s} {rows[-1]['ms_per_step']:9.2f} ms/step (min {rows[-1]['min_ms']:.2f}), "
              f"speedup {rows[-1]['speedup']:.3f} ({min(ratios):.3f}-{max(ratios):.3f} over rounds), "
              f"{rows[-1]['page_faults_per_step']} page faults per step"
              + (f", MFU {rows[-1]['mfu_nominal']:.3f} of {peak} TFLOP/s" if peak else ""))
    result = {"device": f"{device.device_kind} x{jax.device_count()}", "machine": info, "config": config_name,
              "batch_size": batch_size, "precision": args.precision, "gflop_per_step": round(gflop_per_step, 3),
              "rounds": args.rounds, "steps_per_round": steps, "variants": rows, "failed": failed}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
