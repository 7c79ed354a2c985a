"""Helpers for the benchmarks: a measured matmul peak and a plain reference step."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from .config import FlowConfig, OptimConfig
from .flow import flow_loss
from .train import _global_norm


# Dense (non-sparse) peaks from the vendors' datasheets, TFLOP/s, for the SXM parts.
NOMINAL_PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H200": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5},
}


def nominal_peak_tflops(device_kind: str, dtype: str, matmul_precision: str) -> float | None:
    """The card's nominal dense peak for this dtype (float32 counts as TF32 unless precision is "highest")."""
    for name, peaks in NOMINAL_PEAK_TFLOPS.items():
        if name in device_kind:
            if dtype == "bfloat16":
                return peaks["bfloat16"]
            return peaks["float32"] if matmul_precision == "highest" else peaks["tf32"]
    return None


def peak_memory_bytes(compiled=None) -> int | None:
    """The device's peak bytes in use (allocator statistics), else the compiled step's footprint."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    if compiled is not None:
        return compiled_footprint(compiled)
    return None


def compiled_footprint(compiled) -> int:
    """Arguments + outputs + temporaries - donated aliases, from XLA's memory analysis."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def matmul_peak_tflops(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """TFLOP/s of a jitted size×size jnp matmul in `dtype` on the default device (median)."""
    a = jr.normal(jr.key(0), (size, size)).astype(dtype)
    b = jr.normal(jr.key(1), (size, size)).astype(dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        timings.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(timings) / 1e12


class PlainState(NamedTuple):
    params: eqx.Module
    ema: eqx.Module
    opt_state: optax.OptState
    key: jax.Array


class PlainStep(NamedTuple):
    init: callable
    step: callable


def plain_train_step(model, optimizer, flow: FlowConfig, optim: OptimConfig, num_classes: int) -> PlainStep:
    """The Flax original's step structure on the same model: a `jax.jit` of grad, Adam and
    the EMA update (fixed decay), one step per call, no buffer donation."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = jax.tree_util.tree_map(jnp.copy, params)  # the caller's buffers may be donated elsewhere

    def init(key):
        with jax.numpy_dtype_promotion("standard"):
            return PlainState(params, params, optimizer.init(params), key)

    @jax.jit
    def step(state: PlainState, images, labels):
        key, loss_key = jr.split(state.key)

        def loss_fn(p):
            return flow_loss(eqx.combine(p, static), images, labels, flow, num_classes, key=loss_key)

        grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new_params)
        info = {"grad_norm": _global_norm(grads), "update_norm": _global_norm(updates),
                "param_norm": _global_norm(new_params), "v_abs_mean": aux["v_abs_mean"]}
        return PlainState(new_params, ema, opt_state, key), info

    return PlainStep(init, step)
