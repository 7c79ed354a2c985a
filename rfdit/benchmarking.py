"""Helpers for the benchmarks: a measured matmul peak, a plain reference step, an op-level profile."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from .config import FlowConfig, OptimConfig
from .flow import flow_loss
from .nn.layers import product
from .nn.policy import ExecutionPolicy, cpu_flags, cpuinfo, this_machine
from .train import _global_norm


# Dense (non-sparse) peaks from the vendors' datasheets, TFLOP/s, for the SXM parts.
NOMINAL_PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H200": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5},
}


# The two small configs of the CPU step benchmarks (DiTConfig fields plus the batch size): the debug
# preset with patch 2 on 8x8x1, and hidden 256, depth 4 on 16x16x3.
CORE_CONFIGS = {
    "debug": dict(hidden_size=64, depth=2, num_heads=2, patch_size=2, mlp_ratio=1.0, image_size=8, in_channels=1,
                  num_classes=10, batch_size=128),
    "hidden256": dict(hidden_size=256, depth=4, num_heads=4, patch_size=2, mlp_ratio=4.0, image_size=16,
                      in_channels=3, num_classes=10, batch_size=64),
}


def machine_info() -> dict[str, Any]:
    """Where and when a figure was measured: the date, the CPU (model, cores, the flags the execution
    defaults depend on and its family, `rfdit.nn.policy.this_machine`), JAX and the device."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "machine": str(this_machine()),
        "jax": jax.__version__,
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """`machine_info` in one line, as the benchmark scripts print it first."""
    return f"machine: {info['cpu']}, {info['machine']}, {info['cpu_count']} cores, {info['date']}"


def benchmark_matmul_precision(dtype: str) -> str:
    """The benchmarks' jax_default_matmul_precision for a compute dtype: "highest" for float32 (true
    float32 products; GPUs would otherwise run them as TF32), "default" for bfloat16."""
    return "highest" if dtype == "float32" else "default"


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


def time_calls(call, num_calls: int, repeats: int) -> list[float]:
    """Seconds per call for each of `repeats` timings of `num_calls` calls (synchronising once per timing)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(num_calls):
            out = call()
        jax.block_until_ready(out)
        timings.append((time.perf_counter() - start) / num_calls)
    return timings


def matmul_peak_tflops(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """TFLOP/s of a jitted size×size matmul in `dtype` on the default device (median), as rfdit's
    layers run it (`rfdit.nn.layers.product`: bf16 operands write float32 on CPUs, bf16 elsewhere)."""
    a = jr.normal(jr.key(0), (size, size)).astype(dtype)
    b = jr.normal(jr.key(1), (size, size)).astype(dtype)
    policy = ExecutionPolicy(compute_dtype=dtype)
    matmul = jax.jit(lambda a, b: product(a, b.T, policy))  # a @ b
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


# ---------------------------------------------------------------------------------------------
# Where a compiled step spends its time, op by op (jax.profiler + the compiled HLO)

class OpTime(NamedTuple):
    name: str  # the HLO instruction
    kind: str  # matmul, attention, convolution, reduce, transpose/copy, collective, elementwise, other
    shape: str
    ms_per_call: float
    count_per_call: float
    source: str  # the jax operation it came from (HLO metadata op_name, shortened)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ELEMENTWISE = ("broadcast", "add", "multiply", "select", "convert", "slice", "dynamic-slice", "dynamic-update-slice",
                "concatenate", "pad")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.M | re.S)


def _op_kinds(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """name -> (kind, shape, op_name) for every instruction of a compiled module's HLO text."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    ops = {}
    for m in _INSTRUCTION.finditer(hlo_text):
        name, shape, opcode, rest = m.groups()
        text = rest
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if called and called.group(1) in bodies:
            text = rest + bodies[called.group(1)]
        if re.search(r"fmha|flash_attention", text):
            kind = "attention"
        elif opcode == "dot" or re.search(r" dot\(|cublas|gemm", text):
            kind = "matmul"
        elif opcode == "convolution" or re.search(r" convolution\(|cudnn\$conv", text):
            kind = "convolution"
        elif opcode in _COLLECTIVES or opcode.removesuffix("-start") in _COLLECTIVES:
            kind = "collective"
        elif opcode == "reduce" or re.search(r" reduce\(|reduce-window", text):
            kind = "reduce"
        elif opcode in ("transpose", "copy") or re.search(r" transpose\(| copy\(", text):
            kind = "transpose/copy"
        elif opcode == "fusion" or opcode in _ELEMENTWISE:
            kind = "elementwise"
        else:
            kind = "other"
        source = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = (kind, shape, source.group(1).split("/")[-1] if source else "")
    return ops


def _library_kernel_kind(name: str) -> str:
    """The kind of a GPU kernel that no HLO instruction names (cuBLAS, cuDNN, ...)."""
    if re.search(r"sdpa|flash|fmha|attn", name):
        return "attention"
    if re.search(r"gemm|nvjet|xmma|cutlass|gemv", name):
        return "matmul"
    if re.search(r"conv(?!ert)", name):
        return "convolution"
    if re.search(r"cudnn", name):  # cuDNN's helpers of its fused attention (the only cuDNN call rfdit makes)
        return "attention"
    return "other"


def _device_op_name(event_name: str, ops: dict, kernel_names: dict[str, str]) -> str:
    """The HLO instruction a GPU kernel event belongs to, else the library kernel's name up to its
    argument list. XLA names a fusion's kernel after the instruction with '.' and '-' as '_'."""
    first = event_name.lstrip("%").split(" ")[0]
    if first in ops:
        return first
    return kernel_names.get(first) or event_name.split("(")[0]


def _device_lines(lines: list) -> list:
    """The timeline lines of a device plane to count: "XLA Ops" where the trace has it (one event per
    HLO op), else the streams' kernels; never derived lines (modules, steps), which would count twice."""
    ops_lines = [line for line in lines if line.name == "XLA Ops"]
    return ops_lines or [line for line in lines if line.name.startswith("Stream")]


def profile_ops(call, hlo_text: str, calls: int, trace_dir: str) -> list[OpTime]:
    """Run `call()` `calls` times under `jax.profiler` and attribute the recorded op events to the
    compiled module's instructions (`hlo_text`, from `compiled.as_text()`).

    On GPUs the device's "XLA Ops" timeline is read; on CPUs the runtime's threads, which record
    op events only for executables compiled with `{"xla_cpu_enable_xprof_traceme": True}`. Times
    are summed over threads, so on a CPU they can exceed the wall time."""
    from jax.profiler import ProfileData

    jax.block_until_ready(call())
    jax.profiler.start_trace(trace_dir)
    try:
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
    finally:
        jax.profiler.stop_trace()
    traces = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}.")
    ops = _op_kinds(hlo_text)
    kernel_names = {re.sub(r"[.\-]", "_", name): name for name in ops}  # GPU kernels are named after their fusion
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for plane in ProfileData.from_file(str(traces[-1])).planes:
        on_device = plane.name.startswith("/device:")
        lines = _device_lines(list(plane.lines)) if on_device else plane.lines
        for line in lines:
            for event in line.events:
                if on_device:
                    name = _device_op_name(event.name, ops, kernel_names)
                else:
                    name = event.name.lstrip("%").split(" ")[0]
                if name in ops or on_device:  # library kernels (cuBLAS, cuDNN) are kept by their own names
                    total[name] = total.get(name, 0.0) + event.duration_ns / 1e6
                    count[name] = count.get(name, 0) + 1
    rows = [OpTime(n, *(ops[n][:2] if n in ops else (_library_kernel_kind(n), "")), t / calls, count[n] / calls,
                   ops[n][2] if n in ops else "") for n, t in total.items()]
    return sorted(rows, key=lambda r: -r.ms_per_call)


def ops_by_kind(rows: list[OpTime]) -> dict[str, float]:
    """Milliseconds per call for each kind of op, largest first."""
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + r.ms_per_call
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def summarise_ops(rows: list[OpTime], wall_ms: float | None = None, top: int = 20) -> str:
    """The per-kind totals and the `top` most expensive ops, as text."""
    by_kind = ops_by_kind(rows)
    if not rows:
        return "no profiled op matched the compiled HLO (an unrecognised trace format?)"
    total = sum(by_kind.values())
    lines = [f"op time {total:.2f} ms per call" + (f" (wall {wall_ms:.2f} ms)" if wall_ms else "")]
    lines += [f"  {kind:15s} {ms:10.2f} ms  {ms / total:6.1%}" for kind, ms in by_kind.items()]
    lines.append(f"top {top} ops:")
    lines += [f"  {r.ms_per_call:9.3f} ms  x{r.count_per_call:<4.3g} {r.kind:15s} {r.name[:60]:32s} {r.shape[:34]:34s} {r.source[:40]}"
              for r in rows[:top]]
    return "\n".join(lines)
