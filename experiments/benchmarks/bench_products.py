"""Products in bf16 on this device: a large matmul per operand and result dtype, then one linear layer
and one attention, forward and backward, with and without rfdit's bf16 backward pass. Every group
is timed in interleaved rounds in one process; the figures are medians over rounds.

    python experiments/benchmarks/bench_products.py
    python experiments/benchmarks/bench_products.py --rounds 9 --batch 16 --tokens 64 --width 256 --hidden 1024

1. `matmul`: a jitted size×size product, TFLOP/s: float32; bf16 operands into float32 (what
   `rfdit.nn.layers.product` runs on CPUs); bf16 into bf16 (what it runs on accelerators); float32
   times bf16 into float32 (what autodiff multiplies when a bf16 product writes float32).
2. `linear`: a `rfdit.nn.layers.Linear` (width -> hidden) per example under `jax.vmap`, inside
   `jax.grad` of a loss over the batch, as the training step runs it; ms per forward and backward
   pass: float32; bf16 with plain autodiff; bf16 with the training step's backward rules (`ExecutionPolicy.bf16_backward`); and bf16 with the
   same custom VJP but a weight gradient formed per example and summed afterwards (what a custom VJP
   gives under vmap without rfdit's batch-summing rule).
3. `attention`: rfdit's einsum attention per example under `jax.vmap` (default: the debug config's
   128 examples of 16 tokens, 2 heads of 32) on q, k, v packed as the qkv layer writes them
   (`rfdit.nn.layers.qkv_attention`), forward and backward, bf16 heads: plain autodiff against the
   bf16 backward pass.

The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import functools as ft
import json
import random
import statistics

import jax
import jax.numpy as jnp
import jax.random as jr
import tyro

from rfdit.benchmarking import machine_info, machine_line, time_calls
from rfdit.nn.grad_rules import bf16_product
from rfdit.nn.layers import Linear, qkv_attention
from rfdit.nn.policy import ExecutionPolicy


@dataclasses.dataclass
class Args:
    rounds: int = 7
    size: int = 2048
    """the matmul's size"""
    batch: int = 16
    """linear: examples (one micro-batch of the hidden-256 config by default)"""
    tokens: int = 64
    width: int = 256
    """linear: input features"""
    hidden: int = 1024
    """linear: output features"""
    attention_batch: int = 128
    attention_tokens: int = 16
    heads: int = 2
    head_dim: int = 32
    seed: int = 0


def interleaved(calls: dict, rounds: int, num_calls: int, seed: int) -> dict[str, list[float]]:
    """Seconds per call of each no-argument call, one timing per round, in a shuffled order."""
    for call in calls.values():  # compile and warm up
        jax.block_until_ready(call())
    seconds = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            seconds[name].append(time_calls(calls[name], num_calls, 1)[0])
    return seconds


@jax.custom_vjp
def _summed_afterwards(x, weight):
    return bf16_product(x, weight)


def _summed_afterwards_bwd(residuals, g):
    xb, wb = residuals
    gb = g.astype(jnp.bfloat16)
    dx = jnp.matmul(gb, wb, preferred_element_type=jnp.float32)
    return dx, jnp.einsum("...o,...i->oi", gb, xb, preferred_element_type=jnp.float32)


def _summed_afterwards_fwd(x, weight):
    xb, wb = x.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    return bf16_product(xb, wb), (xb, wb)


_summed_afterwards.defvjp(_summed_afterwards_fwd, _summed_afterwards_bwd)


def matmul_calls(size: int, key) -> dict:
    a, b = jr.normal(key, (2, size, size))
    pairs = {
        "float32": (a, b, jnp.float32),
        "bf16 -> float32": (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jnp.float32),
        "bf16 -> bf16": (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jnp.bfloat16),
        "float32 x bf16 -> float32": (a, b.astype(jnp.bfloat16), jnp.float32),
    }
    calls = {}
    for name, (x, y, out) in pairs.items():
        fn = jax.jit(ft.partial(jax.lax.dot, preferred_element_type=out))
        calls[name] = ft.partial(fn, x, y)
    return calls


def linear_calls(args: Args, key) -> dict:
    x_key, w_key, g_key = jr.split(key, 3)
    x = jr.normal(x_key, (args.batch, args.tokens, args.width))
    g = jr.normal(g_key, (args.batch, args.tokens, args.hidden))
    weight = 0.05 * jr.normal(w_key, (args.hidden, args.width))
    bias = jnp.zeros((args.hidden,))
    layer = Linear(weight, bias)
    policies = {
        "float32": ExecutionPolicy(),
        "bf16, autodiff": ExecutionPolicy(compute_dtype="bfloat16"),
        "bf16, bf16 backward (rfdit)": ExecutionPolicy(compute_dtype="bfloat16", bf16_backward=True),
    }
    calls = {}
    for name, policy in policies.items():
        loss = lambda layer, x, policy=policy: jnp.sum(jax.vmap(lambda x: layer(x, policy))(x) * g)
        calls[name] = ft.partial(jax.jit(jax.grad(loss, argnums=(0, 1))), layer, x)

    def summed_loss(weight, x):
        return jnp.sum(jax.vmap(_summed_afterwards, in_axes=(0, None))(x, weight) * g)

    calls["bf16, custom VJP summed afterwards"] = ft.partial(jax.jit(jax.grad(summed_loss, argnums=(0, 1))), weight, x)
    return calls


def attention_calls(args: Args, key) -> dict:
    qkv_key, g_key = jr.split(key)
    shape = (args.attention_batch, args.attention_tokens, args.heads, args.head_dim)
    # q, k, v packed along the second axis, as the DiT block's qkv layer writes them
    qkv = jr.normal(qkv_key, (shape[0], shape[1], 3, *shape[2:])).astype(jnp.bfloat16)
    g = jr.normal(g_key, shape).astype(jnp.bfloat16)
    calls = {}
    for name, flag in (("bf16, autodiff", False), ("bf16, bf16 backward (rfdit)", True)):
        heads = ft.partial(qkv_attention, policy=ExecutionPolicy(attention="einsum", bf16_backward=flag))
        loss = lambda qkv, heads=heads: jnp.sum((jax.vmap(heads)(qkv) * g).astype(jnp.float32))
        calls[name] = ft.partial(jax.jit(jax.grad(loss)), qkv)
    return calls


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    device = jax.devices()[0]
    info = machine_info()
    print(machine_line(info))
    print(f"device: {device.device_kind} x{jax.device_count()}")
    keys = jr.split(jr.key(args.seed), 3)
    result: dict = {"device": f"{device.device_kind} x{jax.device_count()}", "machine": info, "rounds": args.rounds}

    seconds = interleaved(matmul_calls(args.size, keys[0]), args.rounds, 5, args.seed)
    result["matmul_tflops"] = {n: round(2 * args.size**3 / statistics.median(s) / 1e12, 4) for n, s in seconds.items()}
    for group in ("linear", "attention"):
        calls = (linear_calls if group == "linear" else attention_calls)(args, keys[1 if group == "linear" else 2])
        seconds = interleaved(calls, args.rounds, 10, args.seed)
        result[f"{group}_ms"] = {n: round(1e3 * statistics.median(s), 3) for n, s in seconds.items()}
    for group, unit in (("matmul_tflops", "TFLOP/s"), ("linear_ms", "ms forward + backward"),
                        ("attention_ms", "ms forward + backward")):
        print(f"{group.split('_')[0]} ({unit}):")
        for name, value in result[group].items():
            print(f"  {name:40s} {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
