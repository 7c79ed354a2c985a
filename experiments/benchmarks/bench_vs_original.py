"""rfdit's training step against the Flax original's, side by side in one process.

    python experiments/benchmarks/bench_vs_original.py --original_dir path/to/jax-flow --config debug
    python experiments/benchmarks/bench_vs_original.py --original_dir path/to/jax-flow --config hidden256 --grad_accum 1

`--original_dir` is a checkout of kvfrans/jax-flow; its `diffusion_transformer.DiT` is
imported as it is (it needs `pip install flax einops ml_collections`, which rfdit itself
does not). Around that module this script builds the original's step as its
`FlowTrainer.update` does: a `jax.pmap` over the local devices of grad (log-normal t, x_t
formed with min(t, 0.99), label dropout), Adam (lr 1e-4, b1 0.9, b2 0.99), the three
global norms and the EMA update (rate 0.9999), no buffer donation.

The two steps are timed in alternating rounds, so that a noisy machine slows both alike;
the figures are medians over rounds, and the ratio is the median of the per-round ratios
(original ms / rfdit ms: above 1 means rfdit is faster). The last line is one JSON object.
`--precision bf16` runs rfdit's products in bf16 (the original has float32 only); rfdit's
fraction of peak is then against the bf16 peak that `rfdit.benchmarking.matmul_peak_tflops`
measures.

Configs (the core issue's two): `debug` is the debug preset with patch 2 on 8×8×1, 10
classes, batch 128; `hidden256` is hidden 256, depth 4, 4 heads, patch 2, mlp_ratio 4 on
16×16×3, 10 classes, batch 64.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import tyro

import rfdit
from rfdit.benchmarking import (
    CORE_CONFIGS,
    machine_info,
    machine_line,
    matmul_peak_tflops,
    ops_by_kind,
    profile_ops,
    summarise_ops,
    time_calls,
)
from rfdit.config import compute_dtype


@dataclasses.dataclass
class Args:
    original_dir: Path
    """a checkout of kvfrans/jax-flow (the folder holding diffusion_transformer.py)"""
    config: Literal["debug", "hidden256"] = "debug"
    rounds: int = 7
    """alternating timing rounds (original, then rfdit)"""
    steps: int | None = None
    """steps timed per round (default: 40 for debug, 3 for hidden256)"""
    steps_per_call: int = 1
    """rfdit: steps scanned inside one compiled call"""
    grad_accum: int | None = None
    """rfdit: micro-batches per step (default: see rfdit.TrainStep)"""
    scan_unroll: int | None = None
    """rfdit: DiT blocks unrolled per scan iteration"""
    remat: Literal["none", "dots", "full"] | None = None
    """rfdit: what each block keeps for the backward pass (see rfdit.DiT; default "dots" for float32 on CPUs)"""
    precision: Literal["float32", "bf16"] = "float32"
    """rfdit: the products' compute dtype (the original has float32 only); bf16 keeps the parameters,
    the optimizer and the loss float32"""
    seed: int = 0
    profile: int = 0
    """profile this many calls of each step op by op after the timing (CPU: run it on one core,
    `taskset -c 0`, so that op times add up to the wall time) and print both summaries"""


def import_original(original_dir: Path):
    """The original's DiT module class, imported from its checkout."""
    if not (original_dir / "diffusion_transformer.py").is_file():
        raise SystemExit(f"--original_dir {original_dir} holds no diffusion_transformer.py: "
                         "pass a checkout of kvfrans/jax-flow.")
    sys.path.insert(0, str(original_dir.resolve()))
    try:
        module = importlib.import_module("diffusion_transformer")
    except ModuleNotFoundError as err:
        raise SystemExit(f"The original's model needs {err.name!r}, which is not installed: "
                         "pip install flax einops ml_collections") from None
    return module.DiT


def original_step(dit_cls, cfg: dict[str, Any], seed: int):
    """(state, update) for the original's step: `state, info = update(state, images, labels)` on
    inputs with a leading device axis, as its training loop calls it."""
    import flax

    model = dit_cls(patch_size=cfg["patch_size"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
                    num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], class_dropout_prob=0.1,
                    num_classes=cfg["num_classes"])
    size, channels = cfg["image_size"], cfg["in_channels"]
    param_key, dropout_key, rng = jr.split(jr.PRNGKey(seed), 3)
    params = model.init({"params": param_key, "label_dropout": dropout_key}, jnp.zeros((1, size, size, channels)),
                        jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    tx = optax.adam(learning_rate=1e-4, b1=0.9, b2=0.99)
    tau = 1 - 0.9999

    @partial(jax.pmap, axis_name="data")
    def update(state, images, labels):
        params, ema, opt_state, rng = state
        new_rng, label_key, time_key, noise_key = jr.split(rng, 4)

        def loss_fn(params):
            t = jax.nn.sigmoid(jr.normal(time_key, (images.shape[0],)))  # "log-normal" t
            eps = jr.normal(noise_key, images.shape)
            t_clip = jnp.clip(t[:, None, None, None], 0, 1 - 0.01)
            x_t = (1 - t_clip) * eps + t_clip * images
            v_t = images - eps
            v = model.apply({"params": params}, x_t, t, labels, train=True, rngs={"label_dropout": label_key})
            loss = jnp.mean((v - v_t) ** 2)
            return loss, {"l2_loss": loss, "v_abs_mean": jnp.abs(v_t).mean(), "v_pred_abs_mean": jnp.abs(v).mean()}

        grads, info = jax.grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, axis_name="data")
        info = jax.lax.pmean(info, axis_name="data")
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        info.update(grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates),
                    param_norm=optax.global_norm(params))
        ema = jax.tree_util.tree_map(lambda p, e: p * tau + e * (1 - tau), params, ema)
        return (params, ema, opt_state, new_rng), info

    state = flax.jax_utils.replicate((params, params, tx.init(params), rng))
    return state, update


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    dit_cls = import_original(args.original_dir)
    spec = dict(CORE_CONFIGS[args.config])
    batch_size = spec.pop("batch_size")
    cfg = rfdit.DiTConfig(**spec)
    steps = args.steps or (40 if args.config == "debug" else 3)
    k = args.steps_per_call
    if steps % k:
        raise SystemExit(f"--steps (={steps}) must be a multiple of --steps_per_call (={k}).")
    device = jax.devices()[0]
    info = machine_info()
    print(machine_line(info))
    print(f"device: {device.device_kind} x{jax.device_count()}, config {args.config}: {spec}, batch {batch_size}, "
          f"rfdit precision {args.precision}")

    data_key, model_key, state_key = jr.split(jr.key(args.seed), 3)
    shape = (batch_size, cfg.image_size, cfg.image_size, cfg.in_channels)
    images = jr.normal(data_key, shape)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % cfg.num_classes

    # the original: inputs carry a leading axis of local devices (one here)
    n_dev = jax.local_device_count()
    orig_state, orig_update = original_step(dit_cls, {**spec, "batch_size": batch_size}, args.seed)
    orig_images = images.reshape(n_dev, batch_size // n_dev, *shape[1:])
    orig_labels = labels.reshape(n_dev, batch_size // n_dev)
    orig = [orig_state]

    def orig_call():
        orig[0], info = orig_update(orig[0], orig_images, orig_labels)
        return info

    # rfdit: the same objective (log-normal t, the original's clip), its own step
    dtype = compute_dtype(args.precision)
    model = rfdit.DiT(cfg, key=model_key, dtype=dtype, scan_unroll=args.scan_unroll, remat=args.remat)
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    flow = rfdit.FlowConfig(t_sampler="logit-normal", t_clip_max=0.99)
    step = rfdit.TrainStep(optimizer, flow, optim, num_classes=cfg.num_classes, steps_per_call=k,
                           grad_accum=args.grad_accum)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam state under bf16 models
        ours = [rfdit.TrainState.create(model, optimizer, key=state_key)]
    our_images = images if k == 1 else jnp.broadcast_to(images, (k, *shape))
    our_labels = labels if k == 1 else jnp.broadcast_to(labels, (k, batch_size))

    def our_call():
        ours[0], metrics = step(ours[0], our_images, our_labels)
        return metrics

    compile_s = {}
    for name, call in (("original", orig_call), ("rfdit", our_call)):
        start = time.perf_counter()
        jax.block_until_ready(call())
        compile_s[name] = round(time.perf_counter() - start, 2)
        jax.block_until_ready(call())  # one more warm-up call

    rounds = []
    for r in range(args.rounds):
        o = 1e3 * time_calls(orig_call, steps, 1)[0]
        m = 1e3 * time_calls(our_call, steps // k, 1)[0] / k
        rounds.append((o, m))
        print(f"round {r + 1}: original {o:.2f} ms/step, rfdit {m:.2f} ms/step, ratio {o / m:.3f}")

    orig_ms = statistics.median(o for o, _ in rounds)
    our_ms = statistics.median(m for _, m in rounds)
    flops_per_step = 3 * cfg.forward_flops() * batch_size
    peak_size = 2048 if device.platform == "cpu" else 8192
    peak = matmul_peak_tflops("float32", size=peak_size) * 1e12
    our_peak = peak if dtype == "float32" else matmul_peak_tflops(dtype, size=peak_size) * 1e12
    result = {
        "device": f"{device.device_kind} x{jax.device_count()}", "machine": info,
        "config": args.config,
        "model": {**spec, "batch_size": batch_size},
        "rfdit_settings": {"precision": args.precision, "steps_per_call": k, "scan_unroll": model.policy.scan_unroll,
                           "remat": model.policy.remat, "grad_accum": step.micro_batches(model, batch_size)},
        "compile_s": compile_s,
        "original_ms_per_step": round(orig_ms, 3),
        "rfdit_ms_per_step": round(our_ms, 3),
        "speedup": round(statistics.median(o / m for o, m in rounds), 3),
        "original_img_per_s": round(1e3 * batch_size / orig_ms, 1),
        "rfdit_img_per_s": round(1e3 * batch_size / our_ms, 1),
        "gflops_per_step": round(flops_per_step / 1e9, 3),
        "peak_tflops_measured": round(peak / 1e12, 4),
        "original_fraction_of_peak": round(flops_per_step / (orig_ms / 1e3) / peak, 4),
        "rfdit_peak_tflops_measured": round(our_peak / 1e12, 4),
        "rfdit_fraction_of_peak": round(flops_per_step / (our_ms / 1e3) / our_peak, 4),
        "rounds_ms": [[round(o, 3), round(m, 3)] for o, m in rounds],
    }
    if args.profile:
        options = {"xla_cpu_enable_xprof_traceme": True} if device.platform == "cpu" else {}
        result["op_profile_ms_per_call"] = {}
        orig_compiled = orig_update.lower(orig[0], orig_images, orig_labels).compile(compiler_options=options)
        our_compiled = step.lower(ours[0], our_images, our_labels).compile(compiler_options=options)
        our_arrays = [step.arrays(ours[0])]

        def orig_profiled():
            orig[0], info = orig_compiled(orig[0], orig_images, orig_labels)
            return info

        def our_profiled():  # last: these calls donate the state's buffers
            our_arrays[0], metrics = our_compiled(our_arrays[0], our_images, our_labels)
            return metrics

        for name, call, compiled, ms in (("original", orig_profiled, orig_compiled, orig_ms),
                                         ("rfdit", our_profiled, our_compiled, our_ms * k)):
            rows = profile_ops(call, compiled.as_text(), args.profile, tempfile.mkdtemp(prefix=f"{name}_profile_"))
            print(f"--- {name}'s step, op by op")
            print(summarise_ops(rows, wall_ms=ms))
            result["op_profile_ms_per_call"][name] = {kind: round(v, 3) for kind, v in ops_by_kind(rows).items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
